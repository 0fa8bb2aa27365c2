"""Smoke test of `python -m benchmarks simulation`: what it writes and the bound it reports."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.simulation import RATE, cases
from dragonfly.sim import fluid_bound, piece_factor
from tests.bench_support import run_benchmark

MiB = 1 << 20
GiB = 1 << 30


def test_standard_cases() -> None:
    by_peers = {c.peers: c for c in cases([1000, 10000, 50], GiB, None, None)}
    assert by_peers[1000].piece_size == 4 * MiB and by_peers[1000].target_efficiency == 0.90
    assert by_peers[1000].budget == 360  # twice the 3 minutes
    assert by_peers[10000].piece_size == 16 * MiB and by_peers[10000].target_efficiency == 0.75
    assert by_peers[10000].budget == 1200
    assert by_peers[50].piece_size == 4 * MiB and by_peers[50].target_efficiency is None
    # another piece size is another case: no target claimed for it
    (other,) = cases([1000], GiB, 8 * MiB, 30.0)
    assert other.target_efficiency is None and other.budget == 30.0


def test_simulation_smoke(tmp_path: Path) -> None:
    result = run_benchmark(tmp_path, "simulation", "--peers", "50", "--size", "64MiB")
    (case,) = result["cases"]
    assert case["status"] == "ok", case
    assert (case["peers"], case["size"], case["piece_size"], case["pieces"]) == (
        50,
        64 * MiB,
        4 * MiB,
        16,
    )
    # the bound it reports is dragonfly.sim.bound's, and the simulation's own
    bound = fluid_bound(50, 64 * MiB, RATE, RATE, seed_peers=1)
    assert case["bound"] == pytest.approx(bound) and case["t_min"] == pytest.approx(bound)
    assert case["piece_factor"] == pytest.approx(piece_factor(50, 16))
    assert case["config"]["origin_up"] == case["config"]["peer_up"] == 10_000_000
    assert case["config"]["seed_peers"] == 1 and case["config"]["arrival"] == "burst"
    assert case["finished"] + case["failed"] <= 50
    assert 0 <= case["efficiency"] <= 1  # T_min is a lower bound on T_all
