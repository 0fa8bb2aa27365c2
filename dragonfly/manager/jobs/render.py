"""Jobs in Dragonfly's JSON shapes (models.Job), from their rows.

`state` is only ever PENDING, SUCCESS or FAILURE (Harbor takes any other word for a
failure). `result.job_states[]` has one entry per scheduler cluster, its `results[]`
Dragonfly's per type: preheat `{success_tasks[{url, hostname, ip}], failure_tasks[{url,
hostname, ip, description}], scheduler_cluster_id}`; get_task `{peers[...],
scheduler_cluster_id}`; delete_task `{success_tasks[{hostname, ip, host_type}],
failure_tasks[...], scheduler_cluster_id}`. A part still running has `results: null`.
"""

from __future__ import annotations

from typing import Any

from dragonfly.manager.http import rfc3339
from dragonfly.manager.jobs.store import DONE, RUNNING
from dragonfly.manager.store import rows


def _host_type(entry: dict[str, Any]) -> str:
    return "super" if entry.get("seed") else "normal"


def part_results(job_type: str, part: dict[str, Any]) -> list[dict[str, Any]] | None:
    if part["state"] not in DONE:
        return None
    entries: list[dict[str, Any]] = rows.loads(part["results"])
    cluster = part["scheduler_cluster_id"]
    if job_type == "preheat":
        return [
            {
                "success_tasks": [
                    {
                        "url": e["url"],
                        "hostname": e["hostname"],
                        "ip": e["ip"],
                        "task_id": e["task_id"],
                    }
                    for e in entries
                    if e["ok"]
                ],
                "failure_tasks": [
                    {
                        "url": e["url"],
                        "hostname": e["hostname"],
                        "ip": e["ip"],
                        "task_id": e["task_id"],
                        "description": e["reason"],
                    }
                    for e in entries
                    if not e["ok"]
                ],
                "scheduler_cluster_id": cluster,
            }
        ]
    if job_type in ("get_task", "get_image_distribution"):
        when = rfc3339(part["finished_at"])
        return [
            {
                "peers": [
                    {
                        "id": e["host_id"],
                        "hostname": e["hostname"],
                        "ip": e["ip"],
                        "host_type": _host_type(e),
                        "task_id": e["task_id"],
                        "url": e["url"],
                        "created_at": when,
                        "updated_at": when,
                        "IsFinished": True,
                    }
                    for e in entries
                ],
                "scheduler_cluster_id": cluster,
            }
        ]
    if job_type == "delete_task":
        return [
            {
                "success_tasks": [
                    {"hostname": e["hostname"], "ip": e["ip"], "host_type": _host_type(e)}
                    for e in entries
                    if e["ok"]
                ],
                "failure_tasks": [
                    {
                        "hostname": e["hostname"],
                        "ip": e["ip"],
                        "host_type": _host_type(e),
                        "description": e["reason"],
                    }
                    for e in entries
                    if not e["ok"]
                ],
                "scheduler_cluster_id": cluster,
            }
        ]
    details = rows.loads(part["details"])
    return [{"hosts": len(details.get("hosts", [])), "scheduler_cluster_id": cluster}]


def render_job(job: dict[str, Any], parts: list[dict[str, Any]]) -> dict[str, Any]:
    created, updated = rfc3339(job["created_at"]), rfc3339(job["updated_at"])
    return {
        "id": job["id"],
        "created_at": created,
        "updated_at": updated,
        "is_del": 0,
        "task_id": job["task_id"],
        "bio": job["bio"],
        "type": job["type"],
        "state": job["state"],
        "args": rows.loads(job["args"]),
        "result": {
            "group_uuid": job["task_id"],
            "state": job["state"],
            "created_at": created,
            "updated_at": updated,
            "job_states": [
                {
                    "task_uuid": f"task_{p['id']}",
                    "task_name": job["type"],
                    # machinery's words for a part under way
                    "state": "STARTED" if p["state"] == RUNNING else p["state"],
                    "error": p["error"],
                    "created_at": rfc3339(p["created_at"]),
                    "ttl": 0,
                    "results": part_results(job["type"], p),
                    "scheduler_cluster_id": p["scheduler_cluster_id"],
                }
                for p in parts
            ],
        },
        "user_id": job["user_id"],
        "scheduler_clusters": [{"id": cid} for cid in rows.loads(job["scheduler_cluster_ids"])],
        "seed_peer_clusters": [],
    }


def image_distribution(job: dict[str, Any], parts: list[dict[str, Any]]) -> dict[str, Any]:
    """get_image_distribution's answer: the image's layers, and each host with the layers
    it holds."""
    layers: dict[str, None] = {}
    hosts: dict[tuple[int, str], dict[str, Any]] = {}
    for p in parts:
        for url in rows.loads(p["details"]).get("layers", []):
            layers[url] = None
        if p["state"] not in DONE:
            continue
        for e in rows.loads(p["results"]):
            key = (p["scheduler_cluster_id"], e["host_id"])
            host = hosts.setdefault(
                key,
                {
                    "ip": e["ip"],
                    "hostname": e["hostname"],
                    "host_type": _host_type(e),
                    "cached_layers": [],
                    "scheduler_cluster_id": p["scheduler_cluster_id"],
                },
            )
            host["cached_layers"].append({"url": e["url"]})
    errors = [p["error"] for p in parts if p["error"]]
    out: dict[str, Any] = {
        "image": {"layers": [{"url": u} for u in layers]},
        "peers": list(hosts.values()),
    }
    if errors:
        out["errors"] = errors
    return out
