"""A peer that names a manager (scheduler.manager) asks it which schedulers to use and
what its cluster's settings are, every scheduler.refresh_interval (every 0.2 s to
2 s until a first answer names a scheduler that answers).

The manager ranks its clusters for this host (CIDR, host name, IDC, location) and
answers with the active schedulers of the best one and that cluster's settings. Each
scheduler's /healthy is checked (over https, with the cluster's CA, for one that speaks
TLS); the ones that answer 200 become the host's schedulers
(the consistent-hash ring over them, dragonfly/peer/scheduler_client.py). An answer
with none that answers changes nothing: the schedulers in use stay. With a credential,
the manager must prove it holds the cluster secret before it is asked anything.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable

import trio

from dragonfly.log import get_logger
from dragonfly.net.channel import ChannelClosed
from dragonfly.net.http_client import HTTPClient, HTTPClientError
from dragonfly.net.manager_client import ask_schedulers
from dragonfly.peer.scheduler_client import SchedulerPool
from dragonfly.trust import Credential, TrustError
from dragonfly.wire.codec import ProtocolError
from dragonfly.wire.messages import ClusterConfig, HostInfo, ListSchedulers, SchedulerEntry

log = get_logger("dragonfly.peer.discovery")
RETRY_MIN, RETRY_MAX = 0.2, 2.0  # asking again until the manager names a live scheduler


def scheduler_address(entry: SchedulerEntry) -> str:
    """The scheduler's websocket URL: wss:// where it says it speaks TLS (the feature
    "tls" it announced to the manager)."""
    host = f"[{entry.ip}]" if ":" in entry.ip else entry.ip
    scheme = "wss" if "tls" in entry.features else "ws"
    return f"{scheme}://{host}:{entry.port}"


class Discovery:
    def __init__(
        self,
        manager: str,
        pool: SchedulerPool,
        *,
        role: str,
        credential: Credential | None,
        host: Callable[[], HostInfo],
        on_config: Callable[[ClusterConfig], None],
        interval: float,
        timeout: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.manager = manager
        self.pool = pool
        self.role = role
        self.credential = credential
        self.host = host
        self.on_config = on_config
        self.interval = interval
        self.timeout = timeout
        self.ssl_context = ssl_context  # the cluster's CA: a TLS scheduler's health check
        self.found = False  # the manager named a scheduler that answers, at least once
        self.rounds = 0  # answers received
        self.answered = trio.Event()  # the first answer came (its settings are applied)
        self.cluster_id = 0
        self._failures = 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        delay = RETRY_MIN
        while True:
            # Quick rounds only until a first scheduler is found: afterwards the ones in
            # use stay while the manager has none to offer (thousands of peers asking
            # every second would be the manager's load, not theirs).
            if await self.refresh() or self.found:
                delay = RETRY_MIN
                await trio.sleep(self.interval)
            else:
                await trio.sleep(min(delay, self.interval))
                delay = min(delay * 2, RETRY_MAX, self.interval)

    async def refresh(self) -> bool:
        """One round; True when the schedulers in use are the manager's answer."""
        host = self.host()
        query = ListSchedulers(hostname=host.hostname, idc=host.idc, location=host.location)
        try:
            answer = await ask_schedulers(
                self.manager, self.role, self.credential, query, timeout=self.timeout
            )
        except (OSError, ChannelClosed, ProtocolError, TrustError, trio.TooSlowError) as exc:
            return self._failed(str(exc) or repr(exc))
        except Exception as exc:  # trio-websocket's handshake errors and the like
            return self._failed(repr(exc))
        self.rounds += 1
        self._failures = 0
        if answer.config is not None:
            self.on_config(answer.config)
        self.answered.set()
        if not answer.schedulers:
            log.info("the manager has no scheduler for this host yet", manager=self.manager)
            return False
        live = await self._healthy(answer.schedulers)
        if not live:
            log.warning(
                "no scheduler the manager named answers",
                schedulers=[scheduler_address(e) for e in answer.schedulers],
            )
            return False
        if self.cluster_id != answer.cluster_id or set(live) != set(self.pool.connections):
            log.info("schedulers from the manager", cluster_id=answer.cluster_id, schedulers=live)
        self.cluster_id = answer.cluster_id
        self.pool.update(live)
        self.found = True
        return True

    def _failed(self, error: str) -> bool:
        self._failures += 1
        if self._failures in (1, 10) or self._failures % 100 == 0:
            log.warning("manager unreachable", manager=self.manager, error=error)
        return False

    async def _healthy(self, entries: list[SchedulerEntry]) -> list[str]:
        """The addresses of the schedulers whose /healthy answers 200, in the given order."""
        up: dict[str, bool] = {}
        client = HTTPClient(
            connect_timeout=self.timeout, read_timeout=self.timeout, ssl_context=self.ssl_context
        )

        async def check(entry: SchedulerEntry) -> None:
            address = scheduler_address(entry)
            url = "http" + address[2:] + "/healthy"
            try:
                with trio.fail_after(self.timeout):
                    async with client.request("GET", url) as response:
                        await response.read(limit=1 << 16)
                        up[address] = response.status == 200
            except (OSError, HTTPClientError, trio.TooSlowError):
                up[address] = False

        try:
            async with trio.open_nursery() as nursery:
                for entry in entries:
                    nursery.start_soon(check, entry)
        finally:
            await client.aclose()
        return [a for a in (scheduler_address(e) for e in entries) if up.get(a)]
