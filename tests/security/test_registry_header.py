"""X-Dragonfly-Registry is a request header: anyone who reaches the proxy chooses it. What
an outsider tries with it, against a peer that holds a private layer pulled from the
registry that guards it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from dragonfly.cluster import Cluster
from dragonfly.testing.nginx import Nginx
from tests.p2p_support import MiB, curl_response, metric

pytestmark = [pytest.mark.nginx, pytest.mark.slow]


def test_a_registry_named_by_the_header_must_show_the_blobs_bytes(tmp_path: Path) -> None:
    """The header names a plain-http registry of the outsider's own that says yes to
    every blob (no configuration of the peer lets it in): the outsider gets what that
    registry serves, never the layer the peer holds; a URL with credentials, a path or
    two registries is refused before anything is fetched."""
    data = os.urandom(5 * MiB)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    legit_root, evil_root = tmp_path / "legit", tmp_path / "evil"
    blob = legit_root / "v2" / "private" / "app" / "blobs" / digest
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    evil_root.mkdir()
    (evil_root / "junk.bin").write_bytes(os.urandom(5 * MiB))
    say_yes = "location /v2/ { try_files /junk.bin =404; }\n"
    path = f"/v2/private/app/blobs/{digest}"
    with (
        Nginx(root=legit_root, workdir=tmp_path / "legit-nginx") as legit,
        Nginx(root=evil_root, workdir=tmp_path / "evil-nginx", extra_server_conf=say_yes) as evil,
    ):
        extra = ["--set", f"registry_mirror.upstream={legit.url}"]
        with Cluster(tmp_path / "cluster", schedulers=1, seed_peers=1, peers=1, extra=extra) as c:
            peer = c.node("peer-0")
            proxy = peer.info["proxy"]
            status, _, body = curl_response(proxy + path)
            assert status == 200 and body == data  # the peer now holds the layer

            status, head, body = curl_response(
                proxy + path, "-H", f"X-Dragonfly-Registry: {evil.url}"
            )
            leaked = body == data
            assert not leaked and "x-dragonfly-task-id" not in head, status
            assert evil.served_bytes(path) > 0, "the header's registry was never asked"

            served = legit.served_bytes(path)
            for value in (
                f"http://user:pw@{legit.url.split('//')[1]}",
                f"{legit.url}/v2/",
                "file:///etc/passwd",
            ):
                status, _, body = curl_response(
                    proxy + path, "-H", f"X-Dragonfly-Registry: {value}"
                )
                assert status == 400 and b"X-Dragonfly-Registry" in body, (value, status)
            status, _, _ = curl_response(
                proxy + path,
                "-H", f"X-Dragonfly-Registry: {legit.url}",
                "-H", f"X-Dragonfly-Registry: {evil.url}",
            )  # fmt: skip
            assert status == 400
            assert legit.served_bytes(path) == served
            requests = metric(
                peer.info["metrics"], "dragonfly_proxy_requests_total", 'mode="registry_blob"'
            )
            assert requests == 2  # the refused ones never reached the blob path
