"""A swarm of simulated hosts driving the real scheduler and the real piece picker.

Each simulated host plays the part of the trio download engine (dragonfly/peer/
download.py) without sockets: it registers with the real ``Scheduler`` through
``handle()``, obeys its answers (CandidateParents, PieceDigests, NeedBackToSource,
TriggerDownload), fetches pieces with the real ``PiecePicker`` from the parents it was
given, learns what each parent holds from the parent's announcements, reports finished
pieces in batches, asks to be rescheduled when stalled, and keeps serving once done.
A seed peer answers TriggerDownload like the real one: it registers asking for the
origin, probes it, reports TaskMetadata and fetches the pieces in order with a few
concurrent range requests, reporting each with its origin-side digest.

What is modelled and what is not:

* bandwidth: see dragonfly/sim/engine.py (fair shares of each uplink and downlink);
* control messages (peer ↔ scheduler) take ``latency`` seconds one way; a probe of the
  origin takes one round trip; piece announcements of a parent reach its subscribed
  children at once; piece requests start at once (their latency is folded into the
  transfer);
* a piece request that has not landed after ``piece_timeout`` (waiting for one of the
  parent's upload slots included) is cancelled, marked failed in the picker and
  reported with PieceFailed, as the real engine does; a TaskFailed ends the download;
* nothing else fails: no bad digests, no origin errors, no departures (every host
  stays and serves to the end).

Like the real engine, a peer keeps every parent it was ever given (a later
CandidateParents only adds parents), and it stops fetching from peers (and drops its
parents) when told to go back to the origin.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from random import Random
from typing import Any

from dragonfly.config import PeerConfig
from dragonfly.engine.announce import GIVE_UP_AFTER, REVEAL_AFTER, AnnounceSchedule
from dragonfly.engine.picker import PiecePicker
from dragonfly.identity import IdentityError, check_piece_length, piece_length_for
from dragonfly.identity import piece_count as count_pieces
from dragonfly.sched.scheduler import Scheduler, SchedulerSettings, Send
from dragonfly.sim.bound import fluid_bound, piece_factor
from dragonfly.sim.engine import INF, Endpoint, EventLoop, Flow, make_network
from dragonfly.wire.codec import Message
from dragonfly.wire.messages import (
    CandidateParents,
    Error,
    HostInfo,
    NeedBackToSource,
    PeerFinished,
    PieceDigest,
    PieceDigests,
    PieceFailed,
    PieceReport,
    PiecesFinished,
    RegisterPeer,
    Reschedule,
    TaskFailed,
    TaskMetadata,
    TaskSpec,
    TriggerDownload,
)

__all__ = ["PERCENTILES", "SimConfig", "SimResult", "Swarm", "run_simulation"]

URL = "http://origin.sim/file.bin"
PERCENTILES = (0, 10, 25, 50, 75, 90, 99, 100)


# The model's knobs default to what a peer ships with.
_SHIPPED = PeerConfig()


@dataclass(frozen=True)
class SimConfig:
    """One simulated scenario.  Sizes in bytes, rates in bytes/s, times in seconds."""

    peers: int
    size: int
    piece_size: int
    origin_up: float
    peer_up: float
    peer_down: float | None = None  # None: downloads are not capped
    seed_peers: int = 1
    arrival: str = "burst"  # "burst": all at t=0; "poisson": at ``arrival_rate`` per second
    arrival_rate: float = 0.0
    seed: int = 0
    latency: float = 0.001  # one-way peer <-> scheduler message latency
    concurrent_pieces: int = 8  # [download] concurrent_piece_count
    per_parent_limit: int = 2  # the engine's PiecePicker default: requests per parent
    origin_concurrency: int = _SHIPPED.download.origin_concurrency
    upload_slots: int = _SHIPPED.upload.concurrent_limit
    upload_queue: int = _SHIPPED.upload.queue_limit  # requests that wait for a slot
    upload_children: int = _SHIPPED.upload.children_limit  # the host's HostInfo.upload_limit
    stagger: bool = True  # a peer fetching from the origin staggers its announcements
    reveal_after: float = REVEAL_AFTER  # ... and tells the other children this much later
    give_up_after: float = (
        GIVE_UP_AFTER  # ... or passes it on when its first child never fetched it
    )
    piece_timeout: float = _SHIPPED.download.piece_timeout  # queueing at the parent included
    report_interval: float = 0.05  # PiecesFinished batching, as the real engine
    reschedule_interval: float = 1.0  # at most one Reschedule per this, as the real engine
    max_time: float | None = None  # give up (unfinished) at this sim time; None: derived
    stall_limit: float = 120.0  # give up when no piece lands anywhere for this long
    settings: SchedulerSettings = field(default_factory=SchedulerSettings)
    check_invariants: bool = False  # scheduler.check_invariants() on every tick (slow)

    def __post_init__(self) -> None:
        if self.peers < 1:
            raise ValueError(f"peers must be >= 1, got {self.peers}")
        if self.seed_peers < 0:
            raise ValueError(f"seed peers must be >= 0, got {self.seed_peers}")
        if self.size < 1:
            raise ValueError(f"size must be at least one byte, got {self.size}")
        if self.piece_size < 1:
            raise ValueError(f"piece size must be at least one byte, got {self.piece_size}")
        if count_pieces(self.size, self.piece_size) > 1 << 20:
            raise ValueError("more than 2**20 pieces: choose a larger piece size")
        if self.piece_size != piece_length_for(self.size):
            try:  # the scheduler refuses a layout no peer would make
                check_piece_length(self.piece_size)
            except IdentityError as exc:
                raise ValueError(
                    f"piece size: {exc}, or the size's own ({piece_length_for(self.size)})"
                ) from None
        for name in ("origin_up", "peer_up"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name.replace('_', '-')} must be a positive rate")
        if self.peer_down is not None and not self.peer_down > 0:
            raise ValueError("peer-down must be a positive rate")
        if self.arrival not in ("burst", "poisson"):
            raise ValueError(f"arrival must be burst or poisson, got {self.arrival!r}")
        if self.arrival == "poisson" and not self.arrival_rate > 0:
            raise ValueError("a poisson arrival needs a positive rate")
        if self.latency < 0:
            raise ValueError("latency must be >= 0")
        if not self.piece_timeout > 0:
            raise ValueError("piece timeout must be positive")
        if not self.stall_limit > 0:
            raise ValueError("stall limit must be positive")
        if (
            min(
                self.concurrent_pieces,
                self.origin_concurrency,
                self.upload_slots,
                self.per_parent_limit,
            )
            < 1
        ):
            raise ValueError("concurrency limits must be >= 1")

    @property
    def piece_count(self) -> int:
        return count_pieces(self.size, self.piece_size)

    def bound(self) -> float:
        """T_min of Kumar & Ross for this scenario."""
        return fluid_bound(
            self.peers, self.size, self.origin_up, self.peer_up, self.peer_down, self.seed_peers
        )

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["settings"] = asdict(self.settings)
        return d


@dataclass(frozen=True)
class SimResult:
    """What one run measured; everything but ``wall_time`` is a function of the config."""

    config: SimConfig
    piece_count: int
    t_min: float  # the fluid bound
    t_all: float  # when the last peer finished (inf: not all did)
    efficiency: float  # t_min / t_all
    piece_factor: float  # 1 + log2(N)/k: the best a piece schedule can do is 1/this
    finished: int  # peers (not seed peers) holding every piece
    complete: bool  # every peer and every triggered seed holds every piece
    origin_bytes: int  # bytes the origin served
    seed_origin_bytes: int  # of which seed peers fetched
    p2p_bytes: int  # bytes moved between hosts (landed pieces)
    wasted_bytes: int  # bytes moved by requests cancelled mid-flight (endgame, timeouts)
    back_to_source_peers: int  # peers (not seeds) sent to the origin
    reschedules: int  # Reschedule messages sent
    timeouts: int  # piece requests that hit piece_timeout
    errors: int  # Error answers from the scheduler (0 in a healthy run)
    failed: int  # peers whose download failed (TaskFailed)
    gave_up: str  # why the run stopped before every peer finished ("" if they all did)
    durations: tuple[float, ...]  # per-peer download time, arrival to finish, sorted
    sim_time: float
    events: int
    counters: dict[str, int]
    wall_time: float = 0.0

    def percentiles(self) -> dict[int, float]:
        """Nearest-rank percentiles of the per-peer download time."""
        d = self.durations
        if not d:
            return {}
        return {p: d[max(0, math.ceil(p / 100 * len(d)) - 1)] for p in PERCENTILES}

    def as_dict(self, *, wall_time: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "config": self.config.describe(),
            "piece_count": self.piece_count,
            "t_min": self.t_min,
            "t_all": self.t_all if math.isfinite(self.t_all) else None,
            "efficiency": self.efficiency,
            "piece_factor": self.piece_factor,
            "finished": self.finished,
            "complete": self.complete,
            "origin_bytes": self.origin_bytes,
            "seed_origin_bytes": self.seed_origin_bytes,
            "p2p_bytes": self.p2p_bytes,
            "wasted_bytes": self.wasted_bytes,
            "back_to_source_peers": self.back_to_source_peers,
            "reschedules": self.reschedules,
            "timeouts": self.timeouts,
            "errors": self.errors,
            "failed": self.failed,
            "gave_up": self.gave_up,
            "percentiles": {str(k): v for k, v in self.percentiles().items()},
            "sim_time": self.sim_time,
            "events": self.events,
            "scheduler": self.counters,
        }
        if wall_time:
            out["wall_time"] = self.wall_time
        return out


class SimNode:
    """One simulated host with its one download of the task (a peer or a seed peer)."""

    __slots__ = (
        "announce",
        "arrived",
        "blocked",
        "bts",
        "claim_from",
        "claimed",
        "count",
        "done",
        "ep",
        "failed",
        "fetches",
        "finished_at",
        "flush_pending",
        "have",
        "have_list",
        "host_id",
        "info",
        "known",
        "known_count",
        "last_reschedule",
        "origin_bytes",
        "origin_workers",
        "parents",
        "peer_id",
        "picker",
        "registered",
        "reports",
        "reveal_pending",
        "seed",
        "subscribers",
        "sw",
        "timer_pending",
        "wake_pending",
    )

    def __init__(self, sw: Swarm, host_id: str, *, seed: bool) -> None:
        cfg = sw.cfg
        self.sw = sw
        self.host_id = host_id
        self.peer_id = f"{host_id}-p"
        self.seed = seed
        self.ep = Endpoint(
            host_id,
            cfg.peer_up,
            cfg.peer_down if cfg.peer_down is not None else INF,
            cfg.upload_slots,
        )
        self.info = HostInfo(
            host_id=host_id,
            hostname=host_id,
            ip="10.0.0.1",
            upload_port=4000,
            seed=seed,
            upload_limit=cfg.upload_children,
            upload_rate=int(cfg.peer_up),
        )
        k = sw.k
        self.arrived = 0.0
        self.finished_at = INF
        self.registered = False
        self.bts = False  # fetching from the origin
        self.done = False
        self.failed = False
        self.picker: PiecePicker | None = None
        self.have = bytearray(k)
        self.have_list: list[int] = []  # in landing order: a parent's announcement backlog
        self.count = 0
        self.known = bytearray(k)  # origin-side digest known
        self.known_count = 0
        self.parents: dict[str, SimNode] = {}
        self.subscribers: dict[str, SimNode] = {}  # children following my announcements
        self.announce: AnnounceSchedule[str] = AnnounceSchedule(
            stagger=False, reveal_after=cfg.reveal_after, give_up_after=cfg.give_up_after
        )
        self.blocked: dict[str, None] = {}
        self.fetches: dict[tuple[int, str], Flow] = {}
        self.reports: list[PieceReport] = []
        self.flush_pending = False
        self.reveal_pending = False
        self.wake_pending = False
        self.timer_pending = False
        self.last_reschedule = -INF
        self.claimed = bytearray(k)
        self.claim_from = 0
        self.origin_workers = 0
        self.origin_bytes = 0

    # -- arrival and scheduler messages ----------------------------------------------

    def arrive(self, _: object = None) -> None:
        """A peer host starts: Hello to the scheduler, then RegisterPeer for the task."""
        sw = self.sw
        self.arrived = sw.loop.now
        sw.scheduler.host_connected(self.info, sw.loop.now)
        self.register(need_back_to_source=False)

    def register(self, *, need_back_to_source: bool) -> None:
        self.registered = True
        sw = self.sw
        sw.to_scheduler(
            self.host_id,
            RegisterPeer(
                peer_id=self.peer_id,
                task_id=sw.task_id,
                task=sw.spec,
                need_back_to_source=need_back_to_source,
            ),
        )

    def receive(self, msg: Message) -> None:
        kind = type(msg)
        if kind is PieceDigests:
            assert isinstance(msg, PieceDigests)
            if msg.peer_id == self.peer_id:
                self._add_digests(msg.digests)
                self.pump()
        elif kind is CandidateParents:
            assert isinstance(msg, CandidateParents)
            self._on_candidates(msg)
        elif kind is NeedBackToSource:
            assert isinstance(msg, NeedBackToSource)
            self._on_back_to_source(msg)
        elif kind is TriggerDownload:
            assert isinstance(msg, TriggerDownload)
            if not self.registered:  # (a repeated trigger of a started task is moot)
                self.arrived = self.sw.loop.now
                self.register(need_back_to_source=True)
        elif kind is TaskFailed:
            assert isinstance(msg, TaskFailed)
            self._fail(f"TaskFailed: {msg.reason}")
        elif kind is Error:
            self.sw.errors.append(f"{self.host_id}: {msg}")

    def _on_candidates(self, msg: CandidateParents) -> None:
        if self.done or self.bts or self.failed or msg.peer_id != self.peer_id:
            return
        sw = self.sw
        if self.picker is None:
            if msg.content_length < 0 or msg.piece_length is None:
                return
            if (msg.content_length, msg.piece_length) != (sw.cfg.size, sw.cfg.piece_size):
                sw.errors.append(f"{self.peer_id}: unexpected layout in {msg}")
                return
            self.picker = PiecePicker(
                sw.k,
                have=self.have_list,
                max_in_flight=sw.cfg.concurrent_pieces,
                per_parent_limit=sw.cfg.per_parent_limit,
                seed=self.peer_id,  # siblings pick differently, reproducibly
            )
        self._add_digests(msg.digests)
        picker = self.picker
        nodes = sw.nodes
        for info in msg.parents:
            pid = info.peer_id
            if pid in self.parents or pid in self.blocked:
                continue
            parent = nodes[info.host_id]
            self.parents[pid] = parent
            picker.add_parent(pid)
            # Subscribe: the backlog now, each new piece as it lands.
            parent.subscribe(self)
        self.pump()

    def _add_digests(self, digests: list[PieceDigest]) -> None:
        if self.picker is None or self.known_count == self.sw.k:
            return  # (every CandidateParents repeats every digest: skip the walk)
        known = self.known
        new = []
        for d in digests:
            n = d.number
            if not known[n]:
                known[n] = 1
                new.append(n)
        if new:
            self.known_count += len(new)
            self.picker.digest_known(new)

    def parent_has(self, parent_id: str, number: int) -> None:
        """A subscribed parent announced a piece that just landed there."""
        picker = self.picker
        if picker is None or self.done or self.failed or self.have[number]:
            return  # (a piece it holds changes none of the picker's decisions)
        picker.parent_has(parent_id, (number,))
        if picker.requests_in_flight >= self.sw.cfg.concurrent_pieces:
            return  # no request budget left: nothing can start
        requestable = self.known[number] and number not in picker.in_flight
        if not requestable and len(picker.in_flight) != picker.missing:
            # The picker's last answer stands (in the endgame, an in-flight piece could
            # be duplicated on this parent: ask again then).
            return
        if picker.resting(parent_id, self.sw.loop.now):
            return  # it answered "busy" a moment ago: the wake-up after its rest will ask
        self.pump()

    def _fail(self, reason: str) -> None:
        """The download ends without the file (the real engine raises DownloadFailed)."""
        if self.done or self.failed:
            return
        sw = self.sw
        self.failed = True
        sw.failures.append(f"{self.peer_id}: {reason}")
        for flow in self.fetches.values():
            sw.wasted += sw.net.cancel(flow)
        self.fetches.clear()
        for parent in self.parents.values():
            parent.unsubscribe(self)
        self.parents.clear()
        # Its announcement channels close: its children drop it, as the real engine.
        for child in list(self.subscribers.values()):
            child.drop_parent(self.peer_id)
        self.subscribers.clear()

    def drop_parent(self, parent_id: str) -> None:
        """A parent's announcements ended without it holding everything: never again."""
        parent = self.parents.pop(parent_id, None)
        self.blocked[parent_id] = None
        if parent is None or self.picker is None:
            return
        sw = self.sw
        for number in self.picker.remove_parent(parent_id):
            flow = self.fetches.pop((number, parent_id), None)
            if flow is not None:
                sw.wasted += sw.net.cancel(flow)
        self.pump()

    # -- announcing to children ------------------------------------------------------

    def subscribe(self, child: SimNode) -> None:
        self.subscribers[child.peer_id] = child
        self._tell(self.announce.subscribe(child.peer_id))

    def unsubscribe(self, child: SimNode) -> None:
        self.subscribers.pop(child.peer_id, None)
        self._tell(self.announce.unsubscribe(child.peer_id))

    def uploaded(self, number: int) -> None:
        """A child received a whole piece from me."""
        self.announce.uploaded(number, self.sw.loop.now)
        self._tell([])

    def _tell(self, announcements: list[tuple[str, list[int]]]) -> None:
        me = self.peer_id
        for child_id, numbers in announcements:
            child = self.subscribers.get(child_id)
            if child is not None:
                for n in numbers:
                    child.parent_has(me, n)
        due = self.announce.next_due()
        if due is not None and not self.reveal_pending:
            self.reveal_pending = True
            self.sw.loop.at(due, self._reveal)

    def _reveal(self, _: object) -> None:
        self.reveal_pending = False
        self._tell(self.announce.due(self.sw.loop.now))

    # -- fetching from parents -------------------------------------------------------

    def pump(self) -> None:
        """Start what the picker says; reschedule when stalled (as the real p2p loop)."""
        picker = self.picker
        if picker is None or self.done or self.bts or self.failed:
            return
        sw = self.sw
        now = sw.loop.now
        refused = True
        while refused:  # a refusal frees a request slot: pick again (that parent rests)
            refused = False
            for number, pid in picker.pick(now):
                parent = self.parents[pid]
                ep = parent.ep
                # A held-back piece's first copy waits at the head of the queue: the
                # swarm needs it (dragonfly/engine/announce.py), as the real upload server.
                first = parent.announce.held_back(number)
                if (
                    not first
                    and len(ep.uploads) >= ep.slots
                    and len(ep.queue) >= sw.cfg.upload_queue
                ):
                    # Every upload slot taken: the parent answers 503 at once, as the
                    # real upload server does.
                    picker.on_busy(number, pid, now)
                    refused = True
                    continue
                flow = sw.net.start(
                    ep,
                    self.ep,
                    sw.piece_len(number),
                    self._p2p_landed,
                    (number, pid),
                    urgent=first,
                )
                self.fetches[(number, pid)] = flow
        rest = picker.busy_until()
        if rest is not None and rest > now:
            self._wake_at(rest)
        if not self.timer_pending and self.fetches:
            self._arm_timer()
        interval = sw.cfg.reschedule_interval
        if picker.stalled():
            due = self.last_reschedule + interval
            if now >= due:  # (not now - last >= interval: rounding could wake forever)
                self.last_reschedule = now
                due = now + interval
                sw.reschedules += 1
                sw.to_scheduler(
                    self.host_id,
                    Reschedule(
                        peer_id=self.peer_id,
                        task_id=sw.task_id,
                        blocked_parents=sorted(self.blocked)[:1024],
                        reason="no parent can serve the missing pieces",
                    ),
                )
            self._wake_at(due)
        elif picker.requests_in_flight and len(picker.in_flight) == picker.missing:
            self._wake_at(now + interval)  # endgame: duplicate overdue requests later

    def _wake_at(self, when: float) -> None:
        if not self.wake_pending:
            self.wake_pending = True
            self.sw.loop.at(when, self._wake)

    def _wake(self, _: object) -> None:
        self.wake_pending = False
        self.pump()

    def _arm_timer(self) -> None:
        """One timer per node for its oldest request: ``fetches`` is in request order."""
        first = next(iter(self.fetches.values()))
        self.timer_pending = True
        self.sw.loop.at(first.started + self.sw.cfg.piece_timeout, self._check_timeouts)

    def _check_timeouts(self, _: object) -> None:
        """piece_timeout passed for the oldest requests (waiting for an upload slot
        counts): give up on that parent for that piece and tell the scheduler, as the
        real engine does."""
        self.timer_pending = False
        sw = self.sw
        now = sw.loop.now
        timeout = sw.cfg.piece_timeout
        expired = []
        for flow in self.fetches.values():
            if flow.started + timeout > now:
                break
            expired.append(flow)
        picker = self.picker
        for flow in expired:
            number, pid = flow.data
            del self.fetches[(number, pid)]
            sw.wasted += sw.net.cancel(flow)
            sw.timeouts += 1
            if picker is not None:
                picker.on_failure(number, pid)
            sw.to_scheduler(
                self.host_id,
                PieceFailed(
                    peer_id=self.peer_id,
                    task_id=sw.task_id,
                    number=number,
                    parent_id=pid,
                    reason="timeout",
                ),
            )
        if expired:
            self.pump()
        if not self.timer_pending and self.fetches:
            self._arm_timer()

    def _p2p_landed(self, flow: Flow) -> None:
        number, pid = flow.data
        del self.fetches[(number, pid)]
        picker = self.picker
        assert picker is not None
        sw = self.sw
        now = sw.loop.now
        seconds = now - flow.started
        parent = self.parents.get(pid)
        if parent is not None:
            parent.uploaded(number)
        for other in picker.on_success(number, pid, flow.size, seconds):
            dup = self.fetches.pop(other, None)
            if dup is not None:
                sw.wasted += sw.net.cancel(dup)
        if self.have[number]:
            return
        sw.p2p_bytes += flow.size
        self._landed(number, pid, seconds)
        if picker.done:
            self._complete()
        else:
            self.pump()

    # -- fetching from the origin ----------------------------------------------------

    def _on_back_to_source(self, msg: NeedBackToSource) -> None:
        if self.bts or self.done or self.failed or msg.peer_id != self.peer_id:
            return
        sw = self.sw
        self.bts = True
        self.announce.stagger = sw.cfg.stagger  # new bytes enter the swarm here
        if not self.seed:
            sw.back_to_source += 1
        # Stop P2P: every parent dropped (and never asked again), fetches cancelled.
        for pid, parent in list(self.parents.items()):
            parent.unsubscribe(self)
            self.blocked[pid] = None
            if self.picker is not None:
                for number in self.picker.remove_parent(pid):
                    flow = self.fetches.pop((number, pid), None)
                    if flow is not None:
                        sw.wasted += sw.net.cancel(flow)
        self.parents.clear()
        self._add_digests(msg.digests)
        sw.loop.after(2 * sw.cfg.latency, self._probed)  # a 1-byte range request

    def _probed(self, _: object) -> None:
        """The origin answered the probe: tell the scheduler the layout, then fetch."""
        sw = self.sw
        cfg = sw.cfg
        piece_length = cfg.piece_size or piece_length_for(cfg.size)
        sw.to_scheduler(
            self.host_id,
            TaskMetadata(
                peer_id=self.peer_id,
                task_id=sw.task_id,
                content_length=cfg.size,
                piece_length=piece_length,
                piece_count=sw.k,
            ),
        )
        # Pieces already held count as fetched from the origin (as the real engine).
        for n in self.have_list:
            self.reports.append(
                PieceReport(n, n * cfg.piece_size, sw.piece_len(n), sw.digests[n], "", 0)
            )
        self._schedule_flush()
        if self.count == sw.k:
            self._complete()
            return
        for _ in range(cfg.origin_concurrency):
            if not self._origin_next():
                break

    def _origin_next(self) -> bool:
        """A range worker claims the lowest missing piece; False when none is left."""
        k = self.sw.k
        have, claimed = self.have, self.claimed
        n = self.claim_from
        while n < k and (have[n] or claimed[n]):
            n += 1
        self.claim_from = n
        if n >= k:
            return False
        claimed[n] = 1
        sw = self.sw
        self.origin_workers += 1
        sw.net.start(sw.origin, self.ep, sw.piece_len(n), self._origin_landed, n)
        return True

    def _origin_landed(self, flow: Flow) -> None:
        number: int = flow.data
        sw = self.sw
        self.origin_workers -= 1
        sw.origin_bytes += flow.size
        self.origin_bytes += flow.size
        if self.picker is not None:
            self.picker.mark_have(number)
        if not self.have[number]:
            self._landed(number, "", sw.loop.now - flow.started)
        if self.count == sw.k:
            if not self.done:
                self._complete()
        else:
            self._origin_next()

    # -- pieces landing, reports, completion -----------------------------------------

    def _landed(self, number: int, parent_id: str, seconds: float) -> None:
        """Record, report (batched) and announce a verified piece."""
        sw = self.sw
        sw.last_progress = sw.loop.now
        self.have[number] = 1
        self.have_list.append(number)
        self.count += 1
        self.reports.append(
            PieceReport(
                number,
                number * sw.cfg.piece_size,
                sw.piece_len(number),
                sw.digests[number],
                parent_id,
                int(seconds * 1000),
            )
        )
        self._schedule_flush()
        self._tell(self.announce.landed((number,), sw.loop.now))

    def _schedule_flush(self) -> None:
        if not self.flush_pending and self.reports:
            self.flush_pending = True
            self.sw.loop.after(self.sw.cfg.report_interval, self._flush)

    def _flush(self, _: object = None) -> None:
        self.flush_pending = False
        if self.reports:
            batch, self.reports = self.reports, []
            sw = self.sw
            sw.to_scheduler(
                self.host_id,
                PiecesFinished(peer_id=self.peer_id, task_id=sw.task_id, pieces=batch),
            )

    def _complete(self) -> None:
        """Every piece held: flush the reports, PeerFinished, stop following parents."""
        sw = self.sw
        self.done = True
        self.finished_at = sw.loop.now
        self._flush()
        sw.to_scheduler(
            self.host_id,
            PeerFinished(
                peer_id=self.peer_id,
                task_id=sw.task_id,
                content_length=sw.cfg.size,
                piece_count=sw.k,
            ),
        )
        for parent in self.parents.values():
            parent.unsubscribe(self)
        if not self.seed:
            sw.finished += 1


class Swarm:
    """The scheduler, the origin, the hosts and the event loop of one run."""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.k = cfg.piece_count
        self.loop = EventLoop()
        self.net = make_network(self.loop, download_caps=cfg.peer_down is not None)
        self.scheduler = Scheduler(cfg.settings, seed=cfg.seed)
        self.rng = Random(cfg.seed)
        # The piece size goes in the task when it is one a task may name; else the
        # seed's TaskMetadata sets it (the scheduler takes the reporter's layout).
        explicit = cfg.piece_size
        try:
            check_piece_length(explicit)
        except IdentityError:
            explicit = None
        self.spec = TaskSpec(url=URL, piece_length=explicit)
        self.task_id = self.spec.task_id
        # Deterministic stand-ins for the origin's piece digests.
        self.digests = [hashlib.sha256(n.to_bytes(8, "big")).digest() for n in range(self.k)]
        self._last_len = cfg.size - (self.k - 1) * cfg.piece_size
        self.origin = Endpoint("origin", cfg.origin_up)
        self.nodes: dict[str, SimNode] = {}
        self.seeds: list[SimNode] = []
        self.peers: list[SimNode] = []
        self.finished = 0
        self.back_to_source = 0
        self.reschedules = 0
        self.timeouts = 0
        self.origin_bytes = 0
        self.p2p_bytes = 0
        self.wasted = 0.0
        self.errors: list[str] = []  # Error answers from the scheduler
        self.failures: list[str] = []  # downloads that ended without the file
        self.last_progress = 0.0
        self.gave_up = ""  # why the run stopped before every peer finished
        for i in range(cfg.seed_peers):
            node = SimNode(self, f"seed-{i:03d}", seed=True)
            self.nodes[node.host_id] = node
            self.seeds.append(node)
        width = max(4, len(str(cfg.peers - 1)))
        for i in range(cfg.peers):
            node = SimNode(self, f"peer-{i:0{width}d}", seed=False)
            self.nodes[node.host_id] = node
            self.peers.append(node)

    def piece_len(self, number: int) -> int:
        return self.cfg.piece_size if number < self.k - 1 else self._last_len

    # -- message plumbing ------------------------------------------------------------

    def to_scheduler(self, host_id: str, msg: Message) -> None:
        self.loop.after(self.cfg.latency, self._scheduler_handle, (host_id, msg))

    def _scheduler_handle(self, arg: tuple[str, Message]) -> None:
        host_id, msg = arg
        self._dispatch(self.scheduler.handle(host_id, msg, self.loop.now))

    def _dispatch(self, sends: list[Send]) -> None:
        after, latency, deliver = self.loop.after, self.cfg.latency, self._deliver
        for s in sends:
            after(latency, deliver, s)

    def _deliver(self, send: Send) -> None:
        self.nodes[send.host_id].receive(send.message)

    def _tick(self, _: object) -> None:
        now = self.loop.now
        self._dispatch(self.scheduler.tick(now))
        if self.cfg.check_invariants:
            self.scheduler.check_invariants()
        if now - self.last_progress > self.cfg.stall_limit:
            self.gave_up = (
                f"no piece landed anywhere for {self.cfg.stall_limit:g} s "
                f"(since t={self.last_progress:.1f} s): the swarm is stuck"
            )
        elif self.finished + len(self.failures) < len(self.peers):
            self.loop.after(self.cfg.settings.retry_interval, self._tick)

    # -- running ---------------------------------------------------------------------

    def run(self) -> SimResult:
        cfg = self.cfg
        wall = time.perf_counter()
        loop = self.loop
        for node in self.seeds:
            self.scheduler.host_connected(node.info, 0.0)
        t = 0.0
        for node in self.peers:
            loop.at(t, node.arrive)
            if cfg.arrival == "poisson":
                t += self.rng.expovariate(cfg.arrival_rate)
        loop.at(0.0, self._tick)
        t_min = cfg.bound()
        limit = cfg.max_time if cfg.max_time is not None else t + 20 * t_min + 600.0
        n = len(self.peers)
        failures = self.failures
        loop.run(limit, lambda: self.finished + len(failures) >= n or bool(self.gave_up))
        if failures and not self.gave_up:
            self.gave_up = f"{len(failures)} peers failed, the first: {failures[0]}"
        if self.finished < n and not self.gave_up:
            self.gave_up = f"gave up at t={loop.now:.1f} s (max time {limit:g} s)"
        return self._result(t_min, time.perf_counter() - wall)

    def _result(self, t_min: float, wall: float) -> SimResult:
        cfg = self.cfg
        done = [p for p in self.peers if p.done]
        t_all = max(p.finished_at for p in done) if len(done) == len(self.peers) else INF
        triggered = [s for s in self.seeds if s.registered]
        complete = all(p.count == self.k for p in self.peers) and all(
            s.count == self.k for s in triggered
        )
        return SimResult(
            config=cfg,
            piece_count=self.k,
            t_min=t_min,
            t_all=t_all,
            efficiency=t_min / t_all if t_all > 0 else 1.0,
            piece_factor=piece_factor(cfg.peers, self.k),
            finished=len(done),
            complete=complete,
            origin_bytes=self.origin_bytes,
            seed_origin_bytes=sum(s.origin_bytes for s in self.seeds),
            p2p_bytes=self.p2p_bytes,
            wasted_bytes=round(self.wasted),
            back_to_source_peers=self.back_to_source,
            reschedules=self.reschedules,
            timeouts=self.timeouts,
            errors=len(self.errors),
            failed=sum(1 for p in self.peers if p.failed),
            gave_up=self.gave_up,
            durations=tuple(sorted(p.finished_at - p.arrived for p in done)),
            sim_time=self.loop.now,
            events=self.loop.events,
            counters=self.scheduler.counters.as_dict(),
            wall_time=wall,
        )


def run_simulation(cfg: SimConfig) -> SimResult:
    """Build the swarm for ``cfg`` and run it to the end (or to ``max_time``)."""
    return Swarm(cfg).run()
