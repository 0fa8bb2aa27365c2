"""The download machine's rules under any order of events (a Hypothesis state machine)."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from dragonfly.engine.actions import (
    Action,
    Cancel,
    Complete,
    Failed,
    Fetch,
    FetchOrigin,
    Finished,
    MachineConfig,
    OpenTask,
    ProbeOrigin,
    RangesDone,
    Stalled,
    StreamOrigin,
    Subscribe,
    Unsubscribe,
)
from dragonfly.engine.machine import DownloadMachine, Phase
from dragonfly.wire.messages import (
    NeedBackToSource,
    PieceDigest,
    PieceDigests,
)
from tests.unit.machine_support import (
    PL,
    SPEC,
    TASK,
    candidates,
    digest,
)

# ---------------------------------------------------------------------------- any order


class MachineUnderEvents(RuleBasedStateMachine):
    """Random interleavings of scheduler messages, parent announcements and failures,
    request outcomes, origin answers, client ranges and time. The environment answers
    only what the machine asked for; the machine must keep its rules whatever the order,
    and end (finished or failed) once the environment cooperates."""

    PARENTS = ("p1", "p2", "p3")

    def __init__(self) -> None:
        super().__init__()
        self.k = 0
        self.m: DownloadMachine | None = None

    @initialize(
        k=st.integers(1, 6),
        whole=st.booleans(),
        config=st.builds(
            MachineConfig,
            concurrent_pieces=st.integers(1, 4),
            per_parent_limit=st.integers(1, 3),
            piece_timeout=st.sampled_from([0.5, 5.0]),
            origin_concurrency=st.integers(1, 3),
        ),
    )
    def start(self, k: int, whole: bool, config: MachineConfig) -> None:
        self.k = k
        self.m = DownloadMachine(TASK, "me", SPEC, config=config, whole=whole)
        self.now = 0.0
        self.fetches: dict[int, Fetch] = {}
        self.origin: set[int] = set()
        self.probing = False
        self.streaming = False
        self.opening = False
        self.completing = False
        self.completes = 0
        self.subscribed: set[str] = set()
        self.verified: set[int] = set()  # pieces the store recorded (the env's word)
        self.clients = 0
        self.ended = False
        self.do(self.m.connected(self.now))

    # -- performing the machine's actions, checking each ---------------------------------

    def do(self, actions: list[Action]) -> None:
        m = self.m
        assert m is not None
        for a in actions:
            if isinstance(a, Fetch):
                assert not self.ended, "fetch after the end"
                assert m.opened and a.number not in m.have
                assert a.number in m.digests, "fetch of a piece whose digest is unknown"
                assert a.parent_id in self.subscribed and a.parent_id not in m.blocked
                self.fetches[a.fetch_id] = a
            elif isinstance(a, Cancel):
                self.fetches.pop(a.fetch_id, None)
            elif isinstance(a, Subscribe):
                assert a.parent.peer_id not in m.blocked
                self.subscribed.add(a.parent.peer_id)
            elif isinstance(a, Unsubscribe):
                self.subscribed.discard(a.parent_id)
            elif isinstance(a, OpenTask):
                assert not self.opening
                self.opening = True
            elif isinstance(a, ProbeOrigin):
                assert not self.ended
                self.probing = True
            elif isinstance(a, FetchOrigin):
                assert not self.ended and a.number not in m.have and a.number not in self.origin
                self.origin.add(a.number)
            elif isinstance(a, StreamOrigin):
                self.streaming = True
            elif isinstance(a, Complete):
                assert m.have == set(range(self.k)) and self.completes == 0
                self.completes += 1
                self.completing = True
            elif isinstance(a, Stalled):
                assert not self.ended
            elif isinstance(a, Finished | Failed | RangesDone):
                assert not self.ended
                self.ended = True
                if isinstance(a, Finished):
                    assert m.have == set(range(self.k)) and self.completes == 1
        self.check()

    def check(self) -> None:
        m = self.m
        assert m is not None
        assert m.have <= self.verified, "a piece held that the store never recorded"
        flying: dict[int, int] = {}
        for f in self.fetches.values():
            flying[f.number] = flying.get(f.number, 0) + 1
        missing = set(range(self.k)) - m.have
        if set(flying) != missing:  # not the endgame: one request per piece
            assert all(n == 1 for n in flying.values()), flying
        assert all(n <= 2 for n in flying.values()), flying

    # -- the scheduler ------------------------------------------------------------------

    @rule(parents=st.sets(st.sampled_from(PARENTS)), known=st.integers(0, 6))
    def candidate_parents(self, parents: set[str], known: int) -> None:
        assert self.m is not None
        msg = candidates(self.k, sorted(parents), known=min(known, self.k))
        self.do(self.m.scheduler_message(msg, self.now))

    @rule()
    def all_digests(self) -> None:
        assert self.m is not None
        msg = PieceDigests(
            peer_id="me", task_id=TASK, digests=[PieceDigest(n, digest(n)) for n in range(self.k)]
        )
        self.do(self.m.scheduler_message(msg, self.now))

    @rule()
    def back_to_source(self) -> None:
        assert self.m is not None
        msg = NeedBackToSource(
            peer_id="me", task_id=TASK, content_length=self.k * PL, piece_length=PL
        )
        self.do(self.m.scheduler_message(msg, self.now))

    @rule()
    def scheduler_lost_and_back(self) -> None:
        assert self.m is not None
        self.do(self.m.scheduler_lost(self.now) + self.m.connected(self.now))

    # -- the store ------------------------------------------------------------------------

    @precondition(lambda self: self.opening)
    @rule()
    def task_opened(self) -> None:
        assert self.m is not None
        self.opening = False
        self.do(self.m.task_opened({}, self.now))

    @precondition(lambda self: self.completing)
    @rule(ok=st.booleans())
    def complete_answered(self, ok: bool) -> None:
        assert self.m is not None
        self.completing = False
        self.do(self.m.completed(self.now) if ok else self.m.complete_failed("bad", 502, self.now))

    # -- parents ---------------------------------------------------------------------------

    @precondition(lambda self: self.subscribed)
    @rule(data=st.data())
    def announced(self, data: st.DataObject) -> None:
        assert self.m is not None
        pid = data.draw(st.sampled_from(sorted(self.subscribed)))
        numbers = data.draw(st.sets(st.integers(0, self.k - 1)))
        self.do(self.m.parent_announced(pid, sorted(numbers), self.now))

    @precondition(lambda self: self.subscribed)
    @rule(data=st.data())
    def parent_gone(self, data: st.DataObject) -> None:
        assert self.m is not None
        pid = data.draw(st.sampled_from(sorted(self.subscribed)))
        self.do(self.m.parent_gone(pid, self.now))

    @precondition(lambda self: self.fetches)
    @rule(data=st.data(), outcome=st.sampled_from(["land", "fail", "bad", "busy", "in_hand"]))
    def fetch_outcome(self, data: st.DataObject, outcome: str) -> None:
        m = self.m
        assert m is not None
        fid = data.draw(st.sampled_from(sorted(self.fetches)))
        f = self.fetches.pop(fid)
        if outcome == "land":
            self.verified.add(f.number)
            self.do(m.piece_landed(fid, f.number, f.parent_id, PL, self.now))
        elif outcome == "fail":
            self.do(m.piece_failed(fid, "reset", self.now))
        elif outcome == "bad":
            self.do(m.piece_failed(fid, "digest mismatch", self.now, bad_bytes=True))
        elif outcome == "busy":
            self.do(m.piece_busy(fid, self.now))
        else:
            self.fetches[fid] = f
            self.do(m.piece_in_hand(fid, self.now))

    # -- the origin -------------------------------------------------------------------------

    @precondition(lambda self: self.probing)
    @rule(ranges=st.booleans())
    def probe_answered(self, ranges: bool) -> None:
        assert self.m is not None
        self.probing = False
        self.do(self.m.origin_probed(self.k * PL, ranges, "", "", "", self.now))

    @precondition(lambda self: self.origin)
    @rule(data=st.data())
    def origin_piece(self, data: st.DataObject) -> None:
        assert self.m is not None
        n = data.draw(st.sampled_from(sorted(self.origin)))
        self.origin.discard(n)
        self.verified.add(n)
        self.do(self.m.origin_piece_landed(n, digest(n), PL, self.now))

    # -- clients and time ------------------------------------------------------------------

    @rule(start=st.integers(0, 6 * PL), span=st.integers(0, 2 * PL))
    def client_range(self, start: int, span: int) -> None:
        assert self.m is not None
        self.m.client_attached()
        self.clients += 1
        self.do(self.m.want_range(start, start + span, self.now))

    @precondition(lambda self: self.clients)
    @rule()
    def client_gone(self) -> None:
        assert self.m is not None
        self.clients -= 1
        self.do(self.m.client_detached(self.now))

    @rule(dt=st.sampled_from([0.01, 0.3, 1.0, 6.0]))
    def time_passes(self, dt: float) -> None:
        assert self.m is not None
        self.now += dt
        self.do(self.m.tick(self.now))

    # -- it ends ------------------------------------------------------------------------------

    def teardown(self) -> None:
        """A cooperative environment: the machine ends, finished or failed."""
        m = self.m
        if m is None:
            return
        while self.clients:
            self.client_gone()
        for _ in range(400):
            if self.ended:
                return
            if self.opening:
                self.task_opened()
            elif self.completing:
                self.complete_answered(True)
            elif self.probing:
                self.probe_answered(True)
            elif self.streaming and not m.done:
                self.streaming = False
                for n in range(self.k):
                    if n not in m.have:
                        self.verified.add(n)
                        self.do(m.origin_piece_landed(n, digest(n), PL, self.now))
            elif self.origin:
                n = min(self.origin)
                self.origin.discard(n)
                self.verified.add(n)
                self.do(m.origin_piece_landed(n, digest(n), PL, self.now))
            elif self.fetches:
                fid = min(self.fetches)
                f = self.fetches.pop(fid)
                self.verified.add(f.number)
                self.do(m.piece_landed(fid, f.number, f.parent_id, PL, self.now))
            elif m.phase in (Phase.STARTING, Phase.P2P) and m.picker is not None:
                # parents that have nothing new: the scheduler sends it to the origin
                self.back_to_source()
            elif m.phase is Phase.STARTING:
                self.candidate_parents({"p1"}, self.k)
            else:
                self.time_passes(1.0)
        raise AssertionError(f"the machine did not end: {m.phase}, have {sorted(m.have)}")


MachineUnderEvents.TestCase.settings = settings(
    max_examples=200, stateful_step_count=40, deadline=None
)
test_machine_under_any_order_of_events = MachineUnderEvents.TestCase
