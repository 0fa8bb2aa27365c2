"""`--role manager`: the control plane's nursery tree (dragonfly/manager/server.py)."""

from __future__ import annotations

import os
import sys

import trio

from dragonfly.config import ConfigError, ManagerConfig
from dragonfly.errors import find_exception
from dragonfly.manager.bootstrap import initial_root_password, session_key
from dragonfly.manager.issuer import load_ring
from dragonfly.manager.server import ManagerServer
from dragonfly.manager.store import DatabaseError
from dragonfly.nursery.signals import run_until_signal

EXIT_FAILED, EXIT_USAGE = 1, 2


def run_manager(cfg: ManagerConfig) -> int:
    try:  # what would stop the start, said before anything runs
        session_key(cfg)
        load_ring(cfg)
        initial_root_password(os.environ)
    except ConfigError as exc:
        print(f"dragonfly: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    async def main(nursery: trio.Nursery) -> None:
        await nursery.start(ManagerServer(cfg).run)

    try:
        trio.run(run_until_signal, main)
    except (DatabaseError, BaseExceptionGroup) as exc:
        failure = find_exception(exc, DatabaseError)
        if failure is None:
            raise
        print(f"dragonfly: manager: {failure}", file=sys.stderr)
        return EXIT_FAILED
    return 0
