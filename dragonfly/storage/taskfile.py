"""One sparse file per task, written at piece offsets, hashed through mmap.

Everything here is synchronous and cheap to reason about: the caller decides whether a call
runs on the trio thread (tiny or non-blocking operations) or in a worker thread (pwrite of a
whole piece, fdatasync, hashing). The one async helper, :meth:`TaskFile.splice_from_socket`,
moves bytes from a non-blocking trio socket into the file without copying them through Python.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import re
from pathlib import Path
from types import TracebackType

import trio

from dragonfly.net.zerocopy import IncompleteBody, SplicePipe, pwrite_all, splice_to_file

from .private import open_private, private_dir

__all__ = [
    "FileHasher",
    "IncompleteBody",
    "SplicePipe",
    "TaskFile",
    "task_path",
    "validate_task_id",
]

# What write_at accepts: anything exposing the buffer protocol (3.11 has no abc for it).
BufferLike = bytes | bytearray | memoryview | mmap.mmap

# Task IDs are sha256 hex digests, or OCI blob digests such as "sha256:<hex>". They become
# file names, so anything that could escape the tasks directory is refused.
_TASK_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{1,254}")


def validate_task_id(task_id: str) -> str:
    """Return task_id if it is safe to use as a file name, else raise ValueError."""
    if not _TASK_ID_RE.fullmatch(task_id):
        raise ValueError(f"invalid task id {task_id!r}: expected [A-Za-z0-9._:+-], 2-255 chars")
    return task_id


def task_path(data_dir: str | os.PathLike[str], task_id: str) -> Path:
    """Where a task's bytes live: ``<data_dir>/tasks/<id[:2]>/<id>`` (fan-out keeps dirs small)."""
    validate_task_id(task_id)
    return Path(data_dir) / "tasks" / task_id[:2] / task_id


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class TaskFile:
    """The bytes of one task: a sparse file, written at piece offsets in any order.

    ``content_length`` of -1 means unknown (the file grows as pieces land); when known the file
    is truncated to it at once, which reserves no blocks but lets pieces land anywhere.
    """

    def __init__(
        self, path: str | os.PathLike[str], content_length: int = -1, *, durable: bool = False
    ) -> None:
        self.path = Path(path)
        parent_existed = self.path.parent.is_dir()
        private_dir(self.path.parent)
        # Owner-only and never through a symlink (dragonfly/storage/private.py).
        flags = os.O_RDWR | os.O_CREAT
        try:
            self._fd = open_private(self.path, flags | os.O_EXCL)
            created = True
        except FileExistsError:
            self._fd = open_private(self.path, flags)
            created = False
        try:
            if content_length >= 0 and os.fstat(self._fd).st_size != content_length:
                os.ftruncate(self._fd, content_length)
            if created and durable:
                # A new directory entry is only durable once its directory is synced.
                _fsync_dir(self.path.parent)
                if not parent_existed:
                    _fsync_dir(self.path.parent.parent)
        except BaseException:
            os.close(self._fd)
            raise
        self.created = created

    @classmethod
    def open(
        cls,
        data_dir: str | os.PathLike[str],
        task_id: str,
        content_length: int = -1,
        *,
        durable: bool = False,
    ) -> TaskFile:
        """Open (creating if needed) the file of ``task_id`` under ``data_dir``."""
        return cls(task_path(data_dir, task_id), content_length, durable=durable)

    # -- plumbing ---------------------------------------------------------------------------

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise ValueError(f"task file {self.path} is closed")
        return self._fd

    def fileno(self) -> int:
        """For ``os.sendfile`` by the upload server; valid while the task is in use."""
        return self.fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    @property
    def size(self) -> int:
        """Apparent size in bytes (what sendfile and digests may cover)."""
        return os.fstat(self.fd).st_size

    @property
    def disk_usage(self) -> int:
        """Bytes actually allocated on disk (sparse holes do not count)."""
        return os.fstat(self.fd).st_blocks * 512

    def truncate(self, length: int) -> None:
        """Set the apparent size, e.g. once a chunked download learns its length."""
        os.ftruncate(self.fd, length)

    def datasync(self) -> None:
        """Make written bytes durable before their piece rows are committed."""
        os.fdatasync(self.fd)

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def remove(self) -> None:
        """Close and unlink; a missing file is not an error (removal must be idempotent)."""
        self.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def __enter__(self) -> TaskFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TaskFile({str(self.path)!r}, fd={self._fd})"

    # -- writing ------------------------------------------------------------------------------

    def write_at(self, offset: int, buf: BufferLike) -> int:
        """Write all of ``buf`` at ``offset``."""
        if offset < 0:
            raise ValueError(f"negative offset {offset}")
        with memoryview(buf) as raw, raw.cast("B") as view:
            pwrite_all(self.fd, view, offset)
            return len(view)

    async def splice_from_socket(
        self,
        sock: trio.socket.SocketType,
        offset: int,
        length: int,
        pipe: SplicePipe | None = None,
    ) -> int:
        """Receive exactly ``length`` bytes from a trio socket into the file at ``offset``,
        zero-copy (socket → pipe → file). Raises IncompleteBody if the peer closes first.
        Pass a long-lived :class:`SplicePipe` to avoid creating one per call.
        """
        if pipe is not None:
            return await splice_to_file(sock, self.fd, offset, length, pipe)
        with SplicePipe() as own:
            return await splice_to_file(sock, self.fd, offset, length, own)

    # -- reading ------------------------------------------------------------------------------

    def read_at(self, offset: int, length: int) -> bytes:
        """Read bytes back (tests, small reads); the data path uses sendfile instead."""
        out = bytearray(length)
        view = memoryview(out)
        done = 0
        while done < length:
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n == 0:
                break
            done += n
        del view
        return bytes(out[:done])

    def digest(self, offset: int, length: int) -> bytes:
        """SHA-256 of ``[offset, offset+length)`` hashed straight out of an mmap of the file.

        The bytes are never copied into a Python buffer: hashlib reads the mapped pages (and
        releases the GIL while it does, so call this from a worker thread for big ranges).
        """
        if offset < 0 or length < 0:
            raise ValueError(f"invalid range offset={offset} length={length}")
        h = hashlib.sha256()
        if length == 0:
            return h.digest()
        size = self.size
        if offset + length > size:
            # Touching mapped pages past EOF raises SIGBUS: refuse instead.
            raise ValueError(
                f"range {offset}+{length} is past the end of {self.path} ({size} bytes)"
            )
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        skip = offset - start
        with mmap.mmap(
            self.fd, skip + length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, offset=start
        ) as m:
            if hasattr(m, "madvise") and hasattr(mmap, "MADV_SEQUENTIAL"):
                m.madvise(mmap.MADV_SEQUENTIAL)
            with memoryview(m) as mv, mv[skip:] as view:
                h.update(view)
        return h.digest()


class FileHasher:
    """SHA-256 of a file's bytes from ``start`` on, read back as a writer fills them in
    order (``written``), while they are still in the CPU's cache: a piece's digest from
    the file without a second pass over it once it landed.

    Used by one thread at a time (the one writing, then the one asking for the digest).
    """

    READ = 1 << 20  # bytes read back at a time
    BATCH = 256 * 1024  # bytes that wait before they are read back (small writes)

    def __init__(self, fd: int, start: int) -> None:
        self.fd = fd
        self.start = start
        self.end = start  # bytes [start, end) are hashed
        self._hash = hashlib.sha256()
        self._buf: bytearray | None = None

    def written(self, end: int, last: bool = True) -> None:
        """Bytes up to ``end`` are in the file: hash those not hashed yet (unless fewer
        than BATCH wait and more will come: ``last`` False)."""
        if end <= self.end or (not last and end - self.end < self.BATCH):
            return
        if self._buf is None:
            self._buf = bytearray(self.READ)
        view = memoryview(self._buf)
        while self.end < end:
            n = os.preadv(self.fd, [view[: min(self.READ, end - self.end)]], self.end)
            if n == 0:
                raise OSError(f"file ended at {self.end} while hashing up to {end}")
            self._hash.update(view[:n])
            self.end += n

    def digest_of(self, offset: int, length: int) -> bytes | None:
        """The digest of ``[offset, offset+length)`` if that is exactly what was hashed."""
        if (self.start, self.end) != (offset, offset + length):
            return None
        return self._hash.digest()
