"""One HTTP/1.1 server connection driven by h11, and the request read from it.

`HTTPConnection` wraps any trio Stream (a TCP connection, or a TLS stream inside a
CONNECT tunnel the proxy intercepts) in an h11 server state and sends and receives
under per-wait timeouts: `body_timeout` bounds each wait for request body bytes and
`send_timeout` each wait for the client to take response bytes, so a client that stops
sending or reading cannot hold a handler forever (`ClientGone`). `Request` is a parsed
request whose body is read on demand; `_ReplayStream` hands a connection over (an
upgrade, a tunnel) with the bytes h11 already consumed put back in front.
"""

from __future__ import annotations

import math
import socket as _socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import h11
import trio

from dragonfly.net.bodies import collect
from dragonfly.wire.http_common import Headers

MAX_HEADER_BYTES = 16 * 1024
RECEIVE_SIZE = 64 * 1024
# Default per-wait timeouts: client sends no body byte / takes no response byte for this long.
BODY_TIMEOUT = 60.0
SEND_TIMEOUT = 60.0
# send_all goes out in slices of this size, each under its own send_timeout deadline: the
# timeout then catches a stalled client, not a slow one with a large write.
SEND_SLICE = 256 * 1024


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
        # The bytes received since the current request began (with what h11 held over
        # from the one before), kept only where the connection may be handed to another
        # process (net/http_server.py, HandOff): the receiver replays them.
        self.record: bytearray | None = None

    def feed(self, data: bytes | bytearray) -> None:
        """Give received bytes to h11 (b"": the client closed)."""
        if self.record is not None:
            self.record += data
        self.conn.receive_data(data)  # type: ignore[arg-type]  # (h11 takes a bytearray)

    def start_record(self) -> None:
        """Begin the record of a new request (a connection that may be handed off)."""
        self.record = bytearray(self.conn.trailing_data[0])

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
            self.feed(data)


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


def announces_body(headers: Headers) -> bool:
    """Whether request headers say a body follows (chunked or a non-zero Content-Length)."""
    if b"transfer-encoding" in headers:
        return True
    length = headers.get("content-length")
    return length is not None and length.strip("0 \t") != ""


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

    @property
    def announces_body(self) -> bool:
        """Whether the request says a body follows (chunked or a non-zero Content-Length)."""
        return announces_body(self.headers)

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
        body = await collect(self.iter_body(), limit)
        if body is None:
            raise ValueError(f"request body larger than {limit} bytes")
        return body
