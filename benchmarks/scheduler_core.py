"""The scheduler benchmark's workload against the sans-I/O core alone, in this process.

`python -m benchmarks scheduler --core` drives `dragonfly.sched.Scheduler` with the same
closed loop as the load processes (benchmarks/scheduler_load.py: hosts register a random
task, report every piece in batches, finish, leave, register again; seed hosts answer
triggers), with no sockets, no trio and no websocket framing, so that its figure is the
core's own: registrations and piece reports per CPU-second spent in the scheduler's calls
(the simulated hosts' own work is not counted). The core has identity as the benchmark's
scheduler has it (a cluster secret: a ticket per parent handed out, a TaskAttested per
finished peer of a protocol-5 host). With `--codec` every message also goes through the
wire codec (the host's messages decoded, the scheduler's encoded), as the shell does; the
difference between the two runs is what the codec costs. `--profile FILE` writes a
cProfile of the run (`python -m pstats FILE`).

The loop is a FIFO of messages: each round hands the scheduler every message queued (as
one receive of the shell does), then the hosts answer what it sent; past
`--registrations` they register no more, and the run ends when every answer is in. The
scheduler's clock is the CPU time it has spent, and `tick` runs every 0.1 s of it, as the
shell's ticker does.
"""

from __future__ import annotations

import cProfile
import hashlib
import itertools
import operator
import random
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from benchmarks.scheduler_wire import SimTask, host_info, make_tasks
from dragonfly.sched import Scheduler, SchedulerSettings, Send
from dragonfly.trust import Attester, SecretRing
from dragonfly.wire.codec import Message, decode, encode
from dragonfly.wire.messages import (
    CandidateParents,
    LeavePeer,
    NeedBackToSource,
    PeerFinished,
    PieceReport,
    PiecesFinished,
    RegisterPeer,
    TaskMetadata,
    TriggerDownload,
)

TICK = 0.1


class CoreLoad:
    """The closed-loop hosts and the scheduler core, in one process."""

    def __init__(
        self,
        *,
        hosts: int,
        seed_hosts: int,
        tasks: int,
        pieces: int,
        batch: int,
        codec: bool,
        seed: int = 1,
        seed_upload_slots: int = 1000,
    ) -> None:
        # The shipped trust.ticket_ttl, and an attester: as a scheduler with a cluster secret.
        settings = SchedulerSettings(ticket_ttl=1800.0)
        self.core = Scheduler(settings, seed=0, attester=Attester(SecretRing.new("bench")))
        self.tasks = make_tasks(tasks, pieces)
        self.by_id = {t.task_id: t for t in self.tasks}
        self.batch = batch
        self.codec = codec
        self.rng = random.Random(seed)
        self.inbox: deque[tuple[str, Message]] = deque()
        self.pending: dict[str, SimTask] = {}  # peer id -> the task it awaits an answer for
        self.seq = 0
        self.stopping = False  # enough registrations: answer what is out, register no more
        self.counts: Counter[str] = Counter()
        self.plain = [host_info(i, False) for i in range(hosts)]
        self.seeds = [host_info(i, True, seed_upload_slots) for i in range(seed_hosts)]
        self.is_seed = {h.host_id: h.seed for h in self.plain + self.seeds}

    # -- what a host sends -------------------------------------------------------------

    def _send(self, host_id: str, msg: Message) -> None:
        self.inbox.append((host_id, msg))

    def register(self, host_id: str, task: SimTask) -> None:
        self.seq += 1
        peer_id = f"{host_id}-{self.seq}"
        self.pending[peer_id] = task
        self._send(host_id, RegisterPeer(peer_id=peer_id, task_id=task.task_id, task=task.spec))
        self.counts["registrations"] += 1

    def _next(self, host_id: str) -> None:
        if not self.stopping:
            self.register(host_id, self.tasks[self.rng.randrange(len(self.tasks))])

    def _report(self, host_id: str, peer_id: str, task: SimTask, parents: list[str]) -> None:
        for first in range(0, task.piece_count, self.batch):
            last = min(first + self.batch, task.piece_count)
            reports = [
                PieceReport(
                    number=n,
                    offset=n * task.piece_length,
                    length=task.piece_length,
                    digest=task.digests[n],
                    parent_id=parents[n % len(parents)],
                    cost_ms=10,
                )
                for n in range(first, last)
            ]
            self._send(
                host_id, PiecesFinished(peer_id=peer_id, task_id=task.task_id, pieces=reports)
            )
            self.counts["pieces"] += last - first
        self._send(
            host_id,
            PeerFinished(
                peer_id=peer_id,
                task_id=task.task_id,
                content_length=task.content_length,
                piece_count=task.piece_count,
            ),
        )

    def answer(self, send: Send) -> None:
        """What the simulated host does with one of the scheduler's messages."""
        host_id, msg = send.host_id, send.message
        kind = type(msg)
        self.counts[kind.__name__] += 1
        if kind is CandidateParents:
            assert isinstance(msg, CandidateParents)
            task = self.pending.pop(msg.peer_id, None)
            if task is None:
                self.counts["parent_updates"] += 1
                return
            parents = [p.peer_id for p in msg.parents] or [""]
            self._report(host_id, msg.peer_id, task, parents)
            self._send(host_id, LeavePeer(peer_id=msg.peer_id, task_id=task.task_id))
            self._next(host_id)
        elif kind is NeedBackToSource:
            assert isinstance(msg, NeedBackToSource)
            task = self.pending.pop(msg.peer_id)
            self._send(
                host_id,
                TaskMetadata(
                    peer_id=msg.peer_id,
                    task_id=task.task_id,
                    content_length=task.content_length,
                    piece_length=task.piece_length,
                    piece_count=task.piece_count,
                    etag=f'"{task.task_id[:16]}"',
                ),
            )
            self._report(host_id, msg.peer_id, task, [""])
            if not self.is_seed[host_id]:
                self._send(host_id, LeavePeer(peer_id=msg.peer_id, task_id=task.task_id))
                self._next(host_id)
        elif kind is TriggerDownload:
            assert isinstance(msg, TriggerDownload)
            self.register(host_id, self.by_id[msg.task_id])

    # -- the run -------------------------------------------------------------------------

    def run(self, registrations: int) -> dict[str, Any]:
        core, clock = self.core, time.process_time
        for h in self.seeds + self.plain:
            # (any 32 bytes: the core makes tickets with it, nobody checks them here)
            core.host_connected(h, 0.0, key=hashlib.sha256(h.host_id.encode()).digest())
        for h in self.plain:
            self._next(h.host_id)
        handle_batch = core.handle_batch
        first = operator.itemgetter(0)
        codec = self.codec
        cpu = 0.0  # the scheduler's own: handling, ticks (and the codec), not the hosts'
        next_tick = TICK
        decisions: list[Send] = []
        while self.inbox:
            self.stopping = self.counts["registrations"] >= registrations
            batch, self.inbox = self.inbox, deque()
            if codec:  # (the hosts' encoding is theirs)
                batch = deque((host_id, encode(msg)) for host_id, msg in batch)  # type: ignore[misc]
            started = clock()
            now = cpu
            if now >= next_tick:
                next_tick = now + TICK
                decisions.extend(core.tick(now))
            # What one host sent in a row is one batch, as one receive of the shell's.
            for host_id, run in itertools.groupby(batch, key=first):
                msgs = [decode(m) if codec else m for _, m in run]  # type: ignore[arg-type]
                decisions.extend(handle_batch(host_id, msgs, now))
            if codec:
                for send in decisions:
                    encode(send.message)
            cpu += clock() - started
            for send in decisions:
                self.answer(send)
            decisions.clear()
        c = self.counts
        done = c["NeedBackToSource"] + c["CandidateParents"] - c["parent_updates"]
        pieces = c["pieces"]  # (sent, and handled: the run ends when nothing is left)
        return {
            "cpu_seconds": cpu,
            "registrations_answered": done,
            "piece_reports": pieces,
            "registrations_per_cpu_second": done / cpu,
            "piece_reports_per_cpu_second": pieces / cpu,
            "messages_out_per_registration": {
                k: round(v / max(done, 1), 2)
                for k, v in sorted(c.items())
                if k[0].isupper() or k == "parent_updates"
            },
            "counters": core.counters.as_dict(),
        }


def run_core(args: Any, report: Callable[[str], None] = print) -> dict[str, Any]:
    load = CoreLoad(
        hosts=args.hosts,
        seed_hosts=args.seed_hosts,
        tasks=args.tasks,
        pieces=args.pieces,
        batch=args.batch,
        codec=args.codec,
        seed=args.seed,
        seed_upload_slots=args.seed_upload_slots,
    )
    if args.profile:
        profiler = cProfile.Profile(time.process_time)
        result = profiler.runcall(load.run, args.registrations)
        profiler.dump_stats(args.profile)
    else:
        result = load.run(args.registrations)
    what = "core + codec" if args.codec else "core alone"
    report(
        f"scheduler {what}: {args.hosts} hosts + {args.seed_hosts} seed hosts, {args.tasks} "
        f"tasks of {args.pieces} pieces (batches of {args.batch})"
    )
    report(
        f"  {result['registrations_answered']} registrations in {result['cpu_seconds']:.2f} "
        f"CPU-s: {result['registrations_per_cpu_second']:,.0f} registrations and "
        f"{result['piece_reports_per_cpu_second']:,.0f} piece reports per CPU-second"
    )
    out = ", ".join(f"{k} {v}" for k, v in result["messages_out_per_registration"].items())
    report(f"  scheduler messages per registration: {out}")
    return result
