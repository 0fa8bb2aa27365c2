"""The download of one task on one peer, as a sans-I/O state machine.

Like h11's Connection: events go in as method calls (each takes ``now``, seconds, from the
caller's clock), decisions come out as a list of actions for the caller to perform. The
trio driver (dragonfly/peer/download.py) performs them with sockets and a disk; the
simulation (dragonfly/sim/) performs them in a model of the network. No decision of the
peer is made anywhere else.

The rules, in the order a download meets them:

1. **Register.** ``connected`` (a scheduler session is open): ``RegisterPeer`` with the
   task's spec. ``scheduler_lost`` keeps every parent and fetch going; the next
   ``connected`` registers again. ``no_scheduler``: back to source when allowed, else
   fail.
2. **Layout.** The first ``CandidateParents`` or origin probe that gives the length and
   piece length opens the task (``OpenTask``); nothing is fetched before ``task_opened``
   says which pieces the store already holds (a resumed task). A later, different layout
   fails the download (409): two versions are never mixed.
3. **Digests.** A piece is requested from a parent only once its origin-side digest is
   known (from the scheduler); the store checks every piece against it before recording.
4. **Parents.** Each parent of a ``CandidateParents`` is subscribed to once (``Subscribe``)
   and kept until its announcements end without it holding everything
   (``parent_gone``), it sends bytes that differ from the origin's, or the download goes
   back to source; a dropped parent is never taken again for this download. Each comes
   with the scheduler's ticket for it (dragonfly/trust.py), renewed by every later
   ``CandidateParents`` that names it; a parent is asked nothing with a stale ticket.
5. **Pieces.** The picker (dragonfly/engine/picker.py) decides which piece from which
   parent; at most ``concurrent_pieces`` requests are in flight. The first request of a
   piece is written in place; an endgame duplicate is received aside
   (``Fetch.in_place``), and the first one in hand cancels the others (``piece_in_hand``).
   A request not landed within ``piece_timeout`` (waiting for the parent's upload slot
   included) is cancelled and counts as that parent's failure for that piece; a "busy"
   answer only rests the parent. Every failure is reported to the scheduler.
6. **Stalls.** With digests in hand and no parent able to serve a missing piece, or a
   parent whose ticket is about to expire (wall time: ``now + wall_offset``), the
   machine asks for other parents (``Reschedule``) at most every
   ``reschedule_interval``; the scheduler answers with parents (and fresh tickets) or
   ``NeedBackToSource``. Nothing waits without bound: with no sign of progress (a piece,
   a new digest, a new announcement, the origin's answer) for ``stall_timeout``, the
   machine asks for other parents; as long again, it goes to the origin for the pieces
   it lacks where allowed, else (or at the origin already) it fails with 504 naming how
   long nothing came. Each step is a ``Stalled`` action (logged once, counted).
7. **Back to source** (told so, no scheduler, or a seed peer's trigger): the parents are
   dropped, the origin is probed (``ProbeOrigin``; the validators the task started with
   are expected), its metadata reported (``TaskMetadata``), and the missing wanted pieces
   fetched lowest first (``FetchOrigin``) by ``origin_concurrency`` requests at once:
   side by side, or one piece at a time in slices where the origin's rate makes a piece
   take long (``origin_split`` in source.py), or in order
   from one body when the origin takes no ranges (``StreamOrigin``). Pieces held already
   count as fetched from the origin. A piece that differs from a digest known for it
   fails the download (the origin changed, 409).
8. **Reports.** Every verified piece is reported (``PiecesFinished``), batched over
   ``report_interval``; it is announced to subscribed children per the announcement
   schedule (dragonfly/engine/announce.py; staggered while fetching from the origin).
9. **The end.** Every piece held: ``Complete`` (the caller checks the whole file where its
   digest is known), then ``completed`` sends the last reports and ``PeerFinished``
   (``Finished``). A range-only download (``whole=False``) ends when its wanted pieces are
   held and no client stream is attached: ``LeavePeer``, ``RangesDone``. A failure
   (``TaskFailed``, origin error, digest mismatch of the whole) ends in ``Failed``: the
   machine never says finished for a file that is not every verified piece.
10. **Linger.** A download that fed children from the origin keeps its announcement
    schedule after the end, up to ``linger_limit``, while it has children and held-back
    pieces (revealing them all at once would have every child ask for the same piece).

``next_wakeup(now)`` is when ``tick`` has something to do (a timeout, a batch of
reports, a reveal, a resting parent, a reschedule, an endgame duplicate); the caller calls
``tick(now)`` then.

Why one class over several modules: these rules are one state machine over one state
(phase, layout, pieces held, parents, requests, children), and this docstring states them
all, in order, next to the others they must agree with. The class is ``DownloadMachine``
here, where its state is set up and the scheduler's messages, the layout, clients,
parents, fetch outcomes and children are handled; three mixins it inherits hold the
transitions that part from those, on the same state (declared once, ``MachineState`` in
state.py, with the phase and the other records): registration and the end (lifecycle.py:
rules 1, 8, 9), picking, timers and stalls (stalls.py: rules 5, 6), back to source
(source.py: rule 7). machine.py is about 600 lines, the rules and the state; each mixin
under 200. What is bookkeeping rather than a rule lives beside it: requests in flight
(requests.py), the picker (picker.py), the announcement schedule (announce.py), the
actions (actions.py).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

from dragonfly.engine.actions import (
    Action,
    Announce,
    Cancel,
    Failed,
    MachineConfig,
    OpenTask,
    Send,
    Subscribe,
    Unsubscribe,
)
from dragonfly.engine.announce import AnnounceSchedule
from dragonfly.engine.lifecycle import LifecycleMixin
from dragonfly.engine.picker import PiecePicker
from dragonfly.engine.requests import Request, RequestTable
from dragonfly.engine.source import OriginPace, SourceMixin
from dragonfly.engine.stalls import StallsMixin
from dragonfly.engine.state import INF, Phase, _Counters, _Layout, _Parent
from dragonfly.identity import IdentityError, PieceLayout
from dragonfly.trust import Ticket
from dragonfly.wire.codec import Message
from dragonfly.wire.messages import (
    CandidateParents,
    NeedBackToSource,
    PieceDigest,
    PieceDigests,
    PieceFailed,
    PieceReport,
    TaskFailed,
    TaskSpec,
)

__all__ = ["DownloadMachine", "Phase"]


class DownloadMachine(LifecycleMixin, StallsMixin, SourceMixin):
    """One task's download on one peer. See the module docstring for its rules."""

    def __init__(
        self,
        task_id: str,
        peer_id: str,
        spec: TaskSpec,
        *,
        headers: dict[str, str] | None = None,
        config: MachineConfig | None = None,
        back_to_source: bool = True,
        seed_trigger: bool = False,
        whole: bool = True,
        seed: int | str | bytes | None = None,
        host_id: str = "",
        private: bool = False,
    ) -> None:
        self.task_id = task_id
        self.peer_id = peer_id
        self.host_id = host_id  # this host's: the tickets the scheduler gives are for it
        self.private = private  # the request carried credentials (said when registering)
        # now + wall_offset = unix time, which tickets expire in (the driver sets it).
        self.wall_offset = 0.0
        self.spec = spec
        self.headers = dict(headers or {})
        self.cfg = config or MachineConfig()
        self.may_go_to_source = back_to_source and self.cfg.back_to_source
        self.seed_trigger = seed_trigger
        self._picker_seed = peer_id if seed is None else seed
        self.phase = Phase.STARTING
        self.layout = _Layout()
        self.digests: dict[int, bytes] = {}
        self.have: set[int] = set()
        self.picker: PiecePicker | None = None
        self.opened = False  # the store holds the task: pieces may be fetched
        self.parents: dict[str, _Parent] = {}
        self.blocked: dict[str, None] = {}  # parents never taken again (insertion order)
        self.requests = RequestTable()
        self._reports: list[PieceReport] = []
        self._report_due = INF
        self._last_reschedule = -INF
        self._reschedule_due = INF
        self.announce: AnnounceSchedule[Hashable] = AnnounceSchedule(
            stagger=False,
            reveal_after=self.cfg.reveal_after,
            give_up_after=self.cfg.give_up_after,
        )
        self.children: set[Hashable] = set()
        # back to source
        self._source_msg: NeedBackToSource | None = None  # what the scheduler said of it
        self._probing = False  # ProbeOrigin sent, no answer yet
        self._probed = False  # the origin answered; fetching starts once the task is open
        self._source_started = False
        self._streaming = False
        self._origin_pace = OriginPace()
        self._claim_from = 0
        # what clients want: None: the whole task; else byte ranges (inclusive)
        self._ranges: list[tuple[int, int]] | None = None if whole else []
        self._wanted: set[int] | None = None
        self.clients = 0  # client streams attached (a range-only download outlives none)
        self._cursor: int | None = None
        self._ranges_done = False
        self.error: Failed | None = None
        self.ended_at: float | None = None
        self.counters = _Counters()
        # The last sign of progress (a piece, a new digest, a new announcement, the
        # origin's answer) and how many stall steps were taken since.
        self._progress_at: float | None = None  # (the first event starts the clock)
        self._stall_steps = 0

    # ------------------------------------------------------------------ state

    @property
    def done(self) -> bool:
        return self.phase in (Phase.FINISHED, Phase.FAILED) or self._ranges_done

    @property
    def finished(self) -> bool:
        return self.phase is Phase.FINISHED

    @property
    def piece_count(self) -> int:
        return self.layout.piece_count

    @property
    def all_held(self) -> bool:
        return self.layout.piece_count >= 0 and len(self.have) >= self.layout.piece_count

    @property
    def _wanted_held(self) -> bool:
        return self._wanted is not None and self._wanted <= self.have

    @property
    def target_reached(self) -> bool:
        """Every piece is held; or, range-only, every wanted piece and no client attached
        (one may still add a range)."""
        if self.all_held:
            return True
        return self.layout.piece_count >= 0 and self.clients == 0 and self._wanted_held

    def held_back(self, number: int) -> bool:
        """Whether the piece awaits its first copy to a child (served ahead of others)."""
        return self.announce.held_back(number)

    # ------------------------------------------------------------------ scheduler

    def scheduler_message(self, msg: Message, now: float) -> list[Action]:
        if self.done and not isinstance(msg, TaskFailed):
            return []
        kind = type(msg)
        if kind is CandidateParents:
            assert isinstance(msg, CandidateParents)
            return self._on_candidates(msg, now)
        if kind is PieceDigests:
            assert isinstance(msg, PieceDigests)
            self._add_digests(msg.digests, now)
            return self._pump(now)
        if kind is NeedBackToSource:
            assert isinstance(msg, NeedBackToSource)
            if self.phase not in (Phase.STARTING, Phase.P2P):
                return []  # at the origin already, or every piece held
            return self._go_to_source(msg, now)
        if kind is TaskFailed:
            assert isinstance(msg, TaskFailed)
            if self.done:
                return []
            return self._fail(msg.reason, msg.http_status, now, report=False)
        return []

    def _on_candidates(self, msg: CandidateParents, now: float) -> list[Action]:
        out: list[Action] = []
        if msg.piece_length is not None and msg.content_length >= 0:
            out += self._set_layout(
                msg.content_length,
                msg.piece_length,
                msg.etag,
                msg.last_modified,
                msg.content_type,
                now,
            )
            if self.done:
                return out
        self._add_digests(msg.digests, now)
        if self.phase not in (Phase.STARTING, Phase.P2P):
            return out  # the origin it is, or every piece held: parents no longer help
        if self.phase is Phase.STARTING:
            self.phase = Phase.P2P
        tickets = msg.tickets if len(msg.tickets) == len(msg.parents) else []
        for i, info in enumerate(msg.parents):
            pid = info.peer_id
            ticket = (
                Ticket(self.host_id, msg.ticket_expires_at, tickets[i])
                if tickets and tickets[i]
                else None
            )
            known = self.parents.get(pid)
            if known is not None:
                known.ticket = ticket or known.ticket  # a fresh one
                continue
            if pid in self.blocked or pid == self.peer_id:
                continue
            self.parents[pid] = _Parent(info, ticket)
            if self.picker is not None:
                self.picker.add_parent(pid)
            out.append(Subscribe(info, ticket))
        out += self._pump(now)
        return out

    # ------------------------------------------------------------------ layout

    def _set_layout(
        self,
        content_length: int,
        piece_length: int,
        etag: str,
        last_modified: str,
        content_type: str,
        now: float,
    ) -> list[Action]:
        lay = self.layout
        if lay.piece_length:
            if (content_length, piece_length) != (lay.content_length, lay.piece_length):
                return self._fail(
                    f"task layout changed: {lay.content_length}/{lay.piece_length} → "
                    f"{content_length}/{piece_length}",
                    409,
                    now,
                )
            return []
        try:
            geometry = PieceLayout(content_length, piece_length) if content_length >= 0 else None
        except IdentityError as exc:
            return self._fail(str(exc), 502, now)
        lay.content_length, lay.piece_length = content_length, piece_length
        lay.geometry = geometry
        lay.piece_count = geometry.piece_count if geometry is not None else -1
        lay.etag, lay.last_modified, lay.content_type = etag, last_modified, content_type
        if lay.piece_count >= 0:
            self._make_picker()
        return [OpenTask(content_length, piece_length, etag, last_modified, content_type)]

    def _make_picker(self) -> None:
        cfg = self.cfg
        self.picker = PiecePicker(
            self.layout.piece_count,
            have=self.have,
            max_in_flight=cfg.concurrent_pieces,
            per_parent_limit=cfg.per_parent_limit,
            seed=self._picker_seed,  # siblings pick different pieces, reproducibly
        )
        for pid in self.parents:
            self.picker.add_parent(pid)
        self._compute_wanted()
        self._feed_picker(self.digests)
        self.picker.set_cursor(self._cursor)

    def task_opened(self, held: dict[int, bytes], now: float) -> list[Action]:
        """The store holds the task; ``held``: pieces it already had, with their digests."""
        self.opened = True
        for number, digest in held.items():
            self.digests.setdefault(number, digest)
            self._record_have(number)
        # Held before anyone subscribed (resumed, or adopted): revealed silently.
        self.announce.known(sorted(held))
        self._feed_picker(held)
        if self.phase is Phase.SOURCE:
            return self._start_source_fetch(now) if self._probed else []
        if self.target_reached:
            return self._reach_target(now)
        return self._pump(now)

    def finished_locally(
        self, content_length: int, piece_length: int, etag: str, last_modified: str
    ) -> None:
        """The store holds the whole task already (a local hit): nothing to fetch."""
        lay = self.layout
        lay.content_length, lay.piece_length = content_length, piece_length
        lay.geometry = PieceLayout(content_length, piece_length)
        lay.piece_count = lay.geometry.piece_count
        lay.etag, lay.last_modified = etag, last_modified
        self.have.update(range(lay.piece_count))
        self.opened = True
        self.phase = Phase.FINISHED

    def content_length_known(self, content_length: int, now: float) -> list[Action]:
        """A streamed body of unknown length ended: now the file's length is known."""
        lay = self.layout
        lay.content_length = content_length
        lay.geometry = PieceLayout(content_length, lay.piece_length)
        lay.piece_count = lay.geometry.piece_count
        if self.target_reached:
            return self._reach_target(now)
        return []

    def _add_digests(self, digests: Iterable[PieceDigest], now: float) -> None:
        new = []
        known = self.digests
        for d in digests:
            if d.number not in known:
                known[d.number] = d.digest
                new.append(d.number)
        if new:
            self._progress(now)  # the task moves somewhere: pieces landed at their source
            self._feed_picker(new)

    def _feed_picker(self, numbers: Iterable[int]) -> None:
        """The picker only requests pieces whose digest it knows: telling it only about
        wanted pieces keeps a range-only download to its ranges."""
        picker = self.picker
        if picker is None:
            return
        n = self.layout.piece_count
        wanted = self._wanted
        picker.digest_known([x for x in numbers if 0 <= x < n and (wanted is None or x in wanted)])

    # ------------------------------------------------------------------ clients

    def want_all(self, now: float) -> list[Action]:
        """From now on fetch the whole task."""
        if self._ranges is None or self.done:
            return []
        self._ranges = None
        self._wanted = None
        self._feed_picker(self.digests)
        return self._more_origin(now) + self._pump(now)

    def want_range(self, start: int, end: int, now: float) -> list[Action]:
        """Also fetch bytes [start, end] (inclusive)."""
        if self._ranges is None or self.done:
            return []
        self._ranges.append((start, end))
        if self.layout.geometry is None:
            return []
        self._compute_wanted()
        self._feed_picker(self.digests)
        return self._more_origin(now) + self._pump(now)

    def _compute_wanted(self) -> None:
        geometry = self.layout.geometry
        if self._ranges is None or geometry is None:
            self._wanted = None
            return
        wanted: set[int] = set()
        for start, end in self._ranges:
            wanted.update(geometry.pieces_of(start, end))
        self._wanted = wanted

    def _is_wanted(self, number: int) -> bool:
        return self._wanted is None or number in self._wanted

    def client_attached(self) -> None:
        self.clients += 1

    def client_detached(self, now: float) -> list[Action]:
        self.clients -= 1
        if not self.done and self.opened and self.target_reached:
            return self._reach_target(now)
        return []

    def streaming_from(self, number: int | None) -> None:
        """The lowest piece a streaming client waits for (None: none waits): the picker
        keeps an in-order window ahead of it."""
        self._cursor = number
        if self.picker is not None:
            self.picker.set_cursor(number)

    # ------------------------------------------------------------------ parents

    def parent_announced(self, parent_id: str, numbers: Iterable[int], now: float) -> list[Action]:
        picker = self.picker
        if picker is None or self.phase is not Phase.P2P or parent_id not in self.parents:
            return []
        n = self.layout.piece_count
        fresh = [x for x in numbers if 0 <= x < n and x not in self.have]
        if not fresh:
            return []  # a piece held changes none of the picker's decisions
        self._progress(now)
        picker.parent_has(parent_id, fresh)
        if not self.opened or picker.requests_in_flight >= self.cfg.concurrent_pieces:
            return []  # no request can start now: the next event that frees one picks
        if picker.resting(parent_id, now):
            return []  # it answered "busy" a moment ago: the wake-up after its rest picks
        return self._pump(now)

    def parent_gone(self, parent_id: str, now: float) -> list[Action]:
        """A parent's announcements ended (it failed, or left) before the download did."""
        if parent_id not in self.parents:
            return []
        return self._drop_parent(parent_id, now) + self._pump(now)

    def _drop_parent(self, parent_id: str, now: float) -> list[Action]:
        self.parents.pop(parent_id, None)
        self.blocked[parent_id] = None
        out: list[Action] = [Unsubscribe(parent_id)]
        if self.picker is not None:
            for number in self.picker.remove_parent(parent_id):
                request = self.requests.find(number, parent_id)
                if request is not None:
                    out.append(self._forget(request))
        return out

    # ------------------------------------------------------------------ fetch outcomes

    def piece_in_hand(self, fetch_id: int, now: float) -> list[Action]:
        """An endgame duplicate received its bytes aside: stop the other requests of the
        piece (so their writes end) before it is written."""
        request = self.requests.get(fetch_id)
        if request is None:
            return []
        return [
            self._forget(other)
            for other in self.requests.of_piece(request.number)
            if other.fetch_id != fetch_id
        ]

    def piece_landed(
        self, fetch_id: int, number: int, parent_id: str, nbytes: int, now: float
    ) -> list[Action]:
        """A piece from a parent is verified and recorded in the store."""
        request = self.requests.pop(fetch_id)
        out: list[Action] = []
        picker = self.picker
        if request is not None:
            if picker is not None:
                seconds = now - request.started
                for n, pid in picker.on_success(number, parent_id, nbytes, seconds):
                    duplicate = self.requests.find(n, pid)
                    if duplicate is not None:
                        self.counters.wasted_requests += 1
                        out.append(self._forget(duplicate))
        elif picker is not None and number not in self.have:
            # A request given up on whose bytes were recorded anyway: held all the same.
            picker.mark_have(number)
            out += [self._forget(r) for r in self.requests.of_piece(number)]
        if number in self.have:
            return out
        self.counters.bytes_p2p += nbytes
        cost = now - request.started if request is not None else 0.0
        return out + self._landed(number, parent_id, cost, nbytes, now)

    def piece_failed(
        self, fetch_id: int, reason: str, now: float, *, bad_bytes: bool = False
    ) -> list[Action]:
        """A request failed (transfer error, wrong length, or ``bad_bytes``: the piece's
        digest is not the origin's, and the parent is dropped for this download)."""
        request = self.requests.pop(fetch_id)
        if request is None:
            return []
        return self._failed(request, reason, now, bad_bytes=bad_bytes)

    def _failed(
        self, request: Request, reason: str, now: float, *, bad_bytes: bool = False
    ) -> list[Action]:
        out: list[Action] = []
        self.counters.failures += 1
        number, pid = request.number, request.parent_id
        if number in self.have:
            return out
        if self.picker is not None:
            self.picker.on_failure(number, pid)
        if bad_bytes:
            # A parent that serves other bytes than the origin's is done for this task.
            out += self._drop_parent(pid, now)
        out.append(
            Send(
                PieceFailed(
                    peer_id=self.peer_id,
                    task_id=self.task_id,
                    number=number,
                    parent_id=pid,
                    reason=reason[:1000],
                )
            )
        )
        return out + self._pump(now)

    def piece_busy(self, fetch_id: int, now: float) -> list[Action]:
        """The parent refused at once (every upload slot taken): ask it again later."""
        request = self.requests.pop(fetch_id)
        if request is None:
            return []
        self.counters.busy += 1
        if self.picker is not None:
            self.picker.on_busy(request.number, request.parent_id, now)
        return self._pump(now)

    def _forget(self, request: Request) -> Cancel:
        """Stop a request without blaming its parent (the picker requeues the piece when
        no other request for it is left)."""
        self.requests.pop(request.fetch_id)
        if self.picker is not None:
            self.picker.on_cancelled(request.number, request.parent_id)
        return Cancel(request.fetch_id, request.number, request.parent_id)

    def _forget_all(self) -> list[Action]:
        return [self._forget(r) for r in self.requests]

    def holds(self, number: int) -> bool:
        return number in self.have

    # ------------------------------------------------------------------ children

    def child_subscribed(self, child: Hashable, now: float) -> list[Action]:
        """A child follows this download's announcements: the pieces it may know now."""
        self.children.add(child)
        return self._tell(self.announce.subscribe(child))

    def child_left(self, child: Hashable, now: float) -> list[Action]:
        self.children.discard(child)
        return self._tell(self.announce.unsubscribe(child))

    def piece_uploaded(self, number: int, now: float) -> list[Action]:
        """A child received this piece from this peer in full."""
        self.announce.uploaded(number, now)
        return self._tell(self.announce.due(now))

    def lingering(self, now: float) -> bool:
        """Whether an ended download still keeps its schedule for its children."""
        if self.ended_at is None or not self.children:
            return False
        if now >= self.ended_at + self.cfg.linger_limit:
            return False
        return self.announce.next_due() is not None

    def reveal_all(self) -> list[Action]:
        """Announce everything held back now (the download and its linger are over)."""
        return self._tell(self.announce.reveal_all())

    def _tell(self, announcements: list[tuple[Hashable, list[int]]]) -> list[Action]:
        children = self.children
        return [Announce(c, numbers) for c, numbers in announcements if c in children and numbers]
