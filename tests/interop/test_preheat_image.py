"""Image preheat through the manager with real parts: Debian's docker-registry behind
htpasswd auth holding a synthetic multi-platform image (an OCI index over linux/amd64
and linux/arm64, pushed with skopeo), a cluster of real processes registered to the
manager, and a containerd of the test's own pulling through a peer afterwards.

- scope single_seed_peer: the seed holds every blob of this machine's platform and no
  layer of the other (get_image_distribution says so too); `ctr content fetch` through
  a peer then gets every layer
  peer-to-peer, and the registry serves no layer bytes again (from its log: at most
  the mirror's proof read per blob);
- scope all_peers with count 1: one of two peers holds the image; the other pulls it
  peer-to-peer, the registry serving no layer bytes again;
- a missing tag fails with the registry's own reason.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dragonfly.identity import blob_task_id
from dragonfly.peer.registry import PROOF_BYTES
from dragonfly.storage.taskfile import task_path
from dragonfly.testing.containerd import Containerd, write_hosts_toml
from dragonfly.testing.oci_image import MultiPlatformImage, push_all, write_multi_platform_layout
from dragonfly.testing.probe import metric
from dragonfly.testing.registry import Registry
from dragonfly.wire.oci import go_arch
from tests.jobs_support import JobCluster, job_cluster
from tests.p2p_support import MiB

pytestmark = [pytest.mark.registry, pytest.mark.slow, pytest.mark.timeout(600)]

USER, PASSWORD = "alice", "s3cret-pass"
HERE = f"linux/{go_arch()}"
OTHER = "linux/arm64" if go_arch() != "arm64" else "linux/amd64"


def holds(data_dir: str, digest: str) -> bool:
    """The blob is on that host's disk (its task, whose ID the digest makes)."""
    return task_path(data_dir, blob_task_id(digest)).exists()


def layer_bytes_served(registry: Registry, image: MultiPlatformImage) -> dict[str, int]:
    served = registry.served_blob_bytes()
    return {b.digest: served.get(b.digest, 0) for b in image.images[HERE].blobs}


async def preheat(jc: JobCluster, registry: Registry, name: str, **more: object) -> dict:  # type: ignore[type-arg]
    args = {
        "type": "image",
        "url": f"{registry.url}/v2/{name}/manifests/latest",
        "username": USER,
        "password": PASSWORD,
        **more,
    }
    return await jc.run({"type": "preheat", "args": args, "scheduler_cluster_ids": [1]})


def pull(containerd: Containerd, registry: Registry, ref: str, proxy: str, hosts: Path) -> None:
    write_hosts_toml(hosts, registry.address, proxy)
    containerd.fetch(ref, hosts, user=f"{USER}:{PASSWORD}", timeout=180)


async def test_image_preheat_then_pull_peer_to_peer(tmp_path: Path) -> None:
    first = write_multi_platform_layout(tmp_path / "one", total_size=10 * MiB, seed=21)
    second = write_multi_platform_layout(tmp_path / "two", total_size=10 * MiB, seed=22)
    with Registry(tmp_path / "registry", auth=(USER, PASSWORD)) as registry:
        ref_one = push_all(first, registry.address, "multi/one", creds=registry.creds)
        ref_two = push_all(second, registry.address, "multi/two", creds=registry.creds)
        async with job_cluster(tmp_path, peers=2, extra=registry.mirror_options()) as jc:
            seed = jc.cluster.node("seed-peer-0").info["data_dir"]

            # single_seed_peer (the default), the platform named
            done = await preheat(jc, registry, "multi/one", platform=HERE)
            assert done["state"] == "SUCCESS", done
            (results,) = done["result"]["job_states"][0]["results"]
            wanted = first.images[HERE]
            assert sorted(t["task_id"] for t in results["success_tasks"]) == sorted(
                blob_task_id(b.digest) for b in wanted.blobs
            )
            assert all(t["url"].startswith(registry.url) for t in results["success_tasks"])
            assert all(holds(seed, b.digest) for b in wanted.blobs)
            assert not any(holds(seed, b.digest) for b in first.images[OTHER].layers)
            assert done["args"]["password"] == "" and "s3cret" not in str(done)

            # which hosts hold which layers: the seed, every layer of this platform
            reply = await jc.api.call(
                "POST",
                "/api/v1/jobs",
                {
                    "type": "get_image_distribution",
                    "args": {
                        "url": f"{registry.url}/v2/multi/one/manifests/latest",
                        "username": USER,
                        "password": PASSWORD,
                        "platform": HERE,
                    },
                },
                token=jc.root,
            )
            assert reply.status == 200, reply.raw
            layers = [entry["url"] for entry in reply.body["image"]["layers"]]
            assert sorted(u.rsplit("/", 1)[1] for u in layers) == sorted(
                b.digest for b in wanted.blobs
            )
            (holder,) = reply.body["peers"]
            assert holder["host_type"] == "super"
            assert sorted(x["url"] for x in holder["cached_layers"]) == sorted(layers)

            before = layer_bytes_served(registry, first)
            assert all(before[b.digest] >= b.size for b in wanted.layers)
            peer = jc.cluster.node("peer-0").info
            with Containerd(tmp_path / "ctr-0") as containerd:
                pull(containerd, registry, ref_one, peer["proxy"], tmp_path / "hosts-0")
                held = containerd.content_digests()
                assert all(b.digest in held for b in wanted.blobs)
            after = layer_bytes_served(registry, first)
            for b in wanted.blobs:
                assert after[b.digest] - before[b.digest] <= PROOF_BYTES, registry.blob_report()
            p2p = metric(peer["metrics"], "dragonfly_download_bytes_total", 'source="p2p"')
            assert p2p >= wanted.layer_bytes

            # all_peers with count 1: one of the two peers holds the second image
            done = await preheat(jc, registry, "multi/two", scope="all_peers", count=1)
            assert done["state"] == "SUCCESS", done
            (results,) = done["result"]["job_states"][0]["results"]
            wanted = second.images[HERE]  # no platform named: the manager's own
            assert len(results["success_tasks"]) == len(wanted.blobs)
            dirs = {n: jc.cluster.node(n).info["data_dir"] for n in ("peer-0", "peer-1")}
            holding = [n for n, d in dirs.items() if all(holds(d, b.digest) for b in wanted.blobs)]
            assert len(holding) == 1, holding
            other = "peer-1" if holding == ["peer-0"] else "peer-0"
            assert not any(holds(dirs[other], b.digest) for b in wanted.blobs)
            before = layer_bytes_served(registry, second)
            with Containerd(tmp_path / "ctr-1") as containerd:
                proxy = jc.cluster.node(other).info["proxy"]
                pull(containerd, registry, ref_two, proxy, tmp_path / "hosts-1")
                assert all(b.digest in containerd.content_digests() for b in wanted.blobs)
            after = layer_bytes_served(registry, second)
            for b in wanted.blobs:
                assert after[b.digest] - before[b.digest] <= PROOF_BYTES, registry.blob_report()

            # a tag the registry does not have: its reason, in the result
            missing = await jc.run(
                {
                    "type": "preheat",
                    "args": {
                        "type": "image",
                        "url": f"{registry.url}/v2/multi/one/manifests/no-such-tag",
                        "username": USER,
                        "password": PASSWORD,
                    },
                }
            )
            assert missing["state"] == "FAILURE"
            error = missing["result"]["job_states"][0]["error"]
            assert "MANIFEST_UNKNOWN" in error and "404" in error, error


async def test_image_preheat_through_a_registrys_bearer_token_flow(tmp_path: Path) -> None:
    """A registry in token mode (its own checks of every token): the manager follows the
    401's WWW-Authenticate (Bearer realm, service, scope), gets a pull token from the
    realm with the job's username and password, and the seed peer fetches every blob
    with it."""
    from dragonfly.testing.oci_image import push, write_oci_layout
    from dragonfly.testing.token_server import SERVICE, TokenServer

    image = write_oci_layout(tmp_path / "image", total_size=6 * MiB, layers=2, seed=23)
    with (
        TokenServer(tmp_path / "tokens", USER, PASSWORD) as tokens,
        Registry(tmp_path / "registry", token_auth=tokens.registry_auth()) as registry,
    ):
        assert registry.get("/v2/", auth=False)[0] == 401
        push(image, registry.address, "team/app", creds=f"{USER}:{PASSWORD}")
        asked = len(tokens.requests)
        async with job_cluster(tmp_path, peers=0) as jc:
            done = await preheat(jc, registry, "team/app")
            assert done["state"] == "SUCCESS", done
            (results,) = done["result"]["job_states"][0]["results"]
            assert len(results["success_tasks"]) == len(image.blobs)
            seed = jc.cluster.node("seed-peer-0").info["data_dir"]
            assert all(holds(seed, b.digest) for b in image.blobs)
            wrong = await jc.run(
                {
                    "type": "preheat",
                    "args": {
                        "type": "image",
                        "url": f"{registry.url}/v2/team/app/manifests/latest",
                        "username": USER,
                        "password": "not-the-password",
                    },
                }
            )
            assert wrong["state"] == "FAILURE"
            assert "token" in wrong["result"]["job_states"][0]["error"]
        mine = tokens.requests[asked:]
        assert mine[0] == {
            "service": SERVICE,
            "scope": ["repository:team/app:pull"],
            "auth": True,
        }
        served = registry.served_blob_bytes()
        assert all(served[b.digest] >= b.size for b in image.layers)
