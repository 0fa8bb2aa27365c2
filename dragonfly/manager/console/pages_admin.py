"""Traffic (bytes by source over time, recent download records), users and roles (root
only), personal access tokens (shown once, when made), and the audit log."""

from __future__ import annotations

import datetime as dt
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from dragonfly.manager import auth
from dragonfly.manager.console.chart import Hour, traffic_svg
from dragonfly.manager.console.common import (
    PER_PAGE,
    Who,
    ctx_of,
    fields_of,
    one,
    page,
    pages,
    redirect,
    render,
    svg,
)
from dragonfly.manager.http import ApiError, path_id
from dragonfly.manager.jobs.store import HOUR
from dragonfly.manager.routes import users as api
from dragonfly.manager.routes.jobs import traffic_query
from dragonfly.manager.routes.tokens import create_in as create_token
from dragonfly.manager.routes.users import SignUp, add_user
from dragonfly.manager.store import Conflict, Tx, rows

RANGES = {"24h": 24, "7d": 24 * 7}


async def _traffic(request: Request, who: Who) -> Response:
    ctx = ctx_of(request)
    span = request.query_params.get("range", "24h")
    hours = RANGES.get(span, 24)
    cluster_text = request.query_params.get("cluster", "")
    cluster_id = int(cluster_text) if cluster_text.isdigit() and len(cluster_text) < 19 else None
    now = ctx.clock()
    start = now - now % HOUR - (hours - 1) * HOUR
    filters = {"scheduler_cluster_id": cluster_id}

    def load(tx: Tx) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
        sums = traffic_query(tx, cluster_id, start)
        _, total = rows.page(tx, "download_records", filters, 1, 1)
        return (
            sums,
            tx.query("SELECT id, name FROM scheduler_clusters ORDER BY id LIMIT 200"),
            total,
        )

    sums, clusters, total = await ctx.db.run(load)
    p = pages(request, total)
    records = await ctx.db.run(
        lambda tx: rows.page(tx, "download_records", filters, p.page, PER_PAGE, order="id DESC")[0]
    )
    by_hour = {float(r["hour"]): r for r in sums}
    series = []
    for i in range(hours):
        moment = start + i * HOUR
        r = by_hour.get(moment, {})
        stamp = dt.datetime.fromtimestamp(moment, dt.UTC)
        label = stamp.strftime("%H:%M") if hours <= 24 else stamp.strftime("%d %H:00")
        series.append(
            Hour(
                label,
                int(r.get("bytes_p2p") or 0),
                int(r.get("bytes_source") or 0),
                int(r.get("bytes_local") or 0),
            )
        )
    totals = {
        "p2p": sum(h.bytes_p2p for h in series),
        "source": sum(h.bytes_source for h in series),
        "local": sum(h.bytes_local for h in series),
    }
    moved = totals["p2p"] + totals["source"]
    return render(
        request,
        "traffic.html",
        who,
        chart=svg(traffic_svg(series)),
        totals=totals,
        share=round(100 * totals["p2p"] / moved) if moved else 0,
        records=[{**r, "parents": rows.loads(r["parents"])} for r in records],
        pages=p,
        span=span,
        clusters=clusters,
        cluster_id=cluster_id,
    )


def _users(tx: Tx, offset: int) -> list[dict[str, Any]]:
    found = tx.query("SELECT * FROM users ORDER BY id LIMIT ? OFFSET ?", [PER_PAGE, offset])
    for user in found:
        user["roles"] = [
            r["role"]
            for r in tx.query(
                "SELECT role FROM user_roles WHERE user_id = ? ORDER BY role", [user["id"]]
            )
        ]
    return found


async def _user_list(request: Request, who: Who) -> Response:
    ctx = ctx_of(request)
    error = ""
    if request.method == "POST":
        fields = fields_of(request)
        try:
            body = msgspec.convert(
                {
                    "name": one(fields, "name"),
                    "email": one(fields, "email"),
                    "password": one(fields, "password"),
                },
                SignUp,
            )
            await add_user(ctx, body)
            return redirect("/users", f"User {body.name} added (guest).")
        except msgspec.ValidationError as exc:
            error = str(exc)
        except Conflict:
            error = "a user of that name exists already"
    total = await ctx.db.run(lambda tx: rows.page(tx, "users", {}, 1, 1)[1])
    p = pages(request, total)
    found = await ctx.db.run(lambda tx: _users(tx, p.offset))
    roles = await ctx.db.run(
        lambda tx: [r["name"] for r in tx.query("SELECT name FROM roles ORDER BY name")]
    )
    return render(
        request,
        "users.html",
        who,
        users=found,
        pages=p,
        roles=roles,
        error=error,
        status=422 if error else 200,
    )


async def _user_change(request: Request, who: Who) -> Response:
    """Add or remove a role, enable or disable: the API's rules (the last enabled root
    keeps its role and stays enabled)."""
    ctx = ctx_of(request)
    user_id = path_id(request)
    fields = fields_of(request)
    action, role = one(fields, "action"), one(fields, "role")
    now = ctx.clock()

    def change(tx: Tx) -> None:
        rows.get(tx, "users", user_id)
        last_root = api._is_enabled_root(tx, user_id) and api._root_count(tx) <= 1
        if action == "add_role":
            if tx.one("SELECT name FROM roles WHERE name = ?", [role]) is None:
                raise ApiError(404, "no such role")
            tx.execute(
                "INSERT INTO user_roles (user_id, role) VALUES (?, ?) ON CONFLICT DO NOTHING",
                [user_id, role],
            )
        elif action == "remove_role":
            if role == auth.ROOT and last_root:
                raise ApiError(409, "the last enabled root user keeps the root role")
            tx.execute("DELETE FROM user_roles WHERE user_id = ? AND role = ?", [user_id, role])
        elif action in ("enable", "disable"):
            if action == "disable" and last_root:
                raise ApiError(409, "the last enabled root user cannot be disabled")
            tx.execute(
                "UPDATE users SET state = ?, updated_at = ?, session_generation = "
                "session_generation + 1 WHERE id = ?",
                [action, now, user_id],
            )
        else:
            raise ApiError(422, "unknown action")

    try:
        await ctx.db.run(change)
    except ApiError as exc:
        return redirect("/users", exc.message)
    return redirect("/users", "Saved.")


async def _tokens(request: Request, who: Who) -> Response:
    ctx = ctx_of(request)
    made: dict[str, Any] | None = None
    error = ""
    if request.method == "POST":
        fields = fields_of(request)
        days = one(fields, "days", "90")
        expires = ctx.clock() + (int(days) if days.isdigit() and len(days) < 6 else 90) * 86400
        scopes = [s for s in fields.get("scopes", []) if s in auth.PAT_SCOPES]
        try:
            made = await create_token(
                ctx,
                {
                    "name": one(fields, "name"),
                    "bio": one(fields, "bio"),
                    "scopes": scopes,
                    "expired_at": dt.datetime.fromtimestamp(expires, dt.UTC).isoformat(),
                    "user_id": None,
                },
                who.principal,
            )
        except ApiError as exc:
            error = exc.message
        except msgspec.ValidationError as exc:
            error = str(exc)
        except Conflict:
            error = "a token of that name exists already"
    mine = None if who.may("users") else who.principal.user_id
    filters = {"user_id": mine}
    total = await ctx.db.run(lambda tx: rows.page(tx, "personal_access_tokens", filters, 1, 1)[1])
    p = pages(request, total)
    found = await ctx.db.run(
        lambda tx: rows.page(
            tx, "personal_access_tokens", filters, p.page, PER_PAGE, order="id DESC"
        )[0]
    )
    return render(
        request,
        "tokens.html",
        who,
        tokens=[{**t, "scopes": rows.loads(t["scopes"])} for t in found],
        pages=p,
        made=made,
        error=error,
        scopes=auth.PAT_SCOPES,
        status=422 if error else 200,
    )


async def _token_change(request: Request, who: Who) -> Response:
    ctx = ctx_of(request)
    token_id = path_id(request)
    action = one(fields_of(request), "action")
    now = ctx.clock()

    def change(tx: Tx) -> None:
        row = rows.get(tx, "personal_access_tokens", token_id)
        if row["user_id"] != who.principal.user_id and not who.may("users"):
            raise ApiError(403, "not your token")
        if action == "delete":
            rows.delete(tx, "personal_access_tokens", token_id)
        elif action in ("active", "inactive"):
            rows.update(tx, "personal_access_tokens", token_id, {"state": action}, now)
        else:
            raise ApiError(422, "unknown action")

    try:
        await ctx.db.run(change)
    except ApiError as exc:
        return redirect("/tokens", exc.message)
    return redirect("/tokens", "Saved.")


async def _audits(request: Request, who: Who) -> Response:
    ctx = ctx_of(request)
    state = request.query_params.get("state", "")
    filters = {"state": state if state in ("SUCCESS", "FAILURE") else None}
    total = await ctx.db.run(lambda tx: rows.page(tx, "audits", filters, 1, 1)[1])
    p = pages(request, total)
    found = await ctx.db.run(
        lambda tx: rows.page(tx, "audits", filters, p.page, PER_PAGE, order="id DESC")[0]
    )
    return render(request, "audits.html", who, audits=found, pages=p, state=state)


traffic = page(_traffic, group="traffic")
users = page(_user_list, group="users", need=auth.ALL)
user_change = page(_user_change, group="users")
tokens = page(_tokens, group="personal-access-tokens")
token_change = page(_token_change, group="personal-access-tokens")
audits = page(_audits, group="audits")
