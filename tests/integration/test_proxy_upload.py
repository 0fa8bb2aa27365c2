"""Request bodies passed through the proxy stream to the origin byte for byte: with a
Content-Length and chunked, and an origin that refuses the upload still answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from dragonfly.cluster import Cluster
from dragonfly.testing.nginx import Nginx
from tests.p2p_support import curl_response, random_file, sha256_file

pytestmark = [pytest.mark.nginx, pytest.mark.slow]


def test_uploads_arrive_whole(tmp_path: Path, www: Path):
    body = tmp_path / "body.bin"
    want = random_file(body, 9 * 1024 * 1024 + 7)
    dav = (
        "location /up/ { dav_methods PUT; create_full_put_path on; client_max_body_size 0; }\n"
        "location = /small { client_max_body_size 1k; return 200; }"
    )
    with (
        Nginx(root=www, workdir=tmp_path / "nginx", extra_server_conf=dav) as nginx,
        Cluster(tmp_path / "c", schedulers=1, seed_peers=0, peers=1) as cluster,
    ):
        proxy = cluster.node("peer-0").info["proxy"]
        for name, framing in (("length", ()), ("chunked", ("-H", "Transfer-Encoding: chunked"))):
            status, _, _ = curl_response(
                f"{nginx.url}/up/{name}.bin", "-x", proxy, "-T", str(body), *framing
            )
            assert status == 201, name
            assert sha256_file(www / "up" / f"{name}.bin") == want, name
        # the origin refuses the size: its answer comes back, the proxy keeps serving
        status, _, _ = curl_response(
            f"{nginx.url}/small", "-x", proxy, "--data-binary", "@" + str(body)
        )
        assert status in (413, 502)
        status, _, _ = curl_response(f"{proxy}/healthy")
        assert status == 200
