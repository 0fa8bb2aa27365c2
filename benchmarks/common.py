"""Helpers shared by benchmarks: test data, timing of commands, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

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


def timed(cmd: list[str]) -> float:
    """Wall time of a command; raises if it fails."""
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> str:
    return f"{os.cpu_count()} cores, {platform.machine()}, Python {sys.version.split()[0]}"


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
    name: str, series: dict[str, list[float]], *, xlabel: str, title: str, bound: float | None = None
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
    ax.set_ylabel("fraction of peers done")
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
