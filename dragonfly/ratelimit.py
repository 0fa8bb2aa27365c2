"""Rate limits for upload, download and back-to-source traffic.

`RateLimiter` is the trio shell around a `TokenBucket` (dragonfly/tokenbucket.py,
sans-I/O, so the scheduler and the simulation use it too), shared by every transfer of
a kind, so a limit holds across tasks and connections.
"""

from __future__ import annotations

import trio

from dragonfly.tokenbucket import TokenBucket

__all__ = ["RateLimiter", "TokenBucket"]


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
