"""swarm's race: the run's caps and bound, one contender's run and its results, the
barrier that starts every client at once, and the CPU and link figures taken around it.
Part of `python -m benchmarks swarm`.
"""

from __future__ import annotations

import os
import shlex
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.swarm_nodes import Env, Procs
from dragonfly.sim.bound import fluid_bound


@dataclass(frozen=True)
class Caps:
    """The run's parameters; rates in bytes/s of file payload."""

    size: int
    origin_up: int
    peer_up: int
    peer_down: int | None
    seed_peers: int

    def bound(self, contender: str, peers: int) -> float:
        """The contender's own lower bound (its uploaders differ)."""
        if contender == "direct":  # nobody but the origin uploads
            return fluid_bound(peers, self.size, self.origin_up, 0, self.peer_down)
        seeds = self.seed_peers if contender == "dragonfly" else 0
        return fluid_bound(
            peers, self.size, self.origin_up, self.peer_up, self.peer_down, seed_peers=seeds
        )


# ------------------------------------------------------------------------------- results


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return (0, 0)
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle, sum(fields[:8]))


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a live process has used; 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_during(run: Run, pids: dict[str, int], before: dict[str, float]) -> None:
    """Each node's CPU seconds since `before`: a node near T_all seconds was CPU-bound."""
    run.cpu_seconds = {n: round(proc_cpu(p) - before.get(n, 0.0), 2) for n, p in pids.items()}


@dataclass
class Snapshot:
    links: dict[str, tuple[int, int]] | None
    cpu: tuple[int, int]


@dataclass
class Run:
    """One contender at one N."""

    contender: str
    peers: int
    bound: float
    size: int
    peer_seconds: dict[str, float] = field(default_factory=dict)
    peer_sha256: dict[str, str] = field(default_factory=dict)  # what each client received
    origin_bytes: int | None = None
    error: str | None = None
    link_tx: dict[str, int] = field(default_factory=dict)
    link_rx: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    # Share of both cores busy during the race: near 1, the machine, not the caps, limited.
    cpu_busy: float | None = None
    cpu_seconds: dict[str, float] = field(default_factory=dict)  # per node, in the race

    @property
    def ok(self) -> bool:
        return self.error is None and len(self.peer_seconds) == self.peers

    @property
    def t_all(self) -> float | None:
        return max(self.peer_seconds.values()) if self.ok else None

    @property
    def efficiency(self) -> float | None:
        t = self.t_all
        return self.bound / t if t else None

    @property
    def origin_ratio(self) -> float | None:
        return self.origin_bytes / self.size if self.origin_bytes is not None else None

    def summary(self) -> dict[str, Any]:
        times = list(self.peer_seconds.values())
        return {
            "contender": self.contender,
            "peers": self.peers,
            "ok": self.ok,
            "error": self.error,
            "t_all": self.t_all,
            "bound": self.bound,
            "efficiency": self.efficiency,
            "origin_bytes": self.origin_bytes,
            "origin_ratio": self.origin_ratio,
            "p50": statistics.median(times) if times else None,
            "max": max(times) if times else None,
            "peer_seconds": self.peer_seconds,
            "peer_sha256": self.peer_sha256,
            "link_tx_bytes": self.link_tx,
            "link_rx_bytes": self.link_rx,
            "metrics": self.metrics,
            "cpu_busy": self.cpu_busy,
            "cpu_seconds": self.cpu_seconds,
        }


def race(
    env: Env,
    procs: Procs,
    clients: dict[str, list[str]],
    want: str,
    run: Run,
    timeout: float,
    logs: Path,
) -> None:
    """Start every client held at a barrier, release them all at once, and record when
    each one's output (the sha256 of what it received) ends. Each client is a bash
    script that says it is ready and waits for a line, so start-up is off the clock."""
    started: dict[str, subprocess.Popen[bytes]] = {}
    for peer, argv in clients.items():
        script = "echo ready; read go; set -o pipefail; " + shlex.join(argv) + " | sha256sum"
        started[peer] = procs.spawn(
            env.argv(peer, ["bash", "-c", script]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
    barrier(started)
    outcome: dict[str, tuple[float, bytes, bytes, int]] = {}
    t0 = time.monotonic()

    def collect(peer: str, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None and proc.stderr is not None
        out = proc.stdout.read()
        done = time.monotonic() - t0
        err = proc.stderr.read()
        outcome[peer] = (done, out, err, proc.wait())

    release(started)
    threads = [
        threading.Thread(target=collect, args=(peer, proc), daemon=True)
        for peer, proc in started.items()
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        while t.is_alive() and time.monotonic() < deadline:
            t.join(0.5)  # short waits: a signal is handled at once
    late = [peer for peer in clients if peer not in outcome]
    for proc in started.values():
        procs.stop(proc, grace=1)
    for t in threads:
        t.join(5)
    errors = []
    for peer in clients:
        if peer in late or peer not in outcome:
            errors.append(f"{peer}: not done after {timeout:.0f}s")
            continue
        seconds, out, err, rc = outcome[peer]
        digest = out.split()[0].decode() if out.split() else ""
        run.peer_sha256[peer] = digest
        if rc != 0:
            errors.append(f"{peer}: client exit {rc}: {err.decode(errors='replace').strip()[:300]}")
        elif digest != want:
            errors.append(f"{peer}: sha256 {digest[:16]}… is not the origin's {want[:16]}…")
        else:
            run.peer_seconds[peer] = round(seconds, 3)
    if errors:
        run.error = "; ".join(errors)
        (logs / "errors.txt").write_text("\n".join(errors) + "\n")


def barrier(waiting: dict[str, subprocess.Popen[bytes]]) -> None:
    """Until every wrapper has printed "ready" (it is then blocked on its `read`)."""
    for name, proc in waiting.items():
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"{name}: the client wrapper exited ({proc.wait()})")


def release(waiting: dict[str, subprocess.Popen[bytes]]) -> None:
    """The start signal: one line to every wrapper, as close together as can be."""
    for proc in waiting.values():
        assert proc.stdin is not None
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
    for proc in waiting.values():
        assert proc.stdin is not None
        proc.stdin.close()
