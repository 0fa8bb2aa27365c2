"""One simulated scenario (SimConfig) and what a run of it measured (SimResult)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from dragonfly.config import PeerConfig
from dragonfly.engine.actions import MachineConfig
from dragonfly.identity import IdentityError, check_piece_length, piece_length_for
from dragonfly.identity import piece_count as count_pieces
from dragonfly.sched.scheduler import SchedulerSettings
from dragonfly.sim.bound import fluid_bound

__all__ = ["PERCENTILES", "URL", "SimConfig", "SimResult"]

URL = "http://origin.sim/file.bin"
PERCENTILES = (0, 10, 25, 50, 75, 90, 99, 100)


# The model's knobs default to what a peer ships with.
_SHIPPED = PeerConfig()
_MACHINE = MachineConfig()


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
    # Peers that do not stay to the end, each at a random moment within its first
    # T_min: ``departures`` leave (LeaveHost; their children see the announcements end),
    # ``crashes`` die silently (their uploads stop; children find out by their requests'
    # timeouts, the scheduler after ``detect_after``, a keepalive timeout).
    departures: float = 0.0
    crashes: float = 0.0
    detect_after: float = 10.0
    seed: int = 0
    latency: float = 0.001  # one-way peer <-> scheduler message latency
    concurrent_pieces: int = 8  # [download] concurrent_piece_count
    per_parent_limit: int = 2  # the engine's PiecePicker default: requests per parent
    origin_concurrency: int = _SHIPPED.download.origin_concurrency
    upload_slots: int = _SHIPPED.upload.concurrent_limit
    upload_queue: int = _SHIPPED.upload.queue_limit  # requests that wait for a slot
    upload_children: int = _SHIPPED.upload.children_limit  # the host's HostInfo.upload_limit
    stagger: bool = True  # a peer fetching from the origin staggers its announcements
    reveal_after: float = _MACHINE.reveal_after  # ... and tells the others this much later
    give_up_after: float = (
        _MACHINE.give_up_after  # ... or passes it on when its first child never fetched it
    )
    piece_timeout: float = _SHIPPED.download.piece_timeout  # queueing at the parent included
    report_interval: float = _MACHINE.report_interval  # PiecesFinished batching
    reschedule_interval: float = _MACHINE.reschedule_interval  # at most one Reschedule per this
    linger_limit: float = _MACHINE.linger_limit  # a finished origin-fed peer keeps its schedule
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
        if not (0 <= self.departures <= 1 and 0 <= self.crashes <= 1):
            raise ValueError("departures and crashes are fractions of the peers, in [0, 1]")
        if self.departures + self.crashes > 1:
            raise ValueError("departures and crashes add up to more than every peer")
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
    departed: int  # peers that left or died before finishing (not counted in T_all)
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
            "departed": self.departed,
            "gave_up": self.gave_up,
            "percentiles": {str(k): v for k, v in self.percentiles().items()},
            "sim_time": self.sim_time,
            "events": self.events,
            "scheduler": self.counters,
        }
        if wall_time:
            out["wall_time"] = self.wall_time
        return out
