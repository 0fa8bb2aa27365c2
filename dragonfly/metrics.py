"""Prometheus metrics, one registry per role process, served as text at /metrics."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST.encode()


class RoleMetrics:
    """Metrics every role has: failures of background loops (dragonfly/supervise.py) and
    connections closed at once because a listener was full."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.background_failures = Counter(
            "dragonfly_background_failures",
            "Failures of background loops (GC, the store's flusher...), by loop",
            ["loop"],
            registry=self.registry,
        )
        self.connections_refused = Counter(
            "dragonfly_connections_refused",
            "Connections closed at once because the listener had max_connections open",
            ["listener"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class PeerMetrics(RoleMetrics):
    """Traffic and pieces of a peer or seed peer."""

    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.download_bytes = Counter(
            "dragonfly_download_bytes",
            "Bytes downloaded, by source: p2p (any other peer, seeds included), "
            "back_to_source (the origin), local (served from this peer's store)",
            ["source"],
            registry=r,
        )
        self.upload_bytes = Counter(
            "dragonfly_upload_bytes", "Piece bytes served to other peers", registry=r
        )
        self.pieces = Counter(
            "dragonfly_pieces", "Pieces stored, by source", ["source"], registry=r
        )
        self.piece_failures = Counter(
            "dragonfly_piece_failures",
            "Pieces that failed, by reason",
            ["reason"],
            registry=r,
        )
        self.active_tasks = Gauge("dragonfly_active_tasks", "Downloads in progress", registry=r)
        self.active_uploads = Gauge(
            "dragonfly_active_uploads", "Piece uploads in progress", registry=r
        )
        self.busy_refusals = Counter(
            "dragonfly_upload_busy_refusals",
            "Piece requests answered 503 at once because every upload slot was taken",
            registry=r,
        )
        self.proxy_requests = Counter(
            "dragonfly_proxy_requests",
            "Proxy requests, by how they were served",
            ["mode"],
            registry=r,
        )
        self.back_to_source_fallbacks = Counter(
            "dragonfly_back_to_source_fallbacks",
            "Downloads that went to the origin because no scheduler answered",
            registry=r,
        )
        self.errors = Counter("dragonfly_errors", "Errors, by type", ["type"], registry=r)
        self.stalls = Counter(
            "dragonfly_download_stalls",
            "Downloads with no progress for download.stall_timeout, by the step taken "
            "(reschedule, back_to_source, fail)",
            ["step"],
            registry=r,
        )
        self.proxy_refusals = Counter(
            "dragonfly_proxy_refusals",
            "Proxy requests refused, by reason: client (not allowed), auth (no or wrong "
            "credentials), destination, connect_port, leaf_rate",
            ["reason"],
            registry=r,
        )
        self.proxy_worker_requests = Counter(
            "dragonfly_proxy_worker_requests",
            "Local hits answered by each proxy worker (proxy.workers), by worker",
            ["worker"],
            registry=r,
        )
        for source in ("p2p", "back_to_source", "local"):
            self.download_bytes.labels(source)
        # (counted on every local hit: the child looked up once)
        self.local_bytes = self.download_bytes.labels("local")


# The scheduler core's counts (dragonfly/sched/settings.py, SchedulerCounters) as the
# scheduler's counters: metric name (without _total), help, key of the count.
SCHEDULER_CORE_COUNTERS = (
    ("dragonfly_scheduler_registrations", "Peers registered", "registrations"),
    ("dragonfly_scheduler_piece_reports", "Finished pieces reported", "piece_reports"),
    (
        "dragonfly_scheduler_schedule_decisions",
        "Candidate parent sets sent",
        "schedule_decisions",
    ),
    (
        "dragonfly_scheduler_back_to_source_decisions",
        "Peers told to go back to source",
        "back_to_source",
    ),
    ("dragonfly_scheduler_seed_triggers", "Seed peers triggered", "triggers"),
    ("dragonfly_scheduler_task_failures", "TaskFailed sent to peers", "task_failures"),
    (
        "dragonfly_scheduler_bad_reports",
        "Reports that contradict what the scheduler knows (digests, layouts, task IDs)",
        "bad_reports",
    ),
    ("dragonfly_scheduler_errors", "Error answers to hosts' messages", "errors"),
    (
        "dragonfly_scheduler_reannounced",
        "Complete tasks hosts announced again that became serving peers (HeldTasks)",
        "reannounced",
    ),
    ("dragonfly_scheduler_collected_peers", "Peers dropped after peer_ttl", "collected_peers"),
    ("dragonfly_scheduler_collected_tasks", "Tasks dropped after task_ttl", "collected_tasks"),
    ("dragonfly_scheduler_collected_hosts", "Hosts forgotten after host_ttl", "collected_hosts"),
)
REFUSAL_HELP = (
    "Hosts and registrations refused, by reason: no_credential, expired, "
    "unknown_key, cluster, proof, host_mismatch, role_mismatch, timeout, revoked, bounds, blocked"
)


class _SchedulerCoreCollector:
    """Reads the core's counts when /metrics is scraped: the shell counts nothing twice."""

    def __init__(self, counts: Callable[[], Mapping[str, int]], refusals: Mapping[str, int]):
        self._counts = counts
        self._refusals = refusals

    def collect(self) -> Iterator[CounterMetricFamily]:
        counts = self._counts()
        for name, documentation, key in SCHEDULER_CORE_COUNTERS:
            yield CounterMetricFamily(name, documentation, value=counts[key])
        refusals = CounterMetricFamily(
            "dragonfly_scheduler_refusals", REFUSAL_HELP, labels=["reason"]
        )
        by_reason = {**self._refusals, "bounds": counts["refused_registrations"]}
        for reason, n in sorted(by_reason.items()):
            refusals.add_metric([reason], n)
        yield refusals


class SchedulerMetrics(RoleMetrics):
    """A scheduler's: the core's counts (``counts``, read at each scrape), host
    refusals at the handshake (``refusals``, by reason: the shell's), and its own."""

    def __init__(self, counts: Callable[[], Mapping[str, int]]) -> None:
        super().__init__()
        r = self.registry
        self.refusals: collections.Counter[str] = collections.Counter()
        r.register(_SchedulerCoreCollector(counts, self.refusals))
        self.protocol_errors = Counter(
            "dragonfly_scheduler_protocol_errors", "Invalid messages received", registry=r
        )
        self.connected_hosts = Gauge(
            "dragonfly_scheduler_connected_hosts", "Hosts with an open connection", registry=r
        )


class ManagerMetrics(RoleMetrics):
    """Requests, member keepalives and background work of a manager."""

    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.requests = Counter(
            "dragonfly_manager_requests", "API requests, by status", ["status"], registry=r
        )
        self.keepalives = Counter(
            "dragonfly_manager_keepalives", "Keepalives received from members", registry=r
        )
        self.protocol_errors = Counter(
            "dragonfly_manager_protocol_errors", "Invalid messages on the websocket", registry=r
        )
        self.gc_runs = Counter(
            "dragonfly_manager_gc_runs",
            "Background work rounds this manager ran (it held the lease)",
            registry=r,
        )
        self.gc_changes = Counter(
            "dragonfly_manager_gc_changes",
            "Rows background work changed, by what happened",
            ["change"],
            registry=r,
        )
        self.lease_held = Gauge(
            "dragonfly_manager_lease_held", "1 while this manager holds the GC lease", registry=r
        )
        self.joins = Counter(
            "dragonfly_manager_joins",
            "Join requests, by role and outcome (issued, refused)",
            ["role", "outcome"],
            registry=r,
        )
        self.member_refusals = Counter(
            "dragonfly_manager_member_refusals",
            "Websocket handshakes refused, by reason",
            ["reason"],
            registry=r,
        )
        self.job_parts = Counter(
            "dragonfly_manager_job_parts",
            "Job parts this manager ran through a scheduler, by outcome",
            ["state"],
            registry=r,
        )
        self.download_records = Counter(
            "dragonfly_manager_download_records",
            "Download records received from schedulers",
            registry=r,
        )
