"""`python -m dragonfly cluster`: a whole local cluster, each role its own process.

Every role runs on 127.0.0.1 with free ports and its own data directory and log
under WORKDIR. Once every role answers /healthy, WORKDIR/cluster.json is written
(atomically: write, then rename) for benchmarks and checks to read. The cluster
runs until SIGINT/SIGTERM, then every child is stopped and waited for.

Configuration reaches the roles as `--config [ROLE:]FILE` and `--set [ROLE:]KEY=VALUE`
say: with ROLE (scheduler, seed-peer, peer) for that role only; without, for every
role that has the key's section (as DRAGONFLY_SECTION__KEY does). Each node's whole
configuration is resolved here, checked before anything starts, and written to
WORKDIR/conf/NODE.toml with the source of every value; the node runs with that file
alone. The listen addresses, ports, data directories and scheduler addresses are the
cluster's to set: a --set of one is an error, a file's value is replaced.

Identity is on, as in any cluster: WORKDIR/trust holds the cluster secret (given to
the schedulers) and one credential per peer and seed peer, named after the node; the
cluster sets trust.secret_file and trust.credential_file too.

With `tls` (`cluster --tls`), WORKDIR/tls holds the cluster's CA and a certificate per
node: schedulers serve wss:// and https, peers their upload ports over TLS and verify
both with the CA (server.tls_*, upload.tls_*, trust.ca_file, which the cluster sets).
cluster.json then gives wss:// and https:// URLs, and the CA's file as "ca_file".
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dragonfly.config import (
    ENV_PREFIX,
    ConfigError,
    PeerConfig,
    RoleConfig,
    load_config_sources,
    read_config_file,
    render_effective,
    role_keys,
)
from dragonfly.testing.cluster_tls import LocalTLS
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


NODE_ROLES = ("scheduler", "seed-peer", "peer")
# Set by the cluster for each node (every role on 127.0.0.1, its own ports and data).
CLUSTER_KEYS = (
    "server.listen",
    "server.port",
    "proxy.port",
    "upload.listen",
    "upload.port",
    "storage.data_dir",
    "scheduler.addresses",
    "trust.secret_file",
    "trust.credential_file",
    # TLS: `--tls` gives each node its own certificate
    "server.tls_cert",
    "server.tls_key",
    "upload.tls_cert",
    "upload.tls_key",
    "trust.ca_file",
)


def split_role(spec: str) -> tuple[str | None, str]:
    """`ROLE:REST` → (ROLE, REST); without a role before its first ':' → (None, spec)."""
    role, sep, rest = spec.partition(":")
    return (role, rest) if sep and role in NODE_ROLES else (None, spec)


@dataclass(frozen=True)
class RoleSettings:
    """What reaches one role: files for every role, its own file, --set items."""

    shared: tuple[str, ...] = ()
    path: str | None = None
    overrides: tuple[str, ...] = ()


def role_settings(
    roles: Sequence[str], configs: Sequence[str], overrides: Sequence[str]
) -> dict[str, RoleSettings]:
    """Which `--config [ROLE:]FILE` and `--set [ROLE:]KEY=VALUE` reach which of `roles`.

    A ConfigError names a file or key that reaches no role of the cluster, a second
    file for one role, and a --set of a key the cluster sets itself."""
    names = ", ".join(roles)
    shared: list[str] = []
    own: dict[str, str] = {}
    for spec in configs:
        role, path = split_role(spec)
        if role is None:
            for key in read_config_file(path):
                if not any(key in role_keys(r) for r in roles):
                    raise ConfigError(path, key, f"no role of this cluster has it ({names})")
            shared.append(path)
        elif role not in roles:
            raise ConfigError("--config", spec, f"this cluster has no {role} ({names})")
        elif role in own:
            raise ConfigError("--config", spec, f"a second file for the {role}")
        else:
            own[role] = path
    sets: dict[str, list[str]] = {r: [] for r in roles}
    for item in overrides:
        role, rest = split_role(item)
        key = rest.partition("=")[0].strip()
        if any(key == k or k.startswith(f"{key}.") for k in CLUSTER_KEYS):
            raise ConfigError("--set", key, "the cluster sets this for each node itself")
        if role is not None and role not in roles:
            raise ConfigError("--set", item, f"this cluster has no {role} ({names})")
        targets = [role] if role else [r for r in roles if key.split(".")[0] in role_keys(r)]
        if not targets:
            raise ConfigError("--set", key, f"no role of this cluster has it ({names})")
        for target in targets:
            sets[target].append(rest)
    return {r: RoleSettings(tuple(shared), own.get(r), tuple(sets[r])) for r in roles}


@dataclass
class Cluster:
    """The processes of a local cluster (usable as a context manager in tests)."""

    workdir: Path
    schedulers: int = 1
    seed_peers: int = 1
    peers: int = 3
    extra: list[str] = field(default_factory=list)  # "--set", "K=V" pairs for every peer
    configs: list[str] = field(default_factory=list)  # [ROLE:]FILE
    overrides: list[str] = field(default_factory=list)  # [ROLE:]SECTION.KEY=VALUE
    tls: bool = False  # TLS on the scheduler and upload ports (WORKDIR/tls)
    nodes: list[Node] = field(default_factory=list)

    @property
    def issuer(self) -> LocalIssuer:
        """The cluster's secret, and credentials made from it (WORKDIR/trust)."""
        return LocalIssuer(self.workdir / "trust")

    @property
    def pki(self) -> LocalTLS | None:
        """The cluster's CA and its nodes' certificates (WORKDIR/tls), with `tls`."""
        return LocalTLS(self.workdir / "tls") if self.tls else None

    @property
    def ca_file(self) -> str | None:
        """The CA file a client of a TLS cluster verifies its nodes with (None: no TLS)."""
        return str(self.workdir / "tls" / "ca.pem") if self.tls else None

    def check(self) -> dict[str, RoleSettings]:
        """What reaches each role, every role's configuration resolved once: a ConfigError
        (naming the role) before anything is written or started."""
        counts = {"scheduler": self.schedulers, "seed-peer": self.seed_peers, "peer": self.peers}
        roles = [r for r in NODE_ROLES if counts[r]]
        if self.extra[::2] != ["--set"] * (len(self.extra) // 2) or len(self.extra) % 2:
            raise ValueError(f"extra takes '--set', 'KEY=VALUE' pairs, not {self.extra!r}")
        peer_sets = [f"{r}:{item}" for item in self.extra[1::2] for r in roles if r != "scheduler"]
        settings = role_settings(roles, self.configs, [*self.overrides, *peer_sets])
        for role, each in settings.items():
            _resolve(role, each, [])
        return settings

    def _node_args(
        self, name: str, role: str, settings: RoleSettings, cluster_sets: list[str]
    ) -> tuple[list[str], RoleConfig]:
        """Resolve a node's configuration, write it to WORKDIR/conf/NAME.toml (each value
        with its source); the arguments that run the node with it, and the configuration."""
        cfg, sources = _resolve(role, settings, cluster_sets)
        path = self.workdir / "conf" / f"{name}.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_effective(role, cfg, sources))
        return [sys.executable, "-m", "dragonfly", "--role", role, "--config", str(path)], cfg

    def _plan(self, settings: dict[str, RoleSettings]) -> None:
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        issuer, pki = self.issuer, self.pki
        http, ws = ("https", "wss") if pki else ("http", "ws")
        addresses = []
        for i in range(self.schedulers):
            name, port = f"scheduler-{i}", free_port()
            addresses.append(f"{ws}://127.0.0.1:{port}")
            args, _ = self._node_args(
                name,
                "scheduler",
                settings["scheduler"],
                [
                    "server.listen=127.0.0.1",
                    f"server.port={port}",
                    *issuer.scheduler_overrides(),
                    *(pki.scheduler_overrides(name) if pki else []),
                ],
            )
            self.nodes.append(
                Node(
                    name,
                    "scheduler",
                    args,
                    logs / f"{name}.log",
                    f"{http}://127.0.0.1:{port}/healthy",
                    {
                        "url": f"{ws}://127.0.0.1:{port}",
                        "metrics": f"{http}://127.0.0.1:{port}/metrics",
                        "config": args[-1],
                    },
                )
            )
        sched = json.dumps(addresses)
        for kind, count in (("seed-peer", self.seed_peers), ("peer", self.peers)):
            for i in range(count):
                name = f"{kind}-{i}"
                proxy, upload = free_port(), free_port()
                data = self.workdir / "data" / name
                cluster_sets = [
                    f"proxy.port={proxy}",
                    "upload.listen=127.0.0.1",
                    f"upload.port={upload}",
                    f"storage.data_dir={data}",
                    f"scheduler.addresses={sched}",
                    *issuer.peer_overrides(name, kind),
                    *(pki.peer_overrides(name) if pki else []),
                ]
                args, cfg = self._node_args(name, kind, settings[kind], cluster_sets)
                assert isinstance(cfg, PeerConfig)
                # The proxy may listen elsewhere (`--set proxy.listen=...`): its URL says where.
                listen = cfg.proxy.listen
                proxy_host = "127.0.0.1" if listen in ("0.0.0.0", "::", "") else listen
                proxy_host = f"[{proxy_host}]" if ":" in proxy_host else proxy_host
                self.nodes.append(
                    Node(
                        name,
                        kind,
                        args,
                        logs / f"{name}.log",
                        f"{http}://127.0.0.1:{upload}/healthy",
                        {
                            "proxy": f"http://{proxy_host}:{proxy}",
                            "upload": f"{http}://127.0.0.1:{upload}",
                            "metrics": f"{http}://127.0.0.1:{upload}/metrics",
                            "data_dir": str(data),
                            "config": args[-1],
                            "pid": 0,
                        },
                    )
                )

    def start(self) -> Cluster:
        settings = self.check()
        self.workdir.mkdir(parents=True, exist_ok=True)
        # The environment's settings are in each node's file already: a node must not
        # apply them again over the ports and directories the cluster gave it.
        env = {k: v for k, v in os.environ.items() if not _is_config_variable(k)}
        for attempt in range(_START_ATTEMPTS):
            self.nodes = []
            self._plan(settings)
            try:
                for node in self.nodes:
                    with open(node.log_path, "ab") as log:
                        node.process = subprocess.Popen(
                            node.args,
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL,
                            env=env,
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

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Stop one node at once (by PID, SIGKILL by default: a crash), and wait for it."""
        node = self.node(name)
        if node.process is not None and node.process.poll() is None:
            node.process.send_signal(sig)
            node.process.wait(timeout=30)

    def restart(self, name: str) -> Node:
        """Start a stopped node again: the same configuration, ports and data."""
        node = self.node(name)
        if node.process is not None and node.process.poll() is None:
            raise ClusterError(f"{name} is running")
        env = {k: v for k, v in os.environ.items() if not _is_config_variable(k)}
        with open(node.log_path, "ab") as log:
            node.process = subprocess.Popen(
                node.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        node.info["pid"] = node.process.pid
        self._wait_healthy([node])
        self._write_json()
        return node

    def _wait_healthy(self, nodes: list[Node] | None = None) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        pending = list(self.nodes if nodes is None else nodes)
        ca = self.ca_file
        context = ssl.create_default_context(cafile=ca) if ca else None
        while pending:
            for node in list(pending):
                assert node.process is not None
                if node.process.poll() is not None:
                    tail = node.log_path.read_text(errors="replace")[-2000:]
                    raise ClusterError(
                        f"{node.name} exited with {node.process.returncode}:\n{tail}"
                    )
                try:
                    with urllib.request.urlopen(node.health_url, timeout=1, context=context) as r:
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
            "ca_file": self.ca_file,
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


def _resolve(
    role: str, settings: RoleSettings, cluster_sets: list[str]
) -> tuple[RoleConfig, dict[str, str]]:
    """A role's configuration and the source of each value; JSON logs unless set."""
    try:
        return load_config_sources(
            role,
            settings.path,
            shared=settings.shared,
            overrides=["log.format=json", *settings.overrides, *cluster_sets],
        )
    except ConfigError as exc:
        raise ConfigError(f"{exc.source} (for the {role})", exc.key, exc.problem) from None


def _is_config_variable(name: str) -> bool:
    return name.startswith(ENV_PREFIX) and "__" in name


def run_cluster(
    workdir: Path,
    schedulers: int,
    seed_peers: int,
    peers: int,
    *,
    configs: Sequence[str] = (),
    overrides: Sequence[str] = (),
    tls: bool = False,
) -> int:
    """The CLI command: start, report, wait for a signal, stop."""
    cluster = Cluster(
        workdir,
        schedulers,
        seed_peers,
        peers,
        configs=list(configs),
        overrides=list(overrides),
        tls=tls,
    )
    try:
        cluster.check()
    except ConfigError as exc:
        print(f"dragonfly cluster: configuration error: {exc}", file=sys.stderr)
        return 2
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
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
