"""/api/v1/scheduler-clusters and /api/v1/seed-peer-clusters, and their associations.

A scheduler cluster holds the scopes discovery ranks by and the configs its
schedulers and peers apply (parent limits, job rate limit, load limits, block
lists); a seed peer cluster holds its seed peers' load limit. A cluster with
members cannot be deleted (409): remove or move them first.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dragonfly.manager import guard
from dragonfly.manager.context import context
from dragonfly.manager.http import ApiError, empty_response, path_id
from dragonfly.manager.models import (
    PeerClusterConfig,
    SchedulerClusterConfig,
    Scopes,
    SeedClientConfig,
    SeedPeerClusterConfig,
    builtins,
    stored,
)
from dragonfly.manager.routes.crud import Resource, header, require_row
from dragonfly.manager.store import Tx, rows

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
Bio = Annotated[str, msgspec.Meta(max_length=1024)]
Id = Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
UNSET: Any = msgspec.UNSET
JSON_COLUMNS = ("config", "client_config", "seed_client_config", "scopes")


class CreateSchedulerCluster(msgspec.Struct):
    name: Name
    bio: Bio = ""
    config: SchedulerClusterConfig = msgspec.field(default_factory=SchedulerClusterConfig)
    client_config: PeerClusterConfig = msgspec.field(default_factory=PeerClusterConfig)
    seed_client_config: SeedClientConfig = msgspec.field(default_factory=SeedClientConfig)
    scopes: Scopes = msgspec.field(default_factory=Scopes)
    is_default: bool = False
    seed_peer_cluster_id: Id | None = None


class UpdateSchedulerCluster(msgspec.Struct):
    name: Name | msgspec.UnsetType = UNSET
    bio: Bio | msgspec.UnsetType = UNSET
    config: SchedulerClusterConfig | msgspec.UnsetType = UNSET
    client_config: PeerClusterConfig | msgspec.UnsetType = UNSET
    seed_client_config: SeedClientConfig | msgspec.UnsetType = UNSET
    scopes: Scopes | msgspec.UnsetType = UNSET
    is_default: bool | msgspec.UnsetType = UNSET
    seed_peer_cluster_id: Id | msgspec.UnsetType = UNSET


class CreateSeedPeerCluster(msgspec.Struct):
    name: Name
    bio: Bio = ""
    config: SeedPeerClusterConfig = msgspec.field(default_factory=SeedPeerClusterConfig)


class UpdateSeedPeerCluster(msgspec.Struct):
    name: Name | msgspec.UnsetType = UNSET
    bio: Bio | msgspec.UnsetType = UNSET
    config: SeedPeerClusterConfig | msgspec.UnsetType = UNSET


def scheduler_cluster_documents(row: dict[str, Any]) -> dict[str, Any]:
    """The stored JSON columns, decoded with defaults filled in."""
    return {
        "config": builtins(stored(SchedulerClusterConfig, row["config"])),
        "client_config": builtins(stored(PeerClusterConfig, row["client_config"])),
        "seed_client_config": builtins(stored(SeedClientConfig, row["seed_client_config"])),
        "scopes": builtins(stored(Scopes, row["scopes"])),
    }


def render_scheduler_cluster(row: dict[str, Any]) -> dict[str, Any]:
    return {
        **header(row),
        "name": row["name"],
        "bio": row["bio"],
        **scheduler_cluster_documents(row),
        "is_default": bool(row["is_default"]),
        "seed_peer_clusters": row.get("seed_peer_clusters", []),
        "schedulers": None,
        "peers": None,
        "jobs": None,
    }


def render_seed_peer_cluster(row: dict[str, Any]) -> dict[str, Any]:
    return {
        **header(row),
        "name": row["name"],
        "bio": row["bio"],
        "config": builtins(stored(SeedPeerClusterConfig, row["config"])),
        "scheduler_clusters": None,
        "seed_peer": None,
        "jobs": None,
    }


def cluster_values(values: dict[str, Any]) -> dict[str, Any]:
    """Request fields → columns: documents as JSON text, is_default as 0/1."""
    out = dict(values)
    for column in JSON_COLUMNS:
        if column in out:
            out[column] = rows.dumps(builtins(out[column]))
    if "is_default" in out:
        out["is_default"] = int(out["is_default"])
    return out


def associate(tx: Tx, scheduler_cluster_id: int, seed_peer_cluster_id: int) -> None:
    require_row(tx, "seed_peer_clusters", seed_peer_cluster_id, "seed peer cluster")
    tx.execute(
        "INSERT INTO scheduler_cluster_seed_peer_clusters "
        "(scheduler_cluster_id, seed_peer_cluster_id) VALUES (?, ?) "
        "ON CONFLICT DO NOTHING",
        [scheduler_cluster_id, seed_peer_cluster_id],
    )


def refuse_if_members(tx: Tx, table: str, column: str, row_id: int, what: str) -> None:
    if tx.one(f"SELECT id FROM {table} WHERE {column} = ? LIMIT 1", [row_id]):
        raise ApiError(409, f"{what} {row_id} still has {table.replace('_', ' ')}")


def _scheduler_cluster_gone(tx: Tx, row_id: int) -> None:
    refuse_if_members(tx, "schedulers", "scheduler_cluster_id", row_id, "scheduler cluster")
    tx.execute("DELETE FROM peers WHERE scheduler_cluster_id = ?", [row_id])


def _seed_peer_cluster_gone(tx: Tx, row_id: int) -> None:
    refuse_if_members(tx, "seed_peers", "seed_peer_cluster_id", row_id, "seed peer cluster")


def _associate_requested(tx: Tx, row: dict[str, Any], given: dict[str, Any]) -> None:
    seed_peer_cluster_id = given.get("seed_peer_cluster_id")
    if seed_peer_cluster_id:
        associate(tx, row["id"], seed_peer_cluster_id)


def _with_seed_peer_clusters(tx: Tx, found: list[dict[str, Any]]) -> None:
    for row in found:
        linked = tx.query(
            "SELECT c.* FROM seed_peer_clusters c JOIN scheduler_cluster_seed_peer_clusters a "
            "ON a.seed_peer_cluster_id = c.id WHERE a.scheduler_cluster_id = ? ORDER BY c.id",
            [row["id"]],
        )
        row["seed_peer_clusters"] = [render_seed_peer_cluster(r) for r in linked]


def _scheduler_cluster_row(values: dict[str, Any], _: guard.Principal) -> dict[str, Any]:
    values = dict(values)
    values.pop("seed_peer_cluster_id", None)
    return cluster_values(values)


SCHEDULER_CLUSTERS = Resource(
    "scheduler_clusters",
    render_scheduler_cluster,
    CreateSchedulerCluster,
    UpdateSchedulerCluster,
    filters={"name": "str"},
    to_row=_scheduler_cluster_row,
    before_delete=_scheduler_cluster_gone,
    after_write=_associate_requested,
    enrich=_with_seed_peer_clusters,
)
SEED_PEER_CLUSTERS = Resource(
    "seed_peer_clusters",
    render_seed_peer_cluster,
    CreateSeedPeerCluster,
    UpdateSeedPeerCluster,
    filters={"name": "str"},
    to_row=lambda values, _: cluster_values(values),
    before_delete=_seed_peer_cluster_gone,
)


def _move_member(
    cluster_table: str, member_table: str, member_param: str, column: str
) -> Callable[[Request], Awaitable[Response]]:
    """PUT /<clusters>/:id/<members>/:member_id: move a member into this cluster."""

    async def move(request: Request) -> Response:
        await guard.authorize(request)
        cluster_id, member_id = path_id(request), path_id(request, member_param)
        ctx = context(request)
        now = ctx.clock()

        def update(tx: Tx) -> None:
            rows.get(tx, cluster_table, cluster_id)
            rows.update(tx, member_table, member_id, {column: cluster_id}, now)

        await ctx.db.run(update)
        return empty_response()

    return move


add_scheduler = _move_member(
    "scheduler_clusters", "schedulers", "scheduler_id", "scheduler_cluster_id"
)
add_seed_peer = _move_member(
    "seed_peer_clusters", "seed_peers", "seed_peer_id", "seed_peer_cluster_id"
)


async def add_scheduler_cluster(request: Request) -> Response:
    await guard.authorize(request)
    seed_cluster_id = path_id(request)
    cluster_id = path_id(request, "scheduler_cluster_id")
    ctx = context(request)

    def link(tx: Tx) -> None:
        rows.get(tx, "scheduler_clusters", cluster_id)
        associate(tx, cluster_id, seed_cluster_id)

    await ctx.db.run(link)
    return empty_response()


ROUTES = [
    *SCHEDULER_CLUSTERS.routes("/api/v1/scheduler-clusters"),
    Route(
        "/api/v1/scheduler-clusters/{id}/schedulers/{scheduler_id}", add_scheduler, methods=["PUT"]
    ),
    *SEED_PEER_CLUSTERS.routes("/api/v1/seed-peer-clusters"),
    Route(
        "/api/v1/seed-peer-clusters/{id}/seed-peers/{seed_peer_id}", add_seed_peer, methods=["PUT"]
    ),
    Route(
        "/api/v1/seed-peer-clusters/{id}/scheduler-clusters/{scheduler_cluster_id}",
        add_scheduler_cluster,
        methods=["PUT"],
    ),
]
