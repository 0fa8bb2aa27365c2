"""Errors raised by the piece store, so callers can tell a missing piece from a bad one."""

from __future__ import annotations


class StorageError(Exception):
    """Base class for every storage failure the caller is expected to handle."""


class UnknownTask(StorageError):
    """The task is not in the store (never created, deleted, or evicted by GC)."""


class TaskInUse(StorageError):
    """The task is referenced by a download or an upload and may not be removed now."""


class IncompleteTask(StorageError):
    """A task was to be marked complete but some pieces are not recorded."""

    def __init__(self, task_id: str, missing: list[int], piece_count: int) -> None:
        shown = ", ".join(str(n) for n in missing[:8])
        more = f", ... ({len(missing)} missing)" if len(missing) > 8 else ""
        super().__init__(
            f"task {task_id} is incomplete: pieces {shown}{more} of {piece_count} not recorded"
        )
        self.task_id = task_id
        self.missing = missing
        self.piece_count = piece_count


class DigestMismatch(StorageError):
    """Bytes on disk do not hash to the digest the origin vouched for."""

    def __init__(self, what: str, expected: str, actual: str) -> None:
        super().__init__(f"{what}: digest mismatch, expected {expected}, got {actual}")
        self.expected = expected
        self.actual = actual


class RangeNotAvailable(StorageError):
    """A byte range was requested that is not (yet) covered by verified pieces."""
