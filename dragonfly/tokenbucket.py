"""A token bucket (sans-I/O: time comes in as an argument), for rate limits of bytes
(dragonfly/ratelimit.py) and of events (registrations per host, log lines, leaf
certificates)."""

from __future__ import annotations

__all__ = ["TokenBucket"]


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
