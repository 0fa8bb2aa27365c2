"""Token buckets for upload, download and back-to-source rates.

`TokenBucket` is sans-I/O (time comes in as an argument) so the simulation can use
it too; `RateLimiter` is the trio shell shared by every transfer of a kind, so a
limit holds across tasks and connections.
"""

from __future__ import annotations

import trio


class TokenBucket:
    """`rate` bytes/s with bursts of up to `burst` bytes; rate 0 means unlimited.

    Reservations may drive the level negative: the caller then waits until it is
    paid back. That keeps large sends (a whole chunk) exact without splitting.
    """

    def __init__(self, rate: float, burst: float | None = None, now: float = 0.0) -> None:
        if rate < 0:
            raise ValueError(f"rate must be >= 0, got {rate}")
        self.rate = float(rate)
        # A quarter second of traffic by default: smooth, yet not one wakeup per packet.
        self.burst = float(burst if burst is not None else max(rate / 4, 64 * 1024))
        self.level = self.burst
        self.updated = now

    @property
    def unlimited(self) -> bool:
        return self.rate == 0

    def reserve(self, amount: int, now: float) -> float:
        """Take `amount` tokens; returns how long the caller must wait before using them."""
        if self.unlimited:
            return 0.0
        self.level = min(self.burst, self.level + (now - self.updated) * self.rate)
        self.updated = now
        self.level -= amount
        return 0.0 if self.level >= 0 else -self.level / self.rate

    def try_take(self, amount: float, now: float) -> bool:
        """Take `amount` tokens if the bucket holds them now (never going negative)."""
        if self.unlimited:
            return True
        self.level = min(self.burst, self.level + (now - self.updated) * self.rate)
        self.updated = now
        if self.level < amount:
            return False
        self.level -= amount
        return True


class RateLimiter:
    """An async token bucket shared by many tasks."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.bucket = TokenBucket(rate, burst, trio.current_time() if _in_trio() else 0.0)

    @property
    def unlimited(self) -> bool:
        return self.bucket.unlimited

    async def acquire(self, amount: int) -> None:
        """Wait until `amount` bytes may be moved."""
        if self.bucket.unlimited:
            return
        delay = self.bucket.reserve(amount, trio.current_time())
        if delay > 0:
            await trio.sleep(delay)

    def chunk(self, default: int) -> int:
        """A good transfer chunk under this limit: at most the burst, so pacing stays smooth."""
        if self.bucket.unlimited:
            return default
        return max(16 * 1024, min(default, int(self.bucket.burst)))


def _in_trio() -> bool:
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True
