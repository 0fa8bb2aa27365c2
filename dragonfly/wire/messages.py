"""The wire messages: one frozen dataclass per message type, registered with the codec.

Why about 900 lines: one frozen dataclass per message of every family, with its limits;
the protocol's reference, kept in one file so that a version's change is read in one place.

Peer ↔ scheduler messages travel over one websocket per (host, scheduler) and are
routed by (task_id, peer_id); peer ↔ peer metadata messages travel over the
parent's announcement websocket.  Every websocket starts with a ``Hello`` in both
directions (``check_version`` negotiates).  Limits below are what a receiver
accepts; senders must split longer piece lists over several messages.

Adding a field later: give it a default (and put it last in a ``@compact`` record)
so older peers, which ignore unknown keys, keep working.

Protocol note (manager): schedulers and seed peers talk to the manager over its own
websocket (``/v1/manager``) with ``AnnounceMember`` → ``MemberRegistered``, then a
``Ping`` every keepalive interval (answered by ``Pong``); anyone may ask for
schedulers with ``ListSchedulers`` → ``SchedulerList``. These types travel on that
websocket only, so peers and schedulers of protocol 2 that never connect to a
manager are unaffected (no version change). A member proves its credential after the
Hellos as on the scheduler websocket (``Proof`` both ways); a scheduler then gets its
cluster's settings (``ConfigUpdate``) and the revoked hosts (``Revocations``) whenever
they change, and reports its hosts (``HostsReport``) periodically or on ``SyncHosts``.
manager are unaffected (no version change).

Protocol note (jobs, 4): the manager sends a scheduler ``RunJob`` (preheat, get_task,
delete_task, list_hosts) and gets ``JobResult`` back; the scheduler asks its hosts with
``DownloadTask``, ``StatTask`` and ``DeleteTask``, each answered by a ``TaskAnswer``.
Hosts send ``DownloadRecords`` (one per finished download) to their scheduler, which
forwards them to the manager with the host it proved. Hosts and schedulers send these
only on a channel whose agreed version is 4 or more.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from dragonfly.identity import (
    MAX_EXPLICIT_PIECE_LENGTH,
    MIN_EXPLICIT_PIECE_LENGTH,
    spec_task_id,
)
from dragonfly.wire.codec import (
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    Message,
    ProtocolError,
    compact,
    limits,
    message,
    reused,
)

__all__ = [
    "HELD_PIECES_MAX",
    "REGISTER_HELD_MAX",
    "ROLES",
    "AnnounceDone",
    "AnnounceMember",
    "BlockRules",
    "CandidateParents",
    "Claims",
    "ClusterConfig",
    "ConfigUpdate",
    "DeleteTask",
    "DownloadRecord",
    "DownloadRecords",
    "DownloadTask",
    "Error",
    "ErrorCode",
    "HeldTask",
    "HeldTasks",
    "Hello",
    "HostEntry",
    "HostInfo",
    "HostsReport",
    "JobHostResult",
    "JobResult",
    "JobTask",
    "LeaveHost",
    "LeavePeer",
    "ListSchedulers",
    "MemberRegistered",
    "NeedBackToSource",
    "ParentInfo",
    "PeerFailed",
    "PeerFinished",
    "PieceAnnounce",
    "PieceDigest",
    "PieceDigests",
    "PieceFailed",
    "PieceInfo",
    "PieceReport",
    "PiecesFinished",
    "Ping",
    "Pong",
    "Proof",
    "RegisterPeer",
    "Reschedule",
    "Revocations",
    "RevokedHost",
    "RunJob",
    "SchedulerEntry",
    "SchedulerList",
    "StatTask",
    "Subscribe",
    "SyncHosts",
    "TaskAnswer",
    "TaskAttested",
    "TaskFailed",
    "TaskMetadata",
    "TaskSpec",
    "TasksRemoved",
    "TriggerDownload",
    "check_version",
]

ROLES = ("peer", "seed-peer", "scheduler", "manager")
T = TypeVar("T")

ID_MAX = 128
URL_MAX = 8192
DIGEST_MAX = 128  # "sha256:" + 64 hex, with room for longer algorithms
REASON_MAX = 1024
PIECE_NUMBER_MAX = 2**31 - 1
HELD_PIECES_MAX = 24_576  # pieces of a task HeldTask can carry (768 KiB of digests)
REGISTER_HELD_MAX = 16_384  # pieces RegisterPeer.held names (about 650 KiB)
OFFSET_MAX = 2**50
PIECE_LENGTH_MAX = 2**40
DIGEST_LEN = 32  # raw sha256
NONCE_MAX = 64  # bytes of a Hello's nonce
PROOF_LEN = 32  # an HMAC-SHA256
TICKET_MAX = 32  # bytes of a ticket (a truncated HMAC-SHA256)


class ErrorCode:
    """Values of ``Error.code``."""

    PROTOCOL = "protocol"  # undecodable or invalid message
    FORBIDDEN = "forbidden"  # no proof of identity, or no ticket, for what was asked
    LIMIT = "limit"  # over a bound (tasks or registrations of one host)
    VERSION = "version"  # no common protocol version
    NOT_FOUND = "not_found"  # unknown task / peer / host
    INTERNAL = "internal"  # the receiver failed handling a valid message


# Field shorthands (each call makes a fresh dataclasses.field).
def _id() -> str:
    return limits(min_len=1, max_len=ID_MAX)  # type: ignore[no-any-return]


def _opt_id() -> str:
    """An id where "" has a meaning (the origin, "any", ...)."""
    return limits(default="", max_len=ID_MAX)  # type: ignore[no-any-return]


def _reason() -> str:
    return limits(default="", max_len=REASON_MAX)  # type: ignore[no-any-return]


def _number() -> int:
    return limits(min=0, max=PIECE_NUMBER_MAX)  # type: ignore[no-any-return]


def _digest() -> bytes:
    return limits(len=DIGEST_LEN)  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------
# Nested records
# ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HostInfo:
    """A host as announced in its Hello to the scheduler."""

    host_id: str = _id()
    hostname: str = limits(max_len=255)
    ip: str = limits(min_len=1, max_len=64)
    upload_port: int = limits(min=1, max=65535)
    proxy_port: int | None = limits(default=None, min=1, max=65535)
    idc: str = limits(default="", max_len=256)
    location: str = limits(default="", max_len=256)
    seed: bool = False
    upload_limit: int = limits(default=50, min=0, max=2**16)  # concurrent uploads, 0 = none
    upload_rate: int = limits(default=0, min=0, max=2**50)  # bytes/s, 0 = unlimited
    version: str = limits(default="", max_len=64)  # the daemon's software version (4)
    # The host held tasks or downloads before this connection (its scheduler restarted,
    # or it did): it re-announces them (HeldTasks, RegisterPeer.held) (5).
    rejoining: bool = False
    # Its upload port speaks TLS (https pieces, wss announcements); a scheduler older
    # than this field ignores it, so its children would not use TLS: upgrade it first.
    tls: bool = False


@dataclass(frozen=True, slots=True)
class Claims:
    """What a host credential says (dragonfly/trust.py): whose it is, for which role,
    until when, under which cluster key. Only the issuer, who holds the cluster secret,
    can make the host key that goes with these claims; a scheduler recomputes it."""

    cluster: str = limits(min_len=1, max_len=64)
    host_id: str = _id()
    role: str = limits(choices=("peer", "seed-peer", "scheduler"))
    issued_at: int = limits(min=0, max=2**40)  # unix seconds
    expires_at: int = limits(min=0, max=2**40)
    key_id: str = limits(min_len=1, max_len=32)


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """What a task is made of. Its ID is computed from these fields and nothing else, so
    whoever receives an ID with its spec recomputes it (`task_id`) and never takes the
    sender's word for it. Carried as is by RegisterPeer and TriggerDownload.

    ``digest`` ("sha256:HEX") names an OCI blob: the ID is the digest itself, so one
    layer from two registries is one task, and the URL is only where to fetch it.
    ``scope`` ties a task to one client's credentials (a hash of them): nobody else's
    request ever maps to that task.
    """

    url: str = limits(min_len=1, max_len=URL_MAX)
    tag: str = limits(default="", max_len=1024)
    application: str = limits(default="", max_len=1024)
    filtered_query_params: list[str] = field(
        default_factory=list, metadata=dict(max_items=256, max_len=256)
    )
    piece_length: int | None = limits(
        default=None, min=MIN_EXPLICIT_PIECE_LENGTH, max=MAX_EXPLICIT_PIECE_LENGTH
    )
    digest: str = limits(default="", max_len=DIGEST_MAX)
    scope: str = limits(default="", max_len=64)

    @property
    def task_id(self) -> str:
        """The ID these fields make (IdentityError if they cannot make one)."""
        return spec_task_id(
            self.url,
            tag=self.tag,
            application=self.application,
            filtered_query_params=self.filtered_query_params,
            piece_length=self.piece_length,
            digest=self.digest,
            scope=self.scope,
        )


@reused  # the scheduler keeps one per peer and sends it to each of the peer's children
@dataclass(frozen=True, slots=True)
class ParentInfo:
    """A candidate parent handed to a downloading peer: where to subscribe and fetch."""

    peer_id: str = _id()
    host_id: str = _id()
    ip: str = limits(min_len=1, max_len=64)
    upload_port: int = limits(min=1, max=65535)
    hostname: str = limits(default="", max_len=255)
    seed: bool = False
    idc: str = limits(default="", max_len=256)
    location: str = limits(default="", max_len=256)
    tls: bool = False  # its upload port speaks TLS: the child verifies its certificate


@compact
@dataclass(frozen=True, slots=True)
class PieceReport:
    """One finished piece in PiecesFinished; wire form [number, offset, length, digest,
    parent_id, cost_ms]."""

    number: int = _number()
    offset: int = limits(min=0, max=OFFSET_MAX)
    length: int = limits(min=0, max=PIECE_LENGTH_MAX)
    digest: bytes = _digest()
    parent_id: str = limits(max_len=ID_MAX)  # "" = fetched from the origin
    cost_ms: int = limits(default=0, min=0, max=2**32)


@compact
@reused  # a task's digests go out again in every CandidateParents of the task
@dataclass(frozen=True, slots=True)
class PieceDigest:
    """Origin-side digest of one piece; wire form [number, digest]."""

    number: int = _number()
    digest: bytes = _digest()


@compact
@dataclass(frozen=True, slots=True)
class PieceInfo:
    """A piece a parent holds; wire form [number, offset, length, digest]."""

    number: int = _number()
    offset: int = limits(min=0, max=OFFSET_MAX)
    length: int = limits(min=0, max=PIECE_LENGTH_MAX)
    digest: bytes = _digest()


# ---------------------------------------------------------------------------
# Handshake and either-direction messages
# ---------------------------------------------------------------------------


@message("hello")
@dataclass(frozen=True, slots=True)
class Hello(Message):
    """First message on every websocket, both directions: versions spoken, role, host.

    A peer's Hello to the scheduler carries its HostInfo and the claims of its credential
    (never its key); the scheduler's and a parent's carry none. ``nonce`` is fresh for
    each connection: the Proofs that follow are made over both sides' nonces.
    """

    version: int = limits(min=1, max=2**16)  # highest version spoken
    min_version: int = limits(min=1, max=2**16)  # lowest version spoken
    role: str = limits(choices=ROLES)
    host: HostInfo | None = None
    nonce: bytes = limits(default=b"", max_len=NONCE_MAX)
    claims: Claims | None = None


def check_version(
    hello: Hello, *, local_min: int = MIN_PROTOCOL_VERSION, local_max: int = PROTOCOL_VERSION
) -> int:
    """Return the version both sides speak (the lower maximum) or say why there is none."""
    if hello.min_version > hello.version:
        raise ProtocolError(
            f"peer sent an empty version range {hello.min_version}..{hello.version}",
            ref=Hello.TAG,
        )
    if hello.min_version > local_max or hello.version < local_min:
        raise ProtocolError(
            f"peer speaks protocol {hello.min_version}..{hello.version}, "
            f"this side {local_min}..{local_max}",
            ref=Hello.TAG,
        )
    return min(hello.version, local_max)


@message("proof")
@dataclass(frozen=True, slots=True)
class Proof(Message):
    """After the Hellos, on the scheduler websocket: the peer proves it holds the host key
    of its claims, then the scheduler proves it could compute that key (trust.py)."""

    proof: bytes = limits(len=PROOF_LEN)


@message("error")
@dataclass(frozen=True, slots=True)
class Error(Message):
    """Either direction: the receiver could not accept a message; the connection goes on
    (unless the code is "version"). ``ref`` is the offending message type, if known."""

    code: str = limits(min_len=1, max_len=64)
    message: str = limits(default="", max_len=REASON_MAX)
    ref: str = limits(default="", max_len=64)


@message("ping")
@dataclass(frozen=True, slots=True)
class Ping(Message):
    """Either direction: application keepalive; answered by a Pong with the same nonce."""

    nonce: int = limits(min=0, max=2**64 - 1)


@message("pong")
@dataclass(frozen=True, slots=True)
class Pong(Message):
    """Answer to Ping."""

    nonce: int = limits(min=0, max=2**64 - 1)


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


# ---------------------------------------------------------------------------
# Scheduler / seed peer <-> manager (the manager's websocket)
# ---------------------------------------------------------------------------

ROW_ID_MAX = 2**63 - 1


@message("announce_member")
@dataclass(frozen=True, slots=True)
class AnnounceMember(Message):
    """Scheduler or seed peer → manager, first after the Hello: who it is and which
    cluster it joins (the Hello's role says which kind of member). ``ip`` is what the
    member says of itself; the manager records the address it sees."""

    hostname: str = limits(min_len=1, max_len=255)
    ip: str = limits(min_len=1, max_len=64)
    port: int = limits(min=1, max=65535)
    cluster_id: int = limits(min=1, max=ROW_ID_MAX)
    idc: str = limits(default="", max_len=256)
    location: str = limits(default="", max_len=256)
    features: list[str] = field(default_factory=list, metadata=dict(max_items=16, max_len=64))
    download_port: int = limits(default=0, min=0, max=65535)  # a seed peer's upload port
    version: str = limits(default="", max_len=64)


@message("member_registered")
@dataclass(frozen=True, slots=True)
class MemberRegistered(Message):
    """Manager → member: its row, and how often to send a keepalive (``Ping``)."""

    member_id: int = limits(min=1, max=ROW_ID_MAX)
    keepalive_ms: int = limits(min=1, max=2**31)
    # A scheduler reports its hosts (HostsReport) this often; 0: only when asked.
    hosts_report_ms: int = limits(default=0, min=0, max=2**31)


@dataclass(frozen=True, slots=True)
class BlockRules:
    """Downloads a cluster refuses (Dragonfly's block_list.task.download): by the task's
    application, tag, URL (regular expressions, searched) or the request's priority."""

    applications: list[str] = field(
        default_factory=list, metadata=dict(max_items=1000, max_len=1024)
    )
    urls: list[str] = field(default_factory=list, metadata=dict(max_items=1000, max_len=1024))
    tags: list[str] = field(default_factory=list, metadata=dict(max_items=1000, max_len=1024))
    priorities: list[int] = field(default_factory=list, metadata=dict(max_items=7, min=0, max=6))


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """A scheduler cluster's settings for its schedulers, seed peers and peers (the
    manager's cluster config): parent limits, how many children a host serves at once,
    and the block lists of peers and of seed peers."""

    cluster_id: int = limits(min=1, max=ROW_ID_MAX)
    candidate_parent_limit: int = limits(min=1, max=64)
    filter_parent_limit: int = limits(min=1, max=10000)
    peer_load_limit: int = limits(min=1, max=2**16)
    seed_peer_load_limit: int = limits(min=1, max=2**20)
    peer_block: BlockRules = field(default_factory=BlockRules)
    seed_peer_block: BlockRules = field(default_factory=BlockRules)
    revision: str = limits(default="", max_len=64)  # changes whenever the settings do


@message("list_schedulers")
@dataclass(frozen=True, slots=True)
class ListSchedulers(Message):
    """Any host → manager: which schedulers should I use? ``cluster_id`` 0 lets the
    manager rank the clusters for this host (its IP is the one the manager sees)."""

    hostname: str = limits(default="", max_len=255)
    idc: str = limits(default="", max_len=256)
    location: str = limits(default="", max_len=256)
    cluster_id: int = limits(default=0, min=0, max=ROW_ID_MAX)


@dataclass(frozen=True, slots=True)
class SchedulerEntry:
    """An active scheduler in SchedulerList."""

    id: int = limits(min=1, max=ROW_ID_MAX)
    hostname: str = limits(max_len=255)
    ip: str = limits(min_len=1, max_len=64)
    port: int = limits(min=1, max=65535)
    idc: str = limits(default="", max_len=256)
    location: str = limits(default="", max_len=256)
    features: list[str] = field(default_factory=list, metadata=dict(max_items=16, max_len=64))


@message("scheduler_list")
@dataclass(frozen=True, slots=True)
class SchedulerList(Message):
    """Manager → host: the active schedulers of the best cluster (none: cluster_id 0)."""

    cluster_id: int = limits(min=0, max=ROW_ID_MAX)
    schedulers: list[SchedulerEntry] = field(default_factory=list, metadata=dict(max_items=1024))
    config: ClusterConfig | None = None  # that cluster's settings for its hosts


@message("config_update")
@dataclass(frozen=True, slots=True)
class ConfigUpdate(Message):
    """Manager → scheduler, after MemberRegistered and whenever its cluster's settings
    change: apply them (no restart)."""

    config: ClusterConfig


@dataclass(frozen=True, slots=True)
class RevokedHost:
    """Every credential of ``host_id`` issued at or before ``before`` (unix seconds) is
    revoked."""

    host_id: str = _id()
    before: int = limits(min=0, max=2**40)


@message("revocations")
@dataclass(frozen=True, slots=True)
class Revocations(Message):
    """Manager → scheduler, after MemberRegistered and whenever the list changes: the
    whole list of revoked hosts. A scheduler refuses their handshakes and drops their
    connections."""

    hosts: list[RevokedHost] = field(default_factory=list, metadata=dict(max_items=10000))


@message("sync_hosts")
@dataclass(frozen=True, slots=True)
class SyncHosts(Message):
    """Manager → scheduler: report your hosts now (HostsReport)."""


@message("hosts_report")
@dataclass(frozen=True, slots=True)
class HostsReport(Message):
    """Scheduler → manager: the hosts connected to it, in parts; ``last`` ends a report.
    What the manager's peers table shows."""

    hosts: list[HostInfo] = field(default_factory=list, metadata=dict(max_items=2000))
    last: bool = True


# ---------------------------------------------------------------------------
# Jobs (manager → scheduler → hosts) and download records (hosts → scheduler → manager)
# ---------------------------------------------------------------------------

JOB_KINDS = ("preheat", "get_task", "delete_task", "list_hosts")
JOB_SCOPES = ("single_seed_peer", "all_seed_peers", "all_peers")
JOB_VERSION = 4  # the protocol version that has them
CONTINUITY_VERSION = 5  # the one that has HeldTasks and TaskAttested
REMOVAL_VERSION = 6  # the one that has TasksRemoved
RESULTS_PER_MESSAGE = 2000
BATCH_BYTES = 256 * 1024  # a batch's estimated size, far below the 1 MiB frame


def batches(items: list[T], size: Callable[[T], int], max_items: int) -> list[list[T]]:
    """`items` in order, split so that no batch has more than `max_items` or (by the
    estimate `size`) more than BATCH_BYTES: a list of long URLs still fits its frames."""
    out: list[list[T]] = []
    current: list[T] = []
    used = 0
    for item in items:
        n = size(item)
        if current and (len(current) >= max_items or used + n > BATCH_BYTES):
            out.append(current)
            current, used = [], 0
        current.append(item)
        used += n
    if current:
        out.append(current)
    return out


@dataclass(frozen=True, slots=True)
class JobTask:
    """One task of a job. ``task`` is what it is made of (the receiver recomputes the ID
    from it); get_task and delete_task may name a bare ``task_id`` instead. ``headers``
    go to the origin (a registry's Authorization); ``private``: made with credentials."""

    task_id: str = _id()
    task: TaskSpec | None = None
    headers: dict[str, str] = field(
        default_factory=dict, metadata=dict(max_items=64, max_len=URL_MAX)
    )
    private: bool = False


@message("run_job")
@dataclass(frozen=True, slots=True)
class RunJob(Message):
    """Manager → scheduler: run one job part on this scheduler's hosts; answered by
    JobResult messages, the last one ``final``. Hosts are chosen by ``scope``, then
    ``ips`` over ``count`` over ``percentage`` (0: not given)."""

    job_id: int = limits(min=1, max=ROW_ID_MAX)
    kind: str = limits(choices=JOB_KINDS)
    tasks: list[JobTask] = field(default_factory=list, metadata=dict(max_items=1024))
    scope: str = limits(default="single_seed_peer", choices=JOB_SCOPES)
    ips: list[str] = field(default_factory=list, metadata=dict(max_items=100, max_len=64))
    count: int = limits(default=0, min=0, max=200)
    percentage: int = limits(default=0, min=0, max=100)
    concurrent_tasks: int = limits(default=8, min=1, max=100)
    concurrent_peers: int = limits(default=500, min=1, max=1000)
    timeout_ms: int = limits(default=3_600_000, min=1, max=2**31)


@dataclass(frozen=True, slots=True)
class JobHostResult:
    """What one host did with one task of a job (or, for get_task, that it holds it)."""

    task_id: str = _id()
    host_id: str = _id()
    url: str = limits(default="", max_len=URL_MAX)
    hostname: str = limits(default="", max_len=255)
    ip: str = limits(default="", max_len=64)
    seed: bool = False
    ok: bool = True
    reason: str = _reason()


@dataclass(frozen=True, slots=True)
class HostEntry:
    """A host connected to a scheduler (list_hosts)."""

    host_id: str = _id()
    hostname: str = limits(default="", max_len=255)
    ip: str = limits(default="", max_len=64)
    upload_port: int = limits(default=0, min=0, max=65535)
    proxy_port: int = limits(default=0, min=0, max=65535)
    idc: str = limits(default="", max_len=256)
    location: str = limits(default="", max_len=256)
    seed: bool = False
    version: str = limits(default="", max_len=64)


@message("job_result")
@dataclass(frozen=True, slots=True)
class JobResult(Message):
    """Scheduler → manager: a job part's results, in as many messages as they need;
    ``error`` (on the final one) says why the part failed as a whole."""

    job_id: int = limits(min=1, max=ROW_ID_MAX)
    results: list[JobHostResult] = field(
        default_factory=list, metadata=dict(max_items=RESULTS_PER_MESSAGE)
    )
    hosts: list[HostEntry] = field(
        default_factory=list, metadata=dict(max_items=RESULTS_PER_MESSAGE)
    )
    error: str = _reason()
    final: bool = True


@message("download_task")
@dataclass(frozen=True, slots=True)
class DownloadTask(Message):
    """Scheduler → host: download this task whole, as a client's request would (a
    preheat); answered by TaskAnswer. ``ref`` is the scheduler's, echoed back."""

    ref: int = limits(min=1, max=2**63 - 1)
    task_id: str = _id()
    task: TaskSpec  # type: ignore[misc]  # (_id() sets no default: mypy cannot see it)
    headers: dict[str, str] = field(
        default_factory=dict, metadata=dict(max_items=64, max_len=URL_MAX)
    )
    private: bool = False


@message("stat_task")
@dataclass(frozen=True, slots=True)
class StatTask(Message):
    """Scheduler → host: do you hold this task whole? Answered by TaskAnswer."""

    ref: int = limits(min=1, max=2**63 - 1)
    task_id: str = _id()


@message("delete_task")
@dataclass(frozen=True, slots=True)
class DeleteTask(Message):
    """Scheduler → host: remove this task from your disk; answered by TaskAnswer."""

    ref: int = limits(min=1, max=2**63 - 1)
    task_id: str = _id()


@message("task_answer")
@dataclass(frozen=True, slots=True)
class TaskAnswer(Message):
    """Host → scheduler: the outcome of DownloadTask (``ok``), StatTask (``held``) or
    DeleteTask (``held``: it was there; ``ok``: it is gone)."""

    ref: int = limits(min=1, max=2**63 - 1)
    task_id: str = _id()
    ok: bool = True
    held: bool = False
    content_length: int = limits(default=-1, min=-1, max=OFFSET_MAX)
    reason: str = _reason()


@dataclass(frozen=True, slots=True)
class DownloadRecord:
    """One finished (or failed) download on a host. The host fields are left empty by
    the host and filled by its scheduler with the host it proved."""

    task_id: str = _id()
    url: str = limits(default="", max_len=URL_MAX)  # redacted
    content_length: int = limits(default=-1, min=-1, max=OFFSET_MAX)
    finished_at: int = limits(default=0, min=0, max=2**40)  # unix seconds
    duration_ms: int = limits(default=0, min=0, max=2**40)
    bytes_p2p: int = limits(default=0, min=0, max=OFFSET_MAX)
    bytes_source: int = limits(default=0, min=0, max=OFFSET_MAX)
    bytes_local: int = limits(default=0, min=0, max=OFFSET_MAX)
    parents: list[str] = field(default_factory=list, metadata=dict(max_items=64, max_len=255))
    error: str = _reason()
    host_id: str = limits(default="", max_len=ID_MAX)
    hostname: str = limits(default="", max_len=255)
    ip: str = limits(default="", max_len=64)


def record_size(r: DownloadRecord) -> int:
    """A record's encoded size, about (for `batches`)."""
    return 200 + len(r.task_id) + len(r.url) + len(r.error) + sum(len(p) + 2 for p in r.parents)


@message("download_records")
@dataclass(frozen=True, slots=True)
class DownloadRecords(Message):
    """Host → scheduler, and scheduler → manager: finished downloads, batched."""

    records: list[DownloadRecord] = field(default_factory=list, metadata=dict(max_items=1000))
