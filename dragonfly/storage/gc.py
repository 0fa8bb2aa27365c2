"""Garbage-collection policy: which tasks to remove. Pure: no I/O, time is an argument.

Two rules, as in Dragonfly's dfdaemon: a task not used for ``ttl`` seconds goes; and when disk
use crosses the high watermark, least-recently-used tasks go until use is at or below the low
watermark. A task in use (being downloaded or uploaded) is never chosen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["GCConfig", "TaskUsage", "plan_gc"]


@dataclass(frozen=True, slots=True)
class TaskUsage:
    task_id: str
    size_bytes: int
    last_access: float
    in_use: bool


@dataclass(frozen=True, slots=True)
class GCConfig:
    """The config-facing GC knobs.

    ``ttl``: seconds without use after which a task is removed (``math.inf`` disables).
    ``quota_bytes``: space the store may use; 0 means "the filesystem": capacity and usage
    come from ``os.statvfs`` of the data directory (other files on it count as used).
    Watermarks are fractions of the capacity, ``0 <= low <= high <= 1``.
    """

    ttl: float = 6 * 3600.0
    quota_bytes: int = 0
    high_watermark: float = 0.9
    low_watermark: float = 0.8

    def __post_init__(self) -> None:
        _check_watermarks(self.high_watermark, self.low_watermark)
        if self.quota_bytes < 0:
            raise ValueError(f"quota_bytes must be >= 0, got {self.quota_bytes}")
        if math.isnan(self.ttl) or self.ttl < 0:
            raise ValueError(f"ttl must be >= 0 seconds, got {self.ttl}")


def _check_watermarks(high: float, low: float) -> None:
    if not (0.0 <= low <= high <= 1.0):
        raise ValueError(
            f"watermarks must satisfy 0 <= low <= high <= 1, got low={low} high={high}"
        )


def plan_gc(
    tasks: Sequence[TaskUsage],
    now: float,
    ttl: float,
    used_bytes: int,
    capacity_bytes: int,
    high_watermark: float,
    low_watermark: float,
) -> list[str]:
    """Return the task ids to remove, TTL-expired ones first, then LRU evictions in order.

    ``used_bytes`` is the current usage (it may include bytes that are not tasks', e.g. other
    files on the filesystem); each removal is assumed to free its task's ``size_bytes``.
    ``capacity_bytes <= 0`` disables the watermark rule.
    """
    _check_watermarks(high_watermark, low_watermark)
    chosen: list[str] = []
    chosen_ids: set[str] = set()
    used = used_bytes

    expired = sorted(
        (t for t in tasks if not t.in_use and now - t.last_access > ttl),
        key=lambda t: (t.last_access, t.task_id),
    )
    for t in expired:
        if t.task_id not in chosen_ids:
            chosen.append(t.task_id)
            chosen_ids.add(t.task_id)
            used -= t.size_bytes

    if capacity_bytes > 0 and used > high_watermark * capacity_bytes:
        target = low_watermark * capacity_bytes
        lru = sorted(
            (t for t in tasks if not t.in_use and t.task_id not in chosen_ids),
            key=lambda t: (t.last_access, t.task_id),
        )
        for t in lru:
            if used <= target:
                break
            if t.task_id in chosen_ids:
                continue
            chosen.append(t.task_id)
            chosen_ids.add(t.task_id)
            used -= t.size_bytes
    return chosen
