"""Jobs through a real cluster: a manager, a scheduler registered to it, a seed peer and
peers, each its own process, nginx as the origin.

- a file preheat of two URLs puts both on the seed peer, and a client's download that
  follows comes peer-to-peer (nginx served each file once, to the seed);
- get_task finds a task on the two peers that hold it, delete_task removes it from
  both disks, and get_task then finds it nowhere;
- a preheat of a URL the origin does not have fails with the origin's status;
- download records of the downloads reach the manager, with the traffic by source;
- sync_peers fills the peers table.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from dragonfly.identity import task_id as make_task_id
from dragonfly.testing.nginx import Nginx
from dragonfly.testing.probe import metric, sha256_file
from tests.jobs_support import job_cluster, wait_until
from tests.manager_support import start_manager
from tests.p2p_support import MiB, curl, finish, random_file, task_files

pytestmark = [pytest.mark.nginx, pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture
def origin(tmp_path: Path):  # type: ignore[no-untyped-def]
    root = tmp_path / "www"
    root.mkdir()
    with Nginx(root, tmp_path / "nginx") as nginx:
        yield nginx


async def fetch(proxy: str, url: str, out: Path) -> None:
    code, err = await trio.to_thread.run_sync(lambda: finish(curl(proxy, url, out)))
    assert code == 0, err


async def test_file_preheat_of_two_urls_then_peer_to_peer(tmp_path: Path, origin: Nginx) -> None:
    sizes = {"a.bin": 9 * MiB, "b.bin": 5 * MiB + 7}
    digests = {name: random_file(origin.root / name, size) for name, size in sizes.items()}
    urls = [f"{origin.url}/{name}" for name in sizes]
    async with job_cluster(tmp_path, peers=1) as jc:
        done = await jc.run(
            {
                "type": "preheat",
                "args": {"type": "file", "url": urls[0], "urls": [urls[1]]},
                "scheduler_cluster_ids": [1],
            }
        )
        assert done["state"] == "SUCCESS", done
        (state,) = done["result"]["job_states"]
        assert state["state"] == "SUCCESS" and state["error"] == ""
        (results,) = state["results"]
        assert results["scheduler_cluster_id"] == 1 and results["failure_tasks"] == []
        assert sorted(t["url"] for t in results["success_tasks"]) == sorted(urls)
        assert all(t["hostname"] and t["ip"] == "127.0.0.1" for t in results["success_tasks"])
        seed = jc.cluster.node("seed-peer-0")
        assert len(task_files(seed.info["data_dir"])) == 2
        # the seed fetched each file once (and probed each with one byte)
        preheated = origin.served_bytes()
        assert preheated == sum(sizes.values()) + len(sizes)

        # a client's download now comes from the seed, not from the origin
        peer = jc.cluster.node("peer-0")
        for name, url in zip(sizes, urls, strict=True):
            out = tmp_path / f"got-{name}"
            await fetch(peer.info["proxy"], url, out)
            assert sha256_file(out) == digests[name]
        assert origin.served_bytes() == preheated
        p2p = metric(peer.info["metrics"], "dragonfly_download_bytes_total", 'source="p2p"')
        assert p2p == sum(sizes.values())


async def test_get_task_and_delete_task_on_two_peers(tmp_path: Path, origin: Nginx) -> None:
    random_file(origin.root / "model.bin", 6 * MiB)
    url = f"{origin.url}/model.bin"
    tid = make_task_id(url)
    async with job_cluster(tmp_path, peers=2) as jc:
        for n in range(2):
            node = jc.cluster.node(f"peer-{n}")
            await fetch(node.info["proxy"], url, tmp_path / f"out-{n}")
        peers = [jc.cluster.node(f"peer-{n}") for n in range(2)]
        assert all(task_files(p.info["data_dir"]) for p in peers)

        found = await jc.run({"type": "get_task", "args": {"url": url}})
        assert found["state"] == "SUCCESS", found
        (holders,) = found["result"]["job_states"][0]["results"]
        # both peers hold it, and the seed peer that fetched it for them
        assert len(holders["peers"]) == 3
        assert sorted(p["host_type"] for p in holders["peers"]) == ["normal", "normal", "super"]
        assert {p["task_id"] for p in holders["peers"]} == {tid}
        by_id = await jc.run({"type": "get_task", "args": {"task_id": tid}})
        assert len(by_id["result"]["job_states"][0]["results"][0]["peers"]) == 3

        deleted = await jc.run({"type": "delete_task", "args": {"url": url}})
        assert deleted["state"] == "SUCCESS", deleted
        (outcome,) = deleted["result"]["job_states"][0]["results"]
        assert len(outcome["success_tasks"]) == 3 and outcome["failure_tasks"] == []
        for p in [*peers, jc.cluster.node("seed-peer-0")]:
            assert task_files(p.info["data_dir"]) == [], p.name
        again = await jc.run({"type": "get_task", "args": {"url": url}})
        assert again["result"]["job_states"][0]["results"][0]["peers"] == []


async def test_a_preheat_the_origin_refuses_fails_with_its_status(
    tmp_path: Path, origin: Nginx
) -> None:
    async with job_cluster(tmp_path, peers=0) as jc:
        done = await jc.run(
            {"type": "preheat", "args": {"type": "file", "url": f"{origin.url}/missing.bin"}}
        )
        assert done["state"] == "FAILURE"
        (state,) = done["result"]["job_states"]
        (results,) = state["results"]
        (failure,) = results["failure_tasks"]
        assert "404" in failure["description"] and "404" in state["error"]
        assert results["success_tasks"] == []


async def test_download_records_traffic_and_sync_peers(tmp_path: Path, origin: Nginx) -> None:
    random_file(origin.root / "data.bin", 5 * MiB)
    url = f"{origin.url}/data.bin?X-Amz-Signature=secret-sig"
    async with job_cluster(tmp_path, peers=2) as jc:
        for n in range(2):
            node = jc.cluster.node(f"peer-{n}")
            await fetch(node.info["proxy"], url, tmp_path / f"out-{n}")
        api, root = jc.api, jc.root

        async def records() -> list[dict[str, object]]:
            got = await api.call("GET", "/api/v1/download-records?per_page=50", token=root)
            assert got.status == 200, got.raw
            return got.body if len(got.body) >= 3 else []  # the seed's and both peers'

        found = await wait_until(records, rounds=200)
        assert all("secret-sig" not in str(r["url"]) and "REDACTED" in str(r["url"]) for r in found)
        assert all(r["content_length"] == 5 * MiB and not r["error"] for r in found)
        assert sum(int(r["bytes_source"]) for r in found) == 5 * MiB  # the seed alone
        assert sum(int(r["bytes_p2p"]) for r in found) == 2 * 5 * MiB
        assert any(r["parents"] for r in found)
        traffic = (await api.call("GET", "/api/v1/traffic?scheduler_cluster_id=1", token=root)).body
        assert sum(h["bytes_p2p"] for h in traffic) == 2 * 5 * MiB
        assert sum(h["bytes_source"] for h in traffic) == 5 * MiB
        assert sum(h["downloads"] for h in traffic) == 3

        synced = await api.call("POST", "/api/v1/jobs", {"type": "sync_peers"}, token=root)
        assert synced.status == 200 and synced.body == "OK", synced.raw
        table = (await api.call("GET", "/api/v1/peers?per_page=50", token=root)).body
        assert sorted(p["type"] for p in table) == ["normal", "normal", "super"]
        assert all(p["state"] == "active" and p["git_version"] for p in table)


async def test_a_cluster_without_a_scheduler_fails_after_jobs_dispatch_timeout(
    tmp_path: Path,
) -> None:
    """A scheduler that is down is reported in the result, not waited on forever."""
    async with trio.open_nursery() as nursery:
        m = await start_manager(nursery, tmp_path / "m", "jobs.dispatch_timeout=1s")
        root = await m.root()
        made = await m.api.call(
            "POST",
            "/api/v1/jobs",
            {
                "type": "preheat",
                "args": {"type": "file", "url": "http://origin.example/a"},
                "scheduler_cluster_ids": [1],
            },
            token=root,
        )
        assert made.status == 200 and made.body["state"] == "PENDING", made.raw
        for _ in range(200):
            job = (await m.api.call("GET", f"/api/v1/jobs/{made.body['id']}", token=root)).body
            if job["state"] != "PENDING":
                break
            await trio.sleep(0.05)
        assert job["state"] == "FAILURE"
        (state,) = job["result"]["job_states"]
        assert state["error"] == "no scheduler of cluster 1 is connected to a manager (waited 1s)"
        m.stop()
