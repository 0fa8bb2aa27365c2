"""Shared wire records: the limits, error codes and field shorthands that every message
family uses, and the nested records (hosts, claims, task specs, parents, pieces) carried
inside messages. No message is registered here: the messages are in msg_handshake.py,
msg_scheduler.py and msg_manager.py, and messages.py re-exports them all."""

from dataclasses import dataclass, field
from typing import TypeVar

from dragonfly.identity import (
    MAX_EXPLICIT_PIECE_LENGTH,
    MIN_EXPLICIT_PIECE_LENGTH,
    spec_task_id,
)
from dragonfly.wire.codec import (
    compact,
    limits,
    reused,
)

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
