"""One task being downloaded by this peer: the trio driver of the download machine.

Every decision is the machine's (dragonfly/engine/machine.py): this module turns
sockets, the store and the clock into its events, and performs the actions it
returns — scheduler messages, parent subscriptions, piece requests, origin
requests, announcements to children — each in its own task. Performing actions
never awaits (`_feed`), so the machine sees events one at a time, in the order
they happened. Clients of the proxy wait on the download's events (`wait_piece`,
`wait_finished`), and children on their announcement channels.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import secrets
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import trio

from dragonfly.config import PeerConfig
from dragonfly.engine.actions import (
    Action,
    Announce,
    Cancel,
    Complete,
    Failed,
    Fetch,
    FetchOrigin,
    Finished,
    MachineConfig,
    OpenTask,
    ProbeOrigin,
    RangesDone,
    Send,
    StreamOrigin,
    Subscribe,
    Unsubscribe,
)
from dragonfly.engine.machine import DownloadMachine, Phase
from dragonfly.errors import find_exception
from dragonfly.identity import credential_scope
from dragonfly.log import bound, get_logger
from dragonfly.metrics import PeerMetrics
from dragonfly.net.channel import ANNOUNCE_PATH, ChannelClosed, connect
from dragonfly.net.http_client import HTTPClient, HTTPClientError, discard
from dragonfly.peer.scheduler_client import (
    NoScheduler,
    SchedulerLost,
    SchedulerPool,
    SchedulerSession,
)
from dragonfly.peer.source import OriginChanged, OriginError, OriginFetcher
from dragonfly.ratelimit import RateLimiter
from dragonfly.storage import (
    DigestMismatch,
    PieceSink,
    PieceStore,
    StorageError,
    TaskHandle,
    TaskRecord,
    TaskState,
)
from dragonfly.wire.codec import MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, Message
from dragonfly.wire.messages import (
    AnnounceDone,
    Hello,
    HostInfo,
    ParentInfo,
    PieceAnnounce,
    PieceInfo,
    TaskSpec,
)
from dragonfly.wire.messages import (
    Subscribe as SubscribeMessage,
)

log = get_logger("dragonfly.peer.download")


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


def machine_config(cfg: PeerConfig) -> MachineConfig:
    """The machine's knobs from a peer's configuration."""
    d = cfg.download
    return MachineConfig(
        concurrent_pieces=d.concurrent_piece_count,
        piece_timeout=d.piece_timeout,
        origin_concurrency=d.origin_concurrency,
        back_to_source=d.back_to_source,
    )


class ParentBusy(Exception):
    """A parent refused a piece request at once: every upload slot of its host is taken."""


class DownloadFailed(Exception):
    """The download cannot complete; `http_status` is the origin's when it refused."""

    def __init__(self, reason: str, http_status: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.http_status = http_status

    @property
    def client_status(self) -> int:
        """The status to answer a client with: the origin's error, else 502."""
        return self.http_status if 400 <= self.http_status < 600 else 502


@dataclass
class DownloadRequest:
    """What a client asked for: the task (whose ID is computed from it) and how."""

    spec: TaskSpec
    headers: dict[str, str] = field(default_factory=dict)
    back_to_source: bool = True
    # A seed peer answering a trigger: it is the origin's first reader.
    seed_trigger: bool = False
    # False: only the byte ranges given through `Download.want_range` (a Range request
    # with proxy.prefetch off); the rest of the task is left for later.
    whole: bool = True
    task_id: str = field(init=False)

    def __post_init__(self) -> None:
        self.task_id = self.spec.task_id  # IdentityError for a spec that makes none

    @classmethod
    def for_url(
        cls,
        url: str,
        *,
        tag: str = "",
        application: str = "",
        headers: dict[str, str] | None = None,
        filtered_query_params: list[str] | None = None,
        back_to_source: bool = True,
        shared_credentials: bool = False,
    ) -> DownloadRequest:
        """The request and its task. A download made with someone's credentials
        (Authorization, Cookie) is theirs unless a rule says the origin is asked first
        (`shared_credentials`): its task is scoped to those credentials, so nobody
        else is ever served it from P2P."""
        headers = headers or {}
        spec = TaskSpec(
            url=url,
            tag=tag,
            application=application,
            filtered_query_params=list(filtered_query_params or []),
            scope="" if shared_credentials else credential_scope(headers),
        )
        return cls(spec, headers, back_to_source=back_to_source)


@dataclass
class _Parent:
    info: ParentInfo
    client: HTTPClient
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    @property
    def base_url(self) -> str:
        host = f"[{self.info.ip}]" if ":" in self.info.ip else self.info.ip
        return f"http://{host}:{self.info.upload_port}"


class Download:
    """The download of one task on this peer (shared by every client asking for it)."""

    def __init__(self, daemon: DownloadServices, request: DownloadRequest) -> None:
        self.daemon = daemon
        self.request = request
        self.task_id = request.task_id
        self.peer_id = f"{daemon.host.host_id}-{secrets.token_hex(6)}"
        self.log = log.bind(task_id=self.task_id, peer_id=self.peer_id)
        self.machine = DownloadMachine(
            self.task_id,
            self.peer_id,
            request.spec,
            headers=request.headers,
            config=machine_config(daemon.config),
            back_to_source=request.back_to_source,
            seed_trigger=request.seed_trigger,
            whole=request.whole,
        )
        self.handle: TaskHandle | None = None
        # progress and outcome, for clients
        self.metadata_ready = trio.Event()
        self.finished = trio.Event()
        self.error: DownloadFailed | None = None
        self._changed = trio.Event()
        self._waiting: dict[int, int] = {}  # piece → streams waiting for it
        self._ended = trio.Event()  # the machine is done (finished, failed, ranges had)
        # the I/O the machine's actions started
        self._nursery: trio.Nursery | None = None
        self._session: SchedulerSession | None = None
        self._outbox: deque[Message] = deque()
        self._outbox_ready = trio.Event()
        self._timer_rearm = trio.Event()
        self._parents: dict[str, _Parent] = {}
        self._retired: list[HTTPClient] = []  # clients of dropped parents, closed at the end
        self._fetch_scopes: dict[int, trio.CancelScope] = {}
        self._origin: OriginFetcher | None = None
        self._send_lock = trio.Lock()  # the sender and the final flush keep the order
        self._children: dict[int, trio.MemorySendChannel[list[PieceInfo]]] = {}
        self._child_tokens = itertools.count()
        self.started_at = trio.current_time()

    # ------------------------------------------------------------ what clients read

    @property
    def content_length(self) -> int:
        return self.machine.layout.content_length

    @property
    def piece_length(self) -> int:
        return self.machine.layout.piece_length

    @property
    def piece_count(self) -> int:
        return self.machine.layout.piece_count

    @property
    def etag(self) -> str:
        return self.machine.layout.etag

    @property
    def last_modified(self) -> str:
        return self.machine.layout.last_modified

    @property
    def content_type(self) -> str:
        return self.machine.layout.content_type

    @property
    def have(self) -> set[int]:
        """Pieces verified and stored."""
        return self.machine.have

    @property
    def bytes_p2p(self) -> int:
        return self.machine.counters.bytes_p2p

    @property
    def bytes_source(self) -> int:
        return self.machine.counters.bytes_source

    @property
    def done(self) -> bool:
        return self.finished.is_set() or self.error is not None

    @property
    def accepting(self) -> bool:
        """False once it decided to stop: a new client starts a new download."""
        return self.machine.phase in (Phase.STARTING, Phase.P2P, Phase.SOURCE) and not (
            self.machine.done or self._ended.is_set()
        )

    @property
    def clients(self) -> int:
        return self.machine.clients

    @property
    def completed_bytes(self) -> int:
        geometry = self.machine.layout.geometry
        if geometry is None:
            return 0
        return sum(geometry.length(n) for n in self.have)

    def want_all(self) -> None:
        """From now on fetch the whole task."""
        self._feed(self.machine.want_all(trio.current_time()))

    def want_range(self, start: int, end: int) -> None:
        """Also fetch bytes [start, end] (inclusive)."""
        self._feed(self.machine.want_range(start, end, trio.current_time()))

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        """A client stream uses this download (attach right after TaskManager.open, with
        no await between, so the download cannot stop in the gap)."""
        self.machine.client_attached()
        try:
            yield
        finally:
            self._feed(self.machine.client_detached(trio.current_time()))

    async def wait_metadata(self) -> None:
        """Until the length and layout are known; raises DownloadFailed."""
        while not self.metadata_ready.is_set():
            self._check_alive()
            await self._changed.wait()

    def _check_alive(self) -> None:
        if self.error is not None:
            raise self.error
        if self._ended.is_set() and not self.finished.is_set():
            raise DownloadFailed("the download stopped before this part arrived")

    async def wait_piece(self, number: int) -> None:
        """Until piece `number` is verified and stored; raises DownloadFailed."""
        if number in self.have:
            await trio.lowlevel.checkpoint()
            return
        self._waiting[number] = self._waiting.get(number, 0) + 1
        self.machine.streaming_from(min(self._waiting))
        try:
            while number not in self.have:
                self._check_alive()
                await self._changed.wait()
        finally:
            self._waiting[number] -= 1
            if not self._waiting[number]:
                del self._waiting[number]
            self.machine.streaming_from(min(self._waiting) if self._waiting else None)

    async def wait_finished(self) -> None:
        while not self.finished.is_set():
            self._check_alive()
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # ------------------------------------------------------------ children (upload side)

    def subscribe(self) -> tuple[list[PieceInfo], trio.MemoryReceiveChannel[list[PieceInfo]]]:
        """For a child: a channel of the pieces it may know of, now and later."""
        token = next(self._child_tokens)
        # One slot per piece: the channel can never fill up.
        send, receive = trio.open_memory_channel[list[PieceInfo]](max(self.piece_count, 0) + 16)
        self._children[token] = send
        self._feed(self.machine.child_subscribed(token, trio.current_time()))
        return [], receive

    def held_back(self, number: int) -> bool:
        """Whether the piece awaits its first copy to a child (served ahead of others)."""
        return self.machine.held_back(number)

    def piece_uploaded(self, number: int) -> None:
        """The upload server sent this piece in full to a child."""
        self._feed(self.machine.piece_uploaded(number, trio.current_time()))

    def _piece_infos(self, numbers: list[int]) -> list[PieceInfo]:
        lay = self.machine.layout
        geometry = lay.geometry
        digests = self.machine.digests
        out = []
        for n in numbers:
            length = geometry.length(n) if geometry is not None else lay.piece_length
            out.append(PieceInfo(n, n * lay.piece_length, length, digests[n]))
        return out

    def _announce(self, action: Announce) -> None:
        assert isinstance(action.child, int)
        send = self._children.get(action.child)
        if send is None:
            return
        try:
            send.send_nowait(self._piece_infos(action.numbers))
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            # The child's channel is closed: it left.
            del self._children[action.child]
            self._feed(self.machine.child_left(action.child, trio.current_time()))

    # ------------------------------------------------------------ performing actions

    def _feed(self, actions: list[Action]) -> None:
        """Perform the machine's actions; never awaits (tasks do the waiting)."""
        for action in actions:
            kind = type(action)
            if kind is Send:
                assert isinstance(action, Send)
                self._outbox.append(action.message)
                self._outbox_ready.set()
            elif kind is Fetch:
                assert isinstance(action, Fetch)
                scope = self._fetch_scopes[action.fetch_id] = trio.CancelScope()
                self._spawn(self._fetch, action, scope)
            elif kind is Cancel:
                assert isinstance(action, Cancel)
                scope = self._fetch_scopes.get(action.fetch_id)
                if scope is not None:
                    scope.cancel()
            elif kind is Announce:
                assert isinstance(action, Announce)
                self._announce(action)
            elif kind is Subscribe:
                assert isinstance(action, Subscribe)
                self._subscribe_parent(action)
            elif kind is Unsubscribe:
                assert isinstance(action, Unsubscribe)
                self._unsubscribe_parent(action.parent_id)
            elif kind is OpenTask:
                assert isinstance(action, OpenTask)
                self._spawn(self._open_task, action)
            elif kind is ProbeOrigin:
                assert isinstance(action, ProbeOrigin)
                self._spawn(self._origin_task, self._probe_origin, action)
            elif kind is FetchOrigin:
                assert isinstance(action, FetchOrigin)
                self._spawn(self._origin_task, self._fetch_origin_piece, action)
            elif kind is StreamOrigin:
                self._spawn(self._origin_task, self._stream_origin, action)
            elif kind is Complete:
                self._spawn(self._complete)
            elif kind is Finished:
                self._on_finished()
            elif kind is RangesDone:
                self.log.info("range download finished", pieces=len(self.have), of=self.piece_count)
                self._ended.set()
            elif kind is Failed:
                assert isinstance(action, Failed)
                self._on_failed(action)
        # Every event may have changed what clients wait for, and the next timer.
        self._notify()
        self._timer_rearm.set()

    def _spawn(self, fn, *args) -> None:  # type: ignore[no-untyped-def]
        if self._nursery is not None:
            self._nursery.start_soon(fn, *args)

    def _on_finished(self) -> None:
        self.log.info(
            "download finished",
            bytes_p2p=self.bytes_p2p,
            bytes_source=self.bytes_source,
            seconds=round(trio.current_time() - self.started_at, 3),
        )
        self.finished.set()
        self._ended.set()

    def _on_failed(self, failed: Failed) -> None:
        if self.error is None and not self.finished.is_set():
            self.error = DownloadFailed(failed.reason, failed.http_status)
            self.log.warning(
                "download failed", reason=failed.reason, http_status=failed.http_status
            )
            self.daemon.metrics.errors.labels("download").inc()
        self._ended.set()

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Drive the download to its end; never raises (the outcome is in finished/error)."""
        metrics = self.daemon.metrics
        metrics.active_tasks.inc()
        try:
            with bound(task_id=self.task_id, peer_id=self.peer_id):
                if await self._local_hit():
                    return
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._timer)
                    nursery.start_soon(self._sender)
                    nursery.start_soon(self._converse)
                    await self._ended.wait()
                    await self._linger()
                    await self._flush_outbox()
                    nursery.cancel_scope.cancel()
        except Exception as exc:
            failure = find_exception(exc, DownloadFailed)
            if failure is None:
                self.log.exception("download failed")
                failure = DownloadFailed(f"internal error: {exc!r}")
            self._on_failed(Failed(failure.reason, failure.http_status))
        finally:
            self._nursery = None
            self._ended.set()
            metrics.active_tasks.dec()
            for send in self._children.values():
                send.close()
            self._children.clear()
            if self.handle is not None:
                self.daemon.store.release(self.handle)
                self.handle = None
            with trio.CancelScope(shield=True):
                for client in self._retired + [p.client for p in self._parents.values()]:
                    await client.aclose()
                if self._origin is not None:
                    await self._origin.aclose()
            self._notify()

    async def _local_hit(self) -> bool:
        """A complete task is served from the store as it is (not for a seed's trigger)."""
        record = await self.daemon.store.get_task(self.task_id)
        if (
            record is None
            or record.state != TaskState.SUCCEEDED
            or self.request.seed_trigger
            or not await self._is_the_requested_file(record)
        ):
            return False
        self.machine.finished_locally(
            record.content_length, record.piece_length, record.etag, record.last_modified
        )
        self.metadata_ready.set()
        self.finished.set()
        self._ended.set()
        return True

    async def _is_the_requested_file(self, record: TaskRecord) -> bool:
        """A complete task serves a request that names a whole-file digest only if it was
        checked against that digest: if it was completed without one, it is hashed now
        (and failed and removed on a mismatch, so the download starts over)."""
        wanted = self.request.spec.digest
        if not wanted or record.digest == wanted:
            return True
        try:
            await self.daemon.store.complete_task(self.task_id, wanted)
        except DigestMismatch:
            self.log.warning("a complete task is not the requested file", digest=wanted)
            return False
        return True

    async def _linger(self) -> None:
        """A finished download that fed the swarm from the origin keeps its schedule
        until its held-back pieces are revealed in their time (the machine's rule 10)."""
        machine = self.machine
        if machine.lingering(trio.current_time()):
            self.log.info("keeping the announcement schedule", children=len(self._children))
        while machine.lingering(trio.current_time()):
            with trio.move_on_at(machine.next_wakeup(trio.current_time())):
                await trio.sleep_forever()
            self._feed(machine.tick(trio.current_time()))
        # Held-back announcements go out before the channels close: a finished
        # download's children learn the rest from the AnnounceDone that follows.
        self._feed(machine.reveal_all())

    async def _timer(self) -> None:
        """Call the machine's tick when it has something timed to do."""
        while True:
            self._timer_rearm = trio.Event()
            wake = self.machine.next_wakeup(trio.current_time())
            with trio.move_on_at(wake):
                await self._timer_rearm.wait()
            if trio.current_time() >= wake:
                timeouts = self.machine.counters.timeouts
                self._feed(self.machine.tick(trio.current_time()))
                expired = self.machine.counters.timeouts - timeouts
                if expired:
                    self.daemon.metrics.piece_failures.labels("timeout").inc(expired)

    # ------------------------------------------------------------ the scheduler

    async def _converse(self) -> None:
        """Sessions with the task's scheduler, the next on the ring when one is lost."""
        tried: set[str] = set()
        machine = self.machine
        while not machine.done:
            try:
                session = await self.daemon.schedulers.open_session(
                    self.task_id, self.peer_id, tried
                )
            except NoScheduler as exc:
                if machine.may_go_to_source:
                    self.log.warning("no scheduler answers: back to source", error=str(exc))
                    self.daemon.metrics.back_to_source_fallbacks.inc()
                self._feed(machine.no_scheduler(trio.current_time()))
                return
            self._session = session
            try:
                self._feed(machine.connected(trio.current_time()))
                while True:
                    msg = await session.receive()
                    self._feed(machine.scheduler_message(msg, trio.current_time()))
            except SchedulerLost as lost:
                self.log.warning("scheduler lost, trying the next", error=str(lost))
                tried.add(session.address)
                self._feed(machine.scheduler_lost(trio.current_time()))
            finally:
                self._session = None
                session.close()

    async def _sender(self) -> None:
        """Messages for the scheduler, in order; dropped while no session is open (the
        next registration tells the next scheduler what it must know)."""
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready = trio.Event()
            await self._flush_outbox()

    async def _flush_outbox(self) -> None:
        async with self._send_lock:
            while self._outbox:
                msg = self._outbox.popleft()
                session = self._session
                if session is None:
                    continue
                with contextlib.suppress(SchedulerLost):
                    await session.send(msg)

    # ------------------------------------------------------------ the store

    async def _open_task(self, action: OpenTask) -> None:
        spec = self.request.spec
        try:
            self.handle = await self.daemon.store.open_task(
                self.task_id,
                url=spec.url,
                tag=spec.tag,
                application=spec.application,
                content_length=action.content_length,
                piece_length=action.piece_length,
                etag=action.etag,
                last_modified=action.last_modified,
                digest=spec.digest or None,
            )
        except (StorageError, ValueError) as exc:
            self._feed(
                self.machine.complete_failed(
                    f"opening the task failed: {exc}", 0, trio.current_time()
                )
            )
            return
        held = {n: p.sha256 for n, p in self.handle.pieces.items()}
        self.metadata_ready.set()
        self._feed(self.machine.task_opened(held, trio.current_time()))

    async def _complete(self) -> None:
        """Every piece verified: mark the task complete (checking the whole file's digest
        where it is known)."""
        now = trio.current_time
        try:
            await self.daemon.store.complete_task(self.task_id)
        except DigestMismatch as exc:
            # Every piece matched what the origin sent, and the whole is not the file
            # named by its digest: the origin serves other bytes under that name. The
            # scheduler fails the task for all (when this peer was its source).
            self._feed(
                self.machine.complete_failed(
                    f"the origin's bytes are not "
                    f"{self.request.spec.digest or 'the expected file'}: they hash to {exc.actual}",
                    502,
                    now(),
                )
            )
            return
        except Exception as exc:
            self._feed(self.machine.complete_failed(f"completing the task failed: {exc}", 0, now()))
            return
        self._feed(self.machine.completed(now()))

    # ------------------------------------------------------------ parents

    def _subscribe_parent(self, action: Subscribe) -> None:
        cfg = self.daemon.config.download
        parent = _Parent(
            action.parent,
            HTTPClient(connect_timeout=cfg.connect_timeout, read_timeout=cfg.piece_timeout),
        )
        self._parents[action.parent.peer_id] = parent
        self._spawn(self._follow_parent, parent)

    def _unsubscribe_parent(self, pid: str) -> None:
        parent = self._parents.pop(pid, None)
        if parent is not None:
            parent.scope.cancel()
            self._retired.append(parent.client)

    async def _follow_parent(self, parent: _Parent) -> None:
        """A parent's piece announcements until it is done or fails."""
        pid = parent.info.peer_id
        hello = Hello(version=PROTOCOL_VERSION, min_version=MIN_PROTOCOL_VERSION, role="peer")
        url = parent.base_url.replace("http://", "ws://", 1) + ANNOUNCE_PATH
        with parent.scope:
            try:
                async with connect(
                    url,
                    hello,
                    name=f"parent {pid}",
                    connect_timeout=self.daemon.config.download.connect_timeout,
                ) as channel:
                    await channel.send(
                        SubscribeMessage(task_id=self.task_id, peer_id=self.peer_id, parent_id=pid)
                    )
                    async for msg in channel:
                        if isinstance(msg, PieceAnnounce):
                            numbers = [p.number for p in msg.pieces]
                            self._feed(
                                self.machine.parent_announced(pid, numbers, trio.current_time())
                            )
                        elif isinstance(msg, AnnounceDone):
                            # It holds every piece: keep fetching from it.
                            self._feed(
                                self.machine.parent_announced(
                                    pid, range(msg.piece_count), trio.current_time()
                                )
                            )
                            return
                    raise ChannelClosed("parent closed the announcements")
            except (OSError, ChannelClosed, trio.TooSlowError, Exception) as exc:
                if self.machine.done:
                    return
                self.log.info("parent announcements failed", parent=pid, error=repr(exc))
                self._feed(self.machine.parent_gone(pid, trio.current_time()))

    async def _fetch(self, action: Fetch, scope: trio.CancelScope) -> None:
        """One piece from one parent into the store. The first request of a piece splices
        straight into the task file; an endgame duplicate receives aside, and once its
        bytes are in hand the machine stops the others before it is written."""
        fid, number, pid = action.fetch_id, action.number, action.parent_id
        metrics = self.daemon.metrics
        machine = self.machine
        sink: PieceSink | None = None
        try:
            with scope:
                sink = await self._receive_piece(action)
            if sink is not None and sink.record is not None:
                self._count_landed(number, sink.record.length, "p2p")
                self._feed(
                    machine.piece_landed(fid, number, pid, sink.record.length, trio.current_time())
                )
        except ParentBusy:
            # Not a failure: the parent is full; the machine asks it again a moment later.
            self._feed(machine.piece_busy(fid, trio.current_time()))
        except DigestMismatch:
            metrics.piece_failures.labels("digest").inc()
            self.log.info("piece failed", number=number, parent=pid, reason="digest mismatch")
            self._feed(
                machine.piece_failed(fid, "digest mismatch", trio.current_time(), bad_bytes=True)
            )
        except (HTTPClientError, OSError, StorageError) as exc:
            metrics.piece_failures.labels("transfer").inc()
            reason = str(exc)[:500]
            self.log.info("piece failed", number=number, parent=pid, reason=reason)
            self._feed(machine.piece_failed(fid, reason, trio.current_time()))
        finally:
            self._fetch_scopes.pop(fid, None)

    async def _receive_piece(self, action: Fetch) -> PieceSink | None:
        """The piece's bytes into the store; the sink says what was recorded."""
        parent = self._parents.get(action.parent_id)
        handle = self.handle
        if parent is None or handle is None:
            raise HTTPClientError("the parent or the task is gone")
        number = action.number
        geometry = self.machine.layout.geometry
        assert geometry is not None
        length = geometry.length(number)
        expected = self.machine.digests[number]
        limiter = self.daemon.download_limiter
        if limiter is not None:
            await limiter.acquire(length)
        store = self.daemon.store
        url = f"{parent.base_url}/pieces/{self.task_id}/{number}"
        async with parent.client.request("GET", url) as r:
            if r.status == 503:
                await discard(r)
                raise ParentBusy(url)
            if r.status != 200:
                raise HTTPClientError(f"parent answered {r.status}")
            if r.content_length != length:
                raise HTTPClientError(
                    f"parent sent {r.content_length} bytes for a {length}-byte piece"
                )
            if action.in_place:
                async with store.writing(handle, number, expected) as sink:
                    if not sink.done:
                        await r.splice_to(sink.fd, sink.offset, length)
                return sink  # (a body left unread closes the connection)
            buf = bytearray(length)
            await r.readinto_exactly(buf)
        if hashlib.sha256(buf).digest() != expected:
            raise DigestMismatch(f"piece {number}", expected.hex(), "other")
        self._feed(self.machine.piece_in_hand(action.fetch_id, trio.current_time()))
        async with store.writing(handle, number, expected) as sink:
            if not sink.done:
                sink.write(buf)
        return sink

    # ------------------------------------------------------------ the origin

    async def _origin_task(self, fn, action) -> None:  # type: ignore[no-untyped-def]
        """Origin work: an origin failure fails the download (the machine reports it, so
        the scheduler can fail the task for everyone or hand the origin to another)."""
        try:
            await fn(action)
        except OriginError as exc:
            self._feed(self.machine.origin_failed(str(exc), exc.http_status, trio.current_time()))
        except DigestMismatch as exc:
            self._feed(
                self.machine.origin_failed(
                    f"origin content changed: {exc}", 409, trio.current_time()
                )
            )
        except (StorageError, OSError) as exc:
            self._feed(
                self.machine.origin_failed(
                    f"storing the origin's bytes failed: {exc}", 0, trio.current_time()
                )
            )

    async def _probe_origin(self, action: ProbeOrigin) -> None:
        if self._origin is not None:
            await self._origin.aclose()
        self._origin = OriginFetcher(
            self.daemon.origin_client,
            self.request.spec.url,
            self.request.headers,
            limiter=self.daemon.source_limiter,
            expect_etag=action.expect_etag,
            expect_last_modified=action.expect_last_modified,
        )
        info = await self._origin.probe()
        self._feed(
            self.machine.origin_probed(
                info.content_length,
                info.accepts_ranges,
                info.etag,
                info.last_modified,
                info.content_type,
                trio.current_time(),
            )
        )

    async def _fetch_origin_piece(self, action: FetchOrigin) -> None:
        origin, handle = self._origin, self.handle
        assert origin is not None and handle is not None
        async with self.daemon.store.writing(handle, action.number) as sink:
            if not sink.done:
                await origin.fetch_piece(sink)
        self._origin_piece(sink)

    def _count_landed(self, number: int, length: int, source: str) -> None:
        if number not in self.machine.have:
            metrics = self.daemon.metrics
            metrics.download_bytes.labels(source).inc(length)
            metrics.pieces.labels(source).inc()

    def _origin_piece(self, sink: PieceSink) -> None:
        record = sink.record
        assert record is not None
        self._count_landed(record.number, record.length, "back_to_source")
        self._feed(
            self.machine.origin_piece_landed(
                record.number, record.sha256, record.length, trio.current_time()
            )
        )

    async def _stream_origin(self, action: StreamOrigin) -> None:
        """No ranges: the one body, cut into pieces in order as it arrives."""
        origin, handle = self._origin, self.handle
        assert origin is not None and handle is not None
        machine, store = self.machine, self.daemon.store
        lay = machine.layout
        if lay.content_length >= 0:
            assert lay.geometry is not None
            for number in range(lay.piece_count):
                length = lay.geometry.length(number)
                if machine.holds(number):
                    # Never write over a recorded piece: compare the bytes instead.
                    data = await origin.skip_piece(length)
                    if hashlib.sha256(data).digest() != machine.digests.get(number):
                        raise OriginChanged(
                            f"origin content changed: piece {number} differs from the stored one",
                            409,
                        )
                    continue
                async with store.writing(handle, number) as sink:
                    await origin.read_piece(sink)
                self._origin_piece(sink)
            return
        # Unknown length (chunked): fill pieces until the body ends.
        await self._stream_unknown_length(origin, handle)

    async def _stream_unknown_length(self, origin: OriginFetcher, handle: TaskHandle) -> None:
        from dragonfly.net.zerocopy import pwrite_all

        store, machine = self.daemon.store, self.machine
        piece_length = machine.layout.piece_length
        number, filled = 0, 0
        chunks = origin.chunks()
        pending: list[bytes] = []

        async def flush(n: int, parts: list[bytes], size: int) -> None:
            async with store.writing(handle, n) as sink:
                offset = sink.offset
                for part in parts:
                    pwrite_all(sink.fd, part, offset)
                    offset += len(part)
                sink.length = size
            self._origin_piece(sink)

        async with contextlib.aclosing(chunks) as body:
            async for chunk in body:
                view = memoryview(chunk)
                while view:
                    take = min(len(view), piece_length - filled)
                    pending.append(bytes(view[:take]))
                    filled += take
                    view = view[take:]
                    if filled == piece_length:
                        await flush(number, pending, filled)
                        number, filled, pending = number + 1, 0, []
        total = number * piece_length + filled
        await store.set_content_length(self.task_id, total)
        if filled:
            # The last piece is recorded once the length says how long it is.
            self._feed(machine.content_length_known(total, trio.current_time()))
            await flush(number, pending, filled)
        else:
            self._feed(machine.content_length_known(total, trio.current_time()))
