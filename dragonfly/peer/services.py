"""What the peer's listeners (proxy, registry mirror, upload server) use of their
daemon. The daemon (dragonfly/nursery/peer.py) provides it; the listeners never
import the daemon or each other."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from dragonfly.blocklist import BlockList
from dragonfly.peer.context import DownloadServices
from dragonfly.peer.exposure import ProxyGate
from dragonfly.peer.tasks import TaskManager
from dragonfly.peer.tunnel import Hijacker
from dragonfly.ratelimit import RateLimiter
from dragonfly.supervise import InFlight, Supervisor
from dragonfly.trust import TicketKey


class PeerServices(DownloadServices, Protocol):
    data_dir: Path
    tasks: TaskManager
    hijacker: Hijacker
    proxy_gate: ProxyGate
    supervisor: Supervisor
    upload_limiter: RateLimiter | None
    ticket_key: TicketKey | None  # this host's key: children's tickets are checked with it
    block_list: BlockList  # the cluster's, as the manager last said
    uploads: InFlight  # pieces being uploaded now (a stopping daemon lets them finish)
    stopping: bool  # SIGTERM: no new uploads start

    @property
    def healthy(self) -> bool: ...
