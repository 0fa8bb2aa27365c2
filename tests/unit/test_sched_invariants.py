"""The scheduler's determinism and invariants under random event sequences."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dragonfly.metrics import SCHEDULER_CORE_COUNTERS, SchedulerMetrics
from dragonfly.sched.resources import PeerState
from dragonfly.sched.scheduler import SchedulerSettings, Send
from dragonfly.wire.codec import decode, encode
from dragonfly.wire.messages import (
    CandidateParents,
    Error,
    LeaveHost,
    LeavePeer,
    NeedBackToSource,
    PeerFailed,
    PeerFinished,
    PieceFailed,
    PieceReport,
    PiecesFinished,
    Reschedule,
    TaskMetadata,
    TriggerDownload,
)
from tests.unit.sched_support import (
    BAD,
    PL,
    T1,
    T2,
    World,
    digest,
    of,
    tid,
)

# -- determinism and random event sequences -----------------------------------------------


def crowd(seed: int) -> list[Send]:
    """Sixty peers of two tasks, more candidates than filter_parent_limit: sampling matters."""
    w = World(SchedulerSettings(filter_parent_limit=5), seed=seed)
    w.connect("seed", seed=True)
    for t in (T1, T2):
        w.register("seed", f"s-{t}", t)
        w.metadata("seed", f"s-{t}", 10 * PL, t)
        w.pieces("seed", f"s-{t}", [0, 1], task=t)
    for i in range(60):
        t = tid(f"t{i % 2 + 1}")
        w.connect(f"h{i}", idc="x" if i % 3 else "y")
        w.register(f"h{i}", f"p{i}", t)
        w.pieces(f"h{i}", f"p{i}", [0], parent=f"s-{t}", task=t)
        if i % 7 == 0:
            w.disconnect(f"h{i // 2}")
        w.tick(0.1)
    w.s.check_invariants()
    return w.sent


def test_same_events_and_seed_give_the_same_decisions() -> None:
    a, b = crowd(7), crowd(7)
    assert a == b and len(a) > 50
    assert crowd(8) != a  # the seed does steer the sampling
    assert [encode(d.message) for d in a] == [encode(d.message) for d in b]


def test_metrics_are_the_cores_counts() -> None:
    """/metrics shows what the core counted, each decision once (the shell counts none)."""
    w = World(SchedulerSettings(filter_parent_limit=5, peers_per_host=1))
    metrics = SchedulerMetrics(w.s.counters.as_dict)
    w.connect("seed", seed=True)
    w.register("seed", "s1")
    w.metadata("seed", "s1")
    w.pieces("seed", "s1", [0, 1, 2])
    w.connect("a")
    w.register("a", "pa")
    w.register("a", "pa2")  # over peers_per_host: refused
    w.pieces("a", "pa", [0], parent="s1")
    w.send("a", LeavePeer(peer_id="nobody", task_id=T1))  # an Error
    counts = w.s.counters
    assert (counts.registrations, counts.piece_reports, counts.refused_registrations) == (2, 4, 1)
    text = metrics.render().decode()
    values = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("dragonfly_scheduler_")
    }
    for name, _, key in SCHEDULER_CORE_COUNTERS:
        assert values[f"{name}_total"] == getattr(counts, key), name
    assert values['dragonfly_scheduler_refusals_total{reason="bounds"}'] == 1
    assert values["dragonfly_scheduler_schedule_decisions_total"] == len(
        of(w.sent, CandidateParents)
    )
    assert values["dragonfly_scheduler_errors_total"] == len(of(w.sent, Error)) == 1
    metrics.refusals["proof"] += 1  # the shell's own: refused at the handshake
    assert 'dragonfly_scheduler_refusals_total{reason="proof"} 1.0' in metrics.render().decode()


N_HOSTS = 8  # hosts 0 and 1 are seeds
REGISTER = st.tuples(
    st.just("register"), st.integers(0, N_HOSTS - 1), st.integers(0, 1), st.booleans()
)
PIECES = st.tuples(
    st.just("pieces"),
    st.integers(0, 40),
    st.lists(st.integers(0, 5), max_size=3),
    st.integers(-1, 40),
    st.booleans(),
)
OPS = st.one_of(
    REGISTER,
    REGISTER,
    PIECES,
    PIECES,
    st.tuples(st.just("connect"), st.integers(0, N_HOSTS - 1)),
    st.tuples(st.just("disconnect"), st.integers(0, N_HOSTS - 1)),
    st.tuples(st.just("register"), st.integers(0, N_HOSTS - 1), st.integers(0, 1), st.booleans()),
    st.tuples(st.just("triggered"), st.integers(0, 5)),
    st.tuples(st.just("metadata"), st.integers(0, 40), st.sampled_from([0, 50, 1000, 3500, -1])),
    st.tuples(
        st.just("pieces"),
        st.integers(0, 40),
        st.lists(st.integers(0, 5), max_size=3),
        st.integers(-1, 40),
        st.booleans(),
    ),
    st.tuples(st.just("piece_failed"), st.integers(0, 40), st.integers(-1, 40)),
    st.tuples(st.just("reschedule"), st.integers(0, 40), st.lists(st.integers(0, 40), max_size=3)),
    st.tuples(st.just("finished"), st.integers(0, 40)),
    st.tuples(st.just("failed"), st.integers(0, 40), st.sampled_from([0, 0, 404])),
    st.tuples(st.just("leave_peer"), st.integers(0, 40)),
    st.tuples(st.just("leave_host"), st.integers(0, N_HOSTS - 1)),
    st.tuples(st.just("tick"), st.sampled_from([0.1, 0.5, 2.0, 50.0])),
    st.tuples(st.just("wrong_host"), st.integers(0, 40), st.integers(0, N_HOSTS - 1)),
)


LENGTHS = {tid("t0"): 3500, T1: 0}


def run_ops(ops: list[tuple[Any, ...]], seed: int, react: bool) -> tuple[World, list[Send]]:
    limit = 3
    w = World(
        SchedulerSettings(
            candidate_parent_limit=limit,
            filter_parent_limit=4,
            back_to_source_count=1,
            retry_limit=2,
            retry_interval=0.5,
            peer_ttl=30,
            task_ttl=60,
            host_ttl=20,
            gc_interval=5,
        ),
        seed=seed,
    )
    hosts = [f"h{i}" for i in range(N_HOSTS)]
    for i, h in enumerate(hosts):
        w.connect(h, seed=i < 2, idc="a" if i % 2 else "b", upload_limit=3)
    peers: list[tuple[str, str, str]] = []  # every peer ever registered: (peer, host, task)
    triggers: list[tuple[str, str]] = []

    def ref(i: int) -> tuple[str, str, str]:
        return peers[i % len(peers)] if peers else ("nobody", hosts[0], "t0")

    for op in ops:
        kind = op[0]
        before = len(w.sent)
        if kind == "connect":
            w.connect(hosts[op[1]], seed=op[1] < 2, upload_limit=3)
        elif kind == "disconnect":
            w.disconnect(hosts[op[1]])
        elif kind == "register":
            pid = f"p{len(peers)}"
            peers.append((pid, hosts[op[1]], tid(f"t{op[2]}")))
            w.register(hosts[op[1]], pid, tid(f"t{op[2]}"), need_back_to_source=op[3])
        elif kind == "triggered" and triggers:
            host, task = triggers.pop(op[1] % len(triggers))
            pid = f"p{len(peers)}"
            peers.append((pid, host, task))
            w.register(host, pid, task)
        elif kind == "metadata":
            pid, host, task = ref(op[1])
            length = op[2]
            count = -1 if length < 0 else -(-length // PL)
            w.send(
                host,
                TaskMetadata(
                    peer_id=pid,
                    task_id=task,
                    content_length=length,
                    piece_length=PL,
                    piece_count=count,
                ),
            )
        elif kind == "pieces":
            pid, host, task = ref(op[1])
            parent = "" if op[3] < 0 else ref(op[3])[0]
            reports = [
                PieceReport(
                    number=n,
                    offset=n * PL,
                    length=PL,
                    digest=BAD if op[4] and n == 0 else digest(n, task),
                    parent_id=parent,
                )
                for n in op[2]
            ]
            w.send(host, PiecesFinished(peer_id=pid, task_id=task, pieces=reports))
        elif kind == "piece_failed":
            pid, host, task = ref(op[1])
            parent = "" if op[2] < 0 else ref(op[2])[0]
            w.send(host, PieceFailed(peer_id=pid, task_id=task, number=0, parent_id=parent))
        elif kind == "reschedule":
            pid, host, task = ref(op[1])
            w.send(
                host,
                Reschedule(peer_id=pid, task_id=task, blocked_parents=[ref(i)[0] for i in op[2]]),
            )
        elif kind == "finished":
            pid, host, task = ref(op[1])
            w.send(
                host, PeerFinished(peer_id=pid, task_id=task, content_length=1000, piece_count=1)
            )
        elif kind == "failed":
            pid, host, task = ref(op[1])
            w.send(host, PeerFailed(peer_id=pid, task_id=task, http_status=op[2]))
        elif kind == "leave_peer":
            pid, host, task = ref(op[1])
            w.send(host, LeavePeer(peer_id=pid, task_id=task))
        elif kind == "leave_host":
            w.send(hosts[op[1]], LeaveHost(host_id=hosts[op[1]]))
        elif kind == "tick":
            w.tick(op[1])
        elif kind == "wrong_host":
            pid, _, task = ref(op[1])
            w.send(hosts[op[2]], LeavePeer(peer_id=pid, task_id=task))
        # Behave like real peers most of the time: a triggered seed registers, a peer sent
        # to the origin reports the metadata and its first pieces.
        seen = before
        while seen < len(w.sent) and len(w.sent) < before + 500:
            d = w.sent[seen]
            seen += 1
            msg = d.message
            if isinstance(msg, TriggerDownload):
                if react:
                    pid = f"p{len(peers)}"
                    peers.append((pid, d.host_id, msg.task_id))
                    w.register(d.host_id, pid, msg.task_id)
                else:
                    triggers.append((d.host_id, msg.task_id))
            elif isinstance(msg, NeedBackToSource) and react:
                length = LENGTHS[msg.task_id]
                w.send(
                    d.host_id,
                    TaskMetadata(
                        peer_id=msg.peer_id,
                        task_id=msg.task_id,
                        content_length=length,
                        piece_length=PL,
                        piece_count=-(-length // PL),
                    ),
                )
                if length:
                    w.pieces(d.host_id, msg.peer_id, [0, 1], task=msg.task_id)
        check(w, w.sent[before:], limit)
    return w, w.sent


def check(w: World, new: list[Send], limit: int) -> None:
    s = w.s
    s.check_invariants()  # acyclic, edges symmetric, load = edges, indexes consistent
    for p in s.peers.values():
        assert len(p.parents) <= limit
        assert all(q.task is p.task and q is not p for q in p.parents.values())
    for d in new:
        msg = d.message
        assert decode(encode(msg)) == msg
        if isinstance(msg, CandidateParents):
            assert len(msg.parents) <= limit
            child = s.peers.get(msg.peer_id)
            if child is None:
                continue  # answered, then left within the same step
            assert child.host.id == d.host_id and child.state is PeerState.RUNNING
            for info in msg.parents:
                parent = s.peers[info.peer_id]
                assert parent.task is child.task and parent.host is not child.host
                assert info.peer_id not in child.blocklist


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(OPS, min_size=20, max_size=80), st.integers(0, 3), st.booleans())
def test_random_event_sequences_keep_invariants(
    ops: list[tuple[Any, ...]], seed: int, react: bool
) -> None:
    _, first = run_ops(ops, seed, react)
    _, second = run_ops(ops, seed, react)
    assert first == second  # deterministic for a seed
