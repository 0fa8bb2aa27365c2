"""`python -m dragonfly cluster --config [ROLE:]FILE --set [ROLE:]KEY=VALUE`: each setting
reaches the roles it names, shown by what those roles then do."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dragonfly.testing.process import spawn_logged, stop_process_group
from tests.conftest import Origin
from tests.p2p_support import curl_response

pytestmark = [pytest.mark.nginx, pytest.mark.slow]

READY_TIMEOUT = 120.0


def wait_for_cluster(workdir: Path, proc: Any, log: Path) -> dict[str, Any]:
    """cluster.json once the cluster wrote it (every node healthy)."""
    deadline = time.monotonic() + READY_TIMEOUT
    path = workdir / "cluster.json"
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the cluster exited with {proc.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no cluster.json after {READY_TIMEOUT}s:\n{log.read_text()}")
        time.sleep(0.1)
    return json.loads(path.read_text())


def test_files_and_sets_reach_the_roles_they_name(tmp_path: Path, origin: Origin) -> None:
    every_role = tmp_path / "all.toml"
    every_role.write_text("[log]\nlevel = 'warning'\n")
    peer_only = tmp_path / "peer.toml"
    peer_only.write_text("[[proxy.rules]]\nregex = '^http://'\ndirect = true\n")
    workdir, log = tmp_path / "cluster", tmp_path / "cluster.log"
    argv = [
        sys.executable, "-m", "dragonfly", "cluster", "--workdir", str(workdir),
        "--schedulers", "1", "--seed-peers", "1", "--peers", "1",
        "--config", str(every_role),
        "--config", f"peer:{peer_only}",
        "--set", 'proxy.filtered_query_params=["cfgtest"]',
        "--set", "scheduler:log.level=info",
        "--set", "seed-peer:log.level=info",
    ]  # fmt: skip
    proc = spawn_logged(argv, log)
    try:
        nodes = wait_for_cluster(workdir, proc, log)
        seed, peer = nodes["seed_peers"][0]["proxy"], nodes["peers"][0]["proxy"]
        url = origin.url("small.bin")

        # --set without a role reached the seed peer: the parameter is not in the task ID
        ids = []
        for query in ("", "?cfgtest=1", "?other=1"):
            status, head, body = curl_response(url + query, "-x", seed)
            assert status == 200 and body == origin.files["small.bin"]
            ids.append(head["x-dragonfly-task-id"])
        assert ids[0] == ids[1] != ids[2]

        # the peer's own file reached the peer alone: its rule passes requests straight
        # through, so no task is made
        status, head, body = curl_response(url, "-x", peer)
        assert status == 200 and body == origin.files["small.bin"]
        assert "x-dragonfly-task-id" not in head
    finally:
        stop_process_group(proc)
    assert proc.returncode == 0, log.read_text()

    # The file for every role set warning; a role's --set raised it to info for that role.
    logs = workdir / "logs"
    assert "peer started" in (logs / "seed-peer-0.log").read_text()
    assert "host connected" in (logs / "scheduler-0.log").read_text()
    assert "peer started" not in (logs / "peer-0.log").read_text()

    # Each node's resolved configuration, with the source of every value, is on disk;
    # the cluster's own keys are the node's (its data dir is the one cluster.json names).
    conf = (workdir / "conf" / "peer-0.toml").read_text()
    data_dir = nodes["peers"][0]["data_dir"]
    assert f"data_dir = '{data_dir}'  # --set" in conf
    assert (Path(data_dir) / "metadata.db").exists()
    assert f"level = 'warning'  # file {str(every_role)!r}" in conf
    assert f"direct = true  # file {str(peer_only)!r}" in conf
    assert "filtered_query_params = ['cfgtest']  # --set" in conf
    assert "level = 'info'  # --set" in (workdir / "conf" / "scheduler-0.toml").read_text()
