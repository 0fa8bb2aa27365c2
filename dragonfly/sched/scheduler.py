"""The scheduler: events in (a host connects, a message, a clock tick), Sends out.

Sans-I/O: no sockets, no trio, no clock.  Every entry point takes ``now`` (seconds)
and returns the messages to deliver; the trio websocket shell and the
discrete-event simulation both drive this same class.  For a given ``seed`` and
event sequence the decisions are identical (dicts are walked in insertion order,
the only randomness is ``random.Random(seed)``).

Where things are: this module has the entry points and one handler per message type
(``_on_register``, ``_on_pieces_finished``...: a new message gets a handler here and
an entry in ``_HANDLERS``); the decisions the handlers share, and the state they
decide on, are ``SchedulerCore``'s (core.py); held tasks and pieces, and attestations,
continuity.py; choosing parents is selection.py, building the messages answers.py,
hosts, tasks, peers, their state machines and the tasks' indexes resources.py.

Cost per event stays proportional to what the event touches: a scheduling
decision samples at most ``filter_parent_limit`` candidates from the task's
index of serving peers; a piece report touches its reporter (and, for new origin
digests, the peers that must learn them); only ``tick``'s collection pass, every
``gc_interval``, walks everything.

Protocol notes for the peer side:

* A peer's first ``CandidateParents``, and the answer to its ``Reschedule`` or
  ``PieceFailed``, carry its whole parent set, a ticket for each. Later ones (parent
  updates: a new source offered to it) carry only the parents added since, made once
  per event or batch of messages (``handle_batch``). A parent is never taken away by
  a message: a peer keeps a parent until its announcements end or it fails it (the
  scheduler's own view of the edges, for the load of the parents' hosts, may drop it
  sooner), so a peer that needs others says so (``Reschedule``).
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

from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import ClassVar

from dragonfly.identity import IdentityError, piece_length_for
from dragonfly.sched.answers import DIGESTS_PER_MESSAGE, TICKET_STEP
from dragonfly.sched.continuity import ContinuityCore
from dragonfly.sched.core import seed_key
from dragonfly.sched.resources import (
    MAX_TRACKED_PIECES,
    SCHEDULABLE,
    Host,
    Peer,
    PeerState,
    Task,
    TaskState,
)
from dragonfly.sched.settings import Decision, SchedulerCounters, SchedulerSettings, Send
from dragonfly.tokenbucket import TokenBucket
from dragonfly.trust import TicketKey
from dragonfly.wire.codec import PROTOCOL_VERSION, Message
from dragonfly.wire.messages import (
    ErrorCode,
    HeldTasks,
    HostInfo,
    LeaveHost,
    LeavePeer,
    PeerFailed,
    PeerFinished,
    PieceDigest,
    PieceFailed,
    PiecesFinished,
    RegisterPeer,
    Reschedule,
    TaskFailed,
    TaskMetadata,
    TasksRemoved,
)

__all__ = [
    "DIGESTS_PER_MESSAGE",
    "TICKET_STEP",
    "Decision",
    "Scheduler",
    "SchedulerCounters",
    "SchedulerSettings",
    "Send",
    "seed_key",
]


class Scheduler(ContinuityCore):
    """Hosts, tasks and peers in memory; each event returns the Sends it causes."""

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

    def host_disconnected(self, host_id: str, now: float) -> list[Send]:
        """The host's websocket closed: its peers leave, their children get new parents."""
        out: list[Send] = []
        host = self._hosts.get(host_id)
        if host is not None and host.connected:
            host.connected = False
            host.disconnected_at = now
            self._drop_host_peers(host, now, out)
        self._end_batch(now, out)
        return out

    def handle(self, host_id: str, msg: Message, now: float) -> list[Send]:
        """One message from a host's websocket."""
        return self.handle_batch(host_id, (msg,), now)

    def handle_batch(self, host_id: str, messages: Iterable[Message], now: float) -> list[Send]:
        """Messages from a host's websocket, one after the other; the parent updates they
        cause go out once, at the end (a peer whose parents changed several times gets one
        update, or none when they came back to what it was told)."""
        out: list[Send] = []
        handlers = self._HANDLERS
        for msg in messages:
            host = self._hosts.get(host_id)
            if host is None or not host.connected:
                self._error(out, host_id, ErrorCode.NOT_FOUND, f"unknown host {host_id!r}", msg)
                continue
            host.last_seen = now
            handler = handlers.get(type(msg))
            if handler is None:
                self._error(
                    out, host_id, ErrorCode.PROTOCOL, f"{msg.TAG} is not for the scheduler", msg
                )
                continue
            handler(self, host, msg, now, out)
        self._end_batch(now, out)
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
        self._end_batch(now, out)
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
        self._end_batch(now, out)
        return out

    # ------------------------------------------------------------------ message handlers

    def _on_register(self, host: Host, msg: RegisterPeer, now: float, out: list[Send]) -> None:
        known = self._tasks.get(msg.task_id)
        try:
            # The fields of a task known under this ID make this ID: it was checked when
            # they came (hashing a URL per registration is a tenth of the handler).
            made = msg.task_id if known is not None and known.spec == msg.task else msg.task.task_id
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
        task = known
        first = False
        if task is None:
            task = self._tasks[msg.task_id] = Task.from_register(
                msg, now, waiting_everywhere=self._waiting
            )
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
            self._adopt_held_pieces(peer, msg, out)
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
        self.counters.piece_reports += len(msg.pieces)
        peer = self._lookup(host, msg, now, out)
        if peer is None:
            return
        task = peer.task
        current = peer.generation == task.generation
        origin_trusted = current and peer.back_to_source and not peer.bad
        known = task.digests if current else {}
        count = task.piece_count
        beyond = min(count, MAX_TRACKED_PIECES) if count >= 0 else MAX_TRACKED_PIECES
        had_pieces = len(peer.finished) > 0
        new_digests: list[PieceDigest] = []
        liars: list[Peer] = []
        disputed = task.disputed
        held: list[int] = []
        for r in msg.pieces:
            n = r.number
            if n >= beyond:
                self.counters.bad_reports += 1
                continue
            digest = known.get(n)
            if digest is not None:
                if digest != r.digest:
                    liars.append(peer)
                    continue
            elif not r.parent_id and origin_trusted:
                self._origin_digest(task, peer, n, r.digest, new_digests, liars)
            held.append(n)
        peer.finished.update(held)
        for liar in dict.fromkeys(liars):
            if self._peers.get(liar.id) is liar:
                self._mark_bad(liar, now, out)
        if task.disputed and not disputed:
            self._call_witness(task, now, out)
        if new_digests:
            self._send_digests(task, new_digests, peer, out)
        if (
            not had_pieces
            and len(peer.finished)
            and peer.state is PeerState.RUNNING
            and task.add_source(peer)
        ):
            self._new_sources.add(peer)

    def _on_piece_failed(self, host: Host, msg: PieceFailed, now: float, out: list[Send]) -> None:
        peer = self._lookup(host, msg, now, out)
        if peer is None or not msg.parent_id:
            return  # the origin failing is the back-to-source peer's own business
        parent = self._peers.get(msg.parent_id)
        if parent is not None:
            parent.host.failures += 1
        duplicate = msg.parent_id in peer.blocklist and msg.parent_id not in peer.parents
        peer.blocklist.add(msg.parent_id)
        if duplicate or peer.state not in SCHEDULABLE:
            return  # several in-flight pieces of one dead parent: answer once
        if not self._schedule(peer, now, out, force=True):
            self._ensure_source(peer.task, now, out)

    def _on_reschedule(self, host: Host, msg: Reschedule, now: float, out: list[Send]) -> None:
        peer = self._lookup(host, msg, now, out)
        if peer is None:
            return
        if peer.state not in SCHEDULABLE:
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
        peer.attempts = 0
        newly_source = task.move(peer, PeerState.SUCCEEDED)
        if peer.generation != task.generation:
            return
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
        if newly_source:
            self._new_sources.add(peer)
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

    def _on_tasks_removed(self, host: Host, msg: TasksRemoved, now: float, out: list[Send]) -> None:
        """The host no longer holds these tasks: its peers of them that serve (finished)
        go, so no child is sent there; a task left without a source gets one. Only this
        host's peers are touched, whatever IDs it names."""
        gone = set(msg.task_ids)
        tasks: set[Task] = set()
        for peer in list(host.peers.values()):
            if (
                peer.task.id in gone
                and peer.state is PeerState.SUCCEEDED
                and self._peers.get(peer.id) is peer
            ):
                tasks.add(peer.task)
                self._remove_peer(peer, now, out)
        for task in tasks:
            if self._tasks.get(task.id) is task:
                self._ensure_source(task, now, out)

    def _on_held_tasks(self, host: Host, msg: HeldTasks, now: float, out: list[Send]) -> None:
        """A (re)connected host's complete tasks: each becomes a serving peer of its task,
        with the task's layout and digests where the scheduler did not know them (only
        from an attestation, a seed peer, or a cluster without identity; continuity.py)."""
        for held in msg.tasks:
            self._adopt_held_task(host, held, now, out)

    # The handler of each message type a host may send.
    _HANDLERS: ClassVar[dict[type[Message], Callable[..., None]]] = {
        RegisterPeer: _on_register,
        TaskMetadata: _on_task_metadata,
        PiecesFinished: _on_pieces_finished,
        PieceFailed: _on_piece_failed,
        PeerFinished: _on_peer_finished,
        PeerFailed: _on_peer_failed,
        Reschedule: _on_reschedule,
        LeavePeer: _on_leave_peer,
        LeaveHost: _on_leave_host,
        HeldTasks: _on_held_tasks,
        TasksRemoved: _on_tasks_removed,
    }


def _piece_length_for(content_length: int, piece_count: int) -> int:
    """A piece length consistent with a finished peer's report when none was announced."""
    if piece_count <= 0 or content_length <= 0:
        return 1
    return -(-content_length // piece_count)
