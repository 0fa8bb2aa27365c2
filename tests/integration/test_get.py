"""`python -m dragonfly get`: through a running peer, and with a one-shot embedded peer."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dragonfly.cluster import Cluster
from dragonfly.testing.nginx import Nginx
from tests.p2p_support import task_files

pytestmark = [pytest.mark.nginx, pytest.mark.slow]


def get(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dragonfly", "get", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_get_through_a_peer_and_embedded(tmp_path: Path, www: Path, nginx: Nginx):
    data = os.urandom(9 * 1024 * 1024 + 3)
    (www / "f.bin").write_bytes(data)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    url = f"{nginx.url}/f.bin"
    with Cluster(tmp_path / "c", schedulers=1, seed_peers=1, peers=1) as cluster:
        # --peer names the daemon's data directory: its local API is the unix socket there
        peer = cluster.node("peer-0").info["data_dir"]
        r = get(url, "-O", str(tmp_path / "a"), "--peer", peer, "--digest", digest)
        assert r.returncode == 0, r.stderr
        assert (tmp_path / "a").read_bytes() == data
        # ... it was that daemon's download: its task file holds the bytes
        assert [p.read_bytes() for p in task_files(peer)] == [data]
        assert (Path(peer) / "api.sock").stat().st_mode & 0o777 == 0o600
        # a wrong digest: exit 1, one line naming both digests, no output file
        r = get(url, "-O", str(tmp_path / "b"), "--peer", peer, "--digest", "sha256:" + "0" * 64)
        assert r.returncode == 1 and "digest mismatch" in r.stderr
        assert not (tmp_path / "b").exists()
        # ... and the shared task is untouched: the next get succeeds from the cache
        r = get(url, "-O", str(tmp_path / "c2"), "--peer", peer)
        assert r.returncode == 0 and (tmp_path / "c2").read_bytes() == data
        # an origin 404 is a clear failure, nothing written
        r = get(f"{nginx.url}/nope.bin", "-O", str(tmp_path / "d"), "--peer", peer)
        assert r.returncode == 1 and "404" in r.stderr
        assert not (tmp_path / "d").exists()
    # no daemon answers: a one-shot peer in-process goes to the origin
    # (no daemon at --peer, the one-shot peer's data in tmp_path/embedded, no scheduler)
    embedded = ["--peer", str(tmp_path / "no-daemon-here"), "--set",
                f"storage.data_dir={tmp_path / 'embedded'}", "--set", "scheduler.addresses=[]"]  # fmt: skip
    r = get(url, "-O", str(tmp_path / "e"), *embedded, "--hard-link")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "e").read_bytes() == data
    # ... and copying the file out as it arrives, checked against its digest
    r = get(url + "?embedded-copy", "-O", str(tmp_path / "e2"), *embedded, "--digest", digest)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "e2").read_bytes() == data
    assert not list(tmp_path.glob(".e2.*"))  # no temporary file left beside it
    # bad usage is exit 2
    r = get(url, "-O", str(tmp_path / "f"), "--digest", "md5:abc")
    assert r.returncode == 2 and "--digest" in r.stderr
    r = get(url, "-O", str(tmp_path / "f"), "--peer", "http://127.0.0.1:1")
    assert r.returncode == 2 and "data directory" in r.stderr


def test_the_copy_out_follows_the_download(tmp_path: Path, www: Path, nginx: Nginx):
    """The local API's progress keeps the verified prefix growing while the task
    downloads (`get` copies that prefix out as it grows): pieces taken in any other
    order would leave the prefix short, and nearly all of the copy for the end."""
    data = os.urandom(128 * 1024 * 1024)
    (www / "g.bin").write_bytes(data)
    url = f"{nginx.url}/g.bin"
    with Cluster(
        tmp_path / "c",
        schedulers=1,
        seed_peers=1,
        peers=2,
        overrides=["peer:download.rate_limit=48MiB"],
    ) as cluster:
        # peer-0 holds the file first, so peer-1 has two parents holding all of it
        r = subprocess.run(
            [
                "curl",
                "-sS",
                "-f",
                "-o",
                "/dev/null",
                "-x",
                cluster.node("peer-0").info["proxy"],
                url,
            ],
            capture_output=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
        sock = Path(cluster.node("peer-1").info["data_dir"]) / "api.sock"
        r = subprocess.run(
            ["curl", "-sS", "-f", "-N", "--unix-socket", str(sock), "--data-binary",
             json.dumps({"url": url}), "http://localhost/_dragonfly/tasks"],
            capture_output=True,
            timeout=120,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert events[-1]["state"] == "succeeded"
    during = [e for e in events if e["completed"] < len(data)]
    assert len(during) >= 5, events
    # half the file copyable before the download is done (in order, the prefix trails
    # what arrived by at most the picker's window)
    assert max(e["ready"] for e in during) >= len(data) // 2, during
    # the pieces verified past the prefix, each told once and only past it (whole 4 MiB
    # pieces), so that `get` copies them meanwhile: at every line the bytes held are the
    # prefix and the pieces told so far that are past it
    piece = 4 * 1024 * 1024
    told: set[int] = set()
    for e in during:
        for offset, length in e["ahead"]:
            assert offset >= e["ready"] and offset % piece == 0 and length == piece, e
            assert offset not in told, e
            told.add(offset)
        assert e["completed"] == e["ready"] + piece * sum(o >= e["ready"] for o in told), e
