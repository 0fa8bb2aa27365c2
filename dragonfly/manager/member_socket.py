"""The manager's websocket (/v1/manager): schedulers and seed peers register and keep
alive; any host may ask which schedulers to use.

The project's CBOR channel (dragonfly/net/channel.py) runs over Starlette's
websocket through a small adapter, so the handshake, the frame checks and the
error answers are the ones every other websocket of the project has.

Flow: Hello both ways, then `authenticate_member` (the one place phase 2's
credential handshake plugs in), then `AnnounceMember` → `MemberRegistered`
(active from then on), a `Ping` per keepalive interval (→ `Pong`), and on close
the row turns inactive. `ListSchedulers` is answered at any point.

A registered scheduler is a `MemberSession` of this manager while it is connected: the
job runner hands it `RunJob`s, and its `JobResult`s go to the job waiting for them;
its `DownloadRecords` are kept (dragonfly/manager/jobs/store.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial

import trio
import trio_websocket
from starlette.websockets import WebSocket, WebSocketDisconnect

from dragonfly import __version__
from dragonfly.log import get_logger
from dragonfly.manager import members
from dragonfly.manager.context import Context, context
from dragonfly.manager.discovery import HostQuery
from dragonfly.manager.jobs import store as job_store
from dragonfly.manager.sessions import MemberSession
from dragonfly.manager.store import DatabaseError
from dragonfly.manager.store.rows import NotFound
from dragonfly.net.channel import HANDSHAKE_TIMEOUT, Channel, ChannelClosed
from dragonfly.wire.codec import MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, ProtocolError
from dragonfly.wire.messages import (
    AnnounceMember,
    DownloadRecords,
    Error,
    ErrorCode,
    Hello,
    JobResult,
    ListSchedulers,
    MemberRegistered,
    Ping,
    Pong,
    SchedulerEntry,
    SchedulerList,
)

log = get_logger("dragonfly.manager.members")
MEMBER_ROLES = (members.SCHEDULER, members.SEED_PEER)


class AsgiWebSocket:
    """What `Channel` needs of a trio-websocket connection, over an ASGI websocket."""

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws

    async def send_message(self, data: bytes) -> None:
        try:
            await self.ws.send_bytes(data)
        except (WebSocketDisconnect, RuntimeError, OSError) as exc:
            raise trio_websocket.ConnectionClosed(
                trio_websocket.CloseReason(1006, str(exc))
            ) from None

    async def get_message(self) -> bytes | str:
        try:
            msg = await self.ws.receive()
        except RuntimeError as exc:  # receive after the disconnect
            raise trio_websocket.ConnectionClosed(
                trio_websocket.CloseReason(1006, str(exc))
            ) from None
        if msg["type"] == "websocket.disconnect":
            raise trio_websocket.ConnectionClosed(
                trio_websocket.CloseReason(int(msg.get("code") or 1005), msg.get("reason"))
            )
        if msg.get("bytes") is not None:
            return bytes(msg["bytes"])
        return str(msg.get("text") or "")

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):
            await self.ws.close(code, reason)


@dataclass(frozen=True)
class MemberIdentity:
    """Who is on the other end, as far as the manager knows."""

    role: str
    source_ip: str
    verified: bool


async def authenticate_member(channel: Channel, hello: Hello, source_ip: str) -> MemberIdentity:
    """PHASE 2 PLUGS IN HERE: the cluster-credential challenge-response (trust-core)
    runs on `channel` after the Hello and returns the role and host the credential
    proves, refusing the connection otherwise. Until then nothing is proven: the role
    is the Hello's claim, and the only fact used about the host is the address the
    connection came from."""
    return MemberIdentity(role=hello.role, source_ip=source_ip, verified=False)


def _entries(found: list[dict[str, object]]) -> list[SchedulerEntry]:
    import json

    return [
        SchedulerEntry(
            id=int(r["id"]),  # type: ignore[call-overload]
            hostname=str(r["host_name"])[:255],
            ip=str(r["ip"]),
            port=int(r["port"]),  # type: ignore[call-overload]
            idc=str(r["idc"])[:256],
            location=str(r["location"])[:256],
            features=[str(f)[:64] for f in json.loads(str(r["features"]))][:16],
        )
        for r in found
    ][:1024]


async def _answer_list(ctx: Context, channel: Channel, msg: ListSchedulers, ip: str) -> None:
    host = HostQuery(ip=ip, hostname=msg.hostname, idc=msg.idc, location=msg.location)
    cluster_id, found = await ctx.db.run(
        lambda tx: members.schedulers_for(tx, host, msg.cluster_id)
    )
    await channel.send(SchedulerList(cluster_id=cluster_id, schedulers=_entries(found)))


async def member_endpoint(ws: WebSocket) -> None:
    ctx = context(ws)
    await ws.accept()
    source_ip = ws.client.host if ws.client else ""
    channel = Channel(
        AsgiWebSocket(ws),  # type: ignore[arg-type]
        name=f"member {source_ip}",
        on_protocol_error=lambda exc: ctx.metrics.protocol_errors.inc(),
    )
    membership: members.Membership | None = None
    session: MemberSession | None = None
    try:
        hello = await channel.handshake(
            Hello(version=PROTOCOL_VERSION, min_version=MIN_PROTOCOL_VERSION, role="manager")
        )
        identity = await authenticate_member(channel, hello, source_ip)
        while True:
            if membership is None:
                with trio.fail_after(HANDSHAKE_TIMEOUT * 3):
                    msg = await channel.receive()
            else:
                msg = await channel.receive()
            if isinstance(msg, AnnounceMember) and membership is None:
                membership = await _register(ctx, channel, identity, msg)
                if membership is None:
                    return
                session = MemberSession(
                    membership.role,
                    membership.member_id,
                    msg.cluster_id,
                    msg.hostname,
                    identity.source_ip,
                    tuple(msg.features),
                    channel,
                )
                ctx.sessions.add(session)
            elif isinstance(msg, JobResult) and session is not None:
                session.deliver(msg)
            elif isinstance(msg, DownloadRecords) and session is not None:
                if session.role == members.SCHEDULER and msg.records:
                    await _keep_records(ctx, session, msg)
            elif isinstance(msg, Ping) and membership is not None:
                now = ctx.clock()
                mine = await ctx.db.run(partial(members.keepalive, member=membership, now=now))
                if not mine:
                    await channel.send(
                        Error(code=ErrorCode.NOT_FOUND, message="replaced by a newer session")
                    )
                    membership = None  # the row is another session's now: leave it alone
                    return
                ctx.metrics.keepalives.inc()
                await channel.send(Pong(nonce=msg.nonce))
            elif isinstance(msg, ListSchedulers):
                await _answer_list(ctx, channel, msg, identity.source_ip)
            else:
                await channel.send(
                    Error(code=ErrorCode.PROTOCOL, message="unexpected message", ref=msg.TAG)
                )
    except (ChannelClosed, trio.TooSlowError, ProtocolError):
        pass
    except DatabaseError as exc:
        log.warning("member session failed: database", error=str(exc))
    finally:
        if session is not None:
            ctx.sessions.remove(session)
        if membership is not None:
            now = ctx.clock()
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                with contextlib.suppress(DatabaseError):
                    await ctx.db.run(lambda tx: members.disconnected(tx, membership, now))
                log.info("member left", role=membership.role, member_id=membership.member_id)
        await channel.aclose(1000, "")


async def _keep_records(ctx: Context, session: MemberSession, msg: DownloadRecords) -> None:
    now = ctx.clock()
    await ctx.db.run(
        lambda tx: job_store.add_records(
            tx, session.cluster_id, session.member_id, list(msg.records), now
        )
    )
    ctx.metrics.download_records.inc(len(msg.records))


async def _register(
    ctx: Context, channel: Channel, identity: MemberIdentity, msg: AnnounceMember
) -> members.Membership | None:
    if identity.role not in MEMBER_ROLES:
        await channel.send(
            Error(code=ErrorCode.PROTOCOL, message="only schedulers and seed peers register")
        )
        return None
    now = ctx.clock()
    try:
        membership = await ctx.db.run(
            lambda tx: members.register(tx, identity.role, msg, identity.source_ip, now)
        )
    except NotFound as exc:
        await channel.send(Error(code=ErrorCode.NOT_FOUND, message=f"{exc}: no such cluster"))
        return None
    interval_ms = max(1, round(ctx.config.keepalive.interval * 1000))
    await channel.send(MemberRegistered(member_id=membership.member_id, keepalive_ms=interval_ms))
    log.info(
        "member registered",
        role=identity.role,
        member_id=membership.member_id,
        hostname=msg.hostname,
        ip=identity.source_ip,
        claimed_ip=msg.ip,
        version=msg.version,
        manager_version=__version__,
    )
    return membership
