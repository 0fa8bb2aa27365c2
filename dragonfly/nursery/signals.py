"""Run a role until SIGINT/SIGTERM, then cancel its tree so it shuts down cleanly."""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable

import trio

from dragonfly.log import get_logger

log = get_logger("dragonfly.signals")


async def run_until_signal(main: Callable[[trio.Nursery], Awaitable[None]]) -> None:
    """Start `main(nursery)` and cancel everything on the first SIGINT or SIGTERM."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for signum in signals:
                    log.info("shutting down", signal=signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(watch)
            await main(nursery)
