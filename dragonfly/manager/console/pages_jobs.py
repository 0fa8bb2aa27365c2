"""Preheat and tasks: the list of jobs, the preheat form (files or an image, every
option the API takes), a job with its per-host results (the page refreshes itself while
the job runs), and the task search (which hosts hold a task) with delete everywhere.
Jobs are made by the API's own code (dragonfly/manager/routes/jobs.py)."""

from __future__ import annotations

import json
import re
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from dragonfly.identity import blob_task_id, is_sha256_digest
from dragonfly.manager.console.common import (
    PER_PAGE,
    Who,
    ctx_of,
    fields_of,
    lines,
    one,
    page,
    pages,
    redirect,
    render,
)
from dragonfly.manager.http import ApiError, path_id
from dragonfly.manager.jobs import store
from dragonfly.manager.jobs.args import SCOPES, TYPES, CreateJob
from dragonfly.manager.jobs.image import default_platform
from dragonfly.manager.jobs.render import render_job
from dragonfly.manager.routes.jobs import RateLimitExceeded, create, wait_done
from dragonfly.manager.store import rows
from dragonfly.manager.store.rows import NotFound

SEARCH_WAIT = 30.0
_HEX_ID = re.compile(r"^[0-9a-f]{64}$")


def job_summary(job: dict[str, Any]) -> dict[str, Any]:
    args = rows.loads(job["args"])
    what = args.get("url") or args.get("task_id") or ", ".join(args.get("urls") or [])
    return {
        "id": job["id"],
        "type": job["type"],
        "kind": args.get("type", ""),
        "state": job["state"],
        "created_at": job["created_at"],
        "what": what,
        "scope": args.get("scope", ""),
    }


async def _list(request: Request, who: Who) -> Response:
    ctx = ctx_of(request)
    kind = request.query_params.get("type", "preheat")
    filters = {"type": kind if kind in TYPES else None}
    total = await ctx.db.run(lambda tx: rows.page(tx, "jobs", filters, 1, 1)[1])
    p = pages(request, total)
    found = await ctx.db.run(
        lambda tx: rows.page(tx, "jobs", filters, p.page, PER_PAGE, order="id DESC")[0]
    )
    return render(
        request,
        "jobs.html",
        who,
        jobs=[job_summary(j) for j in found],
        pages=p,
        kind=filters["type"] or "",
        types=TYPES,
    )


def _number(text: str, what: str) -> int | None:
    if not text:
        return None
    if not text.isdigit() or len(text) > 12:
        raise ApiError(422, f"{what}: a whole number, not {text[:20]!r}")
    return int(text)


def _args(fields: dict[str, list[str]]) -> dict[str, Any]:
    """The preheat form as the API's args."""
    headers: dict[str, str] = {}
    for line in one(fields, "headers").splitlines():
        if line.strip():
            name, sep, value = line.partition(":")
            if not sep or not name.strip():
                raise ApiError(422, f"headers: expected 'Name: value', got {line[:60]!r}")
            headers[name.strip()] = value.strip()
    urls = [u.strip() for u in one(fields, "urls").splitlines() if u.strip()]
    kind = one(fields, "type", "file")
    args: dict[str, Any] = {
        "type": kind,
        "tag": one(fields, "tag"),
        "application": one(fields, "application"),
        "filtered_query_params": one(fields, "filtered_query_params"),
        "headers": headers or None,
        "username": one(fields, "username"),
        "password": one(fields, "password"),
        "platform": one(fields, "platform"),
        "scope": one(fields, "scope"),
        "ips": lines(one(fields, "ips")) or None,
        "count": _number(one(fields, "count"), "count"),
        "percentage": _number(one(fields, "percentage"), "percentage"),
        "concurrent_task_count": _number(one(fields, "concurrent_task_count"), "tasks at once")
        or 0,
        "concurrent_peer_count": _number(one(fields, "concurrent_peer_count"), "hosts at once")
        or 0,
    }
    piece = _number(one(fields, "piece_length"), "piece length (MiB)")
    if piece:
        args["piece_length"] = piece * 1024 * 1024
    minutes = _number(one(fields, "timeout"), "timeout (minutes)")
    if minutes:
        args["timeout"] = minutes * 60 * 1_000_000_000
    if kind == "image":
        args["url"] = urls[0] if urls else ""
    else:
        args["urls"] = urls
    return args


async def _new(request: Request, who: Who) -> Response:
    ctx = ctx_of(request)
    clusters = await ctx.db.run(
        lambda tx: tx.query("SELECT id, name FROM scheduler_clusters ORDER BY id LIMIT 200")
    )
    error = ""
    values: dict[str, Any] = {"type": "file", "scope": "single_seed_peer", "clusters": []}
    if request.method == "POST":
        fields = fields_of(request)
        values = {k: one(fields, k) for k in fields} | {"clusters": fields.get("clusters", [])}
        values["password"] = ""  # never sent back to the browser
        try:
            ids = [int(c) for c in fields.get("clusters", []) if c.isdigit() and len(c) < 19]
            body = CreateJob(
                type="preheat",
                args=msgspec.Raw(json.dumps(_args(fields)).encode()),
                bio=one(fields, "bio")[:1024],
                scheduler_cluster_ids=ids or None,
            )
            _, job_id, _ = await create(ctx, body, who.principal.user_id)
            return redirect(f"/jobs/{job_id}", "Preheat created.")
        except ApiError as exc:
            error = exc.message
        except RateLimitExceeded as exc:
            error = f"rate limit exceeded: {exc}"
        except NotFound as exc:
            error = str(exc)
    return render(
        request,
        "job_new.html",
        who,
        clusters=clusters,
        values=values,
        error=error,
        scopes=SCOPES,
        platform=default_platform(),
        status=422 if error else 200,
    )


def _host_rows(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Every (host, task) of a rendered job, for one table (the keys every type has)."""
    out = []
    for state in job["result"]["job_states"]:
        for result in state["results"] or []:
            cid = result.get("scheduler_cluster_id")
            found = [(True, t) for t in result.get("success_tasks", [])]
            found += [(False, t) for t in result.get("failure_tasks", [])]
            found += [(True, p) for p in result.get("peers", [])]
            for ok, t in found:
                out.append(
                    {
                        "hostname": t.get("hostname", ""),
                        "ip": t.get("ip", ""),
                        "task_id": t.get("task_id", ""),
                        "url": t.get("url", ""),
                        "host_type": t.get("host_type", ""),
                        "description": t.get("description", ""),
                        "ok": ok,
                        "cluster": cid,
                    }
                )
    return out


async def _show(request: Request, who: Who) -> Response:
    job_id = path_id(request)
    job, parts = await ctx_of(request).db.run(lambda tx: store.load_job(tx, job_id))
    rendered = render_job(job, parts)
    return render(
        request,
        "job.html",
        who,
        job=rendered,
        hosts=_host_rows(rendered),
        args=json.dumps(rendered["args"], indent=2, sort_keys=True),
        running=job["state"] == store.PENDING,
    )


def _task_ids(query: str) -> tuple[str, dict[str, Any]]:
    """A search box's text as get_task's args: a task ID (64 hex), a blob digest, or a URL."""
    text = query.strip()
    if _HEX_ID.match(text):
        return text, {"task_id": text}
    if is_sha256_digest(text):
        tid = blob_task_id(text)
        return tid, {"task_id": tid}
    return "", {"url": text}


async def _tasks(request: Request, who: Who) -> Response:
    """The search runs a get_task job (a POST: it asks every host), shown here when done."""
    ctx = ctx_of(request)
    query = one(fields_of(request), "q")[:8192] if request.method == "POST" else ""
    found: dict[str, Any] | None = None
    error = ""
    if query.strip():
        _, args = _task_ids(query)
        body = CreateJob(type="get_task", args=msgspec.Raw(json.dumps(args).encode()))
        try:
            _, job_id, _ = await create(ctx, body, who.principal.user_id)
            await wait_done(ctx, job_id, SEARCH_WAIT)
            job, parts = await ctx.db.run(lambda tx: store.load_job(tx, job_id))
            rendered = render_job(job, parts)
            found = {"job": rendered, "hosts": _host_rows(rendered)}
            tids = {h["task_id"] for h in found["hosts"]}
            found["task_id"] = args.get("task_id") or (tids.pop() if len(tids) == 1 else "")
        except ApiError as exc:
            error = exc.message
        except RateLimitExceeded as exc:
            error = f"rate limit exceeded: {exc}"
    return render(request, "tasks.html", who, query=query, found=found, error=error)


async def _delete(request: Request, who: Who) -> Response:
    ctx = ctx_of(request)
    fields = fields_of(request)
    _, args = _task_ids(one(fields, "task"))
    body = CreateJob(type="delete_task", args=msgspec.Raw(json.dumps(args).encode()))
    try:
        _, job_id, _ = await create(ctx, body, who.principal.user_id)
    except (ApiError, RateLimitExceeded) as exc:
        return redirect("/tasks", f"not deleted: {exc}")
    return redirect(f"/jobs/{job_id}", "Deleting the task everywhere.")


jobs = page(_list, group="jobs")
job_new = page(_new, group="jobs")
job = page(_show, group="jobs")
tasks = page(_tasks, group="jobs")
task_delete = page(_delete, group="jobs")
