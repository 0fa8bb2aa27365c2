"""/api/v1/configs (named values) and /api/v1/applications (priorities by URL)."""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec

from dragonfly.manager.guard import Principal
from dragonfly.manager.models import builtins
from dragonfly.manager.routes.crud import Resource, header, require_row
from dragonfly.manager.store import Tx, rows

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
Bio = Annotated[str, msgspec.Meta(max_length=1024)]
Value = Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
Url = Annotated[str, msgspec.Meta(min_length=1, max_length=2048, pattern=r"^https?://")]
Level = Annotated[int, msgspec.Meta(ge=0, le=20)]
UserId = Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
UNSET: Any = msgspec.UNSET


class CreateConfig(msgspec.Struct):
    name: Name
    value: Value
    bio: Bio = ""
    user_id: UserId | None = None  # default: the caller


class UpdateConfig(msgspec.Struct):
    name: Name | msgspec.UnsetType = UNSET
    value: Value | msgspec.UnsetType = UNSET
    bio: Bio | msgspec.UnsetType = UNSET
    user_id: UserId | msgspec.UnsetType = UNSET


class URLPriority(msgspec.Struct):
    regex: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
    value: Level

    def __post_init__(self) -> None:
        try:
            re.compile(self.regex)
        except re.error as exc:
            raise ValueError(f"regex: invalid regular expression: {exc}") from None


class Priority(msgspec.Struct):
    value: Level
    urls: Annotated[list[URLPriority], msgspec.Meta(max_length=1000)] = msgspec.field(
        default_factory=list
    )


class CreateApplication(msgspec.Struct):
    name: Name
    url: Url
    priority: Priority
    bio: Bio = ""
    user_id: UserId | None = None


class UpdateApplication(msgspec.Struct):
    name: Name | msgspec.UnsetType = UNSET
    url: Url | msgspec.UnsetType = UNSET
    priority: Priority | msgspec.UnsetType = UNSET
    bio: Bio | msgspec.UnsetType = UNSET
    user_id: UserId | msgspec.UnsetType = UNSET


def _owner(values: dict[str, Any], principal: Principal) -> dict[str, Any]:
    values = dict(values)
    if values.get("user_id", UNSET) is None:
        values["user_id"] = principal.user_id
    if "priority" in values:
        values["priority"] = rows.dumps(builtins(values["priority"]))
    return values


def _check_user(tx: Tx, values: dict[str, Any]) -> None:
    if "user_id" in values:
        require_row(tx, "users", values["user_id"], "user")


def render_config(row: dict[str, Any]) -> dict[str, Any]:
    return {**header(row), **{k: row[k] for k in ("name", "value", "bio", "user_id")}}


def render_application(row: dict[str, Any]) -> dict[str, Any]:
    return {
        **header(row),
        **{k: row[k] for k in ("name", "url", "bio", "user_id")},
        "priority": rows.loads(row["priority"]),
    }


CONFIGS = Resource(
    "configs",
    render_config,
    CreateConfig,
    UpdateConfig,
    filters={"name": "str", "value": "str", "user_id": "int"},
    to_row=_owner,
    check=_check_user,
)
APPLICATIONS = Resource(
    "applications",
    render_application,
    CreateApplication,
    UpdateApplication,
    filters={"name": "str", "user_id": "int"},
    to_row=_owner,
    check=_check_user,
)

ROUTES = [*CONFIGS.routes("/api/v1/configs"), *APPLICATIONS.routes("/api/v1/applications")]
