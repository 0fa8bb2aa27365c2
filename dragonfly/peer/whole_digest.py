"""The whole file's SHA-256 while it downloads, for a task named by its digest (an OCI
blob): the verified prefix is hashed as it grows, so the check once the last piece is in
hashes only what the prefix had not reached, not the whole file again (on 1 GiB that is
most of a second during which the client waits for its last bytes).

Only verified pieces are hashed, and the store never writes a recorded piece again, so
these are the bytes a hash of the finished file would read.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from dragonfly.storage import PieceStore, TaskHandle, UnknownTask
from dragonfly.storage.taskfile import FileHasher


class WholeDigest:
    """Hashes bytes [0, prefix) of a task file as the verified prefix grows."""

    def __init__(self, store: PieceStore, handle: TaskHandle) -> None:
        self._store = store
        self._handle = handle
        self._hasher = FileHasher(handle.file.fd, 0)
        self._lock = trio.Lock()  # one thread hop at a time: FileHasher hashes in order

    @property
    def hashed(self) -> int:
        return self._hasher.end

    async def advance(self, prefix: int) -> bool:
        """Hash the bytes up to `prefix` (all verified) not hashed yet; False if the task
        was removed meanwhile (its download ends without this)."""
        async with self._lock:
            if prefix <= self._hasher.end:
                return True
            try:
                # The file stays open while the thread reads it (a removal must not close it).
                with self._store.holding(self._handle):
                    await trio.to_thread.run_sync(self._hasher.written, prefix)
            except UnknownTask:
                return False
            return True

    async def follow(self, prefix: Callable[[], int], changed: Callable[[], trio.Event]) -> None:
        """Keep up with `prefix()` (the verified prefix), waking on `changed()` (the
        download's event for any progress), until cancelled."""
        while True:
            event = changed()  # taken before reading the prefix: no progress is missed
            target = prefix()
            if target > self._hasher.end:
                if not await self.advance(target):
                    return
            else:
                await event.wait()

    async def digest(self, length: int) -> bytes | None:
        """The digest of the whole file of `length` bytes, all of them verified (None if
        the task was removed meanwhile)."""
        if not await self.advance(length):
            return None
        return self._hasher.digest_of(0, length)
