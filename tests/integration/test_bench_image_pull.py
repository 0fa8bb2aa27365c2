"""Smoke test of `python -m benchmarks image_pull`: correctness only, never timings."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench_support import run_benchmark

pytestmark = [pytest.mark.registry, pytest.mark.slow]

SCENARIOS = {"registry direct", "pull-through cache", "dragonfly mirror"}


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention `text` (e.g. a work directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


def test_image_pull_smoke(tmp_path: Path) -> None:
    # 9 MiB in 2 layers: each layer spans two 4 MiB pieces, so P2P moves pieces.
    result = run_benchmark(
        tmp_path, "image_pull", "--size", "9MiB", "--layers", "2", "--clients", "2", timeout=240
    )
    assert result["clients"] == 2 and len(result["layers"]) == 2
    assert set(result["scenarios"]) == SCENARIOS
    image = result["image_bytes"]
    for r in result["scenarios"].values():
        assert len(r["seconds"]) == 2 and r["max_seconds"] >= r["median_seconds"] > 0
    # every client's layers were checked by the benchmark; the registry's counts add up
    assert result["scenarios"]["registry direct"]["registry_bytes"] == 2 * image
    assert result["scenarios"]["pull-through cache"]["registry_bytes"] >= image
    assert result["scenarios"]["dragonfly mirror"]["registry_bytes"] <= image + 64
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
