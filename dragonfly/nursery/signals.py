"""Run a role until SIGINT/SIGTERM, then cancel its tree so it shuts down cleanly.

A role may drain first: the first signal runs its `drain()` (tell the others it goes
away, let what is in flight finish) for at most DRAIN_TIMEOUT, then everything is
cancelled; a second signal cancels at once."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Awaitable, Callable

import trio

from dragonfly.log import get_logger

log = get_logger("dragonfly.signals")

DRAIN_TIMEOUT = 5.0

Drain = Callable[[], Awaitable[None]]


async def run_until_signal(
    main: Callable[[trio.Nursery], Awaitable[None]], drain: Drain | None = None
) -> None:
    """Start `main(nursery)`; on the first SIGINT or SIGTERM drain, then cancel it all."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                signum = await _next(signals)
                log.info("shutting down", signal=signal.Signals(signum).name)
                if drain is not None:
                    await _drain(drain, signals)
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            await main(nursery)


async def _drain(drain: Drain, signals: AsyncIterator[int]) -> None:
    with trio.move_on_after(DRAIN_TIMEOUT) as waited:
        async with trio.open_nursery() as draining:

            async def again() -> None:
                await _next(signals)
                log.info("stopping now: a second signal")
                draining.cancel_scope.cancel()

            draining.start_soon(again)
            await drain()
            draining.cancel_scope.cancel()
    if waited.cancelled_caught:
        log.warning("stopping now: draining took longer than allowed", seconds=DRAIN_TIMEOUT)


async def _next(signals: AsyncIterator[int]) -> int:
    return await signals.__anext__()
