"""Back to source (rule 7 of dragonfly/engine/machine.py): the download machine's
origin half, sans-I/O like the rest of it.

Going to the origin (dropping the parents), the probe and its answer, the metadata the
scheduler is told, and the pieces claimed from the origin by ``origin_concurrency`` Range
requests at once (``origin_split``, paced by ``OriginPace``) or read in order from one
streamed body. A mixin of ``DownloadMachine``: its methods work on the machine's state,
declared on ``MachineState`` (state.py); the rules are in machine.py's docstring.
"""

from __future__ import annotations

from dragonfly.engine.actions import (
    Action,
    FetchOrigin,
    ProbeOrigin,
    Send,
    StreamOrigin,
)
from dragonfly.engine.state import INF, MachineState, Phase
from dragonfly.identity import piece_length_for
from dragonfly.wire.messages import (
    NeedBackToSource,
    PieceReport,
    TaskMetadata,
)

# A piece that takes longer than this at the origin's whole rate comes alone, in slices
# (back to side by side only under half of it: no flapping at the edge).
SLOW_ORIGIN_PIECE = 0.25
# A slice of a piece under this many bytes is not worth a request of its own.
MIN_PART = 1 << 20


def origin_split(concurrency: int, piece_length: int, fast: bool) -> int:
    """How many of the ``concurrency`` Range requests to the origin each piece is split
    over (the machine claims pieces until the requests are used).

    Requests share the origin's link: four pieces side by side land together four
    piece-times in, and a swarm waits that long for each new piece; one piece in four
    slices lands every piece-time, over as many connections for an origin that caps each
    one. Side by side only for a ``fast`` origin, where the gap between one piece and the
    next (a request, a hash) would cost more than the wait. In the simulation (8, 16, 32
    peers, 256 MiB at 10 MB/s): 0.83 → 0.90, 0.77 → 0.84, 0.70 → 0.72."""
    if fast:
        return 1
    return max(1, min(concurrency, piece_length // MIN_PART))


class _Claim:
    """A piece claimed from the origin: when, over how many requests, and how many were
    in flight once that round of claims was made (0: not yet known)."""

    __slots__ = ("at", "of_all", "parts")

    def __init__(self, at: float, parts: int) -> None:
        self.at = at
        self.parts = parts
        self.of_all = 0


class OriginPace:
    """The pieces claimed from the origin, with the requests each takes, and how fast
    pieces come: each landing gives a piece's time at the origin's whole rate (its own
    time × its share of the requests in flight when it was claimed), smoothed."""

    def __init__(self) -> None:
        self._claims: dict[int, _Claim] = {}
        self.requests = 0  # in flight
        self.piece_seconds: float | None = None  # None: nothing landed yet
        self.fast = False

    def __contains__(self, number: int) -> bool:
        return number in self._claims

    def claim(self, number: int, parts: int, now: float) -> None:
        self._claims[number] = _Claim(now, parts)
        self.requests += parts

    def claimed_all(self) -> None:
        """Claims made: each new one's share is of every request now in flight."""
        for claim in self._claims.values():
            if not claim.of_all:
                claim.of_all = self.requests

    def landed(self, number: int, now: float) -> None:
        claim = self._claims.pop(number, None)
        if claim is None:
            return
        self.requests -= claim.parts
        seconds = (now - claim.at) * claim.parts / max(claim.of_all, claim.parts)
        last = self.piece_seconds
        self.piece_seconds = seconds if last is None else (last + seconds) / 2
        limit = SLOW_ORIGIN_PIECE * (2 if self.fast else 1)
        self.fast = self.piece_seconds < limit


class SourceMixin(MachineState):
    """The download machine's back-to-source transitions (rule 7)."""

    # ------------------------------------------------------------------ back to source

    def _go_to_source(self, msg: NeedBackToSource | None, now: float) -> list[Action]:
        if not self.may_go_to_source:
            return self._fail("no parent can serve and back-to-source is off", 0, now)
        out: list[Action] = []
        self.phase = Phase.SOURCE
        self._progress(now)  # the origin gets its own time
        self.announce.stagger = self.cfg.stagger  # new bytes enter the swarm here
        for pid in list(self.parents):
            out += self._drop_parent(pid, now)
        out += self._forget_all()
        self._reschedule_due = INF
        if msg is not None:
            self._add_digests(msg.digests, now)
        if self.opened and self.all_held:
            # Held already (a resumed task): the origin is not asked; the pieces count
            # as fetched from it.
            out += self._source_metadata()
            return out + self._reach_target(now)
        self._probing = True
        self._source_msg = msg
        expect_etag = (msg.etag if msg else "") or self.layout.etag
        expect_lm = (msg.last_modified if msg else "") or self.layout.last_modified
        return [*out, ProbeOrigin(expect_etag, expect_lm)]

    def origin_probed(
        self,
        content_length: int,
        accepts_ranges: bool,
        etag: str,
        last_modified: str,
        content_type: str,
        now: float,
    ) -> list[Action]:
        """The origin answered the probe (its validators already checked by the caller)."""
        if self.done or not self._probing:
            return []
        self._probing = False
        self._progress(now)
        msg = self._source_msg
        known = msg.content_length if msg is not None else -1
        if known >= 0 and content_length != known:
            return self._fail(
                f"origin content changed: length {known} → {content_length}", 409, now
            )
        piece_length = (
            (msg.piece_length if msg is not None else None)
            or self.layout.piece_length
            or piece_length_for(content_length, self.spec.piece_length)
        )
        # A blob's digest names its bytes: the origin's validators add nothing, and two
        # registries (or a storage redirect) give the same blob different ones.
        if self.spec.digest:
            etag, last_modified = "", ""
        self._streaming = not accepts_ranges
        out = self._set_layout(content_length, piece_length, etag, last_modified, content_type, now)
        if self.done:
            return out
        self._probed = True
        if self.opened:
            out += self._start_source_fetch(now)
        return out

    def _source_metadata(self) -> list[Action]:
        """Tell the scheduler what the origin said, and which pieces this peer already
        holds (a resumed task: they count as fetched from the origin)."""
        lay = self.layout
        out: list[Action] = [
            Send(
                TaskMetadata(
                    peer_id=self.peer_id,
                    task_id=self.task_id,
                    content_length=lay.content_length,
                    piece_length=lay.piece_length,
                    piece_count=lay.piece_count,
                    etag=lay.etag,
                    last_modified=lay.last_modified,
                    content_type=lay.content_type,
                )
            )
        ]
        geometry = lay.geometry
        for n in sorted(self.have):
            offset = n * lay.piece_length
            length = geometry.length(n) if geometry is not None else lay.piece_length
            self._reports.append(PieceReport(n, offset, length, self.digests[n], "", 0))
        return out

    def _start_source_fetch(self, now: float) -> list[Action]:
        self._source_started = True
        out = self._source_metadata()
        if self._reports:
            out += self._flush_reports()
        if self.target_reached:
            return out + self._reach_target(now)
        if self._streaming or self.layout.content_length < 0:
            return [*out, StreamOrigin()]
        return out + self._more_origin(now)

    def _more_origin(self, now: float) -> list[Action]:
        """Claim the lowest missing wanted pieces, as ``origin_split`` says."""
        if self.phase is not Phase.SOURCE or not self._source_started or self._streaming:
            return []
        out: list[Action] = []
        pace, concurrency = self._origin_pace, self.cfg.origin_concurrency
        parts = origin_split(concurrency, self.layout.piece_length, pace.fast)
        while pace.requests + parts <= concurrency:
            number = self._next_origin_piece()
            if number is None:
                break
            pace.claim(number, parts, now)
            out.append(FetchOrigin(number, parts))
        pace.claimed_all()
        return out

    def _next_origin_piece(self) -> int | None:
        """The lowest wanted piece neither held nor claimed (a streaming client wants the
        front first)."""
        have, claimed = self.have, self._origin_pace
        if self._wanted is not None:
            candidates = [x for x in self._wanted if x not in have and x not in claimed]
            return min(candidates) if candidates else None
        n = self.layout.piece_count
        number = self._claim_from
        while number < n and (number in have or number in claimed):
            number += 1
        if number >= n:
            return None
        self._claim_from = number
        return number

    def origin_piece_landed(
        self, number: int, digest: bytes, length: int, now: float
    ) -> list[Action]:
        """A piece of ``length`` bytes from the origin is in the store, hashed to
        ``digest``."""
        self._origin_pace.landed(number, now)
        if self.done:
            return []
        expected = self.digests.get(number)
        if expected is not None and expected != digest:
            return self._fail(
                f"origin content changed: piece {number} differs from the task's first fetch",
                409,
                now,
            )
        self.digests[number] = digest
        if self.picker is not None:
            self.picker.mark_have(number)
        out: list[Action] = []
        if number not in self.have:
            self.counters.bytes_source += length
            out += self._landed(number, "", 0.0, length, now)
        if self.done or self.phase is Phase.COMPLETING:
            return out
        return out + self._more_origin(now)

    def origin_failed(self, reason: str, http_status: int, now: float) -> list[Action]:
        """The origin refused or failed (or changed: 409)."""
        if self.done:
            return []
        self._probing = False
        return self._fail(reason, http_status, now)
