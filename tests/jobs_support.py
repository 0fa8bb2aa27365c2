"""A manager (in-process, its API on a real socket) with a whole cluster of real
processes registered to it, for the job tests: the schedulers join the manager's
cluster 1, seed peers its seed peer cluster 1."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from dragonfly.cluster import Cluster
from tests.manager_support import Api, RunningManager, start_manager

JOB_DONE = ("SUCCESS", "FAILURE")


@dataclass
class JobCluster:
    manager: RunningManager
    cluster: Cluster
    root: str  # root's session token

    @property
    def api(self) -> Api:
        return self.manager.api

    async def job(
        self, body: dict[str, Any], *, token: str | None = None, oapi: bool = False
    ) -> Any:
        base = "/oapi/v1/jobs" if oapi else "/api/v1/jobs"
        reply = await self.api.call("POST", base, body, token=token or self.root)
        assert reply.status == 200, reply.raw
        return reply.body

    async def finished(
        self, job_id: int, *, token: str | None = None, oapi: bool = False, rounds: int = 1200
    ) -> Any:
        """Poll the job (every 0.1 s, bounded) until it is SUCCESS or FAILURE."""
        base = "/oapi/v1/jobs" if oapi else "/api/v1/jobs"
        body = None
        for _ in range(rounds):
            reply = await self.api.call("GET", f"{base}/{job_id}", token=token or self.root)
            assert reply.status == 200, reply.raw
            body = reply.body
            assert body["state"] in ("PENDING", *JOB_DONE), body["state"]
            if body["state"] in JOB_DONE:
                return body
            await trio.sleep(0.1)
        raise AssertionError(f"job {job_id} never finished: {body!r}")

    async def run(self, body: dict[str, Any], **kw: Any) -> Any:
        made = await self.job(body, **kw)
        return await self.finished(made["id"], **kw)


async def wait_until(check: Callable[[], Any], rounds: int = 300, pause: float = 0.1) -> Any:
    for _ in range(rounds):
        got = await check()
        if got:
            return got
        await trio.sleep(pause)
    raise AssertionError("condition never held")


@asynccontextmanager
async def job_cluster(
    tmp_path: Path,
    *,
    peers: int = 2,
    seed_peers: int = 1,
    extra: list[str] | None = None,
    manager_overrides: tuple[str, ...] = (),
) -> AsyncIterator[JobCluster]:
    async with trio.open_nursery() as nursery:
        # The cluster without a manager of its own, registered to this one, which holds
        # the cluster's secret (the schedulers' credentials are made from it).
        cluster = Cluster(
            tmp_path / "cluster",
            schedulers=1,
            seed_peers=seed_peers,
            peers=peers,
            extra=list(extra or []),
            manager=False,
        )
        manager = await start_manager(
            nursery,
            tmp_path / "manager",
            "keepalive.interval=0.5s",
            f"trust.secret_file={cluster.issuer.secret_file}",
            *manager_overrides,
        )
        cluster.overrides = [
            f"scheduler:manager.address={manager.url}",
            *([f"seed-peer:scheduler.manager={manager.url}"] if seed_peers else []),
        ]
        await trio.to_thread.run_sync(cluster.start)
        try:
            root = await manager.root()
            jc = JobCluster(manager, cluster, root)

            async def registered() -> bool:
                found = await jc.api.call("GET", "/api/v1/schedulers", token=root)
                return any(s["state"] == "active" for s in found.body)

            await wait_until(registered)
            yield jc
        finally:
            await trio.to_thread.run_sync(cluster.stop)
            manager.stop()
            nursery.cancel_scope.cancel()
