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

A manager starts first (unless `manager=False`, `--no-manager`): its data directory
is WORKDIR/data/manager, its first root password in root-password there (cluster.json
names both). The cluster signs in as root, makes a join token per role
(WORKDIR/trust/join-ROLE.token, 0600) and sets cluster-1's parent limits to the
schedulers' [scheduling] values; the schedulers get the cluster secret from the manager
with their join token, the seed peers and peers join for their credentials (kept in
their data directories) and find their schedulers through the manager. The manager
issues under WORKDIR/trust/secret.json (`Cluster.issuer`), so a test can make
credentials of the same cluster. `--config manager:FILE` and `--set manager:KEY=VALUE`
reach the manager; settings without a role reach the other roles only.

Without a manager, identity is on as in any cluster: WORKDIR/trust holds the cluster
secret (given to the schedulers) and one credential per peer and seed peer, named after
the node; the cluster sets trust.secret_file, trust.credential_file and
scheduler.addresses. Each node's host.hostname is its name (scheduler-0, peer-1, ...):
the manager keeps one row per scheduler or seed peer by host name, address and cluster,
as Dragonfly does, and every node here shares 127.0.0.1.

With `tls` (`cluster --tls`), WORKDIR/tls holds the cluster's CA and a certificate per
node: schedulers serve wss:// and https, peers their upload ports over TLS and verify
both with the CA (server.tls_*, upload.tls_*, trust.ca_file, which the cluster sets).
With a manager, the schedulers announce TLS to it (the feature "tls") and the peers
it answers connect over wss:// (the manager's own port stays plain HTTP).
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

# The settings resolution is dragonfly/cluster_settings.py; `X as X`: re-exported.
from dragonfly.cluster_settings import CLUSTER_KEYS as CLUSTER_KEYS
from dragonfly.cluster_settings import (
    JOIN_ROLES,
    NODE_ROLES,
    RoleSettings,
    _resolve,
    role_settings,
)
from dragonfly.cluster_settings import MANAGER as MANAGER
from dragonfly.cluster_settings import MANAGER_KEYS as MANAGER_KEYS
from dragonfly.cluster_settings import split_role as split_role
from dragonfly.config import (
    ENV_PREFIX,
    ConfigError,
    PeerConfig,
    RoleConfig,
    render_effective,
)
from dragonfly.credentials import read_credential_file, write_private_text
from dragonfly.testing.cluster_tls import LocalTLS
from dragonfly.testing.nginx import free_port
from dragonfly.testing.trust import LocalIssuer, ticket_header

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
    extra: list[str] = field(default_factory=list)  # "--set", "K=V" pairs for every peer
    configs: list[str] = field(default_factory=list)  # [ROLE:]FILE
    overrides: list[str] = field(default_factory=list)  # [ROLE:]SECTION.KEY=VALUE
    tls: bool = False  # TLS on the scheduler and upload ports (WORKDIR/tls)
    manager: bool = True  # start a manager first; the others find it and join
    nodes: list[Node] = field(default_factory=list)
    session: str = ""  # root's session at the manager, once started
    _ports: set[int] = field(default_factory=set, init=False, repr=False)  # of this plan

    @property
    def issuer(self) -> LocalIssuer:
        """The cluster's secret (the manager issues under it), and credentials made from
        it (WORKDIR/trust)."""
        return LocalIssuer(self.workdir / "trust")

    @property
    def pki(self) -> LocalTLS | None:
        """The cluster's CA and its nodes' certificates (WORKDIR/tls), with `tls`."""
        return LocalTLS(self.workdir / "tls") if self.tls else None

    @property
    def ca_file(self) -> str | None:
        """The CA file a client of a TLS cluster verifies its nodes with (None: no TLS)."""
        return str(self.workdir / "tls" / "ca.pem") if self.tls else None

    def join_token_file(self, role: str) -> Path:
        return self.workdir / "trust" / f"join-{role}.token"

    def host_credential(self, name: str) -> Path:
        """Where node `name` (a peer or seed peer) keeps its credential."""
        node = self.node(name)
        if self.manager:
            return Path(node.info["data_dir"]) / "credential.json"
        return self.workdir / "trust" / f"{name}.json"

    def ticket_header(
        self, task_id: str, parent: str, child_host_id: str = "test-child", ttl: int = 600
    ) -> str:
        """The X-Dragonfly-Ticket value a scheduler would give `child_host_id` to fetch
        `task_id` from node `parent` (made with that node's key)."""
        credential = read_credential_file(self.host_credential(parent))
        return ticket_header(credential, task_id, child_host_id, ttl)

    def _roles(self) -> list[str]:
        counts = {"scheduler": self.schedulers, "seed-peer": self.seed_peers, "peer": self.peers}
        roles = [r for r in NODE_ROLES if counts[r]]
        return [MANAGER, *roles] if self.manager else roles

    def check(self) -> dict[str, RoleSettings]:
        """What reaches each role, every role's configuration resolved once: a ConfigError
        (naming the role) before anything is written or started."""
        roles = self._roles()
        if self.extra[::2] != ["--set"] * (len(self.extra) // 2) or len(self.extra) % 2:
            raise ValueError(f"extra takes '--set', 'KEY=VALUE' pairs, not {self.extra!r}")
        peer_sets = [
            f"{r}:{item}" for item in self.extra[1::2] for r in roles if r in ("seed-peer", "peer")
        ]
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

    def _plan_manager(self, settings: dict[str, RoleSettings], logs: Path) -> str:
        """The manager's node; its URL."""
        port = self._free_port()
        url = f"http://127.0.0.1:{port}"
        data = self.workdir / "data" / MANAGER
        args, _ = self._node_args(
            MANAGER,
            MANAGER,
            settings[MANAGER],
            [
                "server.listen=127.0.0.1",
                f"server.port={port}",
                f"data.dir={data}",
                f"trust.secret_file={self.issuer.secret_file}",
            ],
        )
        self.nodes.append(
            Node(
                MANAGER,
                MANAGER,
                args,
                logs / f"{MANAGER}.log",
                f"{url}/healthy",
                {
                    "url": url,
                    "metrics": f"{url}/metrics",
                    "data_dir": str(data),
                    "root_password_file": str(data / "root-password"),
                    "config": args[-1],
                    "pid": 0,
                },
            )
        )
        return url

    def _free_port(self) -> int:
        """A port free now and not handed to another node of this plan: the kernel may
        give a port it just gave again, and a node whose port another node took fails
        to start while the other's /healthy answers for it."""
        while (port := free_port()) in self._ports:
            pass
        self._ports.add(port)
        return port

    def _plan(self, settings: dict[str, RoleSettings]) -> None:
        self._ports.clear()
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        issuer, pki = self.issuer, self.pki
        http, ws = ("https", "wss") if pki else ("http", "ws")
        manager = self._plan_manager(settings, logs) if self.manager else ""
        addresses = []
        for i in range(self.schedulers):
            name, port = f"scheduler-{i}", self._free_port()
            addresses.append(f"{ws}://127.0.0.1:{port}")
            identity = (
                [
                    f"manager.address={manager}",
                    f"trust.join_token_file={self.join_token_file('scheduler')}",
                ]
                if manager
                else issuer.scheduler_overrides()
            )
            args, self._scheduler_config = self._node_args(
                name,
                "scheduler",
                settings["scheduler"],
                [
                    "server.listen=127.0.0.1",
                    f"server.port={port}",
                    f"host.hostname={name}",
                    *identity,
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
                proxy, upload = self._free_port(), self._free_port()
                data = self.workdir / "data" / name
                identity = (
                    [
                        "scheduler.addresses=[]",
                        f"scheduler.manager={manager}",
                        f"trust.join_token_file={self.join_token_file(kind)}",
                    ]
                    if manager
                    else [f"scheduler.addresses={sched}", *issuer.peer_overrides(name, kind)]
                )
                cluster_sets = [
                    f"host.hostname={name}",
                    f"proxy.port={proxy}",
                    "upload.listen=127.0.0.1",
                    f"upload.port={upload}",
                    f"storage.data_dir={data}",
                    *identity,
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
                            "host_id": "" if manager else name,
                        },
                    )
                )

    def _spawn(self, node: Node, env: dict[str, str]) -> None:
        with open(node.log_path, "ab") as log:
            node.process = subprocess.Popen(
                node.args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        node.info["pid"] = node.process.pid

    def _provision(self, manager: Node) -> str:
        """As root on the new manager: a join token per role (files the nodes read), and
        cluster-1's parent limits from the schedulers' own [scheduling] values (the
        manager's cluster settings win over a scheduler's file)."""
        url = manager.info["url"]
        password = Path(manager.info["root_password_file"]).read_text().strip()
        token = _call(url, "POST", "/api/v1/users/signin", {"name": "root", "password": password})
        session = str(token["token"])
        for role in JOIN_ROLES:
            made = _call(url, "POST", f"/api/v1/join-tokens/{role}", None, session)
            write_private_text(self.join_token_file(role), str(made["token"]) + "\n", replace=True)
        scheduling = getattr(self, "_scheduler_config", None)
        if scheduling is not None:
            limits = scheduling.scheduling
            _call(
                url,
                "PATCH",
                "/api/v1/scheduler-clusters/1",
                {
                    "config": {
                        "candidate_parent_limit": limits.candidate_parent_limit,
                        "filter_parent_limit": limits.filter_parent_limit,
                    }
                },
                session,
            )
        return session

    def _wait_registered(self, manager: Node, session: str) -> None:
        """Until every scheduler is active at the manager: a peer's first answer names
        them all (it asks again only every scheduler.refresh_interval)."""
        deadline = time.monotonic() + READY_TIMEOUT
        path = "/api/v1/schedulers?state=active&per_page=1000"
        while len(_call(manager.info["url"], "GET", path, None, session)) < self.schedulers:
            if time.monotonic() > deadline:
                raise ClusterError(f"not every scheduler registered after {READY_TIMEOUT}s")
            time.sleep(0.05)

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
                # The manager, then the schedulers (registered there), then the peers,
                # whose first question to the manager then gets every scheduler.
                for group in (MANAGER, "scheduler", "peers"):
                    nodes = [
                        n
                        for n in self.nodes
                        if n.role == group or (group == "peers" and n.role in JOIN_ROLES[1:])
                    ]
                    for node in nodes:
                        self._spawn(node, env)
                    self._wait_healthy(nodes)
                    if self.manager and group == MANAGER:
                        self.session = session = self._provision(nodes[0])
                    elif self.manager and group == "scheduler":
                        self._wait_registered(self.node(MANAGER), session)
                self._note_host_ids()
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

    def manager_api(self, method: str, path: str, body: Any = None) -> Any:
        """A call to the cluster's manager as root (ClusterError naming the answer)."""
        return _call(self.node(MANAGER).info["url"], method, path, body, self.session)

    def _note_host_ids(self) -> None:
        """Each peer's host ID, from the credential the manager issued it (insecure: the
        one it made itself)."""
        for node in self.nodes:
            if node.role in ("seed-peer", "peer") and self.manager:
                path = self.host_credential(node.name)
                if path.exists():
                    node.info["host_id"] = read_credential_file(path).claims.host_id
                else:
                    own = Path(node.info["data_dir"]) / "host-id"
                    node.info["host_id"] = own.read_text().strip() if own.exists() else ""

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
        manager = [n.info for n in self.nodes if n.role == MANAGER]
        return {
            "manager": manager[0] if manager else None,
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


def _call(base: str, method: str, path: str, body: Any, session: str | None = None) -> Any:
    """One JSON call to the manager's API (ClusterError naming the answer otherwise)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method)
    request.add_header("content-type", "application/json")
    if session is not None:
        request.add_header("authorization", f"Bearer {session}")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            raw = answer.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:500]
        raise ClusterError(f"manager: {method} {path}: {exc.code} {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ClusterError(f"manager: {method} {path}: {exc}") from None
    return json.loads(raw) if raw else None


def manager_help(manager: Node, *, show_password: bool = False) -> str:
    """Where the manager is and how to use its API with curl (docs/API.md has every
    route): sign in as root, make a personal access token, list what it knows."""
    url, path = manager.info["url"], manager.info["root_password_file"]
    password = Path(path).read_text().strip() if show_password else f"$(cat {path})"
    shown = f"password {password} (also in {path})" if show_password else f"password in {path}"
    json_field = "python3 -c 'import json,sys; print(json.load(sys.stdin)[\"token\"])'"
    return "\n".join(
        [
            f"manager: {url}   user root, {shown}",
            f"  M={url}",
            f"  TOKEN=$(curl -s $M/api/v1/users/signin -d "
            f'"{{\\"name\\":\\"root\\",\\"password\\":\\"{password}\\"}}" | {json_field})',
            '  PAT=$(curl -s -H "Authorization: Bearer $TOKEN" $M/api/v1/personal-access-tokens '
            f'-d \'{{"name":"cli","expired_at":"2099-01-01T00:00:00Z"}}\' | {json_field})',
            '  curl -s -H "Authorization: Bearer $TOKEN" $M/api/v1/schedulers',
            '  curl -s -H "Authorization: Bearer $TOKEN" $M/api/v1/peers',
            '  curl -s -H "Authorization: Bearer $PAT" $M/oapi/v1/clusters',
        ]
    )


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
    manager: bool = True,
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
        manager=manager,
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
    if cluster.manager:
        print(manager_help(cluster.node(MANAGER)), flush=True)
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
