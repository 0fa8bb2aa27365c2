"""The scheduler's decisions: events in (host connects, messages, clock ticks), Sends out.

Sans-I/O: no sockets, no trio, no clock.  Every entry point takes ``now`` (seconds)
and returns the messages to deliver; the trio websocket shell and the
discrete-event simulation both drive this same class.  For a given ``seed`` and
event sequence the decisions are identical (dicts are walked in insertion order,
the only randomness is ``random.Random(seed)``).

Cost per event stays proportional to what the event touches: a scheduling
decision samples at most ``filter_parent_limit`` candidates from the task's
index of serving peers; a piece report touches its reporter (and, for new origin
digests, the peers that must learn them); only ``tick``'s collection pass, every
``gc_interval``, walks everything.

Protocol notes for the peer side:

* ``CandidateParents`` always carries the peer's *whole* current parent set; a
  parent missing from a later one is no longer assigned to it.
* Digests beyond ``DIGESTS_PER_MESSAGE`` follow in ``PieceDigests`` messages.  A
  peer's first ``CandidateParents`` carries every digest known; later ones carry none,
  since every new digest reaches a downloading peer in ``PieceDigests``.
* A ``TaskMetadata`` with ``content_length`` -1 (origin sent no length) is enough
  to schedule: children get ``content_length``/``piece_count`` -1 and learn the
  end from their parents.

Trust (docs/SECURITY.md): the shell admits a host only with a proven credential, so
a Host's ID and seed flag are its credential's. Per-piece origin digests come from
seed peers, or from two ordinary peers on different hosts, both sent to the origin,
that agree (`_origin_digest`); a peer that reported other bytes than a digest that
became known is marked bad. Every parent in a CandidateParents comes with a ticket
made with the parent's host key (`TicketKey`), valid ``ticket_ttl`` seconds of wall
time: ``wall_offset`` (set by the shell) turns ``now`` into unix time.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from random import Random
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from dragonfly.identity import IdentityError, piece_length_for
from dragonfly.sched.evaluator import Evaluator
from dragonfly.sched.resources import (
    MAX_TRACKED_PIECES,
    RECEIVED_STATES,
    Host,
    Peer,
    PeerState,
    Task,
    TaskState,
    size_class,
)
from dragonfly.tokenbucket import TokenBucket
from dragonfly.trust import Attester, TicketKey
from dragonfly.wire.codec import PROTOCOL_VERSION, Message
from dragonfly.wire.messages import (
    CONTINUITY_VERSION,
    CandidateParents,
    Error,
    ErrorCode,
    HeldTask,
    HeldTasks,
    HostInfo,
    LeaveHost,
    LeavePeer,
    NeedBackToSource,
    PeerFailed,
    PeerFinished,
    PieceDigest,
    PieceDigests,
    PieceFailed,
    PiecesFinished,
    RegisterPeer,
    Reschedule,
    TaskAttested,
    TaskFailed,
    TaskMetadata,
    TaskSpec,
    TriggerDownload,
)

if TYPE_CHECKING:
    from dragonfly.config import SchedulerConfig

__all__ = [
    "DIGESTS_PER_MESSAGE",
    "Decision",
    "Scheduler",
    "SchedulerCounters",
    "SchedulerSettings",
    "Send",
]

# Digests per message: [number, 32 bytes] is ~40 bytes of CBOR, so 8000 stay far below
# the 1 MiB frame and the codec's 10,000-item list limit.
DIGESTS_PER_MESSAGE = 8000
# Bounds one decision's cost independent of the swarm's size: random draws from the
# task's serving peers per candidate wanted.
_DRAWS_PER_CANDIDATE = 4

# Ordinary peers sent to the origin for a task without seed peers, at most: two that
# agree confirm the digests; a third decides when the first two disagree.
WITNESSES = 3
# Ticket expiries are rounded up to this many seconds (see Scheduler._tickets).
TICKET_STEP = 60

_SCHEDULABLE = (PeerState.PENDING, PeerState.RUNNING)
_SERVING = (PeerState.BACK_TO_SOURCE, PeerState.SUCCEEDED, PeerState.RUNNING)
_WHOLE = (PeerState.BACK_TO_SOURCE, PeerState.SUCCEEDED)


@dataclass(frozen=True, slots=True)
class SchedulerSettings:
    """The knobs of scheduling and collection (config: [scheduling] and [gc])."""

    candidate_parent_limit: int = 8  # parents handed to a peer at once
    filter_parent_limit: int = 40  # candidates scored per decision
    back_to_source_count: int = 3  # peers of one task fetching from the origin at once
    retry_limit: int = 5  # retries without a parent before back to source
    retry_interval: float = 0.5  # seconds between retries of a waiting peer
    # After the first rejoining host connects, a task nobody is known to hold waits this
    # long for the re-announcements before a seed or the origin is asked.
    rejoin_grace: float = 3.0
    peer_ttl: float = 600.0  # a peer silent this long is dropped
    task_ttl: float = 3600.0  # a task without peers this long is dropped
    host_ttl: float = 300.0  # a disconnected host is forgotten after this long
    gc_interval: float = 30.0  # how often tick() runs the collection pass
    # Not in the config file (yet): a triggered seed that has not registered the task
    # after this long is presumed lost; the next seed (or a waiting peer) takes over.
    seed_trigger_timeout: float = 5.0
    # Running peers with fewer parents than the limit offered each new serving peer.
    top_up_limit: int = 8
    # Tickets handed out with each parent last this long (0: none, a cluster without
    # identity; config: [trust]).
    ticket_ttl: float = 0.0
    # Bounds per host (config: [limits]).
    peers_per_host: int = 10000
    registration_rate: float = 1000.0

    @classmethod
    def from_config(cls, cfg: SchedulerConfig) -> SchedulerSettings:
        s, gc = cfg.scheduling, cfg.gc
        return cls(
            candidate_parent_limit=s.candidate_parent_limit,
            filter_parent_limit=s.filter_parent_limit,
            back_to_source_count=s.back_to_source_count,
            retry_limit=s.retry_limit,
            retry_interval=s.retry_interval,
            rejoin_grace=s.rejoin_grace,
            peer_ttl=gc.peer_ttl,
            task_ttl=gc.task_ttl,
            host_ttl=gc.host_ttl,
            gc_interval=gc.interval,
            ticket_ttl=0.0 if cfg.trust.insecure else cfg.trust.ticket_ttl,
            peers_per_host=cfg.limits.peers_per_host,
            registration_rate=cfg.limits.registration_rate,
        )


@dataclass(frozen=True, slots=True)
class Send:
    """Deliver ``message`` to the host ``host_id`` over its websocket."""

    host_id: str
    message: Message


Decision = Send


@dataclass
class SchedulerCounters:
    """Monotonic counts for /metrics."""

    registrations: int = 0
    schedule_decisions: int = 0  # CandidateParents sent
    back_to_source: int = 0  # NeedBackToSource sent
    triggers: int = 0  # TriggerDownload sent
    bad_reports: int = 0  # reports that contradict what the scheduler knows
    task_failures: int = 0  # TaskFailed sent
    errors: int = 0  # Error replies
    refused_registrations: int = 0  # over a host's bounds (peers_per_host, rate)
    reannounced: int = 0  # held tasks a (re)connected host made serving peers of (HeldTasks)
    collected_peers: int = 0
    collected_tasks: int = 0
    collected_hosts: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Scheduler:
    """Hosts, tasks and peers in memory; each event returns the Sends it causes."""

    def __init__(
        self,
        settings: SchedulerSettings | None = None,
        *,
        seed: int = 0,
        evaluator: Evaluator | None = None,
        attester: Attester | None = None,
    ) -> None:
        self.settings = settings or SchedulerSettings()
        # Vouches for a finished task's digests (any scheduler of the cluster checks it);
        # None: a cluster without identity, where every host's word is taken.
        self.attester = attester
        self.evaluator = evaluator or Evaluator()
        self.counters = SchedulerCounters()
        self._rng = Random(seed)
        self._hosts: dict[str, Host] = {}
        self._seeds: dict[str, Host] = {}  # connected seed hosts not marked bad
        self._tasks: dict[str, Task] = {}
        self._peers: dict[str, Peer] = {}
        self._waiting: dict[str, Peer] = {}  # every task's waiting peers, for retries
        self._triggers: dict[str, Task] = {}  # tasks whose seed has not registered yet
        # The rejoin grace (settings.rejoin_grace): when it ends, and the tasks that
        # wait for it to seek a source.
        self._rejoin_until: float | None = None
        self._born: float | None = None  # when the first host connected
        self._deferred: dict[str, Task] = {}
        self._next_gc = -math.inf
        # now + wall_offset = unix time (tickets expire in wall time, which the hosts
        # share; the shell sets it, the simulation leaves it).
        self.wall_offset = 0.0
        self._handlers: dict[type[Message], Callable[[Host, Any, float, list[Send]], None]] = {
            RegisterPeer: self._on_register,
            TaskMetadata: self._on_task_metadata,
            PiecesFinished: self._on_pieces_finished,
            PieceFailed: self._on_piece_failed,
            PeerFinished: self._on_peer_finished,
            PeerFailed: self._on_peer_failed,
            Reschedule: self._on_reschedule,
            LeavePeer: self._on_leave_peer,
            LeaveHost: self._on_leave_host,
            HeldTasks: self._on_held_tasks,
        }

    # ------------------------------------------------------------------ read-only views

    @property
    def hosts(self) -> Mapping[str, Host]:
        return MappingProxyType(self._hosts)

    @property
    def tasks(self) -> Mapping[str, Task]:
        return MappingProxyType(self._tasks)

    @property
    def peers(self) -> Mapping[str, Peer]:
        return MappingProxyType(self._peers)

    # ------------------------------------------------------------------ entry points

    def host_connected(
        self, host: HostInfo, now: float, *, key: bytes = b"", protocol: int = PROTOCOL_VERSION
    ) -> list[Send]:
        """A host said Hello (and proved ``key``, its host key, in a cluster with
        identity; ``protocol``: the version its channel speaks): (re)create it; a
        reconnecting host keeps its record."""
        h = self._hosts.get(host.host_id)
        if h is None:
            h = self._hosts[host.host_id] = Host(host, now)
            rate = self.settings.registration_rate
            h.registrations = TokenBucket(rate, rate, now)
        else:
            h.update(host)
            h.connected = True
            h.disconnected_at = None
            h.last_seen = now
        h.ticket_key = TicketKey(key) if key and self.settings.ticket_ttl > 0 else None
        h.protocol = protocol
        if h.seed and not h.bad:
            self._seeds[h.id] = h
        else:
            self._seeds.pop(h.id, None)
        if self._born is None:
            self._born = now
        grace = self.settings.rejoin_grace
        if host.rejoining and self._rejoin_until is None and now < self._born + grace:
            # A restarted scheduler: its hosts come back together (within their reconnect
            # backoff). Until they re-announced what they hold, no task is known to be
            # held nowhere. (A host that reconnects later is one host's blip: no grace.)
            self._rejoin_until = now + grace
        return []

    def _deferring_any(self, now: float) -> bool:
        return self._rejoin_until is not None and now < self._rejoin_until

    def _deferring(self, task: Task, now: float) -> bool:
        """Within the rejoin grace (the scheduler's, or the task's): the task's source
        is sought once it ends (tick)."""
        if self._deferring_any(now) or now < task.rejoin_until:
            self._deferred[task.id] = task
            return True
        return False

    def host_disconnected(self, host_id: str, now: float) -> list[Send]:
        """The host's websocket closed: its peers leave, their children get new parents."""
        out: list[Send] = []
        host = self._hosts.get(host_id)
        if host is not None and host.connected:
            host.connected = False
            host.disconnected_at = now
            self._drop_host_peers(host, now, out)
        return out

    def handle(self, host_id: str, msg: Message, now: float) -> list[Send]:
        """One message from a host's websocket."""
        out: list[Send] = []
        host = self._hosts.get(host_id)
        if host is None or not host.connected:
            self._error(out, host_id, ErrorCode.NOT_FOUND, f"unknown host {host_id!r}", msg)
            return out
        host.last_seen = now
        handler = self._handlers.get(type(msg))
        if handler is None:
            self._error(
                out, host_id, ErrorCode.PROTOCOL, f"{msg.TAG} is not for the scheduler", msg
            )
            return out
        handler(host, msg, now, out)
        return out

    def forget_task(self, task_id: str, now: float) -> list[Send]:
        """A task deleted everywhere (a delete_task job): its peers leave, so nobody is
        handed a parent that no longer holds it, and the task record goes."""
        out: list[Send] = []
        task = self._tasks.get(task_id)
        if task is None:
            return out
        for peer in list(task.peers.values()):
            if self._peers.get(peer.id) is peer:
                self._remove_peer(peer, now, out)
        self._clear_trigger(task)
        if self._tasks.get(task_id) is task:
            task.transition(TaskState.LEAVE)
            del self._tasks[task_id]
        return out

    def tick(self, now: float) -> list[Send]:
        """Periodic work: lost seed triggers, retries of waiting peers, collection."""
        out: list[Send] = []
        timeout = self.settings.seed_trigger_timeout
        for task in list(self._triggers.values()):
            seed = task.seed_host
            if seed is not None and now - task.triggered_at >= timeout:
                task.seed_failures.add(seed.id)
                self._clear_trigger(task)
                self._ensure_source(task, now, out)
        if self._deferred and not self._deferring_any(now):
            for task in list(self._deferred.values()):
                if now >= task.rejoin_until:
                    del self._deferred[task.id]
                    if self._tasks.get(task.id) is task:
                        self._ensure_source(task, now, out)
        if now >= self._next_gc:  # before the retries: a quiet peer is not worth an answer
            self._next_gc = now + self.settings.gc_interval
            self._collect(now, out)
        for peer in list(self._waiting.values()):
            if self._waiting.get(peer.id) is peer and peer.next_retry <= now:
                self._retry(peer, now, out)
        return out

    # ------------------------------------------------------------------ message handlers

    def _on_register(self, host: Host, msg: RegisterPeer, now: float, out: list[Send]) -> None:
        try:
            made = msg.task.task_id
        except IdentityError as exc:
            self._error(out, host.id, ErrorCode.PROTOCOL, f"bad task: {exc}", msg)
            return
        if made != msg.task_id:
            # The ID is what the fields make: believing the sender's would let anyone
            # put one URL's bytes under another URL's ID.
            self.counters.bad_reports += 1
            self._error(
                out,
                host.id,
                ErrorCode.PROTOCOL,
                f"task ID {msg.task_id!r} is not the ID of its fields ({made})",
                msg,
            )
            return
        if not self._within_bounds(host, msg, now, out):
            return
        existing = self._peers.get(msg.peer_id)
        if existing is not None:
            if existing.host is not host or existing.task.id != msg.task_id:
                self._error(
                    out,
                    host.id,
                    ErrorCode.NOT_FOUND,
                    f"peer {msg.peer_id!r} is registered by another host or task",
                    msg,
                )
                return
            self._remove_peer(existing, now, out)  # a re-registration starts afresh
        task = self._tasks.get(msg.task_id)
        first = False
        if task is None:
            task = self._tasks[msg.task_id] = Task.from_register(msg, now)
            first = True
        elif task.state is TaskState.FAILED:
            self._clear_trigger(task)
            task.restart(msg)
            first = True
        elif task.spec is None:
            task.take_spec(msg)
        task.private = task.private or msg.private
        peer = Peer(msg.peer_id, host, task, now)
        task.peers[peer.id] = peer
        task.empty_since = None
        host.peers[peer.id] = peer
        self._peers[peer.id] = peer
        self.counters.registrations += 1
        if msg.held:
            self._adopt_held_pieces(peer, msg, now, out)
        if first and msg.piece_length is not None:  # a download registering again
            task.rejoin_until = now + self.settings.rejoin_grace

        if host.seed:
            if task.seed_host is host:
                self._clear_trigger(task)
            self._back_to_source(peer, now, out, "seed peer")
            return
        if msg.need_back_to_source and self._bts_allowed(task):
            self._back_to_source(peer, now, out, "requested by the peer")
            return
        if first:
            seed = None if self._deferring(task, now) else self._pick_seed(task)
            if seed is not None:
                self._trigger(task, seed, now, out)
            elif self._bts_allowed(task) and not self._deferring(task, now):
                self._back_to_source(peer, now, out, "no seed peer")
                return
        elif self._needs_witness(task) and self._bts_allowed(task):
            # One ordinary peer's word is not enough for a digest: a second one, on
            # another host, fetches from the origin too, and what both say holds.
            self._back_to_source(peer, now, out, "a second origin fetch confirms digests")
            return
        if not self._schedule(peer, now, out):
            self._ensure_source(task, now, out)

    def _within_bounds(self, host: Host, msg: RegisterPeer, now: float, out: list[Send]) -> bool:
        """A host registers at most ``registration_rate`` peers a second and has at most
        ``peers_per_host`` at once; beyond that the registration fails (HTTP 503 for
        the client), so one host cannot make the seeds and the origin work for it. (A
        seed peer keeps every task it holds registered, to serve it: only its rate is
        bounded.)"""
        bucket = host.registrations
        if bucket is not None and not bucket.try_take(1, now):
            reason = f"over {self.settings.registration_rate:g} registrations/s for this host"
        elif (
            len(host.peers) >= self.settings.peers_per_host
            and not host.seed
            and msg.peer_id not in host.peers
        ):
            reason = f"this host has {len(host.peers)} downloads registered, the most allowed"
        else:
            return True
        self.counters.refused_registrations += 1
        out.append(
            Send(
                host.id,
                TaskFailed(
                    task_id=msg.task_id,
                    reason=f"registration refused: {reason}",
                    peer_id=msg.peer_id,
                    http_status=503,
                ),
            )
        )
        return False

    def _on_task_metadata(self, host: Host, msg: TaskMetadata, now: float, out: list[Send]) -> None:
        peer = self._lookup(host, msg, now, out)
        if peer is None:
            return
        task = peer.task
        if not peer.back_to_source or peer.generation != task.generation:
            self.counters.bad_reports += 1
            self._error(
                out, host.id, ErrorCode.PROTOCOL, f"peer {peer.id} was not sent to the origin", msg
            )
            return
        want = task.piece_length or piece_length_for(msg.content_length)
        if msg.piece_length != want:
            # One rule for the piece length everywhere: a task cut in 1-byte pieces would
            # make every peer ask its parents once per byte.
            self.counters.bad_reports += 1
            self._error(
                out,
                host.id,
                ErrorCode.PROTOCOL,
                f"piece length {msg.piece_length} is not the task's ({want})",
                msg,
            )
            return
        if task.metadata_known:
            if (msg.content_length, msg.etag, msg.last_modified) != (
                task.content_length,
                task.etag,
                task.last_modified,
            ):
                self.counters.bad_reports += 1  # two origin fetches disagree; first one wins
            return
        self._set_layout(task, msg.content_length, msg.piece_length, msg.piece_count)
        task.etag, task.last_modified = msg.etag, msg.last_modified
        task.content_type = msg.content_type
        if task.state is TaskState.PENDING:
            task.transition(TaskState.RUNNING)
        for w in list(task.waiting.values()):
            if task.waiting.get(w.id) is w:
                self._schedule(w, now, out)

    def _on_pieces_finished(
        self, host: Host, msg: PiecesFinished, now: float, out: list[Send]
    ) -> None:
        peer = self._lookup(host, msg, now, out)
        if peer is None:
            return
        task = peer.task
        current = peer.generation == task.generation
        origin_trusted = current and peer.back_to_source and not peer.bad
        known = task.digests if current else {}
        count = task.piece_count
        had_pieces = len(peer.finished) > 0
        new_digests: list[PieceDigest] = []
        liars: list[Peer] = []
        disputed = task.disputed
        for r in msg.pieces:
            n = r.number
            if (count >= 0 and n >= count) or n >= MAX_TRACKED_PIECES:
                self.counters.bad_reports += 1
                continue
            digest = known.get(n)
            if digest is not None:
                if digest != r.digest:
                    liars.append(peer)
                    continue
            elif not r.parent_id and origin_trusted:
                self._origin_digest(task, peer, n, r.digest, new_digests, liars)
            peer.finished.add(n)
        for liar in dict.fromkeys(liars):
            if self._peers.get(liar.id) is liar:
                self._mark_bad(liar, now, out)
        if task.disputed and not disputed:
            self._call_witness(task, now, out)
        if new_digests:
            for p in task.downloading.values():
                if p is not peer:
                    for chunk in _chunks(new_digests):
                        out.append(
                            Send(
                                p.host.id,
                                PieceDigests(peer_id=p.id, task_id=task.id, digests=chunk),
                            )
                        )
        if not had_pieces and len(peer.finished) and peer.state is PeerState.RUNNING:
            self._became_source(peer, now, out)

    def _origin_digest(
        self,
        task: Task,
        peer: Peer,
        number: int,
        digest: bytes,
        new_digests: list[PieceDigest],
        liars: list[Peer],
    ) -> None:
        """A piece's digest as a peer sent to the origin reports it. A seed peer's is
        the digest; an ordinary peer's waits for a second ordinary peer, on another
        host, to report the same (or for a seed's). Whoever reported another digest
        for a piece whose digest became known reported other bytes: a liar."""
        if not peer.host.seed:
            seen = task.unconfirmed.setdefault(number, {})
            reporters = seen.setdefault(digest, [])
            if peer not in reporters:
                reporters.append(peer)
            if len(seen) > 1:
                task.disputed = True
            if len({p.host.id for p in reporters}) < 2:
                return
        for other, reporters in task.unconfirmed.pop(number, {}).items():
            if other != digest:
                liars.extend(reporters)
        task.digests[number] = digest
        entry = PieceDigest(number=number, digest=digest)
        task.digest_list.append(entry)
        new_digests.append(entry)

    def _on_piece_failed(self, host: Host, msg: PieceFailed, now: float, out: list[Send]) -> None:
        peer = self._lookup(host, msg, now, out)
        if peer is None or not msg.parent_id:
            return  # the origin failing is the back-to-source peer's own business
        parent = self._peers.get(msg.parent_id)
        if parent is not None:
            parent.host.failures += 1
        duplicate = msg.parent_id in peer.blocklist and msg.parent_id not in peer.parents
        peer.blocklist.add(msg.parent_id)
        if duplicate or peer.state not in _SCHEDULABLE:
            return  # several in-flight pieces of one dead parent: answer once
        if not self._schedule(peer, now, out, force=True):
            self._ensure_source(peer.task, now, out)

    def _on_reschedule(self, host: Host, msg: Reschedule, now: float, out: list[Send]) -> None:
        peer = self._lookup(host, msg, now, out)
        if peer is None:
            return
        if peer.state not in _SCHEDULABLE:
            self._error(
                out,
                host.id,
                ErrorCode.PROTOCOL,
                f"peer {peer.id} is {peer.state.value}: nothing to reschedule",
                msg,
            )
            return
        for parent_id in msg.blocked_parents:
            peer.blocklist.add(parent_id)
            parent = self._peers.get(parent_id)
            if parent is not None:
                parent.host.failures += 1
        if not self._schedule(peer, now, out, force=True):
            self._ensure_source(peer.task, now, out)

    def _on_peer_finished(self, host: Host, msg: PeerFinished, now: float, out: list[Send]) -> None:
        peer = self._lookup(host, msg, now, out)
        if peer is None or peer.state is PeerState.SUCCEEDED:
            return
        if not peer.can(PeerState.SUCCEEDED):
            self._error(
                out,
                host.id,
                ErrorCode.PROTOCOL,
                f"peer {peer.id} is {peer.state.value}: it cannot finish",
                msg,
            )
            return
        task = peer.task
        was_bts = peer.state is PeerState.BACK_TO_SOURCE
        self._set_parents(peer, [])
        self._unwait(peer)
        task.downloading.pop(peer.id, None)
        task.hungry.pop(peer.id, None)
        task.back_to_source.pop(peer.id, None)
        peer.transition(PeerState.SUCCEEDED)
        if peer.generation != task.generation:
            return
        task.succeeded[peer.id] = peer
        newly_known = False
        if was_bts:
            if not task.metadata_known or task.content_length < 0:
                newly_known = not task.metadata_known
                pl = task.piece_length or _piece_length_for(msg.content_length, msg.piece_count)
                self._set_layout(task, msg.content_length, pl, msg.piece_count)
            if task.state is TaskState.PENDING:
                task.transition(TaskState.RUNNING)
            if task.state is TaskState.RUNNING:
                task.transition(TaskState.SUCCEEDED)
        elif task.content_length >= 0 and msg.content_length != task.content_length:
            self.counters.bad_reports += 1
        self._attest(peer, out)
        self._became_source(peer, now, out)
        if newly_known:
            for w in list(task.waiting.values()):
                if task.waiting.get(w.id) is w:
                    self._schedule(w, now, out)

    def _on_peer_failed(self, host: Host, msg: PeerFailed, now: float, out: list[Send]) -> None:
        peer = self._lookup(host, msg, now, out)
        if peer is None or peer.state is PeerState.FAILED:
            return
        task = peer.task
        if (
            peer.state is PeerState.BACK_TO_SOURCE
            and peer.generation == task.generation
            and task.state is not TaskState.FAILED
        ):
            if host.seed:
                task.seed_failures.add(host.id)
            alone = all(p is peer for p in task.back_to_source.values())
            # A blob (digest task) is shared by clients of several registries: one
            # registry's failure is its own clients' failure, not everyone's; the
            # others are rescheduled and, with no parent, fetch from their own.
            if msg.http_status and alone and not task.digest:
                reason = msg.reason or f"origin answered HTTP {msg.http_status}"
                self._fail_task(task, now, out, reason, msg.http_status, except_peer=peer)
        self._detach(peer, PeerState.FAILED, now, out)

    def _on_leave_peer(self, host: Host, msg: LeavePeer, now: float, out: list[Send]) -> None:
        peer = self._lookup(host, msg, now, out)
        if peer is not None:
            self._remove_peer(peer, now, out)

    def _on_leave_host(self, host: Host, msg: LeaveHost, now: float, out: list[Send]) -> None:
        if msg.host_id != host.id:
            self._error(
                out, host.id, ErrorCode.NOT_FOUND, f"host {msg.host_id!r} is not this host", msg
            )
            return
        host.connected = False
        host.disconnected_at = now
        self._drop_host_peers(host, now, out)
        del self._hosts[host.id]  # it said goodbye: nothing to keep until host_ttl

    # ------------------------------------------------------------------ scheduling

    # ------------------------------------------------------------------ continuity

    def _attest(self, peer: Peer, out: list[Send]) -> None:
        """A peer that finished a task whose every digest is known gets an attestation
        of them, which it shows when it re-announces the task (HeldTasks)."""
        task = peer.task
        if (
            self.attester is None
            or peer.host.protocol < CONTINUITY_VERSION
            or not task.metadata_known
            or task.content_length < 0
            or task.piece_length is None
            or len(task.digests) < task.piece_count
        ):
            return
        facts = HeldTask(
            task_id=task.id,
            task=None,
            content_length=task.content_length,
            piece_length=task.piece_length,
            digests=b"".join(task.digests[n] for n in range(task.piece_count)),
            private=task.private,
            etag=task.etag,
            last_modified=task.last_modified,
        )
        out.append(
            Send(
                peer.host.id,
                TaskAttested(
                    task_id=task.id,
                    content_length=facts.content_length,
                    piece_length=facts.piece_length,
                    private=facts.private,
                    etag=facts.etag,
                    last_modified=facts.last_modified,
                    attestation=self.attester.attest(facts),
                ),
            )
        )

    def _adopt_held_pieces(
        self, peer: Peer, msg: RegisterPeer, now: float, out: list[Send]
    ) -> None:
        """A download registering again (its scheduler restarted, or it failed over) says
        which pieces it holds: they count as what it can serve, handed out only where the
        task's trusted digests match them. A seed's digests are taken (it is trusted for
        them); its layout comes with the TaskMetadata it sends again as it goes on at the
        origin. In a cluster without identity anyone's layout and digests are taken."""
        task = peer.task
        host = peer.host
        trusted = host.seed or self.attester is None
        if (
            trusted
            and not (host.seed or msg.need_back_to_source)
            and not task.metadata_known
            and msg.content_length is not None
            and msg.piece_length is not None
            and msg.piece_length == (task.piece_length or piece_length_for(msg.content_length))
        ):
            count = -(-msg.content_length // msg.piece_length)
            self._set_layout(task, msg.content_length, msg.piece_length, count)
            if task.state is TaskState.PENDING:
                task.transition(TaskState.RUNNING)
        count = task.piece_count
        taken: list[PieceDigest] = []
        for held in msg.held:
            n = held.number
            if (count >= 0 and n >= count) or n >= MAX_TRACKED_PIECES:
                self.counters.bad_reports += 1
                continue
            known = task.digests.get(n)
            if known is None and trusted and task.metadata_known:
                taken.append(held)
            elif known is not None and known != held.digest:
                self.counters.bad_reports += 1
                continue
            peer.finished.add(n)
        self._take_digests(task, taken, peer, out)

    def _take_digests(
        self, task: Task, digests: list[PieceDigest], source: Peer | None, out: list[Send]
    ) -> None:
        """Digests from a trusted source become the task's; its downloads hear them."""
        new = [d for d in digests if d.number not in task.digests]
        for d in new:
            task.digests[d.number] = d.digest
            task.digest_list.append(PieceDigest(number=d.number, digest=d.digest))
        if not new:
            return
        for p in task.downloading.values():
            if p is not source:
                for chunk in _chunks(new):
                    out.append(
                        Send(p.host.id, PieceDigests(peer_id=p.id, task_id=task.id, digests=chunk))
                    )

    def _on_held_tasks(self, host: Host, msg: HeldTasks, now: float, out: list[Send]) -> None:
        """A (re)connected host's complete tasks: each becomes a serving peer of its task,
        with the task's layout and digests where the scheduler did not know them (only
        from an attestation, a seed peer, or a cluster without identity)."""
        for held in msg.tasks:
            self._adopt_held_task(host, held, now, out)

    def _adopt_held_task(self, host: Host, held: HeldTask, now: float, out: list[Send]) -> None:
        pl, length = held.piece_length, held.content_length
        count = -(-length // pl)
        spec_ok = held.task is not None and _spec_makes(held.task, held.task_id)
        attested = self.attester is not None and self.attester.check(held.attestation, held)
        trusted = host.seed or self.attester is None or attested
        explicit = held.task.piece_length if held.task is not None else None
        if (
            not (spec_ok or attested)  # nothing ties this ID to these bytes
            or len(held.digests) != 32 * count
            # (an attested layout was checked when it was attested)
            or (not attested and pl != (explicit or piece_length_for(length)))
        ):
            self.counters.bad_reports += 1
            return
        digests = [held.digests[i * 32 : (i + 1) * 32] for i in range(count)]
        task = self._tasks.get(held.task_id)
        if task is None:
            if not trusted:
                return  # nobody vouches for its digests: the task starts when asked for
            # Without its whole spec, the next registration's (checked) is the task's.
            task = Task(held.task_id, held.task if spec_ok else None, now)
            self._tasks[held.task_id] = task
        if task.state is TaskState.FAILED:
            return
        if not task.metadata_known:
            if not trusted:
                return
            self._set_layout(task, length, pl, count)
            task.etag, task.last_modified = held.etag, held.last_modified
        elif (task.content_length, task.piece_length) != (length, pl) or any(
            task.digests.get(n, d) != d for n, d in enumerate(digests)
        ):
            self.counters.bad_reports += 1  # not the bytes this task is
            return
        if trusted:
            task.private = task.private or held.private
            pairs = [PieceDigest(number=n, digest=d) for n, d in enumerate(digests)]
            self._take_digests(task, pairs, None, out)
        elif len(task.digests) < count:
            return  # it would serve pieces nobody can check yet
        if task.state is TaskState.PENDING:
            task.transition(TaskState.RUNNING)
        if task.state is TaskState.RUNNING:
            task.transition(TaskState.SUCCEEDED)
        peer_id = f"{host.id}/{held.task_id[:16]}"
        if peer_id in self._peers or any(p.host is host for p in task.succeeded.values()):
            return  # announced already, or finished here by one of its downloads
        peer = Peer(peer_id, host, task, now)
        task.peers[peer.id] = peer
        task.empty_since = None
        host.peers[peer.id] = peer
        self._peers[peer.id] = peer
        peer.finished.fill(count)
        peer.transition(PeerState.SUCCEEDED)
        task.succeeded[peer.id] = peer
        self.counters.reannounced += 1
        for w in list(task.waiting.values()):
            if task.waiting.get(w.id) is w:
                self._schedule(w, now, out)
        self._became_source(peer, now, out)

    def _schedule(
        self,
        peer: Peer,
        now: float,
        out: list[Send],
        *,
        prefer: Peer | None = None,
        only_prefer: bool = False,
        force: bool = False,
    ) -> bool:
        """Give a PENDING/RUNNING peer the best parent set now possible and tell it if the
        set changed (or ``force``).  False: no parent; the peer waits for retries."""
        task = peer.task
        if peer.state not in _SCHEDULABLE or task.state in (TaskState.FAILED, TaskState.LEAVE):
            return False
        if not task.metadata_known:
            self._set_parents(peer, [])
            self._wait(peer, now)
            return False
        chosen = (
            []
            if task.content_length == 0
            else self._select_parents(peer, prefer, only_prefer=only_prefer, refresh=force)
        )
        self._set_parents(peer, chosen)
        if not chosen and task.content_length != 0:
            self._wait(peer, now)
            return False
        self._unwait(peer)
        if peer.state is PeerState.PENDING:
            received = size_class(task.content_length, task.piece_length)
            peer.transition(received)
            peer.received = received
            peer.transition(PeerState.RUNNING)
            task.downloading[peer.id] = peer
            if len(peer.finished):  # pieces reported while it waited (a resumed download)
                self._index_source(peer)
        self._send_parents(peer, now, out, force=force)
        if 0 < len(chosen) < self.settings.candidate_parent_limit:
            task.hungry.pop(peer.id, None)
            task.hungry[peer.id] = peer  # to the back of the queue
        else:
            task.hungry.pop(peer.id, None)
        return True

    def _send_parents(
        self, peer: Peer, now: float, out: list[Send], *, force: bool = False
    ) -> None:
        """Tell the peer its parent set (with the layout, digests and a ticket per
        parent), if it changed."""
        task = peer.task
        ids = tuple(peer.parents)
        if not force and ids == peer.last_sent:
            return
        peer.last_sent = ids
        self.counters.schedule_decisions += 1
        # The digests once: a peer in task.downloading gets every later one in
        # PieceDigests, so a parent update need not repeat (and encode) them all.
        full = not peer.digests_sent or peer.id not in task.downloading
        digests = task.digest_list[:DIGESTS_PER_MESSAGE] if full else []
        parents = list(peer.parents.values())
        tickets, expires_at = self._tickets(peer, parents, now)
        out.append(
            Send(
                peer.host.id,
                CandidateParents(
                    peer_id=peer.id,
                    task_id=task.id,
                    parents=[p.parent_info() for p in parents],
                    content_length=task.content_length,
                    piece_length=task.piece_length,
                    piece_count=task.piece_count,
                    digests=digests,
                    etag=task.etag,
                    last_modified=task.last_modified,
                    content_type=task.content_type,
                    tickets=tickets,
                    ticket_expires_at=expires_at,
                    private=task.private,
                ),
            )
        )
        if full:
            self._send_extra_digests(peer, out)
            peer.digests_sent = peer.id in task.downloading

    def _tickets(self, peer: Peer, parents: list[Peer], now: float) -> tuple[list[bytes], int]:
        """A ticket per parent (none without identity) and their expiry. The expiry is
        rounded up to TICKET_STEP, so the many parent updates of a peer reuse the
        tickets already made for it (a ticket is an HMAC: cheap, but ~14 updates of up
        to 8 parents per registration add up)."""
        ttl = self.settings.ticket_ttl
        if ttl <= 0:
            return [], 0
        expires_at = -(-int(now + self.wall_offset + ttl) // TICKET_STEP) * TICKET_STEP
        made = peer.tickets
        if peer.tickets_expire != expires_at:
            made = peer.tickets = {}
            peer.tickets_expire = expires_at
        out = []
        for p in parents:
            ticket = made.get(p.id)
            if ticket is None:
                key = p.host.ticket_key
                ticket = (
                    b""
                    if key is None
                    else key.mint(peer.task.id, peer.host.id, p.host.id, expires_at)
                )
                made[p.id] = ticket
            out.append(ticket)
        return out, expires_at

    def _select_parents(
        self, peer: Peer, prefer: Peer | None, *, only_prefer: bool = False, refresh: bool = False
    ) -> list[Peer]:
        """Keep the parents that still serve, fill up with the best-scored candidates
        that hold something the peer lacks (``only_prefer``: with ``prefer`` alone, if it
        may parent this peer).  ``refresh`` (the peer is stalled or lost a parent): keep
        only parents that hold a piece the peer lacks, so that a stalled peer gets new
        ones rather than the same set again."""
        limit = self.settings.candidate_parent_limit
        sources = peer.task.sources
        keep = [
            p
            for p in peer.parents.values()
            if p in sources
            and p.id not in peer.blocklist
            and p.host.connected
            and (not refresh or _useful(p, peer))
        ][:limit]
        need = limit - len(keep)
        if need <= 0:
            return keep
        accept = _ParentFilter(peer, {p.id for p in keep})
        if only_prefer:
            if prefer is not None and prefer in sources and accept(prefer):
                keep.append(prefer)
            return keep
        candidates = self._candidates(peer, accept, prefer)
        score = self.evaluator.score
        best = heapq.nlargest(need, candidates, key=lambda c: score(peer, c))
        return keep + best

    def _candidates(self, child: Peer, accept: _ParentFilter, prefer: Peer | None) -> list[Peer]:
        """Up to filter_parent_limit serving peers of the task that may parent ``child``:
        all of them in index order when few, else a seeded random sample drawn lazily
        (a partial Fisher-Yates) with a bounded number of draws, so the cost follows
        the sample, not the swarm."""
        limit = self.settings.filter_parent_limit
        items = child.task.sources.items
        n = len(items)
        out: list[Peer] = []
        if prefer is not None and prefer in child.task.sources and accept(prefer):
            out.append(prefer)
            accept.exclude.add(prefer.id)
        if n <= limit - len(out):
            out.extend(c for c in items if accept(c))
            return out
        rng = self._rng
        swapped: dict[int, int] = {}
        draws = min(n, _DRAWS_PER_CANDIDATE * limit + len(child.blocklist))
        for i in range(draws):
            j = rng.randrange(i, n)
            pick = swapped.get(j, j)
            swapped[j] = swapped.get(i, i)
            c = items[pick]
            if accept(c):
                out.append(c)
                if len(out) >= limit:
                    break
        return out

    def _set_parents(self, peer: Peer, chosen: Iterable[Peer]) -> None:
        """Replace the peer's DAG edges; each edge is one active child on the parent's host."""
        old = peer.parents
        new = {p.id: p for p in chosen}
        if not old and not new:
            return
        for pid, p in old.items():
            if new.get(pid) is not p:
                del p.children[peer.id]
                p.host.active_uploads -= 1
        for pid, p in new.items():
            if old.get(pid) is not p:
                p.children[peer.id] = peer
                p.host.active_uploads += 1
        peer.parents = new

    def _became_source(self, peer: Peer, now: float, out: list[Send]) -> None:
        """The peer can serve now: index it, and offer it to peers that need parents."""
        task = peer.task
        if not self._index_source(peer):
            return
        if not task.metadata_known or task.state is TaskState.FAILED:
            return
        for w in list(task.waiting.values()):
            if task.waiting.get(w.id) is w:
                self._schedule(w, now, out, prefer=peer)
        self._top_up(peer, now, out)

    @staticmethod
    def _index_source(peer: Peer) -> bool:
        """Add a peer that can serve to its task's candidate index; True if newly added."""
        return (
            peer.generation == peer.task.generation
            and not peer.bad
            and not peer.host.bad
            and peer.host.connected
            and peer.state in _SERVING
            and peer.task.sources.add(peer)
        )

    def _top_up(self, source: Peer, now: float, out: list[Send]) -> None:
        """Offer a new serving peer to running peers, while its host has free upload
        slots: first to peers short of parents (longest-waiting first), each gets it as
        one more parent; then to a sample of the others, where it replaces a parent with
        more children than it has. Without the second step, peers that start serving
        after the swarm filled its parent sets would never be given a child, and their
        upload would go unused."""
        task = source.task
        k = self.settings.top_up_limit
        given = 0
        for h in list(itertools.islice(task.hungry.values(), _DRAWS_PER_CANDIDATE * k)):
            if given >= k or self.evaluator.load_quality(source.host) <= 0:
                break
            if task.hungry.get(h.id) is not h:
                continue
            self._schedule(h, now, out, prefer=source, only_prefer=True)
            if source.id in h.parents:
                given += 1
        # Running peers that hold pieces are in the sources index: sample it.
        items = task.sources.items
        n = len(items)
        draws = min(n, _DRAWS_PER_CANDIDATE * k)
        rng = self._rng
        for i in range(draws):
            if given >= k or self.evaluator.load_quality(source.host) <= 0:
                break
            h = items[i] if n <= draws else items[rng.randrange(n)]
            if h is source or source.id in h.parents or h.state is not PeerState.RUNNING:
                continue
            if not _ParentFilter(h, set())(source):
                continue
            busiest = max(h.parents.values(), key=lambda p: len(p.children), default=None)
            if busiest is None or len(busiest.children) <= len(source.children) + 1:
                continue
            chosen = [p for p in h.parents.values() if p is not busiest] + [source]
            self._set_parents(h, chosen)
            self._send_parents(h, now, out)
            given += 1

    # ------------------------------------------------------------------ waiting and retries

    def _wait(self, peer: Peer, now: float) -> None:
        if peer.id not in self._waiting:
            peer.attempts = 0
            peer.next_retry = now + self.settings.retry_interval
            self._waiting[peer.id] = peer
            peer.task.waiting[peer.id] = peer
        peer.task.hungry.pop(peer.id, None)

    def _unwait(self, peer: Peer) -> None:
        if self._waiting.pop(peer.id, None) is not None:
            peer.task.waiting.pop(peer.id, None)
        peer.attempts = 0

    def _retry(self, peer: Peer, now: float, out: list[Send]) -> None:
        """A retry tick of a waiting peer: parents, else (after retry_limit attempts) the
        origin, else (after twice that) TaskFailed.  While the metadata is still being
        fetched by a live source, waiting costs no attempts."""
        if self._schedule(peer, now, out):
            return
        if peer.state not in _SCHEDULABLE or peer.task.state is TaskState.FAILED:
            self._unwait(peer)
            return
        task = peer.task
        if not self._has_source(task, for_peer=peer) and not self._deferring(task, now):
            peer.attempts += 1  # (waiting for a free upload slot of a live source is free)
        peer.next_retry = now + self.settings.retry_interval
        limit = self.settings.retry_limit
        if peer.attempts >= limit and self._bts_allowed(task):
            self._back_to_source(peer, now, out, f"no parent after {peer.attempts} attempts")
        elif peer.attempts >= 2 * limit:
            reason = f"no parent after {peer.attempts} attempts and back-to-source is not allowed"
            self._send_task_failed(peer, reason, 0, out)
            self._detach(peer, PeerState.FAILED, now, out)

    def _back_to_source(self, peer: Peer, now: float, out: list[Send], reason: str) -> None:
        task = peer.task
        self._set_parents(peer, [])
        self._unwait(peer)
        task.downloading.pop(peer.id, None)
        task.hungry.pop(peer.id, None)
        peer.transition(PeerState.BACK_TO_SOURCE)
        peer.back_to_source = True
        task.back_to_source[peer.id] = peer
        if not peer.host.seed:
            task.origin_hosts.add(peer.host.id)
        self.counters.back_to_source += 1
        known = task.metadata_known
        out.append(
            Send(
                peer.host.id,
                NeedBackToSource(
                    peer_id=peer.id,
                    task_id=task.id,
                    reason=reason,
                    content_length=task.content_length if known else -1,
                    piece_length=task.piece_length,
                    digests=task.digest_list[:DIGESTS_PER_MESSAGE],
                    etag=task.etag,
                    last_modified=task.last_modified,
                    private=task.private,
                ),
            )
        )
        self._send_extra_digests(peer, out)
        self._became_source(peer, now, out)

    def _bts_allowed(self, task: Task) -> bool:
        return len(task.back_to_source) < self.settings.back_to_source_count

    @staticmethod
    def _needs_witness(task: Task) -> bool:
        """No seed peer is at the task, and the ordinary peers that fetched it from the
        origin cannot confirm its digests: one alone, or two that disagree."""
        if task.seed_host is not None or any(
            p.host.seed
            for p in itertools.chain(task.back_to_source.values(), task.succeeded.values())
        ):
            return False
        n = len(task.origin_hosts)
        return n == 1 or (task.disputed and n < WITNESSES)

    def _call_witness(self, task: Task, now: float, out: list[Send]) -> None:
        """Origin fetches disagree: one more peer, on another host, fetches from the
        origin (peers waiting for digests nobody can confirm would wait forever)."""
        if not self._needs_witness(task) or not self._bts_allowed(task):
            return
        for p in itertools.chain(task.downloading.values(), task.waiting.values()):
            if p.state in _SCHEDULABLE and not p.host.bad and p.host.id not in task.origin_hosts:
                self._back_to_source(p, now, out, "origin fetches disagree: a third decides")
                return

    # ------------------------------------------------------------------ sources and seeds

    def _has_source(self, task: Task, for_peer: Peer | None = None) -> bool:
        """A seed was just asked to fetch the task, or a peer fetching it from the origin
        or holding all of it exists; with ``for_peer``, it must also be live and not
        blocked by that peer (whose parents then come as upload slots free up)."""
        if task.seed_host is not None:
            return True
        sources = task.sources
        blocked = for_peer.blocklist if for_peer is not None else ()
        return any(
            p in sources and (for_peer is None or (p.id not in blocked and p.host.connected))
            for p in itertools.chain(task.back_to_source.values(), task.succeeded.values())
        )

    def _ensure_source(self, task: Task, now: float, out: list[Send]) -> None:
        """Peers need bytes nobody can give: ask a seed, else send one peer to the origin."""
        if task.state in (TaskState.FAILED, TaskState.LEAVE):
            return
        if not task.waiting and not task.downloading:
            return
        if self._has_source(task) or self._deferring(task, now):
            return
        seed = self._pick_seed(task) if task.spec is not None else None
        if seed is not None:
            self._trigger(task, seed, now, out)
            return
        if not self._bts_allowed(task):
            return
        for p in itertools.chain(task.waiting.values(), task.downloading.values()):
            if p.state in _SCHEDULABLE and not p.host.bad:
                self._back_to_source(p, now, out, "no peer holds the task")
                return

    def _pick_seed(self, task: Task) -> Host | None:
        """Rendezvous hashing of the task over live seeds: each task keeps its seed while
        other seeds come and go, and tasks spread evenly over the seeds."""
        best: Host | None = None
        best_key = b""
        for h in self._seeds.values():
            if h.id in task.seed_failures:
                continue
            key = seed_key(task.id, h.id)
            if key > best_key:
                best, best_key = h, key
        return best

    def _trigger(self, task: Task, seed: Host, now: float, out: list[Send]) -> None:
        assert task.spec is not None  # (_ensure_source)
        self._clear_trigger(task)
        task.seed_host = seed
        task.triggered_at = now
        seed.triggered[task.id] = task
        self._triggers[task.id] = task
        self.counters.triggers += 1
        out.append(
            Send(
                seed.id,
                TriggerDownload(task_id=task.id, task=task.spec, headers=dict(task.headers)),
            )
        )

    def _clear_trigger(self, task: Task) -> None:
        seed = task.seed_host
        if seed is not None:
            seed.triggered.pop(task.id, None)
            task.seed_host = None
        self._triggers.pop(task.id, None)

    # ------------------------------------------------------------------ failures and removal

    def _mark_bad(self, peer: Peer, now: float, out: list[Send]) -> None:
        """The peer reported bytes that differ from the origin's: neither it nor any peer of
        its host is handed out again (it may go on downloading for itself)."""
        self.counters.bad_reports += 1
        peer.bad = True
        host = peer.host
        if host.bad:
            return
        host.bad = True
        self._seeds.pop(host.id, None)
        for task in list(host.triggered.values()):
            task.seed_failures.add(host.id)
            self._clear_trigger(task)
            self._ensure_source(task, now, out)
        for p in list(host.peers.values()):
            if p.task.sources.discard(p):
                self._orphan_children(p, now, out)
                self._ensure_source(p.task, now, out)

    def _fail_task(
        self,
        task: Task,
        now: float,
        out: list[Send],
        reason: str,
        http_status: int,
        *,
        except_peer: Peer,
    ) -> None:
        """The origin refused: every other waiting or running peer gets TaskFailed."""
        task.transition(TaskState.FAILED)
        self._clear_trigger(task)
        for p in list(task.peers.values()):
            if p is not except_peer and p.state in _SCHEDULABLE:
                self._send_task_failed(p, reason, http_status, out)
                self._detach(p, PeerState.FAILED, now, out)

    def _send_task_failed(self, peer: Peer, reason: str, http_status: int, out: list[Send]) -> None:
        self.counters.task_failures += 1
        out.append(
            Send(
                peer.host.id,
                TaskFailed(
                    task_id=peer.task.id,
                    reason=reason[:1024],
                    peer_id=peer.id,
                    http_status=http_status,
                ),
            )
        )

    def _detach(self, peer: Peer, state: PeerState, now: float, out: list[Send]) -> None:
        """FAILED or LEAVE: out of every index, its edges released, its children rescheduled."""
        task = peer.task
        peer.transition(state)
        self._set_parents(peer, [])
        self._unwait(peer)
        was_source = task.sources.discard(peer)
        task.back_to_source.pop(peer.id, None)
        task.succeeded.pop(peer.id, None)
        task.downloading.pop(peer.id, None)
        task.hungry.pop(peer.id, None)
        self._orphan_children(peer, now, out)
        if was_source:
            self._ensure_source(task, now, out)

    def _orphan_children(self, parent: Peer, now: float, out: list[Send]) -> None:
        children = list(parent.children.values())
        for c in children:
            del c.parents[parent.id]
            parent.host.active_uploads -= 1
        parent.children.clear()
        for c in children:
            if self._peers.get(c.id) is c and not self._schedule(c, now, out):
                self._ensure_source(c.task, now, out)

    def _remove_peer(self, peer: Peer, now: float, out: list[Send]) -> None:
        task = peer.task
        self._detach(peer, PeerState.LEAVE, now, out)
        del self._peers[peer.id]
        task.peers.pop(peer.id, None)
        peer.host.peers.pop(peer.id, None)
        if not task.peers:
            task.empty_since = now

    def _drop_host_peers(self, host: Host, now: float, out: list[Send]) -> None:
        self._seeds.pop(host.id, None)
        lost = list(host.triggered.values())
        for task in lost:
            self._clear_trigger(task)
        for p in list(host.peers.values()):
            if self._peers.get(p.id) is p:
                self._remove_peer(p, now, out)
        for task in lost:
            if self._tasks.get(task.id) is task:
                self._ensure_source(task, now, out)

    def _collect(self, now: float, out: list[Send]) -> None:
        """Drop quiet peers (a finished peer on a connected host is serving, not quiet),
        tasks left without peers, and hosts gone for host_ttl."""
        s = self.settings
        for peer in list(self._peers.values()):
            if self._peers.get(peer.id) is not peer or now - peer.last_seen < s.peer_ttl:
                continue
            if peer.state is PeerState.SUCCEEDED and peer.host.connected:
                continue
            self.counters.collected_peers += 1
            self._remove_peer(peer, now, out)
        for task in list(self._tasks.values()):
            if task.peers or task.empty_since is None or now - task.empty_since < s.task_ttl:
                continue
            self._clear_trigger(task)
            task.transition(TaskState.LEAVE)
            del self._tasks[task.id]
            self.counters.collected_tasks += 1
        for host in list(self._hosts.values()):
            gone = host.disconnected_at
            if not host.connected and gone is not None and now - gone >= s.host_ttl:
                del self._hosts[host.id]
                self.counters.collected_hosts += 1

    # ------------------------------------------------------------------ helpers

    def _lookup(self, host: Host, msg: Any, now: float, out: list[Send]) -> Peer | None:
        """The peer a message names, if it is this host's and of that task."""
        peer = self._peers.get(msg.peer_id)
        if peer is None or peer.host is not host or peer.task.id != msg.task_id:
            self._error(
                out,
                host.id,
                ErrorCode.NOT_FOUND,
                f"unknown peer {msg.peer_id!r} of task {msg.task_id!r} on this host",
                msg,
            )
            return None
        peer.last_seen = now
        return peer

    def _error(self, out: list[Send], host_id: str, code: str, text: str, msg: Message) -> None:
        self.counters.errors += 1
        out.append(Send(host_id, Error(code=code, message=text[:1024], ref=msg.TAG)))

    def _set_layout(
        self, task: Task, content_length: int, piece_length: int, piece_count: int
    ) -> None:
        task.content_length = content_length
        task.piece_length = piece_length
        if content_length >= 0:
            piece_count = -(-content_length // piece_length)
        task.piece_count = piece_count
        task.metadata_known = True

    def _send_extra_digests(self, peer: Peer, out: list[Send]) -> None:
        if len(peer.task.digest_list) <= DIGESTS_PER_MESSAGE:
            return
        rest = peer.task.digest_list[DIGESTS_PER_MESSAGE:]
        for chunk in _chunks(rest):
            out.append(
                Send(
                    peer.host.id,
                    PieceDigests(peer_id=peer.id, task_id=peer.task.id, digests=chunk),
                )
            )

    # ------------------------------------------------------------------ checks for tests

    def check_invariants(self) -> None:
        """Assert the bookkeeping is consistent (O(everything): tests and simulations only)."""
        limit = self.settings.candidate_parent_limit
        load: dict[str, int] = {}
        for pid, peer in self._peers.items():
            assert peer.id == pid and peer.state is not PeerState.LEAVE, peer
            assert peer.state not in RECEIVED_STATES, peer
            task = peer.task
            assert self._tasks.get(task.id) is task and task.peers.get(pid) is peer, peer
            assert peer.host.peers.get(pid) is peer, peer
            assert len(peer.parents) <= limit, peer
            for parent in peer.parents.values():
                assert parent.task is task, (peer, parent)
                assert parent.children.get(pid) is peer, (peer, parent)
                assert self._peers.get(parent.id) is parent, (peer, parent)
                assert parent.host is not peer.host, (peer, parent)
                load[parent.host.id] = load.get(parent.host.id, 0) + 1
            for child in peer.children.values():
                assert child.parents.get(pid) is peer, (peer, child)
            if peer.parents:
                assert peer.state is PeerState.RUNNING, peer
            if peer in task.sources:
                assert peer.state in _SERVING and peer.generation == task.generation, peer
            assert (pid in self._waiting) == (pid in task.waiting), peer
            if pid in task.waiting:
                assert peer.state in _SCHEDULABLE and not peer.parents, peer
        for host in self._hosts.values():
            assert host.active_uploads == load.get(host.id, 0), host
        for pid, peer in self._waiting.items():
            assert self._peers.get(pid) is peer, peer


class _ParentFilter:
    """Whether a serving peer may parent ``child`` in one decision: not itself, not an
    excluded or blocked one, not on its host or a bad/disconnected host or one whose
    upload slots are all promised to children, and holding some piece the child lacks.

    Parent edges may form cycles: A fetching piece 5 from B while B fetches piece 7
    from A is how a swarm uses every host's upload. A child only ever requests pieces
    its parent announced, so a cycle cannot deadlock; an acyclic parent graph, on the
    other hand, caps a swarm fed at the origin's rate to a chain (the prefix of its
    topological order must spend all its upload on the next peer).
    """

    __slots__ = ("child", "exclude")

    def __init__(self, child: Peer, exclude: set[str]) -> None:
        self.child = child
        self.exclude = exclude

    def __call__(self, c: Peer) -> bool:
        child = self.child
        if c is child or c.id in self.exclude or c.id in child.blocklist:
            return False
        h = c.host
        if h is child.host or not h.connected or h.bad or h.active_uploads >= h.info.upload_limit:
            return False  # (a host with every upload slot promised answers "busy")
        return _useful(c, child)


def _useful(parent: Peer, child: Peer) -> bool:
    """Whether ``parent`` holds, or is about to hold, a piece ``child`` lacks: one that
    finished, or fetches from the origin, has (or will have) every piece."""
    return parent.state in _WHOLE or parent.finished.has_outside(child.finished)


def seed_key(task_id: str, host_id: str) -> bytes:
    """A seed's rank for a task (rendezvous hashing): the live seed ranked highest gets
    the task, here and in preheat jobs (dragonfly/sched/jobs.py)."""
    return hashlib.sha256(f"{task_id}\0{host_id}".encode()).digest()


def _spec_makes(spec: TaskSpec, task_id: str) -> bool:
    try:
        return spec.task_id == task_id
    except IdentityError:
        return False


def _chunks(items: list[PieceDigest]) -> Iterable[list[PieceDigest]]:
    for i in range(0, len(items), DIGESTS_PER_MESSAGE):
        yield items[i : i + DIGESTS_PER_MESSAGE]


def _piece_length_for(content_length: int, piece_count: int) -> int:
    """A piece length consistent with a finished peer's report when none was announced."""
    if piece_count <= 0 or content_length <= 0:
        return 1
    return -(-content_length // piece_count)
