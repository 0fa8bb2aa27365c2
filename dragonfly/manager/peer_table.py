"""The peers table, kept from the schedulers' view: each scheduler reports the hosts
connected to it (`HostsReport`, every `peers.report_interval` and when asked); a
reported host is active, one no scheduler reported for `peers.timeout` inactive, and
removed after `peers.remove_after` inactive. Rows are keyed by host ID and cluster
(several daemons can share a host name and address); rows an operator made through
the API have no host ID and are left alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dragonfly.manager.store import Tx
from dragonfly.wire.messages import HostEntry, HostInfo

_COLUMNS = (
    "created_at",
    "updated_at",
    "host_id",
    "host_name",
    "type",
    "idc",
    "location",
    "ip",
    "port",
    "download_port",
    "proxy_port",
    "state",
    "git_version",
    "last_seen_at",
    "scheduler_cluster_id",
)
_KEEP = ("created_at", "host_id", "scheduler_cluster_id")
_UPSERT = (
    f"INSERT INTO peers ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' for _ in _COLUMNS)}) "
    "ON CONFLICT (host_id, scheduler_cluster_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS if c not in _KEEP)
)


def _values(host: HostInfo | HostEntry, cluster_id: int, now: float) -> list[Any]:
    return [
        now,
        now,
        host.host_id,
        host.hostname,
        "super" if host.seed else "normal",
        host.idc,
        host.location,
        host.ip,
        host.upload_port,
        host.upload_port,
        host.proxy_port or 0,
        "active",
        host.version,
        now,
        cluster_id,
    ]


def record(tx: Tx, hosts: Sequence[HostInfo | HostEntry], cluster_id: int, now: float) -> int:
    """Upsert the hosts a scheduler of `cluster_id` reported; returns how many."""
    for host in hosts:
        tx.execute(_UPSERT, _values(host, cluster_id, now))
    return len(hosts)


def sync(tx: Tx, hosts: Sequence[HostInfo | HostEntry], cluster_id: int, now: float) -> int:
    """The whole of a cluster's hosts (a sync_peers job): these active, the cluster's
    other reported rows inactive."""
    record(tx, hosts, cluster_id, now)
    ids = sorted({h.host_id for h in hosts})
    sql = (
        "UPDATE peers SET state = 'inactive', updated_at = ? WHERE scheduler_cluster_id = ? "
        "AND host_id IS NOT NULL AND state <> 'inactive'"
    )
    if ids:
        sql += f" AND host_id NOT IN ({', '.join('?' for _ in ids)})"
    tx.execute(sql, [now, cluster_id, *ids])
    return len(hosts)


def sweep(tx: Tx, now: float, timeout: float, remove_after: float) -> dict[str, int]:
    return {
        "peer_inactive": tx.execute(
            "UPDATE peers SET state = 'inactive', updated_at = ? WHERE host_id IS NOT NULL "
            "AND state = 'active' AND last_seen_at < ?",
            [now, now - timeout],
        ),
        "peer_removed": tx.execute(
            "DELETE FROM peers WHERE host_id IS NOT NULL AND state = 'inactive' AND updated_at < ?",
            [now - remove_after],
        ),
    }
