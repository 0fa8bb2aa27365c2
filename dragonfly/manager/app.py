"""The manager's ASGI app: every route, the JSON error answers, and the audit trail.

Starlette (routing, cookies, websockets; on trio through anyio) served by
hypercorn's trio worker (h11 and wsproto inside): both well kept, and neither has a
Rust extension. The project's own h11 server would have needed routing, cookies,
form parsing and an ASGI-style websocket written by hand.
"""

from __future__ import annotations

from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dragonfly.log import get_logger
from dragonfly.manager import guard
from dragonfly.manager.console.routes import ROUTES as CONSOLE
from dragonfly.manager.context import Context, context
from dragonfly.manager.http import ApiError, error_response, json_response
from dragonfly.manager.member_socket import member_endpoint
from dragonfly.manager.routes import (
    audits,
    cluster_parts,
    clusters,
    hosts,
    identity,
    jobs,
    roles,
    settings,
    tokens,
    users,
)
from dragonfly.manager.store import Conflict, DatabaseError
from dragonfly.manager.store.rows import NotFound
from dragonfly.metrics import CONTENT_TYPE
from dragonfly.net.channel import MANAGER_PATH

log = get_logger("dragonfly.manager.api")
WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")
REFUSED = (401, 403)


async def healthy(request: Request) -> Response:
    """Dragonfly answers the JSON string "OK"; a manager without its database is not."""
    try:
        await context(request).db.run(lambda tx: tx.one("SELECT 1 AS ok"))
    except DatabaseError:
        return error_response(503, "database unavailable")
    return json_response("OK")


async def metrics(request: Request) -> Response:
    return Response(context(request).metrics.render(), media_type=CONTENT_TYPE.decode())


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    headers = {"WWW-Authenticate": 'Bearer realm="Dragonfly"'} if exc.status == 401 else None
    return error_response(exc.status, exc.message, headers)


async def _not_found(request: Request, exc: Exception) -> Response:
    return error_response(404, str(exc) or "record not found")


async def _conflict(request: Request, exc: Exception) -> Response:
    return error_response(409, "Conflict")


async def _database(request: Request, exc: Exception) -> Response:
    log.warning("database error", path=request.url.path, error=str(exc))
    return error_response(503, "database unavailable")


async def _http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, exc.detail, dict(exc.headers or {}))


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("request failed", path=request.url.path, error=repr(exc))
    return error_response(500, "Internal Server Error")


class AuditMiddleware:
    """An audit row for every write and every refused request (401, 403), of the API
    and the console alike, written before the response's last bytes go out, so a
    client that reads /audits next finds it. The path is recorded without its query
    (it may carry a token)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0
        done = False

        async def send_audited(message: Message) -> None:
            nonlocal status, done
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif (
                message["type"] == "http.response.body"
                and not message.get("more_body")
                and not done
            ):
                done = True
                await self._record(scope, status)
            await send(message)

        await self.app(scope, receive, send_audited)

    async def _record(self, scope: Scope, status: int) -> None:
        ctx: Context = scope["app"].state.ctx
        ctx.metrics.requests.labels(str(status)).inc()
        path = str(scope.get("path", ""))
        method = str(scope.get("method", ""))
        if method not in WRITE_METHODS and status not in REFUSED:
            return
        actor_type, actor_name = scope.get(guard.ACTOR_KEY, ("UNKNOWN", ""))
        client = scope.get("client")
        now = ctx.clock()
        row: dict[str, Any] = {
            "created_at": now,
            "updated_at": now,
            "actor_type": actor_type,
            "actor_name": actor_name[:255],
            "event_type": "API",
            "operation": method,
            "operated_at": now,
            "state": "SUCCESS" if 200 <= status < 300 else "FAILURE",
            "path": path[:1024],
            "status_code": status,
            "source": client[0] if client else "",
        }
        try:
            await ctx.db.run(lambda tx: tx.insert("audits", row))
        except DatabaseError as exc:
            log.error("audit row not written", path=path, status=status, error=str(exc))


ROUTES = [
    Route("/healthy", healthy, methods=["GET", "HEAD"]),
    Route("/metrics", metrics, methods=["GET"]),
    WebSocketRoute(MANAGER_PATH, member_endpoint),
    *users.ROUTES,
    *roles.ROUTES,
    *clusters.ROUTES,
    *cluster_parts.ROUTES,
    *hosts.ROUTES,
    *settings.ROUTES,
    *tokens.ROUTES,
    *audits.ROUTES,
    *identity.ROUTES,
    *jobs.ROUTES,
    *CONSOLE,  # the web console at /
]


def build_app(ctx: Context) -> Starlette:
    app = Starlette(
        routes=ROUTES,
        exception_handlers={
            ApiError: _api_error,
            NotFound: _not_found,
            Conflict: _conflict,
            DatabaseError: _database,
            HTTPException: _http,
            Exception: _server_error,
        },
    )
    app.state.ctx = ctx
    app.add_middleware(AuditMiddleware)
    return app
