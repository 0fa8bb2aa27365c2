"""The download machine's state (dragonfly/engine/machine.py): its phase, the parents it
follows, its counters, the task's layout, and ``MachineState``, the state every part of
the machine works on, declared once for the mixins (lifecycle.py, stalls.py, source.py)
that ``DownloadMachine`` inherits. Plain data, sans-I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dragonfly.engine.actions import Action, Failed, MachineConfig
from dragonfly.engine.announce import AnnounceSchedule
from dragonfly.engine.picker import PiecePicker
from dragonfly.engine.requests import Request, RequestTable
from dragonfly.identity import PieceLayout
from dragonfly.wire.messages import NeedBackToSource, ParentInfo, PieceDigest, PieceReport, TaskSpec

if TYPE_CHECKING:
    from dragonfly.engine.source import OriginPace  # (source.py imports this module)

INF = float("inf")


class Phase(enum.Enum):
    STARTING = "starting"  # registering, waiting for parents or a layout
    P2P = "p2p"  # fetching from parents
    SOURCE = "source"  # fetching from the origin
    COMPLETING = "completing"  # every wanted piece held; the caller checks the whole
    FINISHED = "finished"
    FAILED = "failed"


@dataclass(slots=True)
class _Parent:
    info: ParentInfo
    ticket: Any = None


@dataclass(slots=True)
class _Counters:
    bytes_p2p: int = 0
    bytes_source: int = 0
    reschedules: int = 0
    timeouts: int = 0
    failures: int = 0
    busy: int = 0
    wasted_requests: int = 0  # requests cancelled for another copy of the same piece
    stalls: int = 0  # stall steps taken (rule 6)


@dataclass(slots=True)
class _Layout:
    content_length: int = -1
    piece_length: int = 0
    piece_count: int = -1
    etag: str = ""
    last_modified: str = ""
    content_type: str = ""
    geometry: PieceLayout | None = field(default=None)


class MachineState:
    """What ``DownloadMachine.__init__`` sets up, declared for the mixins that work on it;
    and (for the type checker only) the transitions they call across modules."""

    task_id: str
    peer_id: str
    host_id: str
    private: bool
    wall_offset: float
    spec: TaskSpec
    headers: dict[str, str]
    cfg: MachineConfig
    may_go_to_source: bool
    seed_trigger: bool
    phase: Phase
    layout: _Layout
    digests: dict[int, bytes]
    have: set[int]
    picker: PiecePicker | None
    opened: bool
    parents: dict[str, _Parent]
    blocked: dict[str, None]
    requests: RequestTable
    _reports: list[PieceReport]
    _report_due: float
    _last_reschedule: float
    _reschedule_due: float
    announce: AnnounceSchedule[Hashable]
    children: set[Hashable]
    _source_msg: NeedBackToSource | None
    _probing: bool
    _probed: bool
    _source_started: bool
    _streaming: bool
    _origin_pace: OriginPace
    _claim_from: int
    _ranges: list[tuple[int, int]] | None
    _wanted: set[int] | None
    clients: int
    _cursor: int | None
    _ranges_done: bool
    error: Failed | None
    ended_at: float | None
    counters: _Counters
    _progress_at: float | None
    _stall_steps: int

    if TYPE_CHECKING:

        @property
        def done(self) -> bool: ...
        @property
        def all_held(self) -> bool: ...
        @property
        def _wanted_held(self) -> bool: ...
        @property
        def target_reached(self) -> bool: ...
        def _add_digests(self, digests: Iterable[PieceDigest], now: float) -> None: ...
        def _set_layout(
            self,
            content_length: int,
            piece_length: int,
            etag: str,
            last_modified: str,
            content_type: str,
            now: float,
        ) -> list[Action]: ...
        def _drop_parent(self, parent_id: str, now: float) -> list[Action]: ...
        def _failed(
            self, request: Request, reason: str, now: float, *, bad_bytes: bool = False
        ) -> list[Action]: ...
        def _forget_all(self) -> list[Action]: ...
        def _tell(self, announcements: list[tuple[Hashable, list[int]]]) -> list[Action]: ...
        # lifecycle.py
        def _landed(
            self, number: int, parent_id: str, seconds: float, nbytes: int, now: float
        ) -> list[Action]: ...
        def _reach_target(self, now: float) -> list[Action]: ...
        def _fail(
            self, reason: str, http_status: int, now: float, *, report: bool = True
        ) -> list[Action]: ...
        def _end(self, now: float) -> list[Action]: ...
        # stalls.py
        def _progress(self, now: float) -> None: ...
        def _pump(self, now: float) -> list[Action]: ...
        def _flush_reports(self) -> list[Action]: ...
        # source.py
        def _go_to_source(self, msg: NeedBackToSource | None, now: float) -> list[Action]: ...
        def _source_metadata(self) -> list[Action]: ...
