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


def test_throughput_with_tls_smoke(tmp_path: Path) -> None:
    """`--tls`: the same run with TLS on the scheduler and upload ports, its own results."""
    args = ("--size", "9MiB", "--rounds", "1", "--tls")
    result = run_benchmark(tmp_path, "proxy_throughput", *args, output="proxy_throughput-tls")
    want = sha256_file(tmp_path / "proxy_throughput-tls" / "www" / "f.bin")
    assert result["tls"] is True and result["sha256"] == want
    assert all(digests == [want] for digests in result["download_sha256"].values())
    assert "proxy remote hit" in result["download_sha256"]  # (pieces between peers)
    conf = (tmp_path / "proxy_throughput-tls" / "cluster" / "conf" / "peer-1.toml").read_text()
    assert "tls_cert = '/" in conf and "ca_file = '/" in conf  # a TLS cluster it was
    for name, pid in result["pids"].items():
        assert not Path(f"/proc/{pid}").exists(), f"{name} (pid {pid}) still runs"
    assert processes_mentioning(str(tmp_path)) == []
