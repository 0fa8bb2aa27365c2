"""The download machine's P2P rules, driven event by event: no sockets, no disk, no clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dragonfly.engine.actions import (
    Action,
    Cancel,
    Complete,
    Failed,
    Fetch,
    Finished,
    MachineConfig,
    OpenTask,
    ProbeOrigin,
    Stalled,
    Subscribe,
    Unsubscribe,
)
from dragonfly.engine.machine import Phase
from dragonfly.engine.requests import RequestTable
from dragonfly.wire.messages import (
    NeedBackToSource,
    PeerFailed,
    PeerFinished,
    PieceDigest,
    PieceDigests,
    PieceFailed,
    PiecesFinished,
    RegisterPeer,
    Reschedule,
    TaskFailed,
)
from tests.unit.machine_support import (
    PL,
    SPEC,
    TASK,
    candidates,
    digest,
    machine,
    of,
    opened,
    sent,
)

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
    m = machine(config=MachineConfig(report_interval=0.5, concurrent_pieces=2))
    out = opened(m, 4, ["a"]) + m.parent_announced("a", range(4), 0.0)
    f1, f2 = of(out, Fetch)
    assert not sent(m.piece_landed(f1.fetch_id, f1.number, "a", PL, 1.0), PiecesFinished)
    assert not sent(m.piece_landed(f2.fetch_id, f2.number, "a", PL, 1.2), PiecesFinished)
    assert m.next_wakeup(1.2) == pytest.approx(1.5)
    (batch,) = sent(m.tick(1.5), PiecesFinished)
    assert [r.number for r in batch.pieces] == [f1.number, f2.number]


def test_a_piece_not_landed_within_the_timeout_is_that_parents_failure() -> None:
    m = machine(config=MachineConfig(piece_timeout=5.0, per_parent_limit=1, concurrent_pieces=2))
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
    m = machine(config=MachineConfig(piece_timeout=30.0, per_parent_limit=1, concurrent_pieces=1))
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
    m = machine(config=MachineConfig(per_parent_limit=1, concurrent_pieces=1))
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
    m = machine(config=MachineConfig(piece_timeout=1.0, per_parent_limit=1, concurrent_pieces=1))
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
