"""The piece store's state (dragonfly/storage/store.py): ``_Batch``, what the next flush
commits, and ``StoreState``, the state every part of ``PieceStore`` works on, declared once
for the mixins it inherits (flush.py, tasks.py, pieces.py, removal.py), with the two
worker-thread hops they all take: one at a time for the database, several for file work.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from dragonfly.supervise import Supervisor

from .errors import StorageError
from .gc import GCConfig
from .handle import TaskHandle
from .metadata import MetadataDB, PieceRecord, TaskRecord

T = TypeVar("T")


@dataclass(eq=False)
class _Batch:
    """What the next flush commits; waiters learn the outcome through ``done``/``error``."""

    pieces: dict[str, list[PieceRecord]] = field(default_factory=dict)
    handles: dict[str, TaskHandle] = field(default_factory=dict)
    touches: dict[str, float] = field(default_factory=dict)
    # Tasks complete in memory whose pieces were not durable yet: marked succeeded (with
    # their whole-file digest, if any) after the batch's pieces are committed.
    succeeded: dict[str, str | None] = field(default_factory=dict)
    attested: dict[str, str] = field(default_factory=dict)  # kept once marked succeeded
    count: int = 0
    due: float = math.inf  # (trio time) the flusher commits it then, at the latest
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None

    @property
    def empty(self) -> bool:
        return not (self.pieces or self.touches or self.succeeded or self.attested)

    def pin(self, h: TaskHandle) -> None:
        """The batch will sync this handle's file: it stays open until then."""
        if h.task_id not in self.handles:
            self.handles[h.task_id] = h
            h.pins += 1


class StoreState:
    """What ``PieceStore.__init__`` sets up, declared for the mixins that work on it; and
    (for the type checker only) the methods they call across modules."""

    data_dir: Path
    fsync: bool
    sync_delay: float
    gc_config: GCConfig
    _db: MetadataDB
    _lock_fd: int
    _clock: Callable[[], float]
    _max_batch: int
    _touch_interval: float
    _max_idle: int
    _db_limiter: trio.CapacityLimiter
    _io_limiter: trio.CapacityLimiter
    _lifecycle: trio.Lock
    _flush_lock: trio.Lock
    _handles: dict[str, TaskHandle]
    _idle: OrderedDict[str, TaskHandle]
    _batch: _Batch
    _inflight: _Batch | None
    _wakeup: trio.Event
    _urgent: trio.Event
    _running: bool
    _closed: bool
    on_removed: Callable[[list[str]], None]
    on_restart: Callable[[str], None]
    supervisor: Supervisor
    _retry_after: float

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError("piece store is closed")

    async def _run_db(self, fn: Callable[..., T], *args: Any) -> T:
        """Run metadata work in a worker thread, one at a time."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self._db_limiter)

    async def _run_io(self, fn: Callable[..., T], *args: Any) -> T:
        """Run file work (pwrite, hashing) in a worker thread; several may run at once."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self._io_limiter)

    if TYPE_CHECKING:
        # store.py
        def _maybe_close(self, h: TaskHandle) -> None: ...
        def _detach(self, h: TaskHandle) -> None: ...
        def _retain(self, h: TaskHandle) -> TaskHandle: ...
        def release(self, handle: TaskHandle | str) -> None: ...
        def _trim_idle(self) -> None: ...
        async def acquire(self, task_id: str) -> TaskHandle: ...
        # flush.py
        async def _wait_batch(self, batch: _Batch) -> None: ...
        async def flush(self) -> None: ...
        def _discard_queued(self, task_id: str) -> None: ...
        # tasks.py
        def _set_attested_sync(self, task_id: str, attested: str) -> TaskRecord | None: ...
