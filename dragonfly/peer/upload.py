"""The upload server: pieces to other peers over HTTP with sendfile, piece
announcements over a websocket on the same port, and /metrics and /healthy.

Only verified pieces of known tasks are served, and only to a child holding a ticket
the scheduler made for that task, that child's host and this host (dragonfly/trust.py):
a piece request or a Subscribe without one is refused (403, or an Error). Concurrent
uploads are capped (the load limit) and paced by the upload rate limit shared by all
of them; a child that reads slower than `upload.min_rate` loses its slot, and one that
says nothing after its Hello is dropped after SUBSCRIBE_TIMEOUT.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager

import trio
import trio_websocket

from dragonfly.engine.admission import Admission
from dragonfly.log import LogLimiter, get_logger
from dragonfly.net.channel import ANNOUNCE_PATH, Channel, ChannelClosed
from dragonfly.net.http_connection import ClientGone, Request
from dragonfly.net.http_response import Responder
from dragonfly.peer.parents import LEAVING
from dragonfly.peer.services import PeerServices
from dragonfly.peer.serving import serve_common
from dragonfly.storage import StorageError, TaskState, UnknownTask
from dragonfly.trust import TICKET_HEADER, Ticket, TrustError
from dragonfly.wire.codec import MIN_PROTOCOL_VERSION, PROTOCOL_VERSION
from dragonfly.wire.http_common import Headers
from dragonfly.wire.messages import (
    AnnounceDone,
    Error,
    ErrorCode,
    Hello,
    PieceAnnounce,
    PieceInfo,
    Subscribe,
)

log = get_logger("dragonfly.peer.upload")

PIECE_PATH = re.compile(r"^/pieces/([A-Za-z0-9._:+-]{1,255})/([0-9]{1,10})$")
ANNOUNCE_BATCH = 4096
SEND_CHUNK = 4 << 20
# A child that opened the announcement websocket says what it wants within this long.
SUBSCRIBE_TIMEOUT = 10.0
# Seconds every chunk may take beyond what upload.min_rate allows (a slow start).
SLOW_GRACE = 5.0


class UploadHandler:
    """Routes of the upload listener."""

    def __init__(self, daemon: PeerServices) -> None:
        self.daemon = daemon
        upload = daemon.config.upload
        self.load_limit = trio.CapacityLimiter(upload.concurrent_limit)
        self.admission = Admission(slots=upload.concurrent_limit, queue_limit=upload.queue_limit)
        self.holding: dict[str | None, int] = {}  # child -> its requests sent or waiting
        self.min_rate = daemon.config.upload.min_rate
        self.open = daemon.config.trust.insecure  # no tickets asked for
        self._refusal_log = LogLimiter()

    async def __call__(self, request: Request, responder: Responder) -> None:
        path = request.target.split("?", 1)[0]
        if await serve_common(self.daemon, path, responder):
            return
        if path == ANNOUNCE_PATH and responder.is_websocket_request:
            await responder.websocket(self._announce)
            return
        m = PIECE_PATH.match(path)
        if m is None or request.method not in ("GET", "HEAD"):
            await responder.send(404, b"not found\n")
            return
        header = request.headers.get(TICKET_HEADER)
        refusal = self._refusal(m.group(1), header)
        if refusal is not None:
            await responder.send(403, f"{refusal}\n".encode())
            return
        await self._serve_piece(m.group(1), int(m.group(2)), _child(header), responder)

    def _refusal(self, task_id: str, ticket: str | Ticket | None) -> str | None:
        """Why a child may not have this task's pieces (None: it may)."""
        if self.open:
            return None
        key = self.daemon.ticket_key
        try:
            if key is None:
                raise TrustError("ticket", "this host has no credential: it serves no piece")
            if isinstance(ticket, str):
                ticket = Ticket.from_header(ticket)
            key.verify(ticket, task_id, self.daemon.host.host_id, time.time())
        except TrustError as exc:
            self.daemon.metrics.errors.labels("ticket").inc()
            skipped = self._refusal_log.allow(trio.current_time())
            if skipped is not None:
                log.info("piece refused", task_id=task_id[:128], error=str(exc), skipped=skipped)
            return str(exc)
        return None

    async def _serve_piece(
        self, task_id: str, number: int, child: str | None, responder: Responder
    ) -> None:
        daemon = self.daemon
        try:
            async with daemon.store.use(task_id) as handle:
                piece = handle.pieces.get(number)
                if piece is None:
                    await responder.send(404, f"piece {number} of {task_id} not held\n".encode())
                    return
                if daemon.stopping:  # the child asks another parent
                    await self._stopping(responder)
                    return
                download = daemon.tasks.active(task_id)
                limit = self.load_limit
                holding = self.holding
                if self.admission.refuses(
                    child,
                    active=limit.borrowed_tokens,
                    waiting=limit.statistics().tasks_waiting,
                    others=len(holding) - (child in holding) > 0,
                    first=download is not None and download.held_back(number),
                    now=trio.current_time(),
                ):
                    daemon.metrics.busy_refusals.inc()
                    await responder.send(
                        503, b"busy: every upload slot is taken\n", headers=[(b"retry-after", b"1")]
                    )
                    return
                # A request waiting for its slot is in flight too: a drain (SIGTERM) waits
                # for it to be answered rather than cut its connection.
                with daemon.uploads, _held(holding, child):
                    async with limit:
                        if daemon.stopping:  # it waited while the host began to leave
                            await self._stopping(responder)
                            return
                        daemon.metrics.active_uploads.inc()
                        try:
                            headers = Headers(
                                [
                                    (b"content-length", str(piece.length).encode()),
                                    (b"content-type", b"application/octet-stream"),
                                ]
                            )
                            await responder.start(200, headers)
                            await self._send(responder, handle.file.fd, piece.offset, piece.length)
                            await responder.finish()
                        finally:
                            daemon.metrics.active_uploads.dec()
                download = daemon.tasks.active(task_id)
                if download is not None:
                    download.piece_uploaded(number)
        except UnknownTask:
            await responder.send(404, f"task {task_id} not held\n".encode())
        except StorageError as exc:
            await responder.send(503, f"{exc}\n".encode())

    @staticmethod
    async def _stopping(responder: Responder) -> None:
        await responder.send(503, LEAVING, headers=[(b"retry-after", b"1")])

    async def _send(self, responder: Responder, fd: int, offset: int, length: int) -> None:
        limiter = self.daemon.upload_limiter
        chunk = limiter.chunk(SEND_CHUNK) if limiter is not None else min(length, SEND_CHUNK)
        sent = 0
        while sent < length:
            n = min(chunk, length - sent)
            if limiter is not None:
                await limiter.acquire(n)
            # A reader below the minimum rate gives its upload slot back (the request
            # fails, the connection closes): slots are for children that take bytes.
            allowed = SLOW_GRACE + n / self.min_rate if self.min_rate else math.inf
            with trio.move_on_after(allowed) as waited:
                await responder.sendfile(fd, offset + sent, n)
            if waited.cancelled_caught:
                self.daemon.metrics.errors.labels("slow_reader").inc()
                raise ClientGone(f"a child read under {self.min_rate} bytes/s")
            sent += n
            self.daemon.metrics.upload_bytes.inc(n)

    async def _announce(self, ws: trio_websocket.WebSocketConnection) -> None:
        """A child subscribes to a task: what is held now, then each new piece."""
        channel = Channel(ws, name="child")
        hello = Hello(version=PROTOCOL_VERSION, min_version=MIN_PROTOCOL_VERSION, role="peer")
        try:
            await channel.handshake(hello)
            with trio.fail_after(SUBSCRIBE_TIMEOUT):
                msg = await channel.receive()
            if not isinstance(msg, Subscribe):
                await channel.send(
                    Error(code=ErrorCode.PROTOCOL, message="expected subscribe", ref=msg.TAG)
                )
                return
            ticket = Ticket(msg.host_id, msg.expires_at, msg.ticket) if msg.ticket else None
            refusal = self._refusal(msg.task_id, ticket)
            if refusal is not None:
                await channel.send(
                    Error(code=ErrorCode.FORBIDDEN, message=refusal, ref=Subscribe.TAG)
                )
                return
            await self._announce_task(channel, msg.task_id)
        except (ChannelClosed, trio.TooSlowError):
            return

    async def _announce_task(self, channel: Channel, task_id: str) -> None:
        daemon = self.daemon
        download = daemon.tasks.active(task_id)
        if download is not None and not download.done:
            # Scheduled before this peer learnt the layout? It is a moment away.
            with trio.move_on_after(daemon.config.download.piece_timeout):
                try:
                    await download.wait_metadata()
                except Exception:
                    download = None
        if download is not None and download.handle is not None and not download.done:
            held, updates = download.subscribe()
            await self._send_pieces(channel, task_id, held)
            async with updates:
                async for infos in updates:
                    batch = list(infos)
                    while len(batch) < ANNOUNCE_BATCH:
                        try:
                            batch.extend(updates.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                    await self._send_pieces(channel, task_id, batch)
            if not download.finished.is_set():
                return  # the download failed or stopped: the child looks elsewhere
        record = await daemon.store.get_task(task_id)
        if record is None or record.state != TaskState.SUCCEEDED:
            await channel.send(
                Error(
                    code=ErrorCode.NOT_FOUND, message=f"task {task_id} not held", ref=Subscribe.TAG
                )
            )
            return
        # Every piece, whatever this child heard before: a child that subscribed as the
        # download ended must not learn of the end (AnnounceDone) without the pieces.
        async with daemon.store.use(task_id) as handle:
            pieces = sorted(handle.pieces.values(), key=lambda p: p.number)
            await self._send_pieces(
                channel,
                task_id,
                [PieceInfo(p.number, p.offset, p.length, p.sha256) for p in pieces],
            )
        await channel.send(
            AnnounceDone(
                task_id=task_id,
                piece_count=record.piece_count,
                content_length=record.content_length,
            )
        )
        # The child closes when it is done with us; do not cut it off first.
        with trio.move_on_after(daemon.config.download.piece_timeout):
            while True:
                await channel.receive()

    @staticmethod
    async def _send_pieces(channel: Channel, task_id: str, pieces: list[PieceInfo]) -> None:
        for i in range(0, len(pieces), ANNOUNCE_BATCH):
            await channel.send(
                PieceAnnounce(task_id=task_id, pieces=pieces[i : i + ANNOUNCE_BATCH])
            )


def _child(ticket_header: str | None) -> str | None:
    """The child a piece request names (its ticket's host: checked before this is
    asked; under trust.insecure taken at its word, as everything there), None when it
    names none."""
    if ticket_header is None:
        return None
    try:
        return Ticket.from_header(ticket_header).child_host_id
    except TrustError:
        return None


@contextmanager
def _held(holding: dict[str | None, int], child: str | None) -> Iterator[None]:
    """Count one request of ``child`` as held (sent or waiting) while the block runs."""
    holding[child] = holding.get(child, 0) + 1
    try:
        yield
    finally:
        left = holding[child] - 1
        if left:
            holding[child] = left
        else:
            del holding[child]
