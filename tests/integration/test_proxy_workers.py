"""proxy.workers: processes beside the daemon that answer local hits on the proxy port
(dragonfly/peer/proxy_worker.py).

Which process accepts a connection is the kernel's choice, so these tests decide it:
while the daemon is stopped (SIGSTOP) only a worker can accept. A worker serves what it
may from its own files then, and a request it hands over waits for the daemon and is
answered, on the same connection, once the daemon runs again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from dragonfly.cluster import Cluster, Node
from dragonfly.testing.nginx import Nginx
from dragonfly.testing.probe import metric
from tests.jobs_support import job_cluster
from tests.p2p_support import MiB, daemon_stopped, random_file, wait_for, worker_pids

pytestmark = [pytest.mark.nginx, pytest.mark.slow, pytest.mark.timeout(300)]

WORKERS = ["--set", "proxy.workers=1"]


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[Nginx]:
    root = tmp_path / "www"
    root.mkdir()
    random_file(root / "hit.bin", 300_000)
    random_file(root / "cold.bin", 2 * MiB + 3)
    with Nginx(root, tmp_path / "nginx") as nginx:
        yield nginx


def curl_args(proxy: str, *args: str, timeout: float = 60) -> list[str]:
    return ["curl", "-sS", "-f", "--max-time", str(timeout), "-x", proxy, *args]


def fetch(proxy: str, *args: str, timeout: float = 60) -> bytes:
    out = subprocess.run(curl_args(proxy, *args, timeout=timeout), capture_output=True)
    assert out.returncode == 0, out.stderr.decode(errors="replace")
    return out.stdout


def fetch_across_a_stop(node: Node, *args: str, proxied: bool = True) -> bytes:
    """Run curl while the daemon is stopped and let the daemon go on a second later:
    the connection is a worker's, and whatever it hands over the daemon answers.
    Not `proxied`: a request to the proxy port itself (origin-form)."""
    cmd = curl_args(node.info["proxy"], *args)
    if not proxied:
        cmd.remove("-x")
        cmd.remove(node.info["proxy"])
    with daemon_stopped(node):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(1.0)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode(errors="replace")
    return out


def test_a_worker_serves_local_hits_and_hands_the_rest_to_the_daemon(
    tmp_path: Path, origin: Nginx
) -> None:
    hit, cold = f"{origin.url}/hit.bin", f"{origin.url}/cold.bin"
    hit_bytes = (origin.root / "hit.bin").read_bytes()
    cold_bytes = (origin.root / "cold.bin").read_bytes()
    with Cluster(tmp_path / "c", schedulers=1, seed_peers=1, peers=1, extra=WORKERS) as cluster:
        peer = cluster.node("peer-0")
        proxy = peer.info["proxy"]
        (worker,) = wait_for(lambda: worker_pids(peer), "a proxy worker")
        assert fetch(proxy, hit) == hit_bytes  # the daemon's store now holds it
        # A worker asks the daemon about a task it has not seen (the daemon answers once
        # it runs again); after that it serves the task on its own, Range requests too.
        assert fetch_across_a_stop(peer, hit) == hit_bytes
        with daemon_stopped(peer):
            assert fetch(proxy, hit, timeout=10) == hit_bytes
            assert fetch(proxy, "-r", "1000-1999", hit, timeout=10) == hit_bytes[1000:2000]
        # One connection of a worker's: a hit (the worker), a task nobody holds yet (handed
        # over with the connection), a hit again (the daemon now, on that connection).
        both = fetch_across_a_stop(peer, hit, cold, hit)
        assert both == hit_bytes + cold_bytes + hit_bytes
        # A request with a body, and one to the daemon itself: the daemon's.
        out = subprocess.run(
            ["curl", "-sS", "-x", proxy, "-o", "/dev/null", "-w", "%{http_code}", "-d", "x=1", hit],
            capture_output=True,
            text=True,
        )
        assert out.stdout == "405"  # (nginx's answer to a POST: it reached the origin)
        assert fetch_across_a_stop(peer, f"{proxy}/healthy", proxied=False) == b"ok\n"
        assert worker_pids(peer) == [worker]

        # The worker's counts reach the daemon's /metrics, each request counted once:
        # 7 through P2P (4 by the worker), and one direct POST.
        def counted() -> bool:
            p2p = metric(peer.info["metrics"], "dragonfly_proxy_requests_total", 'mode="p2p"')
            return p2p == 7

        wait_for(counted, "the worker's counts in the daemon's metrics", timeout=10)
        by_worker = 'worker="0"'
        assert metric(peer.info["metrics"], "dragonfly_proxy_worker_requests_total", by_worker) == 4
        assert metric(peer.info["metrics"], "dragonfly_proxy_requests_total", 'mode="direct"') == 1


async def test_a_removed_task_is_not_served_and_a_dead_worker_is_replaced(
    tmp_path: Path, origin: Nginx
) -> None:
    hit = f"{origin.url}/hit.bin"
    hit_bytes = (origin.root / "hit.bin").read_bytes()
    async with job_cluster(tmp_path, peers=1, extra=WORKERS) as jc:
        peer = jc.cluster.node("peer-0")
        proxy = peer.info["proxy"]
        (worker,) = await trio.to_thread.run_sync(
            lambda: wait_for(lambda: worker_pids(peer), "a worker")
        )
        assert await trio.to_thread.run_sync(fetch, proxy, hit) == hit_bytes
        assert await trio.to_thread.run_sync(fetch_across_a_stop, peer, hit) == hit_bytes
        served = origin.served_bytes()

        deleted = await jc.run({"type": "delete_task", "args": {"url": hit}})
        assert deleted["state"] == "SUCCESS", deleted
        await trio.sleep(0.5)
        # The worker closed its file of the task: with the daemon stopped, it has nothing
        # to answer with (it asks the daemon, which answers once it runs: from the origin).
        with daemon_stopped(peer):
            quick = await trio.to_thread.run_sync(
                lambda: subprocess.run(curl_args(proxy, hit, timeout=3), capture_output=True)
            )
            assert quick.returncode == 28, quick  # (curl's timeout: no answer)
        assert await trio.to_thread.run_sync(fetch, proxy, hit) == hit_bytes
        assert origin.served_bytes() >= served + len(hit_bytes)  # (fetched again)

        os.kill(worker, signal.SIGKILL)
        # Meanwhile the daemon answers alone; a new worker comes within its backoff.
        assert await trio.to_thread.run_sync(fetch, proxy, hit) == hit_bytes

        def replaced() -> list[int]:
            return [p for p in worker_pids(peer) if p != worker]

        (successor,) = await trio.to_thread.run_sync(
            lambda: wait_for(replaced, "a new proxy worker", timeout=30)
        )
        assert await trio.to_thread.run_sync(fetch_across_a_stop, peer, hit) == hit_bytes
        with daemon_stopped(peer):
            got = await trio.to_thread.run_sync(lambda: fetch(proxy, hit, timeout=10))
        assert got == hit_bytes
        assert worker_pids(peer) == [successor]
