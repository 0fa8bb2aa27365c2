"""The wire messages: one frozen dataclass per message type, registered with the codec.

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
"""

from dataclasses import dataclass, field

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
    "ROLES",
    "AnnounceDone",
    "AnnounceMember",
    "BlockRules",
    "CandidateParents",
    "Claims",
    "ClusterConfig",
    "ConfigUpdate",
    "Error",
    "ErrorCode",
    "Hello",
    "HostInfo",
    "HostsReport",
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
    "SchedulerEntry",
    "SchedulerList",
    "Subscribe",
    "SyncHosts",
    "TaskFailed",
    "TaskMetadata",
    "TaskSpec",
    "TriggerDownload",
    "check_version",
]

ROLES = ("peer", "seed-peer", "scheduler", "manager")

ID_MAX = 128
URL_MAX = 8192
DIGEST_MAX = 128  # "sha256:" + 64 hex, with room for longer algorithms
REASON_MAX = 1024
PIECE_NUMBER_MAX = 2**31 - 1
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
    version: str = limits(default="", max_len=64)  # the daemon's release


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
    task: TaskSpec
    # Request headers the origin must see (credentials where a rule shares them).
    headers: dict[str, str] = field(
        default_factory=dict, metadata=dict(max_items=256, max_len=URL_MAX)
    )
    content_length: int | None = limits(default=None, min=0, max=OFFSET_MAX)
    need_back_to_source: bool = False
    # The request carried credentials (Authorization, Cookie, a signature left out of
    # the ID, a configured credential header): the task is private from now on.
    private: bool = False


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
    task: TaskSpec
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
