"""The piece store's task lifecycle (dragonfly/storage/store.py): open (create, resume or
start over), look up and list tasks, what is learned about one later (its length, an
attestation), and touches. A mixin of ``PieceStore``: its methods work on the store's
state, declared on ``StoreState`` (state.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import structlog
import trio

from dragonfly.identity import piece_count

from .handle import TaskHandle
from .metadata import TaskRecord, TaskState
from .pieces import _parse_digest
from .state import StoreState
from .taskfile import TaskFile, task_path, validate_task_id

log = structlog.get_logger(__name__)


def _piece_count(content_length: int, piece_length: int) -> int:
    """Pieces of a file; -1 while the length (or the piece length) is unknown."""
    if content_length < 0 or piece_length <= 0:
        return -1
    return piece_count(content_length, piece_length)


class TasksMixin(StoreState):
    """Tasks: open, resume, look up, update."""

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
                self._maybe_close(h)  # (on_restart follows: the stored record conflicts too)
                await self.flush()  # its pieces may be in flight: let them land, then reset
            now = self._clock()
            opened, restarted = await self._run_db(self._open_sync, task_id, given, now)
            self._handles[task_id] = opened
            if restarted:
                self.on_restart(task_id)
            return self._retain(opened)

    def _refresh_sync(self, h: TaskHandle, given: dict[str, Any]) -> TaskRecord:
        """Store what the caller learned since (e.g. the length of a chunked download)."""
        cl = given.get("content_length")
        if cl is not None and cl >= 0 and h.record.content_length < 0:
            h.file.truncate(cl)
        return self._db.update_task(h.task_id, **given)

    def _open_sync(
        self, task_id: str, given: dict[str, Any], now: float
    ) -> tuple[TaskHandle, bool]:
        """The task's handle, and whether its stored bytes were thrown away to start over."""
        db = self._db
        path = task_path(self.data_dir, task_id)
        existing = db.get_task(task_id)
        restarted = False
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
                restarted = True
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
        return TaskHandle(task_id, f, record, pieces), restarted

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
