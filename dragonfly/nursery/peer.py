"""`--role peer` and `--role seed-peer`: the peer daemon's nursery tree.

Store, scheduler connections, downloads, upload server, proxy and the local API
socket in one trio nursery tree (a seed peer is the same daemon with
`seed.enabled`). Background loops (GC, the store's flusher) run under a
Supervisor: their failures are retried and shown on /healthy, never end the
daemon. The daemon is the `PeerServices` its components (dragonfly/peer/) are given.

A host's ID is the one its credential names (trust.credential_file), so a restarted
peer is the same host; without a credential (insecure mode, or a peer with no
scheduler) it is made once and kept in the data directory. With a join token
(trust.join_token_file) and no usable credential, the daemon joins at the manager
first and keeps the credential it is issued.

With a manager (scheduler.manager) the daemon asks it for schedulers and its
cluster's settings (dragonfly/peer/discovery.py); the cluster's block list refuses
downloads at the proxy (403 naming the rule), the local API and a seed's triggers."""

from __future__ import annotations

import functools
import os
import secrets
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from dragonfly import __version__
from dragonfly.blocklist import BlockList
from dragonfly.cluster_tls import cluster_client_tls, upload_tls
from dragonfly.config import (
    PeerConfig,
    ProxySection,
    UploadSection,
    data_dir,
    resolved_hostname,
)
from dragonfly.credentials import (
    credential_path,
    join_token,
    peer_credential,
    write_credential_file,
)
from dragonfly.identity import IdentityError
from dragonfly.local_api_path import api_socket
from dragonfly.log import get_logger
from dragonfly.metrics import PeerMetrics
from dragonfly.net.http_client import HTTPClient
from dragonfly.net.http_server import Handler, bound_port, serve, serve_unix
from dragonfly.net.join import join, report_refusal
from dragonfly.net.manager_client import ManagerMember
from dragonfly.net.tls import origin_ssl_context
from dragonfly.nursery.signals import run_until_signal
from dragonfly.peer.discovery import Discovery
from dragonfly.peer.exposure import ProxyGate, checked_addresses
from dragonfly.peer.jobs import HostJobs
from dragonfly.peer.local_api import LocalAPIHandler
from dragonfly.peer.proxy import ProxyHandler
from dragonfly.peer.proxy_workers import ProxyWorkers
from dragonfly.peer.reannounce import Reannouncer
from dragonfly.peer.records import INTERVAL as RECORDS_INTERVAL
from dragonfly.peer.records import RecordBuffer
from dragonfly.peer.request import DownloadRequest
from dragonfly.peer.scheduler_client import SchedulerPool
from dragonfly.peer.tasks import TaskManager
from dragonfly.peer.tunnel import Hijacker
from dragonfly.peer.upload import UploadHandler
from dragonfly.process_setup import tune_process
from dragonfly.ratelimit import RateLimiter
from dragonfly.storage import GCConfig, PieceStore
from dragonfly.supervise import InFlight, Supervisor
from dragonfly.trust import TicketKey, name_from
from dragonfly.wire.messages import AnnounceMember, ClusterConfig, HostInfo, TriggerDownload

log = get_logger("dragonfly.peer")

HOST_ID_FILE = "host-id"


class PeerDaemon:
    """A running peer (or seed peer)."""

    def __init__(self, config: PeerConfig) -> None:
        self.config = config
        self.data_dir: Path = data_dir(config.storage)
        self.metrics = PeerMetrics()
        self.supervisor = Supervisor(
            lambda loop: self.metrics.background_failures.labels(loop).inc()
        )
        self.role = "seed-peer" if config.seed.enabled else "peer"
        d = config.download
        # https origins: the system's CAs plus download.origin_ca_file. This, the hijack
        # CA and the proxy's auth file raise ConfigError naming the key, so a bad file
        # stops the start. Every connection it opens for a proxy client goes to an
        # address that client may reach (checked_addresses).
        self.origin_client = HTTPClient(
            connect_timeout=d.connect_timeout,
            read_timeout=d.read_timeout,
            ssl_context=origin_ssl_context(d),
            resolver=checked_addresses,
        )
        self.hijacker = Hijacker(config.proxy.hijack_https)
        # ConfigError naming trust.credential_file if one is needed and unusable.
        self.credential = peer_credential(config)
        # Without a usable one, a join token gets one from the manager at start.
        manager = config.scheduler.manager
        self.join_token = join_token(config) if manager and not config.trust.insecure else None
        self.cluster_config: ClusterConfig | None = None  # the manager's, once it answered
        self.block_list = BlockList()
        self.discovery: Discovery | None = None
        # Children's tickets are checked with this host's key; without one (and not
        # insecure) the upload port serves nobody.
        self.ticket_key = TicketKey(self.credential.host_key) if self.credential else None
        # TLS (dragonfly/cluster_tls.py): the upload port's certificate, and the cluster's
        # CA that schedulers and parents are verified with; ConfigError naming the key.
        self.upload_tls = upload_tls(config)
        self.cluster_tls = cluster_client_tls(config)
        self.proxy_gate = ProxyGate(config.proxy)
        self.upload_limiter = _limiter(config.upload.rate_limit)
        self.download_limiter = _limiter(d.rate_limit)
        self.source_limiter = _limiter(d.back_to_source_rate_limit)
        self.records = RecordBuffer()
        self.store: PieceStore
        self.schedulers: SchedulerPool
        self.tasks: TaskManager
        self.host: HostInfo
        self.upload_port = 0
        self.proxy_port = 0
        self._serving = False
        self._left = False  # the schedulers were told that this host leaves
        self.uploads = InFlight()  # pieces being uploaded now
        self.proxy_workers: ProxyWorkers | None = None  # proxy.workers processes
        self.stopping = False

    async def drain(self) -> None:
        """Stopping (SIGTERM): say unhealthy, tell the schedulers that this host leaves
        (no child is sent here any more), and let the pieces being uploaded finish."""
        self._serving = False
        self.stopping = True
        uploading = self.uploads.count
        log.info("peer stopping", uploading=uploading)
        await self.schedulers.leave()
        self._left = True
        await self.uploads.idle()  # (the caller bounds the wait)
        if uploading:
            log.info("uploads finished", count=uploading)

    @property
    def healthy(self) -> bool:
        """Serving, and known to every scheduler (a seed must be, before peers ask); with a
        manager, once it named a scheduler."""
        if self.discovery is not None and not self.discovery.found:
            return False
        return self._serving and (not self.schedulers.connections or self.schedulers.all_connected)

    def apply_cluster_config(self, config: ClusterConfig) -> None:
        """The manager's settings for this host's cluster (its block list, at once)."""
        if self.cluster_config is not None and self.cluster_config.revision == config.revision:
            return
        self.cluster_config = config
        self.block_list = BlockList.for_role(config, seed=self.config.seed.enabled)
        if self.proxy_workers is not None:
            self.proxy_workers.tell_all(("block_list", self.block_list))
        log.info("cluster settings applied", cluster_id=config.cluster_id, revision=config.revision)

    async def _join(self) -> None:
        """A credential from the manager, kept where trust.credential_file says."""
        cfg = self.config
        assert self.join_token is not None
        joined = await join(
            cfg.scheduler.manager,
            self.join_token,
            self.role,
            resolved_hostname(cfg.host),
            timeout=cfg.scheduler.connect_timeout,
        )
        write_credential_file(credential_path(cfg), joined.credential)
        self.credential = joined.credential
        self.ticket_key = TicketKey(joined.credential.host_key)

    async def run(
        self, *, task_status: trio.TaskStatus[PeerDaemon] = trio.TASK_STATUS_IGNORED
    ) -> None:
        cfg = self.config
        gc = GCConfig(
            ttl=cfg.storage.task_ttl,
            quota_bytes=cfg.storage.disk_quota,
            high_watermark=cfg.storage.high_watermark,
            low_watermark=cfg.storage.low_watermark,
        )
        async with PieceStore.open(
            self.data_dir,
            fsync=cfg.storage.fsync,
            sync_delay=cfg.storage.sync_delay,
            gc_config=gc,
            supervisor=self.supervisor,
        ) as store:
            self.store = store
            if self.credential is None and self.join_token is not None:
                await self._join()
            try:
                async with trio.open_nursery() as nursery:
                    self.tasks = TaskManager(self, nursery)
                    upload = await nursery.start(
                        self._listener(UploadHandler(self), cfg.upload, "upload", self.upload_tls)
                    )
                    self.upload_port = bound_port(upload)
                    self.host = HostInfo(
                        host_id=self.credential.claims.host_id
                        if self.credential is not None
                        else _stable_host_id(self.data_dir, resolved_hostname(cfg.host)),
                        hostname=resolved_hostname(cfg.host)[:255],
                        ip=cfg.host.ip,
                        upload_port=self.upload_port,
                        idc=cfg.host.idc,
                        location=cfg.host.location,
                        seed=cfg.seed.enabled,
                        upload_limit=cfg.upload.children_limit,
                        upload_rate=cfg.upload.rate_limit,
                        version=__version__,
                        tls=self.upload_tls is not None,
                    )
                    self.schedulers = SchedulerPool(
                        cfg.scheduler.addresses,
                        self.host,
                        role=self.role,
                        on_trigger=self._on_trigger,
                        connect_timeout=cfg.scheduler.connect_timeout,
                        credential=self.credential,
                        discovered=not cfg.scheduler.manager or bool(cfg.scheduler.addresses),
                        on_job=HostJobs(self, self.tasks).handle,
                        ssl_context=self.cluster_tls,
                    )
                    # What this host holds is announced again to a scheduler that comes
                    # back or takes its tasks over (before downloads use the connection).
                    self.reannouncer = Reannouncer(store, self.schedulers, self.tasks)
                    await self.reannouncer.load()
                    self.schedulers.listen(self.reannouncer)
                    store.on_removed = self.reannouncer.removed
                    nursery.start_soon(
                        self.supervisor.restarting, "reannounce", self.reannouncer.run
                    )
                    if cfg.proxy.workers:
                        self.proxy_workers = ProxyWorkers(self, cfg.proxy.workers)
                        store.on_removed = self._removed
                        store.on_restart = self.proxy_workers.restarted
                    proxy = await nursery.start(
                        functools.partial(
                            self._listener(ProxyHandler(self), cfg.proxy, "proxy"),
                            handed=self.proxy_workers and self.proxy_workers.handed,
                        )
                    )
                    self.proxy_port = bound_port(proxy)
                    self.proxy_gate.bind_ports([self.proxy_port, self.upload_port])
                    if self.proxy_workers is not None:
                        nursery.start_soon(
                            self.proxy_workers.run, proxy, [self.proxy_port, self.upload_port]
                        )
                    await nursery.start(
                        serve_unix, LocalAPIHandler(self), api_socket(self.data_dir)
                    )
                    self.host = _with_proxy_port(self.host, self.proxy_port)
                    self.schedulers.host = self.host
                    for conn in self.schedulers.connections.values():
                        conn.host = self.host
                    # Shielded: on shutdown the connections must outlive the rest long
                    # enough to tell the schedulers that this host leaves.
                    scheduler_scope = trio.CancelScope(shield=True)

                    async def run_schedulers(
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                    ) -> None:
                        with scheduler_scope:
                            await self.schedulers.run(task_status=task_status)

                    await nursery.start(run_schedulers)
                    if cfg.scheduler.manager:
                        self.discovery = Discovery(
                            cfg.scheduler.manager,
                            self.schedulers,
                            role=self.role,
                            credential=self.credential,
                            host=lambda: self.host,
                            on_config=self.apply_cluster_config,
                            interval=cfg.scheduler.refresh_interval,
                            timeout=cfg.scheduler.connect_timeout,
                            ssl_context=self.cluster_tls,
                        )
                        await nursery.start(self.discovery.run)
                    nursery.start_soon(
                        self.supervisor.every, cfg.storage.gc_interval, "gc", store.run_gc
                    )
                    nursery.start_soon(
                        self.supervisor.every,
                        RECORDS_INTERVAL,
                        "records",
                        functools.partial(self.records.flush, self.schedulers),
                    )
                    if cfg.seed.enabled and cfg.scheduler.manager:
                        nursery.start_soon(self._manager_member().run)
                    self._serving = True
                    if cfg.trust.insecure:
                        log.warning(
                            "INSECURE: trust.insecure is set: schedulers and children are "
                            "taken at their word, pieces are served without tickets"
                        )
                    log.info(
                        "peer started",
                        role=self.role,
                        host_id=self.host.host_id,
                        proxy=f"{cfg.proxy.listen}:{self.proxy_port}",
                        upload=f"{cfg.upload.listen}:{self.upload_port}",
                        upload_tls=self.host.tls,
                        data_dir=str(self.data_dir),
                    )
                    task_status.started(self)
                    try:
                        await trio.sleep_forever()
                    finally:
                        self._serving = False
                        if not self._left:
                            with trio.CancelScope(shield=True), trio.move_on_after(2):
                                await self.schedulers.leave()
                        scheduler_scope.cancel()
            finally:
                self._serving = False
                await self.origin_client.aclose()

    def _removed(self, task_ids: list[str]) -> None:
        """The store removed tasks: the schedulers are told, the proxy workers forget."""
        self.reannouncer.removed(task_ids)
        if self.proxy_workers is not None:
            self.proxy_workers.removed(task_ids)

    def _listener(
        self,
        handler: Handler,
        section: UploadSection | ProxySection,
        name: str,
        tls: ssl.SSLContext | None = None,
    ) -> Callable[..., Awaitable[None]]:
        """serve() for one of the daemon's listeners, capped at its max_connections."""
        return functools.partial(
            serve,
            handler,
            section.listen,
            section.port,
            max_connections=section.max_connections,
            on_refused=self.metrics.connections_refused.labels(name).inc,
            ssl_context=tls,
        )

    def _manager_member(self) -> ManagerMember:
        """A seed peer registers with the manager (its proxy port and upload port)."""
        cfg = self.config
        announce = AnnounceMember(
            hostname=self.host.hostname,
            ip=cfg.host.ip,
            port=self.proxy_port,
            download_port=self.upload_port,
            cluster_id=cfg.seed.cluster_id,
            idc=cfg.host.idc,
            location=cfg.host.location,
            version=__version__,
        )
        return ManagerMember(
            cfg.scheduler.manager, "seed-peer", announce, credential=self.credential
        )

    async def _on_trigger(self, msg: TriggerDownload) -> None:
        """A scheduler asks this seed peer to fetch a task from the origin first."""
        try:
            request = DownloadRequest(msg.task, dict(msg.headers), seed_trigger=True)
        except IdentityError as exc:
            log.warning("trigger refused", task_id=msg.task_id, error=str(exc))
            return
        if request.task_id != msg.task_id:
            # The ID is what the fields make, never what a sender says it is.
            log.warning("trigger refused: task ID is not its fields'", task_id=msg.task_id)
            return
        refusal = self.block_list.refusal(msg.task)
        if refusal is not None:
            log.warning("trigger refused", task_id=msg.task_id, reason=refusal)
            return
        log.info("triggered", task_id=msg.task_id, url=msg.task.url)
        self.tasks.open(request)


def _stable_host_id(directory: Path, hostname: str) -> str:
    """This host's ID without a credential: made once, then read from the data directory."""
    path = directory / HOST_ID_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        pass
    else:
        with os.fdopen(fd) as f:
            kept = f.read(256).strip()
        if kept:
            return kept[:128]
    name = name_from(hostname, "host", length=100)
    made = f"{name}-{secrets.token_hex(4)}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(made + "\n")
    return made


def _with_proxy_port(host: HostInfo, port: int) -> HostInfo:
    import dataclasses

    return dataclasses.replace(host, proxy_port=port)


def _limiter(rate: int) -> RateLimiter | None:
    return RateLimiter(rate) if rate > 0 else None


def run_peer(cfg: PeerConfig) -> int:
    tune_process()
    daemon = PeerDaemon(cfg)

    async def main(nursery: trio.Nursery) -> None:
        await nursery.start(daemon.run)

    try:
        trio.run(run_until_signal, main, daemon.drain)
    except BaseException as exc:  # a refused join token ends the start with its reason
        return report_refusal(exc)
    return 0
