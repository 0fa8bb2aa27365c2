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

Why one module of about a thousand lines: ``PieceStore`` is one class whose methods share
the loaded handles, the flush batch and the one database limiter, and the write path's
ordering (write, hash, fdatasync, commit) must be read next to the handles' lifetime and
removal. What is not the class lives beside it: handle.py, recovery.py, taskfile.py,
metadata.py, gc.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import structlog
import trio

from dragonfly.identity import IdentityError, parse_sha256_digest, piece_count
from dragonfly.supervise import Supervisor

from .errors import (
    DigestMismatch,
    IncompleteTask,
    RangeNotAvailable,
    StorageError,
    TaskInUse,
    UnknownTask,
)
from .gc import GCConfig, TaskUsage, plan_gc
from .handle import PieceSink, TaskHandle
from .metadata import MetadataDB, PieceRecord, TaskRecord, TaskState
from .private import prepare_data_dir, private_dir
from .recovery import lock_data_dir, recover
from .taskfile import BufferLike, TaskFile, task_path, validate_task_id

__all__ = ["PieceSink", "PieceStore", "TaskHandle"]

log = structlog.get_logger(__name__)

T = TypeVar("T")

DB_NAME = "metadata.db"
FLUSH_LOOP = "store_flush"  # the flusher's name on /healthy and in metrics


def _parse_digest(digest: str) -> bytes:
    """'sha256:<hex>' to raw bytes; ValueError naming the digest otherwise."""
    try:
        return parse_sha256_digest(digest)
    except IdentityError as exc:
        raise ValueError(str(exc)) from None


def _format_digest(raw: bytes) -> str:
    return "sha256:" + raw.hex()


def _piece_count(content_length: int, piece_length: int) -> int:
    """Pieces of a file; -1 while the length (or the piece length) is unknown."""
    if content_length < 0 or piece_length <= 0:
        return -1
    return piece_count(content_length, piece_length)


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


class PieceStore:
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

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The flusher: commit queued pieces ``sync_delay`` after the first of them came
        (at once when someone waits); touches ride along or every ``touch_interval``
        seconds. Runs until cancelled."""
        if self._running:
            raise RuntimeError("PieceStore.run is already running")
        self._running = True
        task_status.started()
        try:
            while not self._closed:
                if self._batch.pieces or self._batch.succeeded or self._batch.attested:
                    with trio.move_on_at(self._batch.due):
                        await self._urgent.wait()
                else:
                    # Touches alone do not wake us: they go out every touch_interval.
                    with trio.move_on_after(self._touch_interval) as idle:
                        await self._wakeup.wait()
                    if not idle.cancelled_caught and not self._urgent.is_set():
                        self._wakeup = trio.Event()
                        continue  # pieces came: they wait for their batch's time
                if self._closed:
                    break
                async with self._flush_lock:
                    await self._flush_once()
                if self._retry_after:
                    await trio.sleep(self._retry_after)
        finally:
            self._running = False

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

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError("piece store is closed")

    async def _run_db(self, fn: Callable[..., T], *args: Any) -> T:
        """Run metadata work in a worker thread, one at a time."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self._db_limiter)

    async def _run_io(self, fn: Callable[..., T], *args: Any) -> T:
        """Run file work (pwrite, hashing) in a worker thread; several may run at once."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self._io_limiter)

    # -- batching -----------------------------------------------------------------------------

    async def _flush_once(self) -> None:
        """Commit the current batch in one hop. Caller holds ``_flush_lock``."""
        batch = self._batch
        if batch.empty:
            # Nothing queued: do not signal this batch, pieces may still join it.
            if self._wakeup.is_set():
                self._wakeup = trio.Event()
            return
        self._batch = _Batch()
        self._wakeup = trio.Event()
        self._urgent = trio.Event()
        self._inflight = batch
        files = [h.file for h in batch.handles.values() if not h.file.closed]
        fsync = self.fsync
        marked: dict[str, TaskRecord | StorageError] = {}

        def _commit() -> set[str]:
            if fsync:
                for f in files:
                    f.datasync()
            skipped = self._db.commit_batch(batch.pieces, batch.touches)
            for tid, digest in batch.succeeded.items():
                try:
                    marked[tid] = self._db.mark_succeeded(tid, digest)
                except StorageError as exc:
                    marked[tid] = exc
            for tid, attested in batch.attested.items():
                record = self._set_attested_sync(tid, attested)
                if record is not None:
                    marked[tid] = record
            return skipped

        # Shielded: a batch taken out of the queue must be committed or failed, never lost.
        with trio.CancelScope(shield=True):
            try:
                skipped = await self._run_db(_commit)
                if skipped:
                    log.debug("storage.flush.skipped", task_ids=sorted(skipped))
                for tid, outcome in marked.items():
                    h = batch.handles.get(tid)
                    if isinstance(outcome, StorageError):
                        # Complete in memory, not in the database (a piece's row was
                        # lost): the next request finds it running and fetches the rest.
                        log.warning("storage.task.not_marked", task_id=tid, error=str(outcome))
                        if h is not None:
                            h.record = dataclasses.replace(h.record, state=TaskState.RUNNING)
                    elif h is not None:
                        h.record = outcome
                self.supervisor.succeeded(FLUSH_LOOP)
                self._retry_after = 0.0
            except Exception as exc:
                batch.error = exc
                self._retry_after = self.supervisor.failed(FLUSH_LOOP, exc)
                # The next batch retries the uses (and, for a batch of pieces only, at
                # least one write per task): so the flusher learns, after its backoff,
                # whether the database works again, even if nothing else comes.
                now = self._clock()
                for tid in batch.pieces.keys() | batch.touches.keys():
                    when = max(batch.touches.get(tid, now), self._batch.touches.get(tid, 0.0))
                    self._batch.touches[tid] = when
                for tid, pieces in batch.pieces.items():
                    h = batch.handles.get(tid)
                    if h is not None:
                        for p in pieces:
                            h.pieces.pop(p.number, None)
                for tid in batch.succeeded:
                    h = batch.handles.get(tid)
                    if h is not None:
                        h.record = dataclasses.replace(h.record, state=TaskState.RUNNING)
            finally:
                self._inflight = None
                batch.done.set()
                for h in batch.handles.values():
                    h.pins -= 1
                    self._maybe_close(h)
                # Idle files kept open past the cap while their pieces waited for this
                # batch (release could not close them) are closed now.
                self._trim_idle()

    async def _wait_batch(self, batch: _Batch) -> None:
        if not self._running and not batch.done.is_set():
            async with self._flush_lock:
                if batch is self._batch:
                    await self._flush_once()
        else:
            self._wakeup.set()
            self._urgent.set()
        await batch.done.wait()
        if batch.error is not None:
            raise StorageError(f"committing piece metadata failed: {batch.error!r}") from (
                batch.error
            )

    async def flush(self) -> None:
        """Wait until every piece queued so far is durable (bytes synced, row committed)."""
        if not self._batch.empty:
            await self._wait_batch(self._batch)
        elif self._inflight is not None:
            await self._wait_batch(self._inflight)
        else:
            await trio.lowlevel.checkpoint()

    def _discard_queued(self, task_id: str) -> None:
        """Drop queued work of a task being deleted: its rows must not come back."""
        b = self._batch
        pieces = b.pieces.pop(task_id, [])
        b.count -= len(pieces)
        b.touches.pop(task_id, None)
        b.succeeded.pop(task_id, None)
        b.attested.pop(task_id, None)
        h = b.handles.pop(task_id, None)
        if h is not None:
            h.pins -= 1

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

    # -- task lifecycle -----------------------------------------------------------------------

    async def open_task(
        self,
        task_id: str,
        *,
        url: str | None = None,
        tag: str | None = None,
        application: str | None = None,
        content_length: int | None = None,
        piece_length: int | None = None,
        piece_count: int | None = None,
        digest: str | None = None,
        etag: str | None = None,
        last_modified: str | None = None,
        private: bool | None = None,
        spec: str | None = None,
    ) -> TaskHandle:
        """Create or resume a task and hold it (``release`` it when done).

        ``private`` True marks the task private for good (a later False or None does not
        undo it): its bytes reach a client only after the origin said yes to that client.

        An interrupted task comes back with the pieces it had; a succeeded one comes back
        complete. If the layout or the origin's validators (content length, piece length,
        ETag, Last-Modified) changed, the old pieces are worthless and the task starts over.
        """
        self._check_open()
        validate_task_id(task_id)
        if digest:
            _parse_digest(digest)
        if piece_count is None and content_length is not None and piece_length:
            computed = _piece_count(content_length, piece_length)
            piece_count = computed if computed >= 0 else None
        elif (
            piece_count is not None
            and content_length is not None
            and content_length >= 0
            and piece_length
            and piece_count != _piece_count(content_length, piece_length)
        ):
            raise ValueError(
                f"piece_count {piece_count} does not match content_length {content_length} "
                f"and piece_length {piece_length}"
            )
        given: dict[str, Any] = {
            k: v
            for k, v in {
                "url": url,
                "tag": tag,
                "application": application,
                "content_length": content_length,
                "piece_length": piece_length,
                "piece_count": piece_count,
                "digest": digest,
                "etag": etag,
                "last_modified": last_modified,
                "private": True if private else None,
                "spec": spec,
            }.items()
            if v is not None
        }
        async with self._lifecycle:
            h = self._handles.get(task_id)
            if h is not None:
                if not _conflicts(h.record, given):
                    self._retain(h)
                    if any(getattr(h.record, k) != v for k, v in given.items()):
                        try:
                            h.record = await self._run_db(self._refresh_sync, h, given)
                        except BaseException:
                            self.release(h)
                            raise
                    return h
                # Other bytes now (the origin changed): the old handle is detached; its
                # users keep reading the old, consistent file through their open fd,
                # and the task starts over in a new file.
                self._discard_queued(task_id)
                self._detach(h)
                self._maybe_close(h)
                await self.flush()  # its pieces may be in flight: let them land, then reset
            now = self._clock()
            h = await self._run_db(self._open_sync, task_id, given, now)
            self._handles[task_id] = h
            return self._retain(h)

    def _refresh_sync(self, h: TaskHandle, given: dict[str, Any]) -> TaskRecord:
        """Store what the caller learned since (e.g. the length of a chunked download)."""
        cl = given.get("content_length")
        if cl is not None and cl >= 0 and h.record.content_length < 0:
            h.file.truncate(cl)
        return self._db.update_task(h.task_id, **given)

    def _open_sync(self, task_id: str, given: dict[str, Any], now: float) -> TaskHandle:
        db = self._db
        path = task_path(self.data_dir, task_id)
        existing = db.get_task(task_id)
        if existing is None:
            record = db.upsert_task(task_id, now=now, state=TaskState.RUNNING, **given)
        else:
            file_missing = not path.exists()
            if _conflicts(existing, given) or file_missing:
                log.info(
                    "storage.task.restart",
                    task_id=task_id,
                    reason="file missing" if file_missing else "layout changed",
                )
                path.unlink(missing_ok=True)
                db.reset_task(task_id)
                state = TaskState.RUNNING
            elif existing.state == TaskState.SUCCEEDED:
                state = TaskState.SUCCEEDED
            else:
                state = TaskState.RUNNING
            record = db.upsert_task(task_id, now=now, state=state, **given)
        f = TaskFile(path, record.content_length, durable=self.fsync)
        try:
            pieces = {p.number: p for p in db.pieces(task_id)}
        except BaseException:
            f.close()
            raise
        return TaskHandle(task_id, f, record, pieces)

    async def get_task(self, task_id: str) -> TaskRecord | None:
        """The task's record (with queued last-access applied), or None."""
        self._check_open()
        h = self._handles.get(task_id)
        if h is not None:
            await trio.lowlevel.checkpoint()
            return h.record
        return await self._run_db(self._db.get_task, task_id)

    async def list_tasks(self) -> list[TaskRecord]:
        self._check_open()
        await self.flush()
        return await self._run_db(self._db.list_tasks)

    async def set_content_length(self, task_id: str, content_length: int) -> TaskRecord:
        """Fix the length of a task downloaded without one (chunked origin response)."""
        h = await self.acquire(task_id)
        try:
            count = _piece_count(content_length, h.record.piece_length)
            fields = {"content_length": content_length, "piece_count": count}

            def _set() -> TaskRecord:
                h.file.truncate(content_length)
                return self._db.update_task(task_id, **fields)

            h.record = await self._run_db(_set)
            return h.record
        finally:
            self.release(h)

    async def set_attested(self, task_id: str, attested: str) -> bool:
        """Keep a scheduler's attestation of a complete task; False if the task is gone
        or no longer complete (its pieces were dropped, it started over)."""
        self._check_open()

        h = self._handles.get(task_id)
        inflight = self._inflight
        if task_id in self._batch.succeeded or (
            inflight is not None and task_id in inflight.succeeded
        ):
            # Complete in memory, marked in the database by a flush to come: kept after it.
            assert h is not None  # (pinned by that batch)
            batch = self._batch
            batch.attested[task_id] = attested
            batch.due = min(batch.due, trio.current_time() + self.sync_delay)
            batch.pin(h)
            h.record = dataclasses.replace(h.record, attested=attested)
            await trio.lowlevel.checkpoint()
            return True
        record = await self._run_db(self._set_attested_sync, task_id, attested)
        if record is not None and h is not None:
            h.record = record
        return record is not None

    def _set_attested_sync(self, task_id: str, attested: str) -> TaskRecord | None:
        record = self._db.get_task(task_id)
        if record is None or record.state != TaskState.SUCCEEDED:
            return None
        return self._db.update_task(task_id, attested=attested)

    async def has_complete_tasks(self, max_pieces: int) -> bool:
        """Whether any task is complete (MetadataDB.has_complete_tasks)."""
        self._check_open()
        await self.flush()
        return await self._run_db(self._db.has_complete_tasks, max_pieces)

    async def complete_tasks(self, max_pieces: int) -> list[tuple[TaskRecord, bytes]]:
        """Complete tasks with their digests in piece order (MetadataDB.complete_tasks)."""
        self._check_open()
        await self.flush()
        return await self._run_db(self._db.complete_tasks, max_pieces)

    def touch(self, task_id: str) -> None:
        """Note a use now; written with the next batch (GC reads it after a flush)."""
        now = self._clock()
        self._batch.touches[task_id] = now
        h = self._handles.get(task_id)
        # (the record in memory to the second: a new record per use costs a local hit
        # more than its bookkeeping is worth; the batch above keeps the exact time)
        if h is not None and now >= h.record.last_access + 1.0:
            h.record = dataclasses.replace(h.record, last_access=now)

    # -- pieces -------------------------------------------------------------------------------

    def _loaded(self, task: TaskHandle | str) -> TaskHandle:
        if isinstance(task, TaskHandle):
            if task.detached:
                raise UnknownTask(f"task {task.task_id} was removed or failed meanwhile")
            return task
        h = self._handles.get(task)
        if h is None:
            raise UnknownTask(f"task {task} is not open: open_task or acquire it first")
        return h

    @staticmethod
    def _check_layout(h: TaskHandle, piece: PieceRecord) -> None:
        rec = h.record
        if rec.piece_count >= 0 and piece.number >= rec.piece_count:
            raise ValueError(
                f"task {h.task_id}: piece {piece.number} out of range ({rec.piece_count} pieces)"
            )
        if rec.piece_length > 0:
            offset, length = h.piece_range(piece.number)
            if piece.offset != offset:
                raise ValueError(
                    f"task {h.task_id}: piece {piece.number} at {piece.offset}, expected {offset}"
                )
            if length is not None and piece.length != length:
                raise ValueError(
                    f"task {h.task_id}: piece {piece.number} is {piece.length} bytes, "
                    f"expected {length}"
                )
            if piece.length > rec.piece_length:
                raise ValueError(f"task {h.task_id}: piece {piece.number} longer than pieces")

    async def piece_done(self, task: TaskHandle | str, piece: PieceRecord) -> None:
        """Queue a piece whose bytes are written and verified; returns without waiting for
        the commit (``await flush()`` for that). Waits only if the queue is very long."""
        self._check_open()
        h = self._loaded(task)
        task_id = h.task_id
        self._check_layout(h, piece)
        if piece.number in h.pieces:
            await trio.lowlevel.checkpoint()
            return
        h.pieces[piece.number] = piece
        b = self._batch
        if not b.pieces:
            b.due = min(b.due, trio.current_time() + self.sync_delay)
        b.pieces.setdefault(task_id, []).append(piece)
        b.count += 1
        b.pin(h)
        self._wakeup.set()
        if b.count >= self._max_batch:
            await self._wait_batch(b)
        else:
            await trio.lowlevel.checkpoint()

    @contextlib.asynccontextmanager
    async def writing(
        self, task: TaskHandle | str, number: int, expected: bytes | None = None
    ) -> AsyncIterator[PieceSink]:
        """Exclusive write access to one piece; the one way bytes enter a task file.

        Writers of one piece take turns. On a clean exit the bytes are hashed from disk,
        checked against ``expected`` (the origin-side digest; None for the origin's own
        fetch, whose hash becomes the piece's digest) and recorded, shielded from
        cancellation, as one step: ``sink.record`` is the record. A mismatch raises
        DigestMismatch and records nothing; an exception or a cancellation inside the
        block records nothing. So no bytes but verified ones ever lie under a recorded
        piece, and a recorded piece is never written again (``sink.done``).
        """
        h = self._loaded(task)
        offset, length = h.piece_range(number)
        while (busy := h.writing.get(number)) is not None:
            await busy.wait()
            self._loaded(h)  # the task may have been removed or failed meanwhile
        existing = h.pieces.get(number)
        if existing is not None:
            await trio.lowlevel.checkpoint()
            yield PieceSink(h.file.fd, number, offset, existing.length, True, existing)
            return
        sink = PieceSink(h.file.fd, number, offset, length)
        turn = h.writing[number] = trio.Event()
        self._retain(h)  # the file stays open while a worker thread writes or hashes it
        try:
            yield sink
            with trio.CancelScope(shield=True):
                sink.record = await self._settle(h, sink, expected)
        finally:
            del h.writing[number]
            turn.set()
            self.release(h)

    async def _settle(self, h: TaskHandle, sink: PieceSink, expected: bytes | None) -> PieceRecord:
        """Write the sink's bytes (if handed over), hash the piece from disk, check and
        queue it: one worker-thread hop."""
        if sink.length is None:
            raise ValueError(f"task {h.task_id}: piece {sink.number} has no length")
        offset, length, data = sink.offset, sink.length, sink._data

        def _write_and_hash() -> bytes:
            if data is not None:
                h.file.write_at(offset, data)
            return h.file.digest(offset, length)

        self._check_layout(h, PieceRecord(sink.number, offset, length, b"\0" * 32))
        hasher = sink._hasher
        hashed = hasher.digest_of(offset, length) if hasher is not None and data is None else None
        actual = hashed if hashed is not None else await self._run_io(_write_and_hash)
        if expected is not None and actual != expected:
            raise DigestMismatch(
                f"task {h.task_id} piece {sink.number}",
                _format_digest(expected),
                _format_digest(actual),
            )
        piece = PieceRecord(sink.number, offset, length, actual)
        await self.piece_done(h, piece)
        return piece

    async def write_piece(
        self, task: TaskHandle | str, number: int, data: BufferLike, sha256: bytes
    ) -> PieceRecord:
        """pwrite a piece at its offset, verify it from disk and record it (see
        :meth:`writing`); a piece recorded already is left alone and its record returned."""
        async with self.writing(task, number, sha256) as sink:
            if not sink.done:
                sink.write(data)
        assert sink.record is not None
        return sink.record

    def has_range(self, task_id: str, offset: int, length: int) -> bool:
        """True if the loaded task has verified bytes for the whole range (no I/O)."""
        h = self._handles.get(task_id)
        return h is not None and h.has_range(offset, length)

    def read_range(self, task_id: str, offset: int, length: int) -> tuple[int, int, int]:
        """``(fd, offset, length)`` for ``os.sendfile``; the caller must hold the task
        (``use``/``acquire``) until the send is over, so the fd stays open."""
        h = self._handles.get(task_id)
        if h is None or not h.in_use:
            raise RangeNotAvailable(f"task {task_id} is not acquired")
        if not h.has_range(offset, length):
            raise RangeNotAvailable(f"task {task_id}: bytes {offset}+{length} not available")
        return h.file.fileno(), offset, length

    async def complete_task(self, task_id: str, whole_digest: str | None = None) -> TaskRecord:
        """Mark the task succeeded: only if every piece is recorded and, when a whole-file
        digest is known (given here or at open_task), the file hashes to it. On a whole-file
        mismatch the task is failed and its file removed."""
        self._check_open()
        if whole_digest:
            _parse_digest(whole_digest)
        h = await self.acquire(task_id)
        try:
            rec = h.record
            if rec.state == TaskState.SUCCEEDED and (
                not whole_digest or rec.digest == _format_digest(_parse_digest(whole_digest))
            ):
                return rec
            if rec.piece_count < 0:
                raise StorageError(f"task {task_id}: piece count unknown, cannot complete")
            missing = h.missing()
            if missing:
                raise IncompleteTask(task_id, missing, rec.piece_count)
            expected = whole_digest or rec.digest or None
            if expected:
                want = _parse_digest(expected)
                length = rec.content_length if rec.content_length >= 0 else h.file.size
                actual = await self._run_io(h.file.digest, 0, length)
                if actual != want:
                    await self._fail_task(h, "whole-file digest mismatch")
                    raise DigestMismatch(
                        f"task {task_id}", _format_digest(want), _format_digest(actual)
                    )
                expected = _format_digest(want)
            if self._running and self._queued(task_id):
                # Its last pieces are not durable yet: complete now for every reader of
                # this store, and in the database once they are (the same flush).
                batch = self._batch
                batch.succeeded[task_id] = expected
                batch.due = min(batch.due, trio.current_time() + self.sync_delay)
                batch.pin(h)
                self._wakeup.set()
                total = sum(p.length for p in h.pieces.values())
                h.record = dataclasses.replace(
                    rec, state=TaskState.SUCCEEDED, done_bytes=total, digest=expected or rec.digest
                )
                return h.record
            await self.flush()
            h.record = await self._run_db(self._db.mark_succeeded, task_id, expected)
            return h.record
        finally:
            self.release(h)

    def _queued(self, task_id: str) -> bool:
        """Whether some of the task's pieces wait for a commit (queued or in flight)."""
        inflight = self._inflight
        return task_id in self._batch.pieces or (
            inflight is not None and task_id in inflight.pieces
        )

    async def _fail_task(self, h: TaskHandle, reason: str) -> None:
        """Set failed, forget all pieces, unlink the file (open fds of users stay valid)."""
        log.warning("storage.task.failed", task_id=h.task_id, reason=reason)
        async with self._lifecycle:
            self._discard_queued(h.task_id)
            self._detach(h)
            h.pieces.clear()
            path = h.file.path

            def _fail() -> TaskRecord:
                path.unlink(missing_ok=True)
                return self._db.reset_task(h.task_id, TaskState.FAILED)

            h.record = await self._run_db(_fail)
        self.on_removed([h.task_id])

    async def verify_task(self, task_id: str) -> list[int]:
        """Re-hash every recorded piece from disk; forget the bad ones (for use after power
        loss with fsync off, or disk trouble). Returns the piece numbers dropped."""
        h = await self.acquire(task_id)
        try:
            await self.flush()
            pieces = list(h.pieces.values())

            def _check() -> list[int]:
                bad = []
                size = h.file.size
                for p in pieces:
                    if p.offset + p.length > size or h.file.digest(p.offset, p.length) != p.sha256:
                        bad.append(p.number)
                return bad

            bad = await self._run_io(_check)
            if bad:
                log.warning("storage.task.bad_pieces", task_id=task_id, pieces=bad)
                for n in bad:
                    h.pieces.pop(n, None)

                def _drop() -> TaskRecord:
                    self._db.drop_pieces(task_id, bad)
                    record = self._db.get_task(task_id)
                    assert record is not None
                    return record

                h.record = await self._run_db(_drop)
            return bad
        finally:
            self.release(h)

    async def delete_task(self, task_id: str) -> bool:
        """Remove a task's row and file. Raises TaskInUse if someone holds it."""
        self._check_open()
        removed = await self._delete_many([task_id], strict=True)
        return task_id in removed

    async def _delete_many(self, task_ids: Iterable[str], *, strict: bool) -> list[str]:
        async with self._lifecycle:
            victims: list[tuple[str, TaskHandle | None]] = []
            for tid in task_ids:
                h = self._handles.get(tid)
                if h is not None and h.in_use:
                    if strict:
                        raise TaskInUse(f"task {tid} is in use")
                    continue
                self._discard_queued(tid)
                if h is not None:
                    self._detach(h)
                victims.append((tid, h))
            if not victims:
                await trio.lowlevel.checkpoint()
                return []
            # A handle still pinned by the in-flight batch is synced first: wait for it.
            if any(h is not None and h.pins for _, h in victims):
                with contextlib.suppress(StorageError):  # failed or not, it is over
                    await self.flush()
            data_dir = self.data_dir

            def _delete() -> list[str]:
                removed = []
                for tid, h in victims:
                    # Row first, then file: a crash in between leaves an orphan file, which
                    # the next start removes; never a row without its bytes.
                    existed = self._db.delete_task(tid)
                    if h is not None:
                        h.file.close()
                    path = task_path(data_dir, tid)
                    try:
                        path.unlink()
                        existed = True
                    except FileNotFoundError:
                        pass
                    if existed:
                        removed.append(tid)
                return removed

            removed = await self._run_db(_delete)
        if removed:
            self.on_removed(removed)
        return removed

    # -- GC -----------------------------------------------------------------------------------

    def _task_sizes_sync(self) -> list[tuple[str, int, float]]:
        rows = []
        for t in self._db.list_tasks():
            try:
                size = os.stat(task_path(self.data_dir, t.id)).st_blocks * 512
            except FileNotFoundError:
                size = 0
            rows.append((t.id, size, t.last_access))
        return rows

    def _gc_inputs_sync(self, quota_bytes: int) -> tuple[list[tuple[str, int, float]], int, int]:
        """(per-task sizes, used bytes, capacity): the quota and the tasks' allocated
        blocks, or with no quota the filesystem's own numbers (other files count)."""
        rows = self._task_sizes_sync()
        if quota_bytes > 0:
            return rows, sum(size for _, size, _ in rows), quota_bytes
        st = os.statvfs(self.data_dir)
        capacity = st.f_blocks * st.f_frsize
        return rows, capacity - st.f_bavail * st.f_frsize, capacity

    def _usage(self, rows: list[tuple[str, int, float]]) -> list[TaskUsage]:
        out = []
        for tid, size, last_access in rows:
            h = self._handles.get(tid)
            out.append(TaskUsage(tid, size, last_access, h is not None and h.in_use))
        return out

    async def disk_usage(self) -> list[TaskUsage]:
        """Per-task bytes on disk (allocated blocks, so sparse holes do not count)."""
        self._check_open()
        await self.flush()
        return self._usage(await self._run_db(self._task_sizes_sync))

    async def run_gc(self, now: float | None = None, config: GCConfig | None = None) -> list[str]:
        """Remove tasks past their TTL, then LRU tasks above the high watermark down to the
        low one; tasks in use are kept. Returns the removed task ids."""
        self._check_open()
        cfg = config or self.gc_config
        when = self._clock() if now is None else now
        await self.flush()
        rows, used, capacity = await self._run_db(self._gc_inputs_sync, cfg.quota_bytes)
        plan = plan_gc(
            self._usage(rows),
            when,
            cfg.ttl,
            used,
            capacity,
            cfg.high_watermark,
            cfg.low_watermark,
        )
        if not plan:
            return []
        removed = await self._delete_many(plan, strict=False)
        log.info("storage.gc", removed=removed, used=used, capacity=capacity)
        return removed


def _conflicts(record: TaskRecord, given: dict[str, Any]) -> bool:
    """True if what the caller now knows about the content contradicts the stored task:
    then the stored pieces belong to other bytes."""
    for key in ("content_length", "piece_length"):
        new, old = given.get(key), getattr(record, key)
        if new is not None and new >= 0 and old >= 0 and new != old:
            if key == "piece_length" and (new == 0 or old == 0):
                continue
            return True
    for key in ("etag", "last_modified", "digest"):
        new, old = given.get(key), getattr(record, key)
        if new and old and new != old:
            return True
    return False
