"""The job loop of one manager: claim the parts of clusters that have a scheduler
connected here, run each through that scheduler, write the outcome.

Each round (every POLL seconds): claim what is claimable (dragonfly/manager/jobs/store.py
makes a claim succeed for one manager only), fail parts nobody could run for
`jobs.dispatch_timeout`, and, on the manager holding the `jobs` lease, remove old jobs,
records and traffic. A running part's claim is renewed every third of `gc.lease_ttl`;
if this manager stops, the claim lapses and another manager with a scheduler of that
cluster runs the part again (a host that already holds a task answers at once).

Running a part: build its tasks (an image preheat resolves the manifest here, with the
job's sealed credentials), send `RunJob` to a scheduler of the cluster, and wait for
its `JobResult`s until the job's timeout (plus a grace): a scheduler that goes away or
stays silent fails the part, saying which.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from dragonfly.identity import carries_credentials
from dragonfly.log import get_logger
from dragonfly.manager.context import Context
from dragonfly.manager.jobs import store
from dragonfly.manager.jobs.args import (
    NS,
    PREHEAT_TIMEOUT,
    QUERY_TIMEOUT,
    file_spec,
    filtered_params,
)
from dragonfly.manager.jobs.image import ImageError, blob_spec, default_platform
from dragonfly.manager.jobs.resolve import resolve_image
from dragonfly.manager.jobs.secrets import SealError
from dragonfly.manager.sessions import MemberSession
from dragonfly.manager.store import DatabaseError, Tx, leases, rows
from dragonfly.net.channel import ChannelClosed
from dragonfly.net.http_client import HTTPClient
from dragonfly.wire.codec import MAX_FRAME, encode
from dragonfly.wire.messages import JobTask, RunJob

log = get_logger("dragonfly.manager.jobs")

POLL = 0.5
GRACE = 15.0  # beyond the job's timeout, for the scheduler's last answer
GC_INTERVAL = 60.0
LEASE = "jobs"


@dataclass
class Outcome:
    state: str
    error: str = ""
    results: list[dict[str, Any]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    scheduler_id: int = 0


def collect(tx: Tx, ctx: Context, now: float) -> dict[str, int] | None:
    """Old jobs, records and traffic go (jobs.ttl, records.max_rows, records.traffic_ttl),
    on the manager holding the `jobs` lease; None on the others."""
    if not leases.acquire(tx, LEASE, ctx.holder, now, GC_INTERVAL * 2):
        return None
    cfg = ctx.config
    return store.collect(
        tx,
        now,
        job_ttl=cfg.jobs.ttl,
        max_records=cfg.records.max_rows,
        traffic_ttl=cfg.records.traffic_ttl,
    )


def timeout_of(job_type: str, args: dict[str, Any]) -> float:
    ns = args.get("timeout") or 0
    if ns:
        return float(ns) / NS
    return PREHEAT_TIMEOUT if job_type == "preheat" else QUERY_TIMEOUT


class JobLoop:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.running: set[int] = set()
        self.registries = HTTPClient(connect_timeout=10, read_timeout=60)
        self._next_gc = 0.0

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        await self._round(nursery)
                    except DatabaseError as exc:
                        log.warning("job round skipped: database", error=str(exc))
                    await trio.sleep(POLL)
        finally:
            with trio.CancelScope(shield=True):
                await self.registries.aclose()

    async def _round(self, nursery: trio.Nursery) -> None:
        ctx = self.ctx
        now = ctx.clock()
        clusters = ctx.sessions.scheduler_clusters()
        if clusters:
            ttl = ctx.config.gc.lease_ttl
            for part_id in await ctx.db.run(lambda tx: store.claimable(tx, clusters, now)):
                if part_id in self.running:
                    continue
                got = await ctx.db.run(
                    partial(store.claim, part_id=part_id, holder=ctx.holder, now=now, ttl=ttl)
                )
                if got is not None:
                    self.running.add(part_id)
                    nursery.start_soon(self._run_part, got["job"], got["part"])
        timeout = ctx.config.jobs.dispatch_timeout
        await ctx.db.run(lambda tx: store.expire_unclaimed(tx, now, timeout))
        if now >= self._next_gc:
            self._next_gc = now + GC_INTERVAL
            await self._collect(now)

    async def _collect(self, now: float) -> None:
        counts = await self.ctx.db.run(lambda tx: collect(tx, self.ctx, now))
        for change, n in (counts or {}).items():
            if n:
                self.ctx.metrics.gc_changes.labels(change).inc(n)
                log.info("job collection", change=change, rows=n)

    # ------------------------------------------------------------------ one part

    async def _run_part(self, job: dict[str, Any], part: dict[str, Any]) -> None:
        ctx = self.ctx
        part_id = int(part["id"])
        bound = log.bind(job_id=job["id"], part_id=part_id, cluster=part["scheduler_cluster_id"])
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._renew, part_id)
                try:
                    outcome = await self._execute(job, part)
                except (ImageError, SealError) as exc:
                    outcome = Outcome(store.FAILURE, str(exc))
                except Exception as exc:
                    bound.exception("job part failed")
                    outcome = Outcome(store.FAILURE, f"internal error: {exc!r}")
                nursery.cancel_scope.cancel()
            now = ctx.clock()
            with trio.CancelScope(shield=True):
                written = await ctx.db.run(
                    lambda tx: store.finish_part(
                        tx,
                        part_id,
                        ctx.holder,
                        state=outcome.state,
                        error=outcome.error,
                        results=outcome.results,
                        details=outcome.details,
                        scheduler_id=outcome.scheduler_id,
                        now=now,
                    )
                )
                if written and job["type"] == "sync_peers" and outcome.state == store.SUCCESS:
                    hosts = outcome.details.get("hosts", [])
                    cid = int(part["scheduler_cluster_id"])
                    await ctx.db.run(lambda tx: store.sync_peers(tx, cid, hosts, now))
            ctx.metrics.job_parts.labels(outcome.state).inc()
            bound.info("job part done", state=outcome.state, error=outcome.error[:200])
        except DatabaseError as exc:
            bound.warning("job part outcome not written: database", error=str(exc))
        finally:
            self.running.discard(part_id)

    async def _renew(self, part_id: int) -> None:
        ctx = self.ctx
        ttl = ctx.config.gc.lease_ttl
        while True:
            await trio.sleep(ttl / 3)
            renew = partial(
                store.renew, part_id=part_id, holder=ctx.holder, now=ctx.clock(), ttl=ttl
            )
            with contextlib.suppress(DatabaseError):
                if not await ctx.db.run(renew):
                    log.warning("job part claim lost", part_id=part_id)
                    return

    async def _execute(self, job: dict[str, Any], part: dict[str, Any]) -> Outcome:
        ctx = self.ctx
        job_type = str(job["type"])
        args: dict[str, Any] = rows.loads(job["args"])
        secrets = ctx.sealer.open(job["secrets"])
        cluster_id = int(part["scheduler_cluster_id"])
        feature = "preheat" if job_type == "preheat" else ""
        sessions = ctx.sessions.schedulers(cluster_id, feature)
        if not sessions:
            return Outcome(
                store.FAILURE,
                f"no scheduler of cluster {cluster_id} with the {feature or 'job'} feature is "
                "connected to this manager",
            )
        session = sessions[0]
        kind, tasks, details = await self._tasks(job_type, args, secrets)
        timeout = timeout_of(job_type, args)
        msg = RunJob(
            job_id=int(part["id"]),
            kind=kind,
            tasks=tasks,
            scope=args.get("scope") or "single_seed_peer",
            ips=list(args.get("ips") or []),
            count=int(args.get("count") or 0),
            percentage=int(args.get("percentage") or 0),
            concurrent_tasks=int(args.get("concurrent_task_count") or 8),
            concurrent_peers=int(args.get("concurrent_peer_count") or 500),
            timeout_ms=max(1, round(timeout * 1000)),
        )
        if len(encode(msg)) > MAX_FRAME:
            return Outcome(store.FAILURE, f"too many tasks for one job message ({len(tasks)})")
        error, results, hosts = await self._ask(session, msg, timeout + GRACE)
        if hosts:
            details = {**details, "hosts": hosts}
        failed = bool(error) and not results
        if job_type == "preheat":
            failed = bool(error) or any(not r["ok"] for r in results)
            if failed and not error:
                bad = [r for r in results if not r["ok"]]
                error = f"{len(bad)} of {len(results)} failed: {bad[0]['reason']}"
        elif job_type == "delete_task":
            failed = failed or any(not r["ok"] for r in results)
        return Outcome(
            store.FAILURE if failed else store.SUCCESS,
            error,
            results,
            details,
            session.member_id,
        )

    async def _ask(
        self, session: MemberSession, msg: RunJob, wait: float
    ) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
        """(error, results, hosts) of a RunJob sent to `session`'s scheduler."""
        results: list[dict[str, Any]] = []
        hosts: list[dict[str, Any]] = []
        who = f"scheduler {session.hostname} ({session.ip})"
        answers = session.expect(msg.job_id)
        try:
            try:
                await session.channel.send(msg)
            except ChannelClosed:
                return f"{who} disconnected before it took the job", [], []
            with trio.move_on_after(wait):
                async for answer in answers:
                    results += [_builtins(r) for r in answer.results]
                    hosts += [_builtins(h) for h in answer.hosts]
                    if answer.final:
                        return answer.error, results, hosts
                return f"{who} disconnected before answering", results, hosts
            return f"{who} did not answer within {wait:g}s", results, hosts
        finally:
            session.forget(msg.job_id)

    async def _tasks(
        self, job_type: str, args: dict[str, Any], secrets: dict[str, Any]
    ) -> tuple[str, list[JobTask], dict[str, Any]]:
        """The scheduler's kind of job, its tasks, and details worth keeping."""
        headers: dict[str, str] = dict(secrets.get("headers") or {})
        if job_type == "sync_peers":
            return "list_hosts", [], {}
        if job_type in ("get_task", "delete_task"):
            if args.get("task_id"):
                return job_type, [JobTask(task_id=args["task_id"])], {}
            spec = file_spec(
                args["url"],
                args.get("tag", ""),
                args.get("application", ""),
                args.get("filtered_query_params", ""),
                args.get("piece_length"),
            )
            return job_type, [JobTask(task_id=spec.task_id, task=spec)], {}
        if job_type == "get_image_distribution" or args.get("type") == "image":
            resolved = await resolve_image(
                self.registries,
                args["url"],
                platform=args.get("platform") or default_platform(),
                headers=headers,
                username=args.get("username", ""),
                password=str(secrets.get("password", "")),
            )
            private = any(k.lower() in ("authorization", "cookie") for k in resolved.headers)
            tasks = []
            for blob in resolved.blobs:
                spec = blob_spec(resolved.image, blob)
                tasks.append(
                    JobTask(
                        task_id=spec.task_id,
                        task=spec,
                        headers=resolved.headers,
                        private=private,
                    )
                )
            details = {
                "layers": [resolved.image.blob(b.digest) for b in resolved.blobs],
                "manifest": resolved.platform_digest,
            }
            kind = "preheat" if job_type == "preheat" else "get_task"
            return kind, tasks, details
        urls = ([args["url"]] if args.get("url") else []) + list(args.get("urls") or [])
        tasks = []
        for url in dict.fromkeys(urls):
            spec = file_spec(
                url,
                args.get("tag", ""),
                args.get("application", ""),
                args.get("filtered_query_params", ""),
                args.get("piece_length"),
            )
            private = carries_credentials(
                url, headers, filtered_params(args.get("filtered_query_params", ""))
            )
            tasks.append(JobTask(task_id=spec.task_id, task=spec, headers=headers, private=private))
        return "preheat", tasks, {}


def _builtins(value: Any) -> dict[str, Any]:
    return dataclasses.asdict(value)
