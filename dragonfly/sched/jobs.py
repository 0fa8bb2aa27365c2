"""A scheduler's share of the manager's jobs (sans-I/O): which hosts do what, and the
results, from `RunJob` in to `JobResult` out.

- **preheat**: every task on the hosts the scope names — `single_seed_peer` (the seed
  the scheduler itself would trigger for the task: rendezvous hashing), `all_seed_peers`,
  `all_peers` (the ordinary peers; seeds get the task as their first parent) — narrowed
  by `ips`, else `count`, else `percentage`. A host is sent `DownloadTask` and answers
  when it holds the task whole (or why it cannot); at most `concurrent_tasks` tasks and,
  per task, `concurrent_peers` hosts at a time.
- **get_task**: `StatTask` to every host; those that hold the task are the result.
- **delete_task**: `DeleteTask` to every host; those that held it say whether it is gone
  (the shell also drops the task from the scheduler's own state).
- **list_hosts**: the connected hosts, answered at once.

Whatever has no answer by the job's deadline fails with "timed out"; a host that
disconnects fails what it had in hand. Only hosts speaking protocol 4 take part (older
ones do not know these messages). Time is an argument; the shell delivers the Sends.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections import deque
from dataclasses import dataclass, field

from dragonfly.identity import IdentityError
from dragonfly.sched.scheduler import Send, seed_key
from dragonfly.wire.codec import Message
from dragonfly.wire.messages import (
    RESULTS_PER_MESSAGE,
    DeleteTask,
    DownloadTask,
    HostEntry,
    JobHostResult,
    JobResult,
    JobTask,
    RunJob,
    StatTask,
    TaskAnswer,
    batches,
)

MANAGER = ""  # a Send to this "host" goes to the manager (no host ID is empty)


@dataclass(frozen=True, slots=True)
class JobHost:
    """A connected host as jobs see it; `capable`: it speaks protocol 4."""

    host_id: str
    hostname: str
    ip: str
    seed: bool
    capable: bool = True
    upload_port: int = 0
    proxy_port: int = 0
    idc: str = ""
    location: str = ""
    version: str = ""


@dataclass(slots=True)
class _Item:
    """One (task, host) of a job."""

    task: JobTask
    host_id: str
    ref: int = 0


@dataclass
class _Job:
    msg: RunJob
    deadline: float
    queue: deque[_Item] = field(default_factory=deque)
    pending: dict[int, _Item] = field(default_factory=dict)  # ref → item in flight
    results: list[JobHostResult] = field(default_factory=list)
    # per task: hosts in flight; tasks with anything in flight
    in_flight: dict[str, int] = field(default_factory=dict)
    error: str = ""


def _url(task: JobTask) -> str:
    return task.task.url if task.task is not None else ""


class JobRunner:
    def __init__(self) -> None:
        self.hosts: dict[str, JobHost] = {}
        self.jobs: dict[int, _Job] = {}
        self._by_ref: dict[int, int] = {}  # ref → job id
        self._refs = itertools.count(1)
        self.started = 0  # jobs taken (for metrics and tests)

    # ------------------------------------------------------------------ hosts

    def host_connected(self, host: JobHost) -> None:
        self.hosts[host.host_id] = host

    def host_disconnected(self, host_id: str, now: float) -> list[Send]:
        """The host's items in hand fail; its queued items too."""
        out: list[Send] = []
        for job in list(self.jobs.values()):
            for ref, item in list(job.pending.items()):
                if item.host_id != host_id:
                    continue
                if job.msg.kind == "preheat":
                    self._settle(job, ref, ok=False, reason="host disconnected")
                else:  # whether it held the task is unknown: not reported
                    self._drop(job, ref)
            kept = deque(i for i in job.queue if i.host_id != host_id)
            for item in job.queue:
                if item.host_id == host_id:
                    self._fail(job, item, "host disconnected")
            job.queue = kept
        self.hosts.pop(host_id, None)
        for job in list(self.jobs.values()):
            out += self._advance(job, now)
        return out

    # ------------------------------------------------------------------ jobs

    def start(self, msg: RunJob, now: float) -> list[Send]:
        """A job from the manager. A job ID already running is ignored (a manager that
        took a job over sends it again; the first run answers)."""
        if msg.job_id in self.jobs:
            return []
        self.started += 1
        job = _Job(msg, now + msg.timeout_ms / 1000)
        if msg.kind == "list_hosts":
            return self._finish(job, hosts=[_entry(h) for h in self.hosts.values()])
        problem = _check_tasks(msg.tasks, need_spec=msg.kind == "preheat")
        if problem:
            job.error = problem
            return self._finish(job)
        capable = [h for h in self.hosts.values() if h.capable]
        if msg.kind == "preheat":
            if not self._plan_preheat(job, capable):
                return self._finish(job)
        else:
            job.queue.extend(_Item(t, h.host_id) for t in msg.tasks for h in capable)
        self.jobs[msg.job_id] = job
        return self._advance(job, now)

    def _plan_preheat(self, job: _Job, capable: list[JobHost]) -> bool:
        msg = job.msg
        seeds = [h for h in capable if h.seed]
        if msg.scope == "single_seed_peer":
            if not seeds:
                job.error = "no seed peer is connected to this scheduler"
                return False
            for task in msg.tasks:
                best = max(seeds, key=lambda h: seed_key(task.task_id, h.host_id))
                job.queue.append(_Item(task, best.host_id))
            return True
        pool = seeds if msg.scope == "all_seed_peers" else [h for h in capable if not h.seed]
        chosen = self._choose(job, pool)
        if not chosen:
            if not job.results:
                kind = "seed peer" if msg.scope == "all_seed_peers" else "peer"
                job.error = f"no {kind} is connected to this scheduler"
            return bool(job.results)
        job.queue.extend(_Item(t, h.host_id) for t in msg.tasks for h in chosen)
        return True

    def _choose(self, job: _Job, pool: list[JobHost]) -> list[JobHost]:
        """ips over count over percentage; count and percentage take hosts in an order
        of their own per job (spread over jobs, stable within one)."""
        msg = job.msg
        if msg.ips:
            by_ip: dict[str, list[JobHost]] = {}
            for h in pool:
                by_ip.setdefault(h.ip, []).append(h)
            chosen = []
            for ip in dict.fromkeys(msg.ips):
                if ip in by_ip:
                    chosen += by_ip[ip]
                else:
                    for task in msg.tasks:
                        job.results.append(
                            JobHostResult(
                                task_id=task.task_id,
                                host_id=ip or "-",
                                url=_url(task),
                                ip=ip,
                                ok=False,
                                reason=f"no host with IP {ip} is connected to this scheduler",
                            )
                        )
            return chosen

        def order(h: JobHost) -> bytes:
            return hashlib.sha256(f"{msg.job_id}\0{h.host_id}".encode()).digest()

        ranked = sorted(pool, key=order)
        if msg.count:
            return ranked[: msg.count]
        if msg.percentage:
            return ranked[: math.ceil(len(ranked) * msg.percentage / 100)]
        return ranked

    def answer(self, host_id: str, msg: TaskAnswer, now: float) -> list[Send]:
        """A host's answer; one for a ref it was not sent is ignored."""
        job_id = self._by_ref.get(msg.ref)
        job = self.jobs.get(job_id) if job_id is not None else None
        if job is None:
            return []
        item = job.pending.get(msg.ref)
        if item is None or item.host_id != host_id or item.task.task_id != msg.task_id:
            return []
        kind = job.msg.kind
        if kind == "preheat" or msg.held:
            self._settle(job, msg.ref, ok=msg.ok, reason=msg.reason)
        else:
            self._drop(job, msg.ref)
        return self._advance(job, now)

    def tick(self, now: float) -> list[Send]:
        """Jobs past their deadline: what is unanswered fails (get and delete: what
        never answered is left out, with the count in the error)."""
        out: list[Send] = []
        for job in list(self.jobs.values()):
            if now < job.deadline:
                continue
            seconds = job.msg.timeout_ms / 1000
            silent = len(job.pending) + len(job.queue)
            if job.msg.kind == "preheat":
                for ref in list(job.pending):
                    self._settle(job, ref, ok=False, reason=f"timed out after {seconds:g}s")
                for item in job.queue:
                    self._fail(job, item, f"timed out after {seconds:g}s (never started)")
            elif silent:
                job.error = f"{silent} host answers missing after {seconds:g}s"
                for ref in list(job.pending):
                    self._drop(job, ref)
            job.queue.clear()
            out += self._finish(job)
        return out

    def next_deadline(self) -> float | None:
        return min((j.deadline for j in self.jobs.values()), default=None)

    # ------------------------------------------------------------------ internals

    def _advance(self, job: _Job, now: float) -> list[Send]:
        """Send what the concurrency limits allow; finish a job with nothing left."""
        out: list[Send] = []
        msg = job.msg
        if job.queue:
            waiting: deque[_Item] = deque()
            while job.queue:
                item = job.queue.popleft()
                tid = item.task.task_id
                active = job.in_flight.get(tid, 0)
                if (active == 0 and len(job.in_flight) >= msg.concurrent_tasks) or (
                    active >= msg.concurrent_peers
                ):
                    waiting.append(item)
                    continue
                host = self.hosts.get(item.host_id)
                if host is None:
                    self._fail(job, item, "host disconnected")
                    continue
                item.ref = next(self._refs)
                job.pending[item.ref] = item
                self._by_ref[item.ref] = msg.job_id
                job.in_flight[tid] = active + 1
                out.append(Send(item.host_id, self._request(msg.kind, item)))
            job.queue = waiting
        if not job.pending and not job.queue:
            out += self._finish(job)
        return out

    @staticmethod
    def _request(kind: str, item: _Item) -> Message:
        task = item.task
        if kind == "preheat":
            assert task.task is not None
            return DownloadTask(
                ref=item.ref,
                task_id=task.task_id,
                task=task.task,
                headers=dict(task.headers),
                private=task.private,
            )
        if kind == "get_task":
            return StatTask(ref=item.ref, task_id=task.task_id)
        return DeleteTask(ref=item.ref, task_id=task.task_id)

    def _settle(self, job: _Job, ref: int, *, ok: bool, reason: str) -> None:
        item = self._drop(job, ref)
        if item is not None:
            self._report(job, item, ok, reason)

    def _fail(self, job: _Job, item: _Item, reason: str) -> None:
        if job.msg.kind == "preheat":  # (get and delete report holders only)
            self._report(job, item, False, reason)

    def _report(self, job: _Job, item: _Item, ok: bool, reason: str) -> None:
        host = self.hosts.get(item.host_id)
        job.results.append(
            JobHostResult(
                task_id=item.task.task_id,
                host_id=item.host_id,
                url=_url(item.task),
                hostname=host.hostname if host else "",
                ip=host.ip if host else "",
                seed=host.seed if host else False,
                ok=ok,
                reason=reason[:1024],
            )
        )

    def _drop(self, job: _Job, ref: int) -> _Item | None:
        item = job.pending.pop(ref, None)
        self._by_ref.pop(ref, None)
        if item is None:
            return None
        tid = item.task.task_id
        left = job.in_flight.get(tid, 0) - 1
        if left > 0:
            job.in_flight[tid] = left
        else:
            job.in_flight.pop(tid, None)
        return item

    def _finish(self, job: _Job, hosts: list[HostEntry] | None = None) -> list[Send]:
        """The results to the manager, as many messages as they need, the last final."""
        self.jobs.pop(job.msg.job_id, None)
        for ref in list(job.pending):
            self._drop(job, ref)
        result_parts = batches(job.results, _result_size, RESULTS_PER_MESSAGE)
        host_parts = batches(hosts or [], lambda h: 300, RESULTS_PER_MESSAGE)
        chunks = max(1, len(result_parts), len(host_parts))
        return [
            Send(
                MANAGER,
                JobResult(
                    job_id=job.msg.job_id,
                    results=result_parts[i] if i < len(result_parts) else [],
                    hosts=host_parts[i] if i < len(host_parts) else [],
                    error=job.error if i == chunks - 1 else "",
                    final=i == chunks - 1,
                ),
            )
            for i in range(chunks)
        ]


def _result_size(r: JobHostResult) -> int:
    """A result's encoded size, about (CBOR keys and framing, then its strings)."""
    return 120 + len(r.task_id) + len(r.host_id) + len(r.url) + len(r.hostname) + len(r.reason)


def _entry(h: JobHost) -> HostEntry:
    return HostEntry(
        host_id=h.host_id,
        hostname=h.hostname,
        ip=h.ip,
        upload_port=h.upload_port,
        proxy_port=h.proxy_port,
        idc=h.idc,
        location=h.location,
        seed=h.seed,
        version=h.version,
    )


def _check_tasks(tasks: list[JobTask], *, need_spec: bool) -> str:
    """Why the tasks cannot be acted on ("" if they can): an ID must be what its fields
    make, never what the sender says it is; a preheat needs the fields."""
    for task in tasks:
        if task.task is None:
            if need_spec:
                return f"task {task.task_id[:128]}: a preheat needs the task's URL"
            continue
        try:
            made = task.task.task_id
        except IdentityError as exc:
            return f"bad task {task.task.url[:200]}: {exc}"
        if made != task.task_id:
            return f"task ID {task.task_id!r} is not the ID of its fields ({made})"
    return ""
