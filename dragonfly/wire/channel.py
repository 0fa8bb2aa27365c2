"""CBOR messages over a websocket: one message per binary frame, a Hello handshake first.

A frame that does not decode is answered with an `Error` message and the
connection goes on; only a fatal protocol error (an oversize frame, a version
mismatch) closes it. trio-websocket enforces the frame size itself (close 1009).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress

import trio
import trio_websocket

from dragonfly.log import get_logger
from dragonfly.wire.codec import MAX_FRAME, Message, ProtocolError, decode, encode
from dragonfly.wire.messages import Error, ErrorCode, Hello, check_version

log = get_logger("dragonfly.channel")

# Where the websockets live: peers → scheduler, and children → a parent's upload port.
SCHEDULER_PATH = "/v1/scheduler"
ANNOUNCE_PATH = "/v1/announce"
HANDSHAKE_TIMEOUT = 10.0
# Messages queued by the websocket reader before it stops reading (backpressure).
MESSAGE_QUEUE = 64

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
        log.warning("protocol error", channel=self.name, error=str(exc))
        if self._on_protocol_error is not None:
            self._on_protocol_error(exc)
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

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        with trio.move_on_after(2) as scope:
            scope.shield = True
            await self.ws.aclose(code, reason)


@asynccontextmanager
async def connect(
    url: str, hello: Hello, *, name: str = "", connect_timeout: float = 10.0
) -> AsyncIterator[Channel]:
    """Open a websocket to `url`, handshake, and yield the channel."""
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
