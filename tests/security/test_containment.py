"""Issue 11, item 8: a failure in a background loop does not end the daemon.

Two real failures of the peer's metadata database under its GC and its store
flusher: another process holding the database's write lock ("database is
locked"), and a full disk ("database or disk is full", ENOSPC) on a small tmpfs.
The peer stays up, /healthy says it is degraded and why, the failures are counted,
and once the cause is gone it recovers by itself and GC does its work. And a
scheduler whose decision tick fails keeps serving the same way.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from dragonfly.cluster import Cluster, Node
from dragonfly.config import SchedulerConfig, load_config
from dragonfly.net.http_client import HTTPClient
from dragonfly.nursery.scheduler import SchedulerServer
from dragonfly.testing.nginx import Nginx
from dragonfly.testing.trust import LocalIssuer
from tests.p2p_support import curl_response, metric, random_file, task_files, wait_for

# GC often, and every task is expired three seconds after its last use.
FAST_GC = ["--set", "storage.gc_interval=200ms", "--set", "storage.task_ttl=3s"]


def _healthy(node: Node) -> tuple[int, str]:
    assert node.process is not None
    if node.process.poll() is not None:
        tail = node.log_path.read_text(errors="replace")[-1500:]
        pytest.fail(f"the peer exited ({node.process.returncode}):\n{tail}")
    status, _, body = curl_response(f"{node.info['upload']}/healthy")
    return status, body.decode(errors="replace")


def _fetch_one(node: Node, nginx: Nginx, www: Path) -> Path:
    """Download a file through the peer's proxy; returns its task file."""
    random_file(www / "f.bin", 1_000_000)
    status, _, body = curl_response(f"{nginx.url}/f.bin", "-x", node.info["proxy"])
    assert status == 200 and len(body) == 1_000_000
    (task,) = task_files(node.info["data_dir"])
    return task


def _degraded_and_recovered(node: Node, cause: str, loosen: contextlib.ExitStack) -> None:
    """While `cause` holds: the peer lives, says degraded naming the cause and counts the
    failures. After `loosen` closes: healthy again, and GC removed the expired task."""
    degraded = wait_for(
        lambda: (lambda s, b: b if s == 503 and cause in b else None)(*_healthy(node)),
        f"/healthy reporting {cause!r}",
    )
    # GC (deleting the expired task) or the store's flusher (recording its last use)
    assert degraded.startswith(("degraded: gc ", "degraded: store_flush ")), degraded
    assert node.process is not None and node.process.poll() is None  # alive
    failures = sum(
        metric(node.info["metrics"], "dragonfly_background_failures_total", f'loop="{loop}"')
        for loop in ("gc", "store_flush")
    )
    assert failures >= 1
    # the proxy still answers while the loop fails
    status, _, _ = curl_response(f"{node.info['proxy']}/metrics")
    assert status == 200
    loosen.close()
    # (within the retry backoff, at most a minute, of the loops that failed)
    wait_for(lambda: _healthy(node)[0] == 200, "/healthy back to 200 once the cause is gone", 180)
    wait_for(lambda: not task_files(node.info["data_dir"]), "GC removing the expired task", 180)
    assert node.process.poll() is None


@pytest.mark.nginx
@pytest.mark.slow
def test_database_locked_by_another_process(tmp_path: Path, www: Path, nginx: Nginx):
    with Cluster(tmp_path / "c", schedulers=1, seed_peers=0, peers=1, extra=FAST_GC) as cluster:
        peer = cluster.node("peer-0")
        db = Path(peer.info["data_dir"]) / "metadata.db"
        with contextlib.ExitStack() as lock:
            holder = sqlite3.connect(db, isolation_level=None, timeout=30)
            lock.callback(holder.close)
            task = _fetch_one(peer, nginx, www)
            # Take the write lock before the task expires: GC will want to delete it.
            holder.execute("BEGIN EXCLUSIVE")
            lock.callback(holder.rollback)
            assert task.exists()
            _degraded_and_recovered(peer, "database is locked", lock)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs where the cluster below puts peer-0's data, unmounted afterwards."""
    mount = tmp_path / "c" / "data" / "peer-0"
    mount.mkdir(parents=True)
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(path: Path) -> None:
    """Write zeros into `path` until the filesystem is full."""
    with open(path, "wb") as f:
        block = b"\0" * 65536
        try:
            while True:
                f.write(block)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    assert os.statvfs(path).f_bavail == 0


@pytest.mark.nginx
@pytest.mark.slow
def test_disk_full(tmp_path: Path, www: Path, nginx: Nginx, small_disk: Path):
    with Cluster(tmp_path / "c", schedulers=1, seed_peers=0, peers=1, extra=FAST_GC) as cluster:
        peer = cluster.node("peer-0")
        assert Path(peer.info["data_dir"]) == small_disk
        task = _fetch_one(peer, nginx, www)
        with contextlib.ExitStack() as full:
            filler = small_disk / "filler"
            full.callback(filler.unlink)
            _fill(filler)  # before the task expires: GC will want to delete it
            assert task.exists()
            _degraded_and_recovered(peer, "database or disk is full", full)


async def test_a_failing_scheduler_tick_does_not_end_the_scheduler(tmp_path: Path):
    secret = LocalIssuer(tmp_path / "trust").scheduler_overrides()
    cfg = load_config("scheduler", env={}, overrides=["server.port=0", *secret])
    assert isinstance(cfg, SchedulerConfig)
    server = SchedulerServer(cfg)
    client = HTTPClient(connect_timeout=5, read_timeout=5)

    async def healthy_becomes(status: int, timeout: float) -> bytes:
        """Poll /healthy until it answers `status`; its body."""
        with trio.fail_after(timeout):
            while True:
                async with client.request("GET", f"http://127.0.0.1:{server.port}/healthy") as r:
                    body = await r.read()
                    if r.status == status:
                        return body
                await trio.sleep(0.1)

    real = server.core.tick

    def broken(now: float) -> list[object]:
        raise RuntimeError("tick exploded")

    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        server.core.tick = broken  # type: ignore[method-assign]
        body = await healthy_becomes(503, 60)
        assert body.startswith(b"degraded: scheduler_tick failing") and b"tick exploded" in body
        metrics = server.metrics.render().decode()
        assert 'dragonfly_background_failures_total{loop="scheduler_tick"}' in metrics
        server.core.tick = real  # type: ignore[method-assign]
        await healthy_becomes(200, 120)  # within the backoff
        await client.aclose()
        nursery.cancel_scope.cancel()
