"""Sign-in, sign-out, the overview, and the stylesheet."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response

from dragonfly.manager import guard
from dragonfly.manager.console import csrf
from dragonfly.manager.console.common import HERE, Who, ctx_of, form, one, page, redirect, render
from dragonfly.manager.console.pages_jobs import job_summary
from dragonfly.manager.http import ApiError
from dragonfly.manager.routes.users import _cookie, new_session, revoke_session, verify_user
from dragonfly.manager.store import Tx

CSS = (HERE / "static" / "console.css").read_bytes()


async def stylesheet(request: Request) -> Response:
    return Response(CSS, media_type="text/css", headers={"Cache-Control": "max-age=300"})


def _safe_next(target: str) -> str:
    """Only a path of this console (never another site: //host, /\\host, a scheme)."""
    parts = urlsplit(target)
    if (
        parts.scheme
        or parts.netloc
        or not target.startswith("/")
        or target.startswith(("//", "/\\"))
        or any(c in target for c in "\\\r\n\t")
    ):
        return "/"
    return target


async def signin_page(request: Request) -> Response:
    ctx = ctx_of(request)
    pre = request.cookies.get(csrf.PRE_COOKIE) or csrf.new_pre_cookie()
    error = ""
    status = 200
    target = _safe_next(request.query_params.get("next", "/"))
    if request.method == "POST":
        try:
            fields = await form(request)
        except ApiError:
            fields = {}
        target = _safe_next(one(fields, "next", "/"))
        name = one(fields, "name")[:64]
        guard.set_actor(request, "UNKNOWN", name)
        if not csrf.valid(csrf.signin_token(ctx.jwt_key, pre), one(fields, "csrf")):
            error, status = "This form expired. Please sign in again.", 403
        else:
            user = await verify_user(ctx, name, one(fields, "password"))
            if user is None:
                error, status = "Wrong name or password.", 401
            else:
                guard.set_actor(request, "USER", name)
                token, _ = new_session(ctx, user["id"], user["session_generation"])
                signed_in = redirect(target)
                _cookie(ctx, signed_in, token, int(ctx.config.auth.session_ttl), "strict")
                signed_in.delete_cookie(csrf.PRE_COOKIE, path="/")
                return signed_in
    response = render(
        request,
        "signin.html",
        None,
        status=status,
        error=error,
        token=csrf.signin_token(ctx.jwt_key, pre),
        next=target,
    )
    response.set_cookie(
        csrf.PRE_COOKIE,
        pre,
        max_age=3600,
        path="/",
        httponly=True,
        samesite="strict",
        secure=ctx.config.auth.cookie_secure,
    )
    return response


async def _signout(request: Request, who: Who) -> Response:
    ctx = ctx_of(request)
    session = who.principal.session
    assert session is not None
    await ctx.db.run(lambda tx: revoke_session(tx, session.jti, session.expires_at))
    response = redirect("/signin")
    response.delete_cookie(guard.COOKIE, path="/")
    return response


def _overview(tx: Tx, now: float) -> dict[str, Any]:
    def count(sql: str, params: list[Any] | None = None) -> int:
        row = tx.one(sql, params or [])
        return int(row["n"]) if row else 0

    since = now - 86400
    traffic = (
        tx.one(
            "SELECT SUM(bytes_p2p) AS p2p, SUM(bytes_source) AS source, SUM(bytes_local) AS local, "
            "SUM(downloads) AS downloads FROM traffic_hourly WHERE hour >= ?",
            [since - since % 3600],
        )
        or {}
    )
    jobs = tx.query("SELECT id, type, state, created_at, args FROM jobs ORDER BY id DESC LIMIT 5")
    return {
        "clusters": count("SELECT COUNT(*) AS n FROM scheduler_clusters"),
        "schedulers": count("SELECT COUNT(*) AS n FROM schedulers WHERE state = 'active'"),
        "schedulers_all": count("SELECT COUNT(*) AS n FROM schedulers"),
        "seed_peers": count("SELECT COUNT(*) AS n FROM seed_peers WHERE state = 'active'"),
        "peers": count("SELECT COUNT(*) AS n FROM peers WHERE state = 'active'"),
        "pending": count("SELECT COUNT(*) AS n FROM jobs WHERE state = 'PENDING'"),
        "traffic": {k: int(v or 0) for k, v in traffic.items()},
        "jobs": jobs,
    }


async def _home(request: Request, who: Who) -> Response:
    ctx = ctx_of(request)
    now = ctx.clock()
    data = await ctx.db.run(lambda tx: _overview(tx, now))
    data["jobs"] = [job_summary(j) for j in data["jobs"]]
    return render(request, "overview.html", who, **data)


home = page(_home)
signout = page(_signout)
