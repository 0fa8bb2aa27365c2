"""h11 HTTP/1.1 server: keep-alive, request bodies, streaming and sendfile responses.

Why about 800 lines: one connection's life (h11 state, timeouts, sendfile passthrough,
CONNECT and websocket hand-over, lingering close) is one loop over one state.

A handler gets a `Request` and a `Responder` and answers through the responder:
`send(...)` for small bodies, `start(...)` + `write(...)`/`sendfile(...)` +
`finish()` for streamed ones. Bodies sent with `sendfile` go straight from the
file to the socket; h11 only sees a placeholder of the right length
(`send_with_data_passthrough`) so its framing state stays right.

A handler that fails before the response starts yields a 500; after it started,
the connection is closed: a client never gets a silently short body.

The server runs over any trio Stream: a TCP connection, or a TLS stream inside a
CONNECT tunnel the proxy intercepts. `sendfile` is zero-copy only on a plain
socket; elsewhere (TLS encrypts in Python anyway) it reads the file and sends.
A CONNECT is answered with `Responder.accept_connect()`, which hands the raw
connection to the handler (bytes the client already sent after the request
included), as `Responder.websocket` does for an upgrade.

Timeouts: `header_timeout` (30 s) bounds the time a client takes to send a request's
headers: from the connection's start for its first request, from the first byte for
the next ones on a kept-alive connection, which may idle `idle_timeout` in between.
`body_timeout` bounds each wait for request body bytes and `send_timeout` each wait
for the client to take response bytes, so a client that stops sending or reading
cannot hold a handler forever. A connection closed with request bytes unread is
closed lingeringly (half-close, drain briefly) so the RST does not destroy the response.

A listener serves at most `max_connections` connections at once: one more is
answered 503 and closed at once, before its request is read (`on_refused` counts it).

With `ssl_context`, a listener speaks TLS (the cluster's scheduler and upload ports):
each connection is wrapped in a server-side `trio.SSLStream`, whose handshake runs
under the header timeout; a client that cannot or will not complete it is closed.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket as _socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import trio
import trio_websocket

from dragonfly.log import get_logger
from dragonfly.net.unix import open_unix_listener
from dragonfly.net.zerocopy import sendfile_all
from dragonfly.wire.http_common import (
    ByteRange,
    Headers,
    RangeNotSatisfiable,
    parse_range,
)

log = get_logger("dragonfly.http.server")

MAX_HEADER_BYTES = 16 * 1024
RECEIVE_SIZE = 64 * 1024
# An unread request body up to this size is drained to keep the connection alive.
DRAIN_LIMIT = 1 << 20
# Default per-wait timeouts: client sends no body byte / takes no response byte for this long.
BODY_TIMEOUT = 60.0
SEND_TIMEOUT = 60.0
# send_all goes out in slices of this size, each under its own send_timeout deadline: the
# timeout then catches a stalled client, not a slow one with a large write.
SEND_SLICE = 256 * 1024
# How long a lingering close reads (and drops) what the client still sends before closing.
LINGER_SECONDS = 1.0
# The time a client may take to send a request's headers (slowloris).
HEADER_TIMEOUT = 30.0
# Idle time between requests on a kept-alive connection.
IDLE_TIMEOUT = 120.0
_FULL = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 39\r\nconnection: close\r\nretry-after: 1\r\n\r\n"
    b"busy: too many connections; try again\n"
)
SERVER_NAME = b"dragonfly"

Handler = Callable[["Request", "Responder"], Awaitable[None]]
_SEND_FAILURES = (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError)
# What os.sendfile raises when the client went away (trio maps these for send_all itself).
_PEER_GONE_ERRORS = (ConnectionError, TimeoutError)


class _Placeholder:
    """Stands in for a sendfile body in h11: h11 only asks for its length."""

    __slots__ = ("n",)

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


class _ReplayStream(trio.abc.HalfCloseableStream):
    """A connection's stream that first yields bytes h11 already consumed: the
    upgrade request, rebuilt, so trio-websocket can run its handshake on this
    connection; or what a client sent right after its CONNECT (a TLS ClientHello)."""

    def __init__(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        self._stream = stream
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            n = len(self._prefix) if max_bytes is None else max_bytes
            chunk, self._prefix = self._prefix[:n], self._prefix[n:]
            await trio.lowlevel.checkpoint()
            return chunk
        return await self._stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        if not isinstance(self._stream, trio.abc.HalfCloseableStream):
            # (a TLS stream cannot half-close: only the raw connection of a tunnel is asked)
            raise trio.BrokenResourceError("this stream cannot half-close")
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


class ClientGone(Exception):
    """The client closed the connection, broke the protocol or stalled mid-request."""


class HTTPConnection:
    """One accepted connection (TCP, or TLS inside a tunnel) driven by h11."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        max_header_bytes: int = MAX_HEADER_BYTES,
        send_timeout: float = SEND_TIMEOUT,
        body_timeout: float = BODY_TIMEOUT,
        peer: str | None = None,
    ):
        self.stream = stream
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_bytes)
        self.peer = peer if peer is not None else _peername(stream)
        self.send_timeout = send_timeout
        self.body_timeout = body_timeout

    async def send_bytes(self, data: bytes | bytearray | memoryview, *, more: bool = False) -> None:
        """Send all of `data`; ClientGone if the client takes nothing for send_timeout s.
        `more`: a body follows at once (MSG_MORE: one segment for both, where it can)."""
        if not data:
            return
        stream = self.stream
        if more and isinstance(stream, trio.SocketStream) and len(data) <= SEND_SLICE:
            # A response head before a file body: one non-blocking send straight away
            # (no trip through the event loop: at hundreds of small local hits a second
            # each trip is a large part of a request's cost); the rest, if the socket
            # took only part, the usual way.
            try:
                sent = _send_now(stream, data, _socket.MSG_MORE)
                if sent == len(data):
                    return
                with trio.fail_after(self.send_timeout):
                    with memoryview(data) as view:
                        while sent < len(view):
                            sent += await stream.socket.send(view[sent:], _socket.MSG_MORE)
            except trio.TooSlowError:
                raise ClientGone(
                    f"client {self.peer} read nothing for {self.send_timeout}s"
                ) from None
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise ClientGone(f"client {self.peer} went away: {exc}") from None
            return
        with memoryview(data) as view:
            for start in range(0, len(view), SEND_SLICE):
                try:
                    with trio.fail_after(self.send_timeout):
                        await stream.send_all(view[start : start + SEND_SLICE])
                except trio.TooSlowError:
                    raise ClientGone(
                        f"client {self.peer} read nothing for {self.send_timeout}s"
                    ) from None

    async def send_event(self, event: Any) -> None:
        await self.send_bytes(self.conn.send(event))

    async def next_event(self, timeout: float = math.inf) -> Any:
        """The next h11 event; trio.TooSlowError if one receive waits over `timeout` s."""
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            with trio.fail_after(timeout):
                data = await self.stream.receive_some(RECEIVE_SIZE)
            self.conn.receive_data(data)  # type: ignore[arg-type]  # (h11 takes a bytearray)


def _send_now(stream: trio.SocketStream, data: bytes | bytearray | memoryview, flags: int) -> int:
    """Bytes of `data` the socket takes at once (0 if none, or if trio's socket does not
    expose its stdlib socket: the caller then sends the usual way)."""
    sock = getattr(stream.socket, "_sock", None)  # (trio keeps the stdlib socket there)
    if not isinstance(sock, _socket.socket):
        return 0
    try:
        return sock.send(data, flags)
    except (BlockingIOError, InterruptedError):
        return 0


def _peername(stream: trio.abc.Stream) -> str:
    """host:port of the client; through TLS and replay wrappers to the TCP socket."""
    for _ in range(4):
        if isinstance(stream, trio.SocketStream):
            try:
                host, port = stream.socket.getpeername()[:2]
                return f"{host}:{port}"
            except (OSError, ValueError):  # ValueError: a unix socket has no host:port
                return "?"
        inner = getattr(stream, "transport_stream", None) or getattr(stream, "_stream", None)
        if not isinstance(inner, trio.abc.Stream):
            break
        stream = inner
    return "?"


@dataclass
class Request:
    """A parsed request; the body is read on demand."""

    method: str
    target: str
    headers: Headers
    http_version: str
    connection: HTTPConnection = field(repr=False)
    _body_done: bool = field(default=False, repr=False)
    # `Expect: 100-continue` with a body: the client waits for our go-ahead to send it.
    _expects_continue: bool = field(default=False, repr=False)
    _continue_sent: bool = field(default=False, repr=False)

    @property
    def client(self) -> str:
        return self.connection.peer

    async def iter_body(self) -> AsyncIterator[bytes]:
        """The request body as it arrives; ClientGone if the client stops sending it
        for body_timeout seconds or closes the connection."""
        c = self.connection
        if not self._body_done and c.conn.they_are_waiting_for_100_continue:
            # Without this, curl waits a second before sending a body over 1 MiB.
            await c.send_event(
                h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
            )
            self._continue_sent = True
        while not self._body_done:
            try:
                event = await c.next_event(c.body_timeout)
            except trio.TooSlowError:
                raise ClientGone(
                    f"client {c.peer} sent no body bytes for {c.body_timeout}s"
                ) from None
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._body_done = True
            elif isinstance(event, h11.ConnectionClosed):
                raise ClientGone("client closed the connection during the request body")

    async def read_body(self, limit: int = 1 << 20) -> bytes:
        """The whole request body; ValueError past `limit` bytes."""
        parts: list[bytes] = []
        size = 0
        async for chunk in self.iter_body():
            size += len(chunk)
            if size > limit:
                raise ValueError(f"request body larger than {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)


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


async def _answer_protocol_error(c: HTTPConnection, exc: h11.RemoteProtocolError) -> None:
    """A malformed request: answer 4xx if h11 still lets us (it does from IDLE), then close."""
    if c.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    status = exc.error_status_hint if 400 <= exc.error_status_hint < 500 else 400
    body = f"bad request: {exc}\n".encode()
    try:
        data = c.conn.send(
            h11.Response(
                status_code=status,
                reason=_reason(status),
                headers=[
                    (b"content-length", str(len(body)).encode()),
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"connection", b"close"),
                    (b"server", SERVER_NAME),
                ],
            )
        )
        data += c.conn.send(h11.Data(data=body)) + c.conn.send(h11.EndOfMessage())
        await c.send_bytes(data)
        await _lingering_close(c.stream)
    except (*_SEND_FAILURES, ClientGone):
        pass


async def _lingering_close(stream: trio.abc.Stream) -> None:
    """Half-close, then drain briefly: closing with unread input sends a RST that
    can destroy the response before the client reads it (or fail the client's
    upload before it looks at the response). Bounded by time, not bytes: a client
    still sending a large body needs all of it taken. A stream that cannot
    half-close (TLS) is only drained."""
    try:
        if isinstance(stream, trio.abc.HalfCloseableStream):
            await stream.send_eof()
        with trio.move_on_after(LINGER_SECONDS):
            while await stream.receive_some(RECEIVE_SIZE):
                pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client is gone: nothing left to protect


async def serve_connection(
    stream: trio.abc.Stream,
    handler: Handler,
    *,
    idle_timeout: float = IDLE_TIMEOUT,
    header_timeout: float = HEADER_TIMEOUT,
    send_timeout: float = SEND_TIMEOUT,
    body_timeout: float = BODY_TIMEOUT,
    peer: str | None = None,
) -> None:
    """Run requests on one connection until it closes, idles out, or breaks.

    `stream` is a TCP connection or any other trio Stream (TLS in a tunnel);
    `peer` names the client when the stream cannot (default: its socket's address).
    """
    c = HTTPConnection(stream, send_timeout=send_timeout, body_timeout=body_timeout, peer=peer)
    if isinstance(stream, trio.SocketStream) and stream.socket.family != _socket.AF_UNIX:
        with contextlib.suppress(OSError):
            stream.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, True)
    try:
        if await _serve_requests(c, handler, idle_timeout, header_timeout):
            await _lingering_close(stream)
    except (trio.BrokenResourceError, trio.ClosedResourceError, ClientGone):
        return
    finally:
        with trio.move_on_after(1) as cleanup:
            cleanup.shield = True
            await stream.aclose()


async def _next_request(
    c: HTTPConnection, idle_timeout: float, header_timeout: float, first: bool
) -> Any:
    """The next request's first h11 event, or None when the client idled too long or took
    over `header_timeout` to send the headers."""
    event = c.conn.next_event()
    if event is not h11.NEED_DATA:
        # Pipelined, already here: a checkpoint still, so a client that sends many small
        # requests at once takes its turn with the others.
        await trio.lowlevel.checkpoint()
        return event
    if not first:
        # Between requests a kept-alive connection may idle; the clock for the headers
        # starts with the next request's first byte.
        with trio.move_on_after(idle_timeout) as idle:
            data = await c.stream.receive_some(RECEIVE_SIZE)
        if idle.cancelled_caught:
            return None
        # b"" (the client closed): ConnectionClosed next
        c.conn.receive_data(data)  # type: ignore[arg-type]  # (h11 takes a bytearray)
        event = c.conn.next_event()
        if event is not h11.NEED_DATA:
            return event
    with trio.move_on_after(header_timeout):
        return await c.next_event()
    return None


async def _serve_requests(
    c: HTTPConnection, handler: Handler, idle_timeout: float, header_timeout: float
) -> bool:
    """The request loop of one connection. True when it ends after a complete response
    with request bytes still unread: then the caller must close lingeringly."""
    first = True
    while True:
        try:
            event = await _next_request(c, idle_timeout, header_timeout, first)
            first = False
            if event is None:
                return False
        except h11.RemoteProtocolError as exc:
            await _answer_protocol_error(c, exc)
            return False
        if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return False
        if not isinstance(event, h11.Request):
            return False
        request = Request(
            method=event.method.decode("ascii", "replace"),
            target=event.target.decode("latin-1"),
            headers=Headers(event.headers),
            http_version=event.http_version.decode("ascii", "replace"),
            connection=c,
            _expects_continue=c.conn.they_are_waiting_for_100_continue and _has_body(event),
        )
        responder = Responder(c, request)
        reusable = await _run_handler(handler, request, responder)
        if responder.upgraded:
            return False
        if not reusable:
            return responder.finished and _unread_input(c)
        if c.conn.our_state is h11.MUST_CLOSE or not await _drain_body(request):
            return _unread_input(c)
        if c.conn.states != {h11.CLIENT: h11.DONE, h11.SERVER: h11.DONE}:
            return False
        c.conn.start_next_cycle()


def _has_body(event: h11.Request) -> bool:
    """Whether a request announces a body (chunked or a non-zero Content-Length)."""
    headers = Headers(event.headers)
    if b"transfer-encoding" in headers:
        return True
    length = headers.get("content-length")
    return length is not None and length.strip("0 \t") != ""


def _unread_input(c: HTTPConnection) -> bool:
    """True if the client may still be sending this request (or sent a bad one).

    Consumes what h11 already buffered (no I/O), so a request without a body whose
    end h11 simply has not reported yet does not count as unread.
    """
    try:
        while c.conn.their_state is h11.SEND_BODY:
            if c.conn.next_event() is h11.NEED_DATA:
                return True
    except h11.RemoteProtocolError:
        return True
    return c.conn.their_state is h11.ERROR


async def _run_handler(handler: Handler, request: Request, responder: Responder) -> bool:
    """Run the handler; True if the connection may carry another request."""
    try:
        await handler(request, responder)
    except (trio.BrokenResourceError, trio.ClosedResourceError, ClientGone):
        return False
    except h11.RemoteProtocolError as exc:
        if not responder.started:
            await responder.send_error(400, f"bad request: {exc}")
        return False
    except Exception as exc:
        log.warning(
            "handler failed",
            method=request.method,
            target=request.target,
            error=repr(exc),
            started=responder.started,
        )
        if not responder.started:
            with contextlib.suppress(*_SEND_FAILURES):
                await responder.send_error(500, "internal error")
        return False
    if not responder.finished:
        if not responder.started:
            await responder.send_error(500, "handler sent no response")
        return False
    return True


async def _drain_body(request: Request) -> bool:
    """Read what is left of the request body so the connection can be reused.

    False (close the connection) if the body is too large to be worth reading, is
    malformed, or was never asked for: a client that sent `Expect: 100-continue` and
    got a final response instead need not send its body at all.
    """
    if request._body_done:
        return True
    if request._expects_continue and not request._continue_sent:
        return False
    drained = 0
    try:
        # The common case first, without I/O: a request without a body, whose end h11
        # holds already.
        event = request.connection.conn.next_event()
        if type(event) is h11.EndOfMessage:
            request._body_done = True
            return True
        if isinstance(event, h11.Data):
            drained += len(event.data)
        elif event is not h11.NEED_DATA:
            return False  # (the client closed, or no body was expected after all)
        async for chunk in request.iter_body():
            drained += len(chunk)
            if drained > DRAIN_LIMIT:
                return False
    except h11.RemoteProtocolError:
        return False
    return True


async def serve(
    handler: Handler,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    backlog: int = 1024,
    **options: Any,
) -> None:
    """Serve HTTP on host:port until cancelled; reports the listeners (for the bound port).
    `options` are serve_listeners' (timeouts, max_connections, on_refused)."""
    listeners = await trio.open_tcp_listeners(port, host=host, backlog=backlog)
    await serve_listeners(handler, listeners, task_status=task_status, **options)


async def serve_unix(
    handler: Handler,
    path: Path,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    **options: Any,
) -> None:
    """Serve HTTP on a unix socket at `path` (mode 0600: its owner's only)."""
    listener = await open_unix_listener(path)
    await serve_listeners(handler, [listener], task_status=task_status, peer="local", **options)


async def serve_listeners(
    handler: Handler,
    listeners: list[trio.SocketListener],
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    idle_timeout: float = IDLE_TIMEOUT,
    header_timeout: float = HEADER_TIMEOUT,
    send_timeout: float = SEND_TIMEOUT,
    body_timeout: float = BODY_TIMEOUT,
    max_connections: int | None = None,
    on_refused: Callable[[], None] = lambda: None,
    peer: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    """Serve HTTP on `listeners` until cancelled, at most `max_connections` at once;
    over TLS with `ssl_context`."""
    active = 0

    async def on_connection(stream: trio.SocketStream) -> None:
        nonlocal active
        if max_connections is not None and active >= max_connections:
            on_refused()
            if ssl_context is None:
                await _refuse(stream)
            else:  # (a plain-text 503 means nothing to a TLS client)
                await trio.aclose_forcefully(stream)
            return
        active += 1
        conn: trio.abc.Stream = stream
        if ssl_context is not None:
            conn = trio.SSLStream(stream, ssl_context, server_side=True, https_compatible=True)
        # One connection's failure must never reach serve_listeners' nursery: that
        # would take the whole server down.
        try:
            await serve_connection(
                conn,
                handler,
                idle_timeout=idle_timeout,
                header_timeout=header_timeout,
                send_timeout=send_timeout,
                body_timeout=body_timeout,
                peer=peer,
            )
        except Exception:
            log.exception("connection failed", peer=peer or _peername(stream))
        finally:
            active -= 1

    async with trio.open_nursery() as nursery:
        started = await nursery.start(trio.serve_listeners, on_connection, listeners)
        task_status.started(started)


async def _refuse(stream: trio.SocketStream) -> None:
    """A connection over the cap: say so in one write, without reading, and close."""
    with trio.move_on_after(1):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await stream.send_all(_FULL)
    await trio.aclose_forcefully(stream)


def bound_port(listeners: list[trio.SocketListener]) -> int:
    return int(listeners[0].socket.getsockname()[1])
