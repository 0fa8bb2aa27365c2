"""The piece store's write path (dragonfly/storage/store.py): a piece's bytes are written,
verified from disk and queued for the flusher; ranges are read back; a task is completed
(checked whole), failed or re-verified. A mixin of ``PieceStore``: its methods work on the
store's state, declared on ``StoreState`` (state.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator

import structlog
import trio

from dragonfly.identity import IdentityError, parse_sha256_digest

from .errors import DigestMismatch, IncompleteTask, RangeNotAvailable, StorageError, UnknownTask
from .handle import PieceSink, TaskHandle
from .metadata import PieceRecord, TaskRecord, TaskState
from .state import StoreState
from .taskfile import BufferLike

log = structlog.get_logger(__name__)


def _parse_digest(digest: str) -> bytes:
    """'sha256:<hex>' to raw bytes; ValueError naming the digest otherwise."""
    try:
        return parse_sha256_digest(digest)
    except IdentityError as exc:
        raise ValueError(str(exc)) from None


def _format_digest(raw: bytes) -> str:
    return "sha256:" + raw.hex()


class PiecesMixin(StoreState):
    """Pieces: write, verify, record, read; completing and failing a task."""

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

    async def complete_task(
        self, task_id: str, whole_digest: str | None = None, hashed: bytes | None = None
    ) -> TaskRecord:
        """Mark the task succeeded: only if every piece is recorded and, when a whole-file
        digest is known (given here or at open_task), the file hashes to it. On a whole-file
        mismatch the task is failed and its file removed.

        `hashed`: the whole file's SHA-256 as its verified pieces were hashed in order while
        it downloaded (peer/whole_digest.py), used instead of reading the file again."""
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
                actual = (
                    hashed if hashed is not None else await self._run_io(h.file.digest, 0, length)
                )
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
