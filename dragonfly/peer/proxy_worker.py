"""A proxy worker: a process that accepts on the daemon's proxy port beside the daemon
and answers local hits (complete tasks shared by everyone), so that many clients of a
few files are served by more than one core.

It runs the daemon's checks in the daemon's order (`ProxyFront`: gate, destination,
rules, credentials, block list). Whatever is not such a local hit goes to the daemon
with its connection and the bytes read so far (`HandOff`): every other request, any
request with a body, a private task, a task the daemon does not hold complete. So the
worker starts no download and talks to no scheduler, origin or manager, and it opens
no task file itself: the daemon passes it an open descriptor of each complete task it
asks about, and tells it when one is removed (dragonfly/peer/proxy_workers.py).

Started by the daemon (`main` with the descriptors of its control pair and of the
listening socket); it exits when the daemon closes the control pair (the daemon stops, or died).
"""

from __future__ import annotations

import collections
import os
import socket
import sys
from dataclasses import dataclass

import trio

from dragonfly.blocklist import BlockList
from dragonfly.config import PeerConfig, ProxyRule
from dragonfly.log import configure, get_logger
from dragonfly.metrics import PeerMetrics
from dragonfly.net.fdpass import ChannelClosed, FdChannel
from dragonfly.net.http_server import HandOff, Request, Responder, serve_listeners
from dragonfly.peer.exposure import ProxyGate
from dragonfly.peer.proxy import ProxyFront
from dragonfly.peer.request import DownloadRequest
from dragonfly.peer.serving import serve_held
from dragonfly.process_setup import tune_process
from dragonfly.storage.metadata import TaskRecord
from dragonfly.wire.oci import Route

log = get_logger("dragonfly.peer.proxy_worker")

# Counters a worker keeps and the daemon adds up (its /metrics shows the sums).
FORWARDED_COUNTERS = ("download_bytes", "proxy_requests", "proxy_refusals", "connections_refused")
# How often a worker reports its counts and the tasks it served (for GC's last use).
STATS_INTERVAL = 1.0
# The daemon answers a lookup at once; one that takes longer is handed off meanwhile.
LOOKUP_TIMEOUT = 5.0
# Open files of tasks a worker keeps (least recently used closed first).
OPEN_FILES = 256


@dataclass(frozen=True)
class WorkerSetup:
    """The daemon's first message to a worker."""

    index: int
    config: PeerConfig
    own_ports: list[int]  # the daemon's proxy and upload ports (the gate refuses them)
    block_list: BlockList
    # The proxy's users (name: argon2 hash) as the daemon read them at its start: a
    # worker started later admits exactly whom the daemon admits.
    users: dict[str, str] | None = None


@dataclass(eq=False)
class OpenTask:
    """A complete task's record and an open descriptor of its file."""

    record: TaskRecord
    fd: int
    users: int = 0
    closed: bool = False  # removed (or evicted): the fd closes when the last user ends


class HeldFiles:
    """The complete tasks this worker may serve, by task ID: asked of the daemon on a
    miss, forgotten when the daemon says a task was removed."""

    def __init__(self, channel: FdChannel, limit: int = OPEN_FILES) -> None:
        self.channel = channel
        self.limit = limit
        self._open: collections.OrderedDict[str, OpenTask] = collections.OrderedDict()
        self._asking: dict[str, trio.Event] = {}
        self.served: set[str] = set()  # since the last report

    async def lookup(self, task_id: str) -> OpenTask | None:
        hit = self._open.get(task_id)
        if hit is not None:
            self._open.move_to_end(task_id)
            return hit
        event = self._asking.get(task_id)
        if event is None:
            event = self._asking[task_id] = trio.Event()
            try:
                await self.channel.send(("lookup", task_id))
            except ChannelClosed:
                self._asking.pop(task_id, None)
                event.set()
        with trio.move_on_after(LOOKUP_TIMEOUT):
            await event.wait()
        return self._open.get(task_id)

    def use(self, task: OpenTask) -> None:
        """Hold a task's descriptor open while it is served (then `release` it)."""
        task.users += 1
        self.served.add(task.record.id)

    def release(self, task: OpenTask) -> None:
        task.users -= 1
        self._maybe_close(task)

    def answered(self, task_id: str, record: TaskRecord | None, fd: int | None) -> None:
        """The daemon's answer to a lookup: the task's record and file, or None."""
        event = self._asking.pop(task_id, None)
        if record is not None and fd is not None:
            self._forget(task_id)
            self._open[task_id] = OpenTask(record, fd)
            while len(self._open) > self.limit:
                self._forget(next(iter(self._open)))
        elif fd is not None:
            os.close(fd)
        if event is not None:
            event.set()

    def removed(self, task_ids: list[str]) -> None:
        for task_id in task_ids:
            self._forget(task_id)

    def _forget(self, task_id: str) -> None:
        task = self._open.pop(task_id, None)
        if task is not None:
            task.closed = True
            self._maybe_close(task)

    @staticmethod
    def _maybe_close(task: OpenTask) -> None:
        if task.closed and task.users == 0 and task.fd >= 0:
            os.close(task.fd)
            task.fd = -1

    def close_all(self) -> None:
        for task_id in list(self._open):
            self._forget(task_id)


class WorkerServices:
    """What the proxy's checks use, as a worker has it."""

    def __init__(self, setup: WorkerSetup) -> None:
        self.config = setup.config
        self.metrics = PeerMetrics()
        self.proxy_gate = ProxyGate(setup.config.proxy, users=setup.users)
        self.proxy_gate.bind_ports(setup.own_ports)
        self.block_list = setup.block_list


class HeldOnlyProxy(ProxyFront):
    """The proxy's checks, then a local hit or a hand-off to the daemon."""

    def __init__(self, services: WorkerServices, held: HeldFiles) -> None:
        super().__init__(services)
        self.held = held

    async def __call__(self, request: Request, responder: Responder) -> None:
        if request.announces_body:
            raise HandOff  # (its body is the daemon's to read)
        await super().__call__(request, responder)

    async def _origin_form(self, request: Request, responder: Responder) -> None:
        raise HandOff

    async def _connect(self, request: Request, responder: Responder) -> None:
        raise HandOff

    async def _registry_blob(
        self, request: Request, responder: Responder, blob: tuple[Route, str, str]
    ) -> None:
        raise HandOff

    async def _direct(self, request: Request, responder: Responder) -> None:
        raise HandOff

    def _count(self, mode: str) -> None:
        """Counted once answered here (`_p2p`): one handed off, the daemon counts."""

    async def _p2p(self, request: Request, responder: Responder, rule: ProxyRule) -> None:
        await super()._p2p(request, responder, rule)  # (HandOff passes through, uncounted)
        super()._count("p2p")  # a local hit, or a refusal (a bad task, the block list)

    async def _p2p_admitted(
        self, request: Request, responder: Responder, req: DownloadRequest
    ) -> None:
        if req.private or req.spec.digest:
            raise HandOff  # (the origin's word on credentials; a digest to check)
        task = await self.held.lookup(req.task_id)
        if task is None:
            raise HandOff
        self.held.use(task)
        try:
            await serve_held(self.basics.metrics, task.record, task.fd, request, responder)
        finally:
            self.held.release(task)


class Worker:
    """One worker process: its listener, its control pair and its counts."""

    def __init__(self, channel: FdChannel, setup: WorkerSetup) -> None:
        self.channel = channel
        self.setup = setup
        self.services = WorkerServices(setup)
        self.held = HeldFiles(channel)
        self._reported: dict[tuple[str, tuple[str, ...]], float] = {}

    async def hand_off(self, stream: trio.SocketStream, received: bytes) -> None:
        """Give a connection (and the bytes of its request read so far) to the daemon.
        A daemon that is gone (stopping) takes nothing: the connection just closes."""
        try:
            await self.channel.send(("connection", received), stream.socket.fileno())
        except ChannelClosed:
            log.info("connection closed: the daemon is gone", worker=self.setup.index)
        except ValueError as exc:  # (a request read so far over the pair's message size)
            log.warning("connection closed: too large to hand off", error=str(exc))

    async def run(self, listeners: list[trio.SocketListener]) -> None:
        proxy = self.setup.config.proxy
        metrics = self.services.metrics
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: serve_listeners(
                    HeldOnlyProxy(self.services, self.held),
                    listeners,
                    max_connections=proxy.max_connections,
                    on_refused=metrics.connections_refused.labels("proxy").inc,
                    hand_off=self.hand_off,
                    task_status=task_status,
                )
            )
            nursery.start_soon(self._report)
            try:
                await self._listen()
            finally:
                nursery.cancel_scope.cancel()
                self.held.close_all()

    async def _listen(self) -> None:
        """The daemon's messages, until it closes the pair."""
        while True:
            try:
                message, fd = await self.channel.receive()
            except ChannelClosed:
                return
            kind = message[0]
            if kind == "task":
                _, task_id, record = message
                self.held.answered(task_id, record, fd)
            elif kind == "removed":
                self.held.removed(message[1])
            elif kind == "block_list":
                self.services.block_list = message[1]
            elif fd is not None:
                os.close(fd)

    def counts(self) -> dict[tuple[str, tuple[str, ...]], float]:
        """What the forwarded counters gained since the last call."""
        gained: dict[tuple[str, tuple[str, ...]], float] = {}
        for name in FORWARDED_COUNTERS:
            for family in getattr(self.services.metrics, name).collect():
                for sample in family.samples:
                    if not sample.name.endswith("_total"):
                        continue
                    key = (name, tuple(sample.labels.values()))
                    delta = sample.value - self._reported.get(key, 0.0)
                    if delta:
                        gained[key] = delta
                        self._reported[key] = sample.value
        return gained

    async def _report(self) -> None:
        while True:
            await trio.sleep(STATS_INTERVAL)
            gained, served = self.counts(), sorted(self.held.served)
            self.held.served.clear()
            if gained or served:
                try:
                    await self.channel.send(("stats", gained, served))
                except ChannelClosed:
                    return


async def run_worker(control_fd: int, listen_fds: list[int]) -> None:
    channel = FdChannel.from_fd(control_fd)
    try:
        message, _ = await channel.receive()
    except ChannelClosed:
        return
    if message[0] != "setup" or not isinstance(message[1], WorkerSetup):
        raise SystemExit("dragonfly proxy worker: the daemon sent no setup first")
    setup: WorkerSetup = message[1]
    cfg = setup.config
    configure(cfg.log.level, cfg.log.format, redacted_params=cfg.proxy.filtered_query_params)
    listeners = []
    for fd in listen_fds:
        sock = socket.socket(fileno=fd)
        sock.set_inheritable(False)
        listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
    log.info("proxy worker serving", worker=setup.index, pid=os.getpid())
    try:
        await Worker(channel, setup).run(listeners)
    finally:
        channel.close()


def main(argv: list[str]) -> int:
    """CONTROL_FD LISTEN_FD...: the descriptors the daemon passed down."""
    if len(argv) < 2 or not all(a.isdigit() for a in argv):
        print(
            "usage: proxy_worker CONTROL_FD LISTEN_FD... (started by the daemon)", file=sys.stderr
        )
        return 2
    tune_process()
    trio.run(run_worker, int(argv[0]), [int(a) for a in argv[1:]])
    return 0
