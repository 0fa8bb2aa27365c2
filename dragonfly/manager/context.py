"""What every route and task of a running manager shares."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.requests import HTTPConnection

from dragonfly.config import ManagerConfig
from dragonfly.manager.store import Database
from dragonfly.metrics import ManagerMetrics


@dataclass
class Context:
    config: ManagerConfig
    db: Database
    jwt_key: str
    metrics: ManagerMetrics
    holder: str  # this manager's name in leases
    clock: Callable[[], float] = field(default=time.time)


def context(conn: HTTPConnection) -> Context:
    ctx: Context = conn.app.state.ctx
    return ctx
