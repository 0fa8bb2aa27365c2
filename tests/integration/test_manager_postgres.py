"""Two managers (real processes) on one real PostgreSQL: both serve the same state
(a session from one works on the other), background work runs on one of them at a
time, and when that one is killed mid-way the other keeps serving and takes the
background work over (it marks the dead one's scheduler inactive). Both issue
credentials under the one secret their trust.secret_file names. With a scheduler
connected to each, every job runs once."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from dragonfly.config import SchedulerConfig, load_config
from dragonfly.net.join import join_once
from dragonfly.nursery.scheduler import SchedulerServer
from dragonfly.testing.postgres import Postgres, postgres_bindir
from dragonfly.testing.process import stop_process_group
from dragonfly.testing.trust import LocalIssuer
from dragonfly.trust import Verifier
from dragonfly.wire.messages import AnnounceMember, MemberRegistered
from tests.manager_support import Api, member_channel, metric_value, spawn_manager, wait_healthy

ROOT_PASSWORD = "postgres-root-pass"
FAST = (
    "keepalive.interval=0.2s",
    "keepalive.timeout=1s",
    "gc.lease_ttl=1.5s",
    "database.driver=postgres",
    "auth.jwt_key=" + "k" * 40,
)


@pytest.fixture
def postgres() -> Iterator[Postgres]:
    if postgres_bindir() is None:
        pytest.fail("PostgreSQL is not installed: run `make test`, which installs it")
    with Postgres() as pg:
        yield pg


async def _metrics(api: Api) -> bytes:
    return (await api.call("GET", "/metrics")).raw


async def test_two_managers_one_database(tmp_path: Path, postgres: Postgres) -> None:
    env = {"DRAGONFLY_INITIAL_ROOT_PASSWORD": ROOT_PASSWORD}
    issuer = LocalIssuer(tmp_path / "trust")  # every manager issues under one secret
    sets = (*FAST, f"database.dsn={postgres.dsn()}", f"trust.secret_file={issuer.secret_file}")
    managers: list[tuple[subprocess.Popen[bytes], Api]] = []
    try:
        for name in ("a", "b"):
            process, url = spawn_manager(tmp_path / name, *sets, env=env)
            managers.append((process, Api(url)))
        for process, api in managers:
            await wait_healthy(api, process)
        (_, a), (_, b) = managers

        # one state: written through one, read through the other, one session for both
        root = await a.signin("root", ROOT_PASSWORD)
        made = await a.call("POST", "/api/v1/clusters", {"name": "shared"}, token=root)
        assert made.status == 200
        seen = await b.call("GET", f"/api/v1/clusters/{made.body['id']}", token=root)
        assert seen.status == 200 and seen.body["name"] == "shared"
        assert (
            await b.call("POST", "/api/v1/clusters", {"name": "shared"}, token=root)
        ).status == 409
        assert (await b.call("GET", "/api/v1/users", token=root)).body[0]["name"] == "root"
        # a join token made through one is good at the other, and what it issues verifies
        join = await a.call("POST", "/api/v1/join-tokens/peer", token=root)
        joined = await join_once(b.base, join.body["token"], "peer", "p1", timeout=10)
        claims = joined.credential.claims
        assert Verifier(issuer.ring).host_key(claims, time.time()) == joined.credential.host_key

        # background work on exactly one of them
        for _ in range(200):
            held = [
                metric_value(await _metrics(api), "dragonfly_manager_lease_held")
                for _, api in managers
            ]
            if sum(held) == 1:
                break
            await trio.sleep(0.05)
        else:
            raise AssertionError("no manager took the background-work lease")
        holder = held.index(1.0)
        (ph, h), (po, o) = managers[holder], managers[1 - holder]
        runs_before = metric_value(await _metrics(h), "dragonfly_manager_gc_runs_total")
        for _ in range(200):
            if (
                metric_value(await _metrics(h), "dragonfly_manager_gc_runs_total")
                >= runs_before + 3
            ):
                break
            await trio.sleep(0.05)
        assert metric_value(await _metrics(o), "dragonfly_manager_gc_runs_total") == 0

        # a scheduler registered with the holder, then the holder is killed mid-way
        scheduler = issuer.credential("sched-s", "scheduler")
        async with member_channel(h.base, "scheduler", scheduler) as channel:
            await channel.send(
                AnnounceMember(hostname="s", ip="127.0.0.1", port=8002, cluster_id=1)
            )
            registered = await channel.receive()
            assert isinstance(registered, MemberRegistered)
            path = f"/api/v1/schedulers/{registered.member_id}"
            assert (await o.call("GET", path, token=root)).body["state"] == "active"
            stop_process_group(ph, signal.SIGKILL)

        # the other still serves the same state and takes the background work over
        assert (
            await o.call("GET", f"/api/v1/clusters/{made.body['id']}", token=root)
        ).status == 200
        assert (
            await o.call("POST", "/api/v1/configs", {"name": "after", "value": "kill"}, token=root)
        ).status == 200
        for _ in range(300):
            row = (await o.call("GET", path, token=root)).body
            if row["state"] == "inactive":
                break
            await trio.sleep(0.05)
        else:
            raise AssertionError("the surviving manager never marked the scheduler inactive")
        text = await _metrics(o)
        assert metric_value(text, "dragonfly_manager_lease_held") == 1
        assert metric_value(text, "dragonfly_manager_gc_runs_total") > 0
        assert b'dragonfly_manager_gc_changes_total{change="scheduler_inactive"} 1.0' in text
        stop_process_group(po, signal.SIGTERM)
        assert po.returncode == 0  # a clean stop
    finally:
        for process, api in managers:
            stop_process_group(process)
            await api.aclose()


async def test_each_job_runs_once_with_two_managers(tmp_path: Path, postgres: Postgres) -> None:
    """Both managers have a scheduler of cluster 1 connected (real schedulers, one to
    each): every job part is claimed by one manager and run by one scheduler, once."""
    env = {"DRAGONFLY_INITIAL_ROOT_PASSWORD": ROOT_PASSWORD}
    issuer = LocalIssuer(tmp_path / "trust")  # the managers' secret, the schedulers' too
    sets = (*FAST, f"database.dsn={postgres.dsn()}", f"trust.secret_file={issuer.secret_file}")
    managers: list[tuple[subprocess.Popen[bytes], Api]] = []
    try:
        for name in ("a", "b"):
            process, url = spawn_manager(tmp_path / name, *sets, env=env)
            managers.append((process, Api(url)))
        for process, api in managers:
            await wait_healthy(api, process)
        a = managers[0][1]
        root = await a.signin("root", ROOT_PASSWORD)
        async with trio.open_nursery() as nursery:
            schedulers = []
            for n, (_, api) in enumerate(managers):
                cfg = load_config(
                    "scheduler",
                    env={},
                    overrides=[
                        "server.port=0",
                        f"host.hostname=sched-{n}",
                        f"manager.address={api.base}",
                        *issuer.scheduler_overrides(),
                    ],
                )
                assert isinstance(cfg, SchedulerConfig)
                server = SchedulerServer(cfg)
                await nursery.start(server.run)
                schedulers.append(server)
            for _ in range(200):
                rows = (await a.call("GET", "/api/v1/schedulers", token=root)).body
                if sum(r["state"] == "active" for r in rows) == 2:
                    break
                await trio.sleep(0.05)
            else:
                raise AssertionError("both schedulers never registered")
            ids = []
            for n in range(6):
                api = managers[n % 2][1]
                made = await api.call(
                    "POST",
                    "/api/v1/jobs",
                    {"type": "get_task", "args": {"task_id": f"{n:064x}"}},
                    token=root,
                )
                assert made.status == 200, made.raw
                ids.append(made.body["id"])
            for job_id in ids:
                for _ in range(300):
                    job = (await a.call("GET", f"/api/v1/jobs/{job_id}", token=root)).body
                    if job["state"] != "PENDING":
                        break
                    await trio.sleep(0.05)
                assert job["state"] == "SUCCESS", job
            # a finished part is never claimed again; a running one by one manager only
            assert sum(s.jobs.started for s in schedulers) == len(ids)
            nursery.cancel_scope.cancel()
    finally:
        for process, api in managers:
            stop_process_group(process)
            await api.aclose()
