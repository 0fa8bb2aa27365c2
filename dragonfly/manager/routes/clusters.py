"""/api/v1/clusters and /oapi/v1/clusters: a scheduler cluster and its seed peer
cluster, created, shown, changed and deleted as one (Dragonfly's façade).

The cluster's `id` is its scheduler cluster's. The three config documents are
optional here and take Dragonfly's defaults (Dragonfly requires them); a PATCH
changes only what it names (Dragonfly resets an omitted `is_default` to false).
"""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dragonfly.manager import guard
from dragonfly.manager.context import context
from dragonfly.manager.http import (
    decode,
    empty_response,
    json_response,
    list_response,
    pagination,
    path_id,
    query_str,
)
from dragonfly.manager.models import (
    PeerClusterConfig,
    SchedulerClusterConfig,
    Scopes,
    SeedPeerClusterFacadeConfig,
    builtins,
)
from dragonfly.manager.routes.cluster_parts import (
    Bio,
    Name,
    associate,
    refuse_if_members,
    scheduler_cluster_documents,
)
from dragonfly.manager.routes.crud import header, struct_changes
from dragonfly.manager.store import Tx, rows

UNSET: Any = msgspec.UNSET


class CreateCluster(msgspec.Struct):
    name: Name
    bio: Bio = ""
    scopes: Scopes = msgspec.field(default_factory=Scopes)
    scheduler_cluster_config: SchedulerClusterConfig = msgspec.field(
        default_factory=SchedulerClusterConfig
    )
    seed_peer_cluster_config: SeedPeerClusterFacadeConfig = msgspec.field(
        default_factory=SeedPeerClusterFacadeConfig
    )
    peer_cluster_config: PeerClusterConfig = msgspec.field(default_factory=PeerClusterConfig)
    is_default: bool = False


class UpdateCluster(msgspec.Struct):
    name: Name | msgspec.UnsetType = UNSET
    bio: Bio | msgspec.UnsetType = UNSET
    scopes: Scopes | msgspec.UnsetType = UNSET
    scheduler_cluster_config: SchedulerClusterConfig | msgspec.UnsetType = UNSET
    seed_peer_cluster_config: SeedPeerClusterFacadeConfig | msgspec.UnsetType = UNSET
    peer_cluster_config: PeerClusterConfig | msgspec.UnsetType = UNSET
    is_default: bool | msgspec.UnsetType = UNSET


def _seed_peer_cluster(tx: Tx, cluster_id: int) -> dict[str, Any] | None:
    return tx.one(
        "SELECT c.* FROM seed_peer_clusters c JOIN scheduler_cluster_seed_peer_clusters a "
        "ON a.seed_peer_cluster_id = c.id WHERE a.scheduler_cluster_id = ? ORDER BY c.id LIMIT 1",
        [cluster_id],
    )


def load_cluster(tx: Tx, cluster_id: int) -> dict[str, Any]:
    """The façade of one scheduler cluster (404 if there is none)."""
    row = rows.get(tx, "scheduler_clusters", cluster_id)
    return render(row, _seed_peer_cluster(tx, cluster_id))


def render(row: dict[str, Any], seed: dict[str, Any] | None) -> dict[str, Any]:
    documents = scheduler_cluster_documents(row)
    load_limit = rows.loads(seed["config"]).get("load_limit", 2000) if seed else 2000
    return {
        "id": row["id"],
        "name": row["name"],
        "bio": row["bio"],
        "scopes": documents["scopes"],
        "scheduler_cluster_id": row["id"],
        "seed_peer_cluster_id": seed["id"] if seed else 0,
        "scheduler_cluster_config": documents["config"],
        "seed_peer_cluster_config": {
            "load_limit": load_limit,
            "block_list": documents["seed_client_config"]["block_list"],
        },
        "peer_cluster_config": documents["client_config"],
        "created_at": header(row)["created_at"],
        "updated_at": header(row)["updated_at"],
        "is_default": bool(row["is_default"]),
    }


def _columns(given: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Request fields → (scheduler cluster columns, seed peer cluster columns)."""
    scheduler: dict[str, Any] = {}
    seed: dict[str, Any] = {}
    for key in ("name", "bio"):
        if key in given:
            scheduler[key] = seed[key] = given[key]
    if "scopes" in given:
        scheduler["scopes"] = rows.dumps(builtins(given["scopes"]))
    if "scheduler_cluster_config" in given:
        scheduler["config"] = rows.dumps(builtins(given["scheduler_cluster_config"]))
    if "peer_cluster_config" in given:
        scheduler["client_config"] = rows.dumps(builtins(given["peer_cluster_config"]))
    if "seed_peer_cluster_config" in given:
        facade = given["seed_peer_cluster_config"]
        scheduler["seed_client_config"] = rows.dumps({"block_list": builtins(facade.block_list)})
        seed["config"] = rows.dumps({"load_limit": facade.load_limit})
    if "is_default" in given:
        scheduler["is_default"] = int(given["is_default"])
    return scheduler, seed


async def list_clusters(request: Request) -> Response:
    await guard.authorize(request)
    page, per_page = pagination(request)
    filters = {"name": query_str(request, "name")}

    def load(tx: Tx) -> tuple[list[dict[str, Any]], int]:
        found, total = rows.page(tx, "scheduler_clusters", filters, page, per_page)
        return [render(r, _seed_peer_cluster(tx, r["id"])) for r in found], total

    items, total = await context(request).db.run(load)
    return list_response(request, items, page, per_page, total)


async def get_cluster(request: Request) -> Response:
    await guard.authorize(request)
    cluster_id = path_id(request)
    return json_response(await context(request).db.run(lambda tx: load_cluster(tx, cluster_id)))


def create_in(tx: Tx, body: CreateCluster, now: float) -> dict[str, Any]:
    """Make a cluster (its scheduler and seed peer clusters); its façade."""
    scheduler, seed = _columns(msgspec.structs.asdict(body))
    seed_row = rows.insert(tx, "seed_peer_clusters", seed, now)
    row = rows.insert(tx, "scheduler_clusters", scheduler, now)
    associate(tx, row["id"], seed_row["id"])
    return load_cluster(tx, row["id"])


async def create_cluster(request: Request) -> Response:
    await guard.authorize(request)
    body = await decode(request, CreateCluster)
    ctx = context(request)
    now = ctx.clock()
    return json_response(await ctx.db.run(lambda tx: create_in(tx, body, now)))


def update_in(tx: Tx, cluster_id: int, body: UpdateCluster, now: float) -> dict[str, Any]:
    """Change what `body` names of a cluster; its façade."""
    scheduler, seed = _columns(struct_changes(body))
    rows.update(tx, "scheduler_clusters", cluster_id, scheduler, now)
    seed_row = _seed_peer_cluster(tx, cluster_id)
    if seed:
        if seed_row is None:
            defaults = {"config": rows.dumps(builtins(SeedPeerClusterFacadeConfig()))}
            name = {"name": rows.get(tx, "scheduler_clusters", cluster_id)["name"]}
            seed_row = rows.insert(tx, "seed_peer_clusters", {**name, **defaults, **seed}, now)
            associate(tx, cluster_id, seed_row["id"])
        else:
            if "config" in seed:  # keep what the façade does not show
                old = rows.loads(seed_row["config"])
                seed["config"] = rows.dumps({**old, **rows.loads(seed["config"])})
            rows.update(tx, "seed_peer_clusters", seed_row["id"], seed, now)
    return load_cluster(tx, cluster_id)


async def update_cluster(request: Request) -> Response:
    await guard.authorize(request)
    cluster_id = path_id(request)
    body = await decode(request, UpdateCluster)
    ctx = context(request)
    now = ctx.clock()
    return json_response(await ctx.db.run(lambda tx: update_in(tx, cluster_id, body, now)))


def delete_in(tx: Tx, cluster_id: int) -> None:
    """Remove a cluster without members (409 while it has schedulers or seed peers)."""
    rows.get(tx, "scheduler_clusters", cluster_id)
    refuse_if_members(tx, "schedulers", "scheduler_cluster_id", cluster_id, "cluster")
    seed_row = _seed_peer_cluster(tx, cluster_id)
    if seed_row is not None:
        refuse_if_members(
            tx, "seed_peers", "seed_peer_cluster_id", seed_row["id"], "seed peer cluster"
        )
    tx.execute("DELETE FROM peers WHERE scheduler_cluster_id = ?", [cluster_id])
    rows.delete(tx, "scheduler_clusters", cluster_id)
    if seed_row is not None:
        rows.delete(tx, "seed_peer_clusters", seed_row["id"])


async def delete_cluster(request: Request) -> Response:
    await guard.authorize(request)
    cluster_id = path_id(request)
    await context(request).db.run(lambda tx: delete_in(tx, cluster_id))
    return empty_response()


def _routes(base: str) -> list[Route]:
    return [
        Route(base, list_clusters, methods=["GET"]),
        Route(base, create_cluster, methods=["POST"]),
        Route(f"{base}/{{id}}", get_cluster, methods=["GET"]),
        Route(f"{base}/{{id}}", update_cluster, methods=["PATCH"]),
        Route(f"{base}/{{id}}", delete_cluster, methods=["DELETE"]),
    ]


ROUTES = [*_routes("/api/v1/clusters"), *_routes("/oapi/v1/clusters")]
