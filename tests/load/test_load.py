"""Under load every request ends (issue 16), in a small form that fits `make test`:
bursts of cold URLs 200 at a time, 500 local hits at a time, and a mix of ranges,
clients killed mid-body and uploads passed through; every request ends with the right
bytes or a clear error, none hangs (curl's --max-time), and the peer is left holding what
it held before: no download in progress, no file descriptor or socket more, memory near
its baseline. The large form is `python -m benchmarks load` (make bench)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from benchmarks.load import rig, run
from dragonfly.testing.probe import metric

pytestmark = [pytest.mark.slow, pytest.mark.nginx]

IDLE_TASK_FILES = 128  # the store keeps this many idle task files open (fast local hits)
POOLED = 8  # idle keep-alive connections the origin client keeps to one origin


@pytest.mark.parametrize("workers", [0, 1], ids=["daemon", "with-a-proxy-worker"])
def test_every_request_ends_and_nothing_is_left_behind(tmp_path: Path, workers: int):
    """With a proxy worker (proxy.workers), it takes some of the connections, serves
    their local hits and hands their cold URLs, ranges and uploads to the daemon."""
    args = argparse.Namespace(
        bursts=2,
        urls=200,
        concurrency=200,
        size=256 * 1024,
        hits=2000,
        hit_concurrency=500,
        max_time=60.0,
    )
    with rig(tmp_path, workers) as r:
        rounds, footprints = run(r, args)
        metrics = r.cluster.node("peer-0").info["metrics"]
        by_worker = metric(metrics, "dragonfly_proxy_worker_requests_total", 'worker="0"')
    for one in rounds:
        assert not one.failures, f"{one.line()}: {one.failures[:5]}"
        assert one.ok == one.count, one.line()
    (_, before), (_, after) = footprints
    assert after.tasks == 0, f"downloads left in progress: {after}"
    assert after.sockets <= before.sockets + POOLED, (before, after)
    assert after.fds - after.sockets <= before.fds - before.sockets + 2, (before, after)
    assert after.task_files <= IDLE_TASK_FILES, after
    assert after.rss_anon <= before.rss_anon + 32 * 2**20, (before, after)
    if workers:  # (the kernel gives it a share of the connections)
        assert by_worker > 0, "the proxy worker answered no local hit"
