"""A host's side of the manager's websocket: schedulers and seed peers register and keep
alive (`ManagerMember`); any host asks which schedulers to use (`ask_schedulers`).

`ManagerMember.run` connects to the manager's websocket, proves its credential (the
handshake of the scheduler websocket, with the manager proving itself back), sends
`AnnounceMember`, learns its keepalive interval from `MemberRegistered` and sends a
`Ping` at that interval (a missing `Pong` within two intervals counts as a lost
connection). A scheduler also gets its cluster's settings (`ConfigUpdate`) and the
revoked hosts (`Revocations`), handed to its callbacks, and reports its hosts
(`HostsReport`) at once, every `hosts_report_ms`, on `SyncHosts`, and when hosts come
or go (`hosts_changed`; at most once a keepalive interval). On any loss it
waits a moment and starts over; the manager marks the row inactive when the
connection ends, and active again at the next registration.

Other messages from the manager (jobs) go to `on_message`; `queue` sends one to the
manager (job results, download records) as soon as a session is up, keeping at most
OUTBOX_LIMIT while none is.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from urllib.parse import urlsplit

import trio

from dragonfly.log import get_logger
from dragonfly.net.channel import MANAGER_PATH, Channel, ChannelClosed, connect
from dragonfly.net.handshake import authenticate
from dragonfly.trust import Credential, TrustError, new_nonce
from dragonfly.wire.codec import MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, Message, ProtocolError
from dragonfly.wire.messages import (
    AnnounceMember,
    ClusterConfig,
    ConfigUpdate,
    Error,
    Hello,
    HostInfo,
    HostsReport,
    ListSchedulers,
    MemberRegistered,
    Ping,
    Pong,
    Revocations,
    RevokedHost,
    SchedulerList,
    SyncHosts,
)

log = get_logger("dragonfly.manager_client")
RETRY_MIN, RETRY_MAX = 0.5, 10.0
REPORT_CHUNK = 1000  # hosts per HostsReport (well under the frame and list limits)
OUTBOX_LIMIT = 10_000


def websocket_url(manager: str) -> str:
    """http://host:port → ws://host:port/v1/manager."""
    parts = urlsplit(manager)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return f"{scheme}://{parts.netloc}{MANAGER_PATH}"


def manager_hello(role: str, credential: Credential | None, nonce: bytes) -> Hello:
    return Hello(
        version=PROTOCOL_VERSION,
        min_version=MIN_PROTOCOL_VERSION,
        role=role,
        nonce=nonce,
        claims=credential.claims if credential is not None else None,
    )


async def ask_schedulers(
    manager: str,
    role: str,
    credential: Credential | None,
    query: ListSchedulers,
    *,
    timeout: float = 5.0,
) -> SchedulerList:
    """Which schedulers (and settings) the manager has for this host. With a credential,
    nothing is asked until the manager proved it holds the cluster secret."""
    nonce = new_nonce()
    async with connect(
        websocket_url(manager),
        manager_hello(role, credential, nonce),
        name="manager",
        connect_timeout=timeout,
    ) as channel:
        if credential is not None:
            await authenticate(channel, credential, nonce, timeout=timeout, who="manager")
        await channel.send(query)
        with trio.fail_after(timeout):
            while True:
                answer = await channel.receive()
                if isinstance(answer, SchedulerList):
                    return answer
                if isinstance(answer, Error):
                    raise ChannelClosed(f"manager: {answer.message}")


class ManagerMember:
    def __init__(
        self,
        manager: str,
        role: str,
        announce: AnnounceMember,
        *,
        credential: Credential | None = None,
        connect_timeout: float = 5.0,
        on_config: Callable[[ClusterConfig], None] | None = None,
        on_revocations: Callable[[list[RevokedHost]], None] | None = None,
        hosts: Callable[[], list[HostInfo]] | None = None,
        on_message: Callable[[Message], None] | None = None,
    ) -> None:
        self.url = websocket_url(manager)
        self.role = role
        self.announce = announce
        self.credential = credential
        self.connect_timeout = connect_timeout
        self.on_config = on_config
        self.on_revocations = on_revocations
        self.hosts = hosts
        self.on_message = on_message
        self.member_id = 0
        self.registrations = 0  # how many times the manager accepted this member
        self.reports = 0  # HostsReports sent (whole reports)
        self._report_now = trio.Event()
        self.dropped = 0  # messages for the manager dropped while it was away too long
        self._outbox: deque[Message] = deque()
        self._outbox_ready = trio.Event()

    def hosts_changed(self) -> None:
        """A host came or went: report soon (at most once a keepalive interval)."""
        self._report_now.set()

    def queue(self, msg: Message) -> None:
        """Send `msg` to the manager (in order, as soon as a session is up)."""
        if len(self._outbox) >= OUTBOX_LIMIT:
            self._outbox.popleft()
            self.dropped += 1
        self._outbox.append(msg)
        self._outbox_ready.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        delay = RETRY_MIN
        while True:
            try:
                await self._session()
                delay = RETRY_MIN
            except (OSError, ChannelClosed, ProtocolError, trio.TooSlowError, TrustError) as exc:
                log.warning("manager connection lost", url=self.url, error=str(exc) or repr(exc))
            except Exception as exc:  # trio-websocket's handshake errors and the like
                log.warning("manager connection failed", url=self.url, error=repr(exc))
            await trio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    async def _session(self) -> None:
        nonce = new_nonce()
        hello = manager_hello(self.role, self.credential, nonce)
        async with connect(
            self.url, hello, name="manager", connect_timeout=self.connect_timeout
        ) as channel:
            if self.credential is not None:
                await authenticate(
                    channel, self.credential, nonce, timeout=self.connect_timeout, who="manager"
                )
            await channel.send(self.announce)
            with trio.fail_after(self.connect_timeout):
                answer = await channel.receive()
            if not isinstance(answer, MemberRegistered):
                reason = answer.message if isinstance(answer, Error) else answer.TAG
                raise ChannelClosed(f"manager refused registration: {reason}")
            self.member_id = answer.member_id
            self.registrations += 1
            interval = answer.keepalive_ms / 1000
            log.info("registered with the manager", member_id=self.member_id, interval=interval)
            await self._keep_alive(channel, interval, answer.hosts_report_ms / 1000)

    async def _keep_alive(self, channel: Channel, interval: float, report_every: float) -> None:
        last_pong = trio.current_time()

        async def read() -> None:
            nonlocal last_pong
            while True:
                msg = await channel.receive()
                if isinstance(msg, Pong):
                    last_pong = trio.current_time()
                elif isinstance(msg, ConfigUpdate):
                    if self.on_config is not None:
                        self.on_config(msg.config)
                elif isinstance(msg, Revocations):
                    if self.on_revocations is not None:
                        self.on_revocations(msg.hosts)
                elif isinstance(msg, SyncHosts):
                    self._report_now.set()
                elif isinstance(msg, Error):
                    raise ChannelClosed(f"manager: {msg.message}")
                elif self.on_message is not None:
                    self.on_message(msg)

        async def write() -> None:
            while True:
                while self._outbox:
                    await channel.send(self._outbox[0])
                    self._outbox.popleft()
                self._outbox_ready = trio.Event()
                await self._outbox_ready.wait()

        async def report() -> None:
            while True:
                self._report_now = trio.Event()
                await self._report(channel)
                await trio.sleep(interval)  # changes in a burst make one report
                with trio.move_on_after(report_every if report_every > 0 else float("inf")):
                    await self._report_now.wait()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            if self.hosts is not None:
                nursery.start_soon(report)
            nursery.start_soon(write)
            for nonce in itertools.count():
                await channel.send(Ping(nonce=nonce % 2**64))
                await trio.sleep(interval)
                if trio.current_time() - last_pong > 2 * interval + self.connect_timeout:
                    raise trio.TooSlowError("no keepalive answer from the manager")

    async def _report(self, channel: Channel) -> None:
        assert self.hosts is not None
        hosts = self.hosts()
        chunks = [hosts[i : i + REPORT_CHUNK] for i in range(0, len(hosts), REPORT_CHUNK)] or [[]]
        for i, chunk in enumerate(chunks):
            await channel.send(HostsReport(hosts=chunk, last=i == len(chunks) - 1))
        self.reports += 1
