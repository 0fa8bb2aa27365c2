"""A manager for tests: the real server in-process on a free port (its API over a real
socket), a small JSON client for its API, and helpers to sign in and make users and
tokens."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from dragonfly.config import ManagerConfig, PeerConfig, RoleConfig, SchedulerConfig, load_config
from dragonfly.credentials import write_private_text
from dragonfly.manager.server import ManagerServer
from dragonfly.net.channel import Channel, connect
from dragonfly.net.handshake import authenticate
from dragonfly.net.http_client import HTTPClient
from dragonfly.net.manager_client import manager_hello, websocket_url
from dragonfly.testing.nginx import free_port
from dragonfly.testing.process import spawn_logged
from dragonfly.testing.trust import LocalIssuer
from dragonfly.trust import Credential, new_nonce

FUTURE = "2099-01-01T00:00:00Z"
PAST = "2001-01-01T00:00:00Z"


@dataclass
class Reply:
    status: int
    headers: Any
    raw: bytes

    @property
    def body(self) -> Any:
        return json.loads(self.raw) if self.raw else None


@dataclass
class Api:
    base: str
    client: HTTPClient = field(default_factory=lambda: HTTPClient(read_timeout=30))

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        headers: list[tuple[str, str]] | None = None,
        raw: bytes | None = None,
    ) -> Reply:
        hdrs = list(headers or [])
        if token is not None:
            hdrs.append(("authorization", f"Bearer {token}"))
        data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        if data:
            hdrs.append(("content-type", "application/json"))
        async with self.client.request(
            method, self.base + path, hdrs, data, follow_redirects=False
        ) as response:
            content = await response.read()
            return Reply(response.status, response.headers, content)

    async def signin(self, name: str, password: str) -> str:
        reply = await self.call(
            "POST", "/api/v1/users/signin", {"name": name, "password": password}
        )
        assert reply.status == 200, reply.raw
        return str(reply.body["token"])

    async def add_user(self, root: str, name: str, password: str = "guest-password-1") -> int:
        reply = await self.call(
            "POST",
            "/api/v1/users/signup",
            {"name": name, "password": password, "email": f"{name}@example.com"},
            token=root,
        )
        assert reply.status == 200, reply.raw
        return int(reply.body["id"])

    async def add_token(self, session: str, scopes: list[str], expired_at: str = FUTURE) -> str:
        reply = await self.call(
            "POST",
            "/api/v1/personal-access-tokens",
            {
                "name": f"t-{trio.current_time()}-{scopes}",
                "scopes": scopes,
                "expired_at": expired_at,
            },
            token=session,
        )
        assert reply.status == 200, reply.raw
        return str(reply.body["token"])

    async def aclose(self) -> None:
        await self.client.aclose()


@dataclass
class RunningManager:
    server: ManagerServer
    config: ManagerConfig
    api: Api
    scope: trio.CancelScope

    @property
    def url(self) -> str:
        return self.api.base

    @property
    def root_password(self) -> str:
        return (Path(self.config.data.dir) / "root-password").read_text().strip()

    async def root(self) -> str:
        return await self.api.signin("root", self.root_password)

    def stop(self) -> None:
        self.scope.cancel()


def manager_config(data_dir: Path, *overrides: str) -> ManagerConfig:
    """The manager issues under the secret of LocalIssuer(DATA_DIR/../trust), so a test's
    offline credentials (tests/integration/test_manager_members.py's `issuer`) are its."""
    secret = LocalIssuer(data_dir.parent / "trust").secret_file
    cfg = load_config(
        "manager",
        env={},
        overrides=[
            f"data.dir={data_dir}",
            "server.port=0",
            f"trust.secret_file={secret}",
            *overrides,
        ],
    )
    assert isinstance(cfg, ManagerConfig)
    return cfg


async def start_manager(nursery: trio.Nursery, data_dir: Path, *overrides: str) -> RunningManager:
    cfg = manager_config(data_dir, *overrides)
    server = ManagerServer(cfg)
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await server.run(task_status=task_status)

    port = await nursery.start(run)
    return RunningManager(server, cfg, Api(f"http://127.0.0.1:{port}"), scope)


def spawn_manager(
    workdir: Path, *overrides: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """A manager as its own process (`python -m dragonfly --role manager`) on a free
    port; returns it and its URL (stop it by PID)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = [sys.executable, "-m", "dragonfly", "--role", "manager"]
    for item in (f"data.dir={workdir / 'data'}", f"server.port={port}", *overrides):
        argv += ["--set", item]
    process = spawn_logged(argv, workdir / "manager.log", env={**os.environ, **(env or {})})
    return process, f"http://127.0.0.1:{port}"


async def wait_healthy(api: Api, process: subprocess.Popen[bytes], rounds: int = 300) -> None:
    for _ in range(rounds):
        if process.poll() is not None:
            raise AssertionError(f"manager exited with {process.returncode}")
        try:
            if (await api.call("GET", "/healthy")).status == 200:
                return
        except OSError:
            pass
        except Exception as exc:  # the client's connection errors
            if "connect" not in str(exc):
                raise
        await trio.sleep(0.05)
    raise AssertionError("manager never became healthy")


def issuer_of(manager: RunningManager) -> LocalIssuer:
    """The secret the manager issues under (its trust.secret_file) and credentials made
    from it, as a host that joined would hold."""
    return LocalIssuer(Path(manager.config.data.dir).parent / "trust")


@asynccontextmanager
async def member_channel(
    manager: str, role: str, credential: Credential | None
) -> AsyncIterator[Channel]:
    """The manager's websocket as a host opens it: Hellos, then (with a credential) the
    proofs both ways."""
    nonce = new_nonce()
    async with connect(websocket_url(manager), manager_hello(role, credential, nonce)) as channel:
        if credential is not None:
            await authenticate(channel, credential, nonce, who="manager")
        yield channel


def metric_value(text: bytes, name: str) -> float:
    m = re.search(rb"^" + re.escape(name.encode()) + rb" ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


async def join_token_file(manager: RunningManager, root: str, role: str, directory: Path) -> Path:
    """A new join token for `role` (root rotates it), written 0600 where a host reads it."""
    reply = await manager.api.call("POST", f"/api/v1/join-tokens/{role}", token=root)
    assert reply.status == 200, reply.raw
    path = directory / f"join-{role}.token"
    write_private_text(path, reply.body["token"] + "\n", replace=True)
    return path


def member_config(manager: RunningManager, role: str, token: Path, *extra: str) -> RoleConfig:
    """A scheduler, seed peer or peer that joins `manager` with `token` and, a peer, finds
    its schedulers through it (on free ports)."""
    if role == "scheduler":
        sets = ["server.port=0", f"manager.address={manager.url}"]
    else:
        sets = [
            "proxy.port=0",
            "upload.port=0",
            "scheduler.addresses=[]",
            f"scheduler.manager={manager.url}",
        ]
    return load_config(role, env={}, overrides=[*sets, f"trust.join_token_file={token}", *extra])


async def start_scheduler(nursery: trio.Nursery, cfg: RoleConfig) -> tuple[Any, trio.CancelScope]:
    """A scheduler in-process (it joins first); its server and a scope that stops it."""
    from dragonfly.nursery.scheduler import SchedulerServer

    assert isinstance(cfg, SchedulerConfig)
    server = SchedulerServer(cfg)
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await server.run(task_status=task_status)
            await trio.sleep_forever()

    await nursery.start(run)
    return server, scope


async def start_peer(nursery: trio.Nursery, cfg: RoleConfig) -> tuple[Any, trio.CancelScope]:
    """A peer daemon in-process (it joins first); the daemon and a scope that stops it."""
    from dragonfly.nursery.peer import PeerDaemon

    assert isinstance(cfg, PeerConfig)
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await PeerDaemon(cfg).run(task_status=task_status)

    daemon = await nursery.start(run)
    return daemon, scope


async def until(check: Any, what: str, rounds: int = 300, step: float = 0.05) -> Any:
    """Poll `check()` (sync or async) until it returns something true (bounded)."""
    for _ in range(rounds):
        got = check()
        if hasattr(got, "__await__"):
            got = await got
        if got:
            return got
        await trio.sleep(step)
    raise AssertionError(f"never: {what}")
