"""structlog setup: JSON lines when not on a terminal, console rendering on one.

Ids (task_id, peer_id, host_id) are bound through contextvars where a task is
started; trio children inherit a copy, so every line of a download carries them.
Every event passes dragonfly.redact before it is rendered: URLs keep no signature,
token or password.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any

import structlog

from dragonfly.redact import redact_event, redact_params
from dragonfly.tokenbucket import TokenBucket

LEVELS = ("debug", "info", "warning", "error", "critical")


def configure(
    level: str = "info",
    fmt: str = "auto",
    stream: Any = None,
    redacted_params: Iterable[str] = (),
) -> None:
    """Configure structlog (and stdlib logging, for libraries) once per process.

    `redacted_params`: query parameters to redact beside the defaults
    (proxy.filtered_query_params)."""
    redact_params(redacted_params)
    out = stream if stream is not None else sys.stderr
    if fmt == "auto":
        fmt = "console" if getattr(out, "isatty", lambda: False)() else "json"
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=out.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    numeric = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            redact_event,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=out)


def get_logger(name: str | None = None, **bound: Any) -> Any:
    logger = structlog.get_logger(name) if name else structlog.get_logger()
    return logger.bind(**bound) if bound else logger


bind = structlog.contextvars.bind_contextvars
bound = structlog.contextvars.bound_contextvars


class LogLimiter:
    """Lines of one kind (a protocol error, a refused host) at most ``rate`` a second
    with bursts of ``burst``: whoever can send garbage must not fill the disk with
    our logs. `allow` says how many lines were skipped since the last one that went
    out (say it in that line), or None: skip this one. Time is an argument."""

    def __init__(self, rate: float = 1.0, burst: float = 20.0) -> None:
        self._bucket = TokenBucket(rate, burst)
        self._started = False
        self._skipped = 0

    def allow(self, now: float) -> int | None:
        if not self._started:  # a bucket starts full at the first line, whenever it is
            self._bucket.updated, self._started = now, True
        if not self._bucket.try_take(1, now):
            self._skipped += 1
            return None
        skipped, self._skipped = self._skipped, 0
        return skipped
