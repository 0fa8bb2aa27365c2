"""proxy_throughput: one client through a peer's proxy against the same client direct.

One file (default 1 GiB) from nginx on loopback; every client is `curl -o FILE` on the
same disk. In each round, side by side:
  direct       curl straight from nginx (the reference)
  cold         through peer-0: the seed fetches from the origin, peer-0 from the seed
  remote hit   through peer-1 after peer-0 finished (P2P from a peer that has it)
  local hit    through peer-0 again (sendfile from its own task file)
Ratios are reference time / run time (1.0 = as fast as direct). Each round uses a new
task (a distinct query string), so "cold" is cold. Peak private memory (RssAnon: heap,
not mapped file pages) of every daemon is sampled throughout.

python -m benchmarks proxy_throughput [--size 1GiB] [--rounds 1]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.common import RESULTS, ensure_file, median, write_result
from dragonfly.cluster import Cluster
from dragonfly.testing.nginx import Nginx
from dragonfly.testing.probe import sha256_file
from dragonfly.units import human_bytes, parse_size

TARGETS = {"cold": 0.5, "remote hit": 0.6, "local hit": 0.9}
MEMORY_TARGET = 150 * 1024 * 1024


def rss_anon(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class MemorySampler(threading.Thread):
    """Peak RssAnon of some processes, sampled every 50 ms."""

    def __init__(self, pids: dict[str, int]) -> None:
        super().__init__(daemon=True)
        self.pids = pids
        self.peak = dict.fromkeys(pids, 0)
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], rss_anon(pid))
            time.sleep(0.05)


def timed_curl(out: Path, url: str, proxy: str | None = None) -> float:
    os.sync()  # no writeback of the last run under this one
    cmd = ["curl", "-sS", "-f", "-o", str(out)]
    if proxy:
        cmd += ["-x", proxy]
    start = time.perf_counter()
    subprocess.run([*cmd, url], check=True)
    elapsed = time.perf_counter() - start
    return elapsed


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks proxy_throughput")
    parser.add_argument("--size", default="1GiB")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args(argv)
    size = parse_size(args.size)
    work = RESULTS / "proxy_throughput"
    www = work / "www"
    src = ensure_file(www / "f.bin", size)
    want = sha256_file(src)
    out = work / "out.bin"
    runs: dict[str, list[float]] = {"direct": [], "cold": [], "remote hit": [], "local hit": []}
    with (
        Nginx(root=www, workdir=work / "nginx") as nginx,
        Cluster(work / "cluster", schedulers=1, seed_peers=1, peers=2) as cluster,
    ):
        pids = {n.name: n.info["pid"] for n in cluster.nodes}
        sampler = MemorySampler(pids)
        sampler.start()
        p0, p1 = cluster.node("peer-0").info["proxy"], cluster.node("peer-1").info["proxy"]
        try:
            for r in range(args.rounds):
                url = f"{nginx.url}/f.bin?round={r}-{time.time_ns()}"
                plan = [
                    ("direct", None),
                    ("cold", p0),
                    ("remote hit", p1),
                    ("local hit", p0),
                ]
                for name, proxy in plan:
                    runs[name].append(timed_curl(out, url, proxy))
                    if sha256_file(out) != want:
                        raise SystemExit(f"{name}: the downloaded bytes differ from the origin's")
                    out.unlink()
        finally:
            sampler.stopped.set()
            sampler.join()
    med = {k: median(v) for k, v in runs.items()}
    ratios = {k: med["direct"] / v for k, v in med.items() if k != "direct"}
    print(f"proxy_throughput: {human_bytes(size)}, {args.rounds} round(s), curl -o FILE each")
    print(f"{'run':<12}{'median s':>10}{'MB/s':>9}{'ratio':>8}{'target':>8}")
    for name, t in med.items():
        ratio = f"{ratios[name]:.2f}" if name in ratios else "1.00"
        target = f">= {TARGETS[name]}" if name in TARGETS else ""
        print(f"{name:<12}{t:>10.2f}{size / t / 1e6:>9.0f}{ratio:>8}{target:>9}")
    print("peak private memory (RssAnon) per daemon, target < 150 MiB:")
    for name, peak in sampler.peak.items():
        print(f"  {name:<14}{human_bytes(peak):>12}")
    path = write_result(
        "proxy_throughput",
        {
            "size": size,
            "rounds": args.rounds,
            "seconds": runs,
            "median_seconds": med,
            "ratios": ratios,
            "peak_rss_anon": sampler.peak,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
