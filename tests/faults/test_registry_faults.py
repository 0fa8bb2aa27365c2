"""The registry mirror against an upstream that lies, redirects, fails or is named badly.

nginx plays the upstream registry here: it serves blob paths from files, so a test
can make it serve bytes that do not match a blob's digest, or answer a blob with a
307 to "storage" carrying signed query parameters, as S3-backed registries do.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from dragonfly.cluster import Cluster
from dragonfly.peer.registry import PROOF_BYTES
from dragonfly.testing.nginx import Nginx, free_port
from tests.p2p_support import MiB, curl_response, metric

pytestmark = [pytest.mark.nginx, pytest.mark.slow]


def _blob(root: Path, repo: str, data: bytes, digest: str | None = None) -> str:
    digest = digest or "sha256:" + hashlib.sha256(data).hexdigest()
    path = root / "v2" / repo / "blobs" / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest


def _get(proxy: str, path: str, *headers: str) -> tuple[int, dict[str, str], bytes]:
    """GET through the mirror: (status, headers, body); status 0: cut short."""
    return curl_response(f"{proxy}{path}", *(a for h in headers for a in ("-H", h)))


def test_a_blob_whose_bytes_do_not_match_its_digest_is_never_delivered_whole(
    tmp_path: Path, www: Path, nginx: Nginx
):
    """An upstream serving other bytes under a digest: the client gets less than the
    whole blob and an error, the peer keeps no complete task, and asking again fails too."""
    real = os.urandom(9 * MiB)
    claimed = "sha256:" + hashlib.sha256(real).hexdigest()
    _blob(www, "lie", os.urandom(9 * MiB), digest=claimed)
    extra = ["--set", f"registry_mirror.upstream={nginx.url}"]
    with Cluster(tmp_path / "cluster", schedulers=1, seed_peers=1, peers=1, extra=extra) as c:
        # Asked again on the same peer and on the seed, which fetched it from the origin:
        # neither keeps the blob as complete, so neither serves it whole as a local hit.
        for node in ("peer-0", "peer-0", "seed-peer-0"):
            status, _, body = _get(c.node(node).info["proxy"], f"/v2/lie/blobs/{claimed}")
            assert status == 0 or status >= 500, (node, status)
            assert len(body) < len(real)


def test_a_307_to_signed_storage_is_followed_and_signatures_stay_out_of_the_task(
    tmp_path: Path, www: Path
):
    """Blobs answered with 307 to storage URLs that differ per request: the peer follows
    them, the task is the digest, and the same blob under another repository (or from
    another registry) is one task that the origin served once."""
    data = os.urandom(6 * MiB)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (www / "storage").mkdir()
    (www / "storage" / digest.split(":")[1]).write_bytes(data)
    redirect = (
        'location ~ "^/v2/.+/blobs/sha256:(?<hex>[0-9a-f]{64})$" {\n'
        "    return 307 /storage/$hex?X-Amz-Signature=$request_id&X-Amz-Expires=60;\n"
        "}\n"
    )
    with Nginx(root=www, workdir=tmp_path / "nginx", extra_server_conf=redirect) as reg:
        extra = ["--set", f"registry_mirror.upstream={reg.url}"]
        with Cluster(tmp_path / "cluster", schedulers=1, seed_peers=1, peers=2, extra=extra) as c:
            first, second = (c.node(f"peer-{i}").info["proxy"] for i in range(2))
            status, hdrs, body = _get(first, f"/v2/team/app/blobs/{digest}")
            assert status == 200 and body == data
            assert hdrs["x-dragonfly-task-id"] == digest.split(":")[1]
            assert hdrs["docker-content-digest"] == digest
            # Another repository on another peer, and the same upstream named by ns=.
            host = reg.url.split("//")[1]
            status, hdrs, body = _get(second, f"/v2/other/name/blobs/{digest}?ns={host}")
            assert status == 200 and body == data
            assert hdrs["x-dragonfly-task-id"] == digest.split(":")[1]
        # Once in total, but for the seed's 1-byte probe and each client's proof read.
        assert reg.served_bytes("/storage/") <= len(data) + 1 + 2 * PROOF_BYTES


def test_upstream_failures_reach_the_client_as_the_upstream_said(
    tmp_path: Path, www: Path, nginx: Nginx
):
    """404 stays 404; an unreachable upstream is a 502 naming it; a bad ns is a 400: the
    runtime's own fallback to the registry can act on each."""
    (www / "v2").mkdir()
    (www / "v2" / "index.html").write_text("{}")
    closed = free_port()
    extra = [
        "--set",
        f"registry_mirror.upstream={nginx.url}",
        "--set",
        f'registry_mirror.insecure=["127.0.0.1:{closed}"]',
    ]
    with Cluster(tmp_path / "cluster", schedulers=1, seed_peers=0, peers=1, extra=extra) as c:
        proxy = c.node("peer-0").info["proxy"]
        missing = "sha256:" + "0" * 64
        status, _, _ = _get(proxy, f"/v2/none/blobs/{missing}")
        assert status == 404
        status, hdrs, body = _get(proxy, f"/v2/x/blobs/{missing}?ns=127.0.0.1:{closed}")
        assert status == 502
        assert hdrs["content-type"].startswith("application/json")
        assert f"127.0.0.1:{closed}" in json.loads(body)["errors"][0]["message"]
        status, _, body = _get(proxy, "/v2/x/manifests/latest?ns=bad%20host")
        assert status == 400 and b"ns" in body
        status, _, body = _get(proxy, "/v2/UPPER/blobs/" + missing)
        assert status == 400 and json.loads(body)["errors"][0]["code"] == "NAME_INVALID"


def test_a_blob_url_through_the_forward_proxy_is_the_mirrors_task(
    tmp_path: Path, www: Path, nginx: Nginx
):
    """`curl -x PEER http://REGISTRY/v2/NAME/blobs/sha256:...` (a runtime behind a proxy):
    the digest is the task, as through the mirror, so the mirror's later request for the
    same blob is a local hit."""
    data = os.urandom(5 * MiB)
    digest = _blob(www, "fw/app", data)
    extra = ["--set", f"registry_mirror.upstream={nginx.url}"]
    with Cluster(tmp_path / "cluster", schedulers=1, seed_peers=1, peers=1, extra=extra) as c:
        peer = c.node("peer-0")
        status, hdrs, body = curl_response(
            f"{nginx.url}/v2/fw/app/blobs/{digest}", "-x", peer.info["proxy"]
        )
        assert status == 200 and body == data
        assert hdrs["x-dragonfly-task-id"] == digest.split(":")[1]
        status, _, body = _get(peer.info["proxy"], f"/v2/fw/app/blobs/{digest}")
        assert status == 200 and body == data
        metrics = peer.info["metrics"]
        assert metric(metrics, "dragonfly_proxy_requests_total", 'mode="registry_blob"') == 2
        assert metric(metrics, "dragonfly_download_bytes_total", 'source="local"') == len(data)


def test_a_registry_the_client_names_must_show_the_blobs_bytes(tmp_path: Path, www: Path):
    """The task is the digest alone, shared by every registry. A client that names a
    registry of its own (?ns=, or a URL through the forward proxy) which says yes to
    everything must not get a layer the peer holds from another registry: it gets what
    its registry serves. A single-sign-on front that answers 302 is no yes either."""
    data = os.urandom(5 * MiB)
    digest = _blob(www, "private/app", data)
    evil_root = tmp_path / "evil"
    evil_root.mkdir()
    (evil_root / "junk.bin").write_bytes(os.urandom(5 * MiB))
    say_yes = (
        "location /v2/ { try_files /junk.bin =404; }\nlocation /v2/sso/ { return 302 /login; }\n"
    )
    with (
        Nginx(root=www, workdir=tmp_path / "legit") as legit,
        Nginx(root=evil_root, workdir=tmp_path / "evil-nginx", extra_server_conf=say_yes) as evil,
    ):
        evil_host = evil.url.split("//")[1]
        extra = [
            "--set", f"registry_mirror.upstream={legit.url}",
            "--set", f'registry_mirror.insecure=["{evil_host}"]',
        ]  # fmt: skip
        with Cluster(tmp_path / "cluster", schedulers=1, seed_peers=1, peers=1, extra=extra) as c:
            proxy = c.node("peer-0").info["proxy"]
            status, _, body = _get(proxy, f"/v2/private/app/blobs/{digest}")
            assert status == 200 and body == data  # the peer now holds the layer
            status, hdrs, body = _get(proxy, f"/v2/private/app/blobs/{digest}?ns={evil_host}")
            assert body != data and "x-dragonfly-task-id" not in hdrs, status
            status, _, body = curl_response(
                f"{evil.url}/v2/private/app/blobs/{digest}", "-x", proxy
            )
            assert status == 200 and body != data
            assert metric(
                c.node("peer-0").info["metrics"], "dragonfly_proxy_requests_total",
                'mode="registry_blob"',
            ) == 3  # fmt: skip
            # A 302 (a login page) is the registry's answer, not a yes.
            status, hdrs, body = _get(proxy, f"/v2/sso/app/blobs/{digest}?ns={evil_host}")
            assert status == 302 and hdrs["location"].endswith("/login") and body != data
