"""Peer ↔ scheduler messages (one websocket per host and scheduler, routed by
(task_id, peer_id)), and the peer ↔ peer metadata messages of a parent's announcement
websocket."""

from dataclasses import dataclass, field

from dragonfly.wire.codec import (
    Message,
    compact,
    limits,
    message,
)
from dragonfly.wire.records import (
    HELD_PIECES_MAX,
    ID_MAX,
    OFFSET_MAX,
    PIECE_LENGTH_MAX,
    PIECE_NUMBER_MAX,
    REGISTER_HELD_MAX,
    TICKET_MAX,
    URL_MAX,
    ParentInfo,
    PieceDigest,
    PieceInfo,
    PieceReport,
    TaskSpec,
    _id,
    _number,
    _opt_id,
    _reason,
)

# ---------------------------------------------------------------------------
# Peer -> scheduler
# ---------------------------------------------------------------------------


@message("register_peer")
@dataclass(frozen=True, slots=True)
class RegisterPeer(Message):
    """Peer → scheduler: this peer starts downloading a task; answered by CandidateParents,
    NeedBackToSource or TaskFailed. ``task_id`` must be the ID ``task`` makes."""

    peer_id: str = _id()
    task_id: str = _id()
    task: TaskSpec  # type: ignore[misc]  # (_id() sets no default: mypy cannot see it)
    # Request headers the origin must see (credentials where a rule shares them).
    headers: dict[str, str] = field(
        default_factory=dict, metadata=dict(max_items=256, max_len=URL_MAX)
    )
    content_length: int | None = limits(default=None, min=0, max=OFFSET_MAX)
    need_back_to_source: bool = False
    # The request carried credentials (Authorization, Cookie, a signature left out of
    # the ID, a configured credential header): the task is private from now on.
    private: bool = False
    # A download registering again (its scheduler restarted, or it failed over to the
    # next of the ring): its layout and the pieces it holds, which it may serve.
    piece_length: int | None = limits(default=None, min=1, max=PIECE_LENGTH_MAX)
    # (at most REGISTER_HELD_MAX, which fit one frame; a download of more pieces says
    # the first ones: the others are found again as it goes on)
    held: list[PieceDigest] = field(
        default_factory=list, metadata=dict(max_items=REGISTER_HELD_MAX)
    )


@compact
@dataclass(frozen=True, slots=True)
class HeldTask:
    """A complete task a host holds, in HeldTasks: its layout, every piece's digest (raw
    sha256s, in piece order), the origin's metadata and the attestation a scheduler gave
    for all of these (dragonfly/trust.py Attester). ``task`` is its spec when the host
    still has it whole (a URL kept at rest loses its signature: then the attestation
    alone ties the ID to the bytes)."""

    task_id: str = _id()
    task: TaskSpec | None  # type: ignore[misc]  # (_id() sets no default: mypy cannot see it)
    content_length: int = limits(min=0, max=OFFSET_MAX)
    piece_length: int = limits(min=1, max=PIECE_LENGTH_MAX)
    # (a task of more pieces than fit in one frame is not re-announced: 1.5 TiB at the
    # largest piece length; it is found again when asked for)
    digests: bytes = limits(max_len=32 * HELD_PIECES_MAX)
    private: bool = False
    etag: str = limits(default="", max_len=1024)
    last_modified: str = limits(default="", max_len=256)
    attestation: bytes = limits(default=b"", max_len=256)


@message("held_tasks")
@dataclass(frozen=True, slots=True)
class HeldTasks(Message):
    """Peer/seed peer → scheduler, on connecting: complete tasks this host holds (of those
    the scheduler owns on the ring), in batches, so a scheduler that restarted or took
    over a task knows who can serve it without asking the origin again."""

    tasks: list[HeldTask] = field(default_factory=list, metadata=dict(max_items=1024))


@message("tasks_removed")
@dataclass(frozen=True, slots=True)
class TasksRemoved(Message):
    """Peer/seed peer → scheduler: this host no longer holds these tasks (evicted by GC,
    deleted): the scheduler stops offering it as their parent. Only the sender's own
    peers are dropped."""

    task_ids: list[str] = field(default_factory=list, metadata=dict(max_items=1024, max_len=ID_MAX))


@message("task_attested")
@dataclass(frozen=True, slots=True)
class TaskAttested(Message):
    """Scheduler → peer that finished a task: the attestation of the task's layout, its
    digests as the scheduler knows them, and the origin's metadata; kept with the task
    and shown, with these values, when re-announcing it."""

    task_id: str = _id()
    content_length: int = limits(min=0, max=OFFSET_MAX)
    piece_length: int = limits(min=1, max=PIECE_LENGTH_MAX)
    attestation: bytes = limits(max_len=256)
    private: bool = False
    etag: str = limits(default="", max_len=1024)
    last_modified: str = limits(default="", max_len=256)


@message("task_metadata")
@dataclass(frozen=True, slots=True)
class TaskMetadata(Message):
    """Peer/seed peer → scheduler: sent by whoever fetched from the origin, as soon as the
    origin's response headers are known."""

    peer_id: str = _id()
    task_id: str = _id()
    content_length: int = limits(min=-1, max=OFFSET_MAX)  # -1 = unknown
    piece_length: int = limits(min=1, max=PIECE_LENGTH_MAX)
    piece_count: int = limits(min=-1, max=PIECE_NUMBER_MAX + 1)  # -1 = unknown
    etag: str = limits(default="", max_len=1024)
    last_modified: str = limits(default="", max_len=256)
    content_type: str = limits(default="", max_len=256)


@message("pieces_finished")
@dataclass(frozen=True, slots=True)
class PiecesFinished(Message):
    """Peer → scheduler: pieces verified and stored since the last report (batched)."""

    peer_id: str = _id()
    task_id: str = _id()
    pieces: list[PieceReport] = field(default_factory=list)


@message("piece_failed")
@dataclass(frozen=True, slots=True)
class PieceFailed(Message):
    """Peer → scheduler: fetching a piece from a parent failed (timeout, bad digest...)."""

    peer_id: str = _id()
    task_id: str = _id()
    number: int = _number()
    parent_id: str = limits(max_len=ID_MAX)  # "" = the origin
    reason: str = _reason()


@message("peer_finished")
@dataclass(frozen=True, slots=True)
class PeerFinished(Message):
    """Peer → scheduler: every piece is verified; this peer now holds the whole task."""

    peer_id: str = _id()
    task_id: str = _id()
    content_length: int = limits(min=0, max=OFFSET_MAX)
    piece_count: int = limits(min=0, max=PIECE_NUMBER_MAX + 1)


@message("peer_failed")
@dataclass(frozen=True, slots=True)
class PeerFailed(Message):
    """Peer → scheduler: this peer gave up on the task. ``http_status`` is the origin's
    status when the origin refused the download (404, 500...), else 0."""

    peer_id: str = _id()
    task_id: str = _id()
    reason: str = _reason()
    http_status: int = limits(default=0, min=0, max=999)


@message("reschedule")
@dataclass(frozen=True, slots=True)
class Reschedule(Message):
    """Peer → scheduler: the current parents do not serve; ask for others, never these."""

    peer_id: str = _id()
    task_id: str = _id()
    blocked_parents: list[str] = field(
        default_factory=list, metadata=dict(max_items=1024, max_len=ID_MAX)
    )
    reason: str = _reason()


@message("leave_peer")
@dataclass(frozen=True, slots=True)
class LeavePeer(Message):
    """Peer → scheduler: this peer is gone for the task (download over, or task evicted)."""

    peer_id: str = _id()
    task_id: str = _id()


@message("leave_host")
@dataclass(frozen=True, slots=True)
class LeaveHost(Message):
    """Peer → scheduler: the host shuts down; drop all its peers."""

    host_id: str = _id()


# ---------------------------------------------------------------------------
# Scheduler -> peer
# ---------------------------------------------------------------------------


@message("candidate_parents")
@dataclass(frozen=True, slots=True)
class CandidateParents(Message):
    """Scheduler → peer: parents to download from, what is known of the task, and the
    origin-side digests known so far (a child checks every piece against these).

    ``tickets[i]`` lets this peer's host fetch the task from ``parents[i]`` until
    ``ticket_expires_at`` (unix seconds); empty when the cluster runs without identity.
    ``private``: a client's bytes come only after the origin said yes to its credentials."""

    peer_id: str = _id()
    task_id: str = _id()
    parents: list[ParentInfo] = field(default_factory=list, metadata=dict(max_items=256))
    content_length: int = limits(default=-1, min=-1, max=OFFSET_MAX)  # -1 = unknown
    piece_length: int | None = limits(default=None, min=1, max=PIECE_LENGTH_MAX)
    piece_count: int = limits(default=-1, min=-1, max=PIECE_NUMBER_MAX + 1)  # -1 = unknown
    digests: list[PieceDigest] = field(default_factory=list)
    # What the origin said when the task started: passed to clients, and sent as
    # If-Range by a peer that later goes back to source (never mix two versions).
    etag: str = limits(default="", max_len=1024)
    last_modified: str = limits(default="", max_len=256)
    content_type: str = limits(default="", max_len=256)
    tickets: list[bytes] = field(
        default_factory=list, metadata=dict(max_items=256, max_len=TICKET_MAX)
    )
    ticket_expires_at: int = limits(default=0, min=0, max=2**40)
    private: bool = False


@message("piece_digests")
@dataclass(frozen=True, slots=True)
class PieceDigests(Message):
    """Scheduler → peer: origin-side digests newly reported since CandidateParents."""

    peer_id: str = _id()
    task_id: str = _id()
    digests: list[PieceDigest] = field(default_factory=list)


@message("need_back_to_source")
@dataclass(frozen=True, slots=True)
class NeedBackToSource(Message):
    """Scheduler → peer: no parent can serve; fetch from the origin yourself. When the
    task already started elsewhere, its layout, digests and validators come along so
    the peer fetches the same version with the same pieces."""

    peer_id: str = _id()
    task_id: str = _id()
    reason: str = _reason()
    content_length: int = limits(default=-1, min=-1, max=OFFSET_MAX)
    piece_length: int | None = limits(default=None, min=1, max=PIECE_LENGTH_MAX)
    digests: list[PieceDigest] = field(default_factory=list)
    etag: str = limits(default="", max_len=1024)
    last_modified: str = limits(default="", max_len=256)
    private: bool = False


@message("trigger_download")
@dataclass(frozen=True, slots=True)
class TriggerDownload(Message):
    """Scheduler → seed peer: first sight of a task; fetch it from the origin (the seed
    peer then registers as a peer of the task like any other)."""

    task_id: str = _id()
    task: TaskSpec  # type: ignore[misc]  # (_id() sets no default: mypy cannot see it)
    headers: dict[str, str] = field(
        default_factory=dict, metadata=dict(max_items=256, max_len=URL_MAX)
    )


@message("task_failed")
@dataclass(frozen=True, slots=True)
class TaskFailed(Message):
    """Scheduler → peer: the task cannot be downloaded at all (origin failed for the seed
    peer, ...).  ``peer_id`` "" means every peer of the task on this host."""

    task_id: str = _id()
    reason: str = _reason()
    peer_id: str = _opt_id()
    http_status: int = limits(default=0, min=0, max=999)  # the origin's, when it refused


# ---------------------------------------------------------------------------
# Peer <-> peer metadata websocket
# ---------------------------------------------------------------------------


@message("subscribe")
@dataclass(frozen=True, slots=True)
class Subscribe(Message):
    """Child → parent: send me the pieces you hold of this task, then new ones as they land.
    ``peer_id`` is the child; ``parent_id`` the parent peer it expects ("" = any).
    ``ticket`` is what the scheduler gave the child's host (``host_id``) for this parent,
    valid until ``expires_at``; a parent in a cluster with identity checks it."""

    task_id: str = _id()
    peer_id: str = _id()
    parent_id: str = _opt_id()
    host_id: str = _opt_id()
    ticket: bytes = limits(default=b"", max_len=TICKET_MAX)
    expires_at: int = limits(default=0, min=0, max=2**40)


@message("piece_announce")
@dataclass(frozen=True, slots=True)
class PieceAnnounce(Message):
    """Parent → child: pieces the parent holds (the backlog first, then each new one)."""

    task_id: str = _id()
    pieces: list[PieceInfo] = field(default_factory=list)


@message("announce_done")
@dataclass(frozen=True, slots=True)
class AnnounceDone(Message):
    """Parent → child: the parent holds every piece; nothing more will be announced."""

    task_id: str = _id()
    piece_count: int = limits(min=0, max=PIECE_NUMBER_MAX + 1)
    content_length: int = limits(min=0, max=OFFSET_MAX)
