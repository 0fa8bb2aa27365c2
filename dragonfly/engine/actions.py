"""What the download machine (dragonfly/engine/machine.py) tells its driver to do, and
its knobs. Plain records: the trio driver performs them with sockets and a disk, the
simulation in its model of the network."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from dragonfly.engine.announce import GIVE_UP_AFTER, REVEAL_AFTER
from dragonfly.wire.codec import Message
from dragonfly.wire.messages import ParentInfo

__all__ = [
    "Action",
    "Announce",
    "Cancel",
    "Complete",
    "Failed",
    "Fetch",
    "FetchOrigin",
    "Finished",
    "MachineConfig",
    "OpenTask",
    "ProbeOrigin",
    "RangesDone",
    "Send",
    "Stalled",
    "StreamOrigin",
    "Subscribe",
    "Unsubscribe",
]


@dataclass(slots=True)
class Send:
    """Send a message to the scheduler (dropped when no session is open)."""

    message: Message


@dataclass(slots=True)
class OpenTask:
    """Open (or create) the task in the store with this layout; answer ``task_opened``."""

    content_length: int
    piece_length: int
    etag: str
    last_modified: str
    content_type: str


@dataclass(slots=True)
class Subscribe:
    """Follow this parent's piece announcements (``parent_announced``/``parent_gone``)."""

    parent: ParentInfo
    ticket: Any = None  # what the scheduler gave for fetching from it, passed on as is


@dataclass(slots=True)
class Unsubscribe:
    parent_id: str


@dataclass(slots=True)
class Fetch:
    """Request piece ``number`` from a parent; answer with ``piece_landed``,
    ``piece_in_hand`` (a duplicate received aside), ``piece_failed`` or ``piece_busy``,
    quoting ``fetch_id``."""

    fetch_id: int
    number: int
    parent_id: str
    in_place: bool  # False: an endgame duplicate, received into memory first


@dataclass(slots=True)
class Cancel:
    """Stop a request; no answer is expected (a late one is ignored)."""

    fetch_id: int
    number: int
    parent_id: str


@dataclass(slots=True)
class ProbeOrigin:
    """Ask the origin for the length, range support and validators; answer
    ``origin_probed`` or ``origin_failed``. Validators given here are the version the task
    started with: a different one is the origin's change (the caller fails with 409)."""

    expect_etag: str
    expect_last_modified: str


@dataclass(slots=True)
class FetchOrigin:
    """Fetch piece ``number`` from the origin by Range requests, ``parts`` at once for
    slices of it (the shell may use fewer for a short piece); answer
    ``origin_piece_landed`` or ``origin_failed``."""

    number: int
    parts: int = 1


@dataclass(slots=True)
class StreamOrigin:
    """Read the origin's one body, cutting it into pieces in order; answer
    ``origin_piece_landed`` for each (pieces already held are compared, not written)."""


@dataclass(slots=True)
class Announce:
    """Tell a child of these pieces (the caller's child token)."""

    child: Hashable
    numbers: list[int]


@dataclass(slots=True)
class Complete:
    """Every piece is held: check the whole file (its digest, where known) and mark the
    task complete; answer ``completed`` or ``complete_failed``."""


@dataclass(slots=True)
class Finished:
    """The task is complete on this peer."""


@dataclass(slots=True)
class RangesDone:
    """A range-only download has its ranges; the task stays partial (resumable)."""


@dataclass(slots=True)
class Stalled:
    """No piece, digest or announcement for ``seconds``: the machine takes its next step
    ("reschedule", "back_to_source" or "fail"). The driver logs it once and counts it."""

    step: str
    seconds: float


@dataclass(slots=True)
class Failed:
    reason: str
    http_status: int = 0  # the origin's, when it refused


Action = (
    Send
    | OpenTask
    | Subscribe
    | Unsubscribe
    | Fetch
    | Cancel
    | ProbeOrigin
    | FetchOrigin
    | StreamOrigin
    | Announce
    | Complete
    | Finished
    | RangesDone
    | Stalled
    | Failed
)


@dataclass(frozen=True, slots=True)
class MachineConfig:
    """The knobs of one download (config: [download]; the simulation sets its own)."""

    concurrent_pieces: int = 8
    per_parent_limit: int = 2
    piece_timeout: float = 30.0
    origin_concurrency: int = 4
    reschedule_interval: float = 1.0  # at most one Reschedule per this
    report_interval: float = 0.05  # PiecesFinished gathers pieces this long
    report_batch: int = 1000
    back_to_source: bool = True
    reveal_after: float = REVEAL_AFTER
    give_up_after: float = GIVE_UP_AFTER
    # Longest a finished download keeps its announcement schedule for its children.
    linger_limit: float = 120.0
    stagger: bool = True  # a peer fetching from the origin staggers its announcements
    # No piece, digest or announcement for this long: ask for other parents; as long again:
    # the origin (where allowed), else fail. Nothing waits without bound.
    stall_timeout: float = 90.0
