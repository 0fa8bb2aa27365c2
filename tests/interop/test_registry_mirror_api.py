"""The mirror's answers, request by request, against Debian's docker-registry: what
runtimes rely on beyond "the pull worked".

Each check is made against the registry itself first, so the test shows the mirror
answers as the registry does, not merely that it answers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dragonfly.cluster import Cluster
from dragonfly.testing.oci_image import OciImage, push, write_oci_layout
from dragonfly.testing.registry import Registry
from tests.p2p_support import curl_response

pytestmark = [pytest.mark.registry, pytest.mark.slow, pytest.mark.timeout(300)]

MiB = 1024 * 1024
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
NAME = "api/app"


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Registry, OciImage, Cluster]]:
    image = write_oci_layout(tmp_path / "image", total_size=6 * MiB, layers=2, seed=7)
    with Registry(tmp_path / "registry") as registry:
        push(image, registry.address, NAME, timeout=120)
        extra = registry.mirror_options()
        with Cluster(tmp_path / "cluster", schedulers=1, seed_peers=1, peers=1, extra=extra) as c:
            yield registry, image, c


def test_manifests_tags_and_base_answer_as_the_registry_does(
    setup: tuple[Registry, OciImage, Cluster],
) -> None:
    registry, image, cluster = setup
    mirror = cluster.node("peer-0").info["proxy"]
    manifest = f"/v2/{NAME}/manifests/{image.tag}"
    # Several Accept headers, the OCI type last: the registry must see every one.
    both = ["-H", f"Accept: {DOCKER_MANIFEST}", "-H", f"Accept: {OCI_MANIFEST}"]
    for base in (registry.url, mirror):
        status, headers, body = curl_response(base + manifest, *both)
        assert status == 200, (base, body)
        assert headers["content-type"] == OCI_MANIFEST
        assert headers["docker-content-digest"] == image.manifest.digest
        assert len(body) == image.manifest.size
    # Without the OCI type the registry refuses an OCI manifest, and so does the mirror.
    only_docker = curl_response(registry.url + manifest, "-H", f"Accept: {DOCKER_MANIFEST}")[0]
    assert (
        only_docker
        == curl_response(mirror + manifest, "-H", f"Accept: {DOCKER_MANIFEST}")[0]
        == 404
    )
    # containerd's HEAD with ?ns= names the upstream; the answer is the registry's.
    status, headers, _ = curl_response(
        f"{mirror}{manifest}?ns={registry.address}", "-I", "-H", f"Accept: {OCI_MANIFEST}"
    )
    assert status == 200 and headers["docker-content-digest"] == image.manifest.digest
    # Tags and /v2/ pass through.
    tags = [curl_response(f"{base}/v2/{NAME}/tags/list") for base in (mirror, registry.url)]
    assert tags[0][0] == tags[1][0] == 200 and tags[0][2] == tags[1][2]
    status, headers, _ = curl_response(f"{mirror}/v2/")
    assert status == 200 and headers["docker-distribution-api-version"] == "registry/2.0"


def test_blobs_by_range_head_and_unknown_digest(
    setup: tuple[Registry, OciImage, Cluster],
) -> None:
    registry, image, cluster = setup
    mirror = cluster.node("peer-0").info["proxy"]
    layer = image.layers[0]
    data = (image.path / "blobs" / "sha256" / layer.digest.split(":")[1]).read_bytes()
    blob = f"/v2/{NAME}/blobs/{layer.digest}"
    # A resumed pull asks for the rest of a blob.
    status, headers, body = curl_response(mirror + blob, "-H", "Range: bytes=1000-")
    assert status == 206 and body == data[1000:]
    assert headers["content-range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
    status, headers, body = curl_response(mirror + blob)
    assert status == 200 and body == data
    assert headers["docker-content-digest"] == layer.digest
    status, headers, _ = curl_response(mirror + blob, "-I")
    assert status == 200 and int(headers["content-length"]) == len(data)
    # A digest the repository does not have: the registry's own 404 and error code.
    missing = f"/v2/{NAME}/blobs/sha256:{'1' * 64}"
    want = curl_response(registry.url + missing)
    got = curl_response(mirror + missing)
    assert got[0] == want[0] == 404
    assert b"BLOB_UNKNOWN" in got[2]


def test_a_blob_held_by_the_peer_is_not_served_under_a_repository_that_lacks_it(
    setup: tuple[Registry, OciImage, Cluster], tmp_path: Path
) -> None:
    """Once a client may read repository A, naming another repository's layer under A
    must get the registry's 404, even though the peer holds that layer."""
    registry, image, cluster = setup
    mirror = cluster.node("peer-0").info["proxy"]
    other = write_oci_layout(tmp_path / "other", total_size=2 * MiB, layers=1, seed=8)
    push(other, registry.address, "api/private", timeout=120)
    private = other.layers[0].digest
    assert curl_response(f"{mirror}/v2/api/private/blobs/{private}")[0] == 200  # now on the peer
    assert curl_response(f"{mirror}/v2/{NAME}/blobs/{image.layers[0].digest}")[0] == 200  # A: yes
    assert curl_response(f"{registry.url}/v2/{NAME}/blobs/{private}")[0] == 404
    status, _, body = curl_response(f"{mirror}/v2/{NAME}/blobs/{private}")
    assert status == 404 and b"BLOB_UNKNOWN" in body
