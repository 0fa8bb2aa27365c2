"""Smoke test of `python -m benchmarks throughput`: correctness only, never timings."""

from __future__ import annotations

from pathlib import Path

import pytest

from dragonfly.testing.probe import sha256_file
from tests.bench_support import processes_mentioning, run_benchmark

pytestmark = [pytest.mark.nginx, pytest.mark.slow]

CONTENDERS = {
    "curl direct",
    "aria2c -x8 direct",
    "proxy cold",
    "proxy remote hit",
    "proxy local hit",
    "dragonfly get",
}


def test_throughput_smoke(tmp_path: Path) -> None:
    # 9 MiB: three 4 MiB pieces, so P2P moves more than one piece.
    result = run_benchmark(tmp_path, "throughput", "--size", "9MiB", "--rounds", "1")
    # every download's bytes were the origin's file, as the test itself hashes it
    want = sha256_file(tmp_path / "throughput" / "www" / "f.bin")
    assert result["sha256"] == want and result["size"] == 9 * 1024 * 1024
    assert set(result["download_sha256"]) == CONTENDERS
    assert all(digests == [want] for digests in result["download_sha256"].values())
    assert all(len(times) == 1 for times in result["seconds"].values())
    assert set(result["ratios"]) == CONTENDERS and result["ratios"]["curl direct"] == 1.0
    # every process is gone: nginx, every daemon, and nothing else runs from the work dir
    pids = result["pids"]
    assert {"nginx", "scheduler-0", "seed-peer-0", "peer-0", "peer-1", "peer-2"} <= set(pids)
    for name, pid in pids.items():
        assert not Path(f"/proc/{pid}").exists(), f"{name} (pid {pid}) still runs"
    assert processes_mentioning(str(tmp_path)) == []
    # the task files are removed (a 1 GiB run leaves GiBs), the logs kept
    assert not (tmp_path / "throughput" / "cluster" / "data").exists()
    assert (tmp_path / "throughput" / "cluster" / "logs").is_dir()
