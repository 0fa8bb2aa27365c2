"""Answering one request: `Responder`, prepared heads, file responses with Range.

A handler gets a `Request` and a `Responder` and answers through the responder:
`send(...)` for small bodies, `start(...)` + `write(...)`/`sendfile(...)` +
`finish()` for streamed ones. Bodies sent with `sendfile` go straight from the
file to the socket; h11 only sees a placeholder of the right length
(`send_with_data_passthrough`) so its framing state stays right.

`sendfile` is zero-copy only on a plain socket; elsewhere (TLS encrypts in Python
anyway) it reads the file and sends. A CONNECT is answered with
`Responder.accept_connect()`, which hands the raw connection to the handler (bytes
the client already sent after the request included), as `Responder.websocket` does
for an upgrade.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import h11
import trio
import trio_websocket

from dragonfly.net.http_connection import (
    SEND_SLICE,
    ClientGone,
    HTTPConnection,
    Request,
    _ReplayStream,
)
from dragonfly.net.zerocopy import sendfile_all
from dragonfly.wire.http_common import (
    ByteRange,
    Headers,
    RangeNotSatisfiable,
    parse_range,
)

SERVER_NAME = b"dragonfly"
# What os.sendfile raises when the client went away (trio maps these for send_all itself).
_PEER_GONE_ERRORS = (ConnectionError, TimeoutError)


class _Placeholder:
    """Stands in for a sendfile body in h11: h11 only asks for its length."""

    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


@dataclass(frozen=True)
class PreparedHead:
    """A response's status line and headers, checked once (prepare_head)."""

    event: h11.Response


def prepare_head(status: int, headers: Headers) -> PreparedHead:
    """What Responder.start would send, made once to be sent many times."""
    if b"server" not in headers:
        headers.add(b"server", SERVER_NAME)
    return PreparedHead(
        h11.Response(status_code=status, headers=headers.pairs(), reason=_reason(status))
    )


class Responder:
    """Sends one response on a connection; tracks whether it started and finished."""

    def __init__(self, connection: HTTPConnection, request: Request) -> None:
        self._c = connection
        self._request = request
        self.started = False
        self.finished = False
        self.upgraded = False
        self.status = 0
        self.body_bytes = 0
        self._pending = b""  # the status line and headers, until the body's first bytes

    @property
    def head_only(self) -> bool:
        return self._request.method == "HEAD"

    async def start(
        self,
        status: int,
        headers: Headers | list[tuple[bytes, bytes]] | None = None,
        reason: bytes | None = None,
    ) -> None:
        """Send the status line and headers. Without Content-Length the body is chunked."""
        if self.started:
            raise RuntimeError("response already started")
        hdrs = headers if isinstance(headers, Headers) else Headers(headers or [])
        if b"server" not in hdrs:
            hdrs.add(b"server", SERVER_NAME)
        self.started = True
        self.status = status
        # Held until the body's first bytes (or the end): one send, one segment, for a
        # small answer; headers before a file body go with MSG_MORE.
        self._pending = self._c.conn.send(
            h11.Response(
                status_code=status,
                headers=hdrs.pairs(),
                reason=reason or _reason(status),
            )
        )

    def start_prepared(self, head: PreparedHead) -> None:
        """start() with a status line and headers made once by prepare_head (a local hit
        answers the same head many times: it is checked and built only once)."""
        if self.started:
            raise RuntimeError("response already started")
        self.started = True
        self.status = head.event.status_code
        self._pending = self._c.conn.send(head.event)

    async def _flush(self, *, more: bool = False) -> None:
        """Send the held status line and headers, if any."""
        if self._pending:
            data, self._pending = self._pending, b""
            await self._c.send_bytes(data, more=more)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """Send part of the body (ignored for HEAD)."""
        if not data or self.head_only:
            await self._flush()
            return
        self.body_bytes += len(data)
        framed = self._c.conn.send(h11.Data(data=data))  # type: ignore[arg-type]  # (any buffer)
        if self._pending:
            framed, self._pending = self._pending + framed, b""
        await self._c.send_bytes(framed)

    async def sendfile(self, fd: int, offset: int, count: int) -> None:
        """Send `count` bytes of file `fd` from `offset` as part of the body, zero-copy."""
        if count <= 0 or self.head_only:
            return
        conn = self._c.conn
        stream = self._c.stream
        await self._flush(more=True)
        placeholder = _Placeholder(count)  # h11 frames it; sendfile sends what it stands for
        framing = conn.send_with_data_passthrough(h11.Data(data=placeholder))  # type: ignore[arg-type]
        # With chunked framing h11 returns [chunk header, placeholder, CRLF].
        for part in framing or ():
            if not isinstance(part, _Placeholder):
                await self._c.send_bytes(bytes(part))
                continue
            if not isinstance(stream, trio.SocketStream):
                # TLS (or another wrapper): the kernel cannot send the file for us.
                try:
                    await self._send_file_copy(fd, offset, count)
                except BaseException:
                    conn.send_failed()
                    raise
                continue
            timeout = self._c.send_timeout
            try:
                await sendfile_all(stream.socket, fd, offset, count, write_timeout=timeout)
            except trio.TooSlowError:
                conn.send_failed()
                raise ClientGone(f"client {self._c.peer} read nothing for {timeout}s") from None
            except _PEER_GONE_ERRORS as exc:
                # A client that hangs up mid-download is routine, not a handler failure.
                conn.send_failed()
                raise ClientGone(f"client {self._c.peer} went away mid-body: {exc}") from None
            except BaseException:
                conn.send_failed()
                raise
        self.body_bytes += count

    async def _send_file_copy(self, fd: int, offset: int, count: int) -> None:
        """sendfile's fallback for streams that are not a plain socket: pread + send_all."""
        sent = 0
        while sent < count:
            # In a thread: a cold page cache must not stall every other connection.
            chunk = await trio.to_thread.run_sync(
                os.pread, fd, min(SEND_SLICE, count - sent), offset + sent
            )
            if not chunk:
                raise OSError(f"file ended after {sent} of {count} bytes at offset {offset}")
            await self._c.send_bytes(chunk)
            sent += len(chunk)

    async def finish(self) -> None:
        """End the body: h11 checks that exactly Content-Length bytes were sent."""
        end = self._c.conn.send(h11.EndOfMessage())
        if self._pending:
            end, self._pending = self._pending + end, b""
        await self._c.send_bytes(end)
        self.finished = True

    async def send(
        self,
        status: int,
        body: bytes = b"",
        headers: Headers | list[tuple[bytes, bytes]] | None = None,
        content_type: bytes = b"text/plain; charset=utf-8",
    ) -> None:
        """A complete response with an in-memory body."""
        hdrs = headers if isinstance(headers, Headers) else Headers(headers or [])
        if b"content-length" not in hdrs:
            hdrs.set(b"content-length", str(len(body)).encode())
        if body and b"content-type" not in hdrs:
            hdrs.set(b"content-type", content_type)
        await self.start(status, hdrs)
        await self.write(body)
        await self.finish()

    async def send_error(self, status: int, message: str) -> None:
        await self.send(status, (message + "\n").encode(), [(b"connection", b"close")])

    def take_over(self) -> tuple[trio.abc.Stream, bytes]:
        """The connection leaves HTTP (an upgrade, a tunnel): it is the caller's from now
        on, and closed when the handler returns. Returns the raw stream and the bytes the
        client already sent after its request (h11 had buffered them)."""
        if self._pending:
            raise RuntimeError("take_over() with a status line not sent: await _flush() first")
        self.started = self.finished = self.upgraded = True
        return self._c.stream, bytes(self._c.conn.trailing_data[0])

    async def accept_connect(
        self, headers: Headers | list[tuple[bytes, bytes]] | None = None
    ) -> trio.abc.HalfCloseableStream:
        """Answer a CONNECT with 200 and hand over the raw connection.

        The returned stream first yields what the client sent after its CONNECT
        request (h11 had buffered it: often a TLS ClientHello). The connection is
        the caller's from then on and is closed when the handler returns.
        """
        c = self._c
        if self._request.method != "CONNECT":
            raise RuntimeError("accept_connect() answers a CONNECT request only")
        # h11 holds the request until it saw its end; then it waits for our verdict.
        while c.conn.their_state is not h11.MIGHT_SWITCH_PROTOCOL:  # type: ignore[attr-defined]
            try:
                event = await c.next_event(c.body_timeout)
            except trio.TooSlowError:
                raise ClientGone(f"client {c.peer} did not finish its CONNECT") from None
            if isinstance(event, h11.ConnectionClosed):
                raise ClientGone("client closed the connection before its tunnel opened")
        hdrs = headers if isinstance(headers, Headers) else Headers(headers or [])
        await self.start(200, hdrs, reason=b"Connection established")
        await self._flush()
        # A 2xx to CONNECT switches h11 to SWITCHED_PROTOCOL: no framing, no body.
        stream, received = self.take_over()
        return _ReplayStream(stream, received)

    @property
    def is_websocket_request(self) -> bool:
        upgrade = self._request.headers.get("upgrade") or ""
        return self._request.method == "GET" and upgrade.lower() == "websocket"

    async def websocket(
        self,
        run: Callable[[trio_websocket.WebSocketConnection], Awaitable[None]],
        *,
        max_message_size: int = 1 << 20,
        message_queue_size: int = 64,
    ) -> None:
        """Accept a websocket upgrade on this connection and run `run(ws)` until it returns.

        The connection is the websocket's from then on; it closes afterwards.
        """
        req = self._request
        head = [f"{req.method} {req.target} HTTP/1.1".encode()]
        head += [k + b": " + v for k, v in req.headers]
        raw, received = self.take_over()
        stream = _ReplayStream(raw, b"\r\n".join(head) + b"\r\n\r\n" + received)
        async with trio.open_nursery() as nursery:
            ws_request = await trio_websocket.wrap_server_stream(
                nursery,
                stream,
                message_queue_size=message_queue_size,
                max_message_size=max_message_size,
                receive_buffer_size=None,
            )
            ws = await ws_request.accept()
            try:
                await run(ws)
            finally:
                with trio.move_on_after(2) as scope:
                    scope.shield = True
                    await ws.aclose()
                nursery.cancel_scope.cancel()


def _reason(status: int) -> bytes:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


async def send_file_response(
    request: Request,
    responder: Responder,
    fd: int,
    size: int,
    *,
    offset: int = 0,
    headers: Headers | None = None,
    content_type: bytes = b"application/octet-stream",
) -> None:
    """Serve `size` bytes of file `fd` (starting at `offset`) with Range and HEAD support."""
    hdrs = headers if headers is not None else Headers()
    hdrs.set(b"accept-ranges", b"bytes")
    if b"content-type" not in hdrs:
        hdrs.set(b"content-type", content_type)
    try:
        byte_range: ByteRange | None = parse_range(request.headers.get("range"), size)
    except RangeNotSatisfiable:
        hdrs.set(b"content-range", f"bytes */{size}".encode())
        hdrs.set(b"content-length", b"0")
        await responder.start(416, hdrs)
        await responder.finish()
        return
    if byte_range is not None and request.headers.get("if-range") not in (None, hdrs.get("etag")):
        byte_range = None  # the client's copy is stale: send everything
    if byte_range is None:
        hdrs.set(b"content-length", str(size).encode())
        await responder.start(200, hdrs)
        await responder.sendfile(fd, offset, size)
    else:
        hdrs.set(b"content-length", str(byte_range.length).encode())
        hdrs.set(b"content-range", byte_range.content_range().encode())
        await responder.start(206, hdrs)
        await responder.sendfile(fd, offset + byte_range.start, byte_range.length)
    await responder.finish()
