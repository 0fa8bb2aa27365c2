"""Smoke tests of `python -m benchmarks image_pull`: correctness only, never timings.

On loopback (--registry-rate 0) and, where network namespaces work (root, iproute2),
with the registry behind a capped link; then nothing of a run is left: processes,
namespaces, the root end of the registry's veth."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks import netns
from dragonfly.peer.registry import PROOF_BYTES
from tests.bench_support import processes_mentioning, run_benchmark

pytestmark = [pytest.mark.registry, pytest.mark.slow]

SCENARIOS = {"registry direct", "pull-through cache", "dragonfly mirror"}
# 9 MiB in 2 layers: each layer spans two 4 MiB pieces, so P2P moves pieces.
SMALL = ["--size", "9MiB", "--layers", "2", "--clients", "2"]


def _needs_netns() -> None:
    reason = netns.unavailable()
    if reason:
        pytest.skip(f"network namespaces unavailable here: {reason}")


def root_links(run_id: str) -> list[str]:
    """Interfaces of the root namespace named after the run (the registry's veth end)."""
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if f"{run_id}-" in line]


def check_result(result: dict[str, Any], tmp_path: Path) -> None:
    assert result["clients"] == 2 and len(result["layers"]) == 2
    assert set(result["scenarios"]) == SCENARIOS
    image = result["image_bytes"]
    for r in result["scenarios"].values():
        assert len(r["seconds"]) == 2 and r["max_seconds"] >= r["median_seconds"] > 0
    # every client's layers were checked by the benchmark; the registry's counts add up
    assert result["scenarios"]["registry direct"]["registry_bytes"] == 2 * image
    assert result["scenarios"]["pull-through cache"]["registry_bytes"] >= image
    # once, but for the seed's 1-byte probe and each client's proof read, per blob
    slack = (len(result["layers"]) + 1) * (1 + 2 * PROOF_BYTES)
    assert result["scenarios"]["dragonfly mirror"]["registry_bytes"] <= image + slack
    assert result["ratios_max"]["registry direct"] == 1.0
    # every process is gone: both registries, every daemon, nothing runs from the work dir
    pids = result["pids"]
    assert {"registry", "pull-through cache", "scheduler-0", "seed-peer-0", "peer-1"} <= set(pids)
    for name, pid in pids.items():
        assert not Path(f"/proc/{pid}").exists(), f"{name} (pid {pid}) still runs"
    assert processes_mentioning(str(tmp_path)) == []
    # the bytes are removed (peers' task files, registry storage, clients' copies), logs kept
    work = tmp_path / "image_pull"
    assert not (work / "cluster" / "data").exists()
    assert not (work / "registry" / "storage").exists()
    assert not (work / "out").exists()
    assert (work / "cluster" / "logs").is_dir() and (work / "registry" / "registry.log").exists()


def test_image_pull_smoke(tmp_path: Path) -> None:
    result = run_benchmark(tmp_path, "image_pull", *SMALL, "--registry-rate", "0", timeout=240)
    assert result["mode"] == "loopback" and result["registry_rate"] == 0
    check_result(result, tmp_path)


def test_image_pull_capped_registry(tmp_path: Path) -> None:
    """The registry in its own namespace behind 50 MB/s: the same checks, and the link's
    own byte counter agrees with the registry's log; namespace and veth are gone."""
    _needs_netns()
    result = run_benchmark(tmp_path, "image_pull", *SMALL, "--registry-rate", "50MB/s", timeout=240)
    assert result["mode"] == "netns" and result["registry_rate"] == 50_000_000
    check_result(result, tmp_path)
    for name, r in result["scenarios"].items():
        # blob bodies plus headers and manifests crossed the capped link, nothing bypassed it
        assert r["registry_link_tx_bytes"] >= r["registry_bytes"], name
    assert netns.ours(result["run_id"]) == []
    assert root_links(result["run_id"]) == []


def test_image_pull_interrupted_leaves_nothing(tmp_path: Path) -> None:
    """Ctrl-C while the clients pull through the cap: exit 130, and every process,
    namespace and veth of the run is gone."""
    _needs_netns()
    env = {**os.environ, "DRAGONFLY_BENCH_RESULTS": str(tmp_path)}
    # 2 clients x 9 MiB at 2 MB/s: about 10 s of pulling to be caught in.
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks", "image_pull", *SMALL, "--registry-rate", "2MB/s"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    run_id = f"{netns.PREFIX}{proc.pid}"
    try:
        assert proc.stdout is not None
        seen = ""
        for line in proc.stdout:  # the first scenario has started its clients
            seen += line
            if line.startswith("registry direct: 2 clients"):
                break
        assert proc.poll() is None, seen
        inside = [p for ns in netns.ours(run_id) for p in netns.netns_pids(ns)]
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, seen + out
    assert "interrupted" in out
    assert inside, "the registry did not run inside the run's namespace"
    for pid in inside:
        assert not Path(f"/proc/{pid}").exists(), f"pid {pid} still runs"
    assert netns.ours(run_id) == []
    assert root_links(run_id) == []
    assert processes_mentioning(str(tmp_path)) == []
