"""/api/v1/jobs (session) and /oapi/v1/jobs (a personal access token with scope `job`):
preheat, get_task, delete_task, get_image_distribution, sync_peers.

A create answers the job at once (PENDING) and the manager runs it through a
scheduler of each cluster (dragonfly/manager/jobs/runner.py); `GET .../jobs/ID` shows
it until it is SUCCESS or FAILURE. get_image_distribution and sync_peers answer when
they are done, as Dragonfly's do. A cluster's `job_rate_limit` (jobs a second) is
answered 429. Where this differs from Dragonfly (docs/API.md): secrets (a password,
header values) are never shown back; an unknown cluster is 404, not 429.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
import trio
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from dragonfly.manager import guard
from dragonfly.manager.context import Context, context
from dragonfly.manager.http import (
    ApiError,
    decode,
    empty_response,
    json_response,
    list_response,
    pagination,
    path_id,
    query_choice,
    query_int,
    query_str,
    rfc3339,
)
from dragonfly.manager.jobs import store
from dragonfly.manager.jobs.args import SYNC_TYPES, TYPES, ArgsError, CreateJob, parse_args
from dragonfly.manager.jobs.render import image_distribution, render_job
from dragonfly.manager.jobs.runner import GRACE
from dragonfly.manager.routes.crud import struct_changes
from dragonfly.manager.store import Tx, rows
from dragonfly.manager.store.rows import where

WAIT_POLL = 0.2
UNSET: Any = msgspec.UNSET


class UpdateJob(msgspec.Struct):
    bio: Annotated[str, msgspec.Meta(max_length=1024)] | msgspec.UnsetType = UNSET
    user_id: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] | msgspec.UnsetType = UNSET


async def create(ctx: Context, body: CreateJob, user_id: int) -> tuple[str, int, float]:
    """Make the job; (type, id, seconds to wait for a synchronous one)."""
    try:
        plan = parse_args(body.type, bytes(body.args))
    except ArgsError as exc:
        raise ApiError(422, str(exc)) from None
    sealed = ctx.sealer.seal(plan.secrets)
    now = ctx.clock()
    try:
        job_id = await ctx.db.run(
            lambda tx: store.create_job(
                tx, plan, sealed, body.scheduler_cluster_ids, user_id, body.bio, now
            )
        )
    except store.RateLimited as exc:
        raise RateLimitExceeded(str(exc)) from None
    return plan.type, job_id, plan.timeout


class RateLimitExceeded(Exception):
    pass


async def wait_done(ctx: Context, job_id: int, seconds: float) -> None:
    """Until the job is no longer PENDING, or `seconds` passed (every part then has its
    answer or its reason)."""
    with trio.move_on_after(seconds):
        while True:
            job = await ctx.db.run(lambda tx: rows.get(tx, "jobs", job_id))
            if job["state"] != store.PENDING:
                return
            await trio.sleep(WAIT_POLL)


async def create_job(request: Request) -> Response:
    principal = await guard.authorize(request)
    ctx = context(request)
    body = await decode(request, CreateJob)
    try:
        job_type, job_id, timeout = await create(ctx, body, body.user_id or principal.user_id)
    except RateLimitExceeded as exc:
        return PlainTextResponse(f"rate limit exceeded: {exc}", status_code=429)
    if job_type in SYNC_TYPES:
        await wait_done(ctx, job_id, timeout + ctx.config.jobs.dispatch_timeout + GRACE)
    job, parts = await ctx.db.run(lambda tx: store.load_job(tx, job_id))
    if job_type == "get_image_distribution":
        return json_response(image_distribution(job, parts))
    if job_type == "sync_peers":
        if job["state"] != store.SUCCESS:
            errors = "; ".join(p["error"] for p in parts if p["error"]) or "not done in time"
            raise ApiError(500, f"sync_peers: {errors}")
        return json_response("OK")
    return json_response(render_job(job, parts))


def _load_page(filters: dict[str, Any], page: int, per_page: int) -> Any:
    def load(tx: Tx) -> tuple[list[dict[str, Any]], int]:
        found, total = rows.page(tx, "jobs", filters, page, per_page, order="id DESC")
        parts = store.parts_of(tx, [int(j["id"]) for j in found])
        return [render_job(j, parts[int(j["id"])]) for j in found], total

    return load


async def list_jobs(request: Request) -> Response:
    await guard.authorize(request)
    page, per_page = pagination(request)
    filters = {
        "type": query_choice(request, "type", TYPES),
        "state": query_choice(request, "state", store.JOB_STATES),
        "user_id": query_int(request, "user_id"),
    }
    items, total = await context(request).db.run(_load_page(filters, page, per_page))
    return list_response(request, items, page, per_page, total)


async def get_job(request: Request) -> Response:
    await guard.authorize(request)
    job_id = path_id(request)
    job, parts = await context(request).db.run(lambda tx: store.load_job(tx, job_id))
    return json_response(render_job(job, parts))


async def update_job(request: Request) -> Response:
    await guard.authorize(request)
    job_id = path_id(request)
    changes = struct_changes(await decode(request, UpdateJob))
    ctx = context(request)
    now = ctx.clock()

    def update(tx: Tx) -> dict[str, Any]:
        rows.update(tx, "jobs", job_id, changes, now)
        job, parts = store.load_job(tx, job_id)
        return render_job(job, parts)

    return json_response(await ctx.db.run(update))


async def delete_job(request: Request) -> Response:
    await guard.authorize(request)
    job_id = path_id(request)
    await context(request).db.run(lambda tx: rows.delete(tx, "jobs", job_id))
    return empty_response()


def _routes(base: str) -> list[Route]:
    return [
        Route(base, list_jobs, methods=["GET"]),
        Route(base, create_job, methods=["POST"]),
        Route(f"{base}/{{id}}", get_job, methods=["GET"]),
        Route(f"{base}/{{id}}", update_job, methods=["PATCH"]),
        Route(f"{base}/{{id}}", delete_job, methods=["DELETE"]),
    ]


# ------------------------------------------------------------------ records and traffic


def render_record(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "created_at": rfc3339(row["created_at"]),
        "finished_at": rfc3339(row["finished_at"]),
        "scheduler_cluster_id": row["scheduler_cluster_id"],
        "scheduler_id": row["scheduler_id"],
        "host_id": row["host_id"],
        "hostname": row["hostname"],
        "ip": row["ip"],
        "task_id": row["task_id"],
        "url": row["url"],
        "content_length": row["content_length"],
        "duration_ms": row["duration_ms"],
        "bytes_p2p": row["bytes_p2p"],
        "bytes_source": row["bytes_source"],
        "bytes_local": row["bytes_local"],
        "parents": rows.loads(row["parents"]),
        "error": row["error"],
    }


async def list_records(request: Request) -> Response:
    await guard.authorize(request)
    page, per_page = pagination(request)
    filters: dict[str, Any] = {
        "scheduler_cluster_id": query_int(request, "scheduler_cluster_id"),
        "task_id": query_str(request, "task_id"),
        "host_id": query_str(request, "host_id"),
        "hostname": query_str(request, "hostname"),
    }
    found, total = await context(request).db.run(
        lambda tx: rows.page(tx, "download_records", filters, page, per_page, order="id DESC")
    )
    return list_response(request, [render_record(r) for r in found], page, per_page, total)


MAX_HOURS = 24 * 90


def traffic_query(tx: Tx, cluster_id: int | None, since: float) -> list[dict[str, Any]]:
    """Bytes by source per hour since `since` (all clusters summed when none is named)."""
    clause, params = where({"scheduler_cluster_id": cluster_id})
    clause = (clause + " AND" if clause else " WHERE") + " hour >= ?"
    return tx.query(
        "SELECT hour, SUM(bytes_p2p) AS bytes_p2p, SUM(bytes_source) AS bytes_source, "
        "SUM(bytes_local) AS bytes_local, SUM(downloads) AS downloads, "
        f"SUM(failures) AS failures FROM traffic_hourly{clause} GROUP BY hour ORDER BY hour",
        [*params, since],
    )


async def traffic(request: Request) -> Response:
    await guard.authorize(request)
    ctx = context(request)
    hours = query_int(request, "hours") or 24
    if hours > MAX_HOURS:
        raise ApiError(422, f"query parameter hours: at most {MAX_HOURS}")
    cluster_id = query_int(request, "scheduler_cluster_id")
    now = ctx.clock()
    since = now - now % store.HOUR - (hours - 1) * store.HOUR
    found = await ctx.db.run(lambda tx: traffic_query(tx, cluster_id, since))
    return json_response(
        [
            {
                "hour": rfc3339(r["hour"]),
                "bytes_p2p": int(r["bytes_p2p"] or 0),
                "bytes_source": int(r["bytes_source"] or 0),
                "bytes_local": int(r["bytes_local"] or 0),
                "downloads": int(r["downloads"] or 0),
                "failures": int(r["failures"] or 0),
            }
            for r in found
        ]
    )


ROUTES = [
    *_routes("/api/v1/jobs"),
    *_routes("/oapi/v1/jobs"),
    Route("/api/v1/download-records", list_records, methods=["GET"]),
    Route("/api/v1/traffic", traffic, methods=["GET"]),
]
