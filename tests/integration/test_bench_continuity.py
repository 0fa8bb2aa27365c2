"""Smoke test of `python -m benchmarks continuity`: correctness only, never timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.nginx, pytest.mark.slow]


def test_continuity_smoke(tmp_path: Path) -> None:
    env = {**os.environ, "DRAGONFLY_BENCH_RESULTS": str(tmp_path)}
    cmd = [sys.executable, "-m", "benchmarks", "continuity", "--tasks", "20", "--check", "5"]
    cmd += ["--ride", "9MiB", "--origin-rate", "0"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads((tmp_path / "continuity.json").read_text())
    assert result["tasks"] == 20 and result["checked"] == 5 and not result["problems"]
    assert result["scheduler_restart_s"] > 0 and result["peer_restart_s"] > 0
    ride = result["ride_through"]
    assert set(ride["runs"]) == {"undisturbed", "scheduler restarted"}
    for case in ride["runs"].values():
        assert len(case["times"]) == 4 and case["origin_x"] <= 1.05
