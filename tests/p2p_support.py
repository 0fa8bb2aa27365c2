"""Helpers for tests that run real clusters: metrics, hashing, curl through a proxy."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import urllib.request
from pathlib import Path

MiB = 1024 * 1024


def metric(url: str, name: str, labels: str = "") -> float:
    """One sample of a Prometheus text endpoint (0 when absent)."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    selector = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "")
    m = re.search("^" + selector + r" ([0-9.e+]+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def random_file(path: Path, size: int) -> str:
    """Write `size` random bytes; return their sha256."""
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = os.urandom(min(MiB, left))
            h.update(chunk)
            f.write(chunk)
            left -= len(chunk)
    return h.hexdigest()


def curl(proxy: str | None, url: str, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    cmd = ["curl", "-sS", "-f", "-o", str(out), *extra]
    if proxy:
        cmd += ["-x", proxy]
    return subprocess.Popen([*cmd, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen[bytes], timeout: float = 300) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err.decode(errors="replace")


def task_files(data_dir: str | Path) -> list[Path]:
    root = Path(data_dir) / "tasks"
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []
