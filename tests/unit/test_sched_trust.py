"""The scheduler's trust rules (sans-I/O): tickets per parent, digests only from seed
peers or from two ordinary origin fetches that agree, one piece-length rule, bounds per
host, and the private flag of a task."""

from __future__ import annotations

import dataclasses
from typing import Any

from dragonfly.config import SchedulerConfig, load_config
from dragonfly.sched.answers import TICKET_STEP
from dragonfly.sched.resources import PeerState, TaskState
from dragonfly.sched.scheduler import SchedulerSettings, Send
from dragonfly.trust import Ticket, TicketKey, TrustError
from dragonfly.wire.messages import (
    CandidateParents,
    Error,
    HostInfo,
    NeedBackToSource,
    PieceDigests,
    RegisterPeer,
    Reschedule,
    TaskFailed,
    TaskMetadata,
    TaskSpec,
)
from tests.unit.sched_support import BAD, PL, SPECS, T1, World, digest, of, parents_of

KEYS = {name: bytes([i]) * 32 for i, name in enumerate(["seed", "a", "b", "c", "d"], 1)}
TTL = 600.0
WALL = 1_000_000.0  # the shell's offset from its clock to unix time


class TrustedWorld(World):
    """Hosts connect with their host keys, as the shell admits them after their proofs."""

    def __init__(self) -> None:
        super().__init__(SchedulerSettings(ticket_ttl=TTL))
        self.s.wall_offset = WALL

    def connect(self, name: str, **kw: Any) -> list[Send]:
        info = HostInfo(host_id=name, hostname=name, ip="127.0.0.1", upload_port=4000, **kw)
        return self._record(self.s.host_connected(info, self.now, key=KEYS[name]))


def test_every_parent_comes_with_a_ticket_its_host_verifies() -> None:
    w = TrustedWorld()
    w.seeded_task()
    w.connect("a")
    (cp,) = of(w.register("a", "pa"), CandidateParents)
    assert parents_of(cp) == ["s1"] and len(cp.tickets) == 1
    # (rounded up to a step: a peer's many parent updates reuse its tickets)
    assert 0 <= cp.ticket_expires_at - (w.now + WALL + TTL) < TICKET_STEP
    ticket = Ticket("a", cp.ticket_expires_at, cp.tickets[0])
    wall = w.now + WALL
    TicketKey(KEYS["seed"]).verify(ticket, T1, "seed", wall)  # the parent's own key
    for wrong in (
        lambda: TicketKey(KEYS["a"]).verify(ticket, T1, "seed", wall),  # another host's key
        lambda: TicketKey(KEYS["seed"]).verify(
            dataclasses.replace(ticket, child_host_id="b"), T1, "seed", wall
        ),  # another child
        lambda: TicketKey(KEYS["seed"]).verify(ticket, T1, "seed", cp.ticket_expires_at),
    ):
        try:
            wrong()
        except TrustError:
            continue
        raise AssertionError("a ticket verified where it must not")
    # Without identity (the simulation, insecure mode): no tickets.
    plain = World()
    plain.seeded_task()
    plain.connect("a")
    (cp,) = of(plain.register("a", "pa"), CandidateParents)
    assert parents_of(cp) == ["s1"] and cp.tickets == [] and cp.ticket_expires_at == 0


def test_a_reschedule_hands_out_fresh_tickets() -> None:
    w = TrustedWorld()
    w.seeded_task()
    w.connect("a")
    (first,) = of(w.register("a", "pa"), CandidateParents)
    (same,) = of(w.send("a", Reschedule(peer_id="pa", task_id=T1)), CandidateParents)
    assert (same.tickets, same.ticket_expires_at) == (first.tickets, first.ticket_expires_at)
    w.now += TICKET_STEP
    (again,) = of(w.send("a", Reschedule(peer_id="pa", task_id=T1)), CandidateParents)
    assert again.ticket_expires_at == first.ticket_expires_at + TICKET_STEP
    assert again.tickets != first.tickets


def test_a_parent_update_carries_the_new_parents_tickets_only() -> None:
    w = TrustedWorld()
    w.seeded_task()
    for name in ("a", "b"):
        w.connect(name)
    w.register("a", "pa")
    w.register("b", "pb")
    (update,) = of(w.pieces("a", "pa", [0], parent="s1"), CandidateParents, "b")
    assert parents_of(update) == ["pa"] and len(update.tickets) == 1
    ticket = Ticket("b", update.ticket_expires_at, update.tickets[0])
    TicketKey(KEYS["a"]).verify(ticket, T1, "a", w.now + WALL)  # pa's host's key


def test_a_known_tasks_id_with_other_fields_is_refused() -> None:
    """A registration naming a known task's ID is checked against its fields as a new
    one is (the shortcut for a known task's very fields must not pass other fields)."""
    w = World()
    w.seeded_task()
    w.connect("a")
    other = dataclasses.replace(SPECS[T1], url="http://origin/other.bin")
    out = w.send("a", RegisterPeer(peer_id="pa", task_id=T1, task=other))
    (error,) = of(out, Error)
    assert "not the ID of its fields" in error.message and "pa" not in w.s.peers
    assert w.s.tasks[T1].spec == SPECS[T1] and w.s.counters.bad_reports == 1


def _no_seed_task(w: World) -> tuple[NeedBackToSource, NeedBackToSource]:
    for name in ("a", "b", "c", "d"):
        w.connect(name)
    (first,) = of(w.register("a", "pa"), NeedBackToSource)
    (second,) = of(w.register("b", "pb"), NeedBackToSource)  # a witness
    return first, second


def test_one_ordinary_peers_digest_is_not_enough() -> None:
    w = World()
    _, second = _no_seed_task(w)
    assert "second origin fetch" in second.reason
    w.metadata("a", "pa")
    out = w.pieces("a", "pa", [0, 1])
    assert not of(out, PieceDigests) and w.s.tasks[T1].digests == {}
    # The third peer gets parents, but no digest to check a piece against yet.
    (cp,) = of(w.register("c", "pc"), CandidateParents)
    assert sorted(parents_of(cp)) == ["pa", "pb"] and cp.digests == []
    # The witness agrees on piece 0: it holds, and reaches the waiting peer.
    out = w.pieces("b", "pb", [0])
    assert [d.number for m in of(out, PieceDigests, "c") for d in m.digests] == [0]
    assert w.s.tasks[T1].digests == {0: digest(0)}


def test_disagreeing_origin_fetches_call_a_third_and_the_liar_is_marked() -> None:
    w = World()
    _no_seed_task(w)
    w.metadata("a", "pa")
    w.pieces("a", "pa", [0, 1], bad=True)  # a member that lies about the origin's bytes
    (cp,) = of(w.register("c", "pc"), CandidateParents)
    assert cp.digests == []
    out = w.pieces("b", "pb", [0, 1])  # the honest witness disagrees
    assert not of(out, PieceDigests)  # one against one: nothing holds
    (nbts,) = of(out, NeedBackToSource, "c")  # ... so a third fetches from the origin
    assert "third" in nbts.reason
    out = w.pieces("c", "pc", [0, 1])
    assert w.s.tasks[T1].digests == {0: digest(0), 1: digest(1)}
    assert w.s.peers["pa"].bad and w.s.hosts["a"].bad  # the liar's word is worth nothing now
    assert not w.s.peers["pb"].bad and not w.s.peers["pc"].bad
    # A later peer is never given the liar as a parent.
    (cp,) = of(w.register("d", "pd"), CandidateParents)
    assert "pa" not in parents_of(cp) and [d.number for d in cp.digests] == [0, 1]


def test_two_peers_of_one_host_are_one_witness() -> None:
    w = World()
    w.connect("a")
    of(w.register("a", "pa1"), NeedBackToSource)
    assert of(w.register("a", "pa2"), NeedBackToSource)
    w.metadata("a", "pa1")
    w.pieces("a", "pa1", [0])
    w.pieces("a", "pa2", [0])
    assert w.s.tasks[T1].digests == {}  # the same host twice is one word


def test_a_seeds_digest_holds_at_once_and_outvotes_a_liar() -> None:
    w = World()
    w.seeded_task()  # the seed reported piece 0
    assert w.s.tasks[T1].digests == {0: digest(0)}
    w.connect("a")
    w.register("a", "pa", need_back_to_source=True)
    w.pieces("a", "pa", [1], bad=True)
    assert 1 not in w.s.tasks[T1].digests
    w.pieces("seed", "s1", [1])
    assert w.s.tasks[T1].digests[1] == digest(1) and w.s.peers["pa"].bad


def test_the_piece_length_is_the_tasks_rule_not_the_reporters() -> None:
    w = World()
    w.connect("a")
    spec = TaskSpec(url="http://origin/unnamed")  # no explicit piece length
    SPECS[spec.task_id] = spec
    w.register("a", "pa", spec.task_id)
    out = w.send(
        "a",
        TaskMetadata(
            peer_id="pa", task_id=spec.task_id, content_length=10 << 20, piece_length=1,
            piece_count=10 << 20,
        ),
    )  # fmt: skip
    (err,) = of(out, Error)
    assert "piece length 1 is not the task's (4194304)" in err.message
    assert not w.s.tasks[spec.task_id].metadata_known
    out = w.send(
        "a",
        TaskMetadata(
            peer_id="pa", task_id=spec.task_id, content_length=10 << 20, piece_length=4 << 20,
            piece_count=3,
        ),
    )  # fmt: skip
    assert not of(out, Error) and w.s.tasks[spec.task_id].piece_length == 4 << 20


def test_bounds_per_host() -> None:
    w = World(SchedulerSettings(peers_per_host=2, registration_rate=3))
    w.seeded_task()
    w.connect("a")
    assert of(w.register("a", "p1"), CandidateParents)
    assert of(w.register("a", "p2"), CandidateParents)
    (failed,) = of(w.register("a", "p3"), TaskFailed)
    assert failed.peer_id == "p3" and failed.http_status == 503
    assert "downloads registered" in failed.reason
    assert "p3" not in w.s.peers and w.s.counters.refused_registrations == 1
    # A seed peer holds (and keeps registered) every task it was triggered for.
    for i in range(3):
        w.now += 1.0  # (within the rate)
        task = f"seed-task-{i}"
        spec = TaskSpec(url=f"http://origin/{task}", piece_length=PL)
        SPECS[spec.task_id] = spec
        assert of(w.register("seed", f"s-{task}", spec.task_id), NeedBackToSource)
    # Three a second: the fourth at once is refused whatever the count.
    w2 = World(SchedulerSettings(registration_rate=3))
    w2.seeded_task()
    w2.connect("a")
    answers = [w2.register("a", f"q{i}") for i in range(4)]
    assert [bool(of(a, TaskFailed)) for a in answers] == [False, False, False, True]
    assert "registrations/s" in of(answers[3], TaskFailed)[0].reason
    w2.now += 1.0  # a second later, three more
    assert of(w2.register("a", "q9"), CandidateParents)


def test_a_task_made_with_credentials_stays_private() -> None:
    w = World()
    w.seeded_task()
    for name in ("a", "b"):
        w.connect(name)
    spec = SPECS[T1]
    w.send("a", RegisterPeer(peer_id="pa", task_id=T1, task=spec, private=True))
    assert w.s.tasks[T1].private
    (cp,) = of(w.send("b", RegisterPeer(peer_id="pb", task_id=T1, task=spec)), CandidateParents)
    assert cp.private  # whoever joins learns it, and asks the origin for its clients
    w.connect("c")
    (nbts,) = of(w.register("c", "pc", need_back_to_source=True), NeedBackToSource)
    assert nbts.private
    assert w.s.peers["pb"].state is PeerState.RUNNING
    task = w.s.tasks[T1]
    task.transition(TaskState.FAILED)  # (the origin failed it; a new registration retries)
    task.restart(RegisterPeer(peer_id="x", task_id=T1, task=spec))
    assert task.private  # never back to public


def test_a_bad_report_is_still_caught_against_confirmed_digests() -> None:
    w = World()
    w.seeded_task()
    w.connect("a")
    w.register("a", "pa")
    w.pieces("a", "pa", [0], parent="s1", bad=True)
    assert w.s.peers["pa"].bad and BAD not in w.s.tasks[T1].digests.values()


def test_trust_and_limits_keys_become_settings() -> None:
    """trust.ticket_ttl, limits.peers_per_host and limits.registration_rate are the
    settings the core gets (what they decide: the tests above); trust.insecure means no
    tickets at all."""
    keys = [
        "trust.secret_file=/x",
        "trust.ticket_ttl=5m",
        "limits.peers_per_host=7",
        "limits.registration_rate=9",
    ]
    cfg = load_config("scheduler", env={}, overrides=keys)
    assert isinstance(cfg, SchedulerConfig)
    settings = SchedulerSettings.from_config(cfg)
    assert (settings.ticket_ttl, settings.peers_per_host, settings.registration_rate) == (
        300.0,
        7,
        9,
    )
    insecure = load_config("scheduler", env={}, overrides=[*keys, "trust.insecure=true"])
    assert isinstance(insecure, SchedulerConfig)
    assert SchedulerSettings.from_config(insecure).ticket_ttl == 0
