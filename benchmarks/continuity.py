"""Continuity: how fast a restarted scheduler, and a restarted peer, make the cluster know
again what its hosts hold, against fetching it all again.

One nginx origin with TASKS small files (one piece each); a cluster of 1 scheduler, 1 seed
peer and 2 peers. In one run:

1. **reference**: peer-0 fetches every file once, cold (curl through its proxy, CONCURRENCY
   at a time): what a cluster that forgot everything would do again, and every file
   checked against its sha256. The seed and peer-0 then hold every task, attested.
2. **scheduler restart**: the scheduler is killed (SIGKILL) and started again; timed from
   the restart until it has taken every held task again (the seed's and peer-0's:
   dragonfly_scheduler_reannounced_total = 2 × TASKS), start-up included.
3. **peer restart**: peer-0 is killed and started again; timed until the scheduler has
   taken its TASKS tasks again (its store read at start-up included).
4. **check**: the seed is killed; peer-1 fetches a sample of the files, which only peer-0
   holds now: every one arrives with the right bytes and the origin serves nothing more.

Ratio = reference time / relearning time (how many times sooner the cluster knows its
holders again than it could fetch the files again).

Then **ride-through**, in a cluster of 1 scheduler, 1 seed peer and 4 peers: the 4 peers
fetch one RIDE file (origin capped at --origin-rate) at once, twice, each a new task: once
undisturbed (the reference), once with the scheduler killed (SIGKILL) as soon as every
peer holds a piece and started again a second later. Reported: the clients' completion
times and what the origin served, side by side.

    .venv/bin/python -m benchmarks continuity                  # 2,000 tasks
    .venv/bin/python -m benchmarks continuity --tasks 5000
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import curl_cmd, ensure_file, machine, write_result
from benchmarks.load import Rig, burst, make_files
from dragonfly.cluster import Cluster, Node
from dragonfly.testing.nginx import Nginx
from dragonfly.testing.probe import metric, sha256_file
from dragonfly.units import parse_size

FILE_SIZE = 16 * 1024
REANNOUNCED = "dragonfly_scheduler_reannounced_total"


def reannounced(cluster: Cluster) -> float:
    return metric(cluster.node("scheduler-0").info["metrics"], REANNOUNCED)


def wait_until(value: Callable[[], float], at_least: float, timeout: float, what: str) -> float:
    """Poll `value` until it reaches `at_least`; past `timeout`, stop the run naming `what`."""
    deadline = time.monotonic() + timeout
    while (now := value()) < at_least:
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: {now:.0f} of {at_least:.0f} after {timeout:g} s")
        time.sleep(0.02)
    return now


def wait_reannounced(cluster: Cluster, at_least: float, timeout: float) -> float:
    return wait_until(
        lambda: reannounced(cluster), at_least, timeout, "held tasks the scheduler took"
    )


def attested_count(node: Node) -> int:
    """Complete tasks this node keeps an attestation for."""
    import sqlite3

    db = Path(str(node.info["data_dir"])) / "metadata.db"
    with sqlite3.connect(db) as conn:
        (n,) = conn.execute(
            "SELECT COUNT(*) FROM tasks WHERE state = 'succeeded' AND attested != ''"
        ).fetchone()
    return int(n)


def wait_attested(node: Node, count: int, timeout: float) -> None:
    wait_until(lambda: attested_count(node), count, timeout, f"{node.name}'s attestations")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks continuity", description=__doc__)
    ap.add_argument("--tasks", type=int, default=2000, help="files held (default 2000)")
    ap.add_argument("--concurrency", type=int, default=16, help="curls at once (reference)")
    ap.add_argument("--check", type=int, default=50, help="files peer-1 fetches at the end")
    ap.add_argument("--ride", default="64MiB", help="the ride-through file (default 64MiB)")
    ap.add_argument("--origin-rate", default="10m", help="nginx limit_rate for it (10m)")
    ap.add_argument("--name", default="continuity", help="results file name")
    args = ap.parse_args(argv)
    if args.tasks < 1 or args.concurrency < 1 or not 0 <= args.check <= args.tasks:
        ap.error("--tasks and --concurrency must be ≥ 1, --check between 0 and --tasks")
    with tempfile.TemporaryDirectory(prefix="df-continuity-") as tmp:
        held = run(Path(tmp) / "held", args)
        ride = ride_through(Path(tmp) / "ride", args)
    result = {**held, "ride_through": ride, "machine": machine()}
    problems = [*held["problems"], *ride["problems"]]
    for p in problems:
        print(f"  PROBLEM: {p}")
    print(f"  results: {write_result(args.name, result)}")
    return 1 if problems else 0


def run(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    www = work / "www"
    www.mkdir(parents=True)
    files = make_files(www, "held", args.tasks, FILE_SIZE)
    with (
        Nginx(root=www, workdir=work / "nginx") as origin,
        Cluster(work / "cluster", schedulers=1, seed_peers=1, peers=2) as cluster,
    ):
        rig = Rig(cluster, origin, www, work)
        print(f"continuity: {args.tasks} tasks of {FILE_SIZE // 1024} KiB, {machine()}")
        ref = burst(rig, files, args.concurrency, 120, "reference")
        if ref.failures:
            raise SystemExit(f"reference fetch failed: {ref.failures[:3]}")
        peer0, peer1 = cluster.node("peer-0"), cluster.node("peer-1")
        wait_attested(peer0, args.tasks, 120)
        wait_attested(cluster.node("seed-peer-0"), args.tasks, 120)
        held = 2 * args.tasks  # the seed's and peer-0's

        cluster.kill("scheduler-0")
        started = time.monotonic()
        cluster.restart("scheduler-0")
        wait_reannounced(cluster, held, 300)
        sched_s = time.monotonic() - started

        before = reannounced(cluster)
        cluster.kill("peer-0")
        started = time.monotonic()
        cluster.restart("peer-0")
        wait_reannounced(cluster, before + args.tasks, 300)
        peer_s = time.monotonic() - started

        cluster.kill("seed-peer-0")
        served = origin.served_bytes("/")
        sample = dict(list(files.items())[: args.check])
        (work / "check").mkdir()
        through_1 = Rig(cluster, origin, www, work / "check", node=peer1.name)
        check = burst(through_1, sample, min(8, args.concurrency), 60, "check")
        extra = origin.served_bytes("/") - served
        problems = [*check.failures]
        if extra:
            problems.append(f"the origin served {extra} bytes more for held files")
    result = {
        "tasks": args.tasks,
        "file_size": FILE_SIZE,
        "reference_s": ref.wall,
        "scheduler_restart_s": sched_s,
        "peer_restart_s": peer_s,
        "scheduler_ratio": ref.wall / sched_s,
        "peer_ratio": ref.wall / peer_s,
        "checked": check.ok,
        "problems": problems,
    }
    rate = args.tasks / ref.wall
    print(f"  reference: fetched {args.tasks} files in {ref.wall:.2f} s ({rate:.0f}/s)")
    print(
        f"  scheduler restart: {held} held tasks known again in {sched_s:.2f} s "
        f"({held / sched_s:.0f}/s, start-up included): ratio {result['scheduler_ratio']:.1f}"
    )
    print(
        f"  peer restart: its {args.tasks} tasks known again in {peer_s:.2f} s "
        f"({args.tasks / peer_s:.0f}/s, start-up included): ratio {result['peer_ratio']:.1f}"
    )
    print(f"  check: {check.ok}/{len(sample)} fetched from peer-0 alone, origin +{extra} bytes")
    return result


def ride_through(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    www = work / "www"
    www.mkdir(parents=True)
    size = parse_size(args.ride)
    want = sha256_file(ensure_file(www / "ride.bin", size))
    runs: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    with (
        Nginx(root=www, workdir=work / "nginx", limit_rate=args.origin_rate) as origin,
        Cluster(work / "cluster", schedulers=1, seed_peers=1, peers=4) as cluster,
    ):
        peers = [cluster.node(f"peer-{i}") for i in range(4)]
        for case in ("undisturbed", "scheduler restarted"):
            url = f"{origin.url}/ride.bin?run={len(runs)}"
            served = origin.served_bytes("/ride.bin")
            out = work / f"out-{len(runs)}"
            out.mkdir()
            started = time.monotonic()
            procs = [
                subprocess.Popen(curl_cmd(out / p.name, url, str(p.info["proxy"]))) for p in peers
            ]
            if case != "undisturbed":
                for p in peers:
                    wait_metric(str(p.info["metrics"]), 'source="p2p"', 1, 120)
                cluster.kill("scheduler-0")
                time.sleep(1.0)
                cluster.restart("scheduler-0")
            times = []
            for p, proc in zip(peers, procs, strict=True):
                proc.wait(timeout=600)
                times.append(time.monotonic() - started)
                if proc.returncode != 0:
                    problems.append(f"{case}: {p.name}'s curl exit {proc.returncode}")
                elif sha256_file(out / p.name) != want:
                    problems.append(f"{case}: {p.name} got other bytes")
            origin_bytes = origin.served_bytes("/ride.bin") - served
            runs[case] = {"times": times, "origin_x": origin_bytes / size}
            print(
                f"  ride-through, {case}: clients done in {min(times):.2f}–{max(times):.2f} s, "
                f"origin served {origin_bytes / size:.3f} × the file"
            )
    return {"size": size, "origin_rate": args.origin_rate, "runs": runs, "problems": problems}


def wait_metric(url: str, labels: str, at_least: float, timeout: float) -> None:
    wait_until(
        lambda: metric(url, "dragonfly_download_bytes_total", labels), at_least, timeout, url
    )
