"""A scheduler that restarts (or takes a task over from another of its ring) learns from
the hosts what they hold, without asking the origin again: complete tasks come in
HeldTasks with the attestation a scheduler of the cluster gave for their digests, and
downloads register again with the pieces they hold. Nobody's word is taken that the
cluster's rules would not take: an ordinary peer's digests need an attestation."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from dragonfly.sched.resources import PeerState, TaskState
from dragonfly.sched.scheduler import Scheduler, SchedulerSettings, Send
from dragonfly.trust import Attester, SecretRing
from dragonfly.wire.codec import decode, encode
from dragonfly.wire.messages import (
    CandidateParents,
    HeldTask,
    HeldTasks,
    HostInfo,
    NeedBackToSource,
    PeerFinished,
    PieceDigest,
    TaskAttested,
    TaskSpec,
    TriggerDownload,
)
from tests.unit.sched_support import PL, SPECS, T1, T2, World, digest, of, parents_of

RING = SecretRing.new("test")
LENGTH = 10 * PL
COUNT = 10


class Cluster(World):
    """A scheduler of a cluster with identity (it attests), or without (attester=None)."""

    def __init__(self, *, secure: bool = True, grace: float = 3.0) -> None:
        super().__init__(SchedulerSettings(rejoin_grace=grace))
        self.s = Scheduler(self.s.settings, attester=Attester(RING) if secure else None)

    def connect(self, name: str, **kw: Any) -> list[Send]:
        kw.setdefault("rejoining", True)
        info = HostInfo(host_id=name, hostname=name, ip="127.0.0.1", upload_port=4000, **kw)
        return self._record(self.s.host_connected(info, self.now))

    def finish(self, host: str, peer: str, task: str = T1) -> list[Send]:
        msg = PeerFinished(peer_id=peer, task_id=task, content_length=LENGTH, piece_count=COUNT)
        return self.send(host, msg)


def all_digests(task: str = T1) -> bytes:
    return b"".join(digest(n, task) for n in range(COUNT))


def completed(task: str = T1) -> tuple[Cluster, TaskAttested]:
    """A first scheduler's life: the seed fetches the task, peer pa downloads it from the
    seed and finishes; pa is given the attestation."""
    w = Cluster(grace=0)
    w.seeded_task(task, LENGTH)
    w.pieces("seed", "s1", list(range(1, COUNT)), task=task)
    w.finish("seed", "s1", task)
    w.connect("a")
    w.register("a", "pa", task)
    w.pieces("a", "pa", list(range(COUNT)), parent="s1", task=task)
    (attested,) = of(w.finish("a", "pa", task), TaskAttested, "a")
    return w, attested


def held(attested: TaskAttested, task_id: str = T1, **changes: Any) -> HeldTask:
    h = HeldTask(
        task_id=task_id,
        task=SPECS[task_id],
        content_length=attested.content_length,
        piece_length=attested.piece_length,
        digests=all_digests(task_id),
        private=attested.private,
        etag=attested.etag,
        last_modified=attested.last_modified,
        attestation=attested.attestation,
    )
    return dataclasses.replace(h, **changes)


def test_a_finished_peer_is_given_an_attestation_of_what_the_task_is() -> None:
    w, attested = completed()
    assert (attested.task_id, attested.content_length, attested.piece_length) == (T1, LENGTH, PL)
    assert attested.etag == '"v1"'
    # The seed that finished is attested too; a task with a digest unknown is not.
    assert of(w.sent, TaskAttested, "seed")
    w.connect("b")
    w.register("b", "pb", T2)
    assert decode(encode(attested)) == attested


def test_one_attestation_serves_every_finished_peer_until_the_task_changes() -> None:
    w, first = completed()
    w.connect("b")
    w.register("b", "pb")
    w.pieces("b", "pb", list(range(COUNT)), parent="s1")
    (second,) = of(w.finish("b", "pb"), TaskAttested, "b")
    assert second == first
    # A registration made with credentials makes the task private: what the next
    # finisher is given says so, and still checks.
    w.connect("c")
    w.register("c", "pc", private=True)
    w.pieces("c", "pc", list(range(COUNT)), parent="s1")
    (third,) = of(w.finish("c", "pc"), TaskAttested, "c")
    assert third.private and third.attestation != first.attestation
    assert Attester(RING).check(third.attestation, held(third))
    assert not Attester(RING).check(first.attestation, held(first, private=True))


def test_a_restarted_scheduler_takes_an_attested_holder_without_the_origin() -> None:
    _, attested = completed()
    w = Cluster()  # the restarted scheduler: nothing known
    w.connect("a")
    assert not w.send("a", HeldTasks(tasks=[held(attested)]))
    task = w.s.tasks[T1]
    assert task.state is TaskState.SUCCEEDED and task.content_length == LENGTH
    assert w.s.counters.reannounced == 1
    holder = w.s.peers[f"a/{T1[:16]}"]
    assert holder.state is PeerState.SUCCEEDED and len(holder.finished) == COUNT
    w.connect("seed", seed=True)
    w.connect("b")
    out = w.register("b", "pb")
    (cp,) = of(out, CandidateParents, "b")
    assert parents_of(cp) == [holder.id]
    assert [(d.number, d.digest) for d in cp.digests] == [(n, digest(n)) for n in range(COUNT)]
    assert (cp.content_length, cp.etag) == (LENGTH, '"v1"')
    assert not of(w.sent, TriggerDownload) and not of(w.sent, NeedBackToSource)
    # Announcing it again changes nothing.
    w.send("a", HeldTasks(tasks=[held(attested)]))
    assert w.s.counters.reannounced == 1


@pytest.mark.parametrize(
    "lie",
    [
        dict(digests=b"\x00" * 32 + all_digests()[32:]),  # other bytes
        dict(content_length=LENGTH - 1),  # another layout
        dict(etag='"v2"'),  # another version
        dict(private=True),
        dict(attestation=b""),  # nobody vouches
        dict(attestation=b"\x04abcd" + b"\x00" * 32),  # an unknown key
    ],
)
def test_an_ordinary_peer_cannot_vouch_for_digests_itself(lie: dict[str, Any]) -> None:
    _, attested = completed()
    w = Cluster(grace=0)
    w.connect("a")
    w.send("a", HeldTasks(tasks=[held(attested, **lie)]))
    assert T1 not in w.s.tasks and w.s.counters.reannounced == 0
    # The task starts as if nobody held it: a seed fetches it.
    w.connect("seed", seed=True)
    w.connect("b")
    assert of(w.register("b", "pb"), TriggerDownload, "seed")


def test_another_clusters_attestation_is_not_taken() -> None:
    _, attested = completed()
    w = Cluster()
    w.s.attester = Attester(SecretRing.new("other"))
    w.connect("a")
    w.send("a", HeldTasks(tasks=[held(attested)]))
    assert T1 not in w.s.tasks


def test_an_attested_holder_of_other_bytes_than_the_task_known_is_refused() -> None:
    _, attested = completed()
    w = Cluster(grace=0)
    w.seeded_task(T1, LENGTH)  # piece 0's digest known, from the seed
    w.s.tasks[T1].digests[0] = b"\x01" * 32  # (another version of the file started)
    w.connect("a")
    bad = w.s.counters.bad_reports
    w.send("a", HeldTasks(tasks=[held(attested)]))
    assert w.s.counters.bad_reports == bad + 1 and w.s.counters.reannounced == 0


def test_a_task_whose_spec_was_redacted_is_taken_on_the_attestation_alone() -> None:
    """A signed URL is kept at rest without its signature: the spec no longer makes the
    ID. The attestation ties the ID to the bytes; the next registrant's spec is kept."""
    _, attested = completed()
    w = Cluster()
    w.connect("a")
    w.send("a", HeldTasks(tasks=[held(attested, task=None)]))
    task = w.s.tasks[T1]
    assert task.spec is None and task.state is TaskState.SUCCEEDED
    w.connect("b")
    (cp,) = of(w.register("b", "pb"), CandidateParents, "b")
    assert parents_of(cp) == [f"a/{T1[:16]}"]
    assert task.spec == SPECS[T1]
    # Without an attestation, a spec that does not make the ID is nothing.
    w2 = Cluster(secure=False)
    w2.connect("a")
    w2.send("a", HeldTasks(tasks=[held(attested, task=TaskSpec(url="http://other/"))]))
    assert T1 not in w2.s.tasks and w2.s.counters.bad_reports == 1


def test_a_seed_and_a_cluster_without_identity_are_believed() -> None:
    _, attested = completed()
    for w, host, kw in (
        (Cluster(), "seed", dict(seed=True)),
        (Cluster(secure=False), "a", {}),
    ):
        w.connect(host, **kw)
        w.send(host, HeldTasks(tasks=[held(attested, attestation=b"")]))
        assert w.s.tasks[T1].state is TaskState.SUCCEEDED, host
        assert len(w.s.tasks[T1].digests) == COUNT


def test_the_piece_length_rule_holds_for_held_tasks() -> None:
    w = Cluster(secure=False)
    w.connect("a")
    h = HeldTask(
        task_id=T1,
        task=SPECS[T1],
        content_length=LENGTH,
        piece_length=PL // 2,  # T1's spec names PL
        digests=b"\x00" * 32 * 2 * COUNT,
    )
    w.send("a", HeldTasks(tasks=[h]))
    assert T1 not in w.s.tasks and w.s.counters.bad_reports == 1
    w.send("a", HeldTasks(tasks=[dataclasses.replace(h, piece_length=PL)]))  # digests short
    assert T1 not in w.s.tasks and w.s.counters.bad_reports == 2


def test_within_the_rejoin_grace_a_new_task_waits_for_the_holders() -> None:
    """After a restart the hosts reconnect one by one: a client's registration that
    comes before the holder's re-announcement does not send a seed to the origin."""
    _, attested = completed()
    w = Cluster(grace=3.0)
    w.connect("seed", seed=True)
    w.connect("b")
    assert not of(w.register("b", "pb"), TriggerDownload)
    w.tick(1.0)
    w.connect("a")
    out = w.send("a", HeldTasks(tasks=[held(attested)]))
    (cp,) = of(out, CandidateParents, "b")
    assert parents_of(cp) == [f"a/{T1[:16]}"]
    for _ in range(10):
        w.tick(0.5)
    assert not of(w.sent, TriggerDownload) and not of(w.sent, NeedBackToSource)


def test_when_the_grace_ends_a_task_nobody_holds_gets_its_seed() -> None:
    w = Cluster(grace=3.0)
    w.connect("seed", seed=True)
    w.connect("b")
    w.register("b", "pb")
    w.tick(1.0)
    assert not of(w.sent, TriggerDownload)
    w.tick(2.5)
    assert of(w.sent, TriggerDownload, "seed")
    assert w.s.peers["pb"].attempts <= 1  # the grace cost no attempts


def test_without_rejoining_hosts_there_is_no_grace() -> None:
    w = Cluster(grace=3.0)
    w.connect("seed", seed=True, rejoining=False)
    w.connect("b", rejoining=False)
    assert of(w.register("b", "pb"), TriggerDownload, "seed")


def test_a_download_registering_again_says_what_it_holds() -> None:
    """Ordinary peers' pieces are availability only (their digests are not taken); the
    seed, registering again as it goes on at the origin, sends its metadata and reports
    again, and nothing it says is counted as a lie."""
    w = Cluster(grace=0)
    w.connect("seed", seed=True)
    w.connect("a")
    held_a = [PieceDigest(number=n, digest=digest(n)) for n in (0, 1, 2)]
    w.register("a", "pa", content_length=LENGTH, piece_length=PL, held=held_a)
    assert set(w.s.peers["pa"].finished) == {0, 1, 2}
    assert not w.s.tasks[T1].digests  # not from an ordinary peer
    # The seed, in the middle of its origin fetch.
    held_s = [PieceDigest(number=n, digest=digest(n)) for n in range(5)]
    out = w.register(
        "seed", "s1", content_length=LENGTH, piece_length=PL, held=held_s, need_back_to_source=True
    )
    assert of(out, NeedBackToSource, "seed")
    w.metadata("seed", "s1", LENGTH)
    w.pieces("seed", "s1", list(range(5)))
    assert sorted(w.s.tasks[T1].digests) == list(range(5))
    assert w.s.counters.bad_reports == 0
    # A new peer gets both, and every digest known.
    w.connect("c")
    (cp,) = of(w.register("c", "pc"), CandidateParents, "c")
    assert set(parents_of(cp)) == {"s1", "pa"}
    assert [d.number for d in cp.digests] == list(range(5))


def test_held_pieces_that_contradict_known_digests_are_not_served() -> None:
    w = Cluster(grace=0)
    w.seeded_task(T1, LENGTH)  # piece 0 known
    w.connect("a")
    bad = [PieceDigest(number=0, digest=b"\x02" * 32), PieceDigest(number=1, digest=digest(1))]
    w.register("a", "pa", content_length=LENGTH, piece_length=PL, held=bad)
    assert set(w.s.peers["pa"].finished) == {1}
    assert w.s.counters.bad_reports == 1


def test_insecure_cluster_takes_a_peers_layout_and_digests() -> None:
    w = Cluster(secure=False, grace=0)
    w.connect("a")
    held_a = [PieceDigest(number=n, digest=digest(n)) for n in range(COUNT)]
    w.register("a", "pa", content_length=LENGTH, piece_length=PL, held=held_a)
    task = w.s.tasks[T1]
    assert task.metadata_known and len(task.digests) == COUNT


def test_a_download_registering_elsewhere_waits_for_its_task_s_origin_fetcher() -> None:
    """Failing over to the next scheduler of the ring (which saw no restart): the first
    download to register again does not send itself to the origin while the one that
    was fetching from it is on its way."""
    w = Cluster(secure=False, grace=3.0)
    w.connect("a", rejoining=False)
    w.connect("b", rejoining=False)
    held_a = [PieceDigest(number=n, digest=digest(n)) for n in (0, 1)]
    out = w.register("a", "pa", content_length=LENGTH, piece_length=PL, held=held_a)
    assert not of(out, NeedBackToSource)
    w.tick(1.0)
    out = w.register(
        "b", "pb", content_length=LENGTH, piece_length=PL, held=[], need_back_to_source=True
    )
    assert of(out, NeedBackToSource, "b") and not of(w.sent, NeedBackToSource, "a")
    w.tick(3.0)
    assert not of(w.sent, NeedBackToSource, "a")


def test_a_host_reconnecting_to_a_scheduler_that_did_not_restart_brings_no_grace() -> None:
    w = Cluster(grace=3.0)
    w.connect("seed", seed=True, rejoining=False)
    w.tick(5.0)
    w.connect("a")  # one host's blip, long after the scheduler started
    assert of(w.register("a", "pa"), TriggerDownload, "seed")


def test_a_task_its_host_finished_here_is_not_taken_again_from_its_announcement() -> None:
    """A host that finished the task with this scheduler and then announces it (its
    re-announcement crossing the finish) stays one holder, counted once."""
    w, attested = completed()
    w.send("a", HeldTasks(tasks=[held(attested)]))
    assert w.s.counters.reannounced == 0
    holders = [p for p in w.s.tasks[T1].succeeded.values() if p.host.id == "a"]
    assert [p.id for p in holders] == ["pa"]
