"""Back to source (rule 7 of dragonfly/engine/machine.py): the download machine's
origin half, sans-I/O like the rest of it.

Going to the origin (dropping the parents), the probe and its answer, the metadata the
scheduler is told, and the pieces claimed from the origin, ``origin_concurrency`` at a time
by range or in order from one streamed body. A mixin of ``DownloadMachine``: its methods
work on the machine's state,
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
        """Claim the lowest missing wanted pieces, up to the origin concurrency."""
        if self.phase is not Phase.SOURCE or not self._source_started or self._streaming:
            return []
        out: list[Action] = []
        claimed = self._origin_claimed
        while len(claimed) < self.cfg.origin_concurrency:
            number = self._next_origin_piece()
            if number is None:
                break
            claimed.add(number)
            out.append(FetchOrigin(number))
        return out

    def _next_origin_piece(self) -> int | None:
        """The lowest wanted piece neither held nor claimed (a streaming client wants the
        front first)."""
        have, claimed = self.have, self._origin_claimed
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
        self._origin_claimed.discard(number)
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
