"""CBOR messages over a websocket: one message per binary frame, a Hello handshake first.

A frame that does not decode is answered with an `Error` message and the
connection goes on; only a fatal protocol error (an oversize frame, a version
mismatch) closes it, or a client that keeps sending bad frames: each channel
forgives ERROR_BUDGET of them (refilled at ERROR_REFILL a second), then closes with
1008. Protocol errors are logged at most a few a second for the whole process.
trio-websocket enforces the frame size itself (close 1009).

`Channel` runs over trio-websocket (peers, parents' announcements). `ServerChannel`
is the scheduler's side of its hosts' websockets, on the raw connection: it reads
every frame one receive brings and hands them over as one batch, and one writer
task sends everything queued for the host with one write, so the scheduler pays a
task switch and a syscall per batch rather than several per message.
"""

from __future__ import annotations

import base64
import hashlib
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import trio
import trio_websocket

from dragonfly.log import LogLimiter, get_logger
from dragonfly.tokenbucket import TokenBucket
from dragonfly.wire.codec import MAX_FRAME, Message, ProtocolError, decode, encode
from dragonfly.wire.messages import Error, ErrorCode, Hello, check_version

if TYPE_CHECKING:
    from dragonfly.net.http_server import Request, Responder

log = get_logger("dragonfly.channel")

# Where the websockets live: peers → scheduler, children → a parent's upload port.
SCHEDULER_PATH = "/v1/scheduler"
ANNOUNCE_PATH = "/v1/announce"
MANAGER_PATH = "/v1/manager"  # schedulers and seed peers → the manager
HANDSHAKE_TIMEOUT = 10.0
# Messages queued by the websocket reader before it stops reading (backpressure).
MESSAGE_QUEUE = 64
# Protocol errors a channel forgives, and how many a second come back; past them the
# channel closes (1008): bad frames cost a bounded amount of work and of log.
ERROR_BUDGET = 20
ERROR_REFILL = 0.5
_ERROR_LOG = LogLimiter(rate=2.0, burst=20)


def _log_protocol_error(channel: str, error: str) -> None:
    skipped = _ERROR_LOG.allow(trio.current_time())
    if skipped is not None:
        log.warning("protocol error", channel=channel, error=error[:300], skipped=skipped)


def _error_budget() -> TokenBucket:
    return TokenBucket(ERROR_REFILL, ERROR_BUDGET, trio.current_time())


ConnectionClosed = trio_websocket.ConnectionClosed


class ChannelClosed(Exception):
    """The other side closed the channel or broke the protocol beyond repair."""


class Channel:
    """Typed messages over one websocket; sends are serialised by a lock."""

    def __init__(
        self,
        ws: trio_websocket.WebSocketConnection,
        *,
        name: str = "",
        on_protocol_error: Callable[[ProtocolError], None] | None = None,
    ) -> None:
        self.ws = ws
        self.name = name
        self.version = 0
        self.peer_hello: Hello | None = None
        self._send_lock = trio.Lock()
        self._on_protocol_error = on_protocol_error
        self._budget = _error_budget()

    async def send(self, msg: Message) -> None:
        data = encode(msg)
        async with self._send_lock:
            try:
                await self.ws.send_message(data)
            except trio_websocket.ConnectionClosed as exc:
                raise ChannelClosed(f"{self.name}: closed: {exc.reason}") from None

    async def receive(self) -> Message:
        """The next valid message; invalid ones are answered with Error and skipped."""
        while True:
            try:
                frame = await self.ws.get_message()
            except trio_websocket.ConnectionClosed as exc:
                raise ChannelClosed(f"{self.name}: closed: {exc.reason}") from None
            if isinstance(frame, str):
                await self._reject(ProtocolError("expected a binary frame, got text"))
                continue
            try:
                return decode(frame)
            except ProtocolError as exc:
                await self._reject(exc)
                if exc.fatal:
                    await self.aclose(1009, str(exc))
                    raise ChannelClosed(f"{self.name}: {exc}") from None

    async def _reject(self, exc: ProtocolError) -> None:
        _log_protocol_error(self.name, str(exc))
        if self._on_protocol_error is not None:
            self._on_protocol_error(exc)
        if not self._budget.try_take(1, trio.current_time()):
            await self.aclose(1008, "too many protocol errors")
            raise ChannelClosed(f"{self.name}: too many protocol errors")
        with suppress(ChannelClosed):
            await self.send(
                Error(code=ErrorCode.PROTOCOL, message=str(exc)[:1024], ref=exc.ref or "")
            )

    async def __aiter__(self) -> AsyncIterator[Message]:
        while True:
            try:
                yield await self.receive()
            except ChannelClosed:
                return

    async def handshake(self, hello: Hello, *, timeout: float = HANDSHAKE_TIMEOUT) -> Hello:
        """Exchange Hellos and agree on a version; a mismatch is said, then the channel closes."""
        await self.send(hello)
        with trio.fail_after(timeout):
            first = await self.receive()
        if not isinstance(first, Hello):
            await self.send(Error(code=ErrorCode.PROTOCOL, message="expected hello", ref=first.TAG))
            await self.aclose(1002, "expected hello")
            raise ChannelClosed(f"{self.name}: expected hello, got {first.TAG}")
        try:
            self.version = check_version(first)
        except ProtocolError as exc:
            await self.send(Error(code=ErrorCode.VERSION, message=str(exc), ref=Hello.TAG))
            await self.aclose(1002, "no common protocol version")
            raise ChannelClosed(f"{self.name}: {exc}") from None
        self.peer_hello = first
        return first

    @property
    def close_reason(self) -> str:
        """How the other side closed the channel (code and reason), or "" while open."""
        closed = self.ws.closed
        if closed is None:
            return ""
        return f"{closed.code} {closed.reason or closed.name}"

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        with trio.move_on_after(2) as scope:
            scope.shield = True
            await self.ws.aclose(code, reason)


@asynccontextmanager
async def connect(
    url: str,
    hello: Hello,
    *,
    name: str = "",
    connect_timeout: float = 10.0,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[Channel]:
    """Open a websocket to `url`, handshake, and yield the channel. A wss:// URL needs
    `ssl_context` (the cluster's CA): the system's CAs are never used for one."""
    if url.startswith("wss://"):
        async with _open_wss(url, ssl_context, connect_timeout) as ws:
            channel = Channel(ws, name=name or url)
            await channel.handshake(hello, timeout=connect_timeout)
            yield channel
        return
    async with trio_websocket.open_websocket_url(
        url,
        message_queue_size=MESSAGE_QUEUE,
        max_message_size=MAX_FRAME,
        connect_timeout=connect_timeout,
        disconnect_timeout=2,
        receive_buffer_size=None,
    ) as ws:
        channel = Channel(ws, name=name or url)
        await channel.handshake(hello, timeout=connect_timeout)
        yield channel


@asynccontextmanager
async def _open_wss(
    url: str, ssl_context: ssl.SSLContext | None, timeout: float
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A websocket over TLS whose handshake is ours: trio-websocket's own reports a
    certificate that does not verify only as a timeout, so a scheduler or parent
    showing another CA's certificate would cost the whole connect timeout, unnamed.
    Exceptions leave as themselves, not in the group the reader's nursery makes."""
    if ssl_context is None:
        raise ChannelClosed(f"{url}: no CA to verify it with (trust.ca_file)")
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 443
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        with trio.fail_after(timeout):
            tcp = await trio.open_tcp_stream(host, port)
            stream = trio.SSLStream(tcp, ssl_context, server_hostname=host, https_compatible=True)
            try:
                await stream.do_handshake()
            except BaseException:
                await trio.aclose_forcefully(tcp)
                raise
    except trio.BrokenResourceError as exc:
        raise ChannelClosed(f"{url}: TLS handshake failed: {exc.__cause__ or exc}") from None
    try:
        async with trio.open_nursery() as nursery:
            ws: trio_websocket.WebSocketConnection | None = None
            try:
                with trio.fail_after(timeout):
                    ws = await trio_websocket.wrap_client_stream(
                        nursery,
                        stream,
                        parts.netloc,
                        resource,
                        message_queue_size=MESSAGE_QUEUE,
                        max_message_size=MAX_FRAME,
                        receive_buffer_size=None,
                    )
                yield ws
            finally:
                with trio.move_on_after(2) as cleanup:
                    cleanup.shield = True
                    if ws is not None:
                        await ws.aclose()
                    await stream.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise _sole(group) from None


def _sole(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """What a nursery's group holds besides cancellations, unwrapped when it is one
    exception (the body's ChannelClosed, TrustError...); the group if only Cancelled."""
    rest = group.subgroup(lambda exc: not isinstance(exc, trio.Cancelled))
    while rest is not None and len(rest.exceptions) == 1:
        inner = rest.exceptions[0]
        if not isinstance(inner, BaseExceptionGroup):
            return inner
        rest = inner
    return group if rest is None else rest


# ---------------------------------------------------------------------------
# The scheduler's side: RFC 6455 on the raw connection, batched both ways
# ---------------------------------------------------------------------------

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
RECEIVE_SIZE = 64 * 1024
# A host that takes nothing of what it is sent for this long is dropped.
SEND_TIMEOUT = 60.0
CLOSE_TIMEOUT = 2.0

_OP_CONT, _OP_TEXT, _OP_BINARY, _OP_CLOSE, _OP_PING, _OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def websocket_accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a client's Sec-WebSocket-Key (RFC 6455 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _WS_GUID).digest()).decode()


def _server_frame(opcode: int, payload: bytes) -> bytes:
    """One final, unmasked frame (a server never masks)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, n))
    elif n < 0x10000:
        head = bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big")
    return head + payload


def _unmask(data: bytes | bytearray, key: bytes) -> bytes:
    """XOR with the 4-byte key repeated, as one big-int operation (C speed)."""
    n = len(data)
    if not n:
        return b""
    mask = int.from_bytes((key * ((n + 3) // 4))[:n], "little")
    return (int.from_bytes(data, "little") ^ mask).to_bytes(n, "little")


def _close_payload(code: int, reason: str) -> bytes:
    return code.to_bytes(2, "big") + reason.encode()[:120]


class _CloseNow(Exception):
    """The client broke the framing: close with this code."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Flusher:
    """Sends what every `ServerChannel` of a server queued, from one task: once per
    round of the trio loop it writes each channel's frames straight to its socket
    (non-blocking), so a message to a host costs neither a task switch nor trio's send
    machinery. A socket that does not take everything hands the rest to that channel's
    own writer task, which waits for the socket (and owns it until it is drained)."""

    def __init__(self) -> None:
        self._dirty: list[ServerChannel] = []
        self._wake = trio.Event()

    def mark(self, channel: ServerChannel) -> None:
        self._dirty.append(channel)
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            dirty, self._dirty = self._dirty, []
            for channel in dirty:
                channel._flush()


class ServerChannel:
    """Typed messages on a websocket this side accepted (see `accept_websocket`).

    `receive_batch` returns every message that the bytes received so far complete
    (reading more only when there are none); `queue` never blocks: the `Flusher`
    given, or else `run_writer` (a task of the caller's), sends all that is queued
    with one write. Pings are answered, a close is answered and ends the channel, bad
    frames are answered with an `Error` as `Channel` does; broken framing (unmasked or
    reserved bits, bad opcodes) closes with 1002, a message over `max_message` bytes
    with 1009.
    """

    def __init__(
        self,
        stream: trio.abc.HalfCloseableStream,
        received: bytes = b"",
        *,
        name: str = "",
        max_message: int = MAX_FRAME,
        on_protocol_error: Callable[[ProtocolError], None] | None = None,
        flusher: Flusher | None = None,
    ) -> None:
        self.stream = stream
        self.name = name
        self.max_message = max_message
        self.version = 0
        self.peer_hello: Hello | None = None
        self._on_protocol_error = on_protocol_error
        self._buf = received  # received bytes not parsed yet (an incomplete frame)
        self._unparsed = bool(received)
        self._ready: list[Message] = []
        self._fragments: list[bytes] = []
        self._fragment_op = 0
        self._fragment_size = 0
        self._out: list[Message | bytes] = []  # messages, or control frames ready to go
        sock = getattr(stream, "socket", None)
        # Direct writes need the socket's fd (a trio.SocketStream's); else the writer.
        self._flusher = flusher if sock is not None else None
        self._fd = sock.fileno() if sock is not None else -1
        self._marked = False  # in the flusher's list
        self._writer_owns = False  # the writer task is draining: the flusher keeps off
        self._tail = b""  # bytes the socket did not take yet (the writer's to send)
        self._wake = trio.Event()
        self._writer_done = trio.Event()
        self._closing = False  # our close frame is queued: nothing more goes out
        self._closed = False  # no more reading: the client closed or broke the framing
        self.close_reason = ""
        self._budget = _error_budget()

    # -- sending ---------------------------------------------------------------------

    @property
    def backlog(self) -> int:
        """Messages queued and not yet handed to the kernel."""
        return len(self._out)

    def queue(self, msg: Message | bytes) -> None:
        """Send `msg` (or a ready control frame) with the next write."""
        if self._closing:
            return
        self._out.append(msg)
        if self._flusher is None or self._writer_owns:
            self._wake.set()
        elif not self._marked:
            self._marked = True
            self._flusher.mark(self)

    def _take(self) -> bytes:
        items, self._out = self._out, []
        return b"".join(
            x if isinstance(x, bytes) else _server_frame(_OP_BINARY, encode(x)) for x in items
        )

    def _flush(self) -> None:
        """The flusher's part: write what is queued without waiting."""
        self._marked = False
        if self._writer_owns or not self._out:
            return
        try:
            data = self._take()
        except Exception as exc:  # a message that does not encode: a bug, not the flusher's end
            log.error("cannot encode a message", channel=self.name, error=repr(exc))
            self.close_soon(1011, "internal error")
            return
        try:
            sent = os.write(self._fd, data)
        except OSError:  # full (BlockingIOError), or the client is gone: the reader sees EOF
            sent = 0
        if sent < len(data):
            self._tail = data[sent:]
            self._writer_owns = True
            self._wake.set()

    async def run_writer(self) -> None:
        """Send what the flusher could not (or everything, without a flusher), until
        the close frame is sent."""
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                self._writer_owns = True
                while self._tail or self._out:
                    data, self._tail = self._tail + self._take(), b""
                    with trio.fail_after(SEND_TIMEOUT):
                        await self.stream.send_all(data)
                if self._closing:
                    return  # the close frame went out last
                self._writer_owns = False
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            self._closed = self._closing = True
            self.close_reason = self.close_reason or "connection lost"
        finally:
            self._writer_owns = True  # for good: nothing more is written
            self._writer_done.set()

    def close_soon(self, code: int = 1000, reason: str = "") -> None:
        """Queue our close frame as the last thing this channel sends."""
        if self._closing:
            return
        self._out.append(_server_frame(_OP_CLOSE, _close_payload(code, reason)))
        self._closing = True
        self.close_reason = self.close_reason or reason
        self._writer_owns = True  # the writer sends the rest, then the close
        self._wake.set()

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Our close frame, then (briefly) the client's answer, then the connection: a
        client waits for the server to close the TCP connection (RFC 6455 7.1.1)."""
        self.close_soon(code, reason)
        with trio.move_on_after(CLOSE_TIMEOUT) as scope:
            scope.shield = True
            await self._writer_done.wait()
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError, _CloseNow):
                while not self._closed:
                    data = await self.stream.receive_some(RECEIVE_SIZE)
                    if not data:
                        break
                    self._parse(data)
        with trio.move_on_after(1) as scope:
            scope.shield = True
            await self.stream.aclose()

    # -- receiving -------------------------------------------------------------------

    async def receive_batch(self) -> list[Message]:
        """The next valid messages (at least one); ChannelClosed when there are none."""
        while not self._ready:
            if self._closed:
                raise ChannelClosed(f"{self.name}: closed: {self.close_reason}")
            if self._unparsed:  # what came with the upgrade request: parse it first
                self._unparsed = False
                data = b""
            else:
                try:
                    data = await self.stream.receive_some(RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    self._closed = True
                    self.close_reason = self.close_reason or "connection lost"
                    continue
            try:
                self._parse(data)
            except _CloseNow as exc:
                _log_protocol_error(self.name, exc.reason)
                self._closed = True
                self.close_soon(exc.code, exc.reason)
        ready, self._ready = self._ready, []
        return ready

    async def receive(self) -> Message:
        if not self._ready:
            self._ready = await self.receive_batch()
        return self._ready.pop(0)

    def _parse(self, data: bytes = b"") -> None:
        """Turn every complete frame received into messages or control answers. Only an
        incomplete frame's bytes are kept (a buffer per host that kept the size of its
        largest read would cost 1,000 hosts 64 MiB)."""
        buf = self._buf + data if self._buf else data
        n = len(buf)
        pos = 0
        try:
            while n - pos >= 2 and not self._closed:
                b0, b1 = buf[pos], buf[pos + 1]
                length = b1 & 0x7F
                head = pos + 2
                if length == 126:
                    if n - pos < 4:
                        break
                    length = int.from_bytes(buf[head : head + 2], "big")
                    head += 2
                elif length == 127:
                    if n - pos < 10:
                        break
                    length = int.from_bytes(buf[head : head + 8], "big")
                    head += 8
                if not b1 & 0x80:
                    raise _CloseNow(1002, "client frames must be masked")
                if b0 & 0x70:
                    raise _CloseNow(1002, "reserved bits set (no extension was agreed)")
                opcode, fin = b0 & 0x0F, b0 & 0x80
                if opcode >= 8:
                    if length > 125 or not fin:
                        raise _CloseNow(1002, "bad control frame")
                elif length + self._fragment_size > self.max_message:
                    # Before buffering it: an oversize message ends the connection.
                    raise _CloseNow(1009, f"message over the {self.max_message}-byte limit")
                end = head + 4 + length
                if end > n:
                    break
                payload = _unmask(buf[head + 4 : end], bytes(buf[head : head + 4]))
                pos = end
                self._frame(opcode, bool(fin), payload)
        finally:
            self._buf = buf[pos:] if pos < n else b""

    def _frame(self, opcode: int, fin: bool, payload: bytes) -> None:
        if opcode in (_OP_BINARY, _OP_TEXT):
            if self._fragments:
                raise _CloseNow(1002, "new message inside a fragmented one")
            if fin:
                self._message(opcode, payload)
                return
            self._fragment_op = opcode
            self._fragments.append(payload)
            self._fragment_size = len(payload)
        elif opcode == _OP_CONT:
            if not self._fragments:
                raise _CloseNow(1002, "continuation without a message")
            self._fragments.append(payload)
            self._fragment_size += len(payload)
            if fin:
                data = b"".join(self._fragments)
                self._fragments, self._fragment_size = [], 0
                self._message(self._fragment_op, data)
        elif opcode == _OP_PING:
            self.queue(_server_frame(_OP_PONG, payload))
        elif opcode == _OP_PONG:
            pass
        elif opcode == _OP_CLOSE:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1000
            self.close_reason = payload[2:].decode("utf-8", "replace") or f"code {code}"
            self._closed = True
            self.close_soon(code if 1000 <= code < 5000 and code not in (1005, 1006) else 1000)
        else:
            raise _CloseNow(1002, f"unknown opcode {opcode}")

    def _message(self, opcode: int, payload: bytes) -> None:
        if opcode == _OP_TEXT:
            self._reject(ProtocolError("expected a binary frame, got text"))
            return
        try:
            self._ready.append(decode(payload, self.max_message))
        except ProtocolError as exc:
            self._reject(exc)
            if exc.fatal:
                raise _CloseNow(1009, str(exc)) from None

    def _reject(self, exc: ProtocolError) -> None:
        _log_protocol_error(self.name, str(exc))
        if self._on_protocol_error is not None:
            self._on_protocol_error(exc)
        if not self._budget.try_take(1, trio.current_time()):
            raise _CloseNow(1008, "too many protocol errors")
        self.queue(Error(code=ErrorCode.PROTOCOL, message=str(exc)[:1024], ref=exc.ref or ""))

    # -- the handshake ---------------------------------------------------------------

    async def handshake(self, hello: Hello, *, timeout: float = HANDSHAKE_TIMEOUT) -> Hello:
        """As `Channel.handshake` (the writer must be running)."""
        self.queue(hello)
        with trio.fail_after(timeout):
            first = await self.receive()
        if not isinstance(first, Hello):
            self.queue(Error(code=ErrorCode.PROTOCOL, message="expected hello", ref=first.TAG))
            self.close_soon(1002, "expected hello")
            raise ChannelClosed(f"{self.name}: expected hello, got {first.TAG}")
        try:
            self.version = check_version(first)
        except ProtocolError as exc:
            self.queue(Error(code=ErrorCode.VERSION, message=str(exc), ref=Hello.TAG))
            self.close_soon(1002, "no common protocol version")
            raise ChannelClosed(f"{self.name}: {exc}") from None
        self.peer_hello = first
        return first


async def accept_websocket(
    request: Request,
    responder: Responder,
    run: Callable[[ServerChannel], Awaitable[None]],
    *,
    name: str = "",
    max_message: int = MAX_FRAME,
    on_protocol_error: Callable[[ProtocolError], None] | None = None,
    flusher: Flusher | None = None,
) -> None:
    """Answer a websocket upgrade on an h11 connection and run `run(channel)` on it.

    The connection is the websocket's from then on and is closed afterwards. No
    extension or subprotocol is agreed. A request that is no proper upgrade gets 400.
    """
    headers = request.headers
    key = headers.get("sec-websocket-key") or ""
    connection = {t.strip().lower() for t in (headers.get("connection") or "").split(",")}
    try:
        valid_key = len(base64.b64decode(key, validate=True)) == 16
    except ValueError:
        valid_key = False
    if (
        request.method != "GET"
        or (headers.get("upgrade") or "").lower() != "websocket"
        or "upgrade" not in connection
        or headers.get("sec-websocket-version") != "13"
        or not valid_key
    ):
        await responder.send(400, b"bad websocket upgrade\n", [(b"sec-websocket-version", b"13")])
        return
    stream, received = responder.take_over()
    await stream.send_all(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + websocket_accept_key(key).encode() + b"\r\n\r\n"
    )
    channel = ServerChannel(
        stream,
        received,
        name=name,
        max_message=max_message,
        on_protocol_error=on_protocol_error,
        flusher=flusher,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(channel.run_writer)
        try:
            await run(channel)
        finally:
            await channel.aclose(1000, "")
            nursery.cancel_scope.cancel()
