"""Cluster identity through the manager: join tokens, the credentials issued against
them, and revocations (the manager as issuer: dragonfly/manager/issuer.py).

- `/api/v1/join-tokens`: one token per role (peer, seed-peer, scheduler). `POST
  /api/v1/join-tokens/ROLE` makes a new one (shown once; the previous one stops
  working at once); lists and reads never show a token, only its role and times; only
  its SHA-256 is kept.
- `POST /v1/join` (a host, not a user): `Authorization: Bearer JOIN_TOKEN` and
  `{"role", "hostname"}` → a credential for a new host ID (and, for a scheduler, the
  cluster secret). Host-facing like the members' websocket, so it lives beside it.
- `/api/v1/host-credentials`: what was issued, when, to whom (never a key).
- `/api/v1/revocations`: `{"host_id"}` revokes every credential of that host issued
  until now; schedulers refuse it within a keepalive interval. Deleting the row lifts it.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dragonfly.credentials import credential_doc, ring_doc
from dragonfly.manager import auth, guard
from dragonfly.manager.context import context
from dragonfly.manager.http import (
    ApiError,
    decode,
    empty_response,
    json_response,
    list_response,
    not_found,
    pagination,
    rfc3339,
)
from dragonfly.manager.issuer import JOIN_ROLES, issue_credential
from dragonfly.manager.routes.crud import Resource, header
from dragonfly.manager.store import Tx, rows
from dragonfly.trust import TrustError

JOIN_PATH = "/v1/join"
JOIN_TOKEN_PREFIX = "dfjoin_"
HostId = Annotated[
    str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@+-]*$")
]
Bio = Annotated[str, msgspec.Meta(max_length=1024)]


# ---------------------------------------------------------------- join tokens


def _role(request: Request) -> str:
    role = str(request.path_params.get("role", ""))
    if role not in JOIN_ROLES:
        raise not_found(f"no join token role {role[:64]!r} (roles: {', '.join(JOIN_ROLES)})")
    return role


def render_join_token(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "role": row["role"],
        "created_at": rfc3339(row["created_at"]),
        "updated_at": rfc3339(row["updated_at"]),
        "user_id": row["user_id"],
    }


async def list_join_tokens(request: Request) -> Response:
    await guard.authorize(request)
    page, per_page = pagination(request)
    found, total = await context(request).db.run(
        lambda tx: rows.page(tx, "join_tokens", {}, page, per_page, order="role")
    )
    return list_response(request, [render_join_token(r) for r in found], page, per_page, total)


async def get_join_token(request: Request) -> Response:
    await guard.authorize(request)
    role = _role(request)
    row = await context(request).db.run(
        lambda tx: tx.one("SELECT * FROM join_tokens WHERE role = ?", [role])
    )
    if row is None:
        raise not_found(f"no join token for {role}")
    return json_response(render_join_token(row))


async def rotate_join_token(request: Request) -> Response:
    """A new token for the role (made if there was none); the old one is refused from now."""
    principal = await guard.authorize(request)
    role = _role(request)
    ctx = context(request)
    token = JOIN_TOKEN_PREFIX + secrets.token_urlsafe(32)
    now = ctx.clock()

    def rotate(tx: Tx) -> dict[str, Any]:
        tx.execute(
            "INSERT INTO join_tokens (role, created_at, updated_at, token_hash, user_id) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (role) DO UPDATE SET "
            "token_hash = excluded.token_hash, updated_at = excluded.updated_at, "
            "user_id = excluded.user_id",
            [role, now, now, auth.token_hash(token), principal.user_id],
        )
        row = tx.one("SELECT * FROM join_tokens WHERE role = ?", [role])
        assert row is not None
        return row

    row = await ctx.db.run(rotate)
    return json_response({**render_join_token(row), "token": token})


async def delete_join_token(request: Request) -> Response:
    await guard.authorize(request)
    role = _role(request)
    deleted = await context(request).db.run(
        lambda tx: tx.execute("DELETE FROM join_tokens WHERE role = ?", [role])
    )
    if not deleted:
        raise not_found(f"no join token for {role}")
    return empty_response()


# ---------------------------------------------------------------- joining


class JoinRequest(msgspec.Struct):
    role: Annotated[str, msgspec.Meta(pattern="^(peer|seed-peer|scheduler)$")]
    hostname: Annotated[str, msgspec.Meta(min_length=1, max_length=255)]


async def join(request: Request) -> Response:
    """A host presents its role's join token and gets a credential (a scheduler: and the
    cluster secret). A token that is unknown or rotated away: 401; another role's: 403."""
    ctx = context(request)
    assert ctx.ring is not None
    token = guard.bearer(request)
    guard.set_actor(request, "HOST", "")
    if not token:
        raise ApiError(401, "a join token is required (Authorization: Bearer TOKEN)")
    body = await decode(request, JoinRequest)
    guard.set_actor(request, "HOST", f"{body.role} {body.hostname}"[:255])
    digest = auth.token_hash(token)
    found = await ctx.db.run(
        lambda tx: tx.one("SELECT role FROM join_tokens WHERE token_hash = ?", [digest])
    )
    if found is None:
        ctx.metrics.joins.labels(body.role, "refused").inc()
        raise ApiError(401, "join token refused: unknown, or rotated since")
    if found["role"] != body.role:
        ctx.metrics.joins.labels(body.role, "refused").inc()
        raise ApiError(403, f"this join token is for a {found['role']}, not a {body.role}")
    now = ctx.clock()
    try:
        credential = issue_credential(
            ctx.ring, body.role, body.hostname, now, ctx.config.trust.credential_ttl
        )
    except TrustError as exc:
        raise ApiError(422, str(exc)) from None
    claims = credential.claims
    client = request.client.host if request.client else ""
    await ctx.db.run(
        lambda tx: rows.insert(
            tx,
            "host_credentials",
            {
                "host_id": claims.host_id,
                "role": claims.role,
                "host_name": body.hostname,
                "ip": client,
                "key_id": claims.key_id,
                "expires_at": float(claims.expires_at),
            },
            now,
        )
    )
    ctx.metrics.joins.labels(body.role, "issued").inc()
    answer: dict[str, Any] = {
        "host_id": claims.host_id,
        "role": claims.role,
        "credential": credential_doc(credential),
    }
    if body.role == "scheduler":
        answer["cluster_secret"] = ring_doc(ctx.ring)
    return json_response(answer)


# ---------------------------------------------------------------- issued, revoked


def _revoked_hosts(tx: Tx, found: list[dict[str, Any]]) -> None:
    ids = [r["host_id"] for r in found]
    if not ids:
        return
    marks = ", ".join("?" for _ in ids)
    revoked = {
        r["host_id"]: r["created_at"]
        for r in tx.query(
            f"SELECT host_id, created_at FROM revocations WHERE host_id IN ({marks})", ids
        )
    }
    for row in found:
        before = revoked.get(row["host_id"])
        row["revoked"] = before is not None and int(row["created_at"]) <= int(before)


def render_host_credential(row: dict[str, Any]) -> dict[str, Any]:
    return {
        **header(row),
        **{k: row[k] for k in ("host_id", "role", "host_name", "ip", "key_id")},
        "issued_at": rfc3339(row["created_at"]),
        "expires_at": rfc3339(row["expires_at"]),
        "revoked": bool(row.get("revoked")),
    }


HOST_CREDENTIALS = Resource(
    "host_credentials",
    render_host_credential,
    filters={"host_id": "str", "role": JOIN_ROLES, "host_name": "str", "ip": "str"},
    enrich=_revoked_hosts,
)


class CreateRevocation(msgspec.Struct):
    host_id: HostId
    bio: Bio = ""


def render_revocation(row: dict[str, Any]) -> dict[str, Any]:
    return {
        **header(row),
        "host_id": row["host_id"],
        "bio": row["bio"],
        "user_id": row["user_id"],
        # every credential of the host issued up to this moment is refused
        "revoked_before": rfc3339(row["created_at"]),
    }


def _revoker(values: dict[str, Any], principal: guard.Principal) -> dict[str, Any]:
    return {**values, "user_id": principal.user_id}


REVOCATIONS = Resource(
    "revocations",
    render_revocation,
    CreateRevocation,
    filters={"host_id": "str"},
    to_row=_revoker,
)

ROUTES = [
    Route("/api/v1/join-tokens", list_join_tokens, methods=["GET"]),
    Route("/api/v1/join-tokens/{role}", get_join_token, methods=["GET"]),
    Route("/api/v1/join-tokens/{role}", rotate_join_token, methods=["POST"]),
    Route("/api/v1/join-tokens/{role}", delete_join_token, methods=["DELETE"]),
    Route(JOIN_PATH, join, methods=["POST"]),
    *HOST_CREDENTIALS.routes("/api/v1/host-credentials", patch=False, delete=False),
    *REVOCATIONS.routes("/api/v1/revocations", patch=False),
]
