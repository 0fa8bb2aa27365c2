"""The P2P core with real processes on loopback: nginx origin, scheduler, seed peer, peers."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from dragonfly.cluster import Cluster
from dragonfly.testing.nginx import Nginx
from tests.p2p_support import (
    MiB,
    curl,
    curl_sha256,
    finish,
    metric,
    origin_story,
    random_file,
    sha256_file,
    task_files,
)

pytestmark = [pytest.mark.nginx, pytest.mark.slow]


def test_one_origin_fetch_four_peers_one_gib(tmp_path: Path, www: Path, nginx: Nginx):
    """1 seed + 4 peers fetch 1 GiB at once: right bytes, origin asked ~once, P2P traffic."""
    size = int(os.environ.get("DRAGONFLY_TEST_P2P_SIZE", str(1024 * MiB)))
    want = random_file(www / "big.bin", size)
    with Cluster(tmp_path / "cluster", schedulers=1, seed_peers=1, peers=4) as cluster:
        peers = [n for n in cluster.nodes if n.role == "peer"]
        # Clients hash what they receive instead of storing a second copy of 4 GiB.
        procs = [curl_sha256(p.info["proxy"], f"{nginx.url}/big.bin") for p in peers]
        digests = []
        for proc in procs:
            out, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err.decode()
            digests.append(out.decode().split()[0])
        assert digests == [want] * 4
        served = nginx.served_bytes("/big.bin")
        assert served <= 1.05 * size, (
            f"origin served {served / size:.2f}x the file:\n{origin_story(cluster)}"
        )
        for p in peers:
            p2p = metric(p.info["metrics"], "dragonfly_download_bytes_total", 'source="p2p"')
            assert p2p >= 0.95 * size, f"{p.name} got only {p2p / size:.0%} peer-to-peer"


def test_small_files_errors_and_credentials(tmp_path: Path, www: Path, nginx: Nginx):
    """Single-piece and empty files, a 404, HEAD, ranges, and Authorization passed through."""
    one = random_file(www / "one.bin", 1000)
    (www / "empty.bin").write_bytes(b"")
    five = random_file(www / "five.bin", 5 * MiB + 7)  # two pieces
    with Cluster(tmp_path / "cluster", schedulers=1, seed_peers=1, peers=2) as cluster:
        peer = cluster.node("peer-0")
        proxy = peer.info["proxy"]
        code, err = finish(curl(proxy, f"{nginx.url}/one.bin", tmp_path / "one"))
        assert code == 0, err
        assert sha256_file(tmp_path / "one") == one
        code, err = finish(curl(proxy, f"{nginx.url}/empty.bin", tmp_path / "empty"))
        assert code == 0, err
        assert (tmp_path / "empty").read_bytes() == b""
        # a 404 passes to the client and nothing is stored for it
        before = {p.name for p in task_files(peer.info["data_dir"])}
        code, err = finish(
            curl(proxy, f"{nginx.url}/missing.bin", tmp_path / "missing", "-w", "%{http_code}")
        )
        assert code != 0 and "404" in err
        assert {p.name for p in task_files(peer.info["data_dir"])} == before
        seed = cluster.node("seed-peer-0")
        assert not any("missing" in p.name for p in task_files(seed.info["data_dir"]))
        # a range of a file spanning two pieces, served under the whole file's task
        code, err = finish(
            curl(
                proxy,
                f"{nginx.url}/five.bin",
                tmp_path / "part",
                "-r",
                f"{4 * MiB - 5}-{4 * MiB + 4}",
            )
        )
        assert code == 0, err
        assert (tmp_path / "part").read_bytes() == (www / "five.bin").read_bytes()[
            4 * MiB - 5 : 4 * MiB + 5
        ]
        code, err = finish(curl(proxy, f"{nginx.url}/five.bin", tmp_path / "five"))
        assert code == 0 and sha256_file(tmp_path / "five") == five
        # local hit: the same peer again
        local_before = metric(
            peer.info["metrics"], "dragonfly_download_bytes_total", 'source="local"'
        )
        code, err = finish(curl(proxy, f"{nginx.url}/five.bin", tmp_path / "five2"))
        assert code == 0 and sha256_file(tmp_path / "five2") == five
        local_after = metric(
            peer.info["metrics"], "dragonfly_download_bytes_total", 'source="local"'
        )
        assert local_after - local_before == 5 * MiB + 7
        # range-only (proxy.prefetch off): peer-1 fetches just the piece the range lies in,
        # and a later whole-file request resumes from it
        twenty = random_file(www / "twenty.bin", 20 * MiB)
        p1 = cluster.node("peer-1")
        code, err = finish(
            curl(
                p1.info["proxy"],
                f"{nginx.url}/twenty.bin",
                tmp_path / "r",
                "-r",
                f"{8 * MiB + 1}-{9 * MiB}",
            )
        )
        assert code == 0, err
        assert (tmp_path / "r").read_bytes() == (www / "twenty.bin").read_bytes()[
            8 * MiB + 1 : 9 * MiB + 1
        ]
        assert (
            metric(p1.info["metrics"], "dragonfly_download_bytes_total", 'source="p2p"') == 4 * MiB
        )
        code, err = finish(curl(p1.info["proxy"], f"{nginx.url}/twenty.bin", tmp_path / "t"))
        assert code == 0 and sha256_file(tmp_path / "t") == twenty
        assert (
            metric(p1.info["metrics"], "dragonfly_download_bytes_total", 'source="p2p"') == 20 * MiB
        )
        # credentials: straight to the origin by default, never from P2P
        direct_before = metric(
            peer.info["metrics"], "dragonfly_proxy_requests_total", 'mode="direct"'
        )
        code, err = finish(
            curl(proxy, f"{nginx.url}/five.bin", tmp_path / "auth", "-H", "Authorization: Bearer x")
        )
        assert code == 0 and sha256_file(tmp_path / "auth") == five
        assert (
            metric(peer.info["metrics"], "dragonfly_proxy_requests_total", 'mode="direct"')
            == direct_before + 1
        )
        assert (
            metric(peer.info["metrics"], "dragonfly_download_bytes_total", 'source="local"')
            == local_after
        )


def test_first_byte_reaches_the_client_before_the_seed_has_the_last_piece(
    tmp_path: Path, www: Path
):
    """Streaming: with a slow origin, the client reads bytes while the seed still fetches."""
    # 12 pieces, 8 fetched at once at 2 MB/s each: the first batch lands ~2 s before the rest.
    size = 48 * MiB
    random_file(www / "slow.bin", size)
    with (
        Nginx(root=www, workdir=tmp_path / "nginx", limit_rate="2m") as slow,
        Cluster(tmp_path / "cluster", schedulers=1, seed_peers=1, peers=1) as cluster,
    ):
        proxy = cluster.node("peer-0").info["proxy"]
        seed = cluster.node("seed-peer-0")
        host, port = proxy.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=60) as s:
            s.sendall(f"GET {slow.url}/slow.bin HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            received = b""
            while b"\r\n\r\n" not in received:
                received += s.recv(65536)
            head, body = received.split(b"\r\n\r\n", 1)
            while not body:
                body += s.recv(65536)
            seed_bytes = metric(
                seed.info["metrics"], "dragonfly_download_bytes_total", 'source="back_to_source"'
            )
        assert b"200" in head.split(b"\r\n")[0]
        assert seed_bytes < size, "the seed already had the whole file before the first byte left"
