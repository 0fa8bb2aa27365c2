"""Row helpers shared by the resources: paged lists, get, insert, update, delete.

Table and column names come from the code, never from a request; values always
travel as parameters.
"""

from __future__ import annotations

import json
from typing import Any

from dragonfly.manager.store.db import DatabaseError, Tx


class NotFound(Exception):
    """No row with that id (or key)."""

    def __init__(self, what: str = "record not found") -> None:
        super().__init__(what)


MAX_ID = 2**63 - 1


def where(filters: dict[str, Any]) -> tuple[str, list[Any]]:
    """`WHERE a = ? AND b = ?` for the filters given (None: not filtered)."""
    given = {k: v for k, v in filters.items() if v is not None}
    if not given:
        return "", []
    return " WHERE " + " AND ".join(f"{k} = ?" for k in given), list(given.values())


def page(
    tx: Tx,
    table: str,
    filters: dict[str, Any],
    page_number: int,
    per_page: int,
    *,
    order: str = "id",
) -> tuple[list[dict[str, Any]], int]:
    """One page of rows and the total count under the same filters."""
    clause, params = where(filters)
    total = tx.one(f"SELECT COUNT(*) AS n FROM {table}{clause}", params)
    rows = tx.query(
        f"SELECT * FROM {table}{clause} ORDER BY {order} LIMIT ? OFFSET ?",
        [*params, per_page, (page_number - 1) * per_page],
    )
    return rows, int(total["n"]) if total else 0


def get(tx: Tx, table: str, row_id: int) -> dict[str, Any]:
    if not 0 < row_id <= MAX_ID:
        raise NotFound()
    row = tx.one(f"SELECT * FROM {table} WHERE id = ?", [row_id])
    if row is None:
        raise NotFound()
    return row


def insert(tx: Tx, table: str, values: dict[str, Any], now: float) -> dict[str, Any]:
    row_id = tx.insert(table, {"created_at": now, "updated_at": now, **values})
    return get(tx, table, row_id)


def update(tx: Tx, table: str, row_id: int, changes: dict[str, Any], now: float) -> dict[str, Any]:
    get(tx, table, row_id)
    if changes:
        sets = ", ".join(f"{k} = ?" for k in changes)
        tx.execute(
            f"UPDATE {table} SET {sets}, updated_at = ? WHERE id = ?",
            [*changes.values(), now, row_id],
        )
    return get(tx, table, row_id)


def delete(tx: Tx, table: str, row_id: int) -> None:
    if not 0 < row_id <= MAX_ID or not tx.execute(f"DELETE FROM {table} WHERE id = ?", [row_id]):
        raise NotFound()


def dumps(value: Any) -> str:
    """A JSON column's text (compact, keys in a stable order)."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:  # written by this code only: a broken row is a server error
        raise DatabaseError(f"a stored JSON column does not parse: {exc}") from None
