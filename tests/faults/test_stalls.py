"""Nothing waits without bound (issue 16): a download whose only parent hangs.

The seed peer is stopped (SIGSTOP) once it has asked the origin for the file, so it holds
the task at the scheduler, is the peer's parent, and never sends a byte. The peer must not
wait for it for good: after download.stall_timeout without a piece, a digest or an
announcement it asks for other parents; as long again, it fetches from the origin itself.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from dragonfly.cluster import Cluster
from dragonfly.testing.nginx import Nginx
from tests.p2p_support import (
    MiB,
    curl,
    finish,
    metric,
    random_file,
    sha256_file,
    task_files,
    wait_for,
)

STALL = 2.0


def test_a_parent_that_hangs_is_left_for_the_origin(tmp_path: Path, www: Path):
    size = 16 * MiB
    want = random_file(www / "f.bin", size)
    with (
        Nginx(root=www, workdir=tmp_path / "nginx", limit_rate="2m") as origin,
        Cluster(
            tmp_path / "c",
            schedulers=1,
            seed_peers=1,
            peers=1,
            overrides=[f"peer:download.stall_timeout={STALL}s"],
        ) as cluster,
    ):
        seed, peer = cluster.node("seed-peer-0"), cluster.node("peer-0")
        assert seed.process is not None
        started = time.monotonic()
        client = curl(peer.info["proxy"], f"{origin.url}/f.bin", tmp_path / "o")
        # Once the seed has probed the origin (its ranges follow, at 2 MB/s each), freeze it.
        deadline = time.monotonic() + 30
        while "bytes=0-0" not in (
            origin.access_log.read_text() if origin.access_log.exists() else ""
        ):
            assert time.monotonic() < deadline, "the seed never asked the origin"
            time.sleep(0.01)
        seed.process.send_signal(signal.SIGSTOP)
        try:
            code, err = finish(client, timeout=120)
        finally:
            seed.process.send_signal(signal.SIGCONT)
        took = time.monotonic() - started
        assert code == 0, err
        assert sha256_file(tmp_path / "o") == want
        m = peer.info["metrics"]
        assert metric(m, "dragonfly_download_stalls_total", 'step="reschedule"') >= 1
        assert metric(m, "dragonfly_download_stalls_total", 'step="back_to_source"') == 1
        assert metric(m, "dragonfly_download_bytes_total", 'source="back_to_source"') >= size
        assert took > 2 * STALL  # it did wait for the parent first


def test_a_task_evicted_everywhere_is_fetched_again_without_a_stall(tmp_path: Path, www: Path):
    """The seed and the peer both evict the task (its TTL passes); the next request for it
    must not be sent to a parent that no longer holds it and then wait for the stall
    timeout: the hosts tell the scheduler what they evict, and it triggers the seed anew."""
    size = 2 * MiB
    want = random_file(www / "f.bin", size)
    with (
        Nginx(root=www, workdir=tmp_path / "nginx") as origin,
        Cluster(
            tmp_path / "c",
            schedulers=1,
            seed_peers=1,
            peers=1,
            overrides=[
                # Long enough that a stalled download fails this test's bound below.
                "peer:download.stall_timeout=120s",
                "storage.task_ttl=1s",
                "storage.gc_interval=200ms",
            ],
        ) as cluster,
    ):
        seed, peer = cluster.node("seed-peer-0"), cluster.node("peer-0")
        url = f"{origin.url}/f.bin"
        for round_ in range(2):
            code, err = finish(curl(peer.info["proxy"], url, tmp_path / f"o{round_}"), timeout=60)
            assert code == 0, err
            assert sha256_file(tmp_path / f"o{round_}") == want
            # Both hosts evict it once unused for the TTL.
            wait_for(
                lambda: (
                    not task_files(seed.info["data_dir"]) and not task_files(peer.info["data_dir"])
                ),
                "the task evicted on both hosts",
                timeout=30,
                every=0.1,
            )
        m = peer.info["metrics"]
        assert metric(m, "dragonfly_download_stalls_total", 'step="reschedule"') == 0
        # The seed fetched it again for the second round; the peer took it from the seed.
        assert metric(m, "dragonfly_download_bytes_total", 'source="back_to_source"') == 0
