"""The peer's side of the scheduler protocol: one websocket per scheduler, shared by
every download of this host, and a consistent-hash ring that says which scheduler
owns a task.

Each connection has a reader that routes messages to the download they are for
(by task and peer ID) and hands TriggerDownload, and the jobs' DownloadTask,
StatTask and DeleteTask, to the daemon. Connections are
kept open and re-opened with backoff; a download whose scheduler goes away gets
`SchedulerLost` and registers with the next scheduler on the ring.

With a credential, a connection is used only once both sides proved themselves
(`authenticate`): nothing, not a registration nor a client's headers, goes to a
scheduler that cannot show it holds the cluster secret.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from dragonfly.log import get_logger
from dragonfly.net.channel import (
    SCHEDULER_PATH,
    Channel,
    ChannelClosed,
    connect,
)
from dragonfly.net.handshake import authenticate
from dragonfly.trust import Credential, TrustError, new_nonce
from dragonfly.wire.codec import MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, Message
from dragonfly.wire.messages import (
    CandidateParents,
    DeleteTask,
    DownloadTask,
    Error,
    Hello,
    HostInfo,
    LeaveHost,
    NeedBackToSource,
    PieceDigests,
    StatTask,
    TaskAttested,
    TaskFailed,
    TriggerDownload,
)

log = get_logger("dragonfly.peer.scheduler")

ROUTE_QUEUE = 256
KEEPALIVE_INTERVAL = 5.0
KEEPALIVE_TIMEOUT = 10.0


class NoScheduler(Exception):
    """No scheduler answers."""


class SchedulerLost(Exception):
    """The scheduler a download registered with went away."""


def ring_order(task_id: str, addresses: list[str]) -> list[str]:
    """Schedulers in the order a task tries them: highest-random-weight hashing, so a
    task stays with its scheduler when others come and go."""

    def weight(address: str) -> bytes:
        return hashlib.sha256(f"{task_id}\0{address}".encode()).digest()

    return sorted(addresses, key=weight, reverse=True)


def scheduler_url(address: str) -> str:
    """'ws://host:port' → the scheduler's websocket URL."""
    return address.rstrip("/") + SCHEDULER_PATH if "/v1/" not in address else address


def scheduler_hello(
    host: HostInfo, role: str, credential: Credential | None, nonce: bytes
) -> Hello:
    """A host's Hello to a scheduler: its host, and its credential's claims if it has one."""
    return Hello(
        version=PROTOCOL_VERSION,
        min_version=MIN_PROTOCOL_VERSION,
        role=role,
        host=host,
        nonce=nonce,
        claims=credential.claims if credential is not None else None,
    )


@dataclass
class Route:
    """Where messages for one (task, peer) go."""

    send: trio.MemorySendChannel[Message]
    receive: trio.MemoryReceiveChannel[Message]


TriggerHandler = Callable[[TriggerDownload], Awaitable[None]]
JobMessage = DownloadTask | StatTask | DeleteTask


class ConnectionListener(Protocol):
    """Follows a host's scheduler connections (peer/reannounce.py: what this host holds
    is announced again to a scheduler that comes back, or that takes tasks over)."""

    def rejoining(self, conn: SchedulerConnection) -> bool:
        """Whether the Hello says this host held tasks or downloads before."""
        ...

    async def connected(self, conn: SchedulerConnection) -> None:
        """Up and trusted; awaited before any download may use the connection."""
        ...

    def lost(self, conn: SchedulerConnection) -> None: ...

    async def attested(self, msg: TaskAttested) -> None: ...


# A job's request and the connection it came on (the answer goes back there).
JobHandler = Callable[[JobMessage, "SchedulerConnection"], Awaitable[None]]


class SchedulerConnection:
    """A kept-open channel to one scheduler."""

    def __init__(
        self,
        address: str,
        host: HostInfo,
        role: str,
        on_trigger: TriggerHandler,
        timeout: float,
        credential: Credential | None = None,
        on_job: JobHandler | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.address = address
        self.ssl_context = ssl_context  # the cluster's CA, for a wss:// scheduler
        self.host = host
        self.role = role
        self.credential = credential
        self.on_trigger = on_trigger
        self.on_job = on_job
        self.timeout = timeout
        self.channel: Channel | None = None
        self.routes: dict[tuple[str, str], Route] = {}
        self.connected = trio.Event()
        self.failures = 0
        self.listener: ConnectionListener | None = None
        self.sessions = 0  # sessions this connection had (a reconnection is rejoining)

    @property
    def up(self) -> bool:
        return self.channel is not None

    async def run(self, nursery: trio.Nursery) -> None:
        """Connect, serve, reconnect with backoff, until cancelled."""
        backoff = 0.1
        while True:
            nonce = new_nonce()
            host = self.host
            listener = self.listener
            if self.sessions or (listener is not None and listener.rejoining(self)):
                host = dataclasses.replace(host, rejoining=True)
            hello = scheduler_hello(host, self.role, self.credential, nonce)
            try:
                async with connect(
                    scheduler_url(self.address),
                    hello,
                    name=f"scheduler {self.address}",
                    connect_timeout=self.timeout,
                    ssl_context=self.ssl_context,
                ) as channel:
                    if self.credential is not None:
                        await authenticate(channel, self.credential, nonce, timeout=self.timeout)
                    self.channel = channel
                    self.sessions += 1
                    if listener is not None:
                        await listener.connected(self)  # (before any download uses it)
                    self.connected.set()
                    self.failures = 0
                    backoff = 0.1
                    log.info("scheduler connected", scheduler=self.address)
                    async with trio.open_nursery() as connection:
                        connection.start_soon(self._keepalive, channel)
                        await self._read(channel, nursery)
                        connection.cancel_scope.cancel()
                    # (a stopping scheduler says so: 1001 scheduler stopping)
                    log.warning(
                        "scheduler closed the connection",
                        scheduler=self.address,
                        reason=channel.close_reason,
                    )
            except TrustError as exc:
                self.failures += 1
                if self.failures in (1, 10) or self.failures % 100 == 0:
                    log.warning("scheduler not trusted", scheduler=self.address, error=str(exc))
            except (OSError, ChannelClosed, trio.TooSlowError) as exc:
                self.failures += 1
                if self.failures in (1, 10) or self.failures % 100 == 0:
                    log.warning("scheduler unreachable", scheduler=self.address, error=str(exc))
            except Exception as exc:  # trio-websocket's HandshakeError and friends
                self.failures += 1
                if self.failures in (1, 10) or self.failures % 100 == 0:
                    log.warning(
                        "scheduler connection failed", scheduler=self.address, error=repr(exc)
                    )
            finally:
                was_up = self.connected.is_set()
                self.channel = None
                self.connected = trio.Event()
                self._lose_routes()
                if was_up and self.listener is not None:
                    self.listener.lost(self)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def _keepalive(self, channel: Channel) -> None:
        """A scheduler that stops answering pings is gone, even if its socket is not:
        close the channel, so downloads fail over to the next scheduler."""
        while True:
            await trio.sleep(KEEPALIVE_INTERVAL)
            with trio.move_on_after(KEEPALIVE_TIMEOUT) as waited:
                await channel.ws.ping()
            if waited.cancelled_caught:
                log.warning("scheduler does not answer pings", scheduler=self.address)
                await channel.aclose(1001, "no pong")
                return

    async def _read(self, channel: Channel, nursery: trio.Nursery) -> None:
        async for msg in channel:
            if isinstance(msg, TriggerDownload):
                nursery.start_soon(self.on_trigger, msg)
                continue
            if isinstance(msg, TaskAttested):
                if self.listener is not None:
                    nursery.start_soon(self.listener.attested, msg)
                continue
            if isinstance(msg, (DownloadTask, StatTask, DeleteTask)):
                if self.on_job is not None:
                    nursery.start_soon(self.on_job, msg, self)
                continue
            if isinstance(msg, Error):
                log.warning(
                    "scheduler error", scheduler=self.address, code=msg.code, error=msg.message
                )
                continue
            peer_id = getattr(msg, "peer_id", "")
            task_id = getattr(msg, "task_id", "")
            targets: list[Route]
            if isinstance(msg, TaskFailed) and not peer_id:
                targets = [r for (t, _), r in self.routes.items() if t == task_id]
            else:
                route = self.routes.get((task_id, peer_id))
                targets = [route] if route is not None else []
            for route in targets:
                try:
                    route.send.send_nowait(msg)
                except trio.WouldBlock:
                    # A download that does not read its messages is stuck: drop it, it fails over.
                    log.warning("download not reading scheduler messages", task_id=task_id)
                    route.send.close()
                except trio.ClosedResourceError:
                    pass

    def _lose_routes(self) -> None:
        for route in self.routes.values():
            route.send.close()
        self.routes.clear()

    def open_route(self, task_id: str, peer_id: str) -> Route:
        send, receive = trio.open_memory_channel[Message](ROUTE_QUEUE)
        route = Route(send, receive)
        self.routes[(task_id, peer_id)] = route
        return route

    def close_route(self, task_id: str, peer_id: str) -> None:
        route = self.routes.pop((task_id, peer_id), None)
        if route is not None:
            route.send.close()

    async def send(self, msg: Message) -> None:
        channel = self.channel
        if channel is None:
            raise SchedulerLost(f"scheduler {self.address} is not connected")
        try:
            await channel.send(msg)
        except ChannelClosed as exc:
            raise SchedulerLost(str(exc)) from None


class SchedulerSession:
    """One download's conversation with its scheduler."""

    def __init__(self, conn: SchedulerConnection, task_id: str, peer_id: str) -> None:
        self.conn = conn
        self.task_id = task_id
        self.peer_id = peer_id
        self.route = conn.open_route(task_id, peer_id)

    @property
    def address(self) -> str:
        return self.conn.address

    async def send(self, msg: Message) -> None:
        await self.conn.send(msg)

    async def receive(
        self,
    ) -> CandidateParents | PieceDigests | NeedBackToSource | TaskFailed | Message:
        try:
            return await self.route.receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise SchedulerLost(f"scheduler {self.conn.address} went away") from None

    def close(self) -> None:
        self.conn.close_route(self.task_id, self.peer_id)


class SchedulerPool:
    """The schedulers of this host: configured, or as the manager says (`update`)."""

    def __init__(
        self,
        addresses: list[str],
        host: HostInfo,
        *,
        role: str,
        on_trigger: TriggerHandler,
        connect_timeout: float,
        credential: Credential | None = None,
        discovered: bool = True,
        on_job: JobHandler | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.role = role
        self.on_trigger = on_trigger
        self.connect_timeout = connect_timeout
        self.credential = credential
        self.on_job = on_job
        self.ssl_context = ssl_context
        self.listener: ConnectionListener | None = None
        self.connections = {a: self._connection(a) for a in addresses}
        self._scopes: dict[str, trio.CancelScope] = {}
        self._nursery: trio.Nursery | None = None
        # Set once the schedulers are known (at once, unless the manager is to say).
        self.discovered = trio.Event()
        if discovered:
            self.discovered.set()

    def _connection(self, address: str) -> SchedulerConnection:
        conn = SchedulerConnection(
            address,
            self.host,
            self.role,
            self.on_trigger,
            self.connect_timeout,
            self.credential,
            self.on_job,
            self.ssl_context,
        )
        conn.listener = self.listener  # a scheduler the manager names later is followed too
        return conn

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for conn in self.connections.values():
                self._start(conn)
            task_status.started()
            await trio.sleep_forever()  # (open for the schedulers `update` adds)

    def _start(self, conn: SchedulerConnection) -> None:
        assert self._nursery is not None
        nursery = self._nursery
        scope = self._scopes[conn.address] = trio.CancelScope()

        async def run_one() -> None:
            with scope:
                await conn.run(nursery)

        nursery.start_soon(run_one)

    def update(self, addresses: list[str]) -> None:
        """Use these schedulers from now on: new ones are connected, the others dropped
        (their downloads fail over to the next scheduler on their ring)."""
        wanted = dict.fromkeys(addresses)
        for address in [a for a in self.connections if a not in wanted]:
            del self.connections[address]
            scope = self._scopes.pop(address, None)
            if scope is not None:
                scope.cancel()
        for address in wanted:
            if address not in self.connections:
                conn = self.connections[address] = self._connection(address)
                if self._nursery is not None:
                    self._start(conn)
        self.discovered.set()

    @property
    def all_connected(self) -> bool:
        return bool(self.connections) and all(c.up for c in self.connections.values())

    @property
    def any_connected(self) -> bool:
        return any(c.up for c in self.connections.values())

    def listen(self, listener: ConnectionListener) -> None:
        self.listener = listener
        for conn in self.connections.values():
            conn.listener = listener

    def owner(self, task_id: str) -> SchedulerConnection | None:
        """The connected scheduler a download of the task would register with now."""
        return next((c for c in self.candidates(task_id, set()) if c.up), None)

    def candidates(self, task_id: str, exclude: set[str]) -> list[SchedulerConnection]:
        order = ring_order(task_id, list(self.connections))
        return [self.connections[a] for a in order if a not in exclude]

    async def open_session(self, task_id: str, peer_id: str, exclude: set[str]) -> SchedulerSession:
        """A session with the first scheduler on the task's ring that is (or gets) connected.

        A scheduler that is down is skipped at once if it has been failing; one that is
        reconnecting gets up to the connect timeout, as does the manager's first answer.
        """
        if not self.discovered.is_set():
            with trio.move_on_after(self.connect_timeout):
                await self.discovered.wait()
        for conn in self.candidates(task_id, exclude):
            if not conn.up:
                wait = self.connect_timeout if conn.failures < 2 else 0.0
                with trio.move_on_after(wait):
                    await conn.connected.wait()
            if conn.up:
                return SchedulerSession(conn, task_id, peer_id)
        raise NoScheduler(
            "no scheduler answers (tried " + ", ".join(self.connections) + ")"
            if self.connections
            else "no scheduler configured"
        )

    async def leave(self) -> None:
        """Tell every connected scheduler that this host goes away."""
        with trio.move_on_after(1) as scope:
            scope.shield = True
            for conn in self.connections.values():
                if conn.up:
                    with contextlib.suppress(SchedulerLost):
                        await conn.send(LeaveHost(host_id=self.host.host_id))
