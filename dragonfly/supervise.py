"""Background loops that never end their daemon.

A loop's failure (sqlite3.OperationalError when the database is locked or the disk is
full, a bug) must not escape into the daemon's nursery, which would end the process.
The supervisor catches it, logs it (the first time, then at most once a minute with
the count of failures in between), counts it in
`dragonfly_background_failures_total{loop=...}`, and retries with exponential
backoff. While a loop's last run failed, /healthy answers 503 with a body that starts
with "degraded" and names the loop and its error; the next good run clears it.

`BackgroundHealth` is the record (sans-I/O: time is an argument); `Supervisor` is the
trio shell that runs loops under it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType

import trio

from dragonfly.log import get_logger

log = get_logger("dragonfly.supervise")

BASE_DELAY = 1.0
MAX_DELAY = 60.0
LOG_EVERY = 60.0


@dataclass
class Trouble:
    """A loop whose last run failed."""

    error: str
    since: float
    failures: int = 1  # in a row
    logged_at: float = 0.0
    unlogged: int = 0  # failures since the last log line


@dataclass(frozen=True)
class Verdict:
    """What to do after a failure: wait `delay`; log it when `log` (with `repeats`
    failures that were not logged since the last line)."""

    delay: float
    log: bool
    repeats: int


class BackgroundHealth:
    """Which loops are failing, their backoff, and when a failure is worth a log line."""

    def __init__(
        self,
        *,
        base_delay: float = BASE_DELAY,
        max_delay: float = MAX_DELAY,
        log_every: float = LOG_EVERY,
    ) -> None:
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.log_every = log_every
        self.troubles: dict[str, Trouble] = {}

    def failed(self, loop: str, error: str, now: float) -> Verdict:
        trouble = self.troubles.get(loop)
        if trouble is None:
            self.troubles[loop] = Trouble(error, since=now, logged_at=now)
            return Verdict(self.base_delay, log=True, repeats=0)
        trouble.failures += 1
        trouble.error = error
        delay = min(self.max_delay, self.base_delay * 2 ** min(trouble.failures - 1, 30))
        if now - trouble.logged_at >= self.log_every:
            repeats, trouble.unlogged, trouble.logged_at = trouble.unlogged, 0, now
            return Verdict(delay, log=True, repeats=repeats)
        trouble.unlogged += 1
        return Verdict(delay, log=False, repeats=0)

    def succeeded(self, loop: str) -> Trouble | None:
        """The loop ran well: its trouble (returned, for a recovery line) is over."""
        return self.troubles.pop(loop, None)

    @property
    def degraded(self) -> bool:
        return bool(self.troubles)

    def describe(self, now: float) -> str:
        """One line per failing loop, for /healthy."""
        return "".join(
            f"degraded: {loop} failing for {now - t.since:.0f}s ({t.failures} failures "
            f"in a row): {t.error}\n"
            for loop, t in sorted(self.troubles.items())
        )


Body = Callable[[], Awaitable[object]]


class Supervisor:
    """Runs a daemon's background loops so that none of their failures ends it."""

    def __init__(
        self, on_failure: Callable[[str], None] = lambda loop: None, **health: float
    ) -> None:
        self.health = BackgroundHealth(**health)
        self.on_failure = on_failure

    @property
    def degraded(self) -> bool:
        return self.health.degraded

    def describe(self) -> str:
        return self.health.describe(trio.current_time())

    def failed(self, loop: str, exc: BaseException) -> float:
        """Record a failure of `loop`; returns how long to wait before trying again."""
        error = _describe_exception(exc)
        verdict = self.health.failed(loop, error, trio.current_time())
        self.on_failure(loop)
        if verdict.log:
            log.error(
                "background loop failed; retrying",
                loop=loop,
                error=error,
                retry_in=verdict.delay,
                failures_not_logged=verdict.repeats,
            )
        return verdict.delay

    def succeeded(self, loop: str) -> None:
        trouble = self.health.succeeded(loop)
        if trouble is not None:
            log.info("background loop recovered", loop=loop, failures=trouble.failures)

    async def every(self, interval: float, loop: str, body: Body) -> None:
        """Run `body` every `interval` seconds until cancelled; after a failure, again
        after the backoff delay instead."""
        delay = interval
        while True:
            await trio.sleep(delay)
            try:
                await body()
            except Exception as exc:
                delay = self.failed(loop, exc)
            else:
                self.succeeded(loop)
                delay = interval

    async def restarting(self, loop: str, run: Body) -> None:
        """Run a long-lived loop; if it fails, start it again after the backoff delay. It
        counts as recovered once a restarted run has lasted that delay."""
        settle = 0.0
        while True:
            try:
                async with trio.open_nursery() as nursery:
                    if settle:
                        nursery.start_soon(self._settle, loop, settle)
                    await run()
                    nursery.cancel_scope.cancel()
                return
            except Exception as exc:
                settle = self.failed(loop, exc)
            await trio.sleep(settle)

    async def _settle(self, loop: str, delay: float) -> None:
        await trio.sleep(delay)
        self.succeeded(loop)


def _describe_exception(exc: BaseException) -> str:
    """repr of the error itself, not of the nursery group that carried it."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return repr(exc)[:500]


class InFlight:
    """Work in progress that a drain waits for: `with in_flight:` around each piece of it."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = trio.Event()
        self._idle.set()

    def __enter__(self) -> None:
        self.count += 1
        if self._idle.is_set():
            self._idle = trio.Event()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.count -= 1
        if not self.count:
            self._idle.set()

    async def idle(self) -> None:
        await self._idle.wait()
