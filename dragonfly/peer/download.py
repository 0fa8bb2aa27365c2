"""One task being downloaded by this peer: the trio driver of the download machine.

Every decision is the machine's (dragonfly/engine/machine.py): this module turns
sockets, the store and the clock into its events, and performs the actions it
returns — scheduler messages, parent subscriptions, piece requests, origin
requests, announcements to children — each in its own task. Performing actions
never awaits (`_feed`), so the machine sees events one at a time, in the order
they happened. Clients of the proxy wait on the download's events (`wait_piece`,
`wait_finished`: progress.py), and children on their announcement channels; what
performs one kind of action lives beside it (parents.py, source.py).
"""

from __future__ import annotations

import contextlib
import itertools
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from functools import partial

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
    Stalled,
    StreamOrigin,
    Subscribe,
    Unsubscribe,
)
from dragonfly.engine.machine import DownloadMachine
from dragonfly.errors import find_exception
from dragonfly.log import bound, get_logger
from dragonfly.net.http_client import HTTPClient
from dragonfly.peer.context import DownloadServices
from dragonfly.peer.parents import ParentLink
from dragonfly.peer.progress import DownloadProgress
from dragonfly.peer.reannounce import spec_json
from dragonfly.peer.records import Outcome
from dragonfly.peer.request import DownloadFailed, DownloadRequest
from dragonfly.peer.scheduler_client import (
    NoScheduler,
    SchedulerLost,
    SchedulerSession,
)
from dragonfly.peer.source import OriginLink
from dragonfly.peer.whole_digest import WholeDigest
from dragonfly.storage import (
    DigestMismatch,
    StorageError,
    TaskHandle,
    TaskRecord,
    TaskState,
)
from dragonfly.wire.codec import Message
from dragonfly.wire.messages import (
    CandidateParents,
    NeedBackToSource,
    PieceInfo,
    TaskSpec,
)

log = get_logger("dragonfly.peer.download")


# While every scheduler is lost: how often a download looks for one that is back.
REJOIN_POLL = 0.5


def machine_config(cfg: PeerConfig) -> MachineConfig:
    """The machine's knobs from a peer's configuration."""
    d = cfg.download
    return MachineConfig(
        concurrent_pieces=d.concurrent_piece_count,
        piece_timeout=d.piece_timeout,
        origin_concurrency=d.origin_concurrency,
        back_to_source=d.back_to_source,
        stall_timeout=d.stall_timeout,
    )


class Download(DownloadProgress):
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
            host_id=daemon.host.host_id,
            private=request.private,
        )
        # Tickets expire in wall time; the machine's clock is trio's.
        self.machine.wall_offset = time.time() - trio.current_time()
        # A client's bytes come only after the origin said yes to its credentials: the
        # request had some, or the scheduler or the store says the task is private.
        self.private = request.private
        self.handle: TaskHandle | None = None
        self._whole: WholeDigest | None = None  # (a task named by its digest)
        # progress and outcome, for clients
        self.metadata_ready = trio.Event()
        self.finished = trio.Event()
        self.error: DownloadFailed | None = None
        self._changed = trio.Event()
        self._waiting: dict[int, int] = {}  # piece → streams waiting for it
        self._prefix_pieces = 0  # pieces 0..n-1 all held (verified_prefix)
        self._ended = trio.Event()  # the machine is done (finished, failed, ranges had)
        # the I/O the machine's actions started
        self._nursery: trio.Nursery | None = None
        self._session: SchedulerSession | None = None
        self._outbox: deque[Message] = deque()
        self._outbox_ready = trio.Event()
        self._timer_rearm = trio.Event()
        self._parents: dict[str, ParentLink] = {}
        self._retired: list[HTTPClient] = []  # clients of dropped parents, closed at the end
        self._fetch_scopes: dict[int, trio.CancelScope] = {}
        self._origin = OriginLink(self)
        self._send_lock = trio.Lock()  # the sender and the final flush keep the order
        self._children: dict[int, trio.MemorySendChannel[list[PieceInfo]]] = {}
        self._child_tokens = itertools.count()
        self.started_at = trio.current_time()
        self._parents_used: dict[str, None] = {}  # parents' host names, for the record
        self._local = False  # served from the store as it was

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
                self._fetch(action)
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
                probe = partial(self._origin.probe, action.expect_etag, action.expect_last_modified)
                self._spawn(self._origin.run, probe)
            elif kind is FetchOrigin:
                assert isinstance(action, FetchOrigin)
                self._spawn(
                    self._origin.run,
                    partial(self._origin.fetch_piece, action.number, action.parts),
                )
            elif kind is StreamOrigin:
                self._spawn(self._origin.run, self._origin.stream)
            elif kind is Complete:
                self._spawn(self._complete)
            elif kind is Finished:
                self._on_finished()
            elif kind is RangesDone:
                self.log.info("range download finished", pieces=len(self.have), of=self.piece_count)
                self._ended.set()
            elif kind is Stalled:
                assert isinstance(action, Stalled)
                self.log.warning("download stalled", step=action.step, seconds=action.seconds)
                self.daemon.metrics.stalls.labels(action.step).inc()
            elif kind is Failed:
                assert isinstance(action, Failed)
                self._on_failed(action)
        # Every event may have changed what clients wait for, and the next timer.
        self._notify()
        self._timer_rearm.set()

    def _spawn(self, fn: Callable[..., Awaitable[None]], *args: object) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(fn, *args)

    # The DownloadContext its links see.
    feed = _feed

    @property
    def spec(self) -> TaskSpec:
        return self.request.spec

    @property
    def origin_headers(self) -> dict[str, str]:
        return self.request.headers

    def count_landed(self, number: int, length: int, source: str, parent: str = "") -> None:
        if parent and len(self._parents_used) < 64:
            known = self.machine.parents.get(parent)
            if known is not None:
                self._parents_used[known.info.hostname or known.info.host_id] = None
        if number not in self.machine.have:
            metrics = self.daemon.metrics
            metrics.download_bytes.labels(source).inc(length)
            metrics.pieces.labels(source).inc()

    # ------------------------------------------------------------ parents

    def _subscribe_parent(self, action: Subscribe) -> None:
        cfg = self.daemon.config.download
        client = HTTPClient(
            connect_timeout=cfg.connect_timeout,
            read_timeout=cfg.piece_timeout,
            ssl_context=self.daemon.cluster_tls,  # (a TLS parent: the cluster's CA only)
        )
        link = ParentLink(action.parent, client, action.ticket)
        self._parents[action.parent.peer_id] = link
        self._spawn(link.follow, self)

    def _unsubscribe_parent(self, pid: str) -> None:
        link = self._parents.pop(pid, None)
        if link is not None:
            link.scope.cancel()
            self._retired.append(link.client)

    def _fetch(self, action: Fetch) -> None:
        link = self._parents.get(action.parent_id)
        if link is None:
            self.feed(
                self.machine.piece_failed(action.fetch_id, "parent gone", trio.current_time())
            )
            return
        scope = self._fetch_scopes[action.fetch_id] = trio.CancelScope()

        async def fetch() -> None:
            try:
                await link.fetch(self, action, scope)
            finally:
                self._fetch_scopes.pop(action.fetch_id, None)

        self._spawn(fetch)

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
            self._record()
            for send in self._children.values():
                send.close()
            self._children.clear()
            if self.handle is not None:
                self.daemon.store.release(self.handle)
                self.handle = None
            with trio.CancelScope(shield=True):
                for client in self._retired + [p.client for p in self._parents.values()]:
                    await client.aclose()
                await self._origin.aclose()
            self._notify()

    def _record(self) -> None:
        """The download record (sent to the manager through the scheduler)."""
        if not self.finished.is_set() and self.error is None:
            return  # stopped with the daemon: no outcome to tell
        length = self.content_length
        self.daemon.records.add(
            Outcome(
                task_id=self.task_id,
                url=self.request.spec.url,
                content_length=length,
                seconds=trio.current_time() - self.started_at,
                bytes_p2p=self.bytes_p2p,
                bytes_source=self.bytes_source,
                bytes_local=max(length, 0) if self._local else 0,
                parents=tuple(self._parents_used),
                error=self.error.reason if self.error is not None else "",
            )
        )

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
        self.private = self.private or record.private
        self._local = True
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
        """Sessions with the task's scheduler, the next on the ring when one is lost.

        When every scheduler is lost (a restart), the download rides it out: parents
        and fetches go on, and it registers again, saying what it holds, once one is
        back; only after scheduler.rejoin_timeout does it go to the origin."""
        tried: set[str] = set()
        machine = self.machine
        lost_at: float | None = None
        rejoin = self.daemon.config.scheduler.rejoin_timeout
        while not machine.done:
            try:
                session = await self.daemon.schedulers.open_session(
                    self.task_id, self.peer_id, tried
                )
            except NoScheduler as exc:
                now = trio.current_time()
                if lost_at is not None and now - lost_at < rejoin:
                    tried.clear()
                    await trio.sleep(min(REJOIN_POLL, lost_at + rejoin - now))
                    continue
                if machine.may_go_to_source:
                    self.log.warning("no scheduler answers: back to source", error=str(exc))
                    self.daemon.metrics.back_to_source_fallbacks.inc()
                self._feed(machine.no_scheduler(trio.current_time()))
                return
            if lost_at is not None:
                self.log.info(
                    "registering again",
                    scheduler=session.address,
                    after=round(trio.current_time() - lost_at, 3),
                )
            lost_at = None
            self._session = session
            try:
                self._feed(machine.connected(trio.current_time()))
                while True:
                    msg = await session.receive()
                    if isinstance(msg, (CandidateParents, NeedBackToSource)) and msg.private:
                        self.private = True  # (before the layout it may bring is opened)
                    if isinstance(msg, NeedBackToSource):
                        self.log.info("sent to the origin", reason=msg.reason)
                    self._feed(machine.scheduler_message(msg, trio.current_time()))
            except SchedulerLost as lost:
                self.log.warning("scheduler lost, trying the next", error=str(lost))
                tried.add(session.address)
                lost_at = trio.current_time()
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
                private=self.private or None,  # (never back to public)
                spec=spec_json(spec),
            )
        except (StorageError, ValueError) as exc:
            self._feed(
                self.machine.complete_failed(
                    f"opening the task failed: {exc}", 0, trio.current_time()
                )
            )
            return
        held = {n: p.sha256 for n, p in self.handle.pieces.items()}
        if (spec.digest or self.handle.record.digest) and self.handle.record.content_length > 0:
            self._whole = WholeDigest(self.daemon.store, self.handle)
            self._spawn(self._whole.follow, lambda: self.verified_prefix, lambda: self._changed)
        self.metadata_ready.set()
        self._feed(self.machine.task_opened(held, trio.current_time()))

    async def _complete(self) -> None:
        """Every piece verified: mark the task complete (checking the whole file's digest
        where it is known)."""
        now = trio.current_time
        try:
            length = self.content_length
            hashed = await self._whole.digest(length) if self._whole is not None else None
            await self.daemon.store.complete_task(self.task_id, hashed=hashed)
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
