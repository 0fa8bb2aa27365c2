"""One module per role: each builds that role's trio nursery tree.

`RUNNERS` maps a role to a function that runs it to the end and returns the
exit code; the CLI looks roles up here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _peer(cfg: Any) -> int:
    from dragonfly.nursery.peer import run_peer

    return run_peer(cfg)


def _scheduler(cfg: Any) -> int:
    from dragonfly.nursery.scheduler import run_scheduler

    return run_scheduler(cfg)


def _manager(cfg: Any) -> int:
    from dragonfly.nursery.manager import run_manager

    return run_manager(cfg)


RUNNERS: dict[str, Callable[[Any], int]] = {
    "manager": _manager,
    "peer": _peer,
    "seed-peer": _peer,
    "scheduler": _scheduler,
}
