"""swarm: N peers ask for the same file at the same moment; how close to the fluid bound?

Why about 1,000 lines: one measurement of three contenders (dragonfly, direct, BitTorrent)
in two modes (netns, loopback) under one set of caps and one bound; the parts they share
with other benchmarks are in benchmarks/common.py and benchmarks/netns.py.

One origin with its upload capped at U_o; N peers and M seed peers, each with its
upload capped at U_p (and its download at D, if given); every peer asks for the same
file of F bytes at the same moment and its client discards the bytes after hashing
them (`curl ... | sha256sum`), so the figure measures distribution, not the disk.

    T_all       time until every peer has the whole file, its sha256 verified
    bound       Kumar & Ross's minimum distribution time (dragonfly.sim.bound):
                T_min = max(F/U_o, F/D, N·F / (U_o + (N+M)·U_p))
    efficiency  T_min / T_all
    origin / F  bytes the origin served, in copies of the file

Three contenders in the same run, each against its own bound:
    dragonfly   scheduler, M seed peers, N peers; curl through each peer's proxy
    direct      N curls straight from the origin (bound N·F/U_o)
    bittorrent  opentracker and aria2c: the origin the only seeder (capped at U_o),
                N leechers (capped at U_p) that keep seeding until all are done;
                4 MiB pieces, tracker only (bound with M = 0)

Modes:
    netns       (default as root) every node in a network namespace of its own, on a
                bridge in a hub namespace; the caps are htb token buckets in the
                kernel, outside the code under test (benchmarks/netns.py)
    loopback    127.0.0.1 only: nginx `limit_rate` for the origin, dragonfly's own
                upload rate limit for the peers, aria2's for BitTorrent (approximate)

Dragonfly's peers are configured with upload.rate_limit = U_p (download.rate_limit = D),
as an operator sizes them, so the scheduler knows their rates; in netns mode the kernel
enforces the caps all the same (--no-app-limits: leave the peers' own limits unset).
--tls turns TLS on for dragonfly's scheduler and upload ports (results in swarm-tls.json).

python -m benchmarks swarm [--peers 8,16] [--size 256MiB] [--origin-up 10MB/s]
    [--peer-up 10MB/s] [--peer-down RATE] [--seed-peers 1] [--mode netns|loopback]
    [--only dragonfly,direct,bittorrent] [--no-app-limits] [--tls]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

from benchmarks import bittorrent, common, netns
from dragonfly.sim.bound import fluid_bound
from dragonfly.testing.cluster_tls import LocalTLS
from dragonfly.testing.nginx import Nginx, free_port, nginx_binary, wait_for_port
from dragonfly.testing.probe import sha256_file
from dragonfly.testing.process import stop_process_group
from dragonfly.testing.trust import LocalIssuer
from dragonfly.units import human_bytes, parse_rate, parse_size

T = TypeVar("T")

CONTENDERS = ("dragonfly", "direct", "bittorrent")
TARGET_EFFICIENCY = 0.85
TARGET_ORIGIN = 1.02
READY_TIMEOUT = 60.0
# Fixed ports inside namespaces (each node has its own stack); loopback picks free ones.
PORTS = {"origin": 80, "scheduler": 8002, "proxy": 65001, "upload": 65002}
TRACKER_PORT = 6969
BT_PORT = 6881
RPC_PORT = 6800


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


# ----------------------------------------------------------------------------- processes


class Procs:
    """Every process the benchmark starts: each leads a session of its own (a Ctrl-C at
    the terminal reaches only the benchmark, which then stops them in order), and is
    stopped by its process group id, which takes its children (curl | sha256sum, nginx
    workers, aria2's hooks) with it."""

    def __init__(self) -> None:
        self.live: list[subprocess.Popen[bytes]] = []
        self.pids: list[int] = []

    def spawn(
        self,
        argv: list[str],
        *,
        log: Path | None = None,
        stdin: int | None = subprocess.DEVNULL,
        stdout: int | None = None,
    ) -> subprocess.Popen[bytes]:
        out: IO[bytes] | int | None = stdout
        err: IO[bytes] | int | None = subprocess.PIPE if stdout == subprocess.PIPE else None
        handle = None
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            handle = open(log, "ab")  # noqa: SIM115 - handed to the child
            out = handle if stdout is None else stdout
            err = handle
        try:
            proc = subprocess.Popen(
                argv,
                stdin=stdin,
                stdout=out,
                stderr=err,
                start_new_session=True,
                preexec_fn=netns.die_with_parent,
            )
        finally:
            if handle is not None:
                handle.close()
        self.live.append(proc)
        self.pids.append(proc.pid)
        return proc

    def stop(
        self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = 8
    ) -> None:
        """`sig` to the process group, SIGKILL after `grace` seconds; then the group is gone."""
        stop_process_group(proc, sig, grace)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        if proc in self.live:
            self.live.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.live)):
            self.stop(proc, grace=3)


# ---------------------------------------------------------------------------- where nodes run


class Env:
    """Where the nodes of a run live: addresses, ports, how to start and reach them."""

    mode = ""

    def addr(self, node: str) -> str:
        raise NotImplementedError

    def port(self, kind: str) -> int:
        raise NotImplementedError

    def argv(self, node: str, argv: list[str]) -> list[str]:
        raise NotImplementedError

    def call(self, node: str, fn: Callable[[], T]) -> T:
        """Run `fn` where `node`'s sockets live (its namespace), for checks and scrapes."""
        raise NotImplementedError

    def link_bytes(self) -> dict[str, tuple[int, int]] | None:
        """(tx, rx) wire bytes per node so far, where links are real (netns)."""
        return None

    @property
    def listen_any(self) -> str:
        raise NotImplementedError


class NetnsEnv(Env):
    mode = "netns"

    def __init__(self, topo: netns.Topology) -> None:
        self.topo = topo

    def addr(self, node: str) -> str:
        return self.topo.nodes[node].addr

    def port(self, kind: str) -> int:
        return PORTS[kind]

    def argv(self, node: str, argv: list[str]) -> list[str]:
        return self.topo.exec_argv(node, argv)

    def call(self, node: str, fn: Callable[[], T]) -> T:
        return netns.run_in_netns(self.topo.nodes[node].ns, fn)

    def link_bytes(self) -> dict[str, tuple[int, int]] | None:
        return self.topo.all_link_bytes()

    @property
    def listen_any(self) -> str:
        return "0.0.0.0"


class LoopbackEnv(Env):
    mode = "loopback"

    def addr(self, node: str) -> str:
        return "127.0.0.1"

    def port(self, kind: str) -> int:
        return free_port()

    def argv(self, node: str, argv: list[str]) -> list[str]:
        return argv

    def call(self, node: str, fn: Callable[[], T]) -> T:
        return fn()

    @property
    def listen_any(self) -> str:
        return "127.0.0.1"


def http_get(
    env: Env, node: str, url: str, timeout: float = 5, context: ssl.SSLContext | None = None
) -> bytes:
    def get() -> bytes:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as r:
            return bytes(r.read())

    return env.call(node, get)


def wait_ready(
    env: Env, node: str, check: Callable[[], object], proc: subprocess.Popen[bytes], log: Path
) -> None:
    """Until `check` (run in node's namespace) succeeds; fails early if `proc` exits."""
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{node} exited with {proc.returncode}:\n{tail}")
        try:
            env.call(node, check)
            return
        except (OSError, urllib.error.URLError, TimeoutError, ValueError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{node} not ready after {READY_TIMEOUT}s; see {log}") from None
            time.sleep(0.1)


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


# ------------------------------------------------------------------------------- the origin


@dataclass
class NsNginx(Nginx):
    """The origin nginx started through `env` (inside the origin's namespace in netns
    mode), at a fixed address and port, and checked from there."""

    env: Env | None = None

    def start(self) -> NsNginx:
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("nginx is not installed (apt-get install nginx)")
        assert self.env is not None
        env = self.env
        self.workdir.mkdir(parents=True, exist_ok=True)
        conf = self.workdir / "nginx.conf"
        conf.write_text(self._config())
        err = self.workdir / "error.log"
        log = open(self.workdir / "stderr.log", "ab")  # noqa: SIM115 - owned by the process
        self.process = subprocess.Popen(
            env.argv("origin", [binary, "-c", str(conf), "-p", str(self.workdir), "-e", str(err)]),
            stdout=log,
            stderr=log,
            start_new_session=True,
            preexec_fn=netns.die_with_parent,
        )
        log.close()
        host, port = self.host, self.port
        try:
            wait_ready(env, "origin", lambda: wait_for_port(host, port, 0.5), self.process, err)
        except BaseException:
            self.stop()
            raise
        return self


def start_origin(env: Env, procs: Procs, root: Path, workdir: Path, limit_rate: int) -> Nginx:
    """nginx serving `root` from the origin node; `limit_rate` (bytes/s per connection)
    only in loopback mode, where no kernel bucket caps the origin."""
    nginx = NsNginx(
        root=root,
        workdir=workdir,
        host=env.addr("origin"),
        port=env.port("origin"),
        limit_rate=str(limit_rate) if limit_rate else "",
        env=env,
    ).start()
    if nginx.process is not None:
        procs.pids.append(nginx.process.pid)
    return nginx


# ------------------------------------------------------------------------------- contenders


@dataclass
class Bench:
    env: Env
    procs: Procs
    caps: Caps
    src: Path
    want: str
    shm: Path  # tmpfs for node data: the disk stays out of the figure
    logs: Path
    app_limits: bool = True
    tls: bool = False  # TLS on dragonfly's scheduler and upload ports
    _tls_client: ssl.SSLContext | None = None  # verifies them (the run's CA)

    def fresh_logs(self, name: str) -> Path:
        """This run's log directory, emptied of an earlier run's logs."""
        path = self.logs / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def timeout(self, run: Run) -> float:
        """Give up on a run this late: twice the time the origin alone needs to serve
        every peer (no distribution should be slower), at least 5 × its own bound."""
        direct = run.peers * self.caps.size / self.caps.origin_up
        return max(5 * run.bound, 2 * direct) + 60

    def snapshot(self) -> Snapshot:
        return Snapshot(self.env.link_bytes(), cpu_times())

    def links(self, run: Run, before: Snapshot) -> None:
        """Per-node wire bytes and the machine's CPU use since `before`."""
        after = self.snapshot()
        busy, total = (a - b for a, b in zip(after.cpu, before.cpu, strict=True))
        run.cpu_busy = round(busy / total, 3) if total else None
        if before.links is None or after.links is None:
            return
        run.link_tx = {n: after.links[n][0] - before.links[n][0] for n in after.links}
        run.link_rx = {n: after.links[n][1] - before.links[n][1] for n in after.links}

    # -- dragonfly

    def dragonfly(self, n: int) -> Run:
        caps, env = self.caps, self.env
        run = Run("dragonfly", n, caps.bound("dragonfly", n), caps.size)
        logs = self.fresh_logs(f"dragonfly-n{n}")
        data = self.shm / f"dragonfly-n{n}"
        loopback = env.mode == "loopback"
        nginx = start_origin(
            env, self.procs, self.src.parent, data / "nginx", caps.origin_up if loopback else 0
        )
        nodes: list[subprocess.Popen[bytes]] = []
        try:
            py = [sys.executable, "-m", "dragonfly"]
            sched_port = env.port("scheduler")
            # With --tls, a CA for the run and a certificate per node naming its address
            # (and 127.0.0.1, where its own namespace's checks reach it).
            pki = LocalTLS(data / "tls") if self.tls else None
            self._tls_client = pki.client_context() if pki else None
            http, ws = ("https", "wss") if pki else ("http", "ws")
            sched_url = f"{ws}://{env.addr('scheduler')}:{sched_port}"
            # Identity on, as in any cluster: a secret for the scheduler, a credential
            # per peer (made here, as `dragonfly cluster` does).
            issuer = LocalIssuer(data / "trust")
            sched_settings = {
                "server.listen": env.listen_any,
                "server.port": sched_port,
                "host.ip": env.addr("scheduler"),
                "host.hostname": "scheduler",
                "log.format": "json",
                "trust.secret_file": str(issuer.secret_file),
                **(pki.scheduler_settings("scheduler", _ips(env, "scheduler")) if pki else {}),
            }
            sched = self.procs.spawn(
                env.argv("scheduler", [*py, "--role", "scheduler", *sets(sched_settings)]),
                log=logs / "scheduler.log",
            )
            nodes.append(sched)
            health = f"{http}://{env.addr('scheduler')}:{sched_port}/healthy"
            wait_ready(
                env, "scheduler", _getter(health, self._tls_client), sched, logs / "scheduler.log"
            )
            names = [f"seed-{i}" for i in range(caps.seed_peers)] + [f"peer-{i}" for i in range(n)]
            proxies: dict[str, str] = {}
            metrics: dict[str, str] = {}
            started: dict[str, subprocess.Popen[bytes]] = {}
            for name in names:
                proxy_port, upload_port = env.port("proxy"), env.port("upload")
                settings: dict[str, object] = {
                    "proxy.listen": "127.0.0.1",
                    "proxy.port": proxy_port,
                    "upload.listen": env.listen_any,
                    "upload.port": upload_port,
                    "host.ip": env.addr(name),
                    "host.hostname": name,
                    "storage.data_dir": str(data / name),
                    "scheduler.addresses": json.dumps([sched_url]),
                    "log.format": "json",
                    **(pki.peer_settings(name, _ips(env, name)) if pki else {}),
                }
                role = "seed-peer" if name.startswith("seed") else "peer"
                settings["trust.credential_file"] = str(issuer.credential_file(name, role))
                if loopback or self.app_limits:
                    # As an operator configures a peer for its link: the scheduler then
                    # knows each host's upload rate (as in the simulation). In netns mode
                    # the kernel's buckets still enforce the caps; on loopback they are
                    # the only ones, with the origin's per connection (nginx).
                    settings["upload.rate_limit"] = caps.peer_up
                    if caps.peer_down:
                        settings["download.rate_limit"] = caps.peer_down
                if loopback:
                    settings["download.back_to_source_rate_limit"] = caps.origin_up
                proc = self.procs.spawn(
                    env.argv(name, [*py, "--role", role, *sets(settings)]),
                    log=logs / f"{name}.log",
                )
                nodes.append(proc)
                started[name] = proc
                proxies[name] = f"http://127.0.0.1:{proxy_port}"
                metrics[name] = f"{http}://127.0.0.1:{upload_port}/metrics"
            for name, proc in started.items():
                url = metrics[name].replace("/metrics", "/healthy")
                wait_ready(env, name, _getter(url, self._tls_client), proc, logs / f"{name}.log")
            url = f"http://{env.addr('origin')}:{nginx.port}/{self.src.name}"
            clients = {
                f"peer-{i}": ["curl", "-sS", "-f", "-x", proxies[f"peer-{i}"], url]
                for i in range(n)
            }
            pids = {"scheduler": sched.pid, **{k: p.pid for k, p in started.items()}}
            cpu0 = {k: proc_cpu(p) for k, p in pids.items()}
            before = self.snapshot()
            race(env, self.procs, clients, self.want, run, self.timeout(run), logs)
            self.links(run, before)
            cpu_during(run, pids, cpu0)
            for name in names:
                run.metrics[name] = self._scrape(name, metrics[name])
        finally:
            for proc in reversed(nodes):
                self.procs.stop(proc)
            nginx.stop()
            run.origin_bytes = nginx.served_bytes("/")
            if nginx.access_log.exists():
                shutil.copy(nginx.access_log, logs / "origin-access.log")
            shutil.rmtree(data, ignore_errors=True)
        return run

    def _scrape(self, node: str, url: str) -> dict[str, float]:
        try:
            text = http_get(self.env, node, url, context=self._tls_client).decode()
        except (OSError, urllib.error.URLError):
            return {}
        out = {}
        for key, pattern in (
            ("p2p", r'^dragonfly_download_bytes_total\{source="p2p"\} (\S+)$'),
            (
                "back_to_source",
                r'^dragonfly_download_bytes_total\{source="back_to_source"\} (\S+)$',
            ),
            ("upload", r"^dragonfly_upload_bytes_total (\S+)$"),
            ("busy", r"^dragonfly_upload_busy_refusals_total (\S+)$"),
        ):
            m = re.search(pattern, text, re.MULTILINE)
            out[key] = float(m.group(1)) if m else 0.0
        return out

    # -- direct

    def direct(self, n: int) -> Run:
        caps, env = self.caps, self.env
        run = Run("direct", n, caps.bound("direct", n), caps.size)
        logs = self.fresh_logs(f"direct-n{n}")
        data = self.shm / f"direct-n{n}"
        # Loopback: N connections of U_o/N each make the origin's total U_o.
        limit = caps.origin_up // n if env.mode == "loopback" else 0
        nginx = start_origin(env, self.procs, self.src.parent, data / "nginx", limit)
        try:
            url = f"http://{env.addr('origin')}:{nginx.port}/{self.src.name}"
            curl = ["curl", "-sS", "-f"]
            if env.mode == "loopback" and caps.peer_down:  # no kernel bucket for D either
                curl += ["--limit-rate", str(caps.peer_down)]
            clients = {f"peer-{i}": [*curl, url] for i in range(n)}
            before = self.snapshot()
            race(env, self.procs, clients, self.want, run, self.timeout(run), logs)
            self.links(run, before)
        finally:
            nginx.stop()
            run.origin_bytes = nginx.served_bytes("/")
            shutil.rmtree(data, ignore_errors=True)
        return run

    # -- bittorrent

    def bittorrent(self, n: int) -> Run:
        caps, env = self.caps, self.env
        run = Run("bittorrent", n, caps.bound("bittorrent", n), caps.size)
        logs = self.fresh_logs(f"bittorrent-n{n}")
        data = self.shm / f"bittorrent-n{n}"
        loopback = env.mode == "loopback"
        tracker_port = env.port("tracker") if loopback else TRACKER_PORT
        tracker = f"http://{env.addr('tracker')}:{tracker_port}"
        # The seeder's copy: a hard link to the origin's file (same bytes, no copy).
        seed_dir = self.src.parent.parent / "bt-seed"
        shutil.rmtree(seed_dir, ignore_errors=True)
        seed_dir.mkdir(parents=True)
        try:
            os.link(self.src, seed_dir / self.src.name)
        except OSError:
            shutil.copy(self.src, seed_dir / self.src.name)
        torrent_bytes, info_hash = bittorrent.make_torrent(
            seed_dir / self.src.name, f"{tracker}/announce"
        )
        tracker_root = data / "tracker"
        tracker_root.mkdir(parents=True)
        data.chmod(0o755)
        tracker_root.chmod(0o755)
        (tracker_root / "whitelist").write_text(info_hash + "\n")
        torrent = data / "f.torrent"
        torrent.write_bytes(torrent_bytes)
        torrent.chmod(0o644)
        hook = bittorrent.write_hook(data / "hook.sh")
        procs: list[subprocess.Popen[bytes]] = []
        seeder_rpc = ""
        try:
            tr = self.procs.spawn(
                env.argv(
                    "tracker",
                    bittorrent.opentracker_argv(
                        env.addr("tracker"), tracker_port, tracker_root, "whitelist"
                    ),
                ),
                log=logs / "opentracker.log",
            )
            procs.append(tr)
            addr = env.addr("tracker")
            wait_ready(
                env,
                "tracker",
                lambda: wait_for_port(addr, tracker_port, 0.5),
                tr,
                logs / "opentracker.log",
            )
            rpc_port = env.port("rpc") if loopback else RPC_PORT
            seeder = self.procs.spawn(
                env.argv(
                    "origin",
                    bittorrent.aria2_argv(
                        torrent,
                        seed_dir,
                        listen_port=env.port("bt") if loopback else BT_PORT,
                        log=logs / "seeder.log",
                        upload_limit=caps.origin_up if loopback else 0,
                        rpc_port=rpc_port,
                        stop_with_pid=os.getpid(),
                    ),
                ),
                log=logs / "seeder.out",
            )
            procs.append(seeder)
            seeder_rpc = f"http://127.0.0.1:{rpc_port}/jsonrpc"

            def seeding() -> None:
                if bittorrent.scrape_complete(tracker, info_hash) < 1:
                    raise ValueError("the seeder has not announced yet")

            wait_ready(env, "tracker", seeding, seeder, logs / "seeder.log")
            leechers: dict[str, subprocess.Popen[bytes]] = {}
            for i in range(n):
                peer = f"peer-{i}"
                d = data / peer
                d.mkdir()
                argv = bittorrent.aria2_argv(
                    torrent,
                    d,
                    listen_port=env.port("bt") if loopback else BT_PORT,
                    log=logs / f"{peer}.log",
                    upload_limit=caps.peer_up if loopback else 0,
                    download_limit=(caps.peer_down or 0) if loopback else 0,
                    hook=hook,
                    stop_with_pid=os.getpid(),
                )
                out = shlex.quote(str(logs / f"{peer}.out"))
                script = f"echo ready; read go; exec {shlex.join(argv)} >>{out} 2>&1"
                leechers[peer] = self.procs.spawn(
                    env.argv(peer, ["bash", "-c", script]),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                )
            procs.extend(leechers.values())
            barrier(leechers)
            pids = {"origin": seeder.pid, **{k: p.pid for k, p in leechers.items()}}
            cpu0 = {k: proc_cpu(p) for k, p in pids.items()}
            before = self.snapshot()
            t0 = time.time()  # the hooks stamp with the wall clock
            release(leechers)
            deadline = time.monotonic() + self.timeout(run)
            done: dict[str, tuple[float, str]] = {}
            while len(done) < n and time.monotonic() < deadline:
                for peer in leechers:
                    if peer not in done and (
                        got := bittorrent.read_done(data / peer / f"{self.src.name}.done")
                    ):
                        done[peer] = got
                dead = [
                    p for p, proc in leechers.items() if p not in done and proc.poll() is not None
                ]
                if dead:
                    run.error = f"aria2c exited early: {', '.join(dead)}; see {logs}"
                    break
                time.sleep(0.05)
            self.links(run, before)
            cpu_during(run, pids, cpu0)
            with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
                run.origin_bytes = env.call("origin", lambda: bittorrent.uploaded_bytes(seeder_rpc))
            errors = []
            for i in range(n):
                peer = f"peer-{i}"
                if peer not in done:
                    errors.append(f"{peer}: not done")
                    continue
                run.peer_sha256[peer] = done[peer][1]
                if done[peer][1] != self.want:
                    errors.append(f"{peer}: sha256 is not the origin's")
                else:
                    run.peer_seconds[peer] = round(done[peer][0] - t0, 3)
            if errors and run.error is None:
                run.error = "; ".join(errors)
        finally:
            for proc in reversed(procs):
                self.procs.stop(proc)
            shutil.rmtree(data, ignore_errors=True)
            shutil.rmtree(seed_dir, ignore_errors=True)
        return run


def _ips(env: Env, node: str) -> tuple[str, ...]:
    """The addresses a node's certificate names: where others reach it, and loopback."""
    return tuple(dict.fromkeys((env.addr(node), "127.0.0.1")))


def _getter(url: str, context: ssl.SSLContext | None = None) -> Callable[[], None]:
    def get() -> None:
        with urllib.request.urlopen(url, timeout=2, context=context) as r:
            if r.status != 200:
                raise ValueError(f"{url}: {r.status}")

    return get


def sets(settings: dict[str, object]) -> list[str]:
    """`--set key=value` for each setting."""
    out: list[str] = []
    for key, value in settings.items():
        out += ["--set", f"{key}={value}"]
    return out


# ------------------------------------------------------------------------------ main


def parse_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: a comma list of peer counts >= 1")
    return values


def parse_only(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in names if v not in CONTENDERS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(CONTENDERS)}")
    return [c for c in CONTENDERS if c in names]


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(caps: Caps, mode: str, runs: list[Run]) -> None:
    f = caps
    down = f"{f.peer_down / 1e6:g} MB/s" if f.peer_down else "none"
    print(
        f"swarm ({mode}): F = {human_bytes(f.size)}, U_o = {f.origin_up / 1e6:g} MB/s, "
        f"U_p = {f.peer_up / 1e6:g} MB/s, D = {down}, M = {f.seed_peers} seed peer(s)"
    )
    heads = f"{'T_all s':>9}{'bound s':>9}{'effic.':>8}{'origin/F':>10}{'p50 s':>8}{'max s':>8}"
    heads += f"{'cpu':>6}"
    print(f"{'N':>3}  {'contender':<11}{heads}")
    for r in runs:
        s = r.summary()
        print(
            f"{r.peers:>3}  {r.contender:<11}{fmt(s['t_all'], '.1f'):>9}{r.bound:>9.1f}"
            f"{fmt(s['efficiency'], '.2f'):>8}{fmt(s['origin_ratio'], '.3f'):>10}"
            f"{fmt(s['p50'], '.1f'):>8}{fmt(s['max'], '.1f'):>8}"
            f"{'-' if r.cpu_busy is None else f'{r.cpu_busy:.0%}':>6}"
        )
        if r.error:
            print(f"     failed: {r.error[:500]}")
    print(f"target: dragonfly efficiency >= {TARGET_EFFICIENCY}, origin <= {TARGET_ORIGIN} × F")
    for r in runs:
        if r.link_tx:
            ups = ", ".join(
                f"{n} {b / f.size:.2f}" for n, b in r.link_tx.items() if b > f.size * 0.01
            )
            print(f"  N={r.peers} {r.contender}: uploaded (wire bytes / F): {ups}")
        if r.cpu_seconds:
            cpus = ", ".join(f"{n} {c:.1f}" for n, c in r.cpu_seconds.items())
            print(f"  N={r.peers} {r.contender}: CPU seconds in the race: {cpus}")
        if r.metrics:
            parts = []
            for n, m in r.metrics.items():
                if m:
                    parts.append(
                        f"{n} up {m['upload'] / f.size:.2f} p2p {m['p2p'] / f.size:.2f}"
                        f" b2s {m['back_to_source'] / f.size:.2f}"
                        f" 503s {m.get('busy', 0):.0f}"
                    )
            print(f"  N={r.peers} dragonfly metrics (/ F): " + "; ".join(parts))


def choose_mode(requested: str | None) -> tuple[str, str]:
    """(mode, why): netns when root and namespaces work, else loopback."""
    reason = netns.unavailable()
    if requested == "netns":
        if reason:
            raise SystemExit(f"swarm: --mode netns is not possible here: {reason}")
        return "netns", "requested"
    if requested == "loopback":
        return "loopback", "requested"
    return ("loopback", reason) if reason else ("netns", "root and `ip netns` work")


def build_netns(topo: netns.Topology, caps: Caps, max_peers: int) -> None:
    topo.add("origin", up=caps.origin_up)
    topo.add("scheduler")
    topo.add("tracker")
    for i in range(caps.seed_peers):
        topo.add(f"seed-{i}", up=caps.peer_up, down=caps.peer_down)
    for i in range(max_peers):
        topo.add(f"peer-{i}", up=caps.peer_up, down=caps.peer_down)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks swarm", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--peers", type=parse_list, default=[8, 16], help="comma list of N (default 8,16)"
    )
    parser.add_argument("--size", default="256MiB", help="file size F (default 256MiB)")
    parser.add_argument("--origin-up", default="10MB/s", help="origin upload cap U_o")
    parser.add_argument(
        "--peer-up", default="10MB/s", help="upload cap U_p of every peer and seed peer"
    )
    parser.add_argument(
        "--peer-down", default=None, help="download cap D of every peer (default none)"
    )
    parser.add_argument(
        "--seed-peers", type=int, default=1, help="dragonfly seed peers M (default 1)"
    )
    parser.add_argument(
        "--no-app-limits",
        action="store_true",
        help="netns mode: leave dragonfly's own upload/download rate limits unset "
        "(the kernel's caps alone; the scheduler is not told the peers' rates)",
    )
    parser.add_argument(
        "--mode",
        choices=("netns", "loopback"),
        default=None,
        help="default: netns when root and `ip netns` work, else loopback",
    )
    parser.add_argument(
        "--only", type=parse_only, default=list(CONTENDERS), help="comma list of contenders"
    )
    parser.add_argument(
        "--tls", action="store_true", help="TLS on dragonfly's scheduler and upload ports"
    )
    args = parser.parse_args(argv)
    name = "swarm-tls" if args.tls else "swarm"
    caps = Caps(
        size=parse_size(args.size),
        origin_up=parse_rate(args.origin_up),
        peer_up=parse_rate(args.peer_up),
        peer_down=parse_rate(args.peer_down) if args.peer_down else None,
        seed_peers=args.seed_peers,
    )
    if caps.origin_up <= 0 or caps.peer_up <= 0 or caps.seed_peers < 0 or caps.size <= 0:
        parser.error("sizes and caps must be positive, --seed-peers >= 0")
    missing = [
        p
        for p, needed in (
            ("nginx", "dragonfly" in args.only or "direct" in args.only),
            ("curl", True),
            ("aria2c", "bittorrent" in args.only),
            ("opentracker", "bittorrent" in args.only),
        )
        if needed and shutil.which(p) is None and not (p == "nginx" and nginx_binary())
    ]
    if missing:
        raise SystemExit(f"swarm: not installed: {', '.join(missing)} (make deps installs them)")
    mode, why = choose_mode(args.mode)
    print(f"swarm: mode {mode} ({why})", flush=True)
    netns.cleanup_stale()  # what runs killed outright left behind (dead pids only)
    work = common.RESULTS / name
    src = common.ensure_file(work / "www" / f"f-{caps.size}.bin", caps.size)
    want = sha256_file(src)
    run_id = f"{netns.PREFIX}{os.getpid()}"
    shm_root = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")
    shm = shm_root / run_id
    procs = Procs()
    topo = netns.Topology(run_id=run_id)
    runs: list[Run] = []
    interrupted = False
    try:
        with netns.signals_raise():
            shm.mkdir(mode=0o755)
            if mode == "netns":
                topo.start()
                build_netns(topo, caps, max(args.peers))
                env: Env = NetnsEnv(topo)
            else:
                env = LoopbackEnv()
            bench = Bench(
                env,
                procs,
                caps,
                src,
                want,
                shm,
                work / "logs",
                app_limits=not args.no_app_limits,
                tls=args.tls,
            )
            for n in args.peers:
                for contender in args.only:
                    print(f"N={n} {contender} ...", flush=True)
                    try:
                        run = getattr(bench, contender)(n)
                    except Exception as exc:  # one contender's failure is a result too
                        run = Run(contender, n, caps.bound(contender, n), caps.size)
                        run.error = f"{type(exc).__name__}: {exc}"
                    runs.append(run)
                    print(
                        f"N={n} {contender}: T_all {fmt(run.t_all, '.1f')} s, "
                        f"bound {run.bound:.1f} s, efficiency {fmt(run.efficiency, '.2f')}"
                        + (f"; FAILED: {run.error[:300]}" if run.error else ""),
                        flush=True,
                    )
    except KeyboardInterrupt:
        interrupted = True
    finally:
        with netns.signals_ignored():  # a second Ctrl-C must not cut the teardown short
            procs.stop_all()
            topo.stop()
            shutil.rmtree(shm, ignore_errors=True)
    if interrupted:
        print("swarm: interrupted; every process and namespace of the run is gone", flush=True)
        return 130
    print_table(caps, mode, runs)
    payload = {
        "mode": mode,
        "size": caps.size,
        "origin_up": caps.origin_up,
        "peer_up": caps.peer_up,
        "peer_down": caps.peer_down,
        "seed_peers": caps.seed_peers,
        "tls": args.tls,
        "sha256": want,
        "run_id": run_id,
        "pids": procs.pids,
        "runs": [r.summary() for r in runs],
    }
    path = common.write_result(name, payload)
    for n in args.peers:
        series = {f"{r.contender}": list(r.peer_seconds.values()) for r in runs if r.peers == n}
        if any(series.values()):
            png = common.plot_cdf(
                f"{name}-n{n}",
                series,
                xlabel="seconds until the peer has the whole verified file",
                title=f"swarm ({mode}): N = {n}, F = {human_bytes(caps.size)}, "
                f"U_o = {caps.origin_up / 1e6:g} MB/s, U_p = {caps.peer_up / 1e6:g} MB/s",
                bound=caps.bound("dragonfly", n),
            )
            print(f"wrote {png}")
    print(f"wrote {path}")
    return 0 if all(r.ok for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
