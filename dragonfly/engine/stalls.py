"""Picking, timers and stalls (rules 5 and 6 of dragonfly/engine/machine.py): the
download machine's clock, sans-I/O like the rest of it.

When ``tick`` is next due, starting what the picker says (and asking for other parents
when it cannot), expiring requests, batching reports, and the stall steps taken when
nothing progresses. A mixin of ``DownloadMachine``: its methods work on the machine's state,
declared on ``MachineState`` (state.py); the rules are in machine.py's docstring.
"""

from __future__ import annotations

from dragonfly.engine.actions import (
    Action,
    Cancel,
    Fetch,
    Send,
    Stalled,
)
from dragonfly.engine.state import INF, MachineState, Phase
from dragonfly.wire.messages import (
    PiecesFinished,
    Reschedule,
)


class StallsMixin(MachineState):
    """The download machine's picking, timers and stall steps (rules 5 and 6)."""

    def next_wakeup(self, now: float) -> float:
        """When ``tick`` next has something to do after ``now`` (inf: nothing is timed)."""
        # (Comparisons rather than min(): the simulation asks after every event.)
        when = self._report_due
        due = self.requests.next_timeout(self.cfg.piece_timeout)
        if due is not None and due < when:
            when = due
        if self._reschedule_due < when:
            when = self._reschedule_due
        if self.children:
            due = self.announce.next_due()
            if due is not None and due < when:
                when = due
        phase = self.phase
        if self.picker is not None and phase is Phase.P2P:
            rest = self.picker.busy_until()
            if rest is not None and now < rest < when:  # (one that rested already waits)
                when = rest
        since = self._progress_at
        if since is not None and phase in (Phase.STARTING, Phase.P2P, Phase.SOURCE):
            due = since + self.cfg.stall_timeout * (self._stall_steps + 1)
            if due < when:
                when = due
        return when

    def _progress(self, now: float) -> None:
        self._progress_at = now
        self._stall_steps = 0

    # ------------------------------------------------------------------ picking

    def _pump(self, now: float) -> list[Action]:
        """Start what the picker says; ask for other parents when stalled."""
        picker = self.picker
        if picker is None or not self.opened or self.phase is not Phase.P2P:
            return []
        out: list[Action] = []
        stale = False
        for number, pid in picker.pick(now):
            parent = self.parents.get(pid)
            if parent is None:
                picker.on_failure(number, pid)
                continue
            if parent.ticket is not None and parent.ticket.stale(now + self.wall_offset):
                # It would refuse the request: the piece goes back, blaming nobody, and
                # fresh tickets come with the scheduler's answer to a Reschedule.
                picker.on_cancelled(number, pid)
                stale = True
                continue
            request = self.requests.start(number, pid, now)
            in_place = len(picker.in_flight.get(number, ())) <= 1
            out.append(Fetch(request.fetch_id, number, pid, in_place))
        interval = self.cfg.reschedule_interval
        self._reschedule_due = INF
        if stale or (
            len(self.digests) > len(self.have) and not self._wanted_held and picker.stalled()
        ):
            # Stalled with digests in hand but no parent serving them, or a parent whose
            # ticket is stale: ask for others (and fresh tickets). (Pieces whose digest is
            # unknown wait for the origin, not for parents.)
            due = self._last_reschedule + interval
            if now >= due:
                self._last_reschedule = now
                self.counters.reschedules += 1
                out.append(
                    Send(
                        Reschedule(
                            peer_id=self.peer_id,
                            task_id=self.task_id,
                            blocked_parents=list(self.blocked)[-1024:],
                            reason="no parent can serve the missing pieces",
                        )
                    )
                )
                due = now + interval
            self._reschedule_due = due
        elif picker.requests_in_flight and len(picker.in_flight) == picker.missing:
            # The endgame: an overdue request may be duplicated on another parent.
            self._reschedule_due = now + interval
        return out

    # ------------------------------------------------------------------ timers

    def tick(self, now: float) -> list[Action]:
        """Time passed: expire requests, send due reports and reveals, pick again."""
        out: list[Action] = []
        for request in self.requests.timed_out(now, self.cfg.piece_timeout):
            self.requests.pop(request.fetch_id)
            self.counters.timeouts += 1
            out.append(Cancel(request.fetch_id, request.number, request.parent_id))
            out += self._failed(request, "timeout", now)
        if now >= self._report_due:
            out += self._flush_reports()
        if self.children:
            out += self._tell(self.announce.due(now))
        out += self._pump(now)
        return out + self._check_progress(now)

    def _check_progress(self, now: float) -> list[Action]:
        """Nothing waits without bound (rule 6): no sign of progress for stall_timeout,
        ask for other parents; as long again, the origin for the missing pieces where
        allowed; else (or already at the origin) fail, naming how long nothing came."""
        if self.done or self.phase is Phase.COMPLETING:
            return []
        if self._progress_at is None:
            self._progress(now)
            return []
        timeout = self.cfg.stall_timeout
        idle = now - self._progress_at
        if idle < timeout * (self._stall_steps + 1):
            return []
        self._stall_steps += 1
        seconds = round(idle, 1)
        if self.phase is not Phase.SOURCE and self._stall_steps == 1:
            self.counters.stalls += 1
            self._last_reschedule = now
            self.counters.reschedules += 1
            reason = f"no progress for {seconds:g} s"
            return [
                Stalled("reschedule", seconds),
                Send(
                    Reschedule(
                        peer_id=self.peer_id,
                        task_id=self.task_id,
                        blocked_parents=list(self.blocked)[-1024:],
                        reason=reason,
                    )
                ),
            ]
        if self.phase is not Phase.SOURCE and self.may_go_to_source:
            self.counters.stalls += 1
            return [Stalled("back_to_source", seconds), *self._go_to_source(None, now)]
        self.counters.stalls += 1
        where = "from the origin" if self.phase is Phase.SOURCE else "from any parent"
        return [
            Stalled("fail", seconds),
            *self._fail(f"nothing arrived {where} for {seconds:g} s", 504, now),
        ]

    def _flush_reports(self) -> list[Action]:
        self._report_due = INF
        out: list[Action] = []
        reports, self._reports = self._reports, []
        step = self.cfg.report_batch
        for i in range(0, len(reports), step):
            out.append(
                Send(
                    PiecesFinished(
                        peer_id=self.peer_id, task_id=self.task_id, pieces=reports[i : i + step]
                    )
                )
            )
        return out
