"""What an outsider (or a member) does by hand against a running cluster: speak the
scheduler's and the upload port's websockets with the project's own wire messages,
and read the daemons' logs and metrics."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import trio
import trio_websocket

from dragonfly.cluster import Cluster
from dragonfly.net.channel import connect
from dragonfly.peer.scheduler_client import authenticate, scheduler_hello
from dragonfly.trust import Credential, new_nonce
from dragonfly.wire.codec import MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, Message, decode, encode
from dragonfly.wire.messages import Hello, HostInfo


def host_info(host_id: str, *, seed: bool = False, port: int = 9) -> HostInfo:
    return HostInfo(host_id=host_id, hostname=host_id, ip="127.0.0.1", upload_port=port, seed=seed)


def hello(host: HostInfo | None, role: str = "peer") -> Hello:
    """A Hello as someone without a credential sends it."""
    return Hello(
        version=PROTOCOL_VERSION,
        min_version=MIN_PROTOCOL_VERSION,
        role=role,
        host=host,
        nonce=b"\x00" * 32,
    )


def scheduler_url(cluster: Cluster) -> str:
    return cluster.node("scheduler-0").info["url"] + "/v1/scheduler"


async def speak(
    url: str,
    first: Message,
    then: Sequence[Message] = (),
    *,
    listen: float = 10.0,
    connected: trio.Event | None = None,
    received: list[Message] | None = None,
) -> tuple[list[Message], bool]:
    """Send `first` and `then` on a websocket to `url` and collect what comes back (into
    `received`, as it comes) for up to `listen` seconds. Returns (the messages, whether
    the other side closed)."""
    received = [] if received is None else received
    closed = False
    with trio.move_on_after(listen):
        async with trio_websocket.open_websocket_url(url) as ws:
            await ws.send_message(encode(first))
            for msg in then:
                await ws.send_message(encode(msg))
            if connected is not None:
                connected.set()
            try:
                while True:
                    received.append(decode(await ws.get_message()))
            except trio_websocket.ConnectionClosed:
                closed = True
    if connected is not None:
        connected.set()
    return received, closed


async def as_member(
    url: str, credential: Credential, host: HostInfo, then: Sequence[Message], *, listen: float
) -> list[Message]:
    """A member with a valid credential: proves it, sends `then`, collects the answers."""
    nonce = new_nonce()
    role = credential.claims.role
    received: list[Message] = []
    async with connect(url, scheduler_hello(host, role, credential, nonce)) as channel:
        await authenticate(channel, credential, nonce)
        for msg in then:
            await channel.send(msg)
        with trio.move_on_after(listen):
            async for msg in channel:
                received.append(msg)
    return received


def log_events(path: Path, event: str | None) -> list[dict[str, object]]:
    """The JSON log lines of a daemon whose event is `event` (None: every line)."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and event in (None, record.get("event")):
            out.append(record)
    return out


def access_log_paths(access_log: Path) -> list[str]:
    """The request paths nginx logged (its `bytes` format: addr "METHOD PATH PROTO" ...)."""
    paths = []
    for line in access_log.read_text().splitlines() if access_log.exists() else []:
        request = line.split('"')[1] if line.count('"') >= 2 else ""
        parts = request.split()
        if len(parts) >= 2:
            paths.append(parts[1])
    return paths
