"""CONNECT on the peer's proxy (a peer daemon in this process, no scheduler), and
the HTTP server over streams that are not plain sockets (TLS after a takeover)."""

from __future__ import annotations

import functools
import hashlib
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from dragonfly.config import PeerConfig, load_config
from dragonfly.net.http_response import send_file_response
from dragonfly.net.http_server import (
    Request,
    Responder,
    bound_port,
    serve,
    serve_connection,
)
from dragonfly.net.tls import make_ca
from dragonfly.nursery.peer import PeerDaemon
from dragonfly.peer.tunnel import BadTarget, parse_authority, splice_streams
from dragonfly.testing.certs import make_pki
from tests.p2p_support import connect_through as _connect


@pytest.fixture
async def closed_port() -> int:
    """A loopback port nobody listens on."""
    with trio.socket.socket() as s:
        await s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def peer(tmp_path: Path, echo_port: int, closed_port: int) -> AsyncIterator[PeerDaemon]:
    cfg = load_config(
        "peer",
        env={},
        overrides=[
            "scheduler.addresses=[]",
            f"storage.data_dir={tmp_path / 'data'}",
            f"proxy.connect_ports=[{echo_port}, {closed_port}]",
        ],
    )
    assert isinstance(cfg, PeerConfig)
    async with trio.open_nursery() as nursery:
        daemon = await nursery.start(PeerDaemon(cfg).run)
        yield daemon
        nursery.cancel_scope.cancel()


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    """A TCP echo server on loopback that half-closes after echoing the client's EOF."""

    async def echo(stream: trio.SocketStream) -> None:
        async with stream:
            async for chunk in stream:
                await stream.send_all(chunk)
            await stream.send_eof()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, echo, 0, host="127.0.0.1")
        )
        yield bound_port(listeners)
        nursery.cancel_scope.cancel()


async def _read_all(stream: trio.abc.ReceiveStream) -> bytes:
    parts = []
    with trio.fail_after(30):
        async for chunk in stream:
            parts.append(chunk)
    return b"".join(parts)


async def test_connect_tunnels_bytes_both_ways(peer: PeerDaemon, echo_port: int):
    # bytes sent right after the CONNECT headers, in the same write, reach the target
    stream, head = await _connect(peer.proxy_port, f"127.0.0.1:{echo_port}", b"early bytes")
    assert head.startswith(b"HTTP/1.1 200 Connection established\r\n")
    assert b"content-length" not in head.lower() and b"transfer-encoding" not in head.lower()
    rest = head.split(b"\r\n\r\n", 1)[1]
    while len(rest) < len(b"early bytes"):
        rest += await stream.receive_some(65536)
    assert rest == b"early bytes"
    # a few MiB each way at once, then a half-close: the answer still arrives whole
    payload = os.urandom(4 * 1024 * 1024 + 3)
    received = b""

    async def send() -> None:
        for i in range(0, len(payload), 100_000):
            await stream.send_all(payload[i : i + 100_000])
        await stream.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        received = await _read_all(stream)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    await stream.aclose()
    metrics = peer.metrics.render().decode()
    assert 'dragonfly_proxy_requests_total{mode="tunnel"} 1.0' in metrics


@pytest.mark.parametrize(
    ("target", "problem"),
    [
        ("example.com", b"no port"),
        ("example.com:0", b"port must be 1-65535"),
        ("example.com:99999", b"port must be 1-65535"),
        ("example.com:http", b"not HOST:PORT"),
        ("[1::2::3]:443", b"not an IPv6 address"),
        ("http://example.com:80/", b"not HOST:PORT"),
        ("exa$mple.com:443", b"not a host name"),
    ],
)
async def test_bad_connect_targets_get_400(peer: PeerDaemon, target: str, problem: bytes):
    stream, head = await _connect(peer.proxy_port, target)
    body = head + await _read_all(stream)
    assert body.startswith(b"HTTP/1.1 400 "), body
    assert problem in body
    await stream.aclose()


async def test_unreachable_target_gets_502(peer: PeerDaemon, closed_port: int):
    stream, head = await _connect(peer.proxy_port, f"127.0.0.1:{closed_port}")
    body = head + await _read_all(stream)
    assert body.startswith(b"HTTP/1.1 502 "), body
    assert f"cannot connect to 127.0.0.1:{closed_port}".encode() in body
    assert body.endswith(b": Connection refused\n"), body
    await stream.aclose()
    # the proxy keeps serving after failures
    stream, head = await _connect(peer.proxy_port, "bad")
    assert head.startswith(b"HTTP/1.1 400 ")
    await stream.aclose()


def test_parse_authority():
    a = parse_authority("Example.COM:443")
    assert (a.host, a.port, str(a), a.url_prefix()) == (
        "example.com",
        443,
        "example.com:443",
        "https://example.com",
    )
    b = parse_authority("[::1]:8443")
    assert (b.host, str(b), b.url_prefix()) == ("::1", "[::1]:8443", "https://[::1]:8443")
    assert parse_authority("10.1.2.3:1").url_prefix() == "https://10.1.2.3:1"
    for bad in ("", ":443", "a:b:443", "a@b:443", "a b:443", "[::1]", "a:-1"):
        with pytest.raises(BadTarget):
            parse_authority(bad)


async def test_splice_idle_timeout_and_half_close(autojump_clock: trio.testing.MockClock):
    """No byte either way for idle_timeout: the tunnel ends. A half-close is passed on."""
    a_outer, a_inner = trio.testing.memory_stream_pair()
    b_inner, b_outer = trio.testing.memory_stream_pair()
    start = trio.current_time()
    result: list[tuple[int, int]] = []

    async def run() -> None:
        result.append(await splice_streams(a_inner, b_inner, idle_timeout=10))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await a_outer.send_all(b"ping")
        assert await b_outer.receive_some(100) == b"ping"
        await trio.sleep(8)
        await b_outer.send_all(b"pong")  # activity pushes the deadline on
        assert await a_outer.receive_some(100) == b"pong"
        await a_outer.send_eof()
        assert await b_outer.receive_some(100) == b""  # EOF passed on
        await b_outer.send_all(b"still open the other way")
        assert await a_outer.receive_some(100) == b"still open the other way"
    assert result == [(4, 4 + len(b"still open the other way"))]
    assert 18 <= trio.current_time() - start <= 19  # 8 s, then 10 s idle after the last byte


async def test_http_server_over_tls_after_connect(tmp_path: Path):
    """A handler takes the connection over after CONNECT, wraps it in TLS and serves
    HTTP inside with the same server: sendfile falls back to read + send through TLS."""
    pki = make_pki(tmp_path / "pki")
    data = os.urandom(3 * 1024 * 1024 + 11)
    (tmp_path / "f.bin").write_bytes(data)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    clients: list[str] = []

    async def inner(request: Request, responder: Responder) -> None:
        clients.append(request.client)
        fd = os.open(tmp_path / "f.bin", os.O_RDONLY)
        try:
            await send_file_response(request, responder, fd, len(data))
        finally:
            os.close(fd)

    async def outer(request: Request, responder: Responder) -> None:
        if request.method != "CONNECT":
            await responder.send(405, b"CONNECT only\n")
            return
        raw = await responder.accept_connect()
        tls = trio.SSLStream(raw, server_ctx, server_side=True)
        await serve_connection(tls, inner)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(serve, outer, "127.0.0.1", 0)
        port = bound_port(listeners)
        out = tmp_path / "out.bin"
        proxy = ["-p", "-x", f"http://127.0.0.1:{port}", "--cacert", str(pki.ca_cert)]
        r = await trio.run_process(
            ["curl", "-sS", "-f", *proxy, "-o", str(out), "-w", "%{http_code}",
             "https://127.0.0.1/f.bin", "--next", *proxy, "-r", "5-9",
             "https://127.0.0.1/f.bin"],
            capture_stdout=True, capture_stderr=True, check=False,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert r.stdout == b"200" + data[5:10]
        assert out.read_bytes() == data
        # the client's address is found through the TLS and replay wrappers
        assert clients and all(c.startswith("127.0.0.1:") for c in clients)
        nursery.cancel_scope.cancel()


async def test_hijacked_requests_stay_on_the_tunnels_host(tmp_path: Path):
    """Inside an intercepted tunnel, origin-form requests become https://HOST:PORT/...;
    a Host header or absolute URL naming another host is refused (421)."""
    ca = make_ca(tmp_path / "ca")
    with trio.socket.socket() as s:  # the "origin": a port nobody listens on
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config(
        "peer",
        env={},
        overrides=[
            "scheduler.addresses=[]",
            f"storage.data_dir={tmp_path / 'data'}",
            f"proxy.hijack_https.ca_cert={ca.cert}",
            f"proxy.hijack_https.ca_key={ca.key}",
            'proxy.hijack_https.hosts=["^127\\\\.0\\\\.0\\\\.1:"]',
            f"proxy.connect_ports=[{port}]",
        ],
    )
    client_ctx = ssl.create_default_context(cafile=str(ca.cert))

    async def ask(daemon: PeerDaemon, request: bytes) -> bytes:
        raw, head = await _connect(daemon.proxy_port, f"127.0.0.1:{port}")
        assert head.startswith(b"HTTP/1.1 200 "), head
        tls = trio.SSLStream(raw, client_ctx, server_hostname="127.0.0.1")
        await tls.send_all(request)
        answer = await _read_all(tls)
        await tls.aclose()
        return answer

    async with trio.open_nursery() as nursery:
        daemon = await nursery.start(PeerDaemon(cfg).run)
        host = f"127.0.0.1:{port}".encode()
        # the right host: proxied to https://127.0.0.1:PORT/f?x=1 (which refuses: 502)
        answer = await ask(daemon, b"GET /f?x=1 HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 502 "), answer
        assert f"https://127.0.0.1:{port}/f?x=1".encode() in answer
        answer = await ask(daemon, b"GET /f HTTP/1.1\r\nHost: other.example\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 421 "), answer
        absolute = b"GET https://other.example/f HTTP/1.1\r\nHost: other.example\r\n\r\n"
        answer = await ask(daemon, absolute)
        assert answer.startswith(b"HTTP/1.1 421 "), answer
        metrics = daemon.metrics.render().decode()
        assert 'dragonfly_proxy_requests_total{mode="hijack"} 3.0' in metrics
        assert daemon.hijacker.leaves is not None and daemon.hijacker.leaves.made == 1
        nursery.cancel_scope.cancel()
