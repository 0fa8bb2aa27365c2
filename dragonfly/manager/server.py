"""A running manager: database, first-start bootstrap, the API and websocket on
hypercorn's trio worker, and background work, in one nursery."""

from __future__ import annotations

import logging
import secrets
import socket
import time
from functools import partial

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from dragonfly.config import ManagerConfig
from dragonfly.log import get_logger
from dragonfly.manager.app import build_app
from dragonfly.manager.bootstrap import bootstrap, database_path, prepare_data_dir, session_key
from dragonfly.manager.context import Context
from dragonfly.manager.gc import run_gc
from dragonfly.manager.issuer import load_ring
from dragonfly.manager.jobs.runner import JobLoop
from dragonfly.manager.store import open_database
from dragonfly.metrics import ManagerMetrics
from dragonfly.wire.codec import MAX_FRAME

log = get_logger("dragonfly.manager")


def _harden_hypercorn() -> None:
    """hypercorn 0.18's trio TCPServer sends a connection's EOF (`_close`) without the
    lock its other sends take: when both ends close a websocket at once, its reader's
    answer to the client's close frame can meet that EOF, and send_all raises
    BusyResourceError, which nothing catches, so the whole server stops (seen with
    members reconnecting). The connection is closing anyway: treat it as closed."""
    from hypercorn.events import Closed
    from hypercorn.trio.tcp_server import TCPServer

    original = TCPServer.protocol_send
    if getattr(original, "_dragonfly_hardened", False):
        return

    async def protocol_send(self: TCPServer, event: object) -> None:
        try:
            await original(self, event)  # type: ignore[arg-type]
        except trio.BusyResourceError:
            await self.protocol.handle(Closed())

    protocol_send._dragonfly_hardened = True  # type: ignore[attr-defined]
    TCPServer.protocol_send = protocol_send  # type: ignore[method-assign]


_harden_hypercorn()


def _bind(listen: str, port: int) -> str:
    return f"[{listen}]:{port}" if ":" in listen else f"{listen}:{port}"


class ManagerServer:
    def __init__(self, config: ManagerConfig) -> None:
        self.config = config
        self.metrics = ManagerMetrics()
        self.port = 0
        self.holder = f"{socket.gethostname()}-{secrets.token_hex(4)}"

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        prepare_data_dir(cfg)
        key = session_key(cfg)
        ring = load_ring(cfg)
        db = open_database(cfg.database.driver, path=database_path(cfg), dsn=cfg.database.dsn)
        try:
            await bootstrap(cfg, db, time.time())
            ctx = Context(cfg, db, key, self.metrics, self.holder, ring=ring)
            hconfig = HypercornConfig()
            hconfig.bind = [_bind(cfg.server.listen, cfg.server.port)]
            hconfig.accesslog = None
            hconfig.errorlog = logging.getLogger("hypercorn.error")
            hconfig.websocket_max_message_size = MAX_FRAME
            hconfig.graceful_timeout = 2.0
            hconfig.include_server_header = False
            async with trio.open_nursery() as nursery:
                binds = await nursery.start(partial(serve, build_app(ctx), hconfig))
                self.port = int(binds[0].rsplit(":", 1)[1])
                nursery.start_soon(run_gc, ctx)
                nursery.start_soon(JobLoop(ctx).run)
                log.info(
                    "manager started",
                    listen=f"{cfg.server.listen}:{self.port}",
                    database=cfg.database.driver,
                    holder=self.holder,
                )
                task_status.started(self.port)
        finally:
            with trio.CancelScope(shield=True):
                await db.aclose()
