"""The piece store: the trio shell over task files and the metadata database.

Crash safety comes from ordering: a piece's bytes are written, then verified (hashed from the
file through mmap), then made durable (``fdatasync``), and only then is its row committed.
After ``kill -9`` (or power loss with ``fsync=True``) every piece the database calls done is
on disk with its digest; at worst some verified pieces are not recorded and are fetched again.

Metadata work is batched: ``piece_done`` only queues; a flusher takes everything queued and,
in ONE worker-thread hop, syncs the affected files and commits all their rows in one
transaction (a thread round trip costs ~150 µs, so never one per piece). All database access
goes through one ``trio.CapacityLimiter(1)``: the SQLite connection is used by one thread at
a time.

Durability is off the data path: a verified piece is served at once, and the flusher makes
it durable up to ``sync_delay`` seconds later (sooner when someone awaits ``flush``). An
fdatasync per landing batch cost a download half its speed on a shared disk: it forced the
file's writeback (and ext4's journal commits, which stall the next writes) while the bytes
were still arriving. A task completed before its pieces are durable is complete in memory
at once, and in the database right after its pieces, in the same flush. A crash loses at
most the last ``sync_delay`` of verified pieces, which are fetched again.

Lifetime: ``async with PieceStore.open(data_dir) as store:`` runs the flusher in a nursery of
its own; or ``store = await PieceStore.create(...)``, ``await nursery.start(store.run)`` and
``await store.aclose()`` when the owner wants the flusher in its own nursery tree.

``PieceStore`` is one class over one state (the loaded handles, the flush batch, the one
database limiter), set up here with its lifetime and its handles; four mixins it inherits
hold the parts that work on that state (declared once, ``StoreState`` in state.py): the
flusher (flush.py), the task lifecycle (tasks.py), the write path (pieces.py), deletion
and GC (removal.py). What is not the class lives beside it: handle.py, recovery.py,
taskfile.py, metadata.py, gc.py.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import trio

from dragonfly.supervise import Supervisor

from .errors import UnknownTask
from .flush import FlushMixin
from .gc import GCConfig
from .handle import TaskHandle
from .metadata import MetadataDB
from .pieces import PiecesMixin
from .private import prepare_data_dir, private_dir
from .recovery import lock_data_dir, recover
from .removal import RemovalMixin
from .state import _Batch
from .taskfile import TaskFile, task_path
from .tasks import TasksMixin

__all__ = ["PieceStore"]

DB_NAME = "metadata.db"


class PieceStore(FlushMixin, TasksMixin, PiecesMixin, RemovalMixin):
    """Task files and piece metadata of one peer, for trio code."""

    def __init__(
        self,
        data_dir: Path,
        db: MetadataDB,
        lock_fd: int,
        *,
        fsync: bool,
        clock: Callable[[], float],
        gc_config: GCConfig,
        max_batch: int,
        touch_interval: float,
        max_idle_handles: int,
        io_threads: int,
        supervisor: Supervisor,
        sync_delay: float = 0.0,
    ) -> None:
        """Use :meth:`create` or :meth:`open`: opening the database is blocking I/O."""
        self.data_dir = data_dir
        self.fsync = fsync
        self.sync_delay = sync_delay
        self.gc_config = gc_config
        self._db = db
        self._lock_fd = lock_fd
        self._clock = clock
        self._max_batch = max_batch
        self._touch_interval = touch_interval
        self._max_idle = max_idle_handles
        self._db_limiter = trio.CapacityLimiter(1)
        self._io_limiter = trio.CapacityLimiter(io_threads)
        self._lifecycle = trio.Lock()
        self._flush_lock = trio.Lock()
        self._handles: dict[str, TaskHandle] = {}
        self._idle: OrderedDict[str, TaskHandle] = OrderedDict()
        self._batch = _Batch()
        self._inflight: _Batch | None = None
        self._wakeup = trio.Event()
        self._urgent = trio.Event()  # someone waits for the queued pieces to be durable
        self._running = False
        self._closed = False
        # Told the IDs of tasks this store no longer holds (evicted, deleted, failed), so
        # the host's schedulers stop naming it as their parent (peer/reannounce.py).
        self.on_removed: Callable[[list[str]], None] = lambda task_ids: None
        # Told the ID of a task whose bytes start over (the origin's changed): whoever
        # kept its old file open to serve it (a proxy worker) lets go.
        self.on_restart: Callable[[str], None] = lambda task_id: None
        # Failed commits (database locked, disk full) are reported here, and the flusher
        # waits its backoff before the next one (dragonfly/supervise.py).
        self.supervisor = supervisor
        self._retry_after = 0.0

    # -- lifetime -----------------------------------------------------------------------------

    @classmethod
    async def create(
        cls,
        data_dir: str | os.PathLike[str],
        *,
        fsync: bool = True,
        clock: Callable[[], float] = time.time,
        gc_config: GCConfig | None = None,
        max_batch: int = 1024,
        touch_interval: float = 5.0,
        max_idle_handles: int = 128,
        io_threads: int = 4,
        supervisor: Supervisor | None = None,
        sync_delay: float = 0.0,
    ) -> PieceStore:
        """Open the store and recover from whatever the last process left.

        ``fsync=False`` skips fdatasync: still safe against a process crash (the page cache
        survives it), not against power loss. ``sync_delay``: how long a verified piece
        may wait to be made durable and recorded (0: at once). ``clock`` gives wall-clock seconds for
        created_at/last_access. Start :meth:`run` (or use :meth:`open`) to flush in the
        background; without it, :meth:`flush` commits inline.
        """
        path = Path(data_dir)

        def _open() -> tuple[MetadataDB, int]:
            prepare_data_dir(path)
            private_dir(path / "tasks")
            lock_fd = lock_data_dir(path)
            try:
                db = MetadataDB(path / DB_NAME)
                try:
                    recover(path, db)
                except BaseException:
                    db.close()
                    raise
            except BaseException:
                os.close(lock_fd)
                raise
            return db, lock_fd

        db, lock_fd = await trio.to_thread.run_sync(_open)
        return cls(
            path,
            db,
            lock_fd,
            fsync=fsync,
            clock=clock,
            gc_config=gc_config or GCConfig(),
            max_batch=max_batch,
            touch_interval=touch_interval,
            max_idle_handles=max_idle_handles,
            io_threads=io_threads,
            supervisor=supervisor or Supervisor(),
            sync_delay=sync_delay,
        )

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls, data_dir: str | os.PathLike[str], **kwargs: Any
    ) -> AsyncIterator[PieceStore]:
        """``async with PieceStore.open(dir) as store:`` with the flusher running inside."""
        store = await cls.create(data_dir, **kwargs)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(store.run)
                try:
                    yield store
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The flusher never raises, so a lone exception is the body's own: hand it back
            # unwrapped, as if there were no nursery in here.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        finally:
            await store.aclose()

    async def aclose(self) -> None:
        """Commit what is queued, close every file and the database."""
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            try:
                async with self._flush_lock:
                    while not self._batch.empty:
                        await self._flush_once()
            finally:
                handles = list(self._handles.values())
                self._handles.clear()
                self._idle.clear()

                def _close() -> None:
                    for h in handles:
                        h.file.close()
                    self._db.close()
                    os.close(self._lock_fd)

                await trio.to_thread.run_sync(_close, limiter=self._db_limiter)

    async def __aenter__(self) -> PieceStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- handles ------------------------------------------------------------------------------

    def _maybe_close(self, h: TaskHandle) -> None:
        """Close a handle's file once nobody (user or pending flush) needs it."""
        if h.detached and h.users == 0 and h.pins == 0:
            h.file.close()

    def _detach(self, h: TaskHandle) -> None:
        if self._handles.get(h.task_id) is h:
            del self._handles[h.task_id]
        self._idle.pop(h.task_id, None)
        h.detached = True

    def _retain(self, h: TaskHandle) -> TaskHandle:
        h.users += 1
        self._idle.pop(h.task_id, None)
        self.touch(h.task_id)
        return h

    def release(self, handle: TaskHandle | str) -> None:
        """Give back a reference taken by open_task/acquire; the task may be GC'ed again."""
        h = self._handles.get(handle) if isinstance(handle, str) else handle
        if h is None:
            raise UnknownTask(f"task {handle} is not acquired")
        if h.users <= 0:
            raise RuntimeError(f"task {h.task_id} released more often than acquired")
        h.users -= 1
        if h.users > 0:
            return
        if h.detached:
            self._maybe_close(h)
            return
        # Keep a few idle files open: uploads acquire a task per piece served.
        self._idle[h.task_id] = h
        self._idle.move_to_end(h.task_id)
        self._trim_idle()

    def _trim_idle(self) -> None:
        """Close the least recently used idle files beyond the cap (not those whose pieces
        still wait for a flush: they are closed after it)."""
        while len(self._idle) > self._max_idle:
            victim = next((v for v in self._idle.values() if v.pins == 0), None)
            if victim is None:
                break
            self._detach(victim)
            self._maybe_close(victim)

    @contextlib.asynccontextmanager
    async def use(self, task_id: str) -> AsyncIterator[TaskHandle]:
        """Hold a task while serving or downloading it, so GC leaves it alone."""
        h = await self.acquire(task_id)
        try:
            yield h
        finally:
            self.release(h)

    @contextlib.contextmanager
    def holding(self, handle: TaskHandle) -> Iterator[TaskHandle]:
        """use() for a handle already loaded (from handle()): no I/O and no wait, for the
        local hit's hot path. UnknownTask if it was removed meanwhile."""
        self._check_open()
        if handle.detached:
            raise UnknownTask(f"task {handle.task_id} was removed meanwhile")
        self._retain(handle)
        try:
            yield handle
        finally:
            self.release(handle)

    def _load_sync(self, task_id: str) -> TaskHandle:
        record = self._db.get_task(task_id)
        if record is None:
            raise UnknownTask(f"unknown task {task_id}")
        path = task_path(self.data_dir, task_id)
        if not path.exists():
            self._db.delete_task(task_id)
            raise UnknownTask(f"task {task_id}: file vanished")
        f = TaskFile(path, record.content_length)
        try:
            pieces = {p.number: p for p in self._db.pieces(task_id)}
        except BaseException:
            f.close()
            raise
        return TaskHandle(task_id, f, record, pieces)

    async def acquire(self, task_id: str) -> TaskHandle:
        """Load (if needed) and hold an existing task. Raises UnknownTask."""
        self._check_open()
        await trio.lowlevel.checkpoint_if_cancelled()
        h = self._handles.get(task_id)
        if h is not None:
            # Take the reference before yielding, so a delete cannot slip in between.
            self._retain(h)
            await trio.lowlevel.cancel_shielded_checkpoint()
            return h
        async with self._lifecycle:
            h = self._handles.get(task_id)
            if h is None:
                h = await self._run_db(self._load_sync, task_id)
                self._handles[task_id] = h
            return self._retain(h)

    def handle(self, task_id: str) -> TaskHandle | None:
        """The loaded handle of a task, if any (no I/O)."""
        return self._handles.get(task_id)
