"""Helpers shared by benchmarks: test data, timing of commands, a cluster in front of an
nginx origin with its memory sampled, result tables and files."""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dragonfly.cluster import Cluster
from dragonfly.testing.nginx import Nginx
from dragonfly.testing.probe import sha256_file
from dragonfly.units import human_bytes

# Smoke tests point this elsewhere so a test run never touches a real run's results.
RESULTS = Path(os.environ.get("DRAGONFLY_BENCH_RESULTS") or Path(__file__).parent / "results")


def ensure_file(path: Path, size: int) -> Path:
    """A file of `size` random bytes, made once and reused while its size is right."""
    if path.exists() and path.stat().st_size == size:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    chunk = 16 * 1024 * 1024
    with open(tmp, "wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n
    tmp.rename(path)
    return path


def timed(cmd: list[str], *, sync: bool = False) -> float:
    """Wall time of a command; raises if it fails.

    `sync` first writes back every dirty page, so the last run's writeback does not
    land on this one's clock."""
    if sync:
        os.sync()
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def curl_cmd(out: Path, url: str, proxy: str | None = None) -> list[str]:
    """curl writing the body to a file, through a proxy when given; fails on HTTP errors."""
    return ["curl", "-sS", "-f", "-o", str(out), *(["-x", proxy] if proxy else []), url]


def check_download(name: str, out: Path, want: str) -> str:
    """The sha256 of a finished download, which must be the origin's; the file is removed."""
    got = sha256_file(out)
    out.unlink()
    if got != want:
        raise SystemExit(f"{name}: the downloaded bytes differ from the origin's")
    return got


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> str:
    return f"{os.cpu_count()} cores, {platform.machine()}, Python {sys.version.split()[0]}"


def rss_anon(pid: int) -> int:
    """Private memory (heap, not mapped file pages) of a process, 0 once it is gone."""
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

    def stop(self) -> None:
        self.stopped.set()
        self.join()


MEMORY_TARGET = 100 * 1024 * 1024  # peak RssAnon per daemon (issue 15)


@dataclass
class ProxyRig:
    """nginx serving the test file and a local cluster in front of it, memory sampled."""

    nginx: Nginx
    cluster: Cluster
    sampler: MemorySampler

    def proxy(self, node: str) -> str:
        return str(self.cluster.node(node).info["proxy"])

    def pids(self) -> dict[str, int]:
        """Every process the rig started, so a caller can check they are gone."""
        assert self.nginx.process is not None
        return {"nginx": self.nginx.process.pid, **self.sampler.pids}


@contextmanager
def proxy_rig(work: Path, www: Path, peers: int, *, tls: bool = False) -> Iterator[ProxyRig]:
    """1 scheduler, 1 seed peer and `peers` peers under WORK/cluster, nginx serving WWW;
    with `tls`, TLS on the scheduler and upload ports (`cluster --tls`).

    The cluster's task files are removed afterwards (a 1 GiB run leaves several GiB of
    them); its logs stay for a look after a failure."""
    shutil.rmtree(work / "cluster", ignore_errors=True)
    try:
        with (
            Nginx(root=www, workdir=work / "nginx") as nginx,
            Cluster(work / "cluster", schedulers=1, seed_peers=1, peers=peers, tls=tls) as cluster,
        ):
            sampler = MemorySampler({n.name: n.info["pid"] for n in cluster.nodes})
            sampler.start()
            try:
                yield ProxyRig(nginx, cluster, sampler)
            finally:
                sampler.stop()
    finally:
        shutil.rmtree(work / "cluster" / "data", ignore_errors=True)


def print_memory(peak: dict[str, int]) -> None:
    print(f"peak private memory (RssAnon) per daemon, target < {human_bytes(MEMORY_TARGET)}:")
    for name, value in peak.items():
        print(f"  {name:<14}{human_bytes(value):>12}")


def print_ratios(
    title: str,
    median_seconds: dict[str, float],
    reference: str,
    targets: dict[str, float],
    size: int,
) -> dict[str, float]:
    """A table of contenders: median time, MB/s, reference time / time, target, pass/miss.

    Returns the ratios (the reference's is 1.0)."""
    ref = median_seconds[reference]
    ratios = {name: ref / t for name, t in median_seconds.items()}
    width = max(12, *(len(name) + 2 for name in median_seconds))
    print(title)
    print(f"{'contender':<{width}}{'median s':>10}{'MB/s':>9}{'ratio':>8}{'target':>10}{'':>6}")
    for name, t in median_seconds.items():
        target = f">= {targets[name]}" if name in targets else ""
        verdict = ("pass" if ratios[name] >= targets[name] else "MISS") if name in targets else ""
        print(
            f"{name:<{width}}{t:>10.2f}{size / t / 1e6:>9.0f}{ratios[name]:>8.2f}"
            f"{target:>10}{verdict:>6}"
        )
    return ratios


def write_result(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {
        "benchmark": name,
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        **payload,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (no display here, and none needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cdf(
    name: str,
    series: dict[str, list[float]],
    *,
    xlabel: str,
    title: str,
    bound: float | None = None,
    ylabel: str = "fraction of peers done",
) -> Path:
    """One step CDF per series (e.g. per-peer completion times), written to RESULTS/NAME.png.

    `bound`, if given, is drawn as a vertical line (the fluid lower bound)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, values in series.items():
        xs = sorted(values)
        if not xs:
            continue
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.step(xs, ys, where="post", label=f"{label} (n={len(xs)})")
    if bound is not None:
        ax.axvline(bound, color="grey", linestyle="--", label=f"lower bound {bound:.1f}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.02)
    ax.set_xlim(left=0)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(plt, fig, name)


def plot_bars(
    name: str, values: dict[str, float], *, ylabel: str, title: str, reference: float | None = None
) -> Path:
    """A bar per contender (e.g. seconds or ratios), written to RESULTS/NAME.png."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = list(values)
    bars = ax.bar(labels, [values[k] for k in labels], color="tab:blue")
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    if reference is not None:
        ax.axhline(reference, color="grey", linestyle="--")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.tick_params(axis="x", labelrotation=20)
    ax.grid(axis="y", alpha=0.3)
    return _save(plt, fig, name)


def _save(plt: Any, fig: Any, name: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def one_peer_cluster(work: Path, workers: int = 0) -> Cluster:
    """A scheduler, a seed peer and one peer running `workers` proxy workers, whose
    proxy the benchmark's clients use (load, small_requests)."""
    return Cluster(
        work / "cluster",
        schedulers=1,
        seed_peers=1,
        peers=1,
        overrides=[f"peer:proxy.workers={workers}"],
    )
