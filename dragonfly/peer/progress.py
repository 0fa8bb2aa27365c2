"""A download as its clients see it: what they read of it (layout, pieces held, bytes,
whether it still takes clients), what they ask of it (the whole task, a range, a stream
attached) and what they wait on (the layout, a piece, the end).

A base of ``Download`` (dragonfly/peer/download.py): its methods work on the download's
state, set in ``Download.__init__`` and declared here; every change that may wake a client
goes through ``_notify``, which the driver calls after performing the machine's actions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import trio

from dragonfly.engine.actions import Action
from dragonfly.engine.machine import DownloadMachine, Phase
from dragonfly.peer.request import DownloadFailed


class DownloadProgress:
    """What clients of the proxy read of one download, and wait on."""

    machine: DownloadMachine
    metadata_ready: trio.Event
    finished: trio.Event
    error: DownloadFailed | None
    _changed: trio.Event
    _waiting: dict[int, int]  # piece → streams waiting for it
    _prefix_pieces: int  # pieces 0..n-1 all held (verified_prefix)
    _ended: trio.Event  # the machine is done (finished, failed, ranges had)
    _feed: Callable[[list[Action]], None]  # perform the machine's actions (the driver's)

    @property
    def content_length(self) -> int:
        return self.machine.layout.content_length

    @property
    def piece_length(self) -> int:
        return self.machine.layout.piece_length

    @property
    def piece_count(self) -> int:
        return self.machine.layout.piece_count

    @property
    def etag(self) -> str:
        return self.machine.layout.etag

    @property
    def last_modified(self) -> str:
        return self.machine.layout.last_modified

    @property
    def content_type(self) -> str:
        return self.machine.layout.content_type

    @property
    def have(self) -> set[int]:
        """Pieces verified and stored."""
        return self.machine.have

    @property
    def bytes_p2p(self) -> int:
        return self.machine.counters.bytes_p2p

    @property
    def bytes_source(self) -> int:
        return self.machine.counters.bytes_source

    @property
    def done(self) -> bool:
        return self.finished.is_set() or self.error is not None

    @property
    def accepting(self) -> bool:
        """False once it decided to stop: a new client starts a new download."""
        return self.machine.phase in (Phase.STARTING, Phase.P2P, Phase.SOURCE) and not (
            self.machine.done or self._ended.is_set()
        )

    @property
    def clients(self) -> int:
        return self.machine.clients

    @property
    def verified_prefix(self) -> int:
        """Bytes from the start of the file whose pieces are all verified and stored."""
        geometry = self.machine.layout.geometry
        if geometry is None:
            return 0
        n = self._prefix_count(geometry.piece_count)
        return min(n * geometry.piece_length, geometry.content_length)

    def _prefix_count(self, piece_count: int) -> int:
        """Pieces 0..n-1 all verified and stored: n (kept, it only grows)."""
        have, n = self.machine.have, self._prefix_pieces
        while n < piece_count and n in have:
            n += 1
        self._prefix_pieces = n
        return n

    def verified_ahead(self, told: set[int]) -> list[tuple[int, int]]:
        """(offset, length) of the pieces verified and stored past the verified prefix
        and not in ``told`` (the pieces a client already heard of), which are added to
        it: a client copying the file out takes them as they land rather than all at
        the end, after the straggler that holds the prefix back."""
        geometry = self.machine.layout.geometry
        if geometry is None:
            return []
        first = self._prefix_count(geometry.piece_count)
        new = sorted(n for n in self.machine.have if n >= first and n not in told)
        told.update(new)
        return [(geometry.offset(n), geometry.length(n)) for n in new]

    @property
    def completed_bytes(self) -> int:
        geometry = self.machine.layout.geometry
        if geometry is None:
            return 0
        return sum(geometry.length(n) for n in self.have)

    def want_all(self) -> None:
        """From now on fetch the whole task."""
        self._feed(self.machine.want_all(trio.current_time()))

    def want_range(self, start: int, end: int) -> None:
        """Also fetch bytes [start, end] (inclusive)."""
        self._feed(self.machine.want_range(start, end, trio.current_time()))

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        """A client stream uses this download (attach right after TaskManager.open, with
        no await between, so the download cannot stop in the gap)."""
        self.machine.client_attached()
        try:
            yield
        finally:
            self._feed(self.machine.client_detached(trio.current_time()))

    async def wait_metadata(self) -> None:
        """Until the length and layout are known; raises DownloadFailed."""
        while not self.metadata_ready.is_set():
            self._check_alive()
            await self._changed.wait()

    def _check_alive(self) -> None:
        if self.error is not None:
            raise self.error
        if self._ended.is_set() and not self.finished.is_set():
            raise DownloadFailed("the download stopped before this part arrived")

    async def wait_piece(self, number: int) -> None:
        """Until piece `number` is verified and stored; raises DownloadFailed."""
        if number in self.have:
            await trio.lowlevel.checkpoint()
            return
        self._waiting[number] = self._waiting.get(number, 0) + 1
        self.machine.streaming_from(min(self._waiting))
        try:
            while number not in self.have:
                self._check_alive()
                await self._changed.wait()
        finally:
            self._waiting[number] -= 1
            if not self._waiting[number]:
                del self._waiting[number]
            self.machine.streaming_from(min(self._waiting) if self._waiting else None)

    async def wait_prefix_past(self, ready: int) -> None:
        """Until the piece at `ready` (the end of the verified prefix) is in, or the
        download finished. Waiting on that piece, as a streaming proxy client does, keeps
        the picker's in-order window there: a client copying the prefix out (`dragonfly
        get`) then follows the download, where pieces taken rarest first would leave
        nearly all of the copy for the end."""
        if self.content_length < 0 or ready >= self.content_length:
            await self.wait_finished()
            return
        await self.wait_piece(ready // self.piece_length)

    async def wait_finished(self) -> None:
        while not self.finished.is_set():
            self._check_alive()
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
