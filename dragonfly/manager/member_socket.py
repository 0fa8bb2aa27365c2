"""The manager's websocket (/v1/manager): schedulers and seed peers register and keep
alive; any host may ask which schedulers to use.

The project's CBOR channel (dragonfly/net/channel.py) runs over Starlette's
websocket through a small adapter, so the handshake, the frame checks and the
error answers are the ones every other websocket of the project has.

Flow: Hello both ways (each with a fresh nonce), then `authenticate_member`: a host
whose Hello carries a credential's claims proves it holds the key (`Proof`, as on the
scheduler websocket) and the manager proves back that it could compute that key; a
refused one gets an Error `forbidden` naming why and the connection closes (1008).
Then `AnnounceMember` → `MemberRegistered` (only from a proven credential of that
role: scheduler or seed-peer), a `Ping` per keepalive interval (→ `Pong`), and on
close the row turns inactive. A registered scheduler is sent its cluster's settings
(`ConfigUpdate`) and the revoked hosts (`Revocations`) at once and whenever either
changes (looked at on each keepalive), is asked for its hosts (`SyncHosts`) when an
operator asks, and reports them (`HostsReport`) into the peers table. A member whose
credential is revoked is dropped at its next keepalive. `ListSchedulers` is answered at
any point, to anyone (what it reveals is where the schedulers are and the block lists).

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
from dragonfly.manager import member_feed, members, peer_table
from dragonfly.manager.context import Context, context
from dragonfly.manager.discovery import HostQuery
from dragonfly.manager.jobs import store as job_store
from dragonfly.manager.sessions import MemberSession
from dragonfly.manager.store import DatabaseError, Tx
from dragonfly.manager.store.rows import NotFound
from dragonfly.net.channel import HANDSHAKE_TIMEOUT, Channel, ChannelClosed
from dragonfly.trust import TrustError, check_proof, new_nonce, peer_proof, scheduler_proof
from dragonfly.wire.codec import MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, ProtocolError
from dragonfly.wire.messages import (
    AnnounceMember,
    ClusterConfig,
    ConfigUpdate,
    DownloadRecords,
    Error,
    ErrorCode,
    Hello,
    HostsReport,
    JobResult,
    ListSchedulers,
    MemberRegistered,
    Ping,
    Pong,
    Proof,
    Revocations,
    SchedulerEntry,
    SchedulerList,
    SyncHosts,
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

    role: str  # the proven credential's role; "" when nothing was proven
    host_id: str
    issued_at: int
    source_ip: str
    verified: bool


class Refused(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


async def authenticate_member(
    ctx: Context, channel: Channel, hello: Hello, nonce: bytes, source_ip: str
) -> MemberIdentity:
    """The cluster-credential handshake of the scheduler websocket, with the manager on
    the scheduler's side: the claims must be this cluster's, valid and not revoked, the
    Hello's role the credential's, and the proof right; then the manager proves itself.
    Without claims nothing is proven (the host may only ask for schedulers)."""
    claims = hello.claims
    if claims is None:
        return MemberIdentity("", "", 0, source_ip, verified=False)
    try:
        key = ctx.verifier.host_key(claims, ctx.clock())
    except TrustError as exc:
        raise Refused(exc.reason, str(exc)) from None
    if hello.role != claims.role:
        raise Refused("role_mismatch", f"the hello says {hello.role}, the credential {claims.role}")
    before = await ctx.db.run(lambda tx: member_feed.revoked_before(tx, claims.host_id))
    if before is not None and claims.issued_at <= before:
        raise Refused("revoked", f"the credential of {claims.host_id} is revoked")
    with trio.fail_after(HANDSHAKE_TIMEOUT):
        msg = await channel.receive()
    if not isinstance(msg, Proof):
        raise Refused("proof", f"expected a proof after the hello, got {msg.TAG}")
    try:
        check_proof(peer_proof(key, hello.nonce, nonce, claims), msg.proof, "host")
    except TrustError as exc:
        raise Refused(exc.reason, str(exc)) from None
    await channel.send(Proof(proof=scheduler_proof(key, hello.nonce, nonce)))
    return MemberIdentity(claims.role, claims.host_id, claims.issued_at, source_ip, verified=True)


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

    def find(tx: Tx) -> tuple[int, list[dict[str, object]], ClusterConfig | None]:
        cluster_id, found = members.schedulers_for(tx, host, msg.cluster_id)
        config = member_feed.cluster_config(tx, cluster_id) if cluster_id else None
        return cluster_id, found, config

    cluster_id, found, config = await ctx.db.run(find)
    await channel.send(
        SchedulerList(cluster_id=cluster_id, schedulers=_entries(found), config=config)
    )


@dataclass
class Session:
    """One member's connection: its row, and what it was last sent."""

    identity: MemberIdentity
    membership: members.Membership | None = None
    cluster_id: int = 0
    config_revision: str = ""
    revocations: tuple[int, int] = (-1, -1)
    # The newest request for hosts it was sent (None: registered, it reports at once).
    synced_at: float | None = None
    member: MemberSession | None = None  # for jobs (ctx.sessions), once registered

    @property
    def scheduler(self) -> bool:
        return self.membership is not None and self.membership.role == members.SCHEDULER


async def member_endpoint(ws: WebSocket) -> None:
    ctx = context(ws)
    await ws.accept()
    source_ip = ws.client.host if ws.client else ""
    channel = Channel(
        AsgiWebSocket(ws),  # type: ignore[arg-type]
        name=f"member {source_ip}",
        on_protocol_error=lambda exc: ctx.metrics.protocol_errors.inc(),
    )
    session: Session | None = None
    nonce = new_nonce()
    try:
        hello = await channel.handshake(
            Hello(
                version=PROTOCOL_VERSION,
                min_version=MIN_PROTOCOL_VERSION,
                role="manager",
                nonce=nonce,
            )
        )
        try:
            identity = await authenticate_member(ctx, channel, hello, nonce, source_ip)
        except Refused as exc:
            await _refuse(ctx, channel, exc, hello, source_ip)
            return
        session = Session(identity)
        while True:
            if session.membership is None:
                with trio.fail_after(HANDSHAKE_TIMEOUT * 3):
                    msg = await channel.receive()
            else:
                msg = await channel.receive()
            if isinstance(msg, AnnounceMember) and session.membership is None:
                if not await _register(ctx, channel, session, hello, msg):
                    return
                news = await ctx.db.run(partial(_news, session=session))
                if not await _feed(ctx, channel, session, news):
                    return
                assert session.membership is not None
                session.member = MemberSession(
                    session.membership.role,
                    session.membership.member_id,
                    msg.cluster_id,
                    msg.hostname,
                    identity.source_ip,
                    tuple(msg.features),
                    channel,
                )
                ctx.sessions.add(session.member)
            elif isinstance(msg, JobResult) and session.member is not None:
                session.member.deliver(msg)
            elif isinstance(msg, DownloadRecords) and session.member is not None:
                if session.scheduler and msg.records:
                    await _keep_records(ctx, session.member, msg)
            elif isinstance(msg, Ping) and session.membership is not None:
                news = await ctx.db.run(partial(_keepalive, session=session, now=ctx.clock()))
                if news is None:
                    await channel.send(
                        Error(code=ErrorCode.NOT_FOUND, message="replaced by a newer session")
                    )
                    session.membership = None  # the row is another session's now
                    return
                ctx.metrics.keepalives.inc()
                await channel.send(Pong(nonce=msg.nonce))
                if not await _feed(ctx, channel, session, news):
                    return
            elif isinstance(msg, HostsReport) and session.scheduler:
                await ctx.db.run(
                    partial(
                        peer_table.record,
                        hosts=msg.hosts,
                        cluster_id=session.cluster_id,
                        now=ctx.clock(),
                    )
                )
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
        membership = session.membership if session is not None else None
        if session is not None and session.member is not None:
            ctx.sessions.remove(session.member)
        if membership is not None:
            now = ctx.clock()
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                with contextlib.suppress(DatabaseError):
                    await ctx.db.run(lambda tx: members.disconnected(tx, membership, now))
                log.info("member left", role=membership.role, member_id=membership.member_id)
        await channel.aclose(1000, "")


async def _refuse(
    ctx: Context, channel: Channel, exc: Refused, hello: Hello, source_ip: str
) -> None:
    ctx.metrics.member_refusals.labels(exc.reason).inc()
    claims = hello.claims
    log.warning(
        "member refused",
        reason=exc.reason,
        error=str(exc),
        host_id=claims.host_id if claims else "",
        ip=source_ip[:64],
    )
    with contextlib.suppress(ChannelClosed):
        await channel.send(Error(code=ErrorCode.FORBIDDEN, message=str(exc)[:1024], ref=Hello.TAG))
    await channel.aclose(1008, "identity not proven")


@dataclass
class News:
    """What changed for a session since it was last told (None: unchanged)."""

    config: ClusterConfig | None = None
    revocations: Revocations | None = None
    revocations_revision: tuple[int, int] = (-1, -1)
    sync_requested_at: float = 0.0
    revoked: bool = False


def _news(tx: Tx, session: Session) -> News:
    """Read in the same transaction as a keepalive: what a scheduler has not been sent,
    and whether the member's own credential was revoked since it connected."""
    news = News()
    identity = session.identity
    before = member_feed.revoked_before(tx, identity.host_id)
    news.revoked = before is not None and identity.issued_at <= before
    if not session.scheduler:
        return news
    config = member_feed.cluster_config(tx, session.cluster_id)
    if config is not None and config.revision != session.config_revision:
        news.config = config
    revision = member_feed.revocations_revision(tx)
    if revision != session.revocations:
        news.revocations = Revocations(hosts=member_feed.revoked_hosts(tx))
        news.revocations_revision = revision
    news.sync_requested_at = member_feed.sync_requested_at(tx)
    return news


def _keepalive(tx: Tx, session: Session, now: float) -> News | None:
    assert session.membership is not None
    if not members.keepalive(tx, session.membership, now):
        return None
    return _news(tx, session)


async def _feed(ctx: Context, channel: Channel, session: Session, news: News) -> bool:
    """Send a member what changed; False when its credential is revoked (it is dropped)."""
    if news.revoked:
        await _refuse(
            ctx,
            channel,
            Refused("revoked", f"the credential of {session.identity.host_id} is revoked"),
            Hello(version=PROTOCOL_VERSION, min_version=MIN_PROTOCOL_VERSION, role="manager"),
            session.identity.source_ip,
        )
        return False
    if news.config is not None:
        await channel.send(ConfigUpdate(config=news.config))
        session.config_revision = news.config.revision
    if news.revocations is not None:
        await channel.send(news.revocations)
        session.revocations = news.revocations_revision
    if session.scheduler:
        if session.synced_at is not None and news.sync_requested_at > session.synced_at:
            await channel.send(SyncHosts())
        session.synced_at = max(session.synced_at or 0.0, news.sync_requested_at)
    return True


async def _keep_records(ctx: Context, session: MemberSession, msg: DownloadRecords) -> None:
    now = ctx.clock()
    await ctx.db.run(
        lambda tx: job_store.add_records(
            tx, session.cluster_id, session.member_id, list(msg.records), now
        )
    )
    ctx.metrics.download_records.inc(len(msg.records))


async def _register(
    ctx: Context, channel: Channel, session: Session, hello: Hello, msg: AnnounceMember
) -> bool:
    identity = session.identity
    if not identity.verified or identity.role not in MEMBER_ROLES or hello.role != identity.role:
        await channel.send(
            Error(
                code=ErrorCode.FORBIDDEN,
                message="only schedulers and seed peers register, with a credential of that role",
            )
        )
        return False
    now = ctx.clock()
    try:
        membership = await ctx.db.run(
            lambda tx: members.register(tx, identity.role, msg, identity.source_ip, now)
        )
    except NotFound as exc:
        await channel.send(Error(code=ErrorCode.NOT_FOUND, message=f"{exc}: no such cluster"))
        return False
    session.membership = membership
    session.cluster_id = msg.cluster_id
    cfg = ctx.config
    await channel.send(
        MemberRegistered(
            member_id=membership.member_id,
            keepalive_ms=max(1, round(cfg.keepalive.interval * 1000)),
            hosts_report_ms=max(1, round(cfg.peers.report_interval * 1000))
            if membership.role == members.SCHEDULER
            else 0,
        )
    )
    log.info(
        "member registered",
        role=identity.role,
        member_id=membership.member_id,
        host_id=identity.host_id,
        hostname=msg.hostname,
        ip=identity.source_ip,
        claimed_ip=msg.ip,
        version=msg.version,
        manager_version=__version__,
    )
    return True
