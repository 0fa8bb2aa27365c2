"""Bounds on the websocket channels and the upload slots (issue #11, Bounds): a client
that sends garbage is disconnected after a budget of protocol errors and costs a
bounded amount of log; one that opens an announcement websocket and says nothing is
dropped; one that reads a piece slower than upload.min_rate gives its slot back."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest
import trio
import trio_websocket

from dragonfly.cluster import Cluster
from dragonfly.net.channel import ERROR_BUDGET, connect
from dragonfly.peer.scheduler_client import authenticate, scheduler_hello
from dragonfly.peer.upload import SUBSCRIBE_TIMEOUT
from dragonfly.testing.nginx import Nginx
from dragonfly.trust import new_nonce
from dragonfly.wire.codec import decode, encode
from dragonfly.wire.messages import Error
from tests.p2p_support import MiB, curl, finish, metric, random_file
from tests.security.support import hello, host_info, log_events, scheduler_url

pytestmark = [pytest.mark.nginx, pytest.mark.slow]

GARBAGE = 200


async def _send_garbage(ws: trio_websocket.WebSocketConnection) -> tuple[int, bool]:
    """GARBAGE bad frames; (the Errors answered, whether the other side closed)."""
    errors = 0
    with trio.move_on_after(30):
        try:
            for _ in range(GARBAGE):
                await ws.send_message(b"\xff\x00garbage")
            while True:
                if isinstance(decode(await ws.get_message()), Error):
                    errors += 1
        except trio_websocket.ConnectionClosed:
            return errors, True
    return errors, False


async def test_garbage_on_the_channels_ends_the_connection(tmp_path: Path) -> None:
    cluster = await trio.to_thread.run_sync(
        Cluster(tmp_path / "c", schedulers=1, seed_peers=0, peers=1).start
    )
    try:
        # A member on the scheduler's websocket.
        credential = cluster.issuer.credential("member-1", "peer")
        nonce = new_nonce()
        hello_ = scheduler_hello(host_info("member-1"), "peer", credential, nonce)
        async with connect(scheduler_url(cluster), hello_) as channel:
            await authenticate(channel, credential, nonce)
            errors, closed = await _send_garbage(channel.ws)
        assert closed and errors <= ERROR_BUDGET + 1, errors
        # Anyone on a peer's announcement websocket.
        announce = cluster.node("peer-0").info["upload"].replace("http", "ws") + "/v1/announce"
        async with trio_websocket.open_websocket_url(announce) as ws:
            await ws.send_message(encode(hello(None)))
            decode(await ws.get_message())  # its Hello
            errors, closed = await _send_garbage(ws)
        assert closed and errors <= ERROR_BUDGET + 1, errors
        # The log did not grow with every bad frame.
        lines = sum(
            len(log_events(node.log_path, "protocol error"))
            for node in (cluster.node("scheduler-0"), cluster.node("peer-0"))
        )
        assert lines < GARBAGE / 2, lines
    finally:
        await trio.to_thread.run_sync(cluster.stop)


async def test_a_silent_announcement_socket_is_dropped(tmp_path: Path) -> None:
    cluster = await trio.to_thread.run_sync(
        Cluster(tmp_path / "c", schedulers=1, seed_peers=0, peers=1).start
    )
    try:
        announce = cluster.node("peer-0").info["upload"].replace("http", "ws") + "/v1/announce"
        started = time.monotonic()
        closed = False
        with trio.move_on_after(SUBSCRIBE_TIMEOUT + 20):
            async with trio_websocket.open_websocket_url(announce) as ws:
                await ws.send_message(encode(hello(None)))
                try:
                    while True:
                        await ws.get_message()
                except trio_websocket.ConnectionClosed:
                    closed = True
        assert closed, f"still open after {time.monotonic() - started:.0f} s"
    finally:
        await trio.to_thread.run_sync(cluster.stop)


def _stalled_reader(upload: str, path: str, ticket: str) -> socket.socket:
    """A piece request from a client that then reads nothing (a tiny receive buffer)."""
    host, port = upload.removeprefix("http://").rsplit(":", 1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nX-Dragonfly-Ticket: {ticket}\r\n\r\n".encode()
    )
    return sock


def test_a_reader_below_the_minimum_rate_loses_its_upload_slot(
    tmp_path: Path, www: Path, nginx: Nginx
) -> None:
    random_file(www / "f.bin", 16 * MiB)
    extra = [
        "--set", "upload.min_rate=4MB/s", "--set", "upload.concurrent_limit=1",
        "--set", "upload.queue_limit=0",
    ]  # fmt: skip
    with Cluster(tmp_path / "c", schedulers=1, seed_peers=1, peers=1, extra=extra) as cluster:
        peer = cluster.node("peer-0")
        out = tmp_path / "out"
        code, err = finish(
            curl(peer.info["proxy"], f"{nginx.url}/f.bin", out, "-D", str(out) + ".h")
        )
        assert code == 0, err
        task = next(
            line.split(":", 1)[1].strip()
            for line in (tmp_path / "out.h").read_text().splitlines()
            if line.lower().startswith("x-dragonfly-task-id")
        )
        upload = peer.info["upload"]
        ticket = cluster.ticket_header(task, "peer-0")
        stalled = _stalled_reader(upload, f"/pieces/{task}/0", ticket)
        try:
            deadline = time.monotonic() + 60
            metrics = peer.info["metrics"]
            while metric(metrics, "dragonfly_errors_total", 'type="slow_reader"') < 1:
                assert time.monotonic() < deadline, "the stalled reader kept its slot"
                time.sleep(0.2)
            # Its one slot is free again: the next child is served, not told "busy".
            status = curl_status(f"{upload}/pieces/{task}/1", f"x-dragonfly-ticket: {ticket}")
            assert status == 200
        finally:
            stalled.close()


def curl_status(url: str, header: str) -> int:
    out = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", header, url],
        capture_output=True,
        timeout=60,
    )
    return int(out.stdout)
