"""The scheduler's resources and evaluator: state machine tables, bitset, index, scores."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dragonfly.sched.evaluator import Evaluator
from dragonfly.sched.resources import (
    PEER_TRANSITIONS,
    RECEIVED_STATES,
    TASK_TRANSITIONS,
    Bitset,
    Host,
    IllegalTransition,
    Peer,
    PeerIndex,
    PeerState,
    Task,
    TaskState,
    size_class,
)
from dragonfly.wire.messages import HostInfo, RegisterPeer, TaskSpec

P, T = PeerState, TaskState


def host(
    name: str,
    *,
    seed: bool = False,
    idc: str = "",
    location: str = "",
    upload_limit: int = 10,
) -> Host:
    info = HostInfo(
        host_id=name,
        hostname=name,
        ip="10.0.0.1",
        upload_port=4000,
        seed=seed,
        idc=idc,
        location=location,
        upload_limit=upload_limit,
    )
    return Host(info, 0.0)


def peer(name: str, h: Host | None = None, task: Task | None = None) -> Peer:
    return Peer(
        name, h or host(f"h-{name}"), task or Task("t", TaskSpec(url="http://o/f"), 0.0), 0.0
    )


# -- peer state machine -------------------------------------------------------------------

LEGAL_PEER = [
    (P.PENDING, P.RECEIVED_NORMAL),
    (P.PENDING, P.RECEIVED_EMPTY),
    (P.PENDING, P.BACK_TO_SOURCE),
    (P.PENDING, P.SUCCEEDED),  # a host re-announcing a task it holds (HeldTasks)
    (P.RECEIVED_TINY, P.RUNNING),
    (P.RECEIVED_SMALL, P.RUNNING),
    (P.RUNNING, P.BACK_TO_SOURCE),
    (P.RUNNING, P.SUCCEEDED),
    (P.BACK_TO_SOURCE, P.SUCCEEDED),
    (P.SUCCEEDED, P.LEAVE),
    (P.FAILED, P.LEAVE),
]
ILLEGAL_PEER = [
    (P.PENDING, P.RUNNING),  # always through a RECEIVED_* state
    (P.RECEIVED_NORMAL, P.SUCCEEDED),
    (P.BACK_TO_SOURCE, P.RUNNING),
    (P.SUCCEEDED, P.RUNNING),
    (P.FAILED, P.RUNNING),
    (P.FAILED, P.FAILED),
    (P.LEAVE, P.PENDING),
    (P.LEAVE, P.LEAVE),
]


@pytest.mark.parametrize(("old", "new"), LEGAL_PEER)
def test_legal_peer_transitions(old: PeerState, new: PeerState) -> None:
    p = peer("p")
    p.state = old
    assert p.can(new)
    p.transition(new)
    assert p.state is new


@pytest.mark.parametrize(("old", "new"), ILLEGAL_PEER)
def test_illegal_peer_transitions_raise(old: PeerState, new: PeerState) -> None:
    p = peer("p")
    p.state = old
    assert not p.can(new)
    with pytest.raises(IllegalTransition, match=f"{old.name} → {new.name}"):
        p.transition(new)
    assert p.state is old


def test_every_live_peer_state_can_leave_or_fail() -> None:
    for state, allowed in PEER_TRANSITIONS.items():
        if state is not P.LEAVE:
            assert P.LEAVE in allowed, state
        if state not in (P.LEAVE, P.FAILED):
            assert P.FAILED in allowed, state
    assert set(PEER_TRANSITIONS) == set(PeerState)
    assert all(PEER_TRANSITIONS[s] == {P.RUNNING, P.FAILED, P.LEAVE} for s in RECEIVED_STATES)


@pytest.mark.parametrize(
    ("old", "new", "legal"),
    [
        (T.PENDING, T.RUNNING, True),
        (T.RUNNING, T.SUCCEEDED, True),
        (T.RUNNING, T.FAILED, True),
        (T.FAILED, T.PENDING, True),
        (T.SUCCEEDED, T.LEAVE, True),
        (T.PENDING, T.SUCCEEDED, False),
        (T.SUCCEEDED, T.RUNNING, False),
        (T.LEAVE, T.PENDING, False),
    ],
)
def test_task_transitions(old: TaskState, new: TaskState, legal: bool) -> None:
    t = Task("t", TaskSpec(url="http://o/f"), 0.0)
    t.state = old
    assert t.can(new) is legal
    if legal:
        t.transition(new)
        assert t.state is new
    else:
        with pytest.raises(IllegalTransition):
            t.transition(new)
    assert set(TASK_TRANSITIONS) == set(TaskState)


def test_restart_starts_a_new_generation() -> None:
    t = Task("t", TaskSpec(url="http://o/f", piece_length=1 << 20), 0.0)
    t.metadata_known, t.content_length, t.digests[0] = True, 100, b"x" * 32
    t.transition(T.FAILED)
    again = TaskSpec(url="http://o/f?Signature=2", piece_length=2 << 20)
    t.restart(RegisterPeer(peer_id="p", task_id="t", task=again, headers={"a": "b"}))
    assert (t.state, t.generation, t.metadata_known, t.digests, t.piece_length) == (
        T.PENDING,
        1,
        False,
        {},
        2 << 20,
    )
    assert (t.spec, t.headers) == (again, {"a": "b"})


@pytest.mark.parametrize(
    ("length", "piece_length", "state"),
    [
        (0, 4, P.RECEIVED_EMPTY),
        (1, 4, P.RECEIVED_TINY),
        (128, 1024, P.RECEIVED_TINY),
        (129, 1024, P.RECEIVED_SMALL),
        (1024, 1024, P.RECEIVED_SMALL),
        (1025, 1024, P.RECEIVED_NORMAL),
        (-1, 1024, P.RECEIVED_NORMAL),
    ],
)
def test_size_class(length: int, piece_length: int, state: PeerState) -> None:
    assert size_class(length, piece_length) is state


# -- bitset and index ---------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=5000), max_size=60))
def test_bitset_matches_a_set(numbers: list[int]) -> None:
    b = Bitset()
    seen: set[int] = set()
    for n in numbers:
        assert b.add(n) is (n not in seen)
        seen.add(n)
    assert len(b) == len(seen)
    assert sorted(b) == sorted(seen)
    assert all(n in b for n in seen) and -1 not in b and 5001 not in b


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 9)), max_size=60))
def test_peer_index_matches_a_set(ops: list[tuple[bool, int]]) -> None:
    peers = [peer(f"p{i}") for i in range(10)]
    idx = PeerIndex()
    model: set[str] = set()
    for add, i in ops:
        if add:
            assert idx.add(peers[i]) is (peers[i].id not in model)
            model.add(peers[i].id)
        else:
            assert idx.discard(peers[i]) is (peers[i].id in model)
            model.discard(peers[i].id)
        assert {p.id for p in idx} == model == {p.id for p in peers if p in idx}
        assert len(idx) == len(model)


# -- evaluator ----------------------------------------------------------------------------


def scored(child: Peer, *parents: Peer) -> list[str]:
    ev = Evaluator()
    return [p.id for p in sorted(parents, key=lambda p: ev.score(child, p), reverse=True)]


def test_idle_parent_beats_loaded_one() -> None:
    idle, busy = host("idle"), host("busy")
    busy.active_uploads = 8
    child = peer("c")
    assert scored(child, peer("b", busy), peer("i", idle)) == ["i", "b"]


def test_same_idc_beats_other_at_equal_load() -> None:
    child = peer("c", host("hc", idc="east"))
    assert scored(
        child, peer("far", host("x", idc="west")), peer("near", host("y", idc="east"))
    ) == [
        "near",
        "far",
    ]
    ev = Evaluator()
    # Empty IDCs are no match.
    assert ev.same_idc(host("a"), host("b")) == 0.0


def test_location_prefix_counts_leading_levels() -> None:
    ev = Evaluator()
    c = host("c", location="cn|east|hz|a")
    assert ev.location_match(c, host("p", location="cn|east|hz|b")) == pytest.approx(3 / 5)
    assert ev.location_match(c, host("p", location="us|east|hz|a")) == 0.0
    assert (
        ev.location_match(host("x", location="a|b|c|d|e|f"), host("y", location="a|b|c|d|e|f")) == 1
    )
    assert ev.location_match(host("x"), host("y")) == 0.0
    child = peer("ch", c)
    assert scored(
        child, peer("far", host("f", location="cn")), peer("near", host("n", location="cn|east"))
    ) == [
        "near",
        "far",
    ]


def test_normal_peer_beats_seed_at_equal_load() -> None:
    child = peer("c")
    assert scored(child, peer("s", host("seed", seed=True)), peer("n", host("normal"))) == [
        "n",
        "s",
    ]


def test_load_dominates_topology() -> None:
    child = peer("c", host("hc", idc="east", location="a|b|c"))
    loaded = host("l", idc="east", location="a|b|c")
    loaded.active_uploads = 10
    assert scored(child, peer("l", loaded), peer("s", host("seed", seed=True))) == ["s", "l"]


def test_load_quality_clamps_and_handles_no_uploads() -> None:
    h = host("h", upload_limit=4)
    h.active_uploads = 9
    assert Evaluator.load_quality(h) == 0.0
    h.active_uploads = 1
    assert Evaluator.load_quality(h) == pytest.approx(0.75)
    assert Evaluator.load_quality(host("z", upload_limit=0)) == 0.0


def test_weights_are_swappable() -> None:
    ev = Evaluator(load_weight=0.0, idc_weight=0.0, location_weight=0.0, host_type_weight=1.0)
    child = peer("c")
    busy = host("b")
    busy.active_uploads = 10
    assert ev.score(child, peer("b", busy)) == 1.0
