"""The scheduler's back-to-source, leaving, collection and error decisions."""

from __future__ import annotations

from dragonfly.config import SchedulerConfig
from dragonfly.sched.resources import PeerState, TaskState
from dragonfly.sched.scheduler import SchedulerSettings, Send
from dragonfly.wire.codec import Message
from dragonfly.wire.messages import (
    CandidateParents,
    Error,
    ErrorCode,
    LeaveHost,
    LeavePeer,
    NeedBackToSource,
    PeerFailed,
    PeerFinished,
    PieceFailed,
    PiecesFinished,
    Ping,
    RegisterPeer,
    Reschedule,
    TaskFailed,
    TaskSpec,
    TasksRemoved,
    TriggerDownload,
)
from tests.unit.sched_support import (
    PL,
    SPECS,
    T1,
    T2,
    URL,
    World,
    of,
    parents_of,
)

# -- back to source -----------------------------------------------------------------------


def test_back_to_source_count_is_respected() -> None:
    w = World(SchedulerSettings(back_to_source_count=1))
    w.connect("a")
    w.connect("b")
    assert of(w.register("a", "pa"), NeedBackToSource)
    out = w.register("b", "pb", need_back_to_source=True)
    assert not of(out, NeedBackToSource)
    # While pa fetches the metadata, pb waits without using up its retries.
    for _ in range(30):
        assert not of(w.tick(), NeedBackToSource)
    assert w.s.peers["pb"].attempts == 0
    # pa fails (not an origin refusal): pb takes over.
    out = w.send("a", PeerFailed(peer_id="pa", task_id=T1, reason="disk full"))
    assert of(out, NeedBackToSource, "b")
    assert w.s.tasks[T1].back_to_source == {"pb": w.s.peers["pb"]}


def test_no_parent_after_retries_goes_back_to_source() -> None:
    w = World(SchedulerSettings(retry_limit=3, retry_interval=0.5))
    w.seeded_task()
    w.connect("a")
    w.register("a", "pa")
    w.send("a", PieceFailed(peer_id="pa", task_id=T1, number=0, parent_id="s1"))
    assert "pa" in w.s.tasks[T1].waiting
    assert not w.tick(0.5) and not w.tick(0.5)
    (nbts,) = of(w.tick(0.5), NeedBackToSource, "a")
    assert nbts.content_length == 10 * PL and [d.number for d in nbts.digests] == [0]
    assert w.s.peers["pa"].state is PeerState.BACK_TO_SOURCE


def test_no_parent_and_no_back_to_source_fails_after_twice_the_retries() -> None:
    w = World(SchedulerSettings(retry_limit=2, back_to_source_count=0))
    w.seeded_task()  # a seed goes to the origin whatever the count
    w.connect("a")
    w.register("a", "pa", need_back_to_source=True)
    assert w.s.peers["pa"].state is PeerState.RUNNING
    w.send("a", PieceFailed(peer_id="pa", task_id=T1, number=0, parent_id="s1"))
    for _ in range(3):
        assert not w.tick()
    (tf,) = of(w.tick(), TaskFailed, "a")
    assert tf.peer_id == "pa" and tf.http_status == 0 and tf.reason
    assert w.s.peers["pa"].state is PeerState.FAILED
    assert w.s.counters.task_failures == 1


def test_origin_404_fails_every_waiting_and_running_peer() -> None:
    w = World()
    w.connect("seed", seed=True)
    for h in "abc":
        w.connect(h)
    w.register("a", "pa")
    w.register("b", "pb")
    w.register("seed", "s1")
    out = w.send(
        "seed", PeerFailed(peer_id="s1", task_id=T1, reason="404 Not Found", http_status=404)
    )
    failed = {
        (d.host_id, d.message.peer_id, d.message.http_status)
        for d in out
        if isinstance(d.message, TaskFailed)
    }
    assert failed == {("a", "pa", 404), ("b", "pb", 404)}
    assert w.s.tasks[T1].state is TaskState.FAILED
    assert not of(out, NeedBackToSource) and not of(out, TriggerDownload)
    assert {w.s.peers[p].state for p in ("pa", "pb", "s1")} == {PeerState.FAILED}
    # A later request starts afresh: the seed is asked again.
    out = w.register("c", "pc")
    assert of(out, TriggerDownload, "seed")
    assert w.s.tasks[T1].state is TaskState.PENDING and w.s.tasks[T1].generation == 1


def test_a_blobs_origin_failure_is_not_every_registrys_failure() -> None:
    """A digest task is one blob pulled from several registries: the seed's registry
    answering 401 or 404 fails the seed only; the others fetch from their own."""
    w = World()
    w.connect("seed", seed=True)
    w.connect("a")
    blob = TaskSpec(url=URL, digest="sha256:" + "ab" * 32)
    task = blob.task_id
    out = w.register("a", "pa", task, spec=blob)
    (trigger,) = of(out, TriggerDownload, "seed")
    assert trigger.task.digest == blob.digest
    w.register("seed", "s1", task, spec=blob)
    out = w.send("seed", PeerFailed(peer_id="s1", task_id=task, reason="401", http_status=401))
    assert not of(out, TaskFailed)
    assert w.s.tasks[task].state is not TaskState.FAILED
    assert len(of(out, NeedBackToSource, "a")) == 1  # to its own registry


def test_a_restarted_task_goes_to_the_new_registrants_origin() -> None:
    # One task, two signed URLs (signatures are left out of the ID): the first expired.
    old = TaskSpec(url=URL + "?X-Amz-Signature=old")
    new = TaskSpec(url=URL + "?X-Amz-Signature=new")
    task = old.task_id
    assert new.task_id == task
    w = World()
    w.connect("seed", seed=True)
    w.connect("a")
    w.register("a", "pa", task, spec=old, headers={"authorization": "Bearer old"})
    w.register("seed", "s1", task, spec=old)
    w.send("seed", PeerFailed(peer_id="s1", task_id=task, reason="401", http_status=401))
    assert w.s.tasks[task].state is TaskState.FAILED
    out = w.register("a", "pa2", task, spec=new, headers={"authorization": "Bearer new"})
    (trigger,) = of(out, TriggerDownload, "seed")
    assert trigger.task == new and trigger.headers == {"authorization": "Bearer new"}


def test_seed_network_failure_reschedules_and_finds_a_new_source() -> None:
    w = World()
    w.seeded_task()
    w.connect("a")
    w.register("a", "pa")
    out = w.send("seed", PeerFailed(peer_id="s1", task_id=T1, reason="reset"))
    assert not of(out, TaskFailed)
    # The only seed failed this task: the waiting peer goes to the origin itself.
    (nbts,) = of(out, NeedBackToSource, "a")
    assert nbts.content_length == 10 * PL
    assert w.s.tasks[T1].state is TaskState.RUNNING


def test_back_to_source_finish_completes_the_task() -> None:
    w = World()
    w.seeded_task()
    w.connect("a")
    w.register("a", "pa")
    w.send("seed", PeerFinished(peer_id="s1", task_id=T1, content_length=10 * PL, piece_count=10))
    assert w.s.tasks[T1].state is TaskState.SUCCEEDED
    assert w.s.peers["s1"].state is PeerState.SUCCEEDED
    assert "s1" in w.s.peers["pa"].parents  # still serving
    assert w.s.hosts["seed"].active_uploads == 1
    w.send("a", PeerFinished(peer_id="pa", task_id=T1, content_length=10 * PL, piece_count=10))
    assert w.s.hosts["seed"].active_uploads == 0 and w.s.peers["pa"].parents == {}
    # A finished peer is offered to newcomers.
    w.connect("b")
    (cp,) = of(w.register("b", "pb"), CandidateParents)
    assert parents_of(cp)[0] == "pa"


def test_a_peer_whose_only_other_holder_failed_it_goes_to_the_origin() -> None:
    """Its own host's finished peer of the task does not count as a source for it (it is
    never its parent): a host whose store lost the task without a word downloads it again,
    the seed fails it, and after retry_limit retries it fetches from the origin."""
    w = World(SchedulerSettings(retry_limit=3, retry_interval=0.5))
    w.seeded_task()
    w.send("seed", PeerFinished(peer_id="s1", task_id=T1, content_length=10 * PL, piece_count=10))
    w.connect("a")
    w.register("a", "pa")
    w.send("a", PeerFinished(peer_id="pa", task_id=T1, content_length=10 * PL, piece_count=10))
    (cp,) = of(w.register("a", "pa2"), CandidateParents, "a")
    assert parents_of(cp) == ["s1"]
    # The child asks again every second, as the download machine does while stalled.
    out: list[Send] = []
    for _ in range(4):
        out += w.send("a", Reschedule(peer_id="pa2", task_id=T1, blocked_parents=["s1"]))
        out += w.tick(0.5) + w.tick(0.5)
    assert of(out, NeedBackToSource, "a")
    assert w.s.peers["pa2"].state is PeerState.BACK_TO_SOURCE
    w.s.check_invariants()


# -- leaving ------------------------------------------------------------------------------


def test_a_host_that_removed_a_task_is_no_longer_its_parent() -> None:
    """TasksRemoved drops the sender's own finished peers of those tasks, nobody else's;
    a task left without a holder gets the seed again for the next peer."""
    w = World()
    w.seeded_task()
    w.send("seed", PeerFinished(peer_id="s1", task_id=T1, content_length=10 * PL, piece_count=10))
    w.connect("a")
    w.register("a", "pa")
    w.send("a", PeerFinished(peer_id="pa", task_id=T1, content_length=10 * PL, piece_count=10))
    # A host naming a task it holds no peer of, or another host's, changes nothing.
    w.connect("x")
    assert not w.send("x", TasksRemoved(task_ids=[T1, T2]))
    assert {"s1", "pa"} <= set(w.s.peers)
    w.send("a", TasksRemoved(task_ids=[T1]))
    assert "pa" not in w.s.peers and "s1" in w.s.peers
    w.send("seed", TasksRemoved(task_ids=[T1]))
    assert "s1" not in w.s.peers
    w.connect("b")
    out = w.register("b", "pb")
    assert not of(out, CandidateParents, "b")
    (trigger,) = of(out, TriggerDownload, "seed")
    assert trigger.task_id == T1
    w.s.check_invariants()


def test_host_disconnect_releases_children() -> None:
    w = World()
    w.seeded_task()
    for h in "abc":
        w.connect(h)
    w.register("a", "pa")
    w.pieces("a", "pa", [0], parent="s1")
    w.register("b", "pb")
    w.pieces("b", "pb", [0], parent="s1")
    w.register("c", "pc")
    assert set(w.s.peers["pc"].parents) == {"s1", "pa", "pb"}
    assert w.s.hosts["a"].active_uploads == 2  # pb (top-up) and pc
    out = w.disconnect("a")
    assert "pa" not in w.s.peers
    # pc keeps its other parents: no new one to tell it of, so no message.
    assert not of(out, CandidateParents, "c")
    assert set(w.s.peers["pc"].parents) == {"s1", "pb"}
    assert "pa" not in w.s.peers["pb"].parents
    assert w.s.hosts["a"].active_uploads == 0
    w.s.check_invariants()


def test_leave_peer_and_leave_host() -> None:
    w = World()
    w.seeded_task()
    w.connect("a")
    w.connect("b")
    w.register("a", "pa")
    w.pieces("a", "pa", [0], parent="s1")
    w.register("b", "pb")
    out = w.send("a", LeavePeer(peer_id="pa", task_id=T1))
    assert "pa" not in w.s.peers
    assert not of(out, CandidateParents, "b") and list(w.s.peers["pb"].parents) == ["s1"]
    out = w.send("seed", LeaveHost(host_id="seed"))
    assert "seed" not in w.s.hosts and "s1" not in w.s.peers
    # pb has no parent and no seed: it is sent to the origin.
    assert of(out, NeedBackToSource, "b")
    assert of(w.send("b", LeaveHost(host_id="other")), Error)[0].code == ErrorCode.NOT_FOUND
    assert w.disconnect("seed") == []  # already gone


def test_re_registration_starts_afresh() -> None:
    w = World()
    w.seeded_task()
    w.connect("a")
    w.register("a", "pa")
    (cp,) = of(w.register("a", "pa"), CandidateParents)
    assert parents_of(cp) == ["s1"] and w.s.hosts["seed"].active_uploads == 1


# -- collection ---------------------------------------------------------------------------


def test_collection_after_ttls() -> None:
    ttl = SchedulerSettings(peer_ttl=10, task_ttl=20, host_ttl=5, gc_interval=1)
    w = World(ttl)
    w.seeded_task()
    w.connect("a")
    w.connect("b")
    w.register("a", "pa")
    w.send("seed", PeerFinished(peer_id="s1", task_id=T1, content_length=10 * PL, piece_count=10))
    w.register("b", "pb", task=T2)
    w.disconnect("b")
    w.tick(4)
    assert "b" in w.s.hosts
    w.tick(2)
    assert "b" not in w.s.hosts and w.s.counters.collected_hosts == 1
    assert T2 in w.s.tasks
    w.tick(5)  # t = 11: pa has been quiet for 11 s; the finished seed peer is serving
    assert "pa" not in w.s.peers and "s1" in w.s.peers
    w.pieces("seed", "s1", [1])
    w.send("seed", LeavePeer(peer_id="s1", task_id=T1))
    w.tick(19)
    assert T1 in w.s.tasks and T2 not in w.s.tasks
    w.tick(1)
    assert T1 not in w.s.tasks and w.s.counters.collected_tasks == 2
    w.s.check_invariants()


# -- errors -------------------------------------------------------------------------------


def test_unknown_peer_task_or_host_is_an_error_decision() -> None:
    w = World()
    w.seeded_task()
    w.connect("a")
    w.register("a", "pa")
    cases: list[tuple[str, Message]] = [
        ("a", PiecesFinished(peer_id="nobody", task_id=T1)),
        ("a", PeerFinished(peer_id="pa", task_id="other", content_length=0, piece_count=0)),
        ("a", LeavePeer(peer_id="s1", task_id=T1)),  # the seed's peer, not a's
        ("seed", PieceFailed(peer_id="pa", task_id=T1, number=0, parent_id="s1")),
        ("a", RegisterPeer(peer_id="s1", task_id=T1, task=SPECS[T1])),  # taken by another host
        ("ghost", RegisterPeer(peer_id="g", task_id=T1, task=SPECS[T1])),
    ]
    for host, msg in cases:
        (d,) = w.send(host, msg)
        assert d.host_id == host
        assert isinstance(d.message, Error) and d.message.code == ErrorCode.NOT_FOUND
        assert d.message.ref == msg.TAG
    (d,) = w.send("a", Ping(nonce=1))
    assert isinstance(d.message, Error) and d.message.code == ErrorCode.PROTOCOL
    assert w.s.counters.errors == len(cases) + 1
    w.s.check_invariants()


def test_messages_out_of_turn_are_refused_not_raised() -> None:
    w = World()
    w.seeded_task()
    w.connect("a")
    w.register("a", "pa", need_back_to_source=True)
    # A back-to-source peer cannot be rescheduled.
    (d,) = w.send("a", Reschedule(peer_id="pa", task_id=T1))
    assert isinstance(d.message, Error)
    w.send("a", PeerFailed(peer_id="pa", task_id=T1))
    assert not w.send("a", PeerFailed(peer_id="pa", task_id=T1))  # repeated: ignored
    (d,) = w.send("a", PeerFinished(peer_id="pa", task_id=T1, content_length=0, piece_count=0))
    assert isinstance(d.message, Error) and d.message.code == ErrorCode.PROTOCOL


def test_settings_from_config() -> None:
    cfg = SchedulerConfig()
    cfg.scheduling.candidate_parent_limit = 7
    cfg.scheduling.retry_interval = 0.25
    cfg.gc.peer_ttl = 42.0
    cfg.gc.interval = 3.0
    s = SchedulerSettings.from_config(cfg)
    assert (s.candidate_parent_limit, s.retry_interval, s.peer_ttl, s.gc_interval) == (
        7,
        0.25,
        42.0,
        3.0,
    )
    assert (s.filter_parent_limit, s.back_to_source_count, s.retry_limit) == (40, 3, 5)
