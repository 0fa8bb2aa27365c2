"""The h11 client against a real nginx origin."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from dragonfly.net.http_client import HTTPClient
from dragonfly.net.http_client_errors import (
    BadResponse,
    BodyIncomplete,
    ConnectError,
    HTTPClientError,
    HTTPTimeout,
    TooManyRedirects,
)
from dragonfly.testing.nginx import Nginx
from tests.conftest import Origin

pytestmark = pytest.mark.nginx


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The URLs HTTPClient opened a new connection for, in order."""
    calls: list[str] = []
    real = HTTPClient._connect

    async def counting(self: HTTPClient, origin: Any, url: str) -> Any:
        calls.append(url)
        return await real(self, origin, url)

    monkeypatch.setattr(HTTPClient, "_connect", counting)
    return calls


async def _splice_whole(client: HTTPClient, url: str, path: Path) -> int:
    async with client.request("GET", url) as resp:
        assert resp.status == 200
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            return await resp.splice_to(fd, 0)
        finally:
            os.close(fd)


async def test_full_body_spliced_to_file_and_connection_reused(
    origin: Origin, tmp_path: Path, connects: list[str]
):
    client = HTTPClient()
    out = tmp_path / "out"
    for _ in range(3):
        n = await _splice_whole(client, origin.url("large.bin"), out)
        assert n == len(origin.files["large.bin"])
        assert hashlib.sha256(out.read_bytes()).hexdigest() == origin.sha256("large.bin")
    # keep-alive: the three requests went over one connection, back in the pool now
    assert len(connects) == 1
    assert sum(len(v) for v in client._idle.values()) == 1
    await client.aclose()


async def test_second_aclose_leaves_the_pooled_connection_alone(
    origin: Origin, connects: list[str]
):
    client = HTTPClient()
    async with client.request("GET", origin.url("small.bin")) as r:
        assert await r.read() == origin.files["small.bin"]
        await r.aclose()  # the connection goes back to the pool here...
    # ...and the context manager's aclose must not close it there
    async with client.request("GET", origin.url("small.bin")) as r:
        assert await r.read() == origin.files["small.bin"]
    assert len(connects) == 1
    await client.aclose()


async def test_read_into_preallocated_buffer(origin: Origin):
    client = HTTPClient()
    data = origin.files["medium.bin"]
    async with client.request("GET", origin.url("medium.bin")) as resp:
        assert resp.content_length == len(data)
        buf = bytearray(len(data))
        await resp.readinto_exactly(buf)
        assert bytes(buf) == data
        assert resp.complete
    await client.aclose()


async def test_range_requests(origin: Origin, tmp_path: Path):
    client = HTTPClient()
    data = origin.files["medium.bin"]
    async with client.request("GET", origin.url("medium.bin"), [("Range", "bytes=100-1099")]) as r:
        assert r.status == 206
        assert r.headers.get("content-range") == f"bytes 100-1099/{len(data)}"
        assert await r.read() == data[100:1100]
    # a range spliced into a file at its own offset, as a piece is
    fd = os.open(tmp_path / "sparse", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        start = 2 * 1024 * 1024
        async with client.request(
            "GET", origin.url("medium.bin"), [("Range", f"bytes={start}-")]
        ) as r:
            assert r.status == 206
            await r.splice_to(fd, start)
        assert os.pread(fd, len(data) - start, start) == data[start:]
    finally:
        os.close(fd)
    async with client.request("GET", origin.url("small.bin"), [("Range", "bytes=5000-")]) as r:
        assert r.status == 416
    await client.aclose()


async def test_redirects_followed_and_bounded(origin: Origin):
    client = HTTPClient(max_redirects=5)
    async with client.request("GET", origin.url("redirect")) as r:
        assert r.status == 200
        assert r.url.endswith("/medium.bin")
        assert await r.read() == origin.files["medium.bin"]
    async with client.request("GET", origin.url("redirect-abs")) as r:
        assert await r.read() == origin.files["small.bin"]
    async with client.request("GET", origin.url("redirect"), follow_redirects=False) as r:
        assert r.status == 302
    with pytest.raises(TooManyRedirects, match="more than 5 redirects"):
        async with client.request("GET", origin.url("loop")):
            pass
    await client.aclose()


async def test_error_statuses_head_and_empty(origin: Origin):
    client = HTTPClient()
    async with client.request("GET", origin.url("missing.bin")) as r:
        assert r.status == 404
        await r.read()
    async with client.request("GET", origin.url("error500")) as r:
        assert r.status == 500
        await r.read()
    async with client.request("HEAD", origin.url("large.bin")) as r:
        assert r.status == 200
        assert r.content_length == len(origin.files["large.bin"])
        assert await r.read() == b""
    async with client.request("GET", origin.url("empty.bin")) as r:
        assert r.status == 200
        assert await r.read() == b""
    # all of these left the connection reusable
    async with client.request("GET", origin.url("small.bin")) as r:
        assert await r.read() == origin.files["small.bin"]
    await client.aclose()


async def test_connect_errors_are_named():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = HTTPClient(connect_timeout=2)
    with pytest.raises(ConnectError, match=f"cannot connect to 127.0.0.1:{port}"):
        async with client.request("GET", f"http://127.0.0.1:{port}/x"):
            pass
    with pytest.raises(HTTPClientError, match="not an absolute http"):
        async with client.request("GET", "ftp://127.0.0.1/x"):
            pass


async def test_origin_killed_mid_body_is_a_clear_error(tmp_path: Path):
    """nginx (rate-limited) dies during the body: the client says how far it got."""
    root = tmp_path / "www"
    root.mkdir()
    (root / "f.bin").write_bytes(os.urandom(8 * 1024 * 1024))
    nginx = Nginx(root=root, workdir=tmp_path / "nginx", limit_rate="1m").start()
    try:
        client = HTTPClient()
        fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o644)
        try:

            async def kill_soon() -> None:
                await trio.sleep(0.5)
                assert nginx.process is not None
                os.killpg(nginx.process.pid, signal.SIGKILL)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(kill_soon)
                with pytest.raises(BodyIncomplete, match=r"connection closed after \d+ of 8388608"):
                    async with client.request("GET", f"{nginx.url}/f.bin") as r:
                        await r.splice_to(fd, 0)
        finally:
            os.close(fd)
    finally:
        nginx.stop()


@pytest.mark.parametrize("mode", ["read", "splice"])
@pytest.mark.parametrize("reset", [False, True])
async def test_short_body_and_reset_from_a_raw_server(reset: bool, mode: str, tmp_path: Path):
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]

    async def serve_once() -> None:
        conn, _ = await listener.accept()
        await conn.recv(65536)
        await conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n" + b"x" * 1000)
        if reset:
            conn.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
        conn.close()

    client = HTTPClient()
    fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_once)
            with pytest.raises(BodyIncomplete) as info:
                async with client.request("GET", f"http://127.0.0.1:{port}/") as r:
                    if mode == "read":
                        await r.read()
                    else:
                        await r.splice_to(fd, 0)
    finally:
        os.close(fd)
    # every path says how far the body got, and whether it was closed or reset
    how = "broken" if reset else "closed"
    assert re.search(rf"connection {how} after \d+ of 100000 body bytes", str(info.value)), (
        info.value
    )
    listener.close()


@contextlib.asynccontextmanager
async def scripted_server(*scripts: list[bytes | None]) -> AsyncIterator[tuple[str, list[bytes]]]:
    """A raw server: its i-th connection answers its requests with scripts[i] in order
    (None: read the request, then close without answering), then stays open.
    Yields (base URL, the requests received)."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    seen: list[bytes] = []

    async def one(conn: trio.socket.SocketType, answers: list[bytes | None]) -> None:
        with conn:
            for answer in answers:
                seen.append(await conn.recv(65536))
                if answer is None:
                    return
                await conn.send(answer)
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:

        async def accept_all() -> None:
            for answers in scripts:
                conn, _ = await listener.accept()
                nursery.start_soon(one, conn, answers)

        nursery.start_soon(accept_all)
        try:
            yield f"http://127.0.0.1:{port}", seen
        finally:
            nursery.cancel_scope.cancel()
            listener.close()


OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"


async def _get_ok(client: HTTPClient, url: str, method: str = "GET") -> None:
    async with client.request(method, url) as r:
        assert r.status == 200 and await r.read() == b"ok"


async def test_stale_pooled_connection_retried_for_idempotent_methods(connects: list[str]):
    # the pooled connection is closed by the server after it read the second request
    async with scripted_server([OK, None], [OK]) as (base, seen):
        client = HTTPClient()
        await _get_ok(client, f"{base}/a")
        await _get_ok(client, f"{base}/b")  # retried on a fresh connection
    assert [r.split(b" ")[:2] for r in seen] == [[b"GET", b"/a"], [b"GET", b"/b"], [b"GET", b"/b"]]
    assert len(connects) == 2


async def test_stale_pooled_connection_not_retried_for_post(connects: list[str]):
    async with scripted_server([OK, None], [OK]) as (base, seen):
        client = HTTPClient()
        await _get_ok(client, f"{base}/a")
        # the server may have acted on it before closing: resending could do it twice
        with pytest.raises(BadResponse, match="POST is not idempotent"):
            await _get_ok(client, f"{base}/b", "POST")
    assert [r.split(b" ")[0] for r in seen] == [b"GET", b"POST"]
    assert len(connects) == 1


async def test_http10_responses_pooled_only_with_keep_alive(connects: list[str]):
    plain = b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok"
    keep = b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\nok"
    async with scripted_server([plain], [keep, keep]) as (base, _):
        client = HTTPClient()
        await _get_ok(client, f"{base}/a")
        assert not any(client._idle.values())
        await _get_ok(client, f"{base}/b")
        await _get_ok(client, f"{base}/c")
        assert sum(len(v) for v in client._idle.values()) == 1
        await client.aclose()
    assert len(connects) == 2


async def test_read_timeout(autojump_clock: trio.abc.Clock):
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    client = HTTPClient(read_timeout=5)

    async def stall() -> None:
        conn, _ = await listener.accept()
        await conn.recv(65536)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stall)
        with pytest.raises(HTTPTimeout, match="no response within 5"):
            async with client.request("GET", f"http://127.0.0.1:{port}/"):
                pass
        nursery.cancel_scope.cancel()
    listener.close()


async def test_https_origin_verified_against_its_ca(tmp_path: Path):
    import ssl

    from dragonfly.testing.certs import make_pki

    pki = make_pki(tmp_path / "pki")
    root = tmp_path / "www"
    root.mkdir()
    data = os.urandom(3 * 1024 * 1024 + 1)
    (root / "f.bin").write_bytes(data)
    nginx = Nginx(root=root, workdir=tmp_path / "nginx", tls=(pki.server_cert, pki.server_key))
    nginx.start()
    try:
        trusted = HTTPClient(ssl_context=ssl.create_default_context(cafile=str(pki.ca_cert)))
        fd = os.open(tmp_path / "out", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            async with trusted.request("GET", f"{nginx.url}/f.bin") as r:
                assert r.status == 200
                await r.splice_to(fd, 0)  # no raw socket under TLS: buffered path
            assert os.pread(fd, len(data) + 1, 0) == data
        finally:
            os.close(fd)
        async with trusted.request("GET", f"{nginx.url}/f.bin", [("Range", "bytes=-5")]) as r:
            assert await r.read() == data[-5:]
        await trusted.aclose()
        # the system store does not know the test CA: a clear connect error
        with pytest.raises(ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            async with HTTPClient().request("GET", f"{nginx.url}/f.bin"):
                pass
    finally:
        nginx.stop()


async def test_idle_connections_are_bounded_over_every_origin(origin: Origin):
    """A client of many hosts keeps at most max_idle idle connections in all."""
    client = HTTPClient(max_idle_per_origin=2, max_idle=3)
    hosts = ["127.0.0.1", "localhost", "127.1"]  # three origins, one nginx
    try:
        for host in hosts:
            url = origin.url("small.bin").replace("127.0.0.1", host)
            async with trio.open_nursery() as nursery:
                for _ in range(2):  # two at once: two connections to each host
                    nursery.start_soon(_get, client, url)
        assert sum(len(conns) for conns in client._idle.values()) == 3
    finally:
        await client.aclose()


async def _get(client: HTTPClient, url: str) -> None:
    async with client.request("GET", url) as r:
        await r.read()
