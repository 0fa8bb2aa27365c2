"""`--role peer` and `--role seed-peer`: the peer daemon's nursery tree.

Store, scheduler connections, downloads, upload server, proxy and the local API
socket in one trio nursery tree (a seed peer is the same daemon with
`seed.enabled`). Background loops (GC, the store's flusher) run under a
Supervisor: their failures are retried and shown on /healthy, never end the
daemon. The daemon is the `PeerServices` its components (dragonfly/peer/) are given.

A host's ID is the one its credential names (trust.credential_file), so a restarted
peer is the same host; without a credential (insecure mode, or a peer with no
scheduler) it is made once and kept in the data directory."""

from __future__ import annotations

import functools
import os
import re
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from dragonfly import __version__
from dragonfly.config import (
    PeerConfig,
    ProxySection,
    UploadSection,
    data_dir,
    resolved_hostname,
)
from dragonfly.credentials import peer_credential
from dragonfly.identity import IdentityError
from dragonfly.local_api_path import api_socket
from dragonfly.log import get_logger
from dragonfly.metrics import PeerMetrics
from dragonfly.net.http_client import HTTPClient
from dragonfly.net.http_server import Handler, bound_port, serve, serve_unix
from dragonfly.net.manager_client import ManagerMember
from dragonfly.net.tls import origin_ssl_context
from dragonfly.nursery.signals import run_until_signal
from dragonfly.peer.exposure import ProxyGate, checked_addresses
from dragonfly.peer.jobs import HostJobs
from dragonfly.peer.local_api import LocalAPIHandler
from dragonfly.peer.proxy import ProxyHandler
from dragonfly.peer.reannounce import Reannouncer
from dragonfly.peer.records import INTERVAL as RECORDS_INTERVAL
from dragonfly.peer.records import RecordBuffer
from dragonfly.peer.request import DownloadRequest
from dragonfly.peer.scheduler_client import SchedulerPool
from dragonfly.peer.tasks import TaskManager
from dragonfly.peer.tunnel import Hijacker
from dragonfly.peer.upload import UploadHandler
from dragonfly.ratelimit import RateLimiter
from dragonfly.storage import GCConfig, PieceStore
from dragonfly.supervise import InFlight, Supervisor
from dragonfly.trust import TicketKey
from dragonfly.wire.messages import AnnounceMember, HostInfo, TriggerDownload

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
        # Children's tickets are checked with this host's key; without one (and not
        # insecure) the upload port serves nobody.
        self.ticket_key = TicketKey(self.credential.host_key) if self.credential else None
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
        """Serving, and known to every scheduler (a seed must be, before peers ask)."""
        return self._serving and (not self.schedulers.connections or self.schedulers.all_connected)

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
            try:
                async with trio.open_nursery() as nursery:
                    self.tasks = TaskManager(self, nursery)
                    upload = await nursery.start(
                        self._listener(UploadHandler(self), cfg.upload, "upload")
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
                    )
                    self.schedulers = SchedulerPool(
                        cfg.scheduler.addresses,
                        self.host,
                        role=self.role,
                        on_trigger=self._on_trigger,
                        connect_timeout=cfg.scheduler.connect_timeout,
                        credential=self.credential,
                        on_job=HostJobs(self, self.tasks).handle,
                    )
                    # What this host holds is announced again to a scheduler that comes
                    # back or takes its tasks over (before downloads use the connection).
                    self.reannouncer = Reannouncer(store, self.schedulers, self.tasks)
                    await self.reannouncer.load()
                    self.schedulers.listen(self.reannouncer)
                    nursery.start_soon(
                        self.supervisor.restarting, "reannounce", self.reannouncer.run
                    )
                    proxy = await nursery.start(
                        self._listener(ProxyHandler(self), cfg.proxy, "proxy")
                    )
                    self.proxy_port = bound_port(proxy)
                    self.proxy_gate.bind_ports([self.proxy_port, self.upload_port])
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

    def _listener(
        self, handler: Handler, section: UploadSection | ProxySection, name: str
    ) -> Callable[..., Awaitable[None]]:
        """serve() for one of the daemon's listeners, capped at its max_connections."""
        return functools.partial(
            serve,
            handler,
            section.listen,
            section.port,
            max_connections=section.max_connections,
            on_refused=self.metrics.connections_refused.labels(name).inc,
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
        return ManagerMember(cfg.scheduler.manager, "seed-peer", announce)

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
    name = re.sub(r"[^A-Za-z0-9._:@+-]", "-", hostname)[:100] or "host"
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
    daemon = PeerDaemon(cfg)

    async def main(nursery: trio.Nursery) -> None:
        await nursery.start(daemon.run)

    trio.run(run_until_signal, main, daemon.drain)
    return 0
