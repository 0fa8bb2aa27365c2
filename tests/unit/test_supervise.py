"""Background loops under the supervisor: failures retried, counted, shown, never fatal."""

from __future__ import annotations

import sqlite3

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from dragonfly.supervise import BackgroundHealth, Supervisor


def test_backoff_logging_and_recovery_are_decided_without_a_clock():
    h = BackgroundHealth(base_delay=1, max_delay=8, log_every=60)
    first = h.failed("gc", "OperationalError('database is locked')", now=100)
    assert (first.delay, first.log) == (1, True)
    delays = [h.failed("gc", "again", now=100 + i) for i in range(1, 6)]
    assert [v.delay for v in delays] == [2, 4, 8, 8, 8]  # doubling, capped
    assert not any(v.log for v in delays)  # once a minute at most
    later = h.failed("gc", "still", now=161)
    assert later.log and later.repeats == 5  # the line says how many went unlogged
    assert h.degraded
    assert h.describe(now=170).startswith("degraded: gc failing for 70s (7 failures in a row)")
    assert h.succeeded("gc") is not None and not h.degraded
    assert h.succeeded("gc") is None  # nothing to recover from
    # a new failure after recovery starts over
    assert h.failed("gc", "x", now=200).delay == 1


async def test_a_failing_loop_is_retried_counted_shown_and_recovers(
    autojump_clock: trio.testing.MockClock,
):
    failures: list[str] = []
    supervisor = Supervisor(failures.append)
    runs = 0
    broken = True

    async def gc() -> None:
        nonlocal runs
        runs += 1
        if broken:
            raise sqlite3.OperationalError("database or disk is full")

    with capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(supervisor.every, 60.0, "gc", gc)
            await trio.sleep(60 + 1 + 2 + 4 + 0.5)  # first run, then retries after 1, 2, 4 s
            assert runs == 4 and failures == ["gc"] * 4
            assert supervisor.degraded
            assert "database or disk is full" in supervisor.describe()
            broken = False
            await trio.sleep(8)
            assert runs == 5 and not supervisor.degraded
            await trio.sleep(60)  # back to the interval
            assert runs == 6
            nursery.cancel_scope.cancel()
    events = [e["event"] for e in logs]
    assert events.count("background loop failed; retrying") == 1  # rate limited
    assert events.count("background loop recovered") == 1


async def test_a_crashing_long_lived_loop_is_restarted(autojump_clock: trio.testing.MockClock):
    supervisor = Supervisor()
    starts = 0

    async def flusher() -> None:
        nonlocal starts
        starts += 1
        if starts <= 2:
            await trio.sleep(0.1)
            raise RuntimeError("flush exploded")
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(supervisor.restarting, "flush", flusher)
        # fails at 0.1 s; restarted at 1.1 s, fails at 1.2 s; restarted at 3.2 s
        await trio.sleep(1.5)
        assert starts == 2 and supervisor.degraded
        await trio.sleep(2.5)
        assert starts == 3 and supervisor.degraded  # running, but only for 0.8 s
        await trio.sleep(1.5)  # it lasted its 2 s: recovered
        assert starts == 3 and not supervisor.degraded
        nursery.cancel_scope.cancel()


async def test_cancellation_is_not_a_failure(autojump_clock: trio.testing.MockClock):
    supervisor = Supervisor()
    with trio.move_on_after(5):
        await supervisor.restarting("idle", trio.sleep_forever)
    assert not supervisor.degraded


async def test_a_loop_that_ends_is_not_restarted():
    supervisor = Supervisor()
    done = []

    async def once() -> None:
        done.append(1)
        await trio.lowlevel.checkpoint()

    await supervisor.restarting("once", once)
    assert done == [1]


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
async def test_base_exceptions_are_not_swallowed(exc: type[BaseException]):
    supervisor = Supervisor()

    async def stop() -> None:
        await trio.lowlevel.checkpoint()
        raise exc

    with pytest.raises((exc, BaseExceptionGroup)):
        await supervisor.restarting("stop", stop)
