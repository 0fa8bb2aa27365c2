"""The registry-mirror tests' harness on its own, without dragonfly: docker-registry with
its own config (plain, htpasswd, pull-through cache), a synthetic OCI image pushed with
skopeo, and skopeo, containerd (ctr) and podman pulling it straight from the registry.

If one of these fails, the mirror tests cannot say anything about the mirror."""

from __future__ import annotations

import hashlib
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from dragonfly.testing.containerd import Containerd, write_hosts_toml
from dragonfly.testing.oci_image import push, skopeo_copy, write_oci_layout
from dragonfly.testing.podman import Podman, write_registries_conf
from dragonfly.testing.probe import sha256_file
from dragonfly.testing.registry import Registry

pytestmark = [pytest.mark.registry, pytest.mark.slow]

MiB = 1024 * 1024


def test_layout_is_deterministic_and_layers_are_tars(tmp_path: Path) -> None:
    a = write_oci_layout(tmp_path / "a", total_size=3 * MiB + 5, layers=2, seed=7)
    b = write_oci_layout(tmp_path / "b", total_size=3 * MiB + 5, layers=2, seed=7)
    c = write_oci_layout(tmp_path / "c", total_size=3 * MiB + 5, layers=2, seed=8)
    assert a.layers == b.layers and a.manifest == b.manifest
    assert {x.digest for x in a.layers}.isdisjoint(x.digest for x in c.layers)
    for blob in (*a.blobs, a.manifest):
        data = a.blob_path(blob).read_bytes()
        assert len(data) == blob.size and hashlib.sha256(data).hexdigest() == blob.hex
    for blob in a.layers:
        listing = subprocess.run(
            ["tar", "-tvf", str(a.blob_path(blob))], capture_output=True, text=True, check=True
        ).stdout
        assert "dragonfly-test/layer-" in listing
    # a second call with the same parameters reuses the layout as it is
    mtime = a.blob_path(a.layers[0]).stat().st_mtime_ns
    again = write_oci_layout(tmp_path / "a", total_size=3 * MiB + 5, layers=2, seed=7)
    assert again == a and a.blob_path(a.layers[0]).stat().st_mtime_ns == mtime


def test_push_then_skopeo_ctr_podman_pull_straight_from_the_registry(tmp_path: Path) -> None:
    image = write_oci_layout(tmp_path / "image", total_size=6 * MiB, layers=3, seed=1)
    with Registry(tmp_path / "registry") as registry:
        ref = push(image, registry.address, "test/harness")
        assert registry.process is not None
        pid = registry.process.pid
        assert registry.served_blob_bytes() == {}  # a push GETs no blob

        # skopeo to a dir: one file per blob, named by its digest
        skopeo_copy(f"docker://{ref}", f"dir:{tmp_path / 'skopeo-out'}")
        for blob in image.blobs:
            assert sha256_file(tmp_path / "skopeo-out" / blob.hex) == blob.hex

        # containerd's content store, through a hosts.toml naming the registry itself
        with Containerd(tmp_path / "containerd") as ctrd:
            write_hosts_toml(tmp_path / "hosts", registry.address, None)
            ctrd.fetch(ref, tmp_path / "hosts", timeout=120)
            held = ctrd.content_digests()
            for blob in (*image.blobs, image.manifest):
                assert blob.digest in held
                assert sha256_file(ctrd.blob_path(blob.digest)) == blob.hex
            assert ctrd.process is not None
            ctrd_pid = ctrd.process.pid

        # podman unpacks every layer and checks it against the config's diff_ids
        conf = write_registries_conf(tmp_path / "registries.conf", registry.address)
        with Podman(tmp_path / "podman", conf) as podman:
            podman.pull(ref, timeout=120)
            assert podman.layer_digests(ref) == [layer.digest for layer in image.layers]

        # three pulls: each blob served three times, and the log counts exactly that
        served = registry.served_blob_bytes()
        assert served == {b.digest: 3 * b.size for b in image.blobs}, registry.blob_report()
    for gone in (pid, ctrd_pid):
        assert not Path(f"/proc/{gone}").exists()


def test_htpasswd_registry_wants_credentials(tmp_path: Path) -> None:
    image = write_oci_layout(tmp_path / "image", total_size=1 * MiB, layers=1, seed=2)
    with Registry(tmp_path / "registry", auth=("alice", "s3cret")) as registry:
        ref = push(image, registry.address, "private/img", creds=registry.creds)
        layer = image.layers[0]
        status, _ = registry.get(f"/v2/private/img/blobs/{layer.digest}", auth=False)
        assert status == 401
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"{registry.url}/v2/", timeout=10)
        assert info.value.code == 401
        assert "Basic" in info.value.headers.get("WWW-Authenticate", "")
        status, body = registry.get(f"/v2/private/img/blobs/{layer.digest}")
        assert status == 200 and hashlib.sha256(body).hexdigest() == layer.hex
        with pytest.raises(RuntimeError):
            skopeo_copy(f"docker://{ref}", f"dir:{tmp_path / 'anon'}")
        skopeo_copy(f"docker://{ref}", f"dir:{tmp_path / 'out'}", src_creds=registry.creds)
        assert sha256_file(tmp_path / "out" / layer.hex) == layer.hex
        statuses = {e.status for e in registry.log_entries() if "/blobs/sha256:" in e.uri}
        assert {401, 200} <= statuses


def test_pull_through_cache(tmp_path: Path) -> None:
    """docker-registry in proxy mode: the benchmark's "what a user sets up instead"."""
    image = write_oci_layout(tmp_path / "image", total_size=2 * MiB, layers=2, seed=3)
    with (
        Registry(tmp_path / "upstream") as upstream,
        Registry(tmp_path / "cache", proxy_remote=upstream.url) as cache,
    ):
        push(image, upstream.address, "test/cached")
        for i in range(2):
            skopeo_copy(f"docker://{cache.address}/test/cached:latest", f"dir:{tmp_path / f'o{i}'}")
            for blob in image.blobs:
                assert sha256_file(tmp_path / f"o{i}" / blob.hex) == blob.hex
            # the cache stores a missed blob in the background: a second pull before that
            # is done would be a miss again
            deadline = time.monotonic() + 30
            while not all(cache.stored(b.digest) for b in image.blobs):
                assert time.monotonic() < deadline, "the cache did not store the blobs"
                time.sleep(0.05)
        # The second pull came from the cache's storage. (Distribution 2.8 fetches a
        # missed blob twice from upstream: once streamed to the client, once to store it.)
        from_upstream = upstream.served_blob_bytes()
        assert all(from_upstream[b.digest] <= 2 * b.size for b in image.blobs)
        assert cache.served_blob_bytes() == {b.digest: 2 * b.size for b in image.blobs}


def test_each_client_goes_through_the_mirror_its_config_names(tmp_path: Path) -> None:
    """skopeo (--registries-conf), podman (CONTAINERS_REGISTRIES_CONF) and containerd
    (hosts.toml) each send their requests to the mirror their config names: here a
    pull-through cache, which logs them. Without this, a mirror test could pass with a
    client that quietly went straight to the registry."""
    image = write_oci_layout(tmp_path / "image", total_size=2 * MiB, layers=2, seed=4)
    with (
        Registry(tmp_path / "upstream") as upstream,
        Registry(tmp_path / "cache", proxy_remote=upstream.url) as mirror,
        Containerd(tmp_path / "containerd") as ctrd,
    ):
        ref = push(image, upstream.address, "test/mirrored")
        conf = write_registries_conf(tmp_path / "registries.conf", upstream.address, mirror.address)

        def mirror_agents() -> set[str]:
            return {
                e.agent.split("/")[0]
                for e in mirror.log_entries()
                if "/blobs/sha256:" in e.uri and e.method == "GET"
            }

        skopeo_copy(f"docker://{ref}", f"dir:{tmp_path / 'out'}", registries_conf=conf)
        assert "skopeo" in mirror_agents(), mirror.blob_report()
        write_hosts_toml(tmp_path / "hosts", upstream.address, mirror.url)
        ctrd.fetch(ref, tmp_path / "hosts", timeout=120)
        assert "containerd" in mirror_agents(), mirror.blob_report()
        # containerd names the registry the mirror stands for in ?ns=
        assert any(
            f"ns={upstream.address.replace(':', '%3A')}" in e.uri for e in mirror.log_entries()
        )
        with Podman(tmp_path / "podman", conf) as podman:
            podman.pull(ref, timeout=120)
        # (podman's User-Agent is containers/image's: "containers/5.23.1 (github.com/...)")
        assert "containers" in mirror_agents(), mirror.blob_report()
        # ...and none of them went to the registry itself: only the cache fetched from it
        agents = {
            e.agent.split("/")[0]
            for e in upstream.log_entries()
            if e.method == "GET" and "/blobs/sha256:" in e.uri
        }
        assert not agents & {"skopeo", "containerd", "containers"}, upstream.blob_report()
