"""What the manager tells its hosts, read from the database: a cluster's settings
(`ClusterConfig`), the revoked hosts, and whether schedulers were asked to report
their hosts. Each comes with a revision, so a member session (checked at every
keepalive) sends only what changed since it last sent it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from dragonfly.manager.models import (
    BlockList,
    PeerClusterConfig,
    SchedulerClusterConfig,
    SeedClientConfig,
    SeedPeerClusterConfig,
    builtins,
    stored,
)
from dragonfly.manager.store import Tx
from dragonfly.wire.messages import BlockRules, ClusterConfig, RevokedHost

SYNC_REQUEST = "sync_peers"


def _rules(block_list: BlockList) -> BlockRules:
    download = block_list.task.download
    return BlockRules(
        applications=list(download.applications),
        urls=list(download.urls),
        tags=list(download.tags),
        priorities=list(download.priorities),
    )


def cluster_config(tx: Tx, cluster_id: int) -> ClusterConfig | None:
    """The settings of scheduler cluster `cluster_id` for its hosts (None: no such cluster).
    The seed peers' load limit is that of the first seed peer cluster linked to it."""
    row = tx.one(
        "SELECT id, config, client_config, seed_client_config FROM scheduler_clusters WHERE id = ?",
        [cluster_id],
    )
    if row is None:
        return None
    seed = tx.one(
        "SELECT c.config FROM seed_peer_clusters c JOIN scheduler_cluster_seed_peer_clusters a "
        "ON a.seed_peer_cluster_id = c.id WHERE a.scheduler_cluster_id = ? ORDER BY c.id LIMIT 1",
        [cluster_id],
    )
    scheduling = stored(SchedulerClusterConfig, row["config"])
    peers = stored(PeerClusterConfig, row["client_config"])
    seeds = stored(SeedClientConfig, row["seed_client_config"])
    seed_limit = (
        stored(SeedPeerClusterConfig, seed["config"]) if seed else SeedPeerClusterConfig()
    ).load_limit
    parts: dict[str, Any] = {
        "scheduling": builtins(scheduling),
        "peers": builtins(peers),
        "seeds": builtins(seeds),
        "seed_limit": seed_limit,
    }
    revision = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return ClusterConfig(
        cluster_id=int(row["id"]),
        candidate_parent_limit=scheduling.candidate_parent_limit,
        filter_parent_limit=scheduling.filter_parent_limit,
        peer_load_limit=peers.load_limit,
        seed_peer_load_limit=seed_limit,
        peer_block=_rules(peers.block_list),
        seed_peer_block=_rules(seeds.block_list),
        revision=revision,
    )


def revocations_revision(tx: Tx) -> tuple[int, int]:
    """Changes whenever a revocation is added or removed."""
    row = tx.one("SELECT COUNT(*) AS n, COALESCE(MAX(id), 0) AS top FROM revocations")
    return (int(row["n"]), int(row["top"])) if row else (0, 0)


def revoked_hosts(tx: Tx) -> list[RevokedHost]:
    return [
        RevokedHost(host_id=r["host_id"], before=int(r["created_at"]))
        for r in tx.query("SELECT host_id, created_at FROM revocations ORDER BY id")
    ]


def revoked_before(tx: Tx, host_id: str) -> int | None:
    """The time up to which `host_id`'s credentials are revoked, if they are."""
    row = tx.one("SELECT created_at FROM revocations WHERE host_id = ?", [host_id])
    return int(row["created_at"]) if row else None


def request_sync(tx: Tx, now: float) -> None:
    """Ask every scheduler (through whichever manager it is connected to) for its hosts."""
    tx.execute(
        "INSERT INTO requests (name, requested_at) VALUES (?, ?) "
        "ON CONFLICT (name) DO UPDATE SET requested_at = excluded.requested_at",
        [SYNC_REQUEST, now],
    )


def sync_requested_at(tx: Tx) -> float:
    row = tx.one("SELECT requested_at FROM requests WHERE name = ?", [SYNC_REQUEST])
    return float(row["requested_at"]) if row else 0.0
