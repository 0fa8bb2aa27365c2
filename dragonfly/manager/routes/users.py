"""/api/v1/users: sign-in, sign-up, sign-out, refresh, password change and reset, the
user list, and each user's roles.

Where this differs from Dragonfly (docs/API.md says so too): reset_password needs a
session (the user with their old password, or root without it: Dragonfly's needs
none); sign-up is off unless `auth.signup`, but root may always add users through
it; the session cookie is HttpOnly and SameSite=Lax; a sign-out revokes the token.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
import trio
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dragonfly.manager import auth, guard
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
    query_str,
    rfc3339,
)
from dragonfly.manager.store import Tx, rows
from dragonfly.manager.store.rows import NotFound

NAME_MAX = 64
Password = Annotated[str, msgspec.Meta(min_length=8, max_length=128)]
UserName = Annotated[str, msgspec.Meta(min_length=3, max_length=NAME_MAX, pattern=r"^[\w.@-]+$")]
Email = Annotated[str, msgspec.Meta(max_length=256, pattern=r"^[^@\s]+@[^@\s]+$")]
Text = Annotated[str, msgspec.Meta(max_length=1024)]
USER_STATES = ("enable", "disable")


class SignIn(msgspec.Struct):
    name: str
    password: str


class SignUp(msgspec.Struct):
    name: UserName
    password: Password
    email: Email
    phone: Text = ""
    avatar: Text = ""
    location: Text = ""
    bio: Text = ""


class UpdateUser(msgspec.Struct, omit_defaults=True):
    email: Email | None = None
    phone: Text | None = None
    avatar: Text | None = None
    location: Text | None = None
    bio: Text | None = None
    state: Annotated[str, msgspec.Meta(pattern="^(enable|disable)$")] | None = None


class ResetPassword(msgspec.Struct):
    new_password: Password
    old_password: str = ""


def render(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": row["id"],
        "created_at": rfc3339(row["created_at"]),
        "updated_at": rfc3339(row["updated_at"]),
        "is_del": 0,
        "email": row["email"],
        "name": row["name"],
        "avatar": row["avatar"],
        "phone": row["phone"],
        "state": row["state"],
        "location": row["location"],
        "bio": row["bio"],
        "configs": None,
    }


def _cookie(
    ctx: Context,
    response: Response,
    token: str,
    max_age: int,
    samesite: Literal["lax", "strict"] = "lax",
) -> None:
    response.set_cookie(
        guard.COOKIE,
        token,
        max_age=max_age,
        path="/",
        httponly=True,
        samesite=samesite,
        secure=ctx.config.auth.cookie_secure,
    )


async def verify_user(ctx: Context, name: str, password: str) -> dict[str, Any] | None:
    """The enabled user with this name and password, else None (the same time either way)."""
    user = await ctx.db.run(
        lambda tx: tx.one(
            "SELECT id, name, encrypted_password, state, session_generation FROM users "
            "WHERE name = ?",
            [name],
        )
    )
    encoded = user["encrypted_password"] if user else auth.DUMMY_HASH
    ok = await trio.to_thread.run_sync(auth.verify_password, encoded, password)
    if not ok or user is None or user["state"] != "enable":
        return None
    return user


def revoke_session(tx: Tx, jti: str, until: float) -> None:
    tx.execute(
        "INSERT INTO revoked_sessions (jti, expires_at) VALUES (?, ?) ON CONFLICT (jti) DO NOTHING",
        [jti, until],
    )


def new_session(
    ctx: Context, user_id: int, generation: int, orig: float | None = None
) -> tuple[str, auth.Session]:
    return auth.issue_session(
        ctx.jwt_key, user_id, generation, ctx.clock(), ctx.config.auth.session_ttl, orig_iat=orig
    )


def _session_response(ctx: Context, user_id: int, generation: int, orig: float | None) -> Response:
    token, session = new_session(ctx, user_id, generation, orig)
    response = json_response({"token": token, "expire": rfc3339(session.expires_at)})
    _cookie(ctx, response, token, int(ctx.config.auth.session_ttl))
    return response


async def signin(request: Request) -> Response:
    ctx = context(request)
    try:
        body = await decode(request, SignIn)
    except ApiError:
        raise guard.unauthorized() from None
    guard.set_actor(request, "UNKNOWN", body.name[:NAME_MAX])
    user = await verify_user(ctx, body.name, body.password)
    if user is None:
        raise guard.unauthorized()
    guard.set_actor(request, "USER", body.name)
    return _session_response(ctx, user["id"], user["session_generation"], None)


async def signout(request: Request) -> Response:
    ctx = context(request)
    token = guard.session_token(request)
    if token is not None:
        try:
            session = auth.read_session(ctx.jwt_key, token, ctx.clock())
        except auth.BadToken:
            session = None
        if session is not None:
            await ctx.db.run(lambda tx: revoke_session(tx, session.jti, session.expires_at))
    response = empty_response()
    response.delete_cookie(guard.COOKIE, path="/")
    return response


async def refresh_token(request: Request) -> Response:
    ctx = context(request)
    principal = await guard.session_principal(request, refresh_window=ctx.config.auth.refresh_ttl)
    assert principal.session is not None
    session = principal.session
    # The old token is done: a refresh is not a way to hold two sessions.
    await ctx.db.run(
        lambda tx: revoke_session(tx, session.jti, session.orig_iat + ctx.config.auth.refresh_ttl)
    )
    return _session_response(ctx, principal.user_id, session.generation, session.orig_iat)


async def signup(request: Request) -> Response:
    ctx = context(request)
    if not ctx.config.auth.signup:
        # Off by default; root may still add users here.
        principal = await guard.session_principal(request)
        if not principal.may("users", auth.ALL):
            raise ApiError(403, "sign-up is disabled (auth.signup)")
    body = await decode(request, SignUp)
    return json_response(render(await add_user(ctx, body)))


async def add_user(ctx: Context, body: SignUp) -> dict[str, Any]:
    """A new user, with the guest role."""
    encoded = await trio.to_thread.run_sync(auth.hash_password, body.password)
    now = ctx.clock()

    def create(tx: Tx) -> dict[str, Any]:
        values = msgspec.structs.asdict(body)
        del values["password"]
        row = rows.insert(tx, "users", {**values, "encrypted_password": encoded}, now)
        tx.execute("INSERT INTO user_roles (user_id, role) VALUES (?, ?)", [row["id"], auth.GUEST])
        return row

    return await ctx.db.run(create)


async def reset_password(request: Request) -> Response:
    ctx = context(request)
    principal = await guard.session_principal(request)
    user_id = path_id(request)
    own = principal.user_id == user_id
    if not own and not principal.may("users", auth.ALL):
        raise ApiError(403, "only root may reset another user's password")
    body = await decode(request, ResetPassword)
    user = await ctx.db.run(lambda tx: rows.get(tx, "users", user_id))
    if own:
        ok = await trio.to_thread.run_sync(
            auth.verify_password, user["encrypted_password"], body.old_password
        )
        if not ok:
            raise guard.unauthorized("old_password is wrong")
    encoded = await trio.to_thread.run_sync(auth.hash_password, body.new_password)
    now = ctx.clock()
    await ctx.db.run(
        lambda tx: tx.execute(
            "UPDATE users SET encrypted_password = ?, session_generation = "
            "session_generation + 1, updated_at = ? WHERE id = ?",
            [encoded, now, user_id],
        )
    )
    return empty_response()


async def list_users(request: Request) -> Response:
    ctx = context(request)
    await guard.authorize(request)
    page, per_page = pagination(request)
    filters = {k: query_str(request, k) for k in ("name", "email", "location")}
    filters["state"] = query_choice(request, "state", USER_STATES)
    found, total = await ctx.db.run(lambda tx: rows.page(tx, "users", filters, page, per_page))
    return list_response(request, [render(r) for r in found], page, per_page, total)


async def get_user(request: Request) -> Response:
    ctx = context(request)
    await guard.authorize(request)
    user_id = path_id(request)
    return json_response(render(await ctx.db.run(lambda tx: rows.get(tx, "users", user_id))))


def _root_count(tx: Tx) -> int:
    row = tx.one(
        "SELECT COUNT(*) AS n FROM user_roles r JOIN users u ON u.id = r.user_id "
        "WHERE r.role = ? AND u.state = 'enable'",
        [auth.ROOT],
    )
    return int(row["n"]) if row else 0


def _is_enabled_root(tx: Tx, user_id: int) -> bool:
    return bool(
        tx.one(
            "SELECT 1 AS x FROM user_roles r JOIN users u ON u.id = r.user_id "
            "WHERE r.user_id = ? AND r.role = ? AND u.state = 'enable'",
            [user_id, auth.ROOT],
        )
    )


async def update_user(request: Request) -> Response:
    ctx = context(request)
    await guard.authorize(request)
    user_id = path_id(request)
    body = await decode(request, UpdateUser)
    changes = msgspec.structs.asdict(body)
    changes = {k: v for k, v in changes.items() if v is not None}
    now = ctx.clock()

    def update(tx: Tx) -> dict[str, Any]:
        last_root = _is_enabled_root(tx, user_id) and _root_count(tx) <= 1
        if changes.get("state") == "disable" and last_root:
            raise ApiError(409, "the last enabled root user cannot be disabled")
        if changes.get("state") == "disable":
            tx.execute(
                "UPDATE users SET session_generation = session_generation + 1 WHERE id = ?",
                [user_id],
            )
        return rows.update(tx, "users", user_id, changes, now)

    return json_response(render(await ctx.db.run(update)))


async def user_roles(request: Request) -> Response:
    ctx = context(request)
    await guard.authorize(request)
    user_id = path_id(request)

    def load(tx: Tx) -> list[str]:
        rows.get(tx, "users", user_id)
        found = tx.query("SELECT role FROM user_roles WHERE user_id = ? ORDER BY role", [user_id])
        return [r["role"] for r in found]

    return json_response(await ctx.db.run(load))


async def add_user_role(request: Request) -> Response:
    ctx = context(request)
    await guard.authorize(request)
    user_id = path_id(request)
    role = request.path_params["role"]

    def add(tx: Tx) -> None:
        rows.get(tx, "users", user_id)
        if tx.one("SELECT name FROM roles WHERE name = ?", [role]) is None:
            raise NotFound("role not found")
        tx.execute("INSERT INTO user_roles (user_id, role) VALUES (?, ?)", [user_id, role])

    await ctx.db.run(add)
    return empty_response()


async def delete_user_role(request: Request) -> Response:
    ctx = context(request)
    await guard.authorize(request)
    user_id = path_id(request)
    role = request.path_params["role"]

    def remove(tx: Tx) -> None:
        if role == auth.ROOT and _is_enabled_root(tx, user_id) and _root_count(tx) <= 1:
            raise ApiError(409, "the last enabled root user keeps the root role")
        if not tx.execute("DELETE FROM user_roles WHERE user_id = ? AND role = ?", [user_id, role]):
            raise NotFound()

    await ctx.db.run(remove)
    return empty_response()


ROUTES = [
    Route("/api/v1/users/signin", signin, methods=["POST"]),
    Route("/api/v1/users/signout", signout, methods=["POST"]),
    Route("/api/v1/users/signup", signup, methods=["POST"]),
    Route("/api/v1/users/refresh_token", refresh_token, methods=["POST"]),
    Route("/api/v1/users/{id}/reset_password", reset_password, methods=["POST"]),
    Route("/api/v1/users/{id}/roles", user_roles, methods=["GET"]),
    Route("/api/v1/users/{id}/roles/{role}", add_user_role, methods=["PUT"]),
    Route("/api/v1/users/{id}/roles/{role}", delete_user_role, methods=["DELETE"]),
    Route("/api/v1/users/{id}", get_user, methods=["GET"]),
    Route("/api/v1/users/{id}", update_user, methods=["PATCH"]),
    Route("/api/v1/users", list_users, methods=["GET"]),
]
