"""Harbor's P2P preheat provider (src/pkg/p2p/preheat/provider/dragonfly.go, Harbor
2.12 and later), replayed request for request against a manager and a cluster of real
processes, with Debian's docker-registry holding the image:

1. `GET /healthy` with `Authorization: Bearer PAT` (Harbor's "test connection", and its
   check before every preheat): any 2xx;
2. `POST /oapi/v1/jobs` with Harbor's exact body (no omitempty: `tag`, `filtered_query_params`
   empty, `concurrent_count` and `timeout` 0, `scope` empty, the registry's pull token in
   `headers`, `scheduler_cluster_ids` null): a numeric `id`, RFC 3339 times, PENDING;
3. `GET /oapi/v1/jobs/ID` until `state` is SUCCESS (Harbor polls every 10 s; here
   every 0.1 s), reading `result.job_states[].results[].success_tasks[]`.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
import trio

from dragonfly.identity import blob_task_id
from dragonfly.storage.taskfile import task_path
from dragonfly.testing.oci_image import push, write_oci_layout
from dragonfly.testing.registry import Registry
from tests.jobs_support import job_cluster
from tests.p2p_support import MiB

pytestmark = [pytest.mark.registry, pytest.mark.slow, pytest.mark.timeout(300)]

HARBOR_HEADERS = [("content-type", "application/json"), ("accept", "application/json")]


def rfc3339(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


async def test_harbor_preheat_provider_replayed(tmp_path: Path) -> None:
    image = write_oci_layout(tmp_path / "image", total_size=6 * MiB, layers=2, seed=41)
    with Registry(tmp_path / "registry") as registry:
        push(image, registry.address, "library/app")
        async with job_cluster(tmp_path, peers=0) as jc:
            api = jc.api
            pat = await api.add_token(jc.root, ["job"])
            bearer = [("authorization", f"Bearer {pat}")]

            healthy = await api.call("GET", "/healthy", headers=bearer)
            assert 200 <= healthy.status < 300

            # Harbor's body, byte for byte as its json.Marshal writes it
            body = {
                "type": "preheat",
                "args": {
                    "type": "image",
                    "url": f"{registry.url}/v2/library/app/manifests/{image.tag}",
                    "tag": "",
                    "filtered_query_params": "",
                    "headers": {"Authorization": "Bearer harbor-registry-pull-token"},
                    "scope": "",
                    "concurrent_count": 0,
                    "timeout": 0,
                },
                "scheduler_cluster_ids": None,
            }
            made = await api.call(
                "POST",
                "/oapi/v1/jobs",
                raw=json.dumps(body, separators=(",", ":")).encode(),
                headers=[*HARBOR_HEADERS, *bearer],
            )
            assert made.status == 200, made.raw
            job = made.body
            assert isinstance(job["id"], int) and job["state"] == "PENDING"
            rfc3339(job["created_at"]), rfc3339(job["updated_at"])

            state = None
            for _ in range(600):
                polled = await api.call("GET", f"/oapi/v1/jobs/{job['id']}", headers=bearer)
                assert polled.status == 200, polled.raw
                state = polled.body["state"]
                assert state in ("PENDING", "SUCCESS", "FAILURE")  # Harbor fails any other
                if state != "PENDING":
                    break
                await trio.sleep(0.1)
            assert state == "SUCCESS", polled.body
            rfc3339(polled.body["updated_at"])
            tasks = [
                t
                for s in polled.body["result"]["job_states"]
                for r in s["results"]
                for t in r["success_tasks"]
            ]
            assert sorted(t["url"].rsplit("/", 1)[1] for t in tasks) == sorted(
                b.digest for b in image.blobs
            )
            assert all(t["hostname"] and t["ip"] for t in tasks)
            seed = jc.cluster.node("seed-peer-0").info["data_dir"]
            assert all(task_path(seed, blob_task_id(b.digest)).exists() for b in image.blobs)
            # the pull token went with the seed's requests, and is not shown back
            assert "harbor-registry-pull-token" not in polled.raw.decode()
