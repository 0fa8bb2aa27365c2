"""The h11 server: real curl against it, and malformed input over raw sockets."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
from structlog.testing import capture_logs

from dragonfly.net import http_server
from dragonfly.net.http_client import HTTPClient
from dragonfly.net.http_connection import ClientGone
from dragonfly.net.http_response import prepare_head, send_file_response
from dragonfly.net.http_server import (
    Handler,
    Request,
    Responder,
    bound_port,
    serve,
)
from dragonfly.wire.http_common import Headers


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
        elif path == "/ignore":  # answers without reading the request body
            await responder.send(200, b"ok\n")
        elif path == "/reject":  # an error answer without reading the request body
            await responder.send_error(413, "too large")
        elif path == "/sha":  # a body of any size, streamed
            digest = hashlib.sha256()
            async for chunk in request.iter_body():
                digest.update(chunk)
            await responder.send(200, digest.hexdigest().encode())
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


# -- robustness: malformed bodies, disconnects, stalls, Expect, lingering close -------------


@contextlib.asynccontextmanager
async def running(handler: Handler, **kwargs: Any) -> AsyncIterator[int]:
    """A server with its own handler and options; yields its port."""
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(lambda **kw: serve(handler, "127.0.0.1", 0, **kwargs, **kw))
        yield bound_port(listeners)
        nursery.cancel_scope.cancel()


def _send_then_read(port: int, payload: bytes, *, timeout: float = 10) -> bytes:
    """Send a whole request (with its body), then read the reply until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


async def _status_of(base: str, path: str = "/nothing") -> bytes:
    r = await curl("-o", "/dev/null", "-w", "%{http_code}", f"{base}{path}")
    return r.stdout


async def test_malformed_chunked_body_unread_by_handler(server: tuple[str, bytes]):
    """A bad chunk header found while draining the body used to escape to serve()'s
    nursery and stop the whole server."""
    base, _ = server
    port = int(base.rsplit(":", 1)[1])
    payload = b"POST /ignore HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nxx\r\n"
    with capture_logs() as logs:
        reply = await trio.to_thread.run_sync(_send_then_read, port, payload)
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:200]
    assert await _status_of(base) == b"404"
    # handled where it happens, not by serve()'s last-resort catch-all
    assert not [e for e in logs if e["event"] == "connection failed"]


async def test_a_failing_connection_does_not_stop_the_server(
    server: tuple[str, bytes], monkeypatch: pytest.MonkeyPatch
):
    base, _ = server
    real = http_server.serve_connection
    calls = 0

    async def flaky(stream: trio.SocketStream, handler: Handler, **kwargs: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug in connection handling")
        await real(stream, handler, **kwargs)

    monkeypatch.setattr(http_server, "serve_connection", flaky)
    r = await curl("-o", "/dev/null", "-w", "%{http_code}", f"{base}/nothing")
    assert r.stdout == b"000"  # that connection was dropped
    assert await _status_of(base) == b"404"
    assert calls == 2


class _Outcome:
    """What the file-serving test handler ended with."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.done = trio.Event()


def _recording_handler(outcome: _Outcome, fd: int, size: int) -> Handler:
    async def handler(request: Request, responder: Responder) -> None:
        try:
            if request.target == "/write":  # through send_all, not sendfile
                await responder.start(200, [(b"content-length", str(size).encode())])
                block = bytes(1 << 20)
                for _ in range(size >> 20):
                    await responder.write(block)
                await responder.finish()
            else:
                await send_file_response(request, responder, fd, size)
        except BaseException as exc:
            outcome.error = exc
            raise
        finally:
            outcome.done.set()

    return handler


@pytest.fixture
def sparse_file(tmp_path: Path) -> AsyncIterator[tuple[int, int]]:
    """(fd, size) of a 64 MiB file that takes no disk space: more than socket buffers hold."""
    size = 64 << 20
    path = tmp_path / "sparse.bin"
    with path.open("wb") as f:
        f.truncate(size)
    fd = os.open(path, os.O_RDONLY)
    yield fd, size
    os.close(fd)


async def test_client_reset_mid_sendfile_is_client_gone(sparse_file: tuple[int, int]):
    fd, size = sparse_file
    outcome = _Outcome()
    with capture_logs() as logs:
        async with running(_recording_handler(outcome, fd, size)) as port:
            with trio.socket.socket() as s:
                await s.connect(("127.0.0.1", port))
                await s.send(b"GET /f HTTP/1.1\r\nHost: x\r\n\r\n")
                assert (await s.recv(65536)).startswith(b"HTTP/1.1 200 ")
                # close with a RST: the server's next sendfile fails with ECONNRESET/EPIPE
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with trio.fail_after(10):
                await outcome.done.wait()
    assert isinstance(outcome.error, ClientGone), repr(outcome.error)
    assert not [e for e in logs if e["event"] == "handler failed"]


@pytest.mark.parametrize("target", ["/f", "/write"])
async def test_client_that_stops_reading_times_out(sparse_file: tuple[int, int], target: str):
    fd, size = sparse_file
    outcome = _Outcome()
    async with running(_recording_handler(outcome, fd, size), send_timeout=0.5) as port:
        with trio.socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await s.connect(("127.0.0.1", port))
            await s.send(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            start = trio.current_time()
            with trio.fail_after(15):
                await outcome.done.wait()  # never reading a byte
    assert isinstance(outcome.error, ClientGone), repr(outcome.error)
    assert "read nothing for 0.5s" in str(outcome.error)
    assert trio.current_time() - start < 10


async def test_client_that_stops_sending_the_body_times_out(server: tuple[str, bytes]):
    handler = _handler(Path("/nonexistent"))
    async with running(handler, body_timeout=0.5) as port:

        def stall() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
                return s.recv(65536)  # the server gives up and closes: b""

        start = trio.current_time()
        assert await trio.to_thread.run_sync(stall) == b""
        assert trio.current_time() - start < 8


async def test_expect_100_continue(server: tuple[str, bytes], tmp_path: Path):
    base, _ = server
    port = int(base.rsplit(":", 1)[1])
    body = os.urandom(3 << 20)

    def expecting(path: str) -> tuple[bytes, bytes]:
        """(first answer, everything after the body was sent or withheld)"""
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                f"Content-Length: {len(body)}\r\n\r\n".encode()
            )
            first = s.recv(65536)
            if first.startswith(b"HTTP/1.1 100 "):
                s.sendall(body)
            rest = []
            while chunk := s.recv(65536):
                rest.append(chunk)
                if path == "/sha" and b"\r\n\r\n" in b"".join(rest):
                    break
            return first, b"".join(rest)

    first, rest = await trio.to_thread.run_sync(expecting, "/sha")
    assert first == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert rest.startswith(b"HTTP/1.1 200 ")
    # the handler did not want the body: a final answer, then the connection closes
    # (the client never sent the body, so it cannot be drained)
    first, rest = await trio.to_thread.run_sync(expecting, "/ignore")
    assert first.startswith(b"HTTP/1.1 200 ")
    assert (first + rest).endswith(b"\r\n\r\nok\n")  # and then EOF: expecting() returned
    # curl would wait for the 100 for 30 s here before sending the body anyway
    (tmp_path / "body").write_bytes(body)
    r = await curl(
        "--max-time",
        "10",
        "--expect100-timeout",
        "30",
        "--data-binary",
        f"@{tmp_path / 'body'}",
        f"{base}/sha",
    )
    assert r.stdout == hashlib.sha256(body).hexdigest().encode()


@pytest.mark.parametrize(("path", "status"), [("/ignore", b"200"), ("/reject", b"413")])
async def test_unread_body_closes_lingeringly(server: tuple[str, bytes], path: str, status: bytes):
    """An answer sent before a large body was read, then the connection closes: closing
    at once would reset the connection under the client, still sending its body."""
    base, _ = server
    port = int(base.rsplit(":", 1)[1])
    body = bytes(8 << 20)  # over DRAIN_LIMIT, and more than socket buffers hold
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
    reply = await trio.to_thread.run_sync(_send_then_read, port, head.encode() + body)
    assert reply.split(b" ")[1] == status, reply[:200]
    assert await _status_of(base) == b"404"


async def test_a_client_pipelining_many_requests_lets_others_take_turns(tmp_path: Path):
    """A local hit's answer goes out without a trip through the event loop (head sent at
    once, sendfile with no checkpoint after a whole body), so a client that pipelines
    many requests would keep the loop to itself: the server checkpoints between
    pipelined requests, and another client's request is answered in the middle."""
    body = b"0123456789"
    (tmp_path / "small").write_bytes(body)
    fd = os.open(tmp_path / "small", os.O_RDONLY)
    head = prepare_head(200, Headers([(b"content-length", str(len(body)).encode())]))
    order: list[str] = []
    other_served = trio.Event()

    async def handler(request: Request, responder: Responder) -> None:
        order.append(request.target)
        if request.target == "/b":
            other_served.set()
        responder.start_prepared(head)
        await responder.sendfile(fd, 0, len(body))
        await responder.finish()

    burst = 200  # requests and answers both fit the sockets' buffers: no send waits
    try:
        async with running(handler) as port:
            a, b = trio.socket.socket(), trio.socket.socket()
            with a, b:
                await a.connect(("127.0.0.1", port))
                await b.connect(("127.0.0.1", port))
                await a.send(
                    b"".join(b"GET /a%d HTTP/1.1\r\nhost: x\r\n\r\n" % i for i in range(burst))
                )
                with trio.fail_after(10):
                    while not order:  # the server is into the burst
                        await trio.lowlevel.checkpoint()
                    await b.send(b"GET /b HTTP/1.1\r\nhost: x\r\n\r\n")
                    await other_served.wait()
    finally:
        os.close(fd)
    assert order.index("/b") < burst // 2, order.index("/b")


async def test_a_kept_alive_connection_idle_too_long_is_closed(nursery: trio.Nursery) -> None:
    """idle_timeout counts only between requests: a slow handler is not cut by it, a
    client silent for longer than it after a response is."""

    async def slow(request: Request, responder: Responder) -> None:
        await trio.sleep(0.3)  # longer than the idle timeout: not idle, working
        await responder.send(200, b"done\n")

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(
        lambda task_status: http_server.serve_listeners(
            slow, listeners, idle_timeout=0.2, task_status=task_status
        )
    )
    stream = await trio.open_tcp_stream("127.0.0.1", bound_port(listeners))
    request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    for _ in range(2):  # the second within the idle timeout: the same connection
        await stream.send_all(request)
        received = b""
        with trio.fail_after(5):
            while not received.endswith(b"done\n"):
                received += await stream.receive_some(1024)
        await trio.sleep(0.05)
    with trio.fail_after(5):
        assert await stream.receive_some(1024) == b""  # closed after 0.2 s of silence
    await stream.aclose()
