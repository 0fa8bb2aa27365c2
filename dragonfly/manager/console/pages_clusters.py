"""Clusters: the list, a cluster with its schedulers, seed peers and peers (counts by
version), and the form that creates or edits one (scopes, limits, block lists). The
form's values go through the API's own Structs, so the console accepts exactly what
the API accepts and says what is wrong the same way."""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

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
from dragonfly.manager.jobs.args import CreateJob
from dragonfly.manager.routes import clusters as api
from dragonfly.manager.routes.jobs import create as create_job
from dragonfly.manager.routes.jobs import wait_done
from dragonfly.manager.store import Conflict, Tx, rows

NUMBERS = (
    ("scheduler_cluster_config", "candidate_parent_limit"),
    ("scheduler_cluster_config", "filter_parent_limit"),
    ("scheduler_cluster_config", "job_rate_limit"),
    ("seed_peer_cluster_config", "load_limit"),
    ("peer_cluster_config", "load_limit"),
)
BLOCKS = ("applications", "urls", "tags")


def _document(fields: dict[str, list[str]]) -> dict[str, Any]:
    """The form as the API's JSON body."""
    doc: dict[str, Any] = {
        "name": one(fields, "name"),
        "bio": one(fields, "bio"),
        "is_default": one(fields, "is_default") == "on",
        "scopes": {
            "idc": one(fields, "idc"),
            "location": one(fields, "location"),
            "cidrs": lines(one(fields, "cidrs")),
            "hostnames": [h.strip() for h in one(fields, "hostnames").splitlines() if h.strip()],
        },
    }
    for section, key in NUMBERS:
        text = one(fields, f"{section}.{key}")
        doc.setdefault(section, {})
        if text:  # (empty: the default)
            value: Any = int(text) if text.lstrip("-").isdigit() and len(text) < 12 else text
            doc[section][key] = value
    for target in ("peer_cluster_config", "seed_peer_cluster_config"):
        block = {
            k: (
                [u.strip() for u in one(fields, f"{target}.{k}").splitlines() if u.strip()]
                if k == "urls"
                else lines(one(fields, f"{target}.{k}"))
            )
            for k in BLOCKS
        }
        doc[target]["block_list"] = {"task": {"download": block}}
    return doc


def _form_values(cluster: dict[str, Any] | None) -> dict[str, Any]:
    """What the form shows: a cluster's values, or the defaults for a new one."""
    c = cluster or api.render(
        {
            "id": 0,
            "name": "",
            "bio": "",
            "config": "{}",
            "client_config": "{}",
            "seed_client_config": "{}",
            "scopes": "{}",
            "created_at": 0,
            "updated_at": 0,
            "is_default": 0,
        },
        None,
    )
    values: dict[str, Any] = {
        "name": c["name"],
        "bio": c["bio"],
        "is_default": c["is_default"],
        "idc": c["scopes"]["idc"],
        "location": c["scopes"]["location"],
        "cidrs": "\n".join(c["scopes"]["cidrs"]),
        "hostnames": "\n".join(c["scopes"]["hostnames"]),
    }
    for section, key in NUMBERS:
        values[f"{section}.{key}"] = c[section][key]
    for target in ("peer_cluster_config", "seed_peer_cluster_config"):
        download = c[target]["block_list"]["task"]["download"]
        for k in BLOCKS:
            values[f"{target}.{k}"] = "\n".join(download[k])
    return values


async def _list(request: Request, who: Who) -> Response:
    ctx = ctx_of(request)
    total = await ctx.db.run(lambda tx: rows.page(tx, "scheduler_clusters", {}, 1, 1)[1])
    p = pages(request, total)

    def load(tx: Tx) -> list[dict[str, Any]]:
        found, _ = rows.page(tx, "scheduler_clusters", {}, p.page, PER_PAGE)
        out = []
        for row in found:
            item = api.load_cluster(tx, row["id"])
            counts = tx.one(
                "SELECT (SELECT COUNT(*) FROM schedulers WHERE scheduler_cluster_id = ? "
                "AND state = 'active') AS schedulers, (SELECT COUNT(*) FROM seed_peers WHERE "
                "seed_peer_cluster_id = ? AND state = 'active') AS seeds, (SELECT COUNT(*) "
                "FROM peers WHERE scheduler_cluster_id = ? AND state = 'active') AS peers",
                [row["id"], item["seed_peer_cluster_id"], row["id"]],
            )
            out.append({**item, **(counts or {})})
        return out

    return render(request, "clusters.html", who, clusters=await ctx.db.run(load), pages=p)


def _detail(tx: Tx, cluster_id: int) -> dict[str, Any]:
    cluster = api.load_cluster(tx, cluster_id)
    schedulers = [
        {**s, "features": ", ".join(rows.loads(s["features"]))}
        for s in tx.query(
            "SELECT * FROM schedulers WHERE scheduler_cluster_id = ? ORDER BY id LIMIT 200",
            [cluster_id],
        )
    ]
    seeds = tx.query(
        "SELECT * FROM seed_peers WHERE seed_peer_cluster_id = ? ORDER BY id LIMIT 200",
        [cluster["seed_peer_cluster_id"]],
    )
    versions = tx.query(
        "SELECT git_version AS version, type, COUNT(*) AS n FROM peers WHERE "
        "scheduler_cluster_id = ? AND state = 'active' GROUP BY git_version, type "
        "ORDER BY n DESC LIMIT 50",
        [cluster_id],
    )
    peers = tx.query(
        "SELECT * FROM peers WHERE scheduler_cluster_id = ? ORDER BY state, host_name "
        "LIMIT ? OFFSET 0",
        [cluster_id, PER_PAGE],
    )
    total = tx.one("SELECT COUNT(*) AS n FROM peers WHERE scheduler_cluster_id = ?", [cluster_id])
    return {
        "cluster": cluster,
        "schedulers": schedulers,
        "seeds": seeds,
        "versions": versions,
        "peers": peers,
        "peer_total": int(total["n"]) if total else 0,
    }


async def _show(request: Request, who: Who) -> Response:
    cluster_id = path_id(request)
    data = await ctx_of(request).db.run(lambda tx: _detail(tx, cluster_id))
    return render(request, "cluster.html", who, **data)


async def _form(request: Request, who: Who) -> Response:
    ctx = ctx_of(request)
    cluster_id = path_id(request) if "id" in request.path_params else 0
    cluster = await ctx.db.run(lambda tx: api.load_cluster(tx, cluster_id)) if cluster_id else None
    error = ""
    values = _form_values(cluster)
    if request.method == "POST":
        fields = fields_of(request)
        doc = _document(fields)
        now = ctx.clock()
        try:
            if cluster_id:
                body = msgspec.convert(doc, api.UpdateCluster)
                done = await ctx.db.run(lambda tx: api.update_in(tx, cluster_id, body, now))
            else:
                create = msgspec.convert(doc, api.CreateCluster)
                done = await ctx.db.run(lambda tx: api.create_in(tx, create, now))
            return redirect(f"/clusters/{done['id']}", "Cluster saved.")
        except msgspec.ValidationError as exc:
            error = str(exc)
        except ApiError as exc:
            error = exc.message
        except Conflict:
            error = "a cluster of that name exists already"
        values = {k: one(fields, k) for k in values}
        values["is_default"] = one(fields, "is_default") == "on"
    return render(
        request,
        "cluster_form.html",
        who,
        cluster=cluster,
        values=values,
        error=error,
        status=422 if error else 200,
    )


async def _delete(request: Request, who: Who) -> Response:
    cluster_id = path_id(request)
    try:
        await ctx_of(request).db.run(lambda tx: api.delete_in(tx, cluster_id))
    except (ApiError, Conflict) as exc:
        return redirect(f"/clusters/{cluster_id}", getattr(exc, "message", str(exc)))
    return redirect("/clusters", "Cluster deleted.")


async def _sync(request: Request, who: Who) -> Response:
    ctx = ctx_of(request)
    cluster_id = path_id(request)
    body = CreateJob(type="sync_peers", scheduler_cluster_ids=[cluster_id])
    _, job_id, timeout = await create_job(ctx, body, who.principal.user_id)
    await wait_done(ctx, job_id, min(timeout, 30))
    job = await ctx.db.run(lambda tx: rows.get(tx, "jobs", job_id))
    note = "Peers synced." if job["state"] == "SUCCESS" else f"Sync: {job['state']}"
    return redirect(f"/clusters/{cluster_id}", note)


clusters = page(_list, group="clusters")
cluster = page(_show, group="clusters")
cluster_form = page(_form, group="clusters")
cluster_delete = page(_delete, group="clusters")
cluster_sync = page(_sync, group="jobs")
