"""Who is asking, and may they: the one place every route's credentials are checked.

`/api/v1/*` takes a session JWT from the `jwt` cookie, then `Authorization: Bearer`,
then `?token=` (Dragonfly's order); `/oapi/v1/*` a personal access token from
`?access_token=` or `Authorization: Bearer`. No or bad credentials: 401; a role or
token without the right: 403. The actor is left in the request's scope for the
audit row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from starlette.requests import HTTPConnection, Request

from dragonfly.manager import auth
from dragonfly.manager.context import context
from dragonfly.manager.http import ApiError
from dragonfly.manager.store import Tx
from dragonfly.manager.store.rows import loads

ACTOR_KEY = "dragonfly.actor"
COOKIE = "jwt"


@dataclass
class Principal:
    kind: str  # USER or PAT
    name: str
    user_id: int
    permissions: set[tuple[str, str]] = field(default_factory=set)
    session: auth.Session | None = None

    def may(self, group: str, action: str) -> bool:
        return auth.allowed(self.permissions, group, action)


def set_actor(conn: HTTPConnection, kind: str, name: str) -> None:
    conn.scope[ACTOR_KEY] = (kind, name)


def unauthorized(message: str = "Unauthorized") -> ApiError:
    return ApiError(401, message)


def _bearer(conn: HTTPConnection, *, any_case: bool) -> str | None:
    header = conn.headers.get("authorization", "")
    parts = header.split()
    if len(parts) == 2 and (parts[0].lower() == "bearer" if any_case else parts[0] == "Bearer"):
        return parts[1]
    return None


def bearer(conn: HTTPConnection) -> str | None:
    """An `Authorization: Bearer` value (any case of the scheme)."""
    return _bearer(conn, any_case=True)


def session_token(conn: HTTPConnection) -> str | None:
    return (
        conn.cookies.get(COOKIE)
        or _bearer(conn, any_case=False)
        or conn.query_params.get("token")
        or None
    )


def permissions_of(tx: Tx, user_id: int) -> set[tuple[str, str]]:
    rows = tx.query(
        "SELECT p.object, p.action FROM user_roles u JOIN role_permissions p "
        "ON p.role = u.role WHERE u.user_id = ?",
        [user_id],
    )
    return {(r["object"], r["action"]) for r in rows}


def _load_user(tx: Tx, user_id: int) -> dict[str, Any] | None:
    if not 0 < user_id < 2**63:
        return None
    user = tx.one("SELECT id, name, state, session_generation FROM users WHERE id = ?", [user_id])
    if user is None or user["state"] != "enable":
        return None
    return user


async def session_principal(conn: HTTPConnection, *, refresh_window: float = 0.0) -> Principal:
    """The signed-in user, or 401."""
    ctx = context(conn)
    token = session_token(conn)
    if token is None:
        raise unauthorized()
    now = ctx.clock()
    try:
        session = auth.read_session(ctx.jwt_key, token, now, refresh_window=refresh_window)
    except auth.BadToken:
        raise unauthorized() from None

    def load(tx: Tx) -> Principal | None:
        user = _load_user(tx, session.user_id)
        if user is None or session.generation != user["session_generation"]:
            return None
        if tx.one("SELECT jti FROM revoked_sessions WHERE jti = ?", [session.jti]):
            return None
        return Principal("USER", user["name"], user["id"], permissions_of(tx, user["id"]), session)

    principal = await ctx.db.run(load)
    if principal is None:
        raise unauthorized()
    set_actor(conn, principal.kind, principal.name)
    return principal


async def token_principal(conn: HTTPConnection, group: str) -> Principal:
    """The personal access token's holder, for the /oapi/ route of `group`, or 401/403.
    A token acts with its owner's roles too: a guest's token reads, never writes."""
    ctx = context(conn)
    token = conn.query_params.get("access_token") or _bearer(conn, any_case=True)
    if not token:
        raise unauthorized()
    digest = auth.token_hash(token)

    def load(tx: Tx) -> tuple[dict[str, Any], Principal | None] | None:
        row = tx.one(
            "SELECT name, state, expired_at, scopes, user_id FROM personal_access_tokens "
            "WHERE token_hash = ?",
            [digest],
        )
        if row is None:
            return None
        user = _load_user(tx, row["user_id"])
        if user is None:
            return row, None
        return row, Principal("PAT", row["name"], user["id"], permissions_of(tx, user["id"]))

    found = await ctx.db.run(load)
    if found is None:
        raise unauthorized()
    row, principal = found
    set_actor(conn, "PAT", row["name"])
    if principal is None:
        raise ApiError(403, "Token's user is disabled")
    refusal = auth.check_access_token(
        row["state"],
        row["expired_at"],
        loads(row["scopes"]),
        auth.OAPI_SCOPES.get(group),
        ctx.clock(),
    )
    if refusal is not None:
        raise ApiError(403, refusal)
    return principal


async def authorize(request: Request) -> Principal:
    """Authenticate the request for its path and check the permission its method needs."""
    path = request.url.path
    group = auth.api_group(path)
    if group is None:
        raise ApiError(403, "permission validate error")
    if path.startswith("/oapi/"):
        principal = await token_principal(request, group)
    else:
        principal = await session_principal(request)
    action = auth.action_for(request.method)
    if not principal.may(group, action):
        raise ApiError(403, "permission deny")
    return principal
