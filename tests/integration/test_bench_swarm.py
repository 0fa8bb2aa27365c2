"""Smoke tests of `python -m benchmarks swarm`: correctness only, never timings.

Every contender's every peer got the origin's bytes, each bound is Kumar & Ross's
formula, and once the benchmark returns (or is interrupted) none of its processes,
namespaces or tmpfs directories is left."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks import netns
from benchmarks.bittorrent import bencode, make_torrent
from benchmarks.swarm import Caps
from dragonfly.testing.nginx import nginx_binary
from dragonfly.testing.probe import sha256_file

pytestmark = [pytest.mark.nginx]

MiB = 1024 * 1024
SIZE = 8 * MiB  # two 4 MiB pieces for dragonfly and BitTorrent alike
RATE = 20_000_000
PEERS = 3
ARGS = ["--peers", str(PEERS), "--size", "8MiB", "--origin-up", "20MB/s", "--peer-up", "20MB/s"]


def _needs_programs() -> None:
    missing = [p for p in ("curl", "aria2c", "opentracker") if shutil.which(p) is None]
    if nginx_binary() is None:
        missing.append("nginx")
    if missing:
        pytest.fail(f"not installed: {', '.join(missing)}; `make test` installs them")


def _needs_netns() -> None:
    reason = netns.unavailable()
    if reason:
        pytest.skip(f"network namespaces unavailable here: {reason}")


def start(results: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "DRAGONFLY_BENCH_RESULTS": str(results)}
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks", "swarm", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def cmdline(pid: int) -> bytes:
    """A process's command line; empty once it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def fluid(n: int, f: int, u_o: float, u_p: float, m: int) -> float:
    """Kumar & Ross, written out again: max(F/U_o, N·F / (U_o + (N+M)·U_p))."""
    return max(f / u_o, n * f / (u_o + (n + m) * u_p))


def leftovers(run_id: str, pids: list[int]) -> list[str]:
    """Anything of the run still there: namespaces, tmpfs dir, processes or their groups."""
    left = [f"namespace {n}" for n in netns.ours(run_id)]
    if Path("/dev/shm", run_id).exists():
        left.append(f"/dev/shm/{run_id}")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, pgid, ...
        state, pgid = fields[0], int(fields[2])
        mine = int(entry.name) in pids or pgid in pids or f"/dev/shm/{run_id}" in cmdline
        if mine and state != "Z":
            left.append(f"process {entry.name}: {cmdline[:200]}")
    return left


def check_result(results: Path, mode: str, result: str = "swarm") -> None:
    data: dict[str, Any] = json.loads((results / f"{result}.json").read_text())
    want = sha256_file(results / result / "www" / f"f-{SIZE}.bin")
    assert data["mode"] == mode and data["sha256"] == want and data["size"] == SIZE
    runs = {r["contender"]: r for r in data["runs"]}
    assert set(runs) == {"dragonfly", "direct", "bittorrent"}
    peers = {f"peer-{i}" for i in range(PEERS)}
    for name, r in runs.items():
        assert r["ok"], f"{name}: {r['error']}"
        # every peer's client received exactly the origin's bytes, and was timed
        assert r["peer_sha256"] == dict.fromkeys(peers, want), name
        assert set(r["peer_seconds"]) == peers and all(t > 0 for t in r["peer_seconds"].values())
        assert r["t_all"] == max(r["peer_seconds"].values())
        assert r["efficiency"] == pytest.approx(r["bound"] / r["t_all"])
        assert r["origin_bytes"] > 0
    # each contender against its own bound: dragonfly's seed peer uploads too, direct
    # has the origin alone, BitTorrent's leechers upload but there is no seed peer
    assert runs["dragonfly"]["bound"] == pytest.approx(fluid(PEERS, SIZE, RATE, RATE, 1))
    assert runs["direct"]["bound"] == pytest.approx(PEERS * SIZE / RATE)
    assert runs["bittorrent"]["bound"] == pytest.approx(fluid(PEERS, SIZE, RATE, RATE, 0))
    # the origin served direct's clients whole copies, one each
    assert runs["direct"]["origin_bytes"] == PEERS * SIZE
    assert (results / f"{result}-n{PEERS}.png").stat().st_size > 0
    left = leftovers(data["run_id"], data["pids"])
    assert left == [], left


def run_to_end(results: Path, *args: str) -> None:
    proc = start(results, *ARGS, *args)
    out, _ = proc.communicate(timeout=150)
    assert proc.returncode == 0, out
    assert "dragonfly" in out and "efficiency" in out.lower()


def test_swarm_netns(tmp_path: Path) -> None:
    _needs_netns()
    _needs_programs()
    run_to_end(tmp_path, "--mode", "netns")
    check_result(tmp_path, "netns")


def test_swarm_loopback(tmp_path: Path) -> None:
    _needs_programs()
    run_to_end(tmp_path, "--mode", "loopback")
    check_result(tmp_path, "loopback")


def test_swarm_lo_shaped(tmp_path: Path) -> None:
    """The lighter mode: one namespace, each node at its own loopback address, uploads
    capped by source address (benchmarks/lo_shaped.py); its namespace goes at the end."""
    _needs_netns()
    _needs_programs()
    run_to_end(tmp_path, "--mode", "lo-shaped")
    check_result(tmp_path, "lo-shaped", "swarm-lo-shaped")


def test_swarm_lo_shaped_refuses_download_caps(tmp_path: Path) -> None:
    _needs_netns()
    proc = start(tmp_path, *ARGS, "--mode", "lo-shaped", "--peer-down", "5MB/s")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "cannot cap downloads (--peer-down)" in out, out


def test_swarm_with_tls(tmp_path: Path) -> None:
    """`--tls`: dragonfly's run with TLS on its scheduler and upload ports, in namespaces
    (each node's certificate names its own address), its own results file."""
    _needs_netns()
    _needs_programs()
    run_to_end(tmp_path, "--mode", "netns", "--only", "dragonfly", "--tls")
    data: dict[str, Any] = json.loads((tmp_path / "swarm-tls.json").read_text())
    want = sha256_file(tmp_path / "swarm-tls" / "www" / f"f-{SIZE}.bin")
    assert data["tls"] is True and not (tmp_path / "swarm.json").exists()
    (run,) = data["runs"]
    assert run["ok"], run["error"]
    assert run["peer_sha256"] == {f"peer-{i}": want for i in range(PEERS)}
    # the metrics were read over https, and pieces moved between peers
    assert sum(m.get("p2p", 0) for m in run["metrics"].values()) >= PEERS * SIZE // 2
    assert (tmp_path / f"swarm-tls-n{PEERS}.png").stat().st_size > 0
    assert leftovers(data["run_id"], data["pids"]) == []


def test_swarm_interrupted_leaves_nothing(tmp_path: Path) -> None:
    """Ctrl-C in the middle of the dragonfly run: everything of the run goes away."""
    _needs_netns()
    _needs_programs()
    # Slow enough (64 MiB at 10 MB/s) to be caught in the middle.
    proc = start(tmp_path, "--peers", "2", "--size", "64MiB", "--only", "dragonfly")
    run_id = f"{netns.PREFIX}{proc.pid}"
    inside: list[int] = []
    deadline = time.monotonic() + 60
    # Wait until the clients run: curl processes inside the peers' namespaces.
    while time.monotonic() < deadline and proc.poll() is None:
        inside = [p for ns in netns.ours(run_id) for p in netns.netns_pids(ns)]
        if any(b"curl" in cmdline(p) for p in inside):
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0]
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "interrupted" in out
    assert inside, "no process ran inside the run's namespaces"
    left = leftovers(run_id, inside)
    assert left == [], left


def test_stale_namespaces_of_dead_runs_are_removed() -> None:
    _needs_netns()
    dead = subprocess.Popen(["true"])
    dead.wait()
    name = f"{netns.PREFIX}{dead.pid}-stale"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert name in netns.cleanup_stale()
        assert name not in netns.namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_bound_is_fluid_bound() -> None:
    caps = Caps(size=256 * MiB, origin_up=10**7, peer_up=10**7, peer_down=None, seed_peers=1)
    for n in (1, 8, 16, 100):
        assert caps.bound("dragonfly", n) == pytest.approx(fluid(n, 256 * MiB, 1e7, 1e7, 1))
        assert caps.bound("bittorrent", n) == pytest.approx(fluid(n, 256 * MiB, 1e7, 1e7, 0))
        assert caps.bound("direct", n) == pytest.approx(n * 256 * MiB / 1e7)
    slow_down = Caps(size=100, origin_up=1000, peer_up=1000, peer_down=10, seed_peers=1)
    assert slow_down.bound("dragonfly", 2) == pytest.approx(10.0)  # F/D dominates


def test_torrent_is_bencoded_with_its_info_hash(tmp_path: Path) -> None:
    assert bencode({"b": 1, "a": [b"x", "yz"]}) == b"d1:al1:x2:yze1:bi1ee"
    path = tmp_path / "f.bin"
    data = os.urandom(5 * MiB + 3)
    path.write_bytes(data)
    torrent, info_hash = make_torrent(path, "http://t/announce")
    pieces = b"".join(
        hashlib.sha1(data[i : i + 4 * MiB]).digest() for i in range(0, len(data), 4 * MiB)
    )
    info = bencode(
        {"length": len(data), "name": "f.bin", "piece length": 4 * MiB, "pieces": pieces}
    )
    assert info in torrent
    assert info_hash == hashlib.sha1(info).hexdigest()
