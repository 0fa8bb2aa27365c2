"""A download's parents: following one parent's piece announcements, and fetching one
piece from it into the store. Each performs one of the machine's actions (Subscribe,
Fetch) and feeds back what happened; the decisions are the machine's."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import trio

from dragonfly.engine.actions import Fetch
from dragonfly.net.channel import ANNOUNCE_PATH, ChannelClosed, connect
from dragonfly.net.http_client import HTTPClient, HTTPClientError
from dragonfly.peer.context import DownloadContext
from dragonfly.storage import DigestMismatch, PieceSink, StorageError
from dragonfly.trust import TICKET_HEADER, Ticket
from dragonfly.wire.codec import MIN_PROTOCOL_VERSION, PROTOCOL_VERSION
from dragonfly.wire.messages import AnnounceDone, Hello, ParentInfo, PieceAnnounce, Subscribe

__all__ = ["LEAVING", "ParentBusy", "ParentLink"]

# The body of the 503 a stopping host answers (dragonfly/peer/upload.py): the child drops
# that parent rather than ask it again.
LEAVING = b"stopping: this host leaves\n"


class ParentBusy(Exception):
    """A parent refused a piece request at once: every upload slot of its host is taken."""


class ParentLeaving(Exception):
    """A parent refused a piece request because its host is stopping (SIGTERM)."""


@dataclass
class ParentLink:
    """One parent of one download: its announcements and its pieces."""

    info: ParentInfo
    client: HTTPClient
    ticket: Ticket | None = None  # the scheduler's, when this parent was first given
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    @property
    def base_url(self) -> str:
        """http://IP:PORT, or https:// for a parent whose upload port speaks TLS (its
        certificate must name that IP and chain to the cluster's CA)."""
        host = f"[{self.info.ip}]" if ":" in self.info.ip else self.info.ip
        scheme = "https" if self.info.tls else "http"
        return f"{scheme}://{host}:{self.info.upload_port}"

    async def follow(self, dl: DownloadContext) -> None:
        """The parent's piece announcements until it is done or fails."""
        pid = self.info.peer_id
        hello = Hello(version=PROTOCOL_VERSION, min_version=MIN_PROTOCOL_VERSION, role="peer")
        url = "ws" + self.base_url.removeprefix("http") + ANNOUNCE_PATH  # ws:// or wss://
        machine = dl.machine
        with self.scope:
            try:
                async with connect(
                    url,
                    hello,
                    name=f"parent {pid}",
                    connect_timeout=dl.daemon.config.download.connect_timeout,
                    ssl_context=dl.daemon.cluster_tls,
                ) as channel:
                    ticket = self.ticket  # (it opens the announcements: dragonfly/trust.py)
                    await channel.send(
                        Subscribe(
                            task_id=dl.task_id,
                            peer_id=dl.peer_id,
                            parent_id=pid,
                            host_id=ticket.child_host_id if ticket else "",
                            ticket=ticket.mac if ticket else b"",
                            expires_at=ticket.expires_at if ticket else 0,
                        )
                    )
                    async for msg in channel:
                        if isinstance(msg, PieceAnnounce):
                            numbers = [p.number for p in msg.pieces]
                            dl.feed(machine.parent_announced(pid, numbers, trio.current_time()))
                        elif isinstance(msg, AnnounceDone):
                            # It holds every piece: keep fetching from it.
                            every = range(msg.piece_count)
                            dl.feed(machine.parent_announced(pid, every, trio.current_time()))
                            return
                    raise ChannelClosed("parent closed the announcements")
            except Exception as exc:  # OSError, ChannelClosed, trio-websocket's own...
                if machine.done:
                    return
                dl.log.info("parent announcements failed", parent=pid, error=repr(exc))
                dl.feed(machine.parent_gone(pid, trio.current_time()))

    async def fetch(self, dl: DownloadContext, action: Fetch, scope: trio.CancelScope) -> None:
        """One piece into the store. The first request of a piece splices straight into
        the task file; an endgame duplicate receives aside, and once its bytes are in
        hand the machine stops the others before it is written."""
        fid, number, pid = action.fetch_id, action.number, action.parent_id
        metrics = dl.daemon.metrics
        machine = dl.machine
        sink: PieceSink | None = None
        try:
            with scope:
                sink = await self._receive(dl, action)
            if sink is not None and sink.record is not None:
                length = sink.record.length
                dl.count_landed(number, length, "p2p", pid)
                dl.feed(machine.piece_landed(fid, number, pid, length, trio.current_time()))
        except ParentBusy:
            # Not a failure: the parent is full; the machine asks it again a moment later.
            dl.feed(machine.piece_busy(fid, trio.current_time()))
        except ParentLeaving:
            # Not a failure either, but it will not serve again: ask the others.
            dl.log.info("parent leaves", parent=pid)
            dl.feed(machine.piece_busy(fid, trio.current_time()))
            dl.feed(machine.parent_gone(pid, trio.current_time()))
        except DigestMismatch:
            metrics.piece_failures.labels("digest").inc()
            dl.log.info("piece failed", number=number, parent=pid, reason="digest mismatch")
            dl.feed(
                machine.piece_failed(fid, "digest mismatch", trio.current_time(), bad_bytes=True)
            )
        except (HTTPClientError, OSError, StorageError) as exc:
            metrics.piece_failures.labels("transfer").inc()
            reason = str(exc)[:500]
            dl.log.info("piece failed", number=number, parent=pid, reason=reason)
            dl.feed(machine.piece_failed(fid, reason, trio.current_time()))

    async def _receive(self, dl: DownloadContext, action: Fetch) -> PieceSink:
        """The piece's bytes into the store; the sink says what was recorded."""
        handle = dl.handle
        if handle is None:
            raise HTTPClientError("the task is gone")
        number = action.number
        geometry = dl.machine.layout.geometry
        assert geometry is not None
        length = geometry.length(number)
        expected = dl.machine.digests[number]
        limiter = dl.daemon.download_limiter
        if limiter is not None:
            await limiter.acquire(length)
        store = dl.daemon.store
        if self.info.tls and self.client.ssl_context is None:  # never the system's CAs
            raise HTTPClientError("a TLS parent, and no trust.ca_file to verify it with")
        url = f"{self.base_url}/pieces/{dl.task_id}/{number}"
        known = dl.machine.parents.get(action.parent_id)  # (its latest ticket)
        ticket = known.ticket if known is not None else None
        headers = [(TICKET_HEADER, ticket.header())] if ticket is not None else []
        async with self.client.request("GET", url, headers) as r:
            if r.status == 503:
                if await r.read(4096) == LEAVING:  # (a busy 503 says so in a few bytes)
                    raise ParentLeaving(url)
                raise ParentBusy(url)
            if r.status != 200:
                raise HTTPClientError(f"parent answered {r.status}")
            if r.content_length != length:
                raise HTTPClientError(
                    f"parent sent {r.content_length} bytes for a {length}-byte piece"
                )
            if action.in_place:
                async with store.writing(handle, number, expected) as sink:
                    if not sink.done:
                        await r.splice_to(
                            sink.fd, sink.offset, length, on_written=sink.hash_as_written()
                        )
                return sink  # (a body left unread closes the connection)
            buf = bytearray(length)
            await r.readinto_exactly(buf)
        if hashlib.sha256(buf).digest() != expected:
            raise DigestMismatch(f"piece {number}", expected.hex(), "other")
        dl.feed(dl.machine.piece_in_hand(action.fetch_id, trio.current_time()))
        async with store.writing(handle, number, expected) as sink:
            if not sink.done:
                sink.write(buf)
        return sink
