"""A task loaded into the piece store (``TaskHandle``) and write access to one of its
pieces (``PieceSink``): the records ``PieceStore`` (store.py) hands its callers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from .metadata import PieceRecord, TaskRecord, TaskState
from .taskfile import BufferLike, FileHasher, TaskFile

__all__ = ["PieceSink", "TaskHandle"]


@dataclass(eq=False)
class TaskHandle:
    """A task loaded into the store: its file, its record and its verified pieces.

    ``pieces`` holds every verified piece, including those queued for the next commit (they
    may be served at once; they are only not yet durable). Valid while acquired.
    """

    task_id: str
    file: TaskFile
    record: TaskRecord
    pieces: dict[int, PieceRecord] = field(default_factory=dict)
    users: int = 0
    pins: int = 0  # batches (queued or in flight) that will fdatasync this file
    detached: bool = False  # no longer reachable from the store: close when unused
    # Pieces being written now (PieceStore.writing): a second writer waits for the first.
    writing: dict[int, trio.Event] = field(default_factory=dict, repr=False)

    @property
    def in_use(self) -> bool:
        return self.users > 0

    def is_done(self, number: int) -> bool:
        """True if piece ``number`` is verified: its bytes must not be written again."""
        return number in self.pieces

    @property
    def done(self) -> frozenset[int]:
        return frozenset(self.pieces)

    @property
    def complete(self) -> bool:
        return self.record.state == TaskState.SUCCEEDED

    def missing(self) -> list[int]:
        """Pieces not yet verified; empty (and meaningless) while piece_count is unknown."""
        return [n for n in range(max(self.record.piece_count, 0)) if n not in self.pieces]

    def piece_range(self, number: int) -> tuple[int, int | None]:
        """(offset, length) the layout assigns to piece ``number``; length None if unknown."""
        pl = self.record.piece_length
        if pl <= 0:
            raise ValueError(f"task {self.task_id} has no piece length")
        offset = number * pl
        cl = self.record.content_length
        if cl < 0:
            return offset, None
        return offset, max(0, min(pl, cl - offset))

    def has_range(self, offset: int, length: int) -> bool:
        """True if ``[offset, offset+length)`` is covered by verified pieces."""
        if offset < 0 or length < 0:
            return False
        end = offset + length
        cl = self.record.content_length
        if self.complete:
            return end <= (cl if cl >= 0 else self.file.size)
        if cl >= 0 and end > cl:
            return False
        if length == 0:
            return True
        pl = self.record.piece_length
        if pl <= 0:
            return False
        for n in range(offset // pl, (end - 1) // pl + 1):
            p = self.pieces.get(n)
            if p is None:
                return False
        last = self.pieces[(end - 1) // pl]
        return last.offset + last.length >= end


@dataclass(eq=False)
class PieceSink:
    """Write access to one piece of a task file, given by :meth:`PieceStore.writing`.

    Fill it in one of two ways: splice into ``fd`` at ``offset`` (exactly ``length``
    bytes), or hand the bytes to :meth:`write`. ``done``: the piece was already recorded
    when the sink was given; write nothing. ``length`` is None while the file's length is
    unknown (a streamed body): set it to what was written.
    """

    fd: int
    number: int
    offset: int
    length: int | None
    done: bool = False
    record: PieceRecord | None = None  # after a clean exit: what was recorded
    _data: BufferLike | None = field(default=None, repr=False)
    _hasher: FileHasher | None = field(default=None, repr=False)

    def write(self, data: BufferLike) -> None:
        """The piece's bytes, written (and verified) when the ``writing`` block ends."""
        self._data = data
        self.length = memoryview(data).nbytes

    def hash_as_written(self) -> Callable[[int, bool], None]:
        """For a writer that fills the piece in order from ``offset``: call the result
        with ``(end, last)`` whenever the file holds the bytes up to ``end`` (from its
        worker thread, say). They are hashed from the file while hot in the cache, and
        the piece needs no second pass when the block ends (it gets one otherwise)."""
        self._hasher = FileHasher(self.fd, self.offset)
        return self._hasher.written
