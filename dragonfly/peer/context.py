"""What a download's parts share: the daemon's services it uses, and the download itself
as its parent links and origin link see it (dragonfly/peer/parents.py, source.py)."""

from __future__ import annotations

import ssl
from typing import Any, Protocol

from dragonfly.config import PeerConfig
from dragonfly.engine.actions import Action
from dragonfly.engine.machine import DownloadMachine
from dragonfly.metrics import PeerMetrics
from dragonfly.net.http_client import HTTPClient
from dragonfly.peer.records import RecordBuffer
from dragonfly.peer.scheduler_client import SchedulerPool
from dragonfly.ratelimit import RateLimiter
from dragonfly.storage import PieceStore, TaskHandle
from dragonfly.wire.messages import HostInfo, TaskSpec


class DownloadServices(Protocol):
    """What a download uses of its daemon."""

    config: PeerConfig
    metrics: PeerMetrics
    store: PieceStore
    schedulers: SchedulerPool
    host: HostInfo
    origin_client: HTTPClient
    download_limiter: RateLimiter | None
    source_limiter: RateLimiter | None
    records: RecordBuffer  # download records for the manager
    cluster_tls: ssl.SSLContext | None  # verifies TLS parents (trust.ca_file's CA)


class DownloadContext(Protocol):
    """A download as the links that perform its actions see it."""

    task_id: str
    peer_id: str
    machine: DownloadMachine
    daemon: DownloadServices
    handle: TaskHandle | None
    log: Any  # structlog, bound to the task and peer

    @property
    def spec(self) -> TaskSpec: ...

    @property
    def origin_headers(self) -> dict[str, str]: ...

    def feed(self, actions: list[Action]) -> None:
        """Perform the machine's actions (never awaits)."""

    def count_landed(self, number: int, length: int, source: str, parent: str = "") -> None:
        """Count a piece that is about to be held (metrics by source; the parent's ID when
        it came from one)."""
