"""/api/v1/schedulers, /api/v1/seed-peers, /api/v1/peers (and scheduler-features).

Schedulers and seed peers add themselves over the manager's websocket
(dragonfly/manager/members.py) and are shown here with their state, features,
version and last keepalive; an operator may also add, change or remove rows here.
`ip` is the address the manager saw a member connect from; `claimed_ip` what the
member said of itself.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dragonfly.manager import guard, member_feed
from dragonfly.manager.context import context
from dragonfly.manager.http import empty_response, json_response, rfc3339
from dragonfly.manager.routes.crud import Resource, header, require_row
from dragonfly.manager.store import Tx, rows

DEFAULT_FEATURES = ["schedule", "preheat"]
STATES = ("active", "inactive")
HostName = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
Text = Annotated[str, msgspec.Meta(max_length=1024)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
OptPort = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Ip = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
ClusterId = Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
Features = Annotated[list[Annotated[str, msgspec.Meta(max_length=64)]], msgspec.Meta(max_length=16)]
UNSET: Any = msgspec.UNSET


def _check_ip(ip: Any) -> None:
    if isinstance(ip, str):
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise ValueError(f"ip: not an IP address: {ip[:64]!r}") from None


class CreateScheduler(msgspec.Struct):
    host_name: HostName
    ip: Ip
    port: Port
    scheduler_cluster_id: ClusterId
    idc: Text = ""
    location: Text = ""
    features: Features = msgspec.field(default_factory=lambda: list(DEFAULT_FEATURES))

    def __post_init__(self) -> None:
        _check_ip(self.ip)


class UpdateScheduler(msgspec.Struct):
    ip: Ip | msgspec.UnsetType = UNSET
    port: Port | msgspec.UnsetType = UNSET
    scheduler_cluster_id: ClusterId | msgspec.UnsetType = UNSET
    idc: Text | msgspec.UnsetType = UNSET
    location: Text | msgspec.UnsetType = UNSET
    features: Features | msgspec.UnsetType = UNSET

    def __post_init__(self) -> None:
        _check_ip(self.ip)


class CreateSeedPeer(msgspec.Struct):
    host_name: HostName
    ip: Ip
    port: Port
    download_port: Port
    seed_peer_cluster_id: ClusterId
    type: Annotated[str, msgspec.Meta(pattern="^super$")] = "super"
    idc: Text = ""
    location: Text = ""
    object_storage_port: OptPort = 0

    def __post_init__(self) -> None:
        _check_ip(self.ip)


class UpdateSeedPeer(msgspec.Struct):
    ip: Ip | msgspec.UnsetType = UNSET
    port: Port | msgspec.UnsetType = UNSET
    download_port: Port | msgspec.UnsetType = UNSET
    seed_peer_cluster_id: ClusterId | msgspec.UnsetType = UNSET
    idc: Text | msgspec.UnsetType = UNSET
    location: Text | msgspec.UnsetType = UNSET
    object_storage_port: OptPort | msgspec.UnsetType = UNSET

    def __post_init__(self) -> None:
        _check_ip(self.ip)


class CreatePeer(msgspec.Struct):
    host_name: HostName
    type: Annotated[str, msgspec.Meta(pattern="^(super|normal)$")]
    ip: Ip
    port: Port
    download_port: Port
    proxy_port: Port
    scheduler_cluster_id: ClusterId
    idc: Text = ""
    location: Text = ""
    object_storage_port: OptPort = 0
    state: Annotated[str, msgspec.Meta(pattern="^(active|inactive)$")] = "inactive"
    os: Text = ""
    platform: Text = ""
    platform_family: Text = ""
    platform_version: Text = ""
    kernel_version: Text = ""
    git_version: Text = ""
    git_commit: Text = ""
    build_platform: Text = ""

    def __post_init__(self) -> None:
        _check_ip(self.ip)


def render_scheduler(row: dict[str, Any]) -> dict[str, Any]:
    return {
        **header(row),
        "host_name": row["host_name"],
        "idc": row["idc"],
        "location": row["location"],
        "ip": row["ip"],
        "claimed_ip": row["claimed_ip"],
        "port": row["port"],
        "state": row["state"],
        "features": rows.loads(row["features"]),
        "version": row["version"],
        "last_keep_alive_at": rfc3339(row["last_keep_alive_at"]),
        "scheduler_cluster_id": row["scheduler_cluster_id"],
    }


def render_seed_peer(row: dict[str, Any]) -> dict[str, Any]:
    keys = ("host_name", "type", "idc", "location", "ip", "claimed_ip", "port")
    more = ("download_port", "object_storage_port", "state", "version", "seed_peer_cluster_id")
    return {
        **header(row),
        **{k: row[k] for k in (*keys, *more)},
        "last_keep_alive_at": rfc3339(row["last_keep_alive_at"]),
    }


PEER_FIELDS = (
    *tuple(f for f in CreatePeer.__struct_fields__ if f not in ("scheduler_cluster_id",)),
    "scheduler_cluster_id",
)


def render_peer(row: dict[str, Any]) -> dict[str, Any]:
    return {
        **header(row),
        **{k: row[k] for k in PEER_FIELDS},
        "host_id": row["host_id"] or "",  # (none for a row made through the API)
        "last_seen_at": rfc3339(row["last_seen_at"]),
    }


def _scheduler_row(values: dict[str, Any], _: guard.Principal) -> dict[str, Any]:
    if "features" in values:
        values = {**values, "features": rows.dumps(values["features"])}
    return values


def _check_scheduler_cluster(tx: Tx, values: dict[str, Any]) -> None:
    if "scheduler_cluster_id" in values:
        require_row(tx, "scheduler_clusters", values["scheduler_cluster_id"], "scheduler cluster")


def _check_seed_peer_cluster(tx: Tx, values: dict[str, Any]) -> None:
    if "seed_peer_cluster_id" in values:
        require_row(tx, "seed_peer_clusters", values["seed_peer_cluster_id"], "seed peer cluster")


SCHEDULERS = Resource(
    "schedulers",
    render_scheduler,
    CreateScheduler,
    UpdateScheduler,
    filters={
        "host_name": "str",
        "idc": "str",
        "location": "str",
        "ip": "str",
        "state": STATES,
        "scheduler_cluster_id": "int",
    },
    to_row=_scheduler_row,
    check=_check_scheduler_cluster,
)
SEED_PEERS = Resource(
    "seed_peers",
    render_seed_peer,
    CreateSeedPeer,
    UpdateSeedPeer,
    filters={
        "host_name": "str",
        "type": ("super",),
        "idc": "str",
        "location": "str",
        "ip": "str",
        "port": "int",
        "download_port": "int",
        "state": STATES,
        "seed_peer_cluster_id": "int",
    },
    check=_check_seed_peer_cluster,
)
PEERS = Resource(
    "peers",
    render_peer,
    CreatePeer,
    filters={
        "host_name": "str",
        "type": ("super", "normal"),
        "idc": "str",
        "location": "str",
        "ip": "str",
        "state": STATES,
        "scheduler_cluster_id": "int",
        "host_id": "str",
    },
    check=_check_scheduler_cluster,
)


async def sync_peers(request: Request) -> Response:
    """Ask every scheduler for the hosts connected to it now (each manager passes the
    request on at its schedulers' next keepalive); the peers table follows."""
    await guard.authorize(request)
    ctx = context(request)
    now = ctx.clock()
    await ctx.db.run(lambda tx: member_feed.request_sync(tx, now))
    return empty_response()


async def scheduler_features(request: Request) -> Response:
    await guard.authorize(request)
    return json_response(DEFAULT_FEATURES)


ROUTES = [
    *SCHEDULERS.routes("/api/v1/schedulers"),
    *SEED_PEERS.routes("/api/v1/seed-peers"),
    Route("/api/v1/peers/sync", sync_peers, methods=["POST"]),
    *PEERS.routes("/api/v1/peers", patch=False),
    Route("/api/v1/scheduler-features", scheduler_features, methods=["GET"]),
]
