"""/api/v1/roles and /api/v1/permissions: roles as sets of (API group, action).

The seeded roles `root` (`*` on every group) and `guest` (`read` on every group)
cannot be deleted or changed: the manager's own access rests on them.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dragonfly.manager import auth, guard
from dragonfly.manager.context import context
from dragonfly.manager.http import ApiError, decode, empty_response, json_response
from dragonfly.manager.store import Tx
from dragonfly.manager.store.rows import NotFound

RoleName = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[\w.-]+$")]
SEEDED = (auth.ROOT, auth.GUEST)


class Permission(msgspec.Struct):
    object: str
    action: str


class CreateRole(msgspec.Struct):
    role: RoleName
    permissions: list[Permission]


def _check(permission: Permission) -> tuple[str, str]:
    if permission.object not in auth.GROUPS:
        raise ApiError(422, f"unknown object {permission.object[:64]!r}")
    if permission.action not in auth.ACTIONS:
        raise ApiError(422, "action must be read or *")
    return permission.object, permission.action


def _role(request: Request) -> str:
    return str(request.path_params["role"])


def _existing(tx: Tx, role: str) -> None:
    if tx.one("SELECT name FROM roles WHERE name = ?", [role]) is None:
        raise NotFound("role not found")


def _unchangeable(role: str) -> None:
    if role in SEEDED:
        raise ApiError(409, f"the role {role} is built in and cannot be changed")


async def list_roles(request: Request) -> Response:
    await guard.authorize(request)
    found = await context(request).db.run(
        lambda tx: tx.query("SELECT name FROM roles ORDER BY name")
    )
    return json_response([r["name"] for r in found])


async def get_role(request: Request) -> Response:
    await guard.authorize(request)
    role = _role(request)

    def load(tx: Tx) -> list[list[str]]:
        _existing(tx, role)
        found = tx.query(
            "SELECT object, action FROM role_permissions WHERE role = ? ORDER BY object, action",
            [role],
        )
        return [[role, r["object"], r["action"]] for r in found]

    return json_response(await context(request).db.run(load))


async def create_role(request: Request) -> Response:
    await guard.authorize(request)
    body = await decode(request, CreateRole)
    permissions = {_check(p) for p in body.permissions}

    def create(tx: Tx) -> None:
        tx.execute("INSERT INTO roles (name) VALUES (?)", [body.role])
        for obj, action in sorted(permissions):
            tx.execute(
                "INSERT INTO role_permissions (role, object, action) VALUES (?, ?, ?)",
                [body.role, obj, action],
            )

    await context(request).db.run(create)
    return empty_response()


async def delete_role(request: Request) -> Response:
    await guard.authorize(request)
    role = _role(request)
    _unchangeable(role)

    def delete(tx: Tx) -> None:
        if not tx.execute("DELETE FROM roles WHERE name = ?", [role]):
            raise NotFound("role not found")

    await context(request).db.run(delete)
    return empty_response()


async def add_permission(request: Request) -> Response:
    await guard.authorize(request)
    role = _role(request)
    obj, action = _check(await decode(request, Permission))
    _unchangeable(role)

    def add(tx: Tx) -> None:
        _existing(tx, role)
        tx.execute(
            "INSERT INTO role_permissions (role, object, action) VALUES (?, ?, ?)",
            [role, obj, action],
        )

    await context(request).db.run(add)
    return empty_response()


async def delete_permission(request: Request) -> Response:
    await guard.authorize(request)
    role = _role(request)
    obj, action = _check(await decode(request, Permission))
    _unchangeable(role)

    def delete(tx: Tx) -> None:
        if not tx.execute(
            "DELETE FROM role_permissions WHERE role = ? AND object = ? AND action = ?",
            [role, obj, action],
        ):
            raise NotFound("permission not found")

    await context(request).db.run(delete)
    return empty_response()


async def list_permissions(request: Request) -> Response:
    await guard.authorize(request)
    return json_response(
        [{"object": g, "action": a} for g in auth.GROUPS for a in (auth.ALL, auth.READ)]
    )


ROUTES = [
    Route("/api/v1/roles", list_roles, methods=["GET"]),
    Route("/api/v1/roles", create_role, methods=["POST"]),
    Route("/api/v1/roles/{role}", get_role, methods=["GET"]),
    Route("/api/v1/roles/{role}", delete_role, methods=["DELETE"]),
    Route("/api/v1/roles/{role}/permissions", add_permission, methods=["POST"]),
    Route("/api/v1/roles/{role}/permissions", delete_permission, methods=["DELETE"]),
    Route("/api/v1/permissions", list_permissions, methods=["GET"]),
]
