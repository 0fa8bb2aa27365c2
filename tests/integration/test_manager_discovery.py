"""Discovery with real processes: a manager, schedulers in three clusters and peers, each
its own `python -m dragonfly` process. Each peer asks the manager (scheduler.manager)
every scheduler.refresh_interval and uses the schedulers of the cluster that ranks
first for it: by IDC, then a cluster whose CIDR holds its address outranks that, and
once that cluster's scheduler is gone the peers go back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from dragonfly.credentials import read_credential_file, write_private_text
from dragonfly.testing.nginx import free_port
from dragonfly.testing.probe import metric
from dragonfly.testing.process import spawn_logged, stop_process_group
from dragonfly.testing.trust import LocalIssuer
from tests.manager_support import Api, spawn_manager, until, wait_healthy

PASSWORD = "discovery-root-pass"
FAST = ("keepalive.interval=0.2s", "keepalive.timeout=0.7s", "gc.lease_ttl=1s")


class Processes:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.running: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, role: str, *sets: str) -> None:
        argv = [sys.executable, "-m", "dragonfly", "--role", role, "--set", "log.format=json"]
        for item in sets:
            argv += ["--set", item]
        log = self.workdir / f"{name}.log"
        self.running[name] = spawn_logged(argv, log, env=dict(os.environ))

    def stop(self, name: str) -> None:
        stop_process_group(self.running.pop(name))

    def stop_all(self) -> None:
        for name in list(self.running):
            self.stop(name)


async def test_discovery_picks_the_cluster_by_cidr_and_idc(tmp_path: Path) -> None:
    issuer = LocalIssuer(tmp_path / "trust")
    manager, url = spawn_manager(
        tmp_path / "m",
        *FAST,
        f"trust.secret_file={issuer.secret_file}",
        env={"DRAGONFLY_INITIAL_ROOT_PASSWORD": PASSWORD},
    )
    procs = Processes(tmp_path)
    api = Api(url)
    try:
        await wait_healthy(api, manager)
        root = await api.signin("root", PASSWORD)
        clusters = {"default": 1}
        for name, scopes in (("idc", {"idc": "hz-1|hz-2"}), ("cidr", {"cidrs": ["127.0.0.0/8"]})):
            made = await api.call(
                "POST", "/api/v1/clusters", {"name": name, "scopes": scopes}, token=root
            )
            assert made.status == 200, made.raw
            clusters[name] = made.body["id"]
        tokens = {}
        for role in ("scheduler", "peer"):
            reply = await api.call("POST", f"/api/v1/join-tokens/{role}", token=root)
            tokens[role] = tmp_path / f"{role}.token"
            write_private_text(tokens[role], reply.body["token"] + "\n", replace=False)
        ports: dict[str, int] = {}

        def start_scheduler(cluster: str) -> None:
            ports[cluster] = free_port()
            procs.start(
                f"scheduler-{cluster}", "scheduler", f"server.port={ports[cluster]}",
                f"manager.address={url}", f"manager.cluster_id={clusters[cluster]}",
                f"trust.join_token_file={tokens['scheduler']}", f"host.hostname=s-{cluster}",
            )  # fmt: skip

        async def active_schedulers() -> set[str]:
            body = (await api.call("GET", "/api/v1/schedulers?state=active", token=root)).body
            return {row["host_name"] for row in body or []}

        for cluster in ("default", "idc"):
            start_scheduler(cluster)
        await until(lambda: _equals(active_schedulers(), {"s-default", "s-idc"}), "schedulers up")

        for name, idc in (("p-hz", "hz-2"), ("p-other", "elsewhere")):
            procs.start(
                name, "peer", f"storage.data_dir={tmp_path / name}", "proxy.port=0",
                "upload.port=0", "scheduler.addresses=[]", f"scheduler.manager={url}",
                "scheduler.refresh_interval=0.5s", f"trust.join_token_file={tokens['peer']}",
                f"host.idc={idc}", f"host.hostname={name}",
            )  # fmt: skip

        def connected(cluster: str) -> float:
            try:
                return metric(
                    f"http://127.0.0.1:{ports[cluster]}/metrics",
                    "dragonfly_scheduler_connected_hosts",
                )
            except OSError:  # (not listening yet)
                return -1

        await until(lambda: connected("idc") == 1 and connected("default") == 1, "peers placed")
        # which peer went where, as the schedulers reported them to the manager
        host_ids = {
            name: read_credential_file(tmp_path / name / "credential.json").claims.host_id
            for name in ("p-hz", "p-other")
        }

        async def placed() -> dict[str, Any] | None:
            body = (await api.call("GET", "/api/v1/peers?per_page=100", token=root)).body or []
            where = {row["host_id"]: row["scheduler_cluster_id"] for row in body}
            return where if all(h in where for h in host_ids.values()) else None

        where = await until(placed, "both peers in the peers table")
        assert where[host_ids["p-hz"]] == clusters["idc"]  # its IDC is one of the cluster's
        assert where[host_ids["p-other"]] == clusters["default"]

        # a cluster whose CIDR holds the peers' address ranks first (0.30 > 0.25)
        start_scheduler("cidr")
        await until(lambda: connected("cidr") == 2, "both peers moved to the CIDR's cluster")
        await until(lambda: connected("idc") == 0 and connected("default") == 0, "old ones left")
        # and when its scheduler goes, they go back to where they ranked next
        procs.stop("scheduler-cidr")
        await until(lambda: connected("idc") == 1 and connected("default") == 1, "back again")
    finally:
        procs.stop_all()
        stop_process_group(manager)
        await api.aclose()


async def _equals(got: Any, want: set[str]) -> bool:
    return await got == want
