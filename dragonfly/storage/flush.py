"""The piece store's flusher (dragonfly/storage/store.py): queued pieces, touches and
completions go out in batches, each in ONE worker-thread hop that syncs the affected files
and commits all their rows in one transaction. A mixin of ``PieceStore``: its methods work
on the store's state, declared on ``StoreState`` (state.py).
"""

from __future__ import annotations

import dataclasses

import structlog
import trio

from .errors import StorageError
from .metadata import TaskRecord, TaskState
from .state import StoreState, _Batch

log = structlog.get_logger(__name__)

FLUSH_LOOP = "store_flush"  # the flusher's name on /healthy and in metrics


class FlushMixin(StoreState):
    """The flusher's loop, one flush, and waiting for one."""

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
