"""The scheduler's job runner, without sockets: which hosts get which task, concurrency
limits, answers, timeouts, disconnects, and the results the manager gets."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dragonfly.sched.jobs import MANAGER, JobHost, JobRunner
from dragonfly.sched.scheduler import Send, seed_key
from dragonfly.wire.codec import MAX_FRAME, decode, encode
from dragonfly.wire.messages import (
    RESULTS_PER_MESSAGE,
    DeleteTask,
    DownloadTask,
    JobResult,
    JobTask,
    RunJob,
    StatTask,
    TaskAnswer,
    TaskSpec,
)


def task(n: int) -> JobTask:
    spec = TaskSpec(url=f"http://origin/file-{n}")
    return JobTask(task_id=spec.task_id, task=spec, headers={"Authorization": "Basic eA=="})


def runner(seeds: int = 2, peers: int = 4, *, old: int = 0) -> JobRunner:
    r = JobRunner()
    for i in range(seeds):
        r.host_connected(JobHost(f"seed-{i}", f"seed{i}", f"10.0.0.{i + 1}", seed=True))
    for i in range(peers):
        r.host_connected(JobHost(f"peer-{i}", f"peer{i}", f"10.0.1.{i + 1}", seed=False))
    for i in range(old):  # protocol 3: never sent a job
        r.host_connected(JobHost(f"old-{i}", "", f"10.0.2.{i + 1}", seed=False, capable=False))
    return r


def to_hosts(out: list[Send]) -> list[Send]:
    return [s for s in out if s.host_id != MANAGER]


def results(out: list[Send]) -> list[JobResult]:
    found = [s.message for s in out if s.host_id == MANAGER]
    assert all(isinstance(m, JobResult) for m in found)
    return found  # type: ignore[return-value]


def answer_all(r: JobRunner, sent: list[Send], now: float, **kw: object) -> list[Send]:
    out: list[Send] = []
    for s in sent:
        m = s.message
        assert isinstance(m, (DownloadTask, StatTask, DeleteTask))
        out += r.answer(s.host_id, TaskAnswer(ref=m.ref, task_id=m.task_id, **kw), now)  # type: ignore[arg-type]
    return out


def test_single_seed_peer_goes_to_the_seed_the_scheduler_would_trigger() -> None:
    r = runner(seeds=3)
    tasks = [task(i) for i in range(5)]
    out = r.start(RunJob(job_id=1, kind="preheat", tasks=tasks), now=0)
    sent = to_hosts(out)
    assert len(sent) == 5
    for s in sent:
        m = s.message
        assert isinstance(m, DownloadTask)
        seeds = [f"seed-{i}" for i in range(3)]
        assert s.host_id == max(seeds, key=lambda h: seed_key(m.task_id, h))
        assert m.headers == {"Authorization": "Basic eA=="}
    done = results(answer_all(r, sent, 1.0, ok=True, held=True))
    assert len(done) == 1 and done[0].final and not done[0].error
    assert sorted(x.url for x in done[0].results) == sorted(t.task.url for t in tasks)  # type: ignore[union-attr]
    assert all(x.ok and x.seed and x.hostname.startswith("seed") for x in done[0].results)
    assert not r.jobs


def test_all_peers_with_count_and_ips_and_percentage() -> None:
    r = runner(seeds=1, peers=10, old=2)
    out = r.start(RunJob(job_id=7, kind="preheat", tasks=[task(0)], scope="all_peers", count=3), 0)
    hosts = {s.host_id for s in to_hosts(out)}
    assert len(hosts) == 3 and all(h.startswith("peer-") for h in hosts)
    # the same job ID picks the same hosts
    again = JobRunner()
    again.hosts = dict(r.hosts)
    assert {s.host_id for s in to_hosts(again.start(r.jobs[7].msg, 0))} == hosts

    r = runner(seeds=1, peers=10)
    msg = RunJob(job_id=8, kind="preheat", tasks=[task(0)], scope="all_peers", percentage=25)
    assert len(to_hosts(r.start(msg, 0))) == 3  # ceil(10 * 25%)

    r = runner(seeds=1, peers=10)
    msg = RunJob(
        job_id=9,
        kind="preheat",
        tasks=[task(0)],
        scope="all_peers",
        ips=["10.0.1.2", "10.9.9.9"],
        count=5,  # ips win over count
    )
    out = r.start(msg, 0)
    assert [s.host_id for s in to_hosts(out)] == ["peer-1"]
    done = results(answer_all(r, to_hosts(out), 1, ok=True, held=True))[-1]
    by_ip = {x.ip: x for x in done.results}
    assert by_ip["10.0.1.2"].ok
    assert not by_ip["10.9.9.9"].ok and "no host with IP 10.9.9.9" in by_ip["10.9.9.9"].reason


def test_all_seed_peers_and_hosts_of_protocol_3_are_left_out() -> None:
    r = runner(seeds=3, peers=2, old=3)
    out = r.start(RunJob(job_id=1, kind="preheat", tasks=[task(0)], scope="all_seed_peers"), 0)
    assert sorted(s.host_id for s in to_hosts(out)) == ["seed-0", "seed-1", "seed-2"]
    out = r.start(RunJob(job_id=2, kind="get_task", tasks=[JobTask(task_id="t")]), 0)
    assert not any(s.host_id.startswith("old-") for s in to_hosts(out))


def test_no_seed_fails_the_part_with_a_reason() -> None:
    r = runner(seeds=0)
    done = results(r.start(RunJob(job_id=3, kind="preheat", tasks=[task(0)]), 0))
    assert done[0].final and done[0].error == "no seed peer is connected to this scheduler"


def test_concurrency_limits_tasks_and_peers() -> None:
    r = runner(seeds=1, peers=6)
    tasks = [task(i) for i in range(4)]
    msg = RunJob(
        job_id=4,
        kind="preheat",
        tasks=tasks,
        scope="all_peers",
        concurrent_tasks=2,
        concurrent_peers=3,
    )
    now = 0.0
    pending = to_hosts(r.start(msg, now))
    dispatched = len(pending)
    finished = False
    while pending:
        job = r.jobs[4]
        assert len(job.in_flight) <= 2
        assert all(n <= 3 for n in job.in_flight.values())
        assert sum(job.in_flight.values()) == len(pending)
        now += 1
        out = answer_all(r, [pending.pop(0)], now, ok=True, held=True)
        new = to_hosts(out)
        dispatched += len(new)
        pending += new
        finished = bool(results(out))
    assert finished and dispatched == 4 * 6


def test_failures_timeouts_and_disconnects_are_in_the_result() -> None:
    r = runner(seeds=1, peers=3)
    msg = RunJob(job_id=5, kind="preheat", tasks=[task(0)], scope="all_peers", timeout_ms=10_000)
    sent = to_hosts(r.start(msg, 0))
    a, b, c = sent
    assert not results(answer_all(r, [a], 1, ok=False, reason="origin answered HTTP 404"))
    assert not results(r.host_disconnected(b.host_id, 2))
    # an answer from the wrong host, or for a ref never sent, changes nothing
    m = c.message
    assert isinstance(m, DownloadTask)
    assert r.answer(a.host_id, TaskAnswer(ref=m.ref, task_id=m.task_id), 3) == []
    assert r.answer(c.host_id, TaskAnswer(ref=999, task_id=m.task_id), 3) == []
    assert r.tick(9.9) == []
    done = results(r.tick(10.0))
    reasons = {x.host_id: x.reason for x in done[0].results}
    assert reasons == {
        a.host_id: "origin answered HTTP 404",
        b.host_id: "host disconnected",
        c.host_id: "timed out after 10s",
    }
    assert not any(x.ok for x in done[0].results)
    assert r.tick(20.0) == []  # reported once


def test_get_and_delete_report_the_hosts_that_hold_the_task() -> None:
    r = runner(seeds=1, peers=3)
    sent = to_hosts(r.start(RunJob(job_id=6, kind="get_task", tasks=[task(0)]), 0))
    assert {type(s.message) for s in sent} == {StatTask} and len(sent) == 4
    holders = {"peer-0", "seed-0"}
    out: list[Send] = []
    for s in sent:
        m = s.message
        out += r.answer(
            s.host_id,
            TaskAnswer(ref=m.ref, task_id=m.task_id, held=s.host_id in holders),
            1,  # type: ignore[attr-defined]
        )
    done = results(out)[0]
    assert {x.host_id for x in done.results} == holders

    sent = to_hosts(r.start(RunJob(job_id=7, kind="delete_task", tasks=[task(0)]), 2))
    assert {type(s.message) for s in sent} == {DeleteTask}
    out = []
    for s in sent:
        m = s.message
        held = s.host_id in holders
        ok = s.host_id != "seed-0"
        out += r.answer(
            s.host_id,
            TaskAnswer(
                ref=m.ref, task_id=m.task_id, held=held, ok=ok, reason="" if ok else "in use"
            ),  # type: ignore[attr-defined]
            3,
        )
    done = results(out)[0]
    assert {(x.host_id, x.ok) for x in done.results} == {("peer-0", True), ("seed-0", False)}


def test_list_hosts_answers_at_once() -> None:
    r = runner(seeds=1, peers=2, old=1)
    done = results(r.start(RunJob(job_id=8, kind="list_hosts"), 0))
    assert {h.host_id for h in done[0].hosts} == {"seed-0", "peer-0", "peer-1", "old-0"}


def test_a_task_id_that_is_not_its_fields_is_refused() -> None:
    r = runner()
    spec = TaskSpec(url="http://origin/a")
    forged = JobTask(task_id="sha256:" + "0" * 64, task=spec)
    done = results(r.start(RunJob(job_id=9, kind="preheat", tasks=[forged]), 0))
    assert "is not the ID of its fields" in done[0].error
    done = results(r.start(RunJob(job_id=10, kind="preheat", tasks=[JobTask(task_id="x")]), 0))
    assert "a preheat needs the task's URL" in done[0].error


@settings(max_examples=30, deadline=None)
@given(peers=st.integers(0, 30), count=st.integers(0, 200))
def test_many_results_are_split_and_each_message_decodes(peers: int, count: int) -> None:
    r = runner(seeds=1, peers=peers)
    tasks = [task(i) for i in range(3)]
    msg = RunJob(job_id=11, kind="preheat", tasks=tasks, scope="all_peers", count=count)
    first = r.start(msg, 0)
    sent = to_hosts(first)
    done = results(answer_all(r, sent, 1, ok=True, held=True) if sent else first)
    assert done and done[-1].final and all(not m.final for m in done[:-1])
    assert all(len(m.results) <= RESULTS_PER_MESSAGE for m in done)
    for m in done:
        assert decode(encode(m)) == m
    expected = 3 * (min(count, peers) if count else peers)
    assert sum(len(m.results) for m in done) == expected
    assert bool(done[-1].error) == (peers == 0)


def test_results_with_long_urls_are_split_to_fit_their_frames() -> None:
    r = runner(seeds=1, peers=40)
    tasks = []
    for i in range(30):
        spec = TaskSpec(url=f"http://origin/{'x' * 7000}/{i}")
        tasks.append(JobTask(task_id=spec.task_id, task=spec))
    msg = RunJob(job_id=12, kind="preheat", tasks=tasks, scope="all_peers", concurrent_tasks=100)
    done = results(answer_all(r, to_hosts(r.start(msg, 0)), 1, ok=True, held=True))
    assert sum(len(m.results) for m in done) == 30 * 40 and len(done) > 1
    assert all(len(encode(m)) < MAX_FRAME for m in done)
