"""Schedulers and seed peers register with a manager and keep alive over its websocket
(times shortened by config): active on first contact, inactive when the connection
ends or falls silent for three intervals, removed after `keepalive.remove_after`,
active again (same row) when the member comes back. Discovery over the same
websocket picks the cluster by CIDR and IDC."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from dragonfly.config import PeerConfig, SchedulerConfig, load_config
from dragonfly.net.channel import connect
from dragonfly.net.manager_client import websocket_url
from dragonfly.nursery.peer import PeerDaemon
from dragonfly.nursery.scheduler import SchedulerServer
from dragonfly.testing.trust import LocalIssuer
from dragonfly.wire.codec import MIN_PROTOCOL_VERSION, PROTOCOL_VERSION
from dragonfly.wire.messages import (
    AnnounceMember,
    Error,
    Hello,
    ListSchedulers,
    MemberRegistered,
    SchedulerList,
)
from tests.manager_support import (
    Api,
    RunningManager,
    issuer_of,
    member_channel,
    start_manager,
)

FAST = (
    "keepalive.interval=0.2s",
    "keepalive.timeout=0.7s",
    "keepalive.remove_after=1.5s",
    "gc.lease_ttl=1s",
)


async def wait_for(
    api: Api, token: str, path: str, check: Callable[[Any], bool], rounds: int = 200
) -> Any:
    """Poll `path` until `check(body)` holds (bounded: `rounds` × 50 ms)."""
    body = None
    for _ in range(rounds):
        body = (await api.call("GET", path, token=token)).body
        if check(body):
            return body
        await trio.sleep(0.05)
    raise AssertionError(f"{path}: condition never held; last answer {body!r}")


def issuer(manager: RunningManager) -> LocalIssuer:
    """The cluster's secret (the manager's) and credentials made from it."""
    return issuer_of(manager)


def scheduler_config(manager: RunningManager, hostname: str, *extra: str) -> SchedulerConfig:
    cfg = load_config(
        "scheduler",
        env={},
        overrides=[
            "server.port=0",
            *issuer(manager).scheduler_overrides(),
            f"host.hostname={hostname}",
            "host.ip=10.9.9.9",  # what it claims; the manager records where it came from
            f"manager.address={manager.url}",
            *extra,
        ],
    )
    assert isinstance(cfg, SchedulerConfig)
    return cfg


async def run_scheduler(nursery: trio.Nursery, cfg: SchedulerConfig) -> trio.CancelScope:
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await SchedulerServer(cfg).run(task_status=task_status)
            await trio.sleep_forever()

    await nursery.start(run)
    return scope


def hello(role: str) -> Hello:
    return Hello(version=PROTOCOL_VERSION, min_version=MIN_PROTOCOL_VERSION, role=role)


async def test_scheduler_keepalive_stop_restart_and_silence(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        m = await start_manager(nursery, tmp_path / "m", *FAST)
        api, root = m.api, await m.root()
        sched_scope = await run_scheduler(nursery, scheduler_config(m, "sched-a"))
        rows = await wait_for(
            api, root, "/api/v1/schedulers", lambda b: b and b[0]["state"] == "active"
        )
        first = rows[0]
        assert first["host_name"] == "sched-a" and first["features"] == ["schedule", "preheat"]
        assert (first["ip"], first["claimed_ip"]) == ("127.0.0.1", "10.9.9.9")
        assert first["version"] and first["last_keep_alive_at"] > first["created_at"][:19]
        # keepalives keep coming while it runs
        seen = first["last_keep_alive_at"]
        await wait_for(
            api,
            root,
            f"/api/v1/schedulers/{first['id']}",
            lambda b: b["last_keep_alive_at"] != seen and b["state"] == "active",
        )

        # stopped: its connection ends and the row turns inactive
        sched_scope.cancel()
        await wait_for(
            api, root, f"/api/v1/schedulers/{first['id']}", lambda b: b["state"] == "inactive"
        )
        # restarted (another port): the same row, active again
        sched_scope = await run_scheduler(nursery, scheduler_config(m, "sched-a"))
        again = await wait_for(
            api, root, f"/api/v1/schedulers/{first['id']}", lambda b: b["state"] == "active"
        )
        assert again["port"] != first["port"]
        sched_scope.cancel()

        # a member that registers and then falls silent (connection open, no Ping)
        announce = AnnounceMember(hostname="silent", ip="10.0.0.1", port=9, cluster_id=1)
        silent = issuer(m).credential("silent", "scheduler")
        async with member_channel(m.url, "scheduler", silent) as channel:
            await channel.send(announce)
            registered = await channel.receive()
            assert isinstance(registered, MemberRegistered) and registered.keepalive_ms == 200
            path = f"/api/v1/schedulers/{registered.member_id}"
            assert (await api.call("GET", path, token=root)).body["state"] == "active"
            await wait_for(api, root, path, lambda b: b["state"] == "inactive")
            # ...and, inactive for remove_after, removed (the stopped one too)
            for _ in range(200):
                if (await api.call("GET", path, token=root)).status == 404:
                    break
                await trio.sleep(0.05)
            else:
                raise AssertionError("silent member never removed")
        await wait_for(api, root, "/api/v1/schedulers", lambda b: b == [])
        metrics = (await api.call("GET", "/metrics")).raw
        assert b'dragonfly_manager_gc_changes_total{change="scheduler_removed"} 2.0' in metrics
        m.stop()
        nursery.cancel_scope.cancel()


async def test_members_announce_their_host_and_cluster(tmp_path: Path) -> None:
    """What the manager records of a scheduler is what its [host] and [manager] keys say;
    a seed peer registers at scheduler.manager, with its proxy and upload ports, in the
    seed peer cluster its seed.cluster_id names (clusters made here, not the default 1)."""
    async with trio.open_nursery() as nursery:
        m = await start_manager(nursery, tmp_path / "m", *FAST)
        api, root = m.api, await m.root()
        made = await api.call("POST", "/api/v1/clusters", {"name": "own"}, token=root)
        assert made.status == 200, made.raw
        cluster, seed_cluster = made.body["scheduler_cluster_id"], made.body["seed_peer_cluster_id"]
        assert 1 not in (cluster, seed_cluster)
        sched = load_config(
            "scheduler",
            env={},
            overrides=[
                "server.port=0",
                "host.hostname=sched-own",
                "host.ip=10.7.7.7",
                "host.idc=idc-own",
                "host.location=cn|hz|z2",
                f"manager.address={m.url}",
                f"manager.cluster_id={cluster}",
                *issuer(m).scheduler_overrides(),
            ],
        )
        assert isinstance(sched, SchedulerConfig)
        scheduler = SchedulerServer(sched)
        port = await nursery.start(scheduler.run)
        (row,) = await wait_for(
            api, root, "/api/v1/schedulers", lambda b: b and b[0]["state"] == "active"
        )
        assert (row["host_name"], row["ip"], row["claimed_ip"], row["port"]) == (
            "sched-own",
            "127.0.0.1",
            "10.7.7.7",
            port,
        )
        assert (row["idc"], row["location"]) == ("idc-own", "cn|hz|z2")
        assert row["scheduler_cluster_id"] == cluster

        cfg = load_config(
            "seed-peer",
            env={},
            overrides=[
                f"scheduler.addresses=['ws://127.0.0.1:{port}']",
                f"scheduler.manager={m.url}",
                f"seed.cluster_id={seed_cluster}",
                f"storage.data_dir={tmp_path / 'seed'}",
                "proxy.port=0",
                "upload.port=0",
                "host.hostname=seed-own",
                *issuer(m).peer_overrides("seed-own", "seed-peer"),
            ],
        )
        assert isinstance(cfg, PeerConfig)
        daemon = await nursery.start(PeerDaemon(cfg).run)
        (seed,) = await wait_for(
            api, root, "/api/v1/seed-peers", lambda b: b and b[0]["state"] == "active"
        )
        assert (seed["host_name"], seed["seed_peer_cluster_id"]) == ("seed-own", seed_cluster)
        assert (seed["port"], seed["download_port"]) == (daemon.proxy_port, daemon.upload_port)
        m.stop()
        nursery.cancel_scope.cancel()


async def test_discovery_by_cidr_and_idc(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        m = await start_manager(nursery, tmp_path / "m", *FAST)
        api, root = m.api, await m.root()
        idc = await api.call(
            "POST", "/api/v1/clusters", {"name": "by-idc", "scopes": {"idc": "a|hz-1"}}, token=root
        )
        cidr = await api.call(
            "POST",
            "/api/v1/clusters",
            {"name": "by-cidr", "scopes": {"cidrs": ["127.0.0.0/8"]}},
            token=root,
        )
        scopes = {}
        for name, cluster_id in (("default", 1), ("idc", idc.body["id"])):
            cfg = scheduler_config(m, f"sched-{name}", f"manager.cluster_id={cluster_id}")
            scopes[name] = await run_scheduler(nursery, cfg)
        await wait_for(api, root, "/api/v1/schedulers?state=active", lambda b: len(b) == 2)

        async def ask(**query: Any) -> SchedulerList:
            async with connect(websocket_url(m.url), hello("peer")) as channel:
                await channel.send(ListSchedulers(**query))
                answer = await channel.receive()
                assert isinstance(answer, SchedulerList)
                return answer

        assert (await ask(idc="HZ-1")).cluster_id == idc.body["id"]
        nothing = await ask(idc="elsewhere")
        assert nothing.cluster_id == 1 and [s.hostname for s in nothing.schedulers] == [
            "sched-default"
        ]
        # a cluster whose CIDR holds the host's address outranks the IDC match
        scopes["cidr"] = await run_scheduler(
            nursery, scheduler_config(m, "sched-cidr", f"manager.cluster_id={cidr.body['id']}")
        )
        await wait_for(api, root, "/api/v1/schedulers?state=active", lambda b: len(b) == 3)
        best = await ask(idc="hz-1")
        assert best.cluster_id == cidr.body["id"]
        assert [(s.hostname, s.ip) for s in best.schedulers] == [("sched-cidr", "127.0.0.1")]
        asked = await ask(idc="hz-1", cluster_id=idc.body["id"])
        assert [s.hostname for s in asked.schedulers] == ["sched-idc"]
        # a cluster whose schedulers are gone is not offered
        scopes["cidr"].cancel()
        await wait_for(api, root, "/api/v1/schedulers?state=active", lambda b: len(b) == 2)
        assert (await ask(idc="hz-1")).cluster_id == idc.body["id"]
        m.stop()
        nursery.cancel_scope.cancel()


async def test_registration_refusals(tmp_path: Path) -> None:
    """Only a proven credential of role scheduler or seed-peer registers, and only in a
    cluster that exists."""
    async with trio.open_nursery() as nursery:
        m = await start_manager(nursery, tmp_path / "m", *FAST)
        known = AnnounceMember(hostname="x", ip="10.0.0.1", port=9, cluster_id=1)
        scheduler = issuer(m).credential("sched-x", "scheduler")
        async with member_channel(m.url, "scheduler", scheduler) as channel:
            await channel.send(AnnounceMember(hostname="x", ip="10.0.0.1", port=9, cluster_id=42))
            answer = await channel.receive()
            assert isinstance(answer, Error) and "no such cluster" in answer.message
        for role, credential in (
            ("scheduler", None),  # no credential: nothing proven
            ("peer", issuer(m).credential("peer-x", "peer")),  # a peer is no member
        ):
            async with member_channel(m.url, role, credential) as channel:
                await channel.send(known)
                answer = await channel.receive()
                assert isinstance(answer, Error) and answer.code == "forbidden"
                assert "only schedulers and seed peers register" in answer.message
        root = await m.root()
        assert (await m.api.call("GET", "/api/v1/schedulers", token=root)).body == []
        m.stop()
