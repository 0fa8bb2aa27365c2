"""Job rows and their parts, in one transaction each (functions of a `Tx`).

A job has one part per scheduler cluster. A manager that has a scheduler of that
cluster connected claims the part (an UPDATE that succeeds for one manager only: the
row's claim has lapsed), renews the claim while it runs it, and writes its outcome;
a manager that stops leaves a lapsed claim that another may take. A part no manager
could claim for `jobs.dispatch_timeout` fails, saying so. The job's state follows its
parts: FAILURE when one failed, SUCCESS when all succeeded, else PENDING.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterable
from typing import Any

from dragonfly.manager import peer_table
from dragonfly.manager.jobs.args import Plan
from dragonfly.manager.models import SchedulerClusterConfig, stored
from dragonfly.manager.store import Tx, rows
from dragonfly.manager.store.rows import NotFound
from dragonfly.redact import redact_url
from dragonfly.wire.messages import DownloadRecord, HostEntry

PENDING, RUNNING, SUCCESS, FAILURE = "PENDING", "RUNNING", "SUCCESS", "FAILURE"
JOB_STATES = (PENDING, SUCCESS, FAILURE)
DONE = (SUCCESS, FAILURE)
HOUR = 3600.0


class RateLimited(Exception):
    """A cluster's job_rate_limit (jobs a second) is reached."""


def create_job(
    tx: Tx,
    plan: Plan,
    sealed: str,
    cluster_ids: list[int] | None,
    user_id: int,
    bio: str,
    now: float,
) -> int:
    """Insert a job and its parts, one per cluster named (none named: those with an
    active scheduler); NotFound naming a cluster that does not exist, RateLimited when
    a cluster made its job_rate_limit of jobs in the last second."""
    if cluster_ids:
        clusters = []
        for cid in dict.fromkeys(cluster_ids):
            row = tx.one("SELECT id, config FROM scheduler_clusters WHERE id = ?", [cid])
            if row is None:
                raise NotFound(f"scheduler cluster id {cid}: record not found")
            clusters.append(row)
    else:
        # Every cluster that has an active scheduler (as Dragonfly picks them); if none
        # has, every cluster, each part then failing with its reason.
        clusters = tx.query(
            "SELECT id, config FROM scheduler_clusters WHERE id IN (SELECT "
            "scheduler_cluster_id FROM schedulers WHERE state = 'active') ORDER BY id"
        ) or tx.query("SELECT id, config FROM scheduler_clusters ORDER BY id")
        if not clusters:
            raise NotFound("no scheduler cluster: create one first")
    for cluster in clusters:
        limit = stored(SchedulerClusterConfig, cluster["config"]).job_rate_limit
        recent = tx.one(
            "SELECT COUNT(*) AS n FROM job_parts WHERE scheduler_cluster_id = ? AND created_at > ?",
            [cluster["id"], now - 1.0],
        )
        if recent is not None and int(recent["n"]) >= limit:
            raise RateLimited(f"cluster {cluster['id']}: over {limit} jobs a second")
    job = rows.insert(
        tx,
        "jobs",
        {
            "task_id": f"group_{uuid.uuid4()}",
            "bio": bio,
            "type": plan.type,
            "state": PENDING,
            "args": rows.dumps(plan.shown),
            "secrets": sealed,
            "scheduler_cluster_ids": rows.dumps([c["id"] for c in clusters]),
            "user_id": user_id,
        },
        now,
    )
    for cluster in clusters:
        rows.insert(
            tx,
            "job_parts",
            {"job_id": job["id"], "scheduler_cluster_id": cluster["id"], "state": PENDING},
            now,
        )
    return int(job["id"])


def claimable(tx: Tx, cluster_ids: Iterable[int], now: float, limit: int = 32) -> list[int]:
    """Parts of these clusters that nobody holds (never claimed, or the claim lapsed)."""
    ids = list(cluster_ids)
    if not ids:
        return []
    marks = ", ".join("?" for _ in ids)
    found = tx.query(
        f"SELECT id FROM job_parts WHERE state IN ('{PENDING}', '{RUNNING}') "
        f"AND claimed_until < ? AND scheduler_cluster_id IN ({marks}) ORDER BY id LIMIT ?",
        [now, *ids, limit],
    )
    return [int(r["id"]) for r in found]


def claim(tx: Tx, part_id: int, holder: str, now: float, ttl: float) -> dict[str, Any] | None:
    """The part and its job, if this manager got the claim; None if another has it."""
    taken = tx.execute(
        f"UPDATE job_parts SET holder = ?, claimed_until = ?, state = '{RUNNING}', "
        f"updated_at = ? WHERE id = ? AND state IN ('{PENDING}', '{RUNNING}') "
        "AND claimed_until < ?",
        [holder, now + ttl, now, part_id, now],
    )
    if not taken:
        return None
    part = rows.get(tx, "job_parts", part_id)
    job = rows.get(tx, "jobs", part["job_id"])
    return {"part": part, "job": job}


def renew(tx: Tx, part_id: int, holder: str, now: float, ttl: float) -> bool:
    return bool(
        tx.execute(
            f"UPDATE job_parts SET claimed_until = ? WHERE id = ? AND holder = ? "
            f"AND state = '{RUNNING}'",
            [now + ttl, part_id, holder],
        )
    )


def finish_part(
    tx: Tx,
    part_id: int,
    holder: str,
    *,
    state: str,
    error: str,
    results: list[dict[str, Any]],
    details: dict[str, Any],
    scheduler_id: int,
    now: float,
) -> bool:
    """Write a part's outcome (only while this manager holds it) and its job's state."""
    done = tx.execute(
        "UPDATE job_parts SET state = ?, error = ?, results = ?, details = ?, scheduler_id = ?, "
        "finished_at = ?, updated_at = ?, claimed_until = ? "
        f"WHERE id = ? AND holder = ? AND state = '{RUNNING}'",
        [
            state,
            error[:4096],
            rows.dumps(results),
            rows.dumps(details),
            scheduler_id,
            now,
            now,
            now + 10 * 365 * 86400.0,  # never claimable again
            part_id,
            holder,
        ],
    )
    if done:
        part = rows.get(tx, "job_parts", part_id)
        update_job_state(tx, int(part["job_id"]), now)
    return bool(done)


def update_job_state(tx: Tx, job_id: int, now: float) -> str:
    states = [
        r["state"] for r in tx.query("SELECT state FROM job_parts WHERE job_id = ?", [job_id])
    ]
    if FAILURE in states:
        state = FAILURE
    elif states and all(s == SUCCESS for s in states):
        state = SUCCESS
    else:
        state = PENDING
    tx.execute(
        "UPDATE jobs SET state = ?, updated_at = ? WHERE id = ? AND state <> ?",
        [state, now, job_id, state],
    )
    return state


def expire_unclaimed(tx: Tx, now: float, dispatch_timeout: float) -> int:
    """Parts nobody could run for `dispatch_timeout` fail, naming why."""
    found = tx.query(
        f"SELECT id, job_id, scheduler_cluster_id, state FROM job_parts WHERE state IN "
        f"('{PENDING}', '{RUNNING}') AND (CASE WHEN claimed_until > created_at THEN "
        "claimed_until ELSE created_at END) < ?",
        [now - dispatch_timeout],
    )
    for part in found:
        if part["state"] == PENDING:
            error = (
                f"no scheduler of cluster {part['scheduler_cluster_id']} is connected to a "
                f"manager (waited {dispatch_timeout:g}s)"
            )
        else:
            error = (
                "the manager that ran this part stopped, and no scheduler of cluster "
                f"{part['scheduler_cluster_id']} was there to run it again"
            )
        changed = tx.execute(
            f"UPDATE job_parts SET state = '{FAILURE}', error = ?, finished_at = ?, "
            "updated_at = ?, claimed_until = ? WHERE id = ? AND state = ?",
            [error, now, now, now + 10 * 365 * 86400.0, part["id"], part["state"]],
        )
        if changed:
            update_job_state(tx, int(part["job_id"]), now)
    return len(found)


def parts_of(tx: Tx, job_ids: list[int]) -> dict[int, list[dict[str, Any]]]:
    by_job: dict[int, list[dict[str, Any]]] = {j: [] for j in job_ids}
    if not job_ids:
        return by_job
    marks = ", ".join("?" for _ in job_ids)
    for part in tx.query(f"SELECT * FROM job_parts WHERE job_id IN ({marks}) ORDER BY id", job_ids):
        by_job[int(part["job_id"])].append(part)
    return by_job


def load_job(tx: Tx, job_id: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    job = rows.get(tx, "jobs", job_id)
    return job, parts_of(tx, [job_id])[job_id]


# ------------------------------------------------------------------ peers (sync_peers)


def sync_peers(tx: Tx, cluster_id: int, hosts: list[dict[str, Any]], now: float) -> int:
    """The peers table of a cluster as its scheduler sees it (a sync_peers job's
    list_hosts answer): every connected host active, the others inactive. Rows are the
    peers table's own (dragonfly/manager/peer_table.py: by host ID)."""
    fields = {f.name for f in dataclasses.fields(HostEntry)}
    entries = [HostEntry(**{k: v for k, v in h.items() if k in fields}) for h in hosts]
    return peer_table.sync(tx, entries, cluster_id, now)


# ------------------------------------------------------------------ download records


def add_records(
    tx: Tx, cluster_id: int, scheduler_id: int, records: list[DownloadRecord], now: float
) -> int:
    """Keep what a scheduler forwarded, and add it to its cluster's hourly traffic. A
    host's clock is not trusted: a record's time is kept within the last day."""
    traffic: dict[float, list[int]] = {}
    for r in records:
        finished = min(max(float(r.finished_at), now - 86400.0), now)
        tx.insert(
            "download_records",
            {
                "created_at": now,
                "scheduler_cluster_id": cluster_id,
                "scheduler_id": scheduler_id,
                "host_id": r.host_id,
                "hostname": r.hostname,
                "ip": r.ip,
                "task_id": r.task_id,
                "url": redact_url(r.url),
                "content_length": r.content_length,
                "finished_at": finished,
                "duration_ms": r.duration_ms,
                "bytes_p2p": r.bytes_p2p,
                "bytes_source": r.bytes_source,
                "bytes_local": r.bytes_local,
                "parents": rows.dumps(list(r.parents)),
                "error": r.error,
            },
        )
        hour = finished - finished % HOUR
        sums = traffic.setdefault(hour, [0, 0, 0, 0, 0])
        sums[0] += r.bytes_p2p
        sums[1] += r.bytes_source
        sums[2] += r.bytes_local
        sums[3] += 1
        sums[4] += 1 if r.error else 0
    for hour, (p2p, source, local, downloads, failures) in traffic.items():
        tx.execute(
            "INSERT INTO traffic_hourly (scheduler_cluster_id, hour, bytes_p2p, bytes_source, "
            "bytes_local, downloads, failures) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (scheduler_cluster_id, hour) DO UPDATE SET "
            "bytes_p2p = traffic_hourly.bytes_p2p + excluded.bytes_p2p, "
            "bytes_source = traffic_hourly.bytes_source + excluded.bytes_source, "
            "bytes_local = traffic_hourly.bytes_local + excluded.bytes_local, "
            "downloads = traffic_hourly.downloads + excluded.downloads, "
            "failures = traffic_hourly.failures + excluded.failures",
            [cluster_id, hour, p2p, source, local, downloads, failures],
        )
    return len(records)


def collect(
    tx: Tx, now: float, *, job_ttl: float, max_records: int, traffic_ttl: float
) -> dict[str, int]:
    """Jobs past their TTL, records beyond the newest `max_records`, old traffic hours."""
    counts = {
        "jobs_removed": tx.execute("DELETE FROM jobs WHERE created_at < ?", [now - job_ttl]),
    }
    edge = tx.one(
        "SELECT id FROM download_records ORDER BY id DESC LIMIT 1 OFFSET ?", [max_records]
    )
    counts["records_removed"] = (
        tx.execute("DELETE FROM download_records WHERE id <= ?", [edge["id"]]) if edge else 0
    )
    counts["traffic_removed"] = tx.execute(
        "DELETE FROM traffic_hourly WHERE hour < ?", [now - traffic_ttl]
    )
    return counts
