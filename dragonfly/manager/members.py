"""Schedulers' and seed peers' rows as their websocket sessions change them, the
liveness sweep, and the discovery query.

A member's row is keyed by (host name, the address the manager saw, cluster). Each
connection gets a random `session`; a keepalive or a disconnect only touches the
row while it still belongs to that session, so a member that reconnected (to this
manager or another) is never marked inactive by its old connection's end.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from dragonfly.manager.discovery import ClusterCandidate, HostQuery, rank
from dragonfly.manager.models import Scopes, stored
from dragonfly.manager.store import Tx, rows
from dragonfly.manager.store.rows import NotFound
from dragonfly.wire.messages import AnnounceMember

SCHEDULER, SEED_PEER = "scheduler", "seed-peer"


@dataclass(frozen=True)
class Kind:
    table: str
    cluster_table: str
    cluster_column: str


KINDS = {
    SCHEDULER: Kind("schedulers", "scheduler_clusters", "scheduler_cluster_id"),
    SEED_PEER: Kind("seed_peers", "seed_peer_clusters", "seed_peer_cluster_id"),
}


@dataclass(frozen=True)
class Membership:
    role: str
    member_id: int
    session: str


def register(tx: Tx, role: str, msg: AnnounceMember, source_ip: str, now: float) -> Membership:
    """Insert or take over the member's row, active from this first contact."""
    kind = KINDS[role]
    try:
        rows.get(tx, kind.cluster_table, msg.cluster_id)
    except NotFound:
        raise NotFound(f"{kind.cluster_table[:-1].replace('_', ' ')} {msg.cluster_id}") from None
    session = secrets.token_hex(8)
    values: dict[str, Any] = {
        "created_at": now,
        "updated_at": now,
        "host_name": msg.hostname,
        "idc": msg.idc,
        "location": msg.location,
        "ip": source_ip,
        "claimed_ip": msg.ip,
        "port": msg.port,
        "state": "active",
        "version": msg.version,
        "session": session,
        "last_keep_alive_at": now,
        kind.cluster_column: msg.cluster_id,
    }
    if role == SCHEDULER:
        values["features"] = rows.dumps(list(msg.features))
    else:
        values["download_port"] = msg.download_port
    columns = ", ".join(values)
    marks = ", ".join("?" for _ in values)
    keep = ("created_at", "host_name", "ip", kind.cluster_column)
    updates = ", ".join(f"{c} = excluded.{c}" for c in values if c not in keep)
    row = tx.one(
        f"INSERT INTO {kind.table} ({columns}) VALUES ({marks}) "
        f"ON CONFLICT (host_name, ip, {kind.cluster_column}) DO UPDATE SET {updates} "
        "RETURNING id",
        list(values.values()),
    )
    assert row is not None
    return Membership(role, int(row["id"]), session)


def keepalive(tx: Tx, member: Membership, now: float) -> bool:
    """Record a keepalive; False when the row is no longer this session's."""
    table = KINDS[member.role].table
    return bool(
        tx.execute(
            f"UPDATE {table} SET last_keep_alive_at = ?, "
            "updated_at = CASE WHEN state = 'active' THEN updated_at ELSE ? END, "
            "state = 'active' WHERE id = ? AND session = ?",
            [now, now, member.member_id, member.session],
        )
    )


def disconnected(tx: Tx, member: Membership, now: float) -> None:
    table = KINDS[member.role].table
    tx.execute(
        f"UPDATE {table} SET state = 'inactive', updated_at = ? WHERE id = ? AND session = ?",
        [now, member.member_id, member.session],
    )


def sweep(tx: Tx, now: float, silent_after: float, remove_after: float) -> dict[str, int]:
    """Members silent for `silent_after` become inactive; members inactive for
    `remove_after` are removed. Returns counts by what happened."""
    counts: dict[str, int] = {}
    for role, kind in KINDS.items():
        counts[f"{role}_inactive"] = tx.execute(
            f"UPDATE {kind.table} SET state = 'inactive', updated_at = ? "
            "WHERE state = 'active' AND last_keep_alive_at < ?",
            [now, now - silent_after],
        )
        counts[f"{role}_removed"] = tx.execute(
            f"DELETE FROM {kind.table} WHERE state = 'inactive' AND updated_at < ?",
            [now - remove_after],
        )
    return counts


def _active_schedulers(tx: Tx, cluster_id: int | None) -> list[dict[str, Any]]:
    sql = "SELECT * FROM schedulers WHERE state = 'active'"
    params: list[Any] = []
    if cluster_id is not None:
        sql += " AND scheduler_cluster_id = ?"
        params.append(cluster_id)
    found = tx.query(sql + " ORDER BY id", params)
    return [r for r in found if "schedule" in rows.loads(r["features"])]


def schedulers_for(
    tx: Tx, host: HostQuery, cluster_id: int = 0
) -> tuple[int, list[dict[str, Any]]]:
    """The active schedulers of the cluster that should serve `host` (the one asked
    for, or the best ranked that has any), with that cluster's id; (0, []) if none."""
    if cluster_id:
        found = _active_schedulers(tx, cluster_id)
        return (cluster_id, found) if found else (0, [])
    by_cluster: dict[int, list[dict[str, Any]]] = {}
    for row in _active_schedulers(tx, None):
        by_cluster.setdefault(row["scheduler_cluster_id"], []).append(row)
    if not by_cluster:
        return 0, []
    candidates = []
    marks = ", ".join("?" for _ in by_cluster)
    for row in tx.query(
        f"SELECT id, scopes, is_default FROM scheduler_clusters WHERE id IN ({marks})",
        list(by_cluster),
    ):
        scopes = stored(Scopes, row["scopes"])
        candidates.append(
            ClusterCandidate(
                cluster_id=row["id"],
                idc=scopes.idc,
                location=scopes.location,
                cidrs=tuple(scopes.cidrs),
                hostnames=tuple(scopes.hostnames),
                is_default=bool(row["is_default"]),
            )
        )
    best = rank(host, candidates)[0].cluster_id
    return best, by_cluster[best]
