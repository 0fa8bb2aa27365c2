"""`python -m dragonfly cluster`: a whole local cluster, each role its own process.

Every role runs on 127.0.0.1 with free ports and its own data directory and log
under WORKDIR. Once every role answers /healthy, WORKDIR/cluster.json is written
(atomically: write, then rename) for benchmarks and checks to read. The cluster
runs until SIGINT/SIGTERM, then every child is stopped and waited for.

Identity is on, as in any cluster: WORKDIR/trust holds the cluster secret (given to
the schedulers) and one credential per peer and seed peer, named after the node.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dragonfly.testing.nginx import free_port
from dragonfly.testing.trust import LocalIssuer

_START_ATTEMPTS = 3  # (see Cluster.start: a port race with other processes' connections)

READY_TIMEOUT = 60.0


class ClusterError(Exception):
    pass


@dataclass
class Node:
    name: str
    role: str
    args: list[str]
    log_path: Path
    health_url: str
    info: dict[str, Any] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None


@dataclass
class Cluster:
    """The processes of a local cluster (usable as a context manager in tests)."""

    workdir: Path
    schedulers: int = 1
    seed_peers: int = 1
    peers: int = 3
    extra: list[str] = field(default_factory=list)  # --set options for every peer
    nodes: list[Node] = field(default_factory=list)

    @property
    def issuer(self) -> LocalIssuer:
        """The cluster's secret, and credentials made from it (WORKDIR/trust)."""
        return LocalIssuer(self.workdir / "trust")

    def _plan(self) -> None:
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        issuer = self.issuer
        py = [sys.executable, "-m", "dragonfly"]
        addresses = []
        for i in range(self.schedulers):
            port = free_port()
            addresses.append(f"ws://127.0.0.1:{port}")
            self.nodes.append(
                Node(
                    f"scheduler-{i}",
                    "scheduler",
                    [
                        *py,
                        "--role",
                        "scheduler",
                        "--set",
                        f"server.port={port}",
                        "--set",
                        "log.format=json",
                        *(f"--set={item}" for item in issuer.scheduler_overrides()),
                    ],
                    logs / f"scheduler-{i}.log",
                    f"http://127.0.0.1:{port}/healthy",
                    {
                        "url": f"ws://127.0.0.1:{port}",
                        "metrics": f"http://127.0.0.1:{port}/metrics",
                    },
                )
            )
        sched = json.dumps(addresses)
        for kind, count in (("seed-peer", self.seed_peers), ("peer", self.peers)):
            for i in range(count):
                name = f"{kind}-{i}"
                proxy, upload = free_port(), free_port()
                data = self.workdir / "data" / name
                self.nodes.append(
                    Node(
                        name,
                        kind,
                        [
                            *py,
                            "--role",
                            kind,
                            "--set",
                            f"proxy.port={proxy}",
                            "--set",
                            f"upload.port={upload}",
                            "--set",
                            f"storage.data_dir={data}",
                            "--set",
                            f"scheduler.addresses={sched}",
                            "--set",
                            "log.format=json",
                            *(f"--set={item}" for item in issuer.peer_overrides(name, kind)),
                            *self.extra,
                        ],
                        logs / f"{name}.log",
                        f"http://127.0.0.1:{upload}/healthy",
                        {
                            "proxy": f"http://127.0.0.1:{proxy}",
                            "upload": f"http://127.0.0.1:{upload}",
                            "metrics": f"http://127.0.0.1:{upload}/metrics",
                            "data_dir": str(data),
                            "pid": 0,
                        },
                    )
                )

    def start(self) -> Cluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for attempt in range(_START_ATTEMPTS):
            self.nodes = []
            self._plan()
            try:
                for node in self.nodes:
                    with open(node.log_path, "ab") as log:
                        node.process = subprocess.Popen(
                            node.args,
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL,
                        )
                    node.info["pid"] = node.process.pid
                self._wait_healthy()
                self._write_json()
                return self
            except ClusterError as exc:
                self.stop()
                # A free port picked here can be taken by another process's outgoing
                # connection before the node binds it: pick new ports and start again.
                if "Address already in use" not in str(exc) or attempt + 1 == _START_ATTEMPTS:
                    raise
            except BaseException:
                self.stop()
                raise
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        pending = list(self.nodes)
        while pending:
            for node in list(pending):
                assert node.process is not None
                if node.process.poll() is not None:
                    tail = node.log_path.read_text(errors="replace")[-2000:]
                    raise ClusterError(
                        f"{node.name} exited with {node.process.returncode}:\n{tail}"
                    )
                try:
                    with urllib.request.urlopen(node.health_url, timeout=1) as r:
                        if r.status == 200:
                            pending.remove(node)
                except (urllib.error.URLError, OSError):
                    pass
            if pending and time.monotonic() > deadline:
                names = ", ".join(n.name for n in pending)
                raise ClusterError(f"not healthy after {READY_TIMEOUT}s: {names}")
            if pending:
                time.sleep(0.05)

    def description(self) -> dict[str, Any]:
        return {
            "manager": None,
            "schedulers": [n.info for n in self.nodes if n.role == "scheduler"],
            "seed_peers": [n.info for n in self.nodes if n.role == "seed-peer"],
            "peers": [n.info for n in self.nodes if n.role == "peer"],
        }

    def _write_json(self) -> None:
        path = self.workdir / "cluster.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.description(), indent=2) + "\n")
        os.replace(tmp, path)

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def stop(self) -> None:
        """SIGTERM every child, wait, SIGKILL what is left; by PID."""
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for node in self.nodes:
            if node.process is None:
                continue
            try:
                node.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait(timeout=5)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_cluster(workdir: Path, schedulers: int, seed_peers: int, peers: int) -> int:
    """The CLI command: start, report, wait for a signal, stop."""
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    cluster = Cluster(workdir, schedulers, seed_peers, peers)
    try:
        cluster.start()
    except ClusterError as exc:
        print(f"dragonfly cluster: {exc}", file=sys.stderr)
        return 1
    print(f"cluster ready: {workdir / 'cluster.json'}", flush=True)
    for node in cluster.nodes:
        where = node.info.get("proxy") or node.info.get("url")
        print(f"  {node.name:<14} pid {node.info['pid']:<8} {where}", flush=True)
    try:
        while not stop:
            for node in cluster.nodes:
                assert node.process is not None
                if node.process.poll() is not None:
                    print(
                        f"dragonfly cluster: {node.name} exited ({node.process.returncode})",
                        file=sys.stderr,
                    )
                    stop = True
            time.sleep(0.2)
    finally:
        cluster.stop()
    return 0
