"""The peer's OCI registry mirror with real clients: skopeo, containerd (ctr) and podman
pull a synthetic image from Debian's docker-registry through three peers' mirrors.

Everything runs on loopback and is stopped by PID: the registry (its own config and
storage), the cluster, a private containerd. Layers are 8 MiB tars (three 4 MiB pieces
each), so pieces really move between peers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dragonfly.cluster import Cluster
from dragonfly.peer.registry import PROOF_BYTES
from dragonfly.testing.containerd import Containerd, write_hosts_toml
from dragonfly.testing.oci_image import OciImage, push, skopeo_copy, write_oci_layout
from dragonfly.testing.podman import Podman, host_port, write_auth_json, write_registries_conf
from dragonfly.testing.probe import metric, sha256_file
from dragonfly.testing.registry import Registry
from tests.p2p_support import curl_response

pytestmark = [pytest.mark.registry, pytest.mark.slow, pytest.mark.timeout(600)]

MiB = 1024 * 1024
CLIENT_TIMEOUT = 180  # one pull of 24 MiB on loopback takes seconds; this bounds a hang
# What "served once in total" tolerates above a blob's size: the seed's 1-byte probe and
# each client's proof read (the registry logs body bytes only; a second GET of a whole
# layer would be 8 MiB over).
SLACK = 1 + 4 * PROOF_BYTES


def p2p_bytes(cluster: Cluster, node: str) -> float:
    url = cluster.node(node).info["metrics"]
    return metric(url, "dragonfly_download_bytes_total", 'source="p2p"')


def assert_served_once(registry: Registry, image: OciImage) -> None:
    served = registry.served_blob_bytes()
    report = registry.blob_report()
    for blob in image.blobs:
        got = served.get(blob.digest, 0)
        assert got <= blob.size + SLACK, (
            f"the registry served {blob.digest} ({blob.size} bytes) {got / blob.size:.2f} "
            f"times; its blob GETs:\n{report}"
        )


def assert_fetched(containerd: Containerd, image: OciImage, how: str) -> None:
    """Every blob of the image and its manifest in containerd's content store, right."""
    held = containerd.content_digests()
    for blob in (*image.blobs, image.manifest):
        assert blob.digest in held, f"{how}: {blob.digest} not in the content store"
        assert sha256_file(containerd.blob_path(blob.digest)) == blob.hex


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    with Registry(tmp_path / "registry") as r:
        yield r


def test_skopeo_containerd_podman_pull_through_three_peers(
    tmp_path: Path, registry: Registry
) -> None:
    image = write_oci_layout(tmp_path / "image", total_size=24 * MiB, layers=3, seed=11)
    ref = push(image, registry.address, "dragonfly/mirror-test")
    layer_bytes = image.layer_bytes
    with (
        Cluster(
            tmp_path / "cluster",
            schedulers=1,
            seed_peers=1,
            peers=3,
            extra=registry.mirror_options(),
        ) as cluster,
        Containerd(tmp_path / "containerd") as containerd,
    ):
        a, b, c = (cluster.node(f"peer-{i}").info["proxy"] for i in range(3))

        # A: skopeo, with registries.conf naming peer A's mirror for the registry
        conf_a = write_registries_conf(
            tmp_path / "a" / "registries.conf", registry.address, host_port(a)
        )
        out = tmp_path / "a" / "out"
        skopeo_copy(f"docker://{ref}", f"dir:{out}", registries_conf=conf_a, timeout=CLIENT_TIMEOUT)
        for blob in image.blobs:
            assert sha256_file(out / blob.hex) == blob.hex, f"skopeo via A: {blob.digest}"
        assert_served_once(registry, image)

        # B: containerd, hosts.toml naming peer B's mirror (containerd adds ?ns=REGISTRY)
        write_hosts_toml(tmp_path / "b" / "hosts", registry.address, b)
        containerd.fetch(ref, tmp_path / "b" / "hosts", timeout=CLIENT_TIMEOUT)
        assert_fetched(containerd, image, "ctr via B")
        assert_served_once(registry, image)

        # C: podman, its own storage; it unpacks every layer and checks its diff_id
        conf_c = write_registries_conf(
            tmp_path / "c" / "registries.conf", registry.address, host_port(c)
        )
        with Podman(tmp_path / "c" / "podman", conf_c) as podman:
            podman.pull(ref, timeout=CLIENT_TIMEOUT)
            assert podman.layer_digests(ref) == [layer.digest for layer in image.layers]

        # the registry served each blob once in total, to the seed peer
        assert_served_once(registry, image)
        for blob in image.layers:
            assert registry.served_blob_bytes()[blob.digest] >= blob.size
        # B and C got the layers from other peers, not from the registry; so did A (from
        # the seed peer): had its skopeo gone around the mirror, A would have none.
        for node in ("peer-0", "peer-1", "peer-2"):
            got = p2p_bytes(cluster, node)
            assert got >= 0.9 * layer_bytes, (
                f"{node} got {got / layer_bytes:.0%} of the layer bytes peer-to-peer"
            )


def test_containerd_names_a_plain_http_registry_with_the_x_dragonfly_registry_header(
    tmp_path: Path, registry: Registry
) -> None:
    """hosts.toml as Dragonfly documents it for containerd: the mirror's [host] entry
    carries `X-Dragonfly-Registry = ["http://REGISTRY"]`. No peer is told of the registry
    (no upstream, no insecure list: containerd's ?ns= alone would mean https), yet ctr
    fetches every blob through the mirror, peer-to-peer, and the registry serves each
    blob once."""
    image = write_oci_layout(tmp_path / "image", total_size=16 * MiB, layers=2, seed=13)
    ref = push(image, registry.address, "dragonfly/header-test")
    with (
        Cluster(tmp_path / "cluster", schedulers=1, seed_peers=1, peers=1) as cluster,
        Containerd(tmp_path / "containerd") as containerd,
    ):
        peer = cluster.node("peer-0")
        for node in cluster.nodes:  # no peer knows the registry
            conf = Path(node.info["config"]).read_text()
            assert node.role in ("manager", "scheduler") or (
                "upstream = ''  # default" in conf and "insecure = []  # default" in conf
            )
        hosts = tmp_path / "hosts"
        written = write_hosts_toml(
            hosts, registry.address, peer.info["proxy"],
            headers={"X-Dragonfly-Registry": registry.url},
        )  # fmt: skip
        assert f'X-Dragonfly-Registry = ["{registry.url}"]' in written.read_text()
        containerd.fetch(ref, hosts, timeout=CLIENT_TIMEOUT)
        assert_fetched(containerd, image, "ctr with the header")
        assert_served_once(registry, image)
        # through the mirror, not around it: containerd falls back to the registry silently
        blobs = metric(
            peer.info["metrics"], "dragonfly_proxy_requests_total", 'mode="registry_blob"'
        )
        assert blobs >= len(image.blobs)
        assert p2p_bytes(cluster, "peer-0") >= image.layer_bytes


def test_credentials_are_checked_even_when_the_peer_holds_every_layer(tmp_path: Path) -> None:
    user, password = "alice", "s3cret-pass"
    image = write_oci_layout(tmp_path / "image", total_size=10 * MiB, layers=2, seed=12)
    with Registry(tmp_path / "registry", auth=(user, password)) as registry:
        ref = push(image, registry.address, "private/app", creds=registry.creds)
        with Cluster(
            tmp_path / "cluster",
            schedulers=1,
            seed_peers=1,
            peers=1,
            extra=registry.mirror_options(),
        ) as cluster:
            proxy = cluster.node("peer-0").info["proxy"]
            conf = write_registries_conf(
                tmp_path / "registries.conf", registry.address, host_port(proxy)
            )

            # with credentials: the pull works through the mirror and every blob is right.
            # (skopeo sends --src-creds to the registry only; the mirror gets the login
            # filed under its own HOST:PORT, as `skopeo login MIRROR` leaves it.)
            logins = write_auth_json(tmp_path / "auth.json", {host_port(proxy): (user, password)})
            out = tmp_path / "out"
            skopeo_copy(
                f"docker://{ref}",
                f"dir:{out}",
                src_authfile=logins,
                registries_conf=conf,
                timeout=CLIENT_TIMEOUT,
            )
            for blob in image.blobs:
                assert sha256_file(out / blob.hex) == blob.hex
            assert_served_once(registry, image)
            assert p2p_bytes(cluster, "peer-0") >= 0.9 * image.layer_bytes

            # the peer now holds every layer; still no credentials, no blob
            for blob in image.blobs:
                url = f"{proxy}/v2/private/app/blobs/{blob.digest}"
                code, head, _ = curl_response(url)
                assert code == 401, f"{blob.digest} without credentials: {code}"
                assert head["www-authenticate"].lower().startswith("basic"), head
                code, _, _ = curl_response(url, "-u", f"{user}:wrong")
                assert code == 401, f"{blob.digest} with a wrong password: {code}"
                # ...and the right credentials get it (from the peer's store)
                code, _, _ = curl_response(url, "-u", f"{user}:{password}")
                assert code == 200
            code, head, _ = curl_response(f"{proxy}/v2/")
            assert code == 401 and head["www-authenticate"].lower().startswith("basic")

            # skopeo without credentials fails as it would against the registry
            with pytest.raises(RuntimeError, match=r"401|unauthorized|authentication required"):
                skopeo_copy(
                    f"docker://{ref}",
                    f"dir:{tmp_path / 'anon'}",
                    registries_conf=conf,
                    timeout=CLIENT_TIMEOUT,
                )
            assert not any((tmp_path / "anon" / b.hex).exists() for b in image.layers)
            assert_served_once(registry, image)
