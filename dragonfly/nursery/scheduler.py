"""`--role scheduler`: the trio shell around the sans-I/O scheduler.

One h11 listener serves /healthy, /metrics and the websocket peers connect to
(`/v1/scheduler`). Each host's websocket has a reader that feeds the scheduler
core and a writer that drains that host's outbox, so a slow host never blocks
decisions for the others. Time comes from trio's clock, once per event.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio
import trio_websocket

from dragonfly.config import SchedulerConfig
from dragonfly.log import get_logger
from dragonfly.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from dragonfly.metrics import SchedulerMetrics
from dragonfly.nursery.signals import run_until_signal
from dragonfly.sched.scheduler import Scheduler, SchedulerSettings, Send
from dragonfly.wire.channel import SCHEDULER_PATH, Channel, ChannelClosed
from dragonfly.wire.codec import MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, Message, ProtocolError
from dragonfly.wire.http_server import Request, Responder, bound_port, serve
from dragonfly.wire.messages import (
    CandidateParents,
    Error,
    ErrorCode,
    Hello,
    NeedBackToSource,
    PiecesFinished,
    RegisterPeer,
    TriggerDownload,
)

log = get_logger("dragonfly.scheduler")

# Messages waiting for one host; a host that falls this far behind is disconnected.
OUTBOX_SIZE = 100_000
TICK = 0.1


@dataclass
class _HostConnection:
    host_id: str
    channel: Channel
    outbox: trio.MemorySendChannel[Message]
    scope: trio.CancelScope | None = None


class SchedulerServer:
    """A running scheduler."""

    def __init__(self, config: SchedulerConfig, *, seed: int = 0) -> None:
        self.config = config
        self.core = Scheduler(SchedulerSettings.from_config(config), seed=seed)
        self.metrics = SchedulerMetrics()
        self.hosts: dict[str, _HostConnection] = {}
        self.port = 0

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        server = self.config.server
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(serve, self.handle_http, server.listen, server.port)
            self.port = bound_port(listeners)
            nursery.start_soon(self._ticker)
            log.info("scheduler started", listen=f"{server.listen}:{self.port}")
            task_status.started(self.port)

    async def handle_http(self, request: Request, responder: Responder) -> None:
        path = request.target.split("?", 1)[0]
        if path == "/healthy":
            await responder.send(200, b"ok\n")
        elif path == "/metrics":
            await responder.send(200, self.metrics.render(), content_type=METRICS_CONTENT_TYPE)
        elif path == SCHEDULER_PATH and responder.is_websocket_request:
            await responder.websocket(self._serve_host, message_queue_size=256)
        else:
            await responder.send(404, b"not found\n")

    def _protocol_error(self, exc: ProtocolError) -> None:
        self.metrics.protocol_errors.inc()

    async def _serve_host(self, ws: trio_websocket.WebSocketConnection) -> None:
        channel = Channel(ws, name="host", on_protocol_error=self._protocol_error)
        hello = Hello(version=PROTOCOL_VERSION, min_version=MIN_PROTOCOL_VERSION, role="scheduler")
        try:
            peer_hello = await channel.handshake(hello)
        except (ChannelClosed, trio.TooSlowError):
            return
        host = peer_hello.host
        if host is None or peer_hello.role not in ("peer", "seed-peer"):
            await channel.send(
                Error(
                    code=ErrorCode.PROTOCOL,
                    message="a peer's hello must carry its host",
                    ref=Hello.TAG,
                )
            )
            await channel.aclose(1002, "hello without host")
            return
        send, receive = trio.open_memory_channel[Message](OUTBOX_SIZE)
        conn = _HostConnection(host.host_id, channel, send)
        old = self.hosts.get(host.host_id)
        if old is not None:
            await old.channel.aclose(1000, "replaced by a new connection")
        self.hosts[host.host_id] = conn
        self.metrics.connected_hosts.set(len(self.hosts))
        log.info("host connected", host_id=host.host_id, seed=host.seed, ip=host.ip)
        try:
            async with trio.open_nursery() as nursery:
                conn.scope = nursery.cancel_scope
                nursery.start_soon(self._write, channel, receive, nursery.cancel_scope)
                self._apply(self.core.host_connected(host, trio.current_time()))
                async for msg in channel:
                    self._count(msg)
                    self._apply(self.core.handle(host.host_id, msg, trio.current_time()))
                nursery.cancel_scope.cancel()
        finally:
            if self.hosts.get(host.host_id) is conn:
                del self.hosts[host.host_id]
                self._apply(self.core.host_disconnected(host.host_id, trio.current_time()))
            self.metrics.connected_hosts.set(len(self.hosts))
            log.info("host disconnected", host_id=host.host_id)

    async def _write(
        self,
        channel: Channel,
        outbox: trio.MemoryReceiveChannel[Message],
        scope: trio.CancelScope,
    ) -> None:
        try:
            async for msg in outbox:
                await channel.send(msg)
        except ChannelClosed:
            scope.cancel()

    def _count(self, msg: Message) -> None:
        if isinstance(msg, RegisterPeer):
            self.metrics.registrations.inc()
        elif isinstance(msg, PiecesFinished):
            self.metrics.piece_reports.inc(len(msg.pieces))

    def _apply(self, decisions: list[object]) -> None:
        for decision in decisions:
            if not isinstance(decision, Send):
                continue
            msg = decision.message
            if isinstance(msg, CandidateParents):
                self.metrics.schedule_decisions.inc()
            elif isinstance(msg, NeedBackToSource):
                self.metrics.back_to_source_decisions.inc()
            elif isinstance(msg, TriggerDownload):
                self.metrics.triggers.inc()
            conn = self.hosts.get(decision.host_id)
            if conn is None:
                continue
            try:
                conn.outbox.send_nowait(msg)
            except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                # Too far behind (or going away): drop that host, never the scheduler.
                log.warning("host too slow, disconnecting", host_id=conn.host_id)
                conn.outbox.close()
                if conn.scope is not None:
                    conn.scope.cancel()

    async def _ticker(self) -> None:
        interval = min(TICK, max(self.config.scheduling.retry_interval, 0.01))
        while True:
            await trio.sleep(interval)
            self._apply(self.core.tick(trio.current_time()))


def run_scheduler(cfg: SchedulerConfig) -> int:
    async def main(nursery: trio.Nursery) -> None:
        await nursery.start(SchedulerServer(cfg).run)

    trio.run(run_until_signal, main)
    return 0
