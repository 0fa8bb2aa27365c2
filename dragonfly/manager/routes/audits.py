"""/api/v1/audits: who did what, newest first (read only).

A row is written for every write (POST, PUT, PATCH, DELETE) and for every refused
request (401, 403), by the audit middleware in dragonfly/manager/app.py.
"""

from __future__ import annotations

from typing import Any

from dragonfly.manager.http import rfc3339
from dragonfly.manager.routes.crud import Resource, header

ACTOR_TYPES = ("UNKNOWN", "USER", "PAT", "HOST")  # HOST: a host joining (/v1/join)


def render(row: dict[str, Any]) -> dict[str, Any]:
    return {
        **header(row),
        "actor_type": row["actor_type"],
        "actor_name": row["actor_name"],
        "event_type": row["event_type"],
        "operation": row["operation"],
        "operated_at": rfc3339(row["operated_at"]),
        "state": row["state"],
        "path": row["path"],
        "status_code": row["status_code"],
        "source": row["source"],
        "detail": None,
    }


AUDITS = Resource(
    "audits",
    render,
    filters={
        "actor_type": ACTOR_TYPES,
        "actor_name": "str",
        "event_type": ("API",),
        "operation": "str",
        "state": ("SUCCESS", "FAILURE"),
        "path": "str",
        "status_code": "int",
    },
    order="id DESC",
)

ROUTES = AUDITS.routes("/api/v1/audits", patch=False, delete=False)
