"""/api/v1/personal-access-tokens: tokens for scripts and integrations (/oapi/v1/).

A token is shown once, in the answer that creates it; only its SHA-256 is stored,
so lists and reads never show it (Dragonfly stores and shows tokens in clear).
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dragonfly.manager import auth, guard
from dragonfly.manager.context import Context, context
from dragonfly.manager.http import ApiError, decode, json_response, parse_rfc3339, rfc3339
from dragonfly.manager.routes.crud import Resource, header, require_row
from dragonfly.manager.store import Tx, rows

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
Bio = Annotated[str, msgspec.Meta(max_length=1024)]
Scope = Annotated[str, msgspec.Meta(pattern="^(job|cluster)$")]
Scopes = Annotated[list[Scope], msgspec.Meta(max_length=2)]
Time = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
UNSET: Any = msgspec.UNSET
STATES = ("active", "inactive")


class CreateToken(msgspec.Struct):
    name: Name
    expired_at: Time
    bio: Bio = ""
    scopes: Scopes = msgspec.field(default_factory=lambda: list(auth.PAT_SCOPES))
    user_id: Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)] | None = None


class UpdateToken(msgspec.Struct):
    bio: Bio | msgspec.UnsetType = UNSET
    scopes: Scopes | msgspec.UnsetType = UNSET
    state: Annotated[str, msgspec.Meta(pattern="^(active|inactive)$")] | msgspec.UnsetType = UNSET
    expired_at: Time | msgspec.UnsetType = UNSET


def render(row: dict[str, Any]) -> dict[str, Any]:
    return {
        **header(row),
        "name": row["name"],
        "bio": row["bio"],
        "scopes": rows.loads(row["scopes"]),
        "state": row["state"],
        "expired_at": rfc3339(row["expired_at"]),
        "user_id": row["user_id"],
    }


def _values(given: dict[str, Any], principal: guard.Principal) -> dict[str, Any]:
    values = dict(given)
    if "scopes" in values:
        # An empty list means both, as Dragonfly has it; stored explicitly.
        values["scopes"] = rows.dumps(sorted(set(values["scopes"]) or set(auth.PAT_SCOPES)))
    if "expired_at" in values:
        values["expired_at"] = parse_rfc3339(values["expired_at"])
    if values.get("user_id", UNSET) is None:
        values["user_id"] = principal.user_id
    return values


def _check(tx: Tx, values: dict[str, Any]) -> None:
    if "user_id" in values:
        require_row(tx, "users", values["user_id"], "user")


TOKENS = Resource(
    "personal_access_tokens",
    render,
    None,
    UpdateToken,
    filters={"state": STATES, "user_id": "int"},
    to_row=_values,
    check=_check,
)


async def create_in(
    ctx: Context, given: dict[str, Any], principal: guard.Principal
) -> dict[str, Any]:
    """A new token from the request's fields (validated as the API does): its row as the
    API shows it, with the token itself, the only time it is shown."""
    body = msgspec.convert(given, CreateToken)
    values = _values(msgspec.structs.asdict(body), principal)
    now = ctx.clock()
    if values["expired_at"] <= now:
        raise ApiError(422, "expired_at: must be in the future")
    token, digest = auth.new_access_token()

    def create(tx: Tx) -> dict[str, Any]:
        _check(tx, values)
        return rows.insert(
            tx, "personal_access_tokens", {**values, "token_hash": digest, "state": "active"}, now
        )

    row = await ctx.db.run(create)
    return {**render(row), "token": token}


async def create_token(request: Request) -> Response:
    principal = await guard.authorize(request)
    body = await decode(request, CreateToken)
    given = msgspec.structs.asdict(body)
    return json_response(await create_in(context(request), given, principal))


ROUTES = [
    Route("/api/v1/personal-access-tokens", create_token, methods=["POST"]),
    *TOKENS.routes("/api/v1/personal-access-tokens"),
]
