"""Helpers for tests that run real clusters: metrics, hashing, curl through a proxy."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import trio

from dragonfly.cluster import Cluster, Node
from dragonfly.testing.probe import metric, sha256_file
from dragonfly.testing.process import child_pids

T = TypeVar("T")

__all__ = [
    "MiB",
    "connect_through",
    "curl",
    "curl_response",
    "curl_sha256",
    "daemon_stopped",
    "finish",
    "metric",
    "random_file",
    "sha256_file",
    "task_files",
    "wait_for",
    "worker_pids",
]

MiB = 1024 * 1024


def random_file(path: Path, size: int) -> str:
    """Write `size` random bytes; return their sha256."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(MiB, left))
            h.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return h.hexdigest()


def curl(proxy: str | None, url: str, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    cmd = ["curl", "-sS", "-f", "-o", str(out), *extra]
    if proxy:
        cmd += ["-x", proxy]
    return subprocess.Popen([*cmd, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def curl_sha256(proxy: str, url: str) -> subprocess.Popen[bytes]:
    """curl through a proxy piped into sha256sum: the client keeps no copy (stdout: the hex)."""
    script = f"set -o pipefail; curl -sS -f -x {shlex.quote(proxy)} {shlex.quote(url)} | sha256sum"
    return subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen[bytes], timeout: float = 300) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err.decode(errors="replace")


def task_files(data_dir: str | Path) -> list[Path]:
    root = Path(data_dir) / "tasks"
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def curl_response(url: str, *args: str, timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
    """(status, headers lower-cased, body) of one curl request; status 0 when curl failed
    (no answer, or a body cut short)."""
    out = subprocess.run(
        ["curl", "-sS", "-D", "/dev/stderr", "--max-time", str(timeout), *args, url],
        capture_output=True,
        timeout=timeout + 30,
    )
    # The last header block: a 100 Continue or a proxy's CONNECT answer may come first.
    blocks = [b for b in out.stderr.decode(errors="replace").split("\r\n\r\n") if b.strip()]
    head = blocks[-1].split("\r\n") if blocks else [""]
    status = int(head[0].split()[1]) if head[0].startswith("HTTP/") else 0
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in head[1:]) if v}
    return (status if out.returncode == 0 else 0), headers, out.stdout


async def connect_through(
    port: int, target: str, after: bytes = b""
) -> tuple[trio.SocketStream, bytes]:
    """Send a CONNECT to the proxy on loopback PORT (and `after` in the same write);
    (stream, response head)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode() + after)
    head = b""
    with trio.fail_after(30):
        while b"\r\n\r\n" not in head:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            head += chunk
    return stream, head


def origin_story(cluster: Cluster) -> str:
    """Why the origin was asked more than once, from the nodes' logs: who was sent to the
    origin and why, seed triggers, stalls and lost schedulers (for an assertion message)."""
    marks = ("sent to the origin", "triggered", "stall", "scheduler lost", "back to source")
    lines = []
    for node in cluster.nodes:
        for line in node.log_path.read_text(errors="replace").splitlines():
            if any(m in line for m in marks):
                lines.append(f"{node.name}: {line[:300]}")
    return "\n".join(lines[-40:])


def wait_for(check: Callable[[], T], what: str, timeout: float = 60.0, every: float = 0.2) -> T:
    """Poll `check()` until it returns something true; fail naming `what` after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout}s")
        time.sleep(every)


def worker_pids(node: Node) -> list[int]:
    """The daemon's child processes (its proxy workers)."""
    assert node.process is not None
    return child_pids(node.process.pid)


@contextlib.contextmanager
def daemon_stopped(node: Node) -> Iterator[None]:
    """The daemon stopped (SIGSTOP): only its proxy workers accept and answer meanwhile."""
    assert node.process is not None
    os.kill(node.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(node.process.pid, signal.SIGCONT)
