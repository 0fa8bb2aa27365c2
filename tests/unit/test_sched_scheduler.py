"""The scheduler's seeds, triggers and parent scheduling, driven event by event."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import pytest

from dragonfly.sched import answers as sched_answers
from dragonfly.sched.resources import PeerState, TaskState
from dragonfly.sched.scheduler import SchedulerSettings
from dragonfly.wire.messages import (
    CandidateParents,
    Error,
    ErrorCode,
    LeavePeer,
    NeedBackToSource,
    PeerFinished,
    PieceDigests,
    PieceFailed,
    PieceReport,
    PiecesFinished,
    Reschedule,
    TaskMetadata,
    TaskSpec,
    TriggerDownload,
)
from tests.unit.sched_support import (
    PL,
    T1,
    URL,
    World,
    digest,
    of,
    parents_of,
    tid,
)

# -- seeds and triggers -------------------------------------------------------------------


def test_first_registration_triggers_exactly_one_seed() -> None:
    w = World()
    for i in range(3):
        w.connect(f"seed{i}", seed=True)
    w.connect("a")
    w.connect("b")
    spec = TaskSpec(url=URL, tag="tg", piece_length=1 << 20)
    out = w.register("a", "pa", spec.task_id, headers={"X-K": "v"}, spec=spec)
    triggers = [(d.host_id, d.message) for d in out if isinstance(d.message, TriggerDownload)]
    assert len(triggers) == 1
    seed_host, trig = triggers[0]
    assert seed_host.startswith("seed")
    assert (trig.task_id, trig.task, trig.headers) == (spec.task_id, spec, {"X-K": "v"})
    assert not of(out, CandidateParents) and not of(out, NeedBackToSource)
    assert not of(w.register("b", "pb", spec.task_id, spec=spec), TriggerDownload)
    assert w.s.counters.triggers == 1


def test_seed_choice_is_stable_and_spreads_tasks() -> None:
    def choice(seeds: list[str], task: str) -> str:
        w = World()
        for name in seeds:
            w.connect(name, seed=True)
        w.connect("a")
        (d,) = [d for d in w.register("a", "p", task) if isinstance(d.message, TriggerDownload)]
        return d.host_id

    seeds = ["s-a", "s-b", "s-c"]
    tasks = [tid(f"task{i}") for i in range(60)]
    before = {t: choice(seeds, t) for t in tasks}
    assert {t: choice(list(reversed(seeds)), t) for t in tasks} == before  # order-free
    spread = Counter(before.values())
    assert set(spread) == set(seeds) and min(spread.values()) >= 8
    # A new seed takes over only the tasks it wins; the others keep theirs.
    after = {t: choice([*seeds, "s-d"], t) for t in tasks}
    assert all(after[t] in (before[t], "s-d") for t in tasks)
    # Removing a seed moves only its own tasks.
    fewer = {t: choice(["s-a", "s-b"], t) for t in tasks}
    assert all(fewer[t] == before[t] for t in tasks if before[t] != "s-c")


def test_seed_gets_back_to_source_and_metadata_schedules_waiting_peers() -> None:
    w = World()
    w.connect("seed", seed=True)
    w.connect("a")
    w.register("a", "pa")
    assert not w.tick()  # waiting for the seed: nothing to say yet
    out = w.register("seed", "s1")
    (nbts,) = of(out, NeedBackToSource, "seed")
    assert nbts.peer_id == "s1" and nbts.content_length == -1
    assert w.s.peers["s1"].state is PeerState.BACK_TO_SOURCE
    assert w.s.counters.back_to_source == 1
    assert not of(out, CandidateParents)  # no metadata yet: the peer keeps waiting
    assert not w.pieces("seed", "s1", [])  # an empty report says nothing
    out = w.metadata("seed", "s1")
    (cp,) = of(out, CandidateParents, "a")
    assert parents_of(cp) == ["s1"] and cp.parents[0].seed
    assert (cp.content_length, cp.piece_length, cp.piece_count, cp.etag) == (
        10 * PL,
        PL,
        10,
        '"v1"',
    )
    assert cp.content_type == "application/octet-stream" and cp.digests == []
    peer = w.s.peers["pa"]
    assert peer.state is PeerState.RUNNING and peer.received is PeerState.RECEIVED_NORMAL
    assert w.s.tasks[T1].state is TaskState.RUNNING
    assert w.s.hosts["seed"].active_uploads == 1
    # New origin digests reach the running peer, batched: one message per report.
    out = w.pieces("seed", "s1", [0, 1])
    (pd,) = of(out, PieceDigests, "a")
    assert [(d.number, d.digest) for d in pd.digests] == [(0, digest(0)), (1, digest(1))]
    assert not of(out, PieceDigests, "seed")
    # A later peer gets all known digests with its parents.
    w.connect("b")
    (cp_b,) = of(w.register("b", "pb"), CandidateParents, "b")
    assert [d.number for d in cp_b.digests] == [0, 1]
    # A later seed registration gets the known layout, digests and validators.
    w.connect("seed2", seed=True)
    (nbts2,) = of(w.register("seed2", "s2"), NeedBackToSource)
    assert (nbts2.content_length, nbts2.piece_length, nbts2.etag) == (10 * PL, PL, '"v1"')
    assert [d.number for d in nbts2.digests] == [0, 1]


def test_no_seed_sends_the_first_peer_to_the_origin() -> None:
    w = World()
    w.connect("a")
    out = w.register("a", "pa")
    (nbts,) = of(out, NeedBackToSource, "a")
    assert nbts.reason and not of(out, TriggerDownload)
    assert w.s.tasks[T1].back_to_source == {"pa": w.s.peers["pa"]}


def test_seed_trigger_timeout_moves_to_the_next_seed() -> None:
    w = World(SchedulerSettings(seed_trigger_timeout=2.0))
    w.connect("s-a", seed=True)
    w.connect("s-b", seed=True)
    w.connect("a")
    (first,) = [d.host_id for d in w.register("a", "pa") if isinstance(d.message, TriggerDownload)]
    assert not of(w.tick(1.0), TriggerDownload)
    out = w.tick(1.0)
    (second,) = [d.host_id for d in out if isinstance(d.message, TriggerDownload)]
    assert {first, second} == {"s-a", "s-b"}


def test_triggered_seed_disconnecting_moves_to_the_next_seed() -> None:
    w = World()
    w.connect("s-a", seed=True)
    w.connect("s-b", seed=True)
    w.connect("a")
    (first,) = [d.host_id for d in w.register("a", "pa") if isinstance(d.message, TriggerDownload)]
    out = w.disconnect(first)
    (second,) = [d.host_id for d in out if isinstance(d.message, TriggerDownload)]
    assert second != first


# -- scheduling ---------------------------------------------------------------------------


def test_later_peers_get_earlier_peers_once_they_hold_pieces() -> None:
    w = World()
    w.seeded_task()
    for h in "abc":
        w.connect(h)
    (cp_a,) = of(w.register("a", "pa"), CandidateParents, "a")
    assert parents_of(cp_a) == ["s1"]
    (cp_b,) = of(w.register("b", "pb"), CandidateParents, "b")
    assert parents_of(cp_b) == ["s1"]  # pa holds nothing yet: not a candidate
    # pa's first piece makes it a source: pb, short of parents, is offered it at once,
    # in a parent update that names the new parent only.
    out = w.pieces("a", "pa", [0], parent="s1")
    (top_up,) = of(out, CandidateParents, "b")
    assert parents_of(top_up) == ["pa"] and list(w.s.peers["pb"].parents) == ["s1", "pa"]
    assert not top_up.digests  # (pb has them, and gets new ones in PieceDigests)
    # Later reports change nothing for anybody: no repeated answers.
    assert not of(w.pieces("a", "pa", [1], parent="s1"), CandidateParents)
    assert not of(w.pieces("b", "pb", [0], parent="pa"), CandidateParents, "b")
    (cp_c,) = of(w.register("c", "pc"), CandidateParents, "c")
    # The idle normal peers outrank the busy seed.
    assert parents_of(cp_c)[:2] in (["pa", "pb"], ["pb", "pa"])
    assert set(parents_of(cp_c)) == {"s1", "pa", "pb"}
    w.s.check_invariants()


def test_parent_updates_of_a_batch_go_out_once_net_of_what_it_undid() -> None:
    w = World()
    w.seeded_task()
    for h in "abc":
        w.connect(h)
    w.register("a", "pa")
    w.register("b", "pb")
    w.register("c", "pc")
    report = PiecesFinished(
        peer_id="pa",
        task_id=T1,
        pieces=[PieceReport(number=0, offset=0, length=PL, digest=digest(0), parent_id="s1")],
    )
    # pa becomes a source (offered to pb and pc) and leaves, in one receive: nothing to
    # tell pb or pc, whose parent sets end where they were.
    out = w.s.handle_batch("a", [report, LeavePeer(peer_id="pa", task_id=T1)], w.now)
    assert not of(out, CandidateParents)
    assert list(w.s.peers["pb"].parents) == list(w.s.peers["pc"].parents) == ["s1"]
    # The same as two events: the offers go out, the leave takes nothing back.
    w.register("a", "pa2")
    out = w.send("a", dataclasses.replace(report, peer_id="pa2"))
    assert sorted(d.host_id for d in out if isinstance(d.message, CandidateParents)) == ["b", "c"]
    assert all(parents_of(m) == ["pa2"] for m in of(out, CandidateParents))
    assert not of(w.send("a", LeavePeer(peer_id="pa2", task_id=T1)), CandidateParents)
    w.s.check_invariants()


def test_parent_limit_and_idle_parents_first() -> None:
    w = World(SchedulerSettings(candidate_parent_limit=2))
    w.seeded_task()
    for i in range(6):
        w.connect(f"h{i}")
        w.register(f"h{i}", f"p{i}")
        w.pieces(f"h{i}", f"p{i}", [0], parent="s1")
    w.connect("late")
    (cp,) = of(w.register("late", "late"), CandidateParents)
    assert len(cp.parents) == 2 and "s1" not in parents_of(cp)
    for p in w.s.peers.values():
        assert len(p.parents) <= 2
    w.s.check_invariants()


def test_new_settings_take_effect_at_once() -> None:
    """The manager's cluster settings replace the core's (apply_cluster_config): the next
    decision follows the new parent limit."""
    w = World()
    w.seeded_task()
    for i in range(6):
        w.connect(f"h{i}")
        w.register(f"h{i}", f"p{i}")
        w.pieces(f"h{i}", f"p{i}", [0], parent="s1")
    w.s.settings = dataclasses.replace(w.s.settings, candidate_parent_limit=2)
    w.connect("late")
    (cp,) = of(w.register("late", "late"), CandidateParents)
    assert len(cp.parents) == 2  # (peers decided before keep theirs until their next decision)


def test_empty_task_gets_an_empty_answer_at_once() -> None:
    w = World()
    w.connect("seed", seed=True)
    w.connect("a")
    w.register("a", "pa")
    w.register("seed", "s1")
    (cp,) = of(w.metadata("seed", "s1", length=0), CandidateParents, "a")
    assert (cp.parents, cp.piece_count, cp.content_length) == ([], 0, 0)
    assert w.s.peers["pa"].received is PeerState.RECEIVED_EMPTY
    w.connect("b")
    (cp_b,) = of(w.register("b", "pb"), CandidateParents, "b")
    assert (cp_b.parents, cp_b.piece_count) == ([], 0)


@pytest.mark.parametrize(
    ("length", "received"),
    [
        (100, PeerState.RECEIVED_TINY),
        (PL, PeerState.RECEIVED_SMALL),
        (3 * PL, PeerState.RECEIVED_NORMAL),
    ],
)
def test_size_classes_are_scheduled_alike(length: int, received: PeerState) -> None:
    w = World()
    w.seeded_task(length=length)
    w.connect("a")
    (cp,) = of(w.register("a", "pa"), CandidateParents)
    assert parents_of(cp) == ["s1"] and cp.piece_count == -(-length // PL)
    assert w.s.peers["pa"].received is received
    assert w.s.peers["pa"].state is PeerState.RUNNING


def test_unknown_length_still_schedules() -> None:
    w = World()
    w.connect("seed", seed=True)
    w.register("seed", "s1")
    w.send(
        "seed",
        TaskMetadata(peer_id="s1", task_id=T1, content_length=-1, piece_length=PL, piece_count=-1),
    )
    w.connect("a")
    (cp,) = of(w.register("a", "pa"), CandidateParents)
    assert (cp.content_length, cp.piece_count, parents_of(cp)) == (-1, -1, ["s1"])
    length = 2 * PL + PL // 2
    w.send("seed", PeerFinished(peer_id="s1", task_id=T1, content_length=length, piece_count=3))
    task = w.s.tasks[T1]
    assert (task.content_length, task.piece_count, task.state) == (length, 3, TaskState.SUCCEEDED)


def test_two_peers_may_parent_each_other() -> None:
    """Cycles are allowed: each side only asks for pieces the other announced."""
    w = World()
    w.seeded_task()
    w.connect("a")
    w.connect("b")
    w.register("a", "pa")
    w.pieces("a", "pa", [0], parent="s1")
    w.register("b", "pb")
    w.pieces("b", "pb", [1], parent="s1")
    assert "pa" in w.s.peers["pb"].parents
    # pa loses the seed: pb holds piece 1, which pa lacks, so pb parents pa as well.
    out = w.send("a", Reschedule(peer_id="pa", task_id=T1, blocked_parents=["s1"]))
    (cp,) = of(out, CandidateParents, "a")
    assert parents_of(cp) == ["pb"]
    assert "pa" in w.s.peers["pb"].parents and "pb" in w.s.peers["pa"].parents
    w.s.check_invariants()


def test_a_stalled_peer_gets_parents_with_pieces_it_lacks() -> None:
    w = World()
    w.seeded_task()
    for h in "abc":
        w.connect(h)
    w.register("a", "pa")
    w.pieces("a", "pa", [0], parent="s1")
    w.register("b", "pb")
    w.pieces("b", "pb", [0], parent="pa")
    w.register("c", "pc")
    w.pieces("c", "pc", [0, 1], parent="s1")
    assert set(w.s.peers["pb"].parents) >= {"pa"}
    # pb is stalled (it has what pa has): a refresh drops pa, keeps those with news.
    out = w.send("b", Reschedule(peer_id="pb", task_id=T1, blocked_parents=["s1"]))
    (cp,) = of(out, CandidateParents, "b")
    assert "pa" not in parents_of(cp)
    assert "pc" in parents_of(cp)
    w.s.check_invariants()


def test_piece_failed_blocks_that_parent_for_that_peer() -> None:
    w = World()
    w.seeded_task()
    for h in "abc":
        w.connect(h)
    w.register("a", "pa")
    w.pieces("a", "pa", [0], parent="s1")
    w.register("b", "pb")
    w.pieces("b", "pb", [0], parent="pa")
    w.register("c", "pc")
    assert {"pa", "pb"} <= set(w.s.peers["pc"].parents)
    msg = PieceFailed(peer_id="pc", task_id=T1, number=1, parent_id="pa", reason="timeout")
    (cp,) = of(w.send("c", msg), CandidateParents, "c")
    assert "pa" not in parents_of(cp) and "pb" in parents_of(cp)
    assert w.s.hosts["a"].failures == 1
    # More in-flight pieces from the same dead parent: answered once only.
    assert not w.send("c", msg)
    # pa stays blocked for pc whatever happens, and only for pc.
    w.pieces("a", "pa", [1, 2], parent="s1")
    assert "pa" not in w.s.peers["pc"].parents
    w.connect("d")
    w.register("d", "pd")
    assert "pa" in w.s.peers["pd"].parents
    # Reschedule blocks a whole list and always answers.
    out = w.send("c", Reschedule(peer_id="pc", task_id=T1, blocked_parents=["pb"]))
    (cp2,) = of(out, CandidateParents, "c")
    assert not {"pa", "pb"} & set(parents_of(cp2)) and parents_of(cp2)
    w.s.check_invariants()


def test_bad_digest_excludes_the_reporter_for_good() -> None:
    w = World()
    w.seeded_task()
    for h in "abc":
        w.connect(h)
    w.register("a", "pa")
    w.register("b", "pb")
    w.pieces("a", "pa", [0], parent="s1")
    assert "pa" in w.s.peers["pb"].parents
    w.pieces("a", "pa", [1], parent="s1")  # no origin digest yet: nothing to compare
    w.pieces("seed", "s1", [1, 2])
    w.pieces("a", "pa", [2], parent="s1", bad=True)
    assert w.s.counters.bad_reports == 1
    assert w.s.peers["pa"].bad and w.s.hosts["a"].bad
    assert "pa" not in w.s.peers["pb"].parents  # dropped from its children
    (cp_c,) = of(w.register("c", "pc"), CandidateParents, "c")
    assert "pa" not in parents_of(cp_c)
    w.pieces("a", "pa", [3], parent="s1")
    assert "pa" not in w.s.tasks[T1].sources
    w.s.check_invariants()


def test_origin_digest_disagreement_marks_the_second_fetcher_bad() -> None:
    w = World(SchedulerSettings(back_to_source_count=5))
    w.seeded_task()
    w.connect("a")
    w.register("a", "pa", need_back_to_source=True)
    assert w.s.peers["pa"].state is PeerState.BACK_TO_SOURCE
    w.pieces("a", "pa", [0], bad=True)
    assert w.s.peers["pa"].bad and w.s.counters.bad_reports == 1
    assert w.s.tasks[T1].digests[0] == digest(0)  # the first report stands


def test_only_origin_fetchers_set_digests() -> None:
    w = World()
    w.seeded_task()
    w.connect("a")
    w.register("a", "pa")
    w.pieces("a", "pa", [5], parent="")  # claims the origin but was never sent there
    assert 5 not in w.s.tasks[T1].digests
    out = w.send(
        "a",
        TaskMetadata(peer_id="pa", task_id=T1, content_length=1, piece_length=1, piece_count=1),
    )
    assert of(out, Error)[0].code == ErrorCode.PROTOCOL
    assert w.s.tasks[T1].content_length == 10 * PL


def test_out_of_range_piece_is_refused() -> None:
    w = World()
    w.seeded_task()
    w.pieces("seed", "s1", [10, 2**30])
    assert w.s.counters.bad_reports == 2
    assert 10 not in w.s.peers["s1"].finished


def test_digests_beyond_one_message_follow_separately(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sched_answers, "DIGESTS_PER_MESSAGE", 3)
    w = World()
    w.seeded_task()
    w.pieces("seed", "s1", list(range(1, 8)))
    w.connect("a")
    out = w.register("a", "pa")
    (cp,) = of(out, CandidateParents)
    extra = of(out, PieceDigests)
    assert len(cp.digests) == 3 and [len(m.digests) for m in extra] == [3, 2]
    numbers = [d.number for d in cp.digests] + [d.number for m in extra for d in m.digests]
    assert sorted(numbers) == list(range(8))


def test_a_new_source_is_offered_to_waiting_peers_only_while_it_has_free_slots() -> None:
    """A peer begins to serve (its first piece) while ten peers wait, and it has two
    upload slots: two get it, and the other eight are not searched for parents again
    then (with thousands waiting, that search per new source was nearly all of a
    burst's scheduling); they try at their retry tick."""
    w = World()
    w.connect("seed", seed=True, upload_limit=2)
    w.register("seed", "s1")
    for n in range(12):
        w.connect(f"h{n}", upload_limit=2)
        w.register(f"h{n}", f"p{n}")
    w.metadata("seed", "s1")
    w.pieces("seed", "s1", [0, 1])
    task = w.s.tasks[T1]
    assert len(task.waiting) == 10  # the seed's two slots went to two of the twelve
    child = next(p for p in w.s.peers.values() if p.host.id != "seed" and p not in task.waiting)
    selections = 0
    select = w.s._selector.select

    def counted(*args: Any, **kwargs: Any) -> list[Any]:
        nonlocal selections
        selections += 1
        return select(*args, **kwargs)

    w.s._selector.select = counted  # type: ignore[method-assign]
    out = w.pieces(child.host.id, child.id, [0], parent="s1")
    given = {d.host_id for d in out if isinstance(d.message, CandidateParents)}
    assert len(given) == 2 and selections == 2, (given, selections)
    assert child.host.active_uploads == 2 and len(task.waiting) == 8
