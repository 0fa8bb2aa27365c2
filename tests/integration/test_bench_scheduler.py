"""Smoke test of `python -m benchmarks scheduler`: a short run, correctness only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(180)
def test_scheduler_benchmark_small_run(tmp_path: Path) -> None:
    env = dict(os.environ, DRAGONFLY_BENCH_RESULTS=str(tmp_path))
    cmd = [sys.executable, "-m", "benchmarks", "scheduler", "--hosts", "50", "--tasks", "5"]
    cmd += ["--duration", "2s", "--warmup", "1s", "--name", "smoke"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "smoke.json").read_text())
    assert (tmp_path / "smoke.png").stat().st_size > 0
    assert (tmp_path / "smoke_series.png").stat().st_size > 0
    assert result["problems"] == []
    assert result["connected_hosts"] == 54  # 50 hosts and 4 seed hosts said Hello
    load, sent, counted = (result["totals"][k] for k in ("load", "sent", "scheduler"))
    # Every registration had its first answer; the seeds went to the origin.
    assert result["unanswered"] == 0
    answers = load["candidate_answers"] + load["back_to_source_answers"]
    assert answers == load["registrations"] > 50
    assert load["triggers"] == load["seed_registrations"] == 5  # one trigger per task
    assert load["errors"] == load["unexpected"] == load["closed_by_scheduler"] == 0
    # What the scheduler counted is what the load sent; every download ran to the end.
    assert counted["registrations"] == sent["registrations"] == load["registrations"]
    assert counted["piece_reports"] == sent["pieces"] == load["pieces"]
    assert load["finished"] == load["registrations"]
    assert load["left"] == load["registrations"] - load["seed_registrations"]
    assert load["pieces"] == load["finished"] * result["config"]["pieces"]
    assert result["figures"]["registrations/s"] > 0
    assert result["window"]["latency_samples"] > 0
    # The scheduler and the load processes were stopped.
    assert result["scheduler_exit"] is not None
    for pid in [result["scheduler_pid"], *result["load_pids"]]:
        assert not Path(f"/proc/{pid}").exists()


def test_scheduler_core_benchmark_small_run(tmp_path: Path) -> None:
    """`--core`: the same closed loop against the sans-I/O core in one process."""
    env = dict(os.environ, DRAGONFLY_BENCH_RESULTS=str(tmp_path))
    cmd = [sys.executable, "-m", "benchmarks", "scheduler", "--core", "--codec", "--hosts", "50"]
    cmd += ["--tasks", "5", "--registrations", "600", "--name", "smoke"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "smoke_core.json").read_text())
    counters = result["counters"]
    # Every registration was answered, every piece reported counted.
    assert result["registrations_answered"] == counters["registrations"] >= 600
    assert counters["triggers"] == 5 and counters["errors"] == counters["bad_reports"] == 0
    assert counters["piece_reports"] == result["piece_reports"]
    assert result["registrations_per_cpu_second"] > 0
