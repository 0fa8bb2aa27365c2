"""Running a benchmark from a smoke test, its results redirected to the test's directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def run_benchmark(
    results: Path, name: str, *args: str, timeout: float = 120, output: str | None = None
) -> dict[str, Any]:
    """`python -m benchmarks NAME ARGS` writing into RESULTS; its JSON (OUTPUT.json, by
    default NAME.json) once it succeeded.

    A child process, as `make bench` runs it: RESULTS is read when benchmarks.common is
    imported, and the benchmark's own processes must be gone when it returns."""
    env = {**os.environ, "DRAGONFLY_BENCH_RESULTS": str(results)}
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks", name, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    output = output or name
    assert (results / f"{output}.png").stat().st_size > 0
    result: dict[str, Any] = json.loads((results / f"{output}.json").read_text())
    return result


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention `text` (e.g. a work directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found
