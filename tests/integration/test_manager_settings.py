"""A cluster's settings, changed through the manager's API, reach a running scheduler
(within a keepalive interval) and running peers (within scheduler.refresh_interval),
without a restart: parent limits, hosts' load limits, block lists. A blocked download is
refused at the proxy with 403 naming the rule, by the scheduler for a peer that has not
heard yet, and by `dragonfly get`. The peers table follows what the schedulers report."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import trio

from dragonfly.testing.nginx import Nginx
from tests.manager_support import (
    RunningManager,
    join_token_file,
    member_config,
    start_manager,
    start_peer,
    start_scheduler,
    until,
)
from tests.p2p_support import curl_response, random_file, sha256_file

FAST = ("keepalive.interval=0.2s", "keepalive.timeout=0.7s", "gc.lease_ttl=1s")
ROOT = Path(__file__).resolve().parents[2]
BLOCKED = {
    "task": {
        "download": {
            "applications": ["batch"],
            "tags": ["nightly"],
            "urls": [r"/secret-[0-9]+\.bin$"],
            "priorities": [3],
        }
    }
}


async def _fetch(proxy: str, url: str, out: Path, *headers: str) -> tuple[int, bytes]:
    args = ["-x", proxy, "-o", str(out)]
    for h in headers:
        args += ["-H", h]
    status, _, _ = await trio.to_thread.run_sync(lambda: curl_response(url, *args))
    if status == 0:  # (curl -o leaves the body in the file: an error answer, too)
        return 0, b""
    return status, await trio.Path(out).read_bytes()


async def _members(m: RunningManager, root: str, tmp_path: Path) -> dict[str, Path]:
    return {
        role: await join_token_file(m, root, role, tmp_path / "tokens")
        for role in ("scheduler", "seed-peer", "peer")
    }


async def test_a_config_change_reaches_a_running_scheduler_and_peer(
    tmp_path: Path, www: Path, nginx: Nginx
) -> None:
    want = random_file(www / "f.bin", 3 << 20)
    random_file(www / "secret-1.bin", 1000)
    url = f"{nginx.url}/f.bin"
    async with trio.open_nursery() as nursery:
        m = await start_manager(nursery, tmp_path / "m", *FAST)
        root = await m.root()
        tokens = await _members(m, root, tmp_path)
        scheduler, _ = await start_scheduler(
            nursery, member_config(m, "scheduler", tokens["scheduler"])
        )
        await until(lambda: scheduler.cluster_config is not None, "the scheduler's settings")
        assert scheduler.core.settings.candidate_parent_limit == 3  # cluster-1's, not the file's
        seed, _ = await start_peer(
            nursery,
            member_config(
                m, "seed-peer", tokens["seed-peer"], f"storage.data_dir={tmp_path / 'seed'}"
            ),
        )
        peer, _ = await start_peer(
            nursery,
            member_config(
                m,
                "peer",
                tokens["peer"],
                f"storage.data_dir={tmp_path / 'peer'}",
                "scheduler.refresh_interval=0.5s",
                "upload.children_limit=100",
            ),
        )
        # a peer that asks the manager once an hour: it does not hear of the change
        slow, _ = await start_peer(
            nursery,
            member_config(
                m,
                "peer",
                tokens["peer"],
                f"storage.data_dir={tmp_path / 'slow'}",
                "scheduler.refresh_interval=3600s",
            ),
        )
        await until(lambda: peer.healthy and slow.healthy and seed.healthy, "peers ready")
        proxy = f"http://127.0.0.1:{peer.proxy_port}"
        before = await _fetch(proxy, url, tmp_path / "a", "X-Dragonfly-Application: batch")
        assert before[0] == 200 and sha256_file(tmp_path / "a") == want

        change = {
            "scheduler_cluster_config": {"candidate_parent_limit": 2, "filter_parent_limit": 12},
            "peer_cluster_config": {"load_limit": 7, "block_list": BLOCKED},
            "seed_peer_cluster_config": {"load_limit": 9},
        }
        reply = await m.api.call("PATCH", "/api/v1/clusters/1", change, token=root)
        assert reply.status == 200, reply.raw

        # the scheduler: parent limits, and each host held to its cluster's load limit
        await until(
            lambda: scheduler.core.settings.candidate_parent_limit == 2, "the scheduler's limits"
        )
        settings = scheduler.core.settings
        assert settings.filter_parent_limit == 12
        hosts = scheduler.core.hosts
        assert hosts[peer.host.host_id].info.upload_limit == 7  # it said 100
        assert hosts[seed.host.host_id].info.upload_limit == 9
        announced = {h.host_id: h.upload_limit for h in scheduler.reported_hosts()}
        assert announced[peer.host.host_id] == 100  # (what the manager's peers table shows)

        # the peer: its block list at its next refresh
        await until(lambda: not peer.block_list.empty, "the peer's block list")
        assert slow.block_list.empty
        for header, rule in (
            ("X-Dragonfly-Application: batch", "application 'batch'"),
            ("X-Dragonfly-Tag: nightly", "tag 'nightly'"),
            ("X-Dragonfly-Priority: 3", "priority 3"),
        ):
            status, body = await _fetch(proxy, url, tmp_path / "b", header)
            assert status == 403 and f"block list: {rule}".encode() in body, (header, body)
        status, body = await _fetch(proxy, f"{nginx.url}/secret-1.bin", tmp_path / "b")
        assert status == 403 and b"URL regex" in body
        assert (await _fetch(proxy, url, tmp_path / "c"))[0] == 200  # the rest goes on

        # the slow peer has not heard: the scheduler refuses its registration itself
        slow_proxy = f"http://127.0.0.1:{slow.proxy_port}"
        status, body = await _fetch(
            slow_proxy, f"{url}?other", tmp_path / "d", "X-Dragonfly-Application: batch"
        )
        assert status == 403 and b"blocked by cluster 1's block list: application" in body

        # `dragonfly get` through the peer's local API
        get = await trio.run_process(
            [
                sys.executable, "-m", "dragonfly", "get", url, "-O", str(tmp_path / "got"),
                "--peer", str(tmp_path / "peer"), "--tag", "nightly",
            ],
            capture_stderr=True, check=False, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        assert get.returncode == 1 and b"block list: tag 'nightly'" in get.stderr, get.stderr
        assert not (tmp_path / "got").exists()

        # and back: nothing blocked, within the refresh interval
        await m.api.call(
            "PATCH", "/api/v1/clusters/1", {"peer_cluster_config": {"load_limit": 7}}, token=root
        )
        await until(lambda: peer.block_list.empty, "the block list lifted")
        after = await _fetch(proxy, url, tmp_path / "e", "X-Dragonfly-Application: batch")
        assert after[0] == 200 and sha256_file(tmp_path / "e") == want
        nursery.cancel_scope.cancel()


async def _peers_table(m: RunningManager, root: str) -> dict[str, Any]:
    body = (await m.api.call("GET", "/api/v1/peers?per_page=100", token=root)).body
    return {row["host_id"]: row for row in body or []}


async def _start_peers(
    nursery: trio.Nursery, m: RunningManager, token: Path, tmp_path: Path, names: list[str]
) -> dict[str, tuple[Any, trio.CancelScope]]:
    started = {}
    for name in names:
        cfg = member_config(
            m, "peer", token, f"storage.data_dir={tmp_path / name}", f"host.hostname={name}",
            "host.idc=idc-9",
        )  # fmt: skip
        started[name] = await start_peer(nursery, cfg)
    return started


async def test_the_peers_table_is_what_the_schedulers_report(tmp_path: Path) -> None:
    """A scheduler reports its hosts when they come and go, and when asked (POST
    /api/v1/peers/sync) besides every peers.report_interval: /api/v1/peers lists them
    with their state, version, addresses and cluster."""
    async with trio.open_nursery() as nursery:
        m = await start_manager(
            nursery, tmp_path / "m", *FAST, "peers.report_interval=1h", "peers.timeout=2h"
        )
        root = await m.root()
        tokens = await _members(m, root, tmp_path)
        scheduler, _ = await start_scheduler(
            nursery, member_config(m, "scheduler", tokens["scheduler"])
        )
        started = await _start_peers(nursery, m, tokens["peer"], tmp_path, ["p1", "p2"])
        ids = {name: daemon.host.host_id for name, (daemon, _) in started.items()}

        async def listed() -> dict[str, Any] | None:
            rows = await _peers_table(m, root)
            ok = all(rows.get(h, {}).get("state") == "active" for h in ids.values())
            return rows if ok else None

        rows = await until(listed, "both peers listed active")
        one, p1 = rows[ids["p1"]], started["p1"][0]
        assert (one["host_name"], one["ip"], one["idc"], one["type"]) == (
            "p1",
            "127.0.0.1",
            "idc-9",
            "normal",
        )
        assert (one["git_version"], one["scheduler_cluster_id"]) == (p1.host.version, 1)
        assert (one["proxy_port"], one["download_port"]) == (p1.proxy_port, p1.upload_port)
        member = scheduler.manager
        assert member is not None
        await trio.sleep(0.5)  # (the burst of connections is reported)
        reports = member.reports
        assert (await m.api.call("POST", "/api/v1/peers/sync", token=root)).status == 200
        await until(lambda: member.reports > reports, "a report on demand")
        m.stop()
        nursery.cancel_scope.cancel()


async def test_a_peer_no_scheduler_reports_turns_inactive_then_goes(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        m = await start_manager(
            nursery,
            tmp_path / "m",
            *FAST,
            "peers.report_interval=0.3s",
            "peers.timeout=1s",
            "peers.remove_after=1s",
        )
        root = await m.root()
        tokens = await _members(m, root, tmp_path)
        scheduler, _ = await start_scheduler(
            nursery, member_config(m, "scheduler", tokens["scheduler"])
        )
        started = await _start_peers(nursery, m, tokens["peer"], tmp_path, ["p1", "p2"])
        gone, stays = (started[n][0].host.host_id for n in ("p1", "p2"))
        await until(lambda: _has(m, root, gone, "active"), "p1 listed")
        started["p1"][1].cancel()
        await until(lambda: gone not in scheduler.hosts, "p1 gone from the scheduler")
        await until(lambda: _has(m, root, gone, "inactive"), "p1 inactive", rounds=200)
        await until(lambda: _missing(m, root, gone), "p1 removed", rounds=200)
        assert await _has(m, root, stays, "active")  # still reported, still there
        m.stop()
        nursery.cancel_scope.cancel()


async def _has(m: RunningManager, root: str, host_id: str, state: str) -> bool:
    return (await _peers_table(m, root)).get(host_id, {}).get("state") == state


async def _missing(m: RunningManager, root: str, host_id: str) -> bool:
    return host_id not in await _peers_table(m, root)
