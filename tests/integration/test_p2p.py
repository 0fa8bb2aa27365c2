"""The P2P core with real processes on loopback: nginx origin, scheduler, seed peer, peers."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from dragonfly.cluster import Cluster
from dragonfly.testing.nginx import Nginx

pytestmark = [pytest.mark.nginx, pytest.mark.slow]

MiB = 1024 * 1024


def metric(url: str, name: str, labels: str = "") -> float:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    pattern = (
        re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "") + r" ([0-9.e+]+)"
    )
    m = re.search(r"^" + pattern + r"$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * MiB):
            h.update(chunk)
    return h.hexdigest()


def curl_via(proxy: str, url: str, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["curl", "-sS", "-f", "-x", proxy, "-o", str(out), *extra, url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.fixture
def origin_dir(tmp_path: Path) -> Path:
    root = tmp_path / "www"
    root.mkdir()
    return root


@pytest.fixture
def nginx(tmp_path: Path, origin_dir: Path) -> Iterator[Nginx]:
    with Nginx(root=origin_dir, workdir=tmp_path / "nginx") as n:
        yield n


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with Cluster(tmp_path / "cluster", schedulers=1, seed_peers=1, peers=4) as c:
        yield c


def test_one_origin_fetch_many_peers(
    cluster: Cluster, nginx: Nginx, origin_dir: Path, tmp_path: Path
):
    size = int(os.environ.get("DRAGONFLY_TEST_P2P_SIZE", str(256 * MiB)))
    src = origin_dir / "big.bin"
    with open(src, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
    want = sha256_file(src)
    desc = json.loads((cluster.workdir / "cluster.json").read_text())
    peers = desc["peers"]
    procs = [
        curl_via(p["proxy"], f"{nginx.url}/big.bin", tmp_path / f"out{i}")
        for i, p in enumerate(peers)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()
    for i in range(len(peers)):
        assert sha256_file(tmp_path / f"out{i}") == want
    served = nginx.served_bytes("/big.bin")
    assert served <= 1.05 * size, f"origin served {served / size:.2f}x the file"
    for p in peers:
        p2p = metric(p["metrics"], "dragonfly_download_bytes_total", 'source="p2p"')
        assert p2p >= 0.95 * size, f"{p['proxy']} got only {p2p / size:.0%} peer-to-peer"
