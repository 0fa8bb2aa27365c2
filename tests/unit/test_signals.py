"""run_until_signal: the first SIGTERM drains, a second stops at once."""

from __future__ import annotations

import os
import signal

import pytest
import trio

from dragonfly.nursery import signals


async def test_a_second_signal_ends_a_drain_that_would_not_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(signals, "DRAIN_TIMEOUT", 3600.0)  # only the second signal ends it
    ready, draining = trio.Event(), trio.Event()
    ended: list[str] = []

    async def main(nursery: trio.Nursery) -> None:
        ready.set()
        try:
            await trio.sleep_forever()
        finally:
            ended.append("main")

    async def drain() -> None:
        draining.set()
        await trio.sleep_forever()

    with trio.fail_after(60):  # (a bound against a hang, not a measure)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(signals.run_until_signal, main, drain)
            await ready.wait()
            os.kill(os.getpid(), signal.SIGTERM)
            await draining.wait()
            assert not ended  # draining: the role still runs
            os.kill(os.getpid(), signal.SIGTERM)
    assert ended == ["main"]


async def test_a_drain_that_ends_lets_the_role_stop_after_it() -> None:
    ready = trio.Event()
    order: list[str] = []

    async def main(nursery: trio.Nursery) -> None:
        ready.set()
        try:
            await trio.sleep_forever()
        finally:
            order.append("stopped")

    async def drain() -> None:
        order.append("drained")

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(signals.run_until_signal, main, drain)
            await ready.wait()
            os.kill(os.getpid(), signal.SIGINT)
    assert order == ["drained", "stopped"]
