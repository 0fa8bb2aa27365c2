"""Registration and the end (rules 1, 8 and 9 of dragonfly/engine/machine.py): the
download machine's session with the scheduler, sans-I/O like the rest of it.

Registering (again, after a lost session, with the pieces held and, at the origin already,
what the origin said), no scheduler at all, a verified piece recorded and reported, and
the end: ``Complete`` and ``Finished``, a range-only download's ``RangesDone``, or
``Failed``. A mixin of ``DownloadMachine``: its methods work on the machine's state,
declared on ``MachineState`` (state.py); the rules are in machine.py's docstring.
"""

from __future__ import annotations

from dragonfly.engine.actions import (
    Action,
    Complete,
    Failed,
    Finished,
    RangesDone,
    Send,
    Unsubscribe,
)
from dragonfly.engine.state import INF, MachineState, Phase
from dragonfly.wire.messages import (
    REGISTER_HELD_MAX,
    LeavePeer,
    PeerFailed,
    PeerFinished,
    PieceDigest,
    PieceReport,
    RegisterPeer,
)


class LifecycleMixin(MachineState):
    """The download machine's registration, pieces held, and end (rules 1, 8 and 9)."""

    def connected(self, now: float) -> list[Action]:
        """A scheduler session is open (first, or after one was lost): register, with
        what is held already (a scheduler that restarted, or the next of the ring, knows
        nothing of it). At the origin already: it goes on there, and tells the scheduler
        again what the origin said and which pieces it holds."""
        if self.done:
            return []
        if self._progress_at is None:
            self._progress(now)
        lay = self.layout
        known = self.opened and lay.piece_length > 0 and lay.content_length >= 0
        at_source = self.phase is Phase.SOURCE
        held = (
            [PieceDigest(number=n, digest=self.digests[n]) for n in sorted(self.have)]
            if known
            else []
        )
        out: list[Action] = [
            Send(
                RegisterPeer(
                    peer_id=self.peer_id,
                    task_id=self.task_id,
                    task=self.spec,
                    headers=self.headers,
                    need_back_to_source=self.seed_trigger or at_source,
                    private=self.private,
                    content_length=lay.content_length if known else None,
                    piece_length=lay.piece_length if known else None,
                    held=held[:REGISTER_HELD_MAX],
                )
            )
        ]
        if at_source and self._source_started:
            self._reports = []  # (what _source_metadata reports again)
            out += self._source_metadata()
            out += self._flush_reports()
        return out

    def scheduler_lost(self, now: float) -> list[Action]:
        """The session went away: parents and fetches go on; reports wait for the next."""
        return []

    def no_scheduler(self, now: float) -> list[Action]:
        """No scheduler answers: the origin, where allowed."""
        if self.done or self.phase is Phase.SOURCE:
            return []
        if not self.may_go_to_source:
            return self._fail(
                "no scheduler answers, and back-to-source is off", 0, now, report=False
            )
        return self._go_to_source(None, now)

    # ------------------------------------------------------------------ pieces held

    def _record_have(self, number: int) -> None:
        self.have.add(number)

    def _landed(
        self, number: int, parent_id: str, seconds: float, nbytes: int, now: float
    ) -> list[Action]:
        """A verified piece is in the store: report, announce, maybe reach the target."""
        self._record_have(number)
        self._progress(now)
        self._reports.append(
            PieceReport(
                number=number,
                offset=number * self.layout.piece_length,
                length=nbytes,
                digest=self.digests[number],
                parent_id=parent_id,
                cost_ms=int(seconds * 1000),
            )
        )
        if self._report_due == INF:
            self._report_due = now + self.cfg.report_interval
        out = self._tell(self.announce.landed((number,), now) + self.announce.due(now))
        if self.target_reached:
            return out + self._reach_target(now)
        return out + self._pump(now)

    def _reach_target(self, now: float) -> list[Action]:
        if self.phase in (Phase.COMPLETING, Phase.FINISHED, Phase.FAILED) or self._ranges_done:
            return []
        out: list[Action] = self._forget_all()
        if self.all_held:
            self.phase = Phase.COMPLETING
            return [*out, Complete()]
        # A range-only download with its ranges: the task stays partial.
        self._ranges_done = True
        self.ended_at = now
        out += self._flush_reports()
        out.append(Send(LeavePeer(peer_id=self.peer_id, task_id=self.task_id)))
        return out + self._end(now) + [RangesDone()]

    def completed(self, now: float) -> list[Action]:
        """The whole file checked out and the task is complete in the store."""
        if self.phase is not Phase.COMPLETING:
            return []
        self.phase = Phase.FINISHED
        self.ended_at = now
        lay = self.layout
        out = self._flush_reports()
        out.append(
            Send(
                PeerFinished(
                    peer_id=self.peer_id,
                    task_id=self.task_id,
                    content_length=max(lay.content_length, 0),
                    piece_count=max(lay.piece_count, 0),
                )
            )
        )
        return out + self._end(now) + [Finished()]

    def complete_failed(self, reason: str, http_status: int, now: float) -> list[Action]:
        """Every piece matched its digest and the whole is not the file named by its
        digest (the origin serves other bytes under that name), or the store failed."""
        return self._fail(reason, http_status, now)

    def _fail(
        self, reason: str, http_status: int, now: float, *, report: bool = True
    ) -> list[Action]:
        if self.phase in (Phase.FINISHED, Phase.FAILED):
            return []
        self.phase = Phase.FAILED
        self.ended_at = now
        self.error = Failed(reason, http_status)
        out: list[Action] = self._forget_all()
        out += self._flush_reports()
        if report:
            out.append(
                Send(
                    PeerFailed(
                        peer_id=self.peer_id,
                        task_id=self.task_id,
                        reason=reason[:1000],
                        http_status=http_status,
                    )
                )
            )
        return out + self._end(now) + [self.error]

    def _end(self, now: float) -> list[Action]:
        """Stop following parents; children keep the schedule while lingering."""
        out: list[Action] = [Unsubscribe(pid) for pid in self.parents]
        self.parents.clear()
        self._reschedule_due = INF
        return out
