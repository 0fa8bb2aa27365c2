"""ServerChannel (the scheduler's side of its hosts' websockets) against a real client
(trio-websocket) and against hand-made frames, on loopback."""

from __future__ import annotations

import base64
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trio
import trio_websocket

from dragonfly.net.channel import (
    ChannelClosed,
    Flusher,
    ServerChannel,
    accept_websocket,
    websocket_accept_key,
)
from dragonfly.net.http_server import Request, Responder, bound_port, serve
from dragonfly.wire.codec import MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, decode, encode
from dragonfly.wire.messages import Error, Hello, PieceDigest, PieceDigests, Ping, Pong

HELLO = Hello(version=PROTOCOL_VERSION, min_version=MIN_PROTOCOL_VERSION, role="scheduler")
PEER_HELLO = Hello(version=PROTOCOL_VERSION, min_version=MIN_PROTOCOL_VERSION, role="peer")

Run = Callable[[ServerChannel], Awaitable[None]]


async def _server(
    nursery: trio.Nursery, run: Run, *, flusher: bool = True, max_message: int = 1 << 20
) -> str:
    """An h11 server whose /ws upgrades to a ServerChannel running `run`; its ws URL."""
    f = Flusher() if flusher else None
    if f is not None:
        nursery.start_soon(f.run)

    async def handler(request: Request, responder: Responder) -> None:
        await accept_websocket(request, responder, run, flusher=f, max_message=max_message)

    listeners = await nursery.start(serve, handler, "127.0.0.1", 0)
    return f"ws://127.0.0.1:{bound_port(listeners)}/ws"


async def _echo(channel: ServerChannel) -> None:
    """Handshake, then answer every Ping with a Pong of the same nonce, batch by batch."""
    await channel.handshake(HELLO)
    while True:
        try:
            batch = await channel.receive_batch()
        except ChannelClosed:
            return
        for msg in batch:
            if isinstance(msg, Ping):
                channel.queue(Pong(msg.nonce))


@pytest.fixture(params=[True, False], ids=["flusher", "writer-only"])
async def echo_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        yield await _server(nursery, _echo, flusher=request.param)
        nursery.cancel_scope.cancel()


async def _client_hello(ws: trio_websocket.WebSocketConnection) -> None:
    await ws.send_message(encode(PEER_HELLO))
    assert decode(await ws.get_message()) == HELLO


async def test_messages_both_ways_in_order(echo_url: str) -> None:
    async with trio_websocket.open_websocket_url(echo_url) as ws:
        await _client_hello(ws)
        for n in range(500):  # many at once: they arrive batched, answers go out batched
            await ws.send_message(encode(Ping(n)))
        for n in range(500):
            assert decode(await ws.get_message()) == Pong(n)


@pytest.mark.parametrize("flusher", [True, False], ids=["flusher", "writer-only"])
async def test_a_slow_reader_gets_everything_in_order(flusher: bool) -> None:
    """More than the socket takes at once: the flusher's partial write hands the rest to
    the channel's writer, and what is queued meanwhile follows it in order."""
    digests = [PieceDigest(n, n.to_bytes(32, "big")) for n in range(5000)]  # ~190 KB each

    async def flood(channel: ServerChannel) -> None:
        await channel.handshake(HELLO)
        for n in range(40):
            channel.queue(PieceDigests(peer_id=f"p{n}", task_id="t", digests=digests))
            if n % 10 == 0:
                await trio.lowlevel.checkpoint()  # let the flusher write between batches
        await channel.receive_batch()  # until the client says goodbye

    async with trio.open_nursery() as nursery:
        url = await _server(nursery, flood, flusher=flusher)
        async with trio_websocket.open_websocket_url(url, message_queue_size=1) as ws:
            await _client_hello(ws)
            await trio.sleep(0.3)  # the server's socket buffers fill meanwhile
            for n in range(40):
                msg = decode(await ws.get_message())
                assert isinstance(msg, PieceDigests) and msg.peer_id == f"p{n}"
                assert msg.digests == digests
        nursery.cancel_scope.cancel()


async def test_ping_pong_and_client_close(echo_url: str) -> None:
    async with trio_websocket.open_websocket_url(echo_url) as ws:
        await _client_hello(ws)
        with trio.fail_after(5):
            await ws.ping(b"x")  # returns on the pong
        await ws.aclose(1000, "bye")
        assert ws.closed is not None and ws.closed.code == 1000


async def test_bad_messages_are_answered_and_the_connection_goes_on(echo_url: str) -> None:
    async with trio_websocket.open_websocket_url(echo_url) as ws:
        await _client_hello(ws)
        await ws.send_message("text")
        reply = decode(await ws.get_message())
        assert isinstance(reply, Error) and "text" in reply.message
        await ws.send_message(b"\xff\x00garbage")
        reply = decode(await ws.get_message())
        assert isinstance(reply, Error) and reply.code == "protocol"
        await ws.send_message(encode(Ping(7)))
        assert decode(await ws.get_message()) == Pong(7)


async def test_oversize_message_closes_with_1009() -> None:
    async with trio.open_nursery() as nursery:
        url = await _server(nursery, _echo, max_message=1000)
        async with trio_websocket.open_websocket_url(url) as ws:
            await _client_hello(ws)
            await ws.send_message(b"\x00" * 2000)
            with pytest.raises(trio_websocket.ConnectionClosed), trio.fail_after(5):
                await ws.get_message()
            assert ws.closed is not None and ws.closed.code == 1009
        nursery.cancel_scope.cancel()


async def test_server_close_reaches_the_client() -> None:
    async def close_at_once(channel: ServerChannel) -> None:
        await channel.handshake(HELLO)
        await channel.aclose(1001, "going away")

    async with trio.open_nursery() as nursery:
        url = await _server(nursery, close_at_once)
        async with trio_websocket.open_websocket_url(url) as ws:
            await _client_hello(ws)
            with pytest.raises(trio_websocket.ConnectionClosed), trio.fail_after(5):
                await ws.get_message()
            assert ws.closed is not None and ws.closed.code == 1001
        nursery.cancel_scope.cancel()


# -- hand-made frames ---------------------------------------------------------------


def _frame(payload: bytes, opcode: int = 0x2, *, fin: bool = True, mask: bool = True) -> bytes:
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    head = bytes((b0, (0x80 if mask else 0) | n)) if n < 126 else b""
    if not head:
        head = bytes((b0, (0x80 if mask else 0) | 126)) + n.to_bytes(2, "big")
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


async def _raw_connect(url: str) -> tuple[trio.SocketStream, bytearray]:
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16))
    await stream.send_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n"
        b"Sec-WebSocket-Key: "
        + key
        + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
        # The client's Hello in the same packet as its request: it must not be lost.
        + _frame(encode(PEER_HELLO))
    )
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        buf += await stream.receive_some(4096)
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 ")
    assert b"Sec-WebSocket-Accept: " + websocket_accept_key(key.decode()).encode() in head
    return stream, bytearray(rest)


async def _read_frame(stream: trio.SocketStream, buf: bytearray) -> tuple[int, bytes]:
    while True:
        if len(buf) >= 2:
            n, head = buf[1] & 0x7F, 2
            if n == 126 and len(buf) >= 4:
                n, head = int.from_bytes(buf[2:4], "big"), 4
            if n < 127 and len(buf) >= head + n:
                frame = (buf[0] & 0x0F, bytes(buf[head : head + n]))
                del buf[: head + n]
                return frame
        data = await stream.receive_some(65536)
        if not data:
            raise EOFError
        buf += data


async def test_fragments_are_assembled_and_hello_with_the_request_is_read(echo_url: str) -> None:
    stream, buf = await _raw_connect(echo_url)
    with trio.fail_after(5):
        assert decode((await _read_frame(stream, buf))[1]) == HELLO
        ping = encode(Ping(42))
        await stream.send_all(
            _frame(ping[:3], fin=False)
            + _frame(b"", 0x9)  # a ping between the fragments
            + _frame(ping[3:], 0x0)
        )
        assert await _read_frame(stream, buf) == (0xA, b"")
        assert (await _read_frame(stream, buf))[0] == 0x2
    await stream.aclose()


@pytest.mark.parametrize(
    "bad",
    [
        _frame(encode(Ping(1)), mask=False),  # a client frame must be masked
        bytes((0x80 | 0x40 | 0x2, 0x80)) + b"\0\0\0\0",  # RSV1 without an extension
        _frame(b"", 0x3),  # a reserved opcode
        _frame(b"x" * 200, 0x9),  # a control frame over 125 bytes
        _frame(b"", 0x0),  # a continuation of nothing
    ],
    ids=["unmasked", "rsv", "opcode", "long-ping", "orphan-continuation"],
)
async def test_broken_framing_closes_with_1002(echo_url: str, bad: bytes) -> None:
    stream, buf = await _raw_connect(echo_url)
    with trio.fail_after(5):
        assert decode((await _read_frame(stream, buf))[1]) == HELLO
        await stream.send_all(bad)
        opcode, payload = await _read_frame(stream, buf)
        assert opcode == 0x8 and int.from_bytes(payload[:2], "big") == 1002
    await stream.aclose()


async def test_not_an_upgrade_gets_400(echo_url: str) -> None:
    port = int(echo_url.rsplit(":", 1)[1].split("/")[0])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"  # no key
    )
    with trio.fail_after(5):
        answer = await stream.receive_some(4096)
    assert answer.startswith(b"HTTP/1.1 400 ")
    await stream.aclose()
