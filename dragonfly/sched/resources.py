"""Hosts, tasks and peers as the scheduler holds them, with their state machines.

Why over 600 lines: the state tables, the indexes and the records they govern change
together (``Task.move`` is the one place a peer's state and every index change), so they
stay in one module a reader checks against itself.

Plain objects with no behaviour beyond bookkeeping: the scheduler decides, these
remember.  The state machines are tables; a transition the table does not allow
raises ``IllegalTransition`` because it means the scheduler's own logic is wrong
(input from peers is checked with ``can`` before anything changes).

A task indexes its peers by what the scheduler asks of them (who waits for parents,
who downloads, who fetches from the origin, who can serve...).  Which index a peer may
be in follows from its state (``INDEX_STATES``), and a peer's state changes in one
place, ``Task.move``: it checks ``PEER_TRANSITIONS``, takes the peer out of every index
its new state has no place in, releases its parent edges when it stops downloading, and
puts it in the index of its new state.  ``Task.check_indexes`` proves the indexes agree
with the states (tests and simulations).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator

from dragonfly.sched.bitset import Bitset
from dragonfly.tokenbucket import TokenBucket
from dragonfly.trust import TicketKey
from dragonfly.wire.codec import PROTOCOL_VERSION, Message
from dragonfly.wire.messages import HostInfo, ParentInfo, PieceDigest, RegisterPeer, TaskSpec

__all__ = [
    "INDEX_STATES",
    "MAX_TRACKED_PIECES",
    "PEER_TRANSITIONS",
    "RECEIVED_STATES",
    "SCHEDULABLE",
    "SERVING",
    "STATE_INDEX",
    "TASK_TRANSITIONS",
    "WHOLE",
    "Bitset",
    "Host",
    "IllegalTransition",
    "Peer",
    "PeerIndex",
    "PeerSet",
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

    # By identity: Enum's own hash (of the name, in Python) is most of the cost of the
    # state tests (`state in SERVING`) the scheduler makes per event.
    __hash__ = object.__hash__


class TaskState(enum.Enum):
    """Dragonfly's task states."""

    __hash__ = object.__hash__  # (as PeerState's)

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

# May be given parents / may be a parent / holds (or is fetching) every piece.
SCHEDULABLE = frozenset({_P.PENDING, _P.RUNNING})
SERVING = frozenset({_P.BACK_TO_SOURCE, _P.SUCCEEDED, _P.RUNNING})
WHOLE = frozenset({_P.BACK_TO_SOURCE, _P.SUCCEEDED})

# A task's indexes of its peers and the states a member may be in: a peer that moves to
# another state leaves every index that state is not listed for (Task.move).
INDEX_STATES: dict[str, frozenset[PeerState]] = {
    "waiting": SCHEDULABLE,  # needs parents, has none: retried every retry_interval
    "downloading": frozenset({_P.RUNNING}),  # told its parents
    "hungry": frozenset({_P.RUNNING}),  # fewer parents than the limit: offered new sources
    "back_to_source": frozenset({_P.BACK_TO_SOURCE}),  # fetching from the origin
    "succeeded": frozenset({_P.SUCCEEDED}),
    "sources": SERVING,  # can serve the current generation: the candidate parents
}
# The index a peer of the task's current generation joins when it enters a state.
STATE_INDEX: dict[PeerState, str] = {
    _P.RUNNING: "downloading",
    _P.BACK_TO_SOURCE: "back_to_source",
    _P.SUCCEEDED: "succeeded",
}
# Only a downloading peer has parents.
PARENTED = frozenset({_P.RUNNING})
_LEAVES: dict[PeerState, tuple[str, ...]] = {
    state: tuple(name for name, allowed in INDEX_STATES.items() if state not in allowed)
    for state in PeerState
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


class PeerSet(dict[str, "Peer"]):
    """Peers by ID in insertion order: one of a task's indexes. ``add`` and ``discard``
    are how it changes (``Task.move``, ``Task.wait``...); reading it is reading a dict.
    With ``mirror``, every change is made there too (a scheduler-wide index)."""

    __slots__ = ("mirror",)

    def __init__(self, mirror: PeerSet | None = None) -> None:
        super().__init__()
        self.mirror = mirror

    def add(self, peer: Peer) -> bool:
        """Add at the end; True if it was not there."""
        if peer.id in self:
            return False
        self[peer.id] = peer
        if self.mirror is not None:
            self.mirror.add(peer)
        return True

    def discard(self, peer: Peer) -> bool:
        """Remove this very peer; True if it was there."""
        if self.get(peer.id) is not peer:
            return False
        del self[peer.id]
        if self.mirror is not None:
            self.mirror.discard(peer)
        return True


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
    """One download (one task ID) with everything known about its content and peers,
    and its peers indexed by what the scheduler asks of them (see the module doc)."""

    __slots__ = (
        "attested",
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
        "waiting_everywhere",
    )

    def __init__(
        self,
        task_id: str,
        spec: TaskSpec | None,
        now: float,
        *,
        headers: dict[str, str] | None = None,
        waiting_everywhere: PeerSet | None = None,
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
        # Every task's waiting peers, for the scheduler's retries: `waiting` mirrors into it.
        self.waiting_everywhere = waiting_everywhere
        self._reset_content()

    @classmethod
    def from_register(
        cls, msg: RegisterPeer, now: float, *, waiting_everywhere: PeerSet | None = None
    ) -> Task:
        return cls(
            msg.task_id, msg.task, now, headers=msg.headers, waiting_everywhere=waiting_everywhere
        )

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
        # The TaskAttested its finished peers get, once made (continuity.py), and what
        # it was made of.
        self.attested: tuple[tuple[object, ...], Message] | None = None
        # Hosts of ordinary peers this generation sent to the origin.
        self.origin_hosts: set[str] = set()
        # The indexes (INDEX_STATES): peers of the current generation only.
        waiting: PeerSet | None = getattr(self, "waiting", None)  # (None: a new task)
        if waiting is not None:
            for p in list(waiting.values()):
                waiting.discard(p)  # (out of the scheduler-wide index too)
        self.sources = PeerIndex()
        self.back_to_source = PeerSet()
        self.succeeded = PeerSet()
        self.waiting = PeerSet(self.waiting_everywhere)
        self.downloading = PeerSet()
        self.hungry = PeerSet()  # in the order they are to be offered a new source

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

    # -- a peer's state and the indexes ------------------------------------------------

    def move(self, peer: Peer, new: PeerState) -> bool:
        """The one place a peer of this task changes state: checked against
        PEER_TRANSITIONS (IllegalTransition), then the peer leaves every index its new
        state has no place in and its parent edges unless it downloads, and joins the
        new state's index. True if the move made it a source (the scheduler then offers
        it to peers that need parents)."""
        peer.transition(new)
        if new not in PARENTED and peer.parents:
            peer.set_parents(())
        for name in _LEAVES[new]:
            index: PeerSet | PeerIndex = getattr(self, name)
            index.discard(peer)
        if peer.generation != self.generation:
            return False  # a peer of a failed attempt is in no index
        joins = STATE_INDEX.get(new)
        if joins is not None:
            state_index: PeerSet = getattr(self, joins)
            state_index.add(peer)
        if new in WHOLE or (new is PeerState.RUNNING and len(peer.finished)):
            return self.add_source(peer)
        return False

    def add_source(self, peer: Peer) -> bool:
        """Index a peer that can serve (it holds a piece, or will hold all) as a candidate
        parent, if it may be one; True if newly added."""
        return (
            peer.generation == self.generation
            and not peer.bad
            and not peer.host.bad
            and peer.host.connected
            and peer.state in SERVING
            and self.sources.add(peer)
        )

    def wait(self, peer: Peer) -> bool:
        """The peer needs parents and has none: retried until it gets some. True if it was
        not waiting already."""
        assert peer.state in SCHEDULABLE, peer
        self.hungry.discard(peer)
        return self.waiting.add(peer)

    def set_hungry(self, peer: Peer, hungry: bool) -> None:
        """A downloading peer with fewer parents than the limit goes (back) to the end of
        the queue of peers offered new sources; one with enough leaves it."""
        self.hungry.discard(peer)
        if hungry:
            assert peer.state is PeerState.RUNNING, peer
            self.hungry.add(peer)

    def check_indexes(self) -> None:
        """Assert that every index holds exactly the peers its states say (O(peers):
        tests and simulations only)."""
        for name, allowed in INDEX_STATES.items():
            index: PeerSet | PeerIndex = getattr(self, name)
            for p in index.values() if isinstance(index, PeerSet) else index:
                assert self.peers.get(p.id) is p, (name, p)
                assert p.state in allowed and p.generation == self.generation, (name, p)
        for p in self.peers.values():
            joins = STATE_INDEX.get(p.state)
            if joins is not None and p.generation == self.generation:
                assert p.id in getattr(self, joins), (joins, p)
            if p.parents:
                assert p.state in PARENTED, p
        for p in self.sources:
            assert not p.bad and not p.host.bad and p.host.connected, p
            assert p.state is not PeerState.RUNNING or len(p.finished), p
        for p in self.waiting.values():
            assert not p.parents, p
            if self.waiting_everywhere is not None:
                assert self.waiting_everywhere.get(p.id) is p, p
        for p in self.hungry.values():
            assert p.id in self.downloading, p

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
        "next_retry",
        "parents",
        "received",
        "state",
        "task",
        "tickets",
        "tickets_expire",
        "told",
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
        # IDs of the parents it was told of since its last whole parent set (None: it has
        # had none): a parent update names only the others.
        self.told: set[str] | None = None
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

    def set_parents(self, chosen: Iterable[Peer]) -> None:
        """Replace this peer's parent edges; each edge is one active child on the parent's
        host (its load)."""
        old = self.parents
        new = {p.id: p for p in chosen}
        if not old and not new:
            return
        for pid, p in old.items():
            if new.get(pid) is not p:
                del p.children[self.id]
                p.host.active_uploads -= 1
        for pid, p in new.items():
            if old.get(pid) is not p:
                p.children[self.id] = self
                p.host.active_uploads += 1
        self.parents = new

    def add_parent(self, parent: Peer) -> None:
        """One more parent edge (one more active child on the parent's host)."""
        self.parents[parent.id] = parent
        parent.children[self.id] = self
        parent.host.active_uploads += 1

    def drop_children(self) -> list[Peer]:
        """Take every child's edge to this peer away; returns the children."""
        children = list(self.children.values())
        for c in children:
            del c.parents[self.id]
            self.host.active_uploads -= 1
        self.children.clear()
        return children

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
