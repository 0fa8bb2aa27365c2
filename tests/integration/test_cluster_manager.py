"""`dragonfly cluster` with its manager, end to end: the manager starts first, the others
join it (the schedulers for the cluster secret, the peers for their credentials) and
the peers find their scheduler through it; a file goes through a peer that was given no
scheduler address; the manager lists every member, and the sign-in commands the cluster
prints (and `make demo`) work as written."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from dragonfly.cluster import MANAGER, Cluster, manager_help
from dragonfly.testing.nginx import Nginx
from tests.p2p_support import MiB, curl, finish, metric, random_file, sha256_file


def test_a_file_through_a_peer_that_found_its_scheduler_through_the_manager(
    tmp_path: Path, www: Path, nginx: Nginx
) -> None:
    want = random_file(www / "f.bin", 8 * MiB)
    url = f"{nginx.url}/f.bin"
    with Cluster(tmp_path / "c", schedulers=1, seed_peers=1, peers=2) as cluster:
        described = json.loads((tmp_path / "c" / "cluster.json").read_text())
        manager = described["manager"]
        password_file = Path(manager["root_password_file"])
        assert password_file.stat().st_mode & 0o777 == 0o600
        assert manager["url"].startswith("http://127.0.0.1:")
        for node in cluster.nodes:
            conf = Path(node.info["config"]).read_text()
            if node.role in ("seed-peer", "peer"):  # no scheduler given, a join token
                assert "addresses = []" in conf and f"manager = '{manager['url']}'" in conf
                assert "join_token_file = " in conf and "credential_file = ''" in conf
            if node.role == "scheduler":
                assert "secret_file = ''" in conf and "join_token_file = " in conf
        for name in ("peer-0", "peer-1"):
            code, err = finish(curl(cluster.node(name).info["proxy"], url, tmp_path / name))
            assert code == 0, err
            assert sha256_file(tmp_path / name) == want
        second = cluster.node("peer-1").info["metrics"]
        assert metric(second, "dragonfly_download_bytes_total", 'source="p2p"') > 0

        # what the cluster prints, run as a user would
        script = "\n".join(
            ["set -euo pipefail"]
            + [
                line.strip() + ("; echo" if line.strip().startswith("curl") else "")
                for line in manager_help(cluster.node(MANAGER)).splitlines()[1:]
            ]
        )
        host_ids = {cluster.node(n).info["host_id"] for n in ("seed-peer-0", "peer-0", "peer-1")}
        session = _signin(manager["url"], password_file.read_text().strip())
        for _ in range(40):  # the scheduler reports its hosts within a keepalive interval
            listed = _get(manager["url"], "/api/v1/peers", session)
            if {p["host_id"] for p in listed if p["state"] == "active"} == host_ids:
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"the peers table never listed {host_ids}: {listed}")
        ran = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
        assert ran.returncode == 0, ran.stderr
        schedulers, peers, clusters = (json.loads(x) for x in ran.stdout.split("\n") if x)
        assert {p["host_id"] for p in peers} == host_ids
        assert [(s["state"], s["port"]) for s in schedulers] == [
            ("active", int(cluster.node("scheduler-0").info["url"].rsplit(":", 1)[1]))
        ]
        assert [c["name"] for c in clusters] == ["cluster-1"]  # through a personal token


def _signin(base: str, password: str) -> str:
    body = json.dumps({"name": "root", "password": password}).encode()
    with urllib.request.urlopen(base + "/api/v1/users/signin", body, timeout=10) as answer:
        return str(json.load(answer)["token"])


def _get(base: str, path: str, session: str) -> list[dict[str, Any]]:
    request = urllib.request.Request(base + path, headers={"authorization": f"Bearer {session}"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        found: list[dict[str, Any]] = json.load(answer)
        return found
