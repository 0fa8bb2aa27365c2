"""Issue 11, item 9: what the peers keep on disk.

A client fetches presigned URLs (S3's X-Amz-Signature and X-Amz-Security-Token, a
token, a password in the userinfo) through the cluster at debug log level. Then an
onlooker reads every log and every byte of every data directory: no secret is there.
The data directories are their owner's only, a symlink planted in one is refused
instead of followed, and a data directory that belongs to another user is refused.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest

from dragonfly.cluster import Cluster, ClusterError
from dragonfly.testing.nginx import Nginx
from tests.p2p_support import curl_response, random_file, task_files
from tests.security.edge_support import raw_exchange

pytestmark = [pytest.mark.nginx, pytest.mark.slow]

SECRETS = ["AKIACREDSECRET", "SIGSECRET0123", "TOKSECRET0123", "TOKEN2SECRET", "PWSECRET99"]
SIGNED = (
    "?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIACREDSECRET%2F20260101"
    "&X-Amz-Signature=SIGSECRET0123&X-Amz-Security-Token=TOKSECRET0123&token=TOKEN2SECRET"
)


def _files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if not p.is_symlink()]


def test_signed_urls_leave_no_secret_in_logs_or_data_and_files_are_private(
    tmp_path: Path, www: Path, nginx: Nginx
):
    random_file(www / "f.bin", 2_000_000)
    random_file(www / "g.bin", 10_000)
    extra = ["--set", "log.level=debug"]
    with Cluster(tmp_path / "c", schedulers=1, seed_peers=1, peers=1, extra=extra) as cluster:
        peer = cluster.node("peer-0")
        proxy = peer.info["proxy"]
        status, _, body = curl_response(f"{nginx.url}/f.bin{SIGNED}", "-x", proxy)
        assert status == 200 and len(body) == 2_000_000
        # a failing fetch: its error names the URL
        status, _, _ = curl_response(f"{nginx.url}/missing.bin{SIGNED}", "-x", proxy)
        assert status == 404
        # a password in the URL's userinfo, as a raw client may send it
        host = nginx.url.removeprefix("http://")
        port = int(proxy.rsplit(":", 1)[1])
        answer = raw_exchange(
            "127.0.0.1",
            port,
            f"GET http://user:PWSECRET99@{host}/g.bin HTTP/1.1\r\nHost: {host}\r\n"
            "Connection: close\r\n\r\n".encode(),
        )
        assert answer.startswith(b"HTTP/1.1 200 ")
        data_dirs = [Path(cluster.node(n).info["data_dir"]) for n in ("peer-0", "seed-peer-0")]
        logs = [n.log_path for n in cluster.nodes]

        # what a reader of the data directories finds, while the peers run
        for data in data_dirs:
            assert stat.S_IMODE(data.stat().st_mode) == 0o700
            for path in _files_under(data):
                mode = stat.S_IMODE(path.lstat().st_mode)
                assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))
            names = {p.name for p in _files_under(data)}
            assert {"metadata.db", "metadata.db-wal", "lock", "api.sock"} <= names
        assert task_files(data_dirs[0]) and task_files(data_dirs[1])
    # ... and after they stopped (the WAL folded into the database)
    urls: list[str] = []
    for data in data_dirs:
        with sqlite3.connect(data / "metadata.db") as db:
            urls += [row[0] for row in db.execute("SELECT url FROM tasks")]
        for path in _files_under(data):
            if path.is_file():
                raw = path.read_bytes()
                for secret in SECRETS:
                    assert secret.encode() not in raw, (secret, path)
    assert any("X-Amz-Signature=REDACTED" in u for u in urls), urls
    assert any("REDACTED@" in u for u in urls), urls
    text = "".join(p.read_text(errors="replace") for p in logs)
    for secret in SECRETS:
        assert secret not in text, secret
    assert "X-Amz-Signature=REDACTED" in text  # the URLs were logged, redacted


def test_a_symlink_planted_in_the_data_directory_is_refused(
    tmp_path: Path, www: Path, nginx: Nginx
):
    random_file(www / "f.bin", 100_000)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"another user's private file\n" * 4000)
    workdir = tmp_path / "c"
    with Cluster(workdir, schedulers=1, seed_peers=0, peers=1) as cluster:
        data = Path(cluster.node("peer-0").info["data_dir"])
        status, _, _ = curl_response(
            f"{nginx.url}/f.bin", "-x", cluster.node("peer-0").info["proxy"]
        )
        assert status == 200
    (task,) = task_files(data)
    task.unlink()
    task.symlink_to(victim)  # whoever could write there points the task at another file
    with (
        pytest.raises(ClusterError, match="is a symbolic link"),
        Cluster(workdir, schedulers=1, seed_peers=0, peers=1),
    ):
        pass
    assert victim.read_bytes().startswith(b"another user's")


def test_a_data_directory_of_another_user_is_refused(tmp_path: Path):
    if os.geteuid() != 0:
        pytest.skip("needs root to give a directory to another user")
    workdir = tmp_path / "c"
    data = workdir / "data" / "peer-0"
    data.mkdir(parents=True)
    os.chown(data, 65534, 65534)  # nobody's
    with (
        pytest.raises(ClusterError, match="belongs to user 65534"),
        Cluster(workdir, schedulers=1, seed_peers=0, peers=1),
    ):
        pass
