"""`--role scheduler`: the trio shell around the sans-I/O scheduler.

One h11 listener serves /healthy, /metrics and the websocket peers connect to
(`/v1/scheduler`). Each host's websocket (a `ServerChannel`) has a reader that
feeds the scheduler core every message one receive brings, in one call
(`handle_batch`); what the core decides is queued on the hosts' channels and one
flusher task writes each host's queue with one non-blocking write per round of the
loop (a host whose socket is full is left to its own writer task), so a slow host
never blocks decisions for the others and a busy scheduler pays task switches and
syscalls per batch, not per message. Time comes from trio's clock, once per batch.
The core counts what it decides; /metrics reads its counters.

A host is admitted once it proved its credential (dragonfly/trust.py): its Hello
carries its claims and a nonce, it sends a Proof made with its host key, and the
scheduler answers with its own Proof. The claims must be this cluster's and valid,
and the Hello's host ID and seed flag must be the credential's: nobody speaks as
another host or makes itself a seed peer. Each refusal is an Error naming the reason,
a log line (rate-limited) and a count in dragonfly_scheduler_refusals_total.

With a manager (manager.address), the scheduler registers there and keeps alive; with
a join token (trust.join_token_file) it gets the cluster secret from the manager
before it serves anyone. The manager sends its cluster's settings, applied at once
(parent limits, hosts' load limits, block lists: a blocked registration fails with 403
naming the rule), and the revoked hosts, whose handshakes are refused and whose
connections are dropped; the scheduler reports its hosts for the manager's peers table.

Jobs from the manager (preheat, get_task, delete_task, list_hosts) are run by the
sans-I/O JobRunner (dragonfly/sched/jobs.py) beside the core; hosts' answers and
their download records (stamped with the host they proved) reach the manager over
the member connection, records in batches every RECORDS_INTERVAL.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass

import trio

from dragonfly import __version__
from dragonfly.blocklist import BlockList
from dragonfly.cluster_tls import scheduler_tls
from dragonfly.config import SchedulerConfig, resolved_hostname
from dragonfly.credentials import join_token, scheduler_secrets
from dragonfly.log import LogLimiter, get_logger
from dragonfly.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from dragonfly.metrics import SchedulerMetrics
from dragonfly.net.channel import (
    HANDSHAKE_TIMEOUT,
    SCHEDULER_PATH,
    ChannelClosed,
    Flusher,
    ServerChannel,
    accept_websocket,
)
from dragonfly.net.http_server import Request, Responder, bound_port, serve
from dragonfly.net.join import join, report_refusal
from dragonfly.net.manager_client import ManagerMember
from dragonfly.nursery.signals import run_until_signal
from dragonfly.process_setup import tune_process
from dragonfly.sched.jobs import MANAGER, JobHost, JobRunner
from dragonfly.sched.scheduler import Scheduler, SchedulerSettings, Send
from dragonfly.supervise import InFlight, Supervisor
from dragonfly.trust import (
    Attester,
    Credential,
    TrustError,
    Verifier,
    check_proof,
    issue,
    name_from,
    new_nonce,
    peer_proof,
    scheduler_proof,
)
from dragonfly.wire.codec import MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, Message, ProtocolError
from dragonfly.wire.messages import (
    JOB_VERSION,
    AnnounceMember,
    Claims,
    ClusterConfig,
    DownloadRecord,
    DownloadRecords,
    Error,
    ErrorCode,
    Hello,
    HostInfo,
    Proof,
    RegisterPeer,
    RevokedHost,
    RunJob,
    TaskAnswer,
    TaskFailed,
    batches,
    record_size,
)

log = get_logger("dragonfly.scheduler")

# Messages waiting for one host; a host that falls this far behind is disconnected.
OUTBOX_SIZE = 100_000
TICK = 0.1
RECORDS_INTERVAL = 2.0
RECORDS_PER_MESSAGE = 1000
RECORDS_LIMIT = 20_000  # kept while the manager is away; the oldest go first


@dataclass
class _HostConnection:
    host_id: str
    channel: ServerChannel
    scope: trio.CancelScope
    info: HostInfo  # as its Hello said (the core's copy is capped at the load limit)
    claims: Claims | None


class SchedulerServer:
    """A running scheduler."""

    def __init__(self, config: SchedulerConfig, *, seed: int = 0) -> None:
        self.config = config
        ring = scheduler_secrets(config)  # ConfigError naming trust.secret_file
        self.tls = scheduler_tls(config)  # wss:// and https; ConfigError naming server.tls_*
        self.verifier = Verifier(ring) if ring is not None else None
        # Attestations let a restarted peer's held tasks be believed by any scheduler
        # of the cluster (they share the ring), including this one after a restart.
        attester = Attester(ring) if ring is not None else None
        self.core = Scheduler(SchedulerSettings.from_config(config), seed=seed, attester=attester)
        # With a join token the secret (and the credential) come from the manager.
        self.join_token = join_token(config)  # ConfigError naming trust.join_token_file
        self.credential: Credential | None = None  # proven to the manager
        self.cluster_config: ClusterConfig | None = None  # the manager's, once sent
        self._blocks = {False: BlockList(), True: BlockList()}  # by host.seed
        # The core counts its decisions; /metrics reads them (nothing counted twice).
        self.metrics = SchedulerMetrics(self.core.counters.as_dict)
        self._refusal_log = LogLimiter()
        # The ticker and the flusher run under it: a failure is retried, never fatal.
        self.supervisor = Supervisor(
            lambda loop: self.metrics.background_failures.labels(loop).inc()
        )
        self.hosts: dict[str, _HostConnection] = {}
        self.flusher = Flusher()  # writes every host's messages, once per loop round
        self.port = 0
        self.jobs = JobRunner()
        self.manager: ManagerMember | None = None
        self.records: list[DownloadRecord] = []
        self._stopping = False
        self.connected = InFlight()  # host connections being served

    async def drain(self) -> None:
        """Stopping (SIGTERM): take no more hosts, and tell the connected ones that this
        scheduler goes away (close 1001), so that they turn to the next of the ring, or
        ride through until it is back, at once instead of after a keepalive."""
        self._stopping = True
        log.info("scheduler stopping", hosts=len(self.hosts))
        for conn in list(self.hosts.values()):
            conn.channel.close_soon(1001, "scheduler stopping")
        await self.connected.idle()  # (the caller bounds the wait)

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        server = self.config.server
        await self._identity()
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                functools.partial(
                    serve,
                    self.handle_http,
                    server.listen,
                    server.port,
                    max_connections=server.max_connections,
                    on_refused=self.metrics.connections_refused.labels("scheduler").inc,
                    ssl_context=self.tls,
                )
            )
            self.port = bound_port(listeners)
            # Tickets expire in wall time; the core's clock is trio's.
            self.core.wall_offset = time.time() - trio.current_time()
            if self.verifier is None:
                log.warning("INSECURE: trust.insecure is set: hosts are taken at their word")
            interval = min(TICK, max(self.config.scheduling.retry_interval, 0.01))
            nursery.start_soon(self.supervisor.every, interval, "scheduler_tick", self._tick)
            nursery.start_soon(self.supervisor.restarting, "scheduler_flush", self.flusher.run)
            if self.config.manager.address:
                self.manager = self._manager_member()
                nursery.start_soon(self.manager.run)
                nursery.start_soon(self._forward_records)
            log.info("scheduler started", listen=f"{server.listen}:{self.port}", tls=bool(self.tls))
            task_status.started(self.port)

    async def _identity(self) -> None:
        """The cluster secret from the manager (a join token), and the credential this
        scheduler proves on the manager's websocket: issued there, or made here from the
        secret it holds."""
        cfg = self.config
        hostname = resolved_hostname(cfg.host)
        if self.join_token is not None:
            joined = await join(
                cfg.manager.address, self.join_token, "scheduler", hostname, timeout=5.0
            )
            self.credential = joined.credential
            if not cfg.trust.insecure and joined.ring is not None:
                self.verifier = Verifier(joined.ring)
                self.core.attester = Attester(joined.ring)
        elif self.verifier is not None:
            self.credential = issue(
                self.verifier.ring,
                host_id=f"scheduler-{name_from(hostname, 'host')}",
                role="scheduler",
                now=time.time(),
                ttl=86400 * 365,
            )

    def apply_cluster_config(self, config: ClusterConfig) -> None:
        """The manager's settings for this cluster, at once: parent limits, the load limit
        each host is held to, and the block lists."""
        self.cluster_config = config
        self.core.settings = dataclasses.replace(
            self.core.settings,
            candidate_parent_limit=config.candidate_parent_limit,
            filter_parent_limit=config.filter_parent_limit,
        )
        self._blocks = {
            False: BlockList.for_role(config, seed=False),
            True: BlockList.for_role(config, seed=True),
        }
        for conn in self.hosts.values():
            host = self.core.hosts.get(conn.host_id)
            if host is not None:
                host.update(self._capped(conn.info))
        log.info(
            "cluster settings applied",
            cluster_id=config.cluster_id,
            revision=config.revision,
            candidate_parent_limit=config.candidate_parent_limit,
            filter_parent_limit=config.filter_parent_limit,
        )

    def _capped(self, info: HostInfo) -> HostInfo:
        """A host as the core sees it: its upload slots at most its cluster's load limit."""
        config = self.cluster_config
        if config is None:
            return info
        limit = config.seed_peer_load_limit if info.seed else config.peer_load_limit
        if info.upload_limit <= limit:
            return info
        return dataclasses.replace(info, upload_limit=limit)

    def apply_revocations(self, revoked: list[RevokedHost]) -> None:
        """Refuse these hosts' credentials from now on, and drop those connected."""
        if self.verifier is None:
            return
        self.verifier.revoked = {r.host_id: r.before for r in revoked}
        for conn in list(self.hosts.values()):
            if conn.claims is not None and self.verifier.is_revoked(conn.claims):
                self._refuse(
                    conn.channel,
                    "revoked",
                    f"the credential of {conn.host_id} is revoked",
                    conn.host_id,
                    conn.info.ip,
                )
                conn.scope.cancel()

    def reported_hosts(self) -> list[HostInfo]:
        """The hosts connected now, as their Hellos said (the manager's peers table)."""
        return [conn.info for conn in self.hosts.values()]

    def _manager_member(self) -> ManagerMember:
        host = self.config.host
        announce = AnnounceMember(
            hostname=resolved_hostname(host)[:255],
            ip=host.ip,
            port=self.port,
            cluster_id=self.config.manager.cluster_id,
            idc=host.idc,
            location=host.location,
            # "tls": this scheduler speaks wss:// and https (peers found through the
            # manager connect so, verifying it with the cluster's CA).
            features=["schedule", "preheat", *(["tls"] if self.tls else [])],
            version=__version__,
        )
        return ManagerMember(
            self.config.manager.address,
            "scheduler",
            announce,
            credential=self.credential,
            on_config=self.apply_cluster_config,
            on_revocations=self.apply_revocations,
            hosts=self.reported_hosts,
            on_message=self._from_manager,
        )

    def _from_manager(self, msg: Message) -> None:
        if not isinstance(msg, RunJob):
            return
        now = trio.current_time()
        log.info("job from the manager", job_id=msg.job_id, kind=msg.kind, tasks=len(msg.tasks))
        if msg.kind == "delete_task":
            for task in msg.tasks:
                self._apply(self.core.forget_task(task.task_id, now))
        self._apply(self.jobs.start(msg, now))

    def _keep_records(self, host_id: str, msg: DownloadRecords) -> None:
        if self.manager is None:
            return
        host = self.core.hosts.get(host_id)
        if host is None:
            return
        info = host.info
        for record in msg.records:
            self.records.append(
                dataclasses.replace(
                    record, host_id=info.host_id, hostname=info.hostname, ip=info.ip
                )
            )
        if len(self.records) > RECORDS_LIMIT:
            del self.records[: len(self.records) - RECORDS_LIMIT]

    async def _forward_records(self) -> None:
        while True:
            await trio.sleep(RECORDS_INTERVAL)
            manager, waiting = self.manager, self.records
            if manager is None or not waiting:
                continue
            self.records = []
            for batch in batches(waiting, record_size, RECORDS_PER_MESSAGE):
                manager.queue(DownloadRecords(records=batch))

    async def handle_http(self, request: Request, responder: Responder) -> None:
        path = request.target.split("?", 1)[0]
        if path == "/healthy":
            if self.supervisor.degraded:  # a background loop's last run failed
                await responder.send(503, self.supervisor.describe().encode())
            else:
                await responder.send(200, b"ok\n")
        elif path == "/metrics":
            await responder.send(200, self.metrics.render(), content_type=METRICS_CONTENT_TYPE)
        elif path == SCHEDULER_PATH and responder.is_websocket_request:
            if self._stopping:  # a host told to go away would come straight back
                await responder.send(503, b"scheduler stopping\n")
                return
            await accept_websocket(
                request,
                responder,
                self._serve_host,
                name="host",
                on_protocol_error=self._protocol_error,
                flusher=self.flusher,
            )
        else:
            await responder.send(404, b"not found\n")

    def _blocked(self, host: HostInfo, msg: RegisterPeer) -> bool:
        """A registration the cluster's block list refuses is answered 403 naming the rule."""
        block = self._blocks[host.seed]
        reason = None if block.empty else block.refusal(msg.task)
        if reason is None:
            return False
        self.metrics.refusals["blocked"] += 1
        conn = self.hosts.get(host.host_id)
        if conn is not None:
            conn.channel.queue(
                TaskFailed(task_id=msg.task_id, reason=reason, peer_id=msg.peer_id, http_status=403)
            )
        return True

    def _protocol_error(self, exc: ProtocolError) -> None:
        self.metrics.protocol_errors.inc()

    async def _serve_host(self, channel: ServerChannel) -> None:
        nonce = new_nonce()
        hello = Hello(
            version=PROTOCOL_VERSION,
            min_version=MIN_PROTOCOL_VERSION,
            role="scheduler",
            nonce=nonce,
        )
        key = b""
        host: HostInfo | None = None
        # Hello and proof within one deadline: a socket that says nothing is dropped.
        with trio.move_on_after(HANDSHAKE_TIMEOUT) as waited:
            try:
                peer_hello = await channel.handshake(hello, timeout=HANDSHAKE_TIMEOUT)
            except (ChannelClosed, trio.TooSlowError):
                return
            host = peer_hello.host
            if host is None or peer_hello.role not in ("peer", "seed-peer"):
                channel.queue(
                    Error(
                        code=ErrorCode.PROTOCOL,
                        message="a peer's hello must carry its host",
                        ref=Hello.TAG,
                    )
                )
                channel.close_soon(1002, "hello without host")
                return
            if self.verifier is not None:
                try:
                    key = await self._authenticate(channel, peer_hello, nonce)
                except TrustError as exc:
                    self._refuse(channel, exc.reason, str(exc), host.host_id, host.ip)
                    return
                except ChannelClosed:
                    return
        if waited.cancelled_caught or host is None:
            who = ("", "") if host is None else (host.host_id, host.ip)
            self._refuse(channel, "timeout", "no proof in time", *who)
            return
        host_id = host.host_id
        with trio.CancelScope() as scope, self.connected:
            conn = _HostConnection(host_id, channel, scope, host, peer_hello.claims)
            old = self.hosts.get(host_id)
            if old is not None:
                old.channel.close_soon(1000, "replaced by a new connection")
                old.scope.cancel()
            self.hosts[host_id] = conn
            self.metrics.connected_hosts.set(len(self.hosts))
            if self.manager is not None:
                self.manager.hosts_changed()
            log.info("host connected", host_id=host_id, seed=host.seed, ip=host.ip)
            self.jobs.host_connected(_job_host(host, channel.version))
            try:
                self._apply(
                    self.core.host_connected(
                        self._capped(host), trio.current_time(), key=key, protocol=channel.version
                    )
                )
                handle_batch, clock = self.core.handle_batch, trio.current_time
                while True:
                    try:
                        batch = await channel.receive_batch()
                    except ChannelClosed:
                        break
                    # Jobs' answers go to the job runner; the rest to the core in one
                    # call per receive: the parent updates the batch causes go out once,
                    # net of what it undid.
                    for_core: list[Message] = []
                    for msg in batch:
                        kind = type(msg)
                        if kind is RegisterPeer and self._blocked(host, msg):  # type: ignore[arg-type]
                            continue
                        if kind is TaskAnswer:
                            self._apply(self.jobs.answer(host_id, msg, clock()))  # type: ignore[arg-type]
                        elif kind is DownloadRecords:
                            self._keep_records(host_id, msg)  # type: ignore[arg-type]
                        else:
                            for_core.append(msg)
                    if for_core:
                        self._apply(handle_batch(host_id, for_core, clock()))
            finally:
                if self.hosts.get(host_id) is conn:
                    del self.hosts[host_id]
                    self._apply(self.core.host_disconnected(host_id, trio.current_time()))
                    self._apply(self.jobs.host_disconnected(host_id, trio.current_time()))
                    if self.manager is not None:
                        self.manager.hosts_changed()
                self.metrics.connected_hosts.set(len(self.hosts))
                log.info("host disconnected", host_id=host_id)

    async def _authenticate(self, channel: ServerChannel, hello: Hello, nonce: bytes) -> bytes:
        """The host key of a peer that proved it holds it; TrustError naming why not."""
        assert self.verifier is not None and hello.host is not None
        claims = hello.claims
        if claims is None:
            raise TrustError(
                "no_credential",
                "this cluster requires a host credential (trust.credential_file on the peer)",
            )
        key = self.verifier.host_key(claims, time.time())
        if hello.host.host_id != claims.host_id:
            raise TrustError(
                "host_mismatch",
                f"the hello names host {hello.host.host_id!r}, the credential {claims.host_id!r}",
            )
        if hello.role != claims.role or hello.host.seed != (claims.role == "seed-peer"):
            raise TrustError(
                "role_mismatch",
                f"the hello says {hello.role} (seed={hello.host.seed}), "
                f"the credential {claims.role}",
            )
        msg = await channel.receive()
        if not isinstance(msg, Proof):
            raise TrustError("proof", f"expected a proof after the hello, got {msg.TAG}")
        check_proof(peer_proof(key, hello.nonce, nonce, claims), msg.proof, "peer")
        channel.queue(Proof(proof=scheduler_proof(key, hello.nonce, nonce)))
        return key

    def _refuse(
        self, channel: ServerChannel, reason: str, text: str, host_id: str, ip: str
    ) -> None:
        self.metrics.refusals[reason] += 1
        skipped = self._refusal_log.allow(trio.current_time())
        if skipped is not None:
            log.warning(
                "host refused",
                reason=reason,
                error=text,
                host_id=host_id[:128],
                ip=ip[:64],
                skipped=skipped,
            )
        channel.queue(Error(code=ErrorCode.FORBIDDEN, message=text[:1024], ref=Hello.TAG))
        channel.close_soon(1008, "identity not proven")

    def _apply(self, decisions: list[Send]) -> None:
        hosts = self.hosts
        for decision in decisions:
            msg = decision.message
            if decision.host_id == MANAGER:
                if self.manager is not None:
                    self.manager.queue(msg)
                continue
            conn = hosts.get(decision.host_id)
            if conn is None:
                continue
            channel = conn.channel
            if channel.backlog >= OUTBOX_SIZE:
                # Too far behind: drop that host, never the scheduler.
                log.warning("host too slow, disconnecting", host_id=conn.host_id)
                channel.close_soon(1008, "too slow: messages not read")
                conn.scope.cancel()
                continue
            channel.queue(msg)

    async def _tick(self) -> None:
        self._apply(self.core.tick(trio.current_time()))
        self._apply(self.jobs.tick(trio.current_time()))
        await trio.lowlevel.checkpoint()


def _job_host(host: HostInfo, version: int) -> JobHost:
    return JobHost(
        host_id=host.host_id,
        hostname=host.hostname,
        ip=host.ip,
        seed=host.seed,
        capable=version >= JOB_VERSION,
        upload_port=host.upload_port,
        proxy_port=host.proxy_port or 0,
        idc=host.idc,
        location=host.location,
        version=host.version,
    )




def run_scheduler(cfg: SchedulerConfig) -> int:
    tune_process()

    server = SchedulerServer(cfg)

    async def main(nursery: trio.Nursery) -> None:
        await nursery.start(server.run)

    try:
        trio.run(run_until_signal, main, server.drain)
    except BaseException as exc:  # a refused join token ends the start with its reason
        return report_refusal(exc)
    return 0
