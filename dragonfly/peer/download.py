"""One task being downloaded by this peer: the trio shell around the piece picker.

A Download registers with the task's scheduler, then either fetches pieces from
the parents it is given (several at once, each piece checked against the
origin-side digest the scheduler handed out) or goes back to the origin when
told to (or when no scheduler answers). Every verified piece is recorded in the
store, reported to the scheduler in batches, announced to subscribed children,
and wakes the proxy streams waiting for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import secrets
import time
from collections.abc import Iterator, KeysView, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import trio

from dragonfly.config import PeerConfig
from dragonfly.engine.announce import AnnounceSchedule
from dragonfly.engine.picker import PiecePicker
from dragonfly.errors import find_exception
from dragonfly.identity import carries_credentials, credential_scope, piece_length_for
from dragonfly.identity import piece_count as count_pieces
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
    PieceRecord,
    PieceStore,
    StorageError,
    TaskHandle,
    TaskState,
)
from dragonfly.trust import TICKET_HEADER, Ticket
from dragonfly.wire.codec import MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, Message
from dragonfly.wire.messages import (
    AnnounceDone,
    CandidateParents,
    Hello,
    HostInfo,
    LeavePeer,
    NeedBackToSource,
    ParentInfo,
    PeerFailed,
    PeerFinished,
    PieceAnnounce,
    PieceDigest,
    PieceDigests,
    PieceFailed,
    PieceInfo,
    PieceReport,
    PiecesFinished,
    RegisterPeer,
    Reschedule,
    Subscribe,
    TaskFailed,
    TaskMetadata,
    TaskSpec,
)

log = get_logger("dragonfly.peer.download")

REPORT_INTERVAL = 0.05
REPORT_BATCH = 1000
RESCHEDULE_INTERVAL = 1.0
# Longest a finished download keeps its announcement schedule for its children.
LINGER_LIMIT = 120.0


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
    # Made with credentials (identity.carries_credentials): the task is private.
    private: bool = False
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
        credential_headers: Sequence[str] = (),
    ) -> DownloadRequest:
        """The request and its task. A download made with someone's credentials
        (Authorization, Cookie) is theirs unless a rule says the origin is asked first
        (`shared_credentials`): its task is scoped to those credentials, so nobody
        else is ever served it from P2P. Any credential (those two, a signature left out
        of the ID, a header named in `credential_headers`) makes the task private."""
        headers = headers or {}
        spec = TaskSpec(
            url=url,
            tag=tag,
            application=application,
            filtered_query_params=list(filtered_query_params or []),
            scope="" if shared_credentials else credential_scope(headers),
        )
        request = cls(spec, headers, back_to_source=back_to_source)  # (the URL is checked)
        request.private = carries_credentials(
            url, headers, spec.filtered_query_params, extra_headers=credential_headers
        )
        return request


@dataclass
class _Parent:
    info: ParentInfo
    client: HTTPClient
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    ticket: Ticket | None = None  # the scheduler's latest for this parent

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
        # layout, known once the scheduler or the origin tells
        self.content_length = -1
        self.piece_length = 0
        self.piece_count = -1
        self.etag = ""
        self.last_modified = ""
        self.content_type = ""
        self.digests: dict[int, bytes] = {}
        # A client's bytes come only after the origin said yes to its credentials: the
        # request had some, or the scheduler or the store says the task is private.
        self.private = request.private
        self.handle: TaskHandle | None = None
        self._pieces: dict[int, PieceRecord] = {}  # the store handle's own record
        self.picker: PiecePicker | None = None
        # progress and outcome
        self.metadata_ready = trio.Event()
        self.finished = trio.Event()
        self.error: DownloadFailed | None = None
        self._changed = trio.Event()
        self._reports: list[PieceReport] = []
        self._report_wakeup = trio.Event()
        # Children following this download's announcements, by token; a download that
        # fetches from the origin staggers them (dragonfly/engine/announce.py).
        self._subscribers: dict[int, trio.MemorySendChannel[list[PieceInfo]]] = {}
        self._subscriber_tokens = itertools.count()
        self._announce: AnnounceSchedule[int] = AnnounceSchedule(stagger=False)
        self._parents: dict[str, _Parent] = {}
        self._retired: list[HTTPClient] = []  # clients of dropped parents, closed at the end
        self._blocked: set[str] = set()
        # (piece, parent) → the request's cancel scope and an event set once it stopped
        self._fetches: dict[tuple[int, str], tuple[trio.CancelScope, trio.Event]] = {}
        self._settle_locks: dict[int, trio.Lock] = {}
        self._claimed: set[int] = set()
        self._waiting: dict[int, int] = {}  # piece → streams waiting for it
        self._last_reschedule = -1e9
        # Byte ranges clients asked for; None: the whole task. A range-only download
        # (proxy.prefetch off) stops once its ranges are had and leaves the task partial.
        self._wanted_ranges: list[tuple[int, int]] | None = None if request.whole else []
        self._wanted: set[int] | None = None
        self.accepting = True  # False once it decided to stop: the manager starts anew
        self.clients = 0  # proxy streams attached; a range-only download outlives none
        self._ended = False
        self.bytes_p2p = 0
        self.bytes_source = 0
        self.started_at = trio.current_time()

    # ------------------------------------------------------------ public

    @property
    def have(self) -> KeysView[int]:
        """Pieces verified and stored: the store's record is the one source of truth
        (kept after the download released its handle, for streams still reading)."""
        return self._pieces.keys()

    @property
    def done(self) -> bool:
        return self.finished.is_set() or self.error is not None

    @property
    def completed_bytes(self) -> int:
        if self.piece_count < 0 or not self.piece_length:
            return 0
        full = len(self.have) * self.piece_length
        last = self.piece_count - 1
        if last in self.have:
            full -= self.piece_count * self.piece_length - self.content_length
        return full

    def want_all(self) -> None:
        """From now on fetch the whole task."""
        if self._wanted_ranges is None:
            return
        self._wanted_ranges = None
        self._wanted = None
        self._feed_picker(self.digests)
        self._notify()

    def want_range(self, start: int, end: int) -> None:
        """Also fetch bytes [start, end] (inclusive)."""
        if self._wanted_ranges is None:
            return
        self._wanted_ranges.append((start, end))
        if self.piece_length:
            self._compute_wanted()
            self._feed_picker(self.digests)
        self._notify()

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        """A client stream uses this download (attach right after TaskManager.open, with
        no await between, so the download cannot stop in the gap)."""
        self.clients += 1
        try:
            yield
        finally:
            self.clients -= 1
            self._notify()

    def _compute_wanted(self) -> None:
        if self._wanted_ranges is None:
            self._wanted = None
            return
        wanted: set[int] = set()
        for start, end in self._wanted_ranges:
            wanted.update(range(start // self.piece_length, end // self.piece_length + 1))
        self._wanted = {n for n in wanted if n < self.piece_count}

    def _is_wanted(self, number: int) -> bool:
        return self._wanted is None or number in self._wanted

    def _feed_picker(self, numbers: object) -> None:
        """The picker only requests pieces whose digest it knows: telling it only about
        wanted pieces keeps a range-only download to its ranges."""
        if self.picker is not None:
            self.picker.digest_known([n for n in numbers if self._is_wanted(n)])  # type: ignore[attr-defined]

    async def wait_metadata(self) -> None:
        """Until the length and layout are known; raises DownloadFailed."""
        while not self.metadata_ready.is_set():
            self._check_alive()
            await self._changed.wait()

    def _check_alive(self) -> None:
        if self.error is not None:
            raise self.error
        if self._ended and not self.finished.is_set():
            raise DownloadFailed("the download stopped before this part arrived")

    async def wait_piece(self, number: int) -> None:
        """Until piece `number` is verified and stored; raises DownloadFailed."""
        if number in self.have:
            await trio.lowlevel.checkpoint()
            return
        self._waiting[number] = self._waiting.get(number, 0) + 1
        self._update_cursor()
        try:
            while number not in self.have:
                self._check_alive()
                await self._changed.wait()
        finally:
            self._waiting[number] -= 1
            if not self._waiting[number]:
                del self._waiting[number]
            self._update_cursor()

    async def wait_finished(self) -> None:
        while not self.finished.is_set():
            self._check_alive()
            await self._changed.wait()

    def subscribe(self) -> tuple[list[PieceInfo], trio.MemoryReceiveChannel[list[PieceInfo]]]:
        """For a child: the pieces it may know of now, and a channel of later ones."""
        assert self.handle is not None
        pieces = self.handle.pieces
        self._announce.known(pieces)  # (held before this run: resumed, or adopted)
        token = next(self._subscriber_tokens)
        # One slot per piece: the channel can never fill up.
        send, receive = trio.open_memory_channel[list[PieceInfo]](max(self.piece_count, 0) + 16)
        self._subscribers[token] = send
        numbers = [n for _, told in self._announce.subscribe(token) for n in told]
        return [_piece_info(pieces[n]) for n in sorted(numbers) if n in pieces], receive

    def held_back(self, number: int) -> bool:
        """Whether the piece awaits its first copy to a child (served ahead of others)."""
        return self._announce.held_back(number)

    def piece_uploaded(self, number: int) -> None:
        """The upload server sent this piece in full to a child."""
        self._announce.uploaded(number, trio.current_time())
        self._tell(self._announce.due(trio.current_time()))

    def _tell(self, announcements: list[tuple[int, list[int]]]) -> None:
        """Send announcements to the children's channels; a closed one unsubscribes."""
        pieces = self._pieces
        infos: dict[int, PieceInfo] = {}  # one PieceInfo per piece, shared by the children
        gone: list[int] = []
        for token, numbers in announcements:
            send = self._subscribers.get(token)
            if send is None:
                continue
            for n in numbers:
                if n not in infos and n in pieces:
                    infos[n] = _piece_info(pieces[n])
            try:
                send.send_nowait([infos[n] for n in numbers if n in infos])
            except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                gone.append(token)
        for token in gone:
            del self._subscribers[token]
            self._tell(self._announce.unsubscribe(token))

    def _update_cursor(self) -> None:
        """The picker keeps an in-order window ahead of the slowest streaming client."""
        if self.picker is not None:
            self.picker.set_cursor(min(self._waiting) if self._waiting else None)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Drive the download to its end; never raises (the outcome is in finished/error)."""
        metrics = self.daemon.metrics
        metrics.active_tasks.inc()
        try:
            with bound(task_id=self.task_id, peer_id=self.peer_id):
                await self._run()
                await self._linger()
        except Exception as exc:
            failure = find_exception(exc, DownloadFailed)
            if failure is None:
                self.log.exception("download failed")
                failure = DownloadFailed(f"internal error: {exc!r}")
            self._fail(failure)
        finally:
            self._ended = True
            self.accepting = False
            metrics.active_tasks.dec()
            # Held-back announcements go out before the channels close: a finished
            # download's children learn the rest from the AnnounceDone that follows.
            self._tell(self._announce.reveal_all())
            for send in self._subscribers.values():
                send.close()
            if self.handle is not None:
                self.daemon.store.release(self.handle)
                self.handle = None
            with trio.CancelScope(shield=True):
                for client in self._retired + [p.client for p in self._parents.values()]:
                    await client.aclose()
            self._notify()

    async def _linger(self) -> None:
        """A finished download that fed the swarm from the origin keeps its schedule
        until its held-back pieces are revealed in their time: revealing them all at
        once when the origin fetch ends would have every child ask this peer for the
        same pieces, which is what the stagger is there to prevent."""
        deadline = trio.current_time() + LINGER_LIMIT
        if self._subscribers and self._announce.next_due() is not None:
            self.log.info("keeping the announcement schedule", children=len(self._subscribers))
        while self._subscribers:
            now = trio.current_time()
            self._tell(self._announce.due(now))
            next_due = self._announce.next_due()
            if next_due is None or now >= deadline:
                return
            await trio.sleep_until(min(next_due, deadline))

    def _fail(self, exc: DownloadFailed) -> None:
        if self.error is None and not self.finished.is_set():
            self.error = exc
            self.log.warning("download failed", reason=exc.reason, http_status=exc.http_status)
            self.daemon.metrics.errors.labels("download").inc()
        self._notify()

    async def _run(self) -> None:
        record = await self.daemon.store.get_task(self.task_id)
        if (
            record is not None
            and record.state == TaskState.SUCCEEDED
            and not self.request.seed_trigger
            and await self._is_the_requested_file(record.digest)
        ):
            await self._adopt_record(record)
            self._finish_local()
            return
        tried: set[str] = set()
        while True:
            try:
                session = await self.daemon.schedulers.open_session(
                    self.task_id, self.peer_id, tried
                )
            except NoScheduler as exc:
                if (
                    not self.request.back_to_source
                    or not self.daemon.config.download.back_to_source
                ):
                    raise DownloadFailed(f"{exc}, and back-to-source is off") from None
                self.log.warning("no scheduler answers: back to source", error=str(exc))
                self.daemon.metrics.back_to_source_fallbacks.inc()
                await self._back_to_source(None, None)
                await self._complete(None)
                return
            try:
                await self._converse(session)
                return
            except Exception as exc:
                # Nurseries wrap what their tasks raise: a failure decides, a lost
                # scheduler means the next one on the ring.
                failure = find_exception(exc, DownloadFailed)
                if failure is not None:
                    raise failure from None
                lost = find_exception(exc, SchedulerLost)
                if lost is None:
                    raise
                self.log.warning("scheduler lost, trying the next", error=str(lost))
                tried.add(session.address)
            finally:
                session.close()

    async def _is_the_requested_file(self, recorded_digest: str | None) -> bool:
        """A complete task serves a request that names a whole-file digest only if it was
        checked against that digest: if it was completed without one, it is hashed now
        (and failed and removed on a mismatch, so the download starts over)."""
        wanted = self.request.spec.digest
        if not wanted or recorded_digest == wanted:
            return True
        try:
            await self.daemon.store.complete_task(self.task_id, wanted)
        except DigestMismatch:
            self.log.warning("a complete task is not the requested file", digest=wanted)
            return False
        return True

    async def _adopt_record(self, record: object) -> None:
        from dragonfly.storage import TaskRecord

        assert isinstance(record, TaskRecord)
        self.private = self.private or record.private
        await self._set_layout(
            record.content_length, record.piece_length, record.etag, record.last_modified, ""
        )

    def _finish_local(self) -> None:
        self.finished.set()
        self._notify()

    # ------------------------------------------------------------ scheduler conversation

    async def _converse(self, session: SchedulerSession) -> None:
        req = self.request
        self._forget_parents()  # a new scheduler hands out its own; old fetches died with their session
        await session.send(
            RegisterPeer(
                peer_id=self.peer_id,
                task_id=self.task_id,
                task=req.spec,
                headers=req.headers,
                need_back_to_source=req.seed_trigger,
                private=req.private,
            )
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._report_loop, session)
            p2p_started = False
            source_started = False
            while not self._target_reached:
                msg = await self._receive_or_finish(session)
                if self.error is not None:
                    raise self.error
                if msg is None:
                    break
                if isinstance(msg, CandidateParents):
                    await self._on_candidates(msg, nursery)
                    if not p2p_started and not source_started and self.picker is not None:
                        p2p_started = True
                        nursery.start_soon(self._p2p_loop, session, nursery)
                elif isinstance(msg, PieceDigests):
                    self._add_digests(msg.digests)
                elif isinstance(msg, NeedBackToSource):
                    self.private = self.private or msg.private
                    if not source_started:
                        source_started = True
                        self._stop_p2p()
                        nursery.start_soon(self._source_task, msg, session)
                elif isinstance(msg, TaskFailed):
                    raise DownloadFailed(msg.reason, msg.http_status)
            await self._complete(session)
            nursery.cancel_scope.cancel()

    async def _receive_or_finish(self, session: SchedulerSession) -> object | None:
        """The next scheduler message, or None once the download finished meanwhile."""
        result: list[object] = []
        async with trio.open_nursery() as race:

            async def receive() -> None:
                result.append(await session.receive())
                race.cancel_scope.cancel()

            async def finished() -> None:
                while not self._target_reached and self.error is None:
                    await self._changed.wait()
                race.cancel_scope.cancel()

            race.start_soon(receive)
            race.start_soon(finished)
        return result[0] if result else None

    async def _complete(self, session: SchedulerSession | None) -> None:
        """Every piece verified: mark the task complete, tell the scheduler. A range-only
        download that has its ranges stops here, leaving the task partial (resumable)."""
        if self.error is not None:
            raise self.error
        self.accepting = False
        if not self._all_pieces_had:
            if session is not None:
                await self._flush_reports(session)
                with contextlib.suppress(SchedulerLost):
                    await session.send(LeavePeer(peer_id=self.peer_id, task_id=self.task_id))
            self.log.info("range download finished", pieces=len(self.have), of=self.piece_count)
            self._notify()
            return
        store = self.daemon.store
        try:
            await store.complete_task(self.task_id)
        except DigestMismatch as exc:
            # Every piece matched what the origin sent, and the whole is not the file
            # named by its digest: the origin serves other bytes under that name. The
            # scheduler fails the task for all (when this peer was its source).
            failure = DownloadFailed(
                f"the origin's bytes are not {self.request.spec.digest or 'the expected file'}: "
                f"they hash to {exc.actual}",
                502,
            )
            if session is not None:
                await self._report_peer_failed(session, failure)
            raise failure from None
        except Exception as exc:
            raise DownloadFailed(f"completing the task failed: {exc}") from exc
        if session is not None:
            await self._flush_reports(session)
            with contextlib.suppress(SchedulerLost):
                await session.send(
                    PeerFinished(
                        peer_id=self.peer_id,
                        task_id=self.task_id,
                        content_length=max(self.content_length, 0),
                        piece_count=max(self.piece_count, 0),
                    )
                )
        self.log.info(
            "download finished",
            bytes_p2p=self.bytes_p2p,
            bytes_source=self.bytes_source,
            seconds=round(trio.current_time() - self.started_at, 3),
        )
        self.finished.set()
        self._notify()

    async def _report_loop(self, session: SchedulerSession) -> None:
        while True:
            await self._report_wakeup.wait()
            self._report_wakeup = trio.Event()
            await trio.sleep(REPORT_INTERVAL)  # let a few pieces gather
            await self._flush_reports(session)

    async def _flush_reports(self, session: SchedulerSession) -> None:
        while self._reports:
            batch, self._reports = self._reports[:REPORT_BATCH], self._reports[REPORT_BATCH:]
            await session.send(
                PiecesFinished(peer_id=self.peer_id, task_id=self.task_id, pieces=batch)
            )

    async def _report_failure(self, session: SchedulerSession, msg: Message) -> None:
        """Best effort: if the scheduler is gone, the next one learns from the new session."""
        with contextlib.suppress(SchedulerLost):
            await session.send(msg)

    async def _report_peer_failed(self, session: SchedulerSession, failure: DownloadFailed) -> None:
        await self._report_failure(
            session,
            PeerFailed(
                peer_id=self.peer_id,
                task_id=self.task_id,
                reason=failure.reason[:1000],
                http_status=failure.http_status,
            ),
        )

    # ------------------------------------------------------------ layout and pieces

    async def _set_layout(
        self,
        content_length: int,
        piece_length: int,
        etag: str,
        last_modified: str,
        content_type: str,
    ) -> None:
        if self.metadata_ready.is_set():
            if (content_length, piece_length) != (self.content_length, self.piece_length):
                raise DownloadFailed(
                    f"task layout changed: {self.content_length}/{self.piece_length} → "
                    f"{content_length}/{piece_length}",
                    409,
                )
            return
        self.content_length = content_length
        self.piece_length = piece_length
        self.piece_count = count_pieces(content_length, piece_length) if content_length >= 0 else -1
        self.etag, self.last_modified, self.content_type = etag, last_modified, content_type
        self.handle = await self.daemon.store.open_task(
            self.task_id,
            url=self.request.spec.url,
            tag=self.request.spec.tag,
            application=self.request.spec.application,
            content_length=content_length,
            piece_length=piece_length,
            etag=etag,
            last_modified=last_modified,
            digest=self.request.spec.digest or None,
            private=self.private or None,  # (never back to public)
        )
        self._pieces = self.handle.pieces
        for p in self.handle.pieces.values():
            self.digests.setdefault(p.number, p.sha256)
        if self.piece_count >= 0:
            cfg = self.daemon.config.download
            self.picker = PiecePicker(
                self.piece_count,
                have=self.have,
                max_in_flight=cfg.concurrent_piece_count,
                seed=self.peer_id,  # siblings pick different pieces, reproducibly
            )
            self._update_cursor()
            self._compute_wanted()
            self._feed_picker(self.digests)
        self.metadata_ready.set()
        self._notify()

    def _add_digests(self, digests: list[PieceDigest]) -> None:
        new = []
        for d in digests:
            if d.number not in self.digests:
                self.digests[d.number] = d.digest
                new.append(d.number)
        if new and self.picker is not None:
            self._feed_picker(new)
            self._notify()

    def _piece_landed(self, piece: PieceRecord, parent_id: str, cost: float) -> None:
        """A verified piece is in the store: report, announce, count, wake the streams."""
        self._reports.append(
            PieceReport(
                number=piece.number,
                offset=piece.offset,
                length=piece.length,
                digest=piece.sha256,
                parent_id=parent_id,
                cost_ms=int(cost * 1000),
            )
        )
        self._report_wakeup.set()
        now = trio.current_time()
        self._tell(self._announce.landed((piece.number,), now) + self._announce.due(now))
        metrics = self.daemon.metrics
        source = "back_to_source" if parent_id == "" else "p2p"
        metrics.download_bytes.labels(source).inc(piece.length)
        metrics.pieces.labels(source).inc()
        if parent_id:
            self.bytes_p2p += piece.length
        else:
            self.bytes_source += piece.length
        self._notify()

    @property
    def _all_pieces_had(self) -> bool:
        return self.piece_count >= 0 and len(self.have) >= self.piece_count

    @property
    def _wanted_had(self) -> bool:
        return self._wanted is not None and self._wanted <= self.have

    @property
    def _target_reached(self) -> bool:
        """Every piece is had; or, for a range-only download, every wanted piece is had
        and no client stream is attached any more (one may still add a range)."""
        if self._all_pieces_had:
            return True
        return self.piece_count >= 0 and self.clients == 0 and self._wanted_had

    # ------------------------------------------------------------ P2P

    async def _on_candidates(self, msg: CandidateParents, nursery: trio.Nursery) -> None:
        self.private = self.private or msg.private
        if msg.piece_length is not None and msg.content_length >= 0:
            await self._set_layout(
                msg.content_length, msg.piece_length, msg.etag, msg.last_modified, msg.content_type
            )
        self._add_digests(msg.digests)
        self.log.debug(
            "candidate parents",
            parents=[p.peer_id for p in msg.parents],
            digests=len(msg.digests),
            have=len(self.have),
        )
        if self.piece_count == 0:
            self._notify()  # empty file: nothing to fetch
            return
        tickets = _tickets(msg, self.daemon.host.host_id)
        for info in msg.parents:
            known = self._parents.get(info.peer_id)
            if known is not None:
                known.ticket = tickets.get(info.peer_id) or known.ticket  # a fresh one
                continue
            if info.peer_id in self._blocked:
                continue
            parent = _Parent(
                info,
                HTTPClient(
                    connect_timeout=self.daemon.config.download.connect_timeout,
                    read_timeout=self.daemon.config.download.piece_timeout,
                ),
                ticket=tickets.get(info.peer_id),
            )
            self._parents[info.peer_id] = parent
            assert self.picker is not None
            self.picker.add_parent(info.peer_id)
            nursery.start_soon(self._subscribe_parent, parent)
        self._notify()

    async def _subscribe_parent(self, parent: _Parent) -> None:
        """Follow a parent's piece announcements until it is done or fails."""
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
                    ticket = parent.ticket
                    await channel.send(
                        Subscribe(
                            task_id=self.task_id,
                            peer_id=self.peer_id,
                            parent_id=pid,
                            host_id=ticket.child_host_id if ticket else "",
                            ticket=ticket.mac if ticket else b"",
                            expires_at=ticket.expires_at if ticket else 0,
                        )
                    )
                    async for msg in channel:
                        if isinstance(msg, PieceAnnounce):
                            assert self.picker is not None
                            self.picker.parent_has(
                                pid, [p.number for p in msg.pieces if p.number < self.piece_count]
                            )
                            self._notify()
                        elif isinstance(msg, AnnounceDone):
                            return  # it holds everything; keep fetching from it
                    raise ChannelClosed("parent closed the announcements")
            except (OSError, ChannelClosed, trio.TooSlowError, Exception) as exc:
                if self.finished.is_set():
                    return
                self.log.info("parent announcements failed", parent=pid, error=repr(exc))
                self._drop_parent(pid)

    def _forget_parents(self) -> None:
        """Drop every parent without blaming it: their requests return to the queue."""
        for pid, parent in list(self._parents.items()):
            parent.scope.cancel()
            self._retired.append(parent.client)
            if self.picker is not None:
                self.picker.remove_parent(pid)
        self._parents.clear()
        for scope, _ in self._fetches.values():
            scope.cancel()

    def _stop_p2p(self) -> None:
        for pid in list(self._parents):
            self._drop_parent(pid)

    def _drop_parent(self, pid: str) -> None:
        parent = self._parents.pop(pid, None)
        self._blocked.add(pid)
        if parent is None:
            return
        parent.scope.cancel()
        self._retired.append(parent.client)
        if self.picker is not None:
            for number in self.picker.remove_parent(pid):
                entry = self._fetches.get((number, pid))
                if entry is not None:
                    entry[0].cancel()
        self._notify()

    async def _p2p_loop(self, session: SchedulerSession, nursery: trio.Nursery) -> None:
        assert self.picker is not None
        picker = self.picker
        while not self._target_reached:
            stale = False
            for number, pid in picker.pick(trio.current_time()):
                parent = self._parents.get(pid)
                if parent is None:
                    picker.on_failure(number, pid)
                    continue
                if parent.ticket is not None and parent.ticket.stale(time.time()):
                    # Its ticket is (about to be) refused: fresh ones come with the
                    # scheduler's answer to a Reschedule, and wake this loop.
                    picker.on_cancelled(number, pid)
                    stale = True
                    continue
                nursery.start_soon(self._fetch_piece, session, number, parent)
            # Stalled with digests in hand but no parent serving them: ask for others.
            # (Pieces whose digest is unknown wait for the origin, not for parents.)
            waiting_for_parents = len(self.digests) > len(self.have) and not self._wanted_had
            if (
                stale or (waiting_for_parents and picker.stalled())
            ) and trio.current_time() - self._last_reschedule > RESCHEDULE_INTERVAL:
                self._last_reschedule = trio.current_time()
                await self._report_failure(
                    session,
                    Reschedule(
                        peer_id=self.peer_id,
                        task_id=self.task_id,
                        blocked_parents=sorted(self._blocked)[:1024],
                        reason="no parent can serve the missing pieces",
                    ),
                )
            wake = trio.current_time() + RESCHEDULE_INTERVAL
            rest = picker.busy_until()
            with trio.move_on_at(wake if rest is None else min(wake, rest)):
                await self._changed.wait()

    async def _fetch_piece(self, session: SchedulerSession, number: int, parent: _Parent) -> None:
        """Fetch one piece from one parent, verify it, record it.

        The first request for a piece splices straight into the task file; an endgame
        duplicate receives into memory and verifies there. Whoever wins first stops the
        other requests for the piece and waits until they have stopped writing before it
        writes and records: no bytes but verified ones ever lie under a recorded piece.
        """
        assert self.picker is not None and self.handle is not None
        pid = parent.info.peer_id
        offset = number * self.piece_length
        length = min(self.piece_length, self.content_length - offset)
        expected = self.digests[number]
        in_place = len(self.picker.in_flight.get(number, ())) <= 1 and number not in self.have
        started = trio.current_time()
        scope = trio.CancelScope()
        stopped = trio.Event()
        self._fetches[(number, pid)] = (scope, stopped)
        failure: str | None = None
        try:
            with scope:
                buf = await self._receive_piece(parent, number, offset, length, in_place)
                if buf is not None and hashlib.sha256(buf).digest() != expected:
                    raise DigestMismatch(f"piece {number}", expected.hex(), "other")
                await self._settle_piece(number, pid, buf, length, expected, started)
            if scope.cancelled_caught:
                self.picker.on_cancelled(number, pid)  # stopped by us: no blame
        except ParentBusy:
            # Not a failure: the parent is full; ask it again a moment later.
            self.picker.on_busy(number, pid, trio.current_time())
            self._notify()
        except DigestMismatch:
            failure = "digest mismatch"
            self.daemon.metrics.piece_failures.labels("digest").inc()
        except trio.TooSlowError:
            failure = "timeout"
            self.daemon.metrics.piece_failures.labels("timeout").inc()
        except (HTTPClientError, OSError, StorageError) as exc:
            failure = str(exc)[:500]
            self.daemon.metrics.piece_failures.labels("transfer").inc()
        finally:
            if self._fetches.get((number, pid), (None,))[0] is scope:
                del self._fetches[(number, pid)]
            stopped.set()
        if failure is not None and number not in self.have:
            self.log.info("piece failed", number=number, parent=pid, reason=failure)
            self.picker.on_failure(number, pid)
            if failure == "digest mismatch":
                # A parent that serves other bytes than the origin's is done for this task.
                self._drop_parent(pid)
            await self._report_failure(
                session,
                PieceFailed(
                    peer_id=self.peer_id,
                    task_id=self.task_id,
                    number=number,
                    parent_id=pid,
                    reason=failure,
                ),
            )
            self._notify()

    async def _receive_piece(
        self, parent: _Parent, number: int, offset: int, length: int, in_place: bool
    ) -> bytearray | None:
        """The piece's bytes: spliced into the file (None), or in memory for a duplicate."""
        assert self.handle is not None
        limiter = self.daemon.download_limiter
        if limiter is not None:
            await limiter.acquire(length)
        url = f"{parent.base_url}/pieces/{self.task_id}/{number}"
        ticket = [(TICKET_HEADER, parent.ticket.header())] if parent.ticket else []
        with trio.fail_after(self.daemon.config.download.piece_timeout):
            async with parent.client.request("GET", url, ticket) as r:
                if r.status == 503:
                    await discard(r)
                    raise ParentBusy(url)
                if r.status != 200:
                    raise HTTPClientError(f"parent answered {r.status}")
                if r.content_length != length:
                    raise HTTPClientError(
                        f"parent sent {r.content_length} bytes for a {length}-byte piece"
                    )
                if in_place:
                    await r.splice_to(self.handle.file.fd, offset, length)
                    return None
                buf = bytearray(length)
                await r.readinto_exactly(buf)
                return buf

    async def _settle_piece(
        self,
        number: int,
        pid: str,
        buf: bytearray | None,
        length: int,
        expected: bytes,
        started: float,
    ) -> None:
        """Stop the other requests for the piece, then verify/write and record it.

        Shielded: once it starts, the piece is recorded and announced (or found bad)
        as one step, so the picker, the store and the announcements never disagree.
        """
        assert self.picker is not None and self.handle is not None
        # One settler per piece at a time; waiting for the turn stays cancellable, so a
        # settler that stops the others never waits on one that waits for it.
        lock = self._settle_locks.setdefault(number, trio.Lock())
        async with lock:
            with trio.CancelScope(shield=True):
                if number in self.have:
                    return  # another request won meanwhile
                others = [
                    entry
                    for key, entry in self._fetches.items()
                    if key[0] == number and key[1] != pid
                ]
                for other_scope, _ in others:
                    other_scope.cancel()
                for _, other_stopped in others:
                    await other_stopped.wait()
                if buf is None:
                    piece = await self.daemon.store.commit_piece(
                        self.handle, number, length, expected
                    )
                else:
                    piece = await self.daemon.store.write_piece(self.handle, number, buf, expected)
                for key in self.picker.on_success(
                    number, pid, length, trio.current_time() - started
                ):
                    entry = self._fetches.get(key)
                    if entry is not None:
                        entry[0].cancel()  # requests made while this one settled
                self.log.debug(
                    "piece fetched",
                    number=number,
                    parent=pid,
                    seconds=round(trio.current_time() - started, 4),
                )
                self._piece_landed(piece, pid, trio.current_time() - started)

    # ------------------------------------------------------------ back to source

    async def _source_task(self, msg: NeedBackToSource, session: SchedulerSession) -> None:
        """Fetch from the origin; a failure is reported, so the scheduler can fail the task
        for everyone (origin 404, content changed) or hand the origin to someone else."""
        try:
            await self._back_to_source(msg, session)
        except Exception as raised:
            exc = find_exception(raised, DownloadFailed)
            if exc is None and find_exception(raised, SchedulerLost) is not None:
                raise  # the next scheduler takes over; the origin fetch resumes there
            if exc is None:
                self.log.exception("back to source failed")
                exc = DownloadFailed(f"internal error: {raised!r}")
            await self._report_peer_failed(session, exc)
            self._fail(exc)

    async def _back_to_source(
        self, msg: NeedBackToSource | None, session: SchedulerSession | None
    ) -> None:
        req = self.request
        cfg = self.daemon.config.download
        if not req.back_to_source or not cfg.back_to_source:
            raise DownloadFailed("no parent can serve and back-to-source is off")
        self._announce.stagger = True  # new bytes enter the swarm here
        if msg is not None:
            self._add_digests(msg.digests)
        if not (self.metadata_ready.is_set() and self._all_pieces_had):
            fetcher = OriginFetcher(
                self.daemon.origin_client,
                req.spec.url,
                req.headers,
                limiter=self.daemon.source_limiter,
                concurrency=cfg.origin_concurrency,
                expect_etag=(msg.etag if msg else "") or self.etag,
                expect_last_modified=(msg.last_modified if msg else "") or self.last_modified,
            )
            try:
                info = await fetcher.probe()
            except OriginError as exc:
                raise DownloadFailed(str(exc), exc.http_status) from None
            known_length = msg.content_length if msg is not None else -1
            if known_length >= 0 and info.content_length != known_length:
                raise DownloadFailed(
                    f"origin content changed: length {known_length} → {info.content_length}", 409
                )
            piece_length = (
                (msg.piece_length if msg is not None else None)
                or req.spec.piece_length
                or self.piece_length
                or piece_length_for(info.content_length)
            )
            # A blob's digest names its bytes: the origin's validators add nothing, and
            # two registries (or a storage redirect) give the same blob different ones.
            etag, last_modified = ("", "") if req.spec.digest else (info.etag, info.last_modified)
            await self._set_layout(
                info.content_length, piece_length, etag, last_modified, info.content_type
            )
            await self._announce_source(session)
            try:
                await fetcher.fetch(self)
            except OriginError as exc:
                raise DownloadFailed(str(exc), exc.http_status) from None
        else:
            await self._announce_source(session)
        if not self._target_reached:
            raise DownloadFailed(
                f"origin fetch ended with {len(self.have)} of {self.piece_count} pieces"
            )
        self._notify()

    async def _announce_source(self, session: SchedulerSession | None) -> None:
        """Tell the scheduler what the origin said, and which pieces this peer already has
        (a resumed task: they count as fetched from the origin)."""
        if session is not None:
            await session.send(
                TaskMetadata(
                    peer_id=self.peer_id,
                    task_id=self.task_id,
                    content_length=self.content_length,
                    piece_length=self.piece_length,
                    piece_count=self.piece_count,
                    etag=self.etag,
                    last_modified=self.last_modified,
                    content_type=self.content_type,
                )
            )
        self._report_held_pieces()

    def _report_held_pieces(self) -> None:
        """Pieces this peer already had (a resumed task) count as fetched from the origin."""
        assert self.handle is not None
        for p in sorted(self.handle.pieces.values(), key=lambda p: p.number):
            self._reports.append(PieceReport(p.number, p.offset, p.length, p.sha256, "", 0))
        self._report_wakeup.set()

    # PieceSink for OriginFetcher
    @property
    def fd(self) -> int:
        assert self.handle is not None
        return self.handle.file.fd

    def claim_next_missing(self) -> int | None:
        # In order: a streaming client wants the front first.
        for number in range(self.piece_count):
            if number not in self.have and number not in self._claimed and self._is_wanted(number):
                self._claimed.add(number)
                return number
        return None

    def unclaim(self, number: int) -> None:
        self._claimed.discard(number)

    async def origin_piece_written(self, number: int, offset: int, length: int) -> None:
        assert self.handle is not None
        started = trio.current_time()
        digest = await trio.to_thread.run_sync(self.handle.file.digest, offset, length)
        expected = self.digests.get(number)
        if expected is not None and expected != digest:
            raise OriginChanged(
                f"origin content changed: piece {number} differs from the task's first fetch", 409
            )
        piece = PieceRecord(number, offset, length, digest)
        with trio.CancelScope(shield=True):  # recorded and announced as one step
            await self.daemon.store.piece_done(self.handle, piece)
            self.digests[number] = digest
            self._claimed.discard(number)
            if self.picker is not None:
                self.picker.mark_have(number)
            self._piece_landed(piece, "", trio.current_time() - started)

    def holds(self, number: int) -> bool:
        return number in self.have

    def check_held_piece(self, number: int, data: bytes | bytearray) -> None:
        """A streamed origin body passes a piece this peer already has: same bytes?"""
        if hashlib.sha256(data).digest() != self.digests.get(number):
            raise OriginChanged(
                f"origin content changed: piece {number} differs from the stored one", 409
            )

    async def set_content_length(self, content_length: int) -> None:
        self.content_length = content_length
        self.piece_count = count_pieces(content_length, self.piece_length)
        await self.daemon.store.set_content_length(self.task_id, content_length)


def _tickets(msg: CandidateParents, host_id: str) -> dict[str, Ticket]:
    """The tickets of a CandidateParents by parent peer ID (none without identity)."""
    if len(msg.tickets) != len(msg.parents):
        return {}
    return {
        info.peer_id: Ticket(host_id, msg.ticket_expires_at, mac)
        for info, mac in zip(msg.parents, msg.tickets, strict=True)
        if mac
    }


def _piece_info(p: PieceRecord) -> PieceInfo:
    return PieceInfo(number=p.number, offset=p.offset, length=p.length, digest=p.sha256)
