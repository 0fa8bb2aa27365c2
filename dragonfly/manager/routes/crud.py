"""The five routes most resources share (list, get, create, update, delete), from one
description of the resource: its table, filters, request Structs and rendering.

A referenced row that does not exist (a cluster id, a user id) is a 404 naming it;
a duplicate unique key is a 409 (`Conflict`, raised by the store).
"""

from __future__ import annotations

import builtins
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dragonfly.manager import guard
from dragonfly.manager.context import context
from dragonfly.manager.guard import Principal
from dragonfly.manager.http import (
    decode,
    empty_response,
    json_response,
    list_response,
    pagination,
    path_id,
    query_choice,
    query_int,
    query_str,
    rfc3339,
)
from dragonfly.manager.store import Tx, rows
from dragonfly.manager.store.rows import NotFound

# A filter: "str", "int", or a tuple of the accepted values.
Filter = str | tuple[str, ...]


def header(row: dict[str, Any]) -> dict[str, Any]:
    """The fields every Dragonfly model starts with."""
    return {
        "id": row["id"],
        "created_at": rfc3339(row["created_at"]),
        "updated_at": rfc3339(row["updated_at"]),
        "is_del": 0,
    }


def require_row(tx: Tx, table: str, row_id: int, what: str) -> None:
    """404 naming `what` unless the referenced row exists."""
    try:
        rows.get(tx, table, row_id)
    except NotFound:
        raise NotFound(f"{what} {row_id}: record not found") from None


def struct_changes(body: msgspec.Struct) -> dict[str, Any]:
    """The fields a PATCH body gave (UNSET ones are left alone)."""
    return {
        name: value
        for name in body.__struct_fields__
        if (value := getattr(body, name)) is not msgspec.UNSET
    }


@dataclass
class Resource:
    table: str
    render: Callable[[dict[str, Any]], dict[str, Any]]
    create_type: type[msgspec.Struct] | None = None
    update_type: type[msgspec.Struct] | None = None
    filters: dict[str, Filter] = field(default_factory=dict)
    # request → row values (create and update); references checked in `check`
    to_row: Callable[[dict[str, Any], Principal], dict[str, Any]] = lambda v, p: v
    check: Callable[[Tx, dict[str, Any]], None] = lambda tx, values: None
    before_delete: Callable[[Tx, int], None] = lambda tx, row_id: None
    # after an insert or update, with the row and the request's own values
    after_write: Callable[[Tx, dict[str, Any], dict[str, Any]], None] = lambda tx, r, v: None
    # adds what rendering needs from other tables to rows just read
    enrich: Callable[[Tx, list[dict[str, Any]]], None] = lambda tx, found: None
    order: str = "id"

    def _filters(self, request: Request) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for name, kind in self.filters.items():
            if kind == "int":
                found[name] = query_int(request, name)
            elif isinstance(kind, tuple):
                found[name] = query_choice(request, name, kind)
            else:
                found[name] = query_str(request, name)
        return found

    async def list(self, request: Request) -> Response:
        await guard.authorize(request)
        page, per_page = pagination(request)
        filters = self._filters(request)

        def load(tx: Tx) -> tuple[list[dict[str, Any]], int]:
            found, total = rows.page(tx, self.table, filters, page, per_page, order=self.order)
            self.enrich(tx, found)
            return found, total

        found, total = await context(request).db.run(load)
        return list_response(request, [self.render(r) for r in found], page, per_page, total)

    async def get(self, request: Request) -> Response:
        await guard.authorize(request)
        row_id = path_id(request)
        return json_response(self.render(await context(request).db.run(self._get(row_id))))

    def _get(self, row_id: int) -> Callable[[Tx], dict[str, Any]]:
        def load(tx: Tx) -> dict[str, Any]:
            row = rows.get(tx, self.table, row_id)
            self.enrich(tx, [row])
            return row

        return load

    async def create(self, request: Request) -> Response:
        principal = await guard.authorize(request)
        assert self.create_type is not None
        body = await decode(request, self.create_type)
        given = msgspec.structs.asdict(body)
        values = self.to_row(given, principal)
        ctx = context(request)
        now = ctx.clock()

        def create(tx: Tx) -> dict[str, Any]:
            self.check(tx, values)
            row = rows.insert(tx, self.table, values, now)
            self.after_write(tx, row, given)
            return self._get(row["id"])(tx)

        return json_response(self.render(await ctx.db.run(create)))

    async def update(self, request: Request) -> Response:
        principal = await guard.authorize(request)
        assert self.update_type is not None
        row_id = path_id(request)
        body = await decode(request, self.update_type)
        given = struct_changes(body)
        values = self.to_row(given, principal)
        ctx = context(request)
        now = ctx.clock()

        def update(tx: Tx) -> dict[str, Any]:
            self.check(tx, values)
            row = rows.update(tx, self.table, row_id, values, now)
            self.after_write(tx, row, given)
            return self._get(row_id)(tx)

        return json_response(self.render(await ctx.db.run(update)))

    async def delete(self, request: Request) -> Response:
        await guard.authorize(request)
        row_id = path_id(request)

        def delete(tx: Tx) -> None:
            rows.get(tx, self.table, row_id)
            self.before_delete(tx, row_id)
            rows.delete(tx, self.table, row_id)

        await context(request).db.run(delete)
        return empty_response()

    def routes(
        self, base: str, *, patch: bool = True, delete: bool = True
    ) -> builtins.list[Route]:  # (`list` here is the method above)
        found = [
            Route(base, self.list, methods=["GET"]),
            Route(f"{base}/{{id}}", self.get, methods=["GET"]),
        ]
        if delete:
            found.append(Route(f"{base}/{{id}}", self.delete, methods=["DELETE"]))
        if self.create_type is not None:
            found.append(Route(base, self.create, methods=["POST"]))
        if patch and self.update_type is not None:
            found.append(Route(f"{base}/{{id}}", self.update, methods=["PATCH"]))
        return found
