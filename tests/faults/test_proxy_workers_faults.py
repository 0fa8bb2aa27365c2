"""A daemon with proxy workers that dies: its workers go with it, so nothing is left
answering on its proxy port (a restarted daemon must be able to bind it again)."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import pytest

from dragonfly.cluster import Cluster
from tests.p2p_support import wait_for, worker_pids

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # (a zombie is gone for our purpose: it answers nothing)
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_the_workers_of_a_killed_daemon_exit(tmp_path: Path) -> None:
    extra = ["--set", "proxy.workers=2"]
    with Cluster(tmp_path / "c", schedulers=1, seed_peers=0, peers=1, extra=extra) as cluster:
        peer = cluster.node("peer-0")
        workers = wait_for(lambda: len(worker_pids(peer)) == 2 and worker_pids(peer), "2 workers")
        port = int(peer.info["proxy"].rsplit(":", 1)[1])
        assert peer.process is not None
        os.kill(peer.process.pid, signal.SIGKILL)
        peer.process.wait(timeout=30)
        wait_for(lambda: not any(_alive(w) for w in workers), "the workers' exit", timeout=15)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
