"""Stopping the real programs tests and benchmarks start (nginx, docker-registry,
containerd, ...): each runs in its own session, so its process group is the program."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path


def stop_process_group(
    process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = 10.0
) -> None:
    """`sig` to the process group by PID, SIGKILL to what is left after `grace` seconds."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
    # Whatever of the group is left (the leader may be gone, a worker not).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)


def spawn_logged(
    argv: list[str],
    log_path: Path,
    *,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a program in a session of its own (so stop_process_group ends it and its
    workers), its output appended to `log_path`, no stdin."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            argv,
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            preexec_fn=preexec_fn,
        )


def child_pids(pid: int) -> list[int]:
    """The child processes of `pid`. Linux lists children per thread, and trio starts
    processes from a worker thread, so every thread's list is read."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # (a thread that just ended)
            children.extend(int(c) for c in (task / "children").read_text().split())
    return sorted(children)
