"""What every route and task of a running manager shares."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.requests import HTTPConnection

from dragonfly.config import ManagerConfig
from dragonfly.manager.jobs.secrets import Sealer
from dragonfly.manager.sessions import MemberSessions
from dragonfly.manager.store import Database
from dragonfly.metrics import ManagerMetrics
from dragonfly.trust import SecretRing, Verifier


@dataclass
class Context:
    config: ManagerConfig
    db: Database
    jwt_key: str
    metrics: ManagerMetrics
    holder: str  # this manager's name in leases
    clock: Callable[[], float] = field(default=time.time)
    ring: SecretRing | None = None  # the cluster secret (dragonfly/manager/issuer.py)
    sessions: MemberSessions = field(default_factory=MemberSessions)  # members connected here
    sealer: Sealer = field(init=False)  # jobs' secrets, under a key from jwt_key
    _verifier: Verifier | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.sealer = Sealer(self.jwt_key)

    @property
    def verifier(self) -> Verifier:
        """Checks members' credentials (built once; the ring does not change while running)."""
        assert self.ring is not None, "the manager runs with its cluster secret"
        if self._verifier is None or self._verifier.ring is not self.ring:
            self._verifier = Verifier(self.ring)
        return self._verifier


def context(conn: HTTPConnection) -> Context:
    ctx: Context = conn.app.state.ctx
    return ctx
