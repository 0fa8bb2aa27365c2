"""swarm's nodes: the processes it starts, where they run (a network namespace each, or
loopback), how they are reached and checked, and the origin nginx among them; the netns
topology for a run (benchmarks/netns.py builds it). Part of `python -m benchmarks swarm`.
"""

from __future__ import annotations

import contextlib
import itertools
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, TypeVar

from benchmarks import netns
from benchmarks.lo_shaped import SharedLoopback
from dragonfly.testing.nginx import Nginx, free_port, nginx_binary, wait_for_port
from dragonfly.testing.process import stop_process_group

if TYPE_CHECKING:
    from benchmarks.swarm_race import Caps

T = TypeVar("T")

READY_TIMEOUT = 60.0

PORTS = {"origin": 80, "scheduler": 8002, "proxy": 65001, "upload": 65002}


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


class SharedLoEnv(Env):
    """Every node in one namespace, at an address of its own on its loopback
    (benchmarks/lo_shaped.py); ports are handed out in turn, as nodes share the stack."""

    mode = "lo-shaped"

    def __init__(self, lo: SharedLoopback) -> None:
        self.lo = lo
        self._ports = itertools.count(20000)

    def addr(self, node: str) -> str:
        return self.lo.addrs[node]

    def port(self, kind: str) -> int:
        return next(self._ports)

    def argv(self, node: str, argv: list[str]) -> list[str]:
        return self.lo.exec_argv(argv)

    def call(self, node: str, fn: Callable[[], T]) -> T:
        return self.lo.call(fn)

    @property
    def listen_any(self) -> str:
        return "0.0.0.0"  # (inside the run's own namespace)


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
    """nginx serving `root` from the origin node; `limit_rate`: bytes/s per connection,
    0 for none (loopback: the origin's only cap; lo-shaped direct: each connection's fair
    share under the kernel's bucket)."""
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


# ------------------------------------------------------------------------------- the network


def choose_mode(requested: str | None) -> tuple[str, str]:
    """(mode, why): netns when root and namespaces work, else loopback."""
    reason = netns.unavailable()
    if requested == "netns":
        if reason:
            raise SystemExit(f"swarm: --mode netns is not possible here: {reason}")
        return "netns", "requested"
    if requested == "lo-shaped":
        if reason:
            raise SystemExit(f"swarm: --mode lo-shaped is not possible here: {reason}")
        return "lo-shaped", "requested"
    if requested == "loopback":
        return "loopback", "requested"
    return ("loopback", reason) if reason else ("netns", "root and `ip netns` work")


def build_nodes(topo: netns.Topology | SharedLoopback, caps: Caps, max_peers: int) -> None:
    topo.add("origin", up=caps.origin_up)
    topo.add("scheduler")
    topo.add("tracker")
    for i in range(caps.seed_peers):
        topo.add(f"seed-{i}", up=caps.peer_up, down=caps.peer_down)
    for i in range(max_peers):
        topo.add(f"peer-{i}", up=caps.peer_up, down=caps.peer_down)
