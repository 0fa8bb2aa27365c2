"""Hosts, tasks and peers as the scheduler holds them, with their state machines.

Plain objects with no behaviour beyond bookkeeping: the scheduler decides, these
remember.  The state machines are tables; a transition the table does not allow
raises ``IllegalTransition`` because it means the scheduler's own logic is wrong
(input from peers is checked with ``can`` before anything changes).
"""

from __future__ import annotations

import enum
from collections.abc import Iterator

from dragonfly.tokenbucket import TokenBucket
from dragonfly.trust import TicketKey
from dragonfly.wire.codec import PROTOCOL_VERSION
from dragonfly.wire.messages import HostInfo, ParentInfo, PieceDigest, RegisterPeer, TaskSpec

__all__ = [
    "MAX_TRACKED_PIECES",
    "PEER_TRANSITIONS",
    "RECEIVED_STATES",
    "TASK_TRANSITIONS",
    "Bitset",
    "Host",
    "IllegalTransition",
    "Peer",
    "PeerIndex",
    "PeerState",
    "Task",
    "TaskState",
    "size_class",
]

# A report naming a piece beyond this while the piece count is unknown is refused:
# the bitset of finished pieces must not be blown up by one bogus number.
MAX_TRACKED_PIECES = 1 << 24

TINY_LIMIT = 128  # bytes: Dragonfly's "tiny" task


class IllegalTransition(RuntimeError):
    """A state change the state machine forbids: a bug in the scheduler, not bad input."""


class PeerState(enum.Enum):
    """Dragonfly's peer states; RECEIVED_* say which size class the first answer had."""

    PENDING = "pending"
    RECEIVED_EMPTY = "received_empty"
    RECEIVED_TINY = "received_tiny"
    RECEIVED_SMALL = "received_small"
    RECEIVED_NORMAL = "received_normal"
    RUNNING = "running"
    BACK_TO_SOURCE = "back_to_source"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    LEAVE = "leave"


class TaskState(enum.Enum):
    """Dragonfly's task states."""

    PENDING = "pending"  # no metadata yet
    RUNNING = "running"  # metadata known, some peer fetches from the origin
    SUCCEEDED = "succeeded"  # a back-to-source peer holds every piece
    FAILED = "failed"  # the origin refused; a new registration starts afresh
    LEAVE = "leave"  # collected


RECEIVED_STATES = frozenset(
    {
        PeerState.RECEIVED_EMPTY,
        PeerState.RECEIVED_TINY,
        PeerState.RECEIVED_SMALL,
        PeerState.RECEIVED_NORMAL,
    }
)

_P = PeerState
PEER_TRANSITIONS: dict[PeerState, frozenset[PeerState]] = {
    # PENDING → SUCCEEDED: a host re-announcing a task it holds whole (HeldTasks).
    _P.PENDING: frozenset({*RECEIVED_STATES, _P.BACK_TO_SOURCE, _P.SUCCEEDED, _P.FAILED, _P.LEAVE}),
    **{s: frozenset({_P.RUNNING, _P.FAILED, _P.LEAVE}) for s in RECEIVED_STATES},
    _P.RUNNING: frozenset({_P.BACK_TO_SOURCE, _P.SUCCEEDED, _P.FAILED, _P.LEAVE}),
    _P.BACK_TO_SOURCE: frozenset({_P.SUCCEEDED, _P.FAILED, _P.LEAVE}),
    _P.SUCCEEDED: frozenset({_P.FAILED, _P.LEAVE}),
    _P.FAILED: frozenset({_P.LEAVE}),
    _P.LEAVE: frozenset(),
}

_T = TaskState
TASK_TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    _T.PENDING: frozenset({_T.RUNNING, _T.FAILED, _T.LEAVE}),
    _T.RUNNING: frozenset({_T.SUCCEEDED, _T.FAILED, _T.LEAVE}),
    _T.SUCCEEDED: frozenset({_T.FAILED, _T.LEAVE}),
    _T.FAILED: frozenset({_T.PENDING, _T.LEAVE}),  # PENDING: a new registration retries
    _T.LEAVE: frozenset(),
}


def size_class(content_length: int, piece_length: int | None) -> PeerState:
    """The RECEIVED_* state for a task of this size (unknown length counts as normal)."""
    if content_length == 0:
        return PeerState.RECEIVED_EMPTY
    if 0 < content_length <= TINY_LIMIT:
        return PeerState.RECEIVED_TINY
    if content_length > 0 and piece_length is not None and content_length <= piece_length:
        return PeerState.RECEIVED_SMALL
    return PeerState.RECEIVED_NORMAL


class Bitset:
    """Finished piece numbers: a growable bitmap (a set of ints costs ~40x the memory,
    which matters with 10,000 simulated peers of 500-piece tasks)."""

    __slots__ = ("_bits", "_count")

    def __init__(self) -> None:
        self._bits = bytearray()
        self._count = 0

    def add(self, n: int) -> bool:
        """Set bit n; True if it was not set before."""
        idx = n >> 3
        bits = self._bits
        if idx >= len(bits):
            bits.extend(bytes(idx + 1 - len(bits)))
        mask = 1 << (n & 7)
        if bits[idx] & mask:
            return False
        bits[idx] |= mask
        self._count += 1
        return True

    def fill(self, count: int) -> None:
        """Set bits 0..count-1 (a holder of the whole task)."""
        full, rest = divmod(count, 8)
        bits = bytearray(b"\xff" * full)
        if rest:
            bits.append((1 << rest) - 1)
        if len(self._bits) > len(bits):
            bits.extend(self._bits[len(bits) :])
        self._bits = bits
        self._count = sum(b.bit_count() for b in bits)

    def __contains__(self, n: object) -> bool:
        if not isinstance(n, int) or n < 0:
            return False
        idx = n >> 3
        return idx < len(self._bits) and bool(self._bits[idx] & (1 << (n & 7)))

    def __len__(self) -> int:
        return self._count

    def has_outside(self, other: Bitset) -> bool:
        """Whether some piece here is missing from ``other`` (a parent useful to a child)."""
        if self._count > other._count:
            return True  # more pieces than the other has: one of them must be new to it
        return bool(int.from_bytes(self._bits, "little") & ~int.from_bytes(other._bits, "little"))

    def __iter__(self) -> Iterator[int]:
        for idx, byte in enumerate(self._bits):
            if byte:
                for bit in range(8):
                    if byte & (1 << bit):
                        yield idx * 8 + bit


class PeerIndex:
    """An insertion-ordered set of peers with O(1) add, remove and random access by
    position, so a scheduling decision can sample candidates without listing them all."""

    __slots__ = ("_pos", "items")

    def __init__(self) -> None:
        self.items: list[Peer] = []
        self._pos: dict[str, int] = {}

    def add(self, peer: Peer) -> bool:
        if peer.id in self._pos:
            return False
        self._pos[peer.id] = len(self.items)
        self.items.append(peer)
        return True

    def discard(self, peer: Peer) -> bool:
        """Remove by swapping the last item into its place (order stays deterministic)."""
        pos = self._pos.get(peer.id)
        if pos is None or self.items[pos] is not peer:
            return False
        del self._pos[peer.id]
        last = self.items.pop()
        if last is not peer:
            self.items[pos] = last
            self._pos[last.id] = pos
        return True

    def __contains__(self, peer: object) -> bool:
        if not isinstance(peer, Peer):
            return False
        pos = self._pos.get(peer.id)
        return pos is not None and self.items[pos] is peer

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Peer]:
        return iter(self.items)


class Host:
    """A connected (or recently connected) peer daemon, as its Hello described it (and,
    in a cluster with identity, as its credential proved: its ID and whether it is a
    seed are the credential's)."""

    __slots__ = (
        "active_uploads",
        "bad",
        "connected",
        "disconnected_at",
        "failures",
        "id",
        "info",
        "last_seen",
        "location_levels",
        "peers",
        "protocol",
        "registrations",
        "ticket_key",
        "triggered",
    )

    def __init__(self, info: HostInfo, now: float) -> None:
        self.id = info.host_id
        self.info = info
        self.location_levels: tuple[str, ...] = ()
        self.connected = True
        self.last_seen = now
        self.disconnected_at: float | None = None
        # Children currently given a parent on this host: the load estimate.
        self.active_uploads = 0
        self.failures = 0  # PieceFailed reports naming a parent on this host
        self.bad = False  # reported a digest that differs from the origin's
        self.peers: dict[str, Peer] = {}
        self.triggered: dict[str, Task] = {}  # tasks this seed was asked to fetch
        # Tickets to fetch from this host are made with its host key (None: no identity).
        self.ticket_key: TicketKey | None = None
        self.protocol = PROTOCOL_VERSION  # the version its channel speaks
        self.registrations: TokenBucket | None = None  # the registration rate limit
        self.update(info)

    def update(self, info: HostInfo) -> None:
        """Take a (re)connecting host's new Hello."""
        self.info = info
        self.location_levels = tuple(info.location.split("|")) if info.location else ()

    @property
    def seed(self) -> bool:
        return self.info.seed

    def __repr__(self) -> str:
        flags = "seed " if self.seed else ""
        return f"<Host {self.id} {flags}connected={self.connected} load={self.active_uploads}>"


class Task:
    """One download (one task ID) with everything known about its content and peers."""

    __slots__ = (
        "back_to_source",
        "content_length",
        "content_type",
        "created_at",
        "digest",
        "digest_list",
        "digests",
        "disputed",
        "downloading",
        "empty_since",
        "etag",
        "generation",
        "headers",
        "hungry",
        "id",
        "last_modified",
        "metadata_known",
        "origin_hosts",
        "peers",
        "piece_count",
        "piece_length",
        "private",
        "rejoin_until",
        "seed_failures",
        "seed_host",
        "sources",
        "spec",
        "state",
        "succeeded",
        "triggered_at",
        "unconfirmed",
        "waiting",
    )

    def __init__(
        self,
        task_id: str,
        spec: TaskSpec | None,
        now: float,
        *,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.id = task_id
        # What the task is made of (its ID was checked against it); None for a task
        # learnt from a holder's re-announcement without its whole spec, until the first
        # registration brings one (take_spec).
        self.spec = spec
        self.digest = spec.digest if spec is not None else ""  # the whole file's
        self.headers = dict(headers or {})
        # The explicit one until metadata.
        self.piece_length = spec.piece_length if spec is not None else None
        self.created_at = now
        self.state = TaskState.PENDING
        self.peers: dict[str, Peer] = {}
        self.empty_since: float | None = None
        self.generation = 0
        self.seed_host: Host | None = None
        self.triggered_at = 0.0
        self.seed_failures: set[str] = set()
        # A download registered again with pieces it holds (its scheduler was lost):
        # the others of the task are coming back too; until then no seed or origin.
        self.rejoin_until = 0.0
        # Made from a request with credentials: clients get its bytes only after the
        # origin said yes to theirs. Never goes back to public.
        self.private = False
        self._reset_content()

    @classmethod
    def from_register(cls, msg: RegisterPeer, now: float) -> Task:
        return cls(msg.task_id, msg.task, now, headers=msg.headers)

    def _reset_content(self) -> None:
        self.metadata_known = False
        self.content_length = -1
        self.piece_count = -1
        self.content_type = ""
        self.etag = ""
        self.last_modified = ""
        self.digests: dict[int, bytes] = {}  # origin-side sha256 per piece number
        self.digest_list: list[PieceDigest] = []  # the same, ready for messages
        # Digests ordinary peers fetching from the origin reported, not confirmed yet:
        # piece → digest → the peers that reported it (Scheduler._origin_digest).
        self.unconfirmed: dict[int, dict[bytes, list[Peer]]] = {}
        self.disputed = False  # two of them reported different digests for a piece
        # Hosts of ordinary peers this generation sent to the origin.
        self.origin_hosts: set[str] = set()
        # Peers of the current generation that can serve (see Scheduler._became_source).
        self.sources = PeerIndex()
        self.back_to_source: dict[str, Peer] = {}  # fetching from the origin right now
        self.succeeded: dict[str, Peer] = {}
        self.waiting: dict[str, Peer] = {}  # need parents, have none
        self.downloading: dict[str, Peer] = {}  # RUNNING and told their parents
        self.hungry: dict[str, Peer] = {}  # RUNNING with fewer parents than the limit

    def restart(self, registration: RegisterPeer) -> None:
        """FAILED → PENDING: forget what the failed attempt learned; older peers stay
        registered but belong to the previous generation and never serve this one. A new
        try goes to this registrant's origin, with its headers (the first registrant's may
        be why it failed: an expired token, another registry)."""
        self.transition(TaskState.PENDING)
        self.generation += 1
        self.spec, self.headers = registration.task, dict(registration.headers)
        self.private = self.private or registration.private
        self.piece_length = self.spec.piece_length
        self.seed_failures.clear()
        self._reset_content()

    def take_spec(self, registration: RegisterPeer) -> None:
        """A task known only from a holder gets the first registrant's spec and headers
        (what a seed would be triggered with)."""
        self.spec, self.headers = registration.task, dict(registration.headers)
        self.digest = self.spec.digest

    def can(self, new: TaskState) -> bool:
        return new in TASK_TRANSITIONS[self.state]

    def transition(self, new: TaskState) -> None:
        if new not in TASK_TRANSITIONS[self.state]:
            raise IllegalTransition(f"task {self.id}: {self.state.name} → {new.name}")
        self.state = new

    def __repr__(self) -> str:
        return f"<Task {self.id} {self.state.name} peers={len(self.peers)}>"


class Peer:
    """One host's download of one task: a node of the task's parent DAG."""

    __slots__ = (
        "_parent_info",
        "attempts",
        "back_to_source",
        "bad",
        "blocklist",
        "children",
        "created_at",
        "digests_sent",
        "finished",
        "generation",
        "host",
        "id",
        "last_seen",
        "last_sent",
        "next_retry",
        "parents",
        "received",
        "state",
        "task",
        "tickets",
        "tickets_expire",
    )

    def __init__(self, peer_id: str, host: Host, task: Task, now: float) -> None:
        self.id = peer_id
        self.host = host
        self.task = task
        self.generation = task.generation
        self.state = PeerState.PENDING
        self.created_at = now
        self.last_seen = now
        self.finished = Bitset()
        self.parents: dict[str, Peer] = {}  # DAG edges child → parent
        self.children: dict[str, Peer] = {}
        self.blocklist: set[str] = set()  # parent peer ids never to hand out again
        self.bad = False
        self.back_to_source = False  # was told NeedBackToSource: its origin digests count
        self.received: PeerState | None = None  # the size class of its first answer
        self.last_sent: tuple[str, ...] | None = None  # parent ids of the last answer
        self.digests_sent = False  # had every digest; later ones reach it in PieceDigests
        self.attempts = 0  # scheduling attempts without any parent, while waiting
        self.next_retry = now
        self._parent_info: ParentInfo | None = None
        # Tickets made for this peer's parents, by parent ID, all expiring at one time.
        self.tickets: dict[str, bytes] = {}
        self.tickets_expire = 0

    def can(self, new: PeerState) -> bool:
        return new in PEER_TRANSITIONS[self.state]

    def transition(self, new: PeerState) -> None:
        if new not in PEER_TRANSITIONS[self.state]:
            raise IllegalTransition(f"peer {self.id}: {self.state.name} → {new.name}")
        self.state = new

    def parent_info(self) -> ParentInfo:
        """How a child reaches this peer (cached until the host reconnects with a new Hello)."""
        info = self.host.info
        cached = self._parent_info
        if (
            cached is None
            or cached.host_id != info.host_id
            or cached.ip != info.ip
            or cached.upload_port != info.upload_port
            or cached.idc != info.idc
            or cached.location != info.location
            or cached.seed != info.seed
            or cached.hostname != info.hostname
            or cached.tls != info.tls
        ):
            cached = self._parent_info = ParentInfo(
                peer_id=self.id,
                host_id=info.host_id,
                ip=info.ip,
                upload_port=info.upload_port,
                hostname=info.hostname,
                seed=info.seed,
                idc=info.idc,
                location=info.location,
                tls=info.tls,
            )
        return cached

    def __repr__(self) -> str:
        return (
            f"<Peer {self.id} task={self.task.id} host={self.host.id} {self.state.name} "
            f"pieces={len(self.finished)} parents={list(self.parents)}>"
        )
