"""The download machine, driven event by event: no sockets, no disk, no clock."""

from __future__ import annotations

import hashlib
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from dragonfly.engine.actions import (
    Action,
    Announce,
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
    Send,
    Stalled,
    StreamOrigin,
    Subscribe,
    Unsubscribe,
)
from dragonfly.engine.machine import DownloadMachine, Phase
from dragonfly.engine.requests import RequestTable
from dragonfly.wire.messages import (
    CandidateParents,
    LeavePeer,
    NeedBackToSource,
    ParentInfo,
    PeerFailed,
    PeerFinished,
    PieceDigest,
    PieceDigests,
    PieceFailed,
    PiecesFinished,
    RegisterPeer,
    Reschedule,
    TaskFailed,
    TaskMetadata,
    TaskSpec,
)

A = TypeVar("A")
PL = 4 << 20
SPEC = TaskSpec(url="http://origin/file.bin")
TASK = SPEC.task_id


def digest(n: int) -> bytes:
    return hashlib.sha256(f"piece {n}".encode()).digest()


def parent(name: str) -> ParentInfo:
    return ParentInfo(peer_id=name, host_id=f"h-{name}", ip="10.0.0.1", upload_port=4000)


def of(actions: list[Action], kind: type[A]) -> list[A]:
    return [a for a in actions if isinstance(a, kind)]


def sent(actions: list[Action], kind: type[A]) -> list[A]:
    return [a.message for a in of(actions, Send) if isinstance(a.message, kind)]  # type: ignore[misc]


def candidates(
    pieces: int, parents: list[str], known: int | None = None, length: int | None = None
) -> CandidateParents:
    return CandidateParents(
        peer_id="me",
        task_id=TASK,
        parents=[parent(p) for p in parents],
        content_length=pieces * PL if length is None else length,
        piece_length=PL,
        piece_count=pieces,
        digests=[PieceDigest(n, digest(n)) for n in range(pieces if known is None else known)],
    )


def machine(**kw: Any) -> DownloadMachine:
    cfg = kw.pop("config", MachineConfig(concurrent_pieces=4, piece_timeout=10.0))
    return DownloadMachine(TASK, "me", SPEC, config=cfg, **kw)


def opened(m: DownloadMachine, pieces: int, parents: list[str], **kw: Any) -> list[Action]:
    """Registered, given parents and the layout, the task opened: the actions so far."""
    out = m.connected(0.0)
    out += m.scheduler_message(candidates(pieces, parents, **kw), 0.0)
    out += m.task_opened({}, 0.0)
    return out


# ---------------------------------------------------------------------------- P2P


def test_registers_then_fetches_what_parents_announce_and_finishes() -> None:
    m = machine()
    (reg,) = sent(m.connected(0.0), RegisterPeer)
    assert (reg.task_id, reg.task, reg.need_back_to_source) == (TASK, SPEC, False)
    out = m.scheduler_message(candidates(6, ["a", "b"]), 0.1)
    assert of(out, OpenTask) == [OpenTask(6 * PL, PL, "", "", "")]
    assert [s.parent.peer_id for s in of(out, Subscribe)] == ["a", "b"]
    assert not of(out, Fetch)  # nothing before the store holds the task
    assert not of(m.task_opened({}, 0.2), Fetch)  # nobody announced a piece yet
    out = m.parent_announced("a", range(6), 0.3)
    fetches = of(out, Fetch)
    assert len(fetches) == 2  # per_parent_limit
    out = m.parent_announced("b", range(6), 0.3)
    fetches += of(out, Fetch)
    assert len(fetches) == 4  # concurrent_pieces
    assert all(f.in_place for f in fetches)
    assert len({f.number for f in fetches}) == 4
    landed: list[Action] = []
    t = 1.0
    while fetches:
        f = fetches.pop(0)
        out = m.piece_landed(f.fetch_id, f.number, f.parent_id, PL, t)
        fetches += of(out, Fetch)
        landed += out
        t += 0.1
    assert m.have == set(range(6))
    assert of(landed, Complete) == [Complete()] and m.phase is Phase.COMPLETING
    out = m.completed(t)
    reports = [r for msg in sent(out, PiecesFinished) for r in msg.pieces]
    assert sorted(r.number for r in reports) == list(range(6))
    assert all(r.digest == digest(r.number) and r.parent_id in "ab" for r in reports)
    assert len(sent(out, PeerFinished)) == 1 and of(out, Finished) == [Finished()]
    assert {u.parent_id for u in of(out, Unsubscribe)} == {"a", "b"}
    assert m.finished and m.done


def test_reports_are_batched_over_the_report_interval() -> None:
    m = machine(config=MachineConfig(report_interval=0.5))
    out = opened(m, 4, ["a"]) + m.parent_announced("a", range(4), 0.0)
    f1, f2 = of(out, Fetch)
    assert not sent(m.piece_landed(f1.fetch_id, f1.number, "a", PL, 1.0), PiecesFinished)
    assert not sent(m.piece_landed(f2.fetch_id, f2.number, "a", PL, 1.2), PiecesFinished)
    assert m.next_wakeup(1.2) == pytest.approx(1.5)
    (batch,) = sent(m.tick(1.5), PiecesFinished)
    assert [r.number for r in batch.pieces] == [f1.number, f2.number]


def test_a_piece_not_landed_within_the_timeout_is_that_parents_failure() -> None:
    m = machine(config=MachineConfig(piece_timeout=5.0, per_parent_limit=1))
    out = opened(m, 2, ["a", "b"]) + m.parent_announced("a", [0, 1], 0.0)
    (first,) = of(out, Fetch)
    assert m.next_wakeup(1.0) == pytest.approx(5.0)
    assert not of(m.tick(4.9), Cancel)
    out = m.tick(5.0)
    assert of(out, Cancel) == [Cancel(first.fetch_id, first.number, "a")]
    (failed,) = sent(out, PieceFailed)
    assert (failed.number, failed.parent_id, failed.reason) == (first.number, "a", "timeout")
    assert m.counters.timeouts == 1
    # a late answer to the cancelled request changes nothing
    assert m.piece_failed(first.fetch_id, "reset", 5.1) == []
    # that parent is not asked for that piece again; another parent is
    out = m.parent_announced("b", [0, 1], 5.2)
    assert first.number in {f.number for f in of(out, Fetch) if f.parent_id == "b"}


def test_the_timeout_is_due_at_the_moment_next_wakeup_names() -> None:
    """started + timeout and now - timeout round differently: a request started at
    57.195343999999984 with a 30 s timeout is due at 87.19534399999998, where
    87.19534399999998 - 30 < 57.195343999999984. The tick at that moment must expire it,
    or the machine asks to be woken at that same moment again, forever (the 1,000-peer
    simulation did, at t = 87.2 s)."""
    started = 57.195343999999984
    m = machine(config=MachineConfig(piece_timeout=30.0, per_parent_limit=1))
    out = opened(m, 2, ["a"]) + m.parent_announced("a", [0, 1], started)
    (f,) = of(out, Fetch)
    wake = m.next_wakeup(started)
    assert wake == started + 30.0 and wake - 30.0 < started
    assert Cancel(f.fetch_id, f.number, "a") in m.tick(wake)
    assert m.next_wakeup(wake) > wake


@given(
    starts=st.lists(st.floats(0.0, 1e7), min_size=1, max_size=5),
    timeout=st.floats(1e-3, 1e4),
)
def test_the_oldest_request_times_out_at_its_next_timeout(
    starts: list[float], timeout: float
) -> None:
    table = RequestTable()
    for i, t in enumerate(sorted(starts)):
        table.start(i, "a", t)
    due = table.next_timeout(timeout)
    assert due is not None
    expired = table.timed_out(due, timeout)
    assert expired and expired[0].fetch_id == 0
    assert all(r.started + timeout <= due for r in expired)


def test_bytes_that_are_not_the_origins_drop_the_parent_for_good() -> None:
    m = machine()
    out = opened(m, 3, ["liar", "good"]) + m.parent_announced("liar", range(3), 0.0)
    bad = of(out, Fetch)[0]
    out = m.piece_failed(bad.fetch_id, "digest mismatch", 0.5, bad_bytes=True)
    assert Unsubscribe("liar") in out
    assert sent(out, PieceFailed)[0].parent_id == "liar"
    assert "liar" in m.blocked
    # the scheduler handing it out again changes nothing
    assert not of(m.scheduler_message(candidates(3, ["liar"]), 1.0), Subscribe)
    out = m.parent_announced("good", range(3), 1.0)
    assert {f.parent_id for f in of(out, Fetch)} == {"good"}


def test_a_busy_parent_rests_then_is_asked_again() -> None:
    m = machine(config=MachineConfig(per_parent_limit=1))
    out = opened(m, 2, ["a"]) + m.parent_announced("a", [0, 1], 0.0)
    (f,) = of(out, Fetch)
    assert not of(m.piece_busy(f.fetch_id, 1.0), Fetch)  # resting
    wake = m.next_wakeup(1.0)
    assert 1.0 < wake < 2.0
    assert of(m.tick(wake), Fetch)


def test_endgame_duplicate_in_hand_cancels_the_others() -> None:
    m = machine(config=MachineConfig(per_parent_limit=2, concurrent_pieces=4))
    out = opened(m, 1, ["a", "b"]) + m.parent_announced("a", [0], 0.0)
    (first,) = of(out, Fetch)
    assert first.in_place
    # overdue: the last missing piece is duplicated on the other parent
    out = m.parent_announced("b", [0], 0.0) + m.tick(3.0)
    (dup,) = [f for f in of(out, Fetch) if f.parent_id == "b"]
    assert not dup.in_place  # received aside
    assert m.piece_in_hand(dup.fetch_id, 3.5) == [Cancel(first.fetch_id, 0, "a")]
    out = m.piece_landed(dup.fetch_id, 0, "b", PL, 3.6)
    assert of(out, Complete)


def test_stalled_with_digests_asks_for_other_parents_at_most_every_interval() -> None:
    m = machine(config=MachineConfig(reschedule_interval=1.0))
    # No piece announced yet: stalled at once (the scheduler may add parents).
    (first,) = sent(opened(m, 3, ["a"]), Reschedule)
    assert first.blocked_parents == []
    assert not sent(m.parent_gone("a", 0.5), Reschedule)  # one per interval
    assert m.next_wakeup(0.5) == pytest.approx(1.0)
    (r,) = sent(m.tick(1.0), Reschedule)
    assert r.blocked_parents == ["a"]
    assert not sent(m.tick(1.9), Reschedule)
    assert m.next_wakeup(1.9) == pytest.approx(2.0)
    assert sent(m.tick(2.0), Reschedule)


def test_a_stale_landing_still_counts_the_piece() -> None:
    """A request cancelled by its timeout whose bytes were recorded anyway (the store's
    record step cannot be interrupted): the piece is held, not fetched again."""
    m = machine(config=MachineConfig(piece_timeout=1.0, per_parent_limit=1))
    out = opened(m, 2, ["a"]) + m.parent_announced("a", [0, 1], 0.0)
    (f,) = of(out, Fetch)
    m.tick(1.0)
    m.piece_landed(f.fetch_id, f.number, "a", PL, 1.1)
    assert f.number in m.have
    assert f.number not in {x.number for x in m.tick(5.0) if isinstance(x, Fetch)}


def test_a_different_layout_fails_with_409() -> None:
    m = machine()
    opened(m, 4, ["a"])
    out = m.scheduler_message(candidates(5, ["b"]), 1.0)
    (failed,) = of(out, Failed)
    assert failed.http_status == 409 and "layout changed" in failed.reason
    assert sent(out, PeerFailed) and m.phase is Phase.FAILED
    assert m.scheduler_message(candidates(4, ["c"]), 2.0) == []


def test_task_failed_ends_it_without_a_report() -> None:
    m = machine()
    opened(m, 2, ["a"])
    out = m.scheduler_message(
        TaskFailed(task_id=TASK, peer_id="me", reason="origin 404", http_status=404), 1.0
    )
    assert of(out, Failed) == [Failed("origin 404", 404)] and not sent(out, PeerFailed)


def test_resumed_pieces_are_not_fetched_again() -> None:
    m = machine()
    m.connected(0.0)
    m.scheduler_message(candidates(3, ["a"]), 0.0)
    m.task_opened({0: digest(0), 2: digest(2)}, 0.1)
    out = m.parent_announced("a", range(3), 0.2)
    assert [f.number for f in of(out, Fetch)] == [1]


def test_no_progress_asks_for_parents_then_goes_to_the_origin() -> None:
    m = machine(config=MachineConfig(stall_timeout=10.0))
    m.connected(0.0)
    m.scheduler_message(candidates(2, ["a"], known=0), 1.0)  # a parent, no digest yet
    m.task_opened({}, 1.0)
    assert m.next_wakeup(1.0) == pytest.approx(10.0)  # parents alone are no progress
    out = m.tick(10.0)
    assert of(out, Stalled) == [Stalled("reschedule", 10.0)] and sent(out, Reschedule)
    # a new digest is progress: the clock starts again
    m.scheduler_message(
        PieceDigests(peer_id="me", task_id=TASK, digests=[PieceDigest(0, digest(0))]), 15.0
    )
    assert not of(m.tick(21.0), Stalled)
    assert of(m.tick(25.0), Stalled) == [Stalled("reschedule", 10.0)]
    out = m.tick(35.0)
    assert of(out, Stalled) == [Stalled("back_to_source", 20.0)]
    assert of(out, ProbeOrigin) and Unsubscribe("a") in out and m.phase is Phase.SOURCE


def test_no_progress_without_the_origin_fails_with_504() -> None:
    m = machine(back_to_source=False, config=MachineConfig(stall_timeout=5.0))
    m.connected(0.0)  # the scheduler never answers
    assert of(m.tick(5.0), Stalled) == [Stalled("reschedule", 5.0)]
    out = m.tick(10.0)
    assert of(out, Stalled) == [Stalled("fail", 10.0)]
    (failed,) = of(out, Failed)
    assert failed.http_status == 504 and "nothing arrived from any parent for 10 s" in failed.reason


def test_an_origin_that_sends_nothing_fails_the_download() -> None:
    m = machine(config=MachineConfig(stall_timeout=5.0))
    m.connected(0.0)
    m.scheduler_message(NeedBackToSource(peer_id="me", task_id=TASK), 1.0)
    (failed,) = of(m.tick(6.0), Failed)  # the probe never came back
    assert failed.http_status == 504 and "from the origin" in failed.reason


# ---------------------------------------------------------------------------- back to source


def test_back_to_source_fetches_the_missing_pieces_in_order() -> None:
    m = machine(config=MachineConfig(origin_concurrency=2))
    opened(m, 5, ["a"], known=2)
    m.parent_announced("a", [0], 0.0)
    out = m.scheduler_message(
        NeedBackToSource(
            peer_id="me",
            task_id=TASK,
            content_length=5 * PL,
            piece_length=PL,
            digests=[PieceDigest(0, digest(0))],
            etag='"v1"',
        ),
        1.0,
    )
    assert Unsubscribe("a") in out
    assert of(out, ProbeOrigin) == [ProbeOrigin('"v1"', "")]
    assert m.phase is Phase.SOURCE
    out = m.origin_probed(5 * PL, True, '"v1"', "", "", 1.1)
    (meta,) = sent(out, TaskMetadata)
    assert (meta.content_length, meta.piece_length, meta.piece_count) == (5 * PL, PL, 5)
    assert [f.number for f in of(out, FetchOrigin)] == [0, 1]
    out = m.origin_piece_landed(0, digest(0), PL, 1.2)
    assert [f.number for f in of(out, FetchOrigin)] == [2]
    for n in (1, 2, 3, 4):
        out = m.origin_piece_landed(n, digest(n), PL, 1.3)
    assert of(out, Complete)
    reports = [r for msg in sent(m.completed(2.0), PiecesFinished) for r in msg.pieces]
    assert all(r.parent_id == "" for r in reports)


def test_an_origin_piece_other_than_the_known_digest_fails_409() -> None:
    m = machine()
    opened(m, 2, ["a"])
    m.scheduler_message(NeedBackToSource(peer_id="me", task_id=TASK), 1.0)
    m.origin_probed(2 * PL, True, "", "", "", 1.1)
    (failed,) = of(m.origin_piece_landed(0, b"\0" * 32, PL, 1.2), Failed)
    assert failed.http_status == 409


def test_no_scheduler_goes_to_the_origin_or_fails_when_not_allowed() -> None:
    m = machine()
    assert of(m.no_scheduler(0.0), ProbeOrigin)
    out = m.origin_probed(3, False, "", "", "", 0.1)  # tiny, no ranges
    assert of(out, OpenTask) == [OpenTask(3, 4 << 20, "", "", "")]
    assert of(m.task_opened({}, 0.2), StreamOrigin)
    off = machine(back_to_source=False)
    (failed,) = of(off.no_scheduler(0.0), Failed)
    assert "back-to-source is off" in failed.reason


def test_a_seed_registers_asking_for_the_origin_and_staggers_its_announcements() -> None:
    m = machine(seed_trigger=True, config=MachineConfig(reveal_after=2.0, origin_concurrency=1))
    (reg,) = sent(m.connected(0.0), RegisterPeer)
    assert reg.need_back_to_source
    m.scheduler_message(NeedBackToSource(peer_id="me", task_id=TASK), 0.1)
    m.origin_probed(2 * PL, True, "", "", "", 0.2)
    m.task_opened({}, 0.3)
    assert m.child_subscribed("c1", 0.3) == [] and m.child_subscribed("c2", 0.3) == []
    out = m.origin_piece_landed(0, digest(0), PL, 1.0)
    assert of(out, Announce) == [Announce("c1", [0])]  # one child first
    assert m.held_back(0)
    assert m.piece_uploaded(0, 1.5) == []
    assert of(m.tick(3.5), Announce) == [Announce("c2", [0])]  # the rest, later


# ---------------------------------------------------------------------------- clients


def test_a_range_only_download_fetches_its_pieces_and_stays_partial() -> None:
    m = machine(whole=False)
    m.client_attached()
    out = opened(m, 10, ["a"]) + m.want_range(PL * 3 + 5, PL * 4 + 1, 0.1)
    out += m.parent_announced("a", range(10), 0.2)
    fetches = of(out, Fetch)
    assert sorted(f.number for f in fetches) == [3, 4]
    for f in fetches:
        out = m.piece_landed(f.fetch_id, f.number, "a", PL, 1.0)
    assert not of(out, RangesDone)  # a client is still attached
    out = m.client_detached(1.5)
    assert sent(out, LeavePeer) and of(out, RangesDone) and m.done and not m.finished


def test_want_all_widens_a_range_only_download() -> None:
    m = machine(whole=False)
    m.client_attached()
    opened(m, 3, ["a"])
    m.want_range(0, 10, 0.0)
    m.want_all(0.0)
    out = m.parent_announced("a", range(3), 0.1)
    assert len(of(out, Fetch)) == 2  # per parent; all three are wanted now


def test_the_picker_follows_the_streaming_client() -> None:
    m = machine(config=MachineConfig(concurrent_pieces=1, per_parent_limit=1))
    opened(m, 40, ["a"])
    m.streaming_from(17)
    (f,) = of(m.parent_announced("a", range(40), 0.0), Fetch)
    assert f.number == 17


# ---------------------------------------------------------------------------- lingering


def test_an_ended_seed_lingers_while_pieces_are_held_back() -> None:
    m = machine(seed_trigger=True, config=MachineConfig(reveal_after=5.0, linger_limit=60.0))
    m.connected(0.0)
    m.scheduler_message(NeedBackToSource(peer_id="me", task_id=TASK), 0.0)
    m.origin_probed(PL, True, "", "", "", 0.0)
    m.task_opened({}, 0.0)
    m.child_subscribed("c1", 0.0)
    m.child_subscribed("c2", 0.0)
    m.origin_piece_landed(0, digest(0), PL, 1.0)
    m.completed(1.1)
    assert m.lingering(2.0)
    assert of(m.reveal_all(), Announce) == [Announce("c2", [0])]
    assert not m.lingering(2.0)


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
