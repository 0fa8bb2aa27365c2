"""The h11 server: real curl against it, and malformed input over raw sockets."""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from dragonfly.wire.http_client import HTTPClient
from dragonfly.wire.http_server import Request, Responder, bound_port, send_file_response, serve


def _handler(files: Path):
    async def handler(request: Request, responder: Responder) -> None:
        path = request.target.split("?")[0]
        if path == "/echo":
            body = await request.read_body(limit=1 << 20)
            await responder.send(200, body)
        elif path == "/stream":
            await responder.start(200, [(b"content-type", b"text/plain")])  # chunked
            for i in range(5):
                await responder.write(f"line {i}\n".encode())
            await responder.finish()
        elif path == "/boom":
            raise RuntimeError("handler bug")
        elif path == "/half":
            await responder.start(200, [(b"content-length", b"100")])
            await responder.write(b"x" * 10)
            raise RuntimeError("failed after the headers")
        elif path == "/silent":
            return
        elif path.startswith("/files/"):
            fd = os.open(files / path.removeprefix("/files/"), os.O_RDONLY)
            try:
                size = os.fstat(fd).st_size
                await send_file_response(request, responder, fd, size)
            finally:
                os.close(fd)
        else:
            await responder.send(404, b"not found\n")

    return handler


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[str, bytes]]:
    data = os.urandom(5 * 1024 * 1024 + 3)
    (tmp_path / "f.bin").write_bytes(data)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(serve, _handler(tmp_path), "127.0.0.1", 0)
        yield f"http://127.0.0.1:{bound_port(listeners)}", data
        nursery.cancel_scope.cancel()


async def curl(*args: str) -> trio.CompletedProcess[bytes]:
    return await trio.run_process(["curl", "-sS", *args], capture_stdout=True, check=False)


async def test_curl_full_range_head_and_keepalive(server: tuple[str, bytes], tmp_path: Path):
    base, data = server
    out = tmp_path / "out.bin"
    r = await curl("-o", str(out), "-w", "%{http_code}", f"{base}/files/f.bin")
    assert r.stdout == b"200"
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()
    r = await curl("-r", "10-19", f"{base}/files/f.bin")
    assert r.stdout == data[10:20]
    r = await curl("-r", "-7", f"{base}/files/f.bin")
    assert r.stdout == data[-7:]
    r = await curl(
        "-o", "/dev/null", "-w", "%{http_code}", "-r", "99999999-", f"{base}/files/f.bin"
    )
    assert r.stdout == b"416"
    r = await curl("-I", f"{base}/files/f.bin")
    assert f"content-length: {len(data)}".encode() in r.stdout.lower()
    # two requests on one connection: one connect in total
    r = await curl(
        "-o",
        "/dev/null",
        "-o",
        "/dev/null",
        "-w",
        "%{num_connects}\n",
        f"{base}/files/f.bin",
        f"{base}/files/f.bin",
    )
    assert r.stdout.split() == [b"1", b"0"]


async def test_request_body_and_chunked_stream(server: tuple[str, bytes]):
    base, _ = server
    payload = os.urandom(200_000)
    client = HTTPClient()
    async with client.request("POST", f"{base}/echo", body=payload) as r:
        assert r.status == 200 and await r.read() == payload
    async with client.request("GET", f"{base}/stream") as r:
        assert r.headers.get("transfer-encoding") == "chunked"
        assert await r.read() == b"".join(f"line {i}\n".encode() for i in range(5))
    r2 = await curl("--data-binary", "hello", f"{base}/echo")
    assert r2.stdout == b"hello"
    await client.aclose()


async def test_handler_failures(server: tuple[str, bytes]):
    base, _ = server
    r = await curl("-o", "/dev/null", "-w", "%{http_code}", f"{base}/boom")
    assert r.stdout == b"500"
    r = await curl("-o", "/dev/null", "-w", "%{http_code}", f"{base}/silent")
    assert r.stdout == b"500"
    # failed after the headers: the connection is closed, curl sees a short body (exit 18)
    r = await curl("-o", "/dev/null", f"{base}/half")
    assert r.returncode == 18
    # the server is still fine
    r = await curl("-w", "%{http_code}", "-o", "/dev/null", f"{base}/nothing")
    assert r.stdout == b"404"


def _raw(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        (b"GARBAGE\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\n\r\n", b"400"),  # HTTP/1.1 without Host
        (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 200_000, b"431"),
    ],
)
async def test_malformed_requests_get_4xx(server: tuple[str, bytes], payload: bytes, status: bytes):
    base, _ = server
    port = int(base.rsplit(":", 1)[1])
    reply = await trio.to_thread.run_sync(_raw, port, payload)
    assert reply.split(b" ")[1] == status, reply[:200]
    r = await curl("-o", "/dev/null", "-w", "%{http_code}", f"{base}/nothing")
    assert r.stdout == b"404"


async def test_many_concurrent_downloads(server: tuple[str, bytes]):
    base, data = server
    want = hashlib.sha256(data).digest()
    results: list[bytes] = []

    async def one() -> None:
        client = HTTPClient()
        async with client.request("GET", f"{base}/files/f.bin") as r:
            buf = bytearray(r.content_length or 0)
            await r.readinto_exactly(buf)
            results.append(hashlib.sha256(buf).digest())
        await client.aclose()

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(one)
    assert results == [want] * 8
