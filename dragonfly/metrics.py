"""Prometheus metrics, one registry per role process, served as text at /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
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
        for source in ("p2p", "back_to_source", "local"):
            self.download_bytes.labels(source)


class SchedulerMetrics(RoleMetrics):
    """Decisions of a scheduler."""

    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self.registrations = Counter(
            "dragonfly_scheduler_registrations", "Peers registered", registry=r
        )
        self.schedule_decisions = Counter(
            "dragonfly_scheduler_schedule_decisions", "Candidate parent sets sent", registry=r
        )
        self.back_to_source_decisions = Counter(
            "dragonfly_scheduler_back_to_source_decisions",
            "Peers told to go back to source",
            registry=r,
        )
        self.triggers = Counter(
            "dragonfly_scheduler_seed_triggers", "Seed peers triggered", registry=r
        )
        self.piece_reports = Counter(
            "dragonfly_scheduler_piece_reports", "Finished pieces reported", registry=r
        )
        self.protocol_errors = Counter(
            "dragonfly_scheduler_protocol_errors", "Invalid messages received", registry=r
        )
        self.refusals = Counter(
            "dragonfly_scheduler_refusals",
            "Hosts and registrations refused, by reason: no_credential, expired, "
            "unknown_key, cluster, proof, host_mismatch, role_mismatch, timeout, bounds",
            ["reason"],
            registry=r,
        )
        self.connected_hosts = Gauge(
            "dragonfly_scheduler_connected_hosts", "Hosts with an open connection", registry=r
        )
        self.reannounced = Counter(
            "dragonfly_scheduler_reannounced",
            "Complete tasks hosts announced again that became serving peers (HeldTasks)",
            registry=r,
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
