"""The scheduler's state and the decisions every event handler shares (sans-I/O).

Why over 600 lines: the decisions call one another (scheduling a peer may send one to the
origin or trigger a seed; a departure orphans children who are rescheduled at the end of
the batch) over the same state; the handlers (scheduler.py), choosing parents
(selection.py), the messages (answers.py) and continuity (continuity.py) are apart.

``SchedulerCore`` holds the hosts, tasks and peers, and decides: a peer's parent set
(``_schedule``, choosing with selection.py), offering a peer that starts serving to
those that need parents (``_offer``, ``_top_up``), retries of waiting peers, sending a
peer to the origin or triggering a seed when nobody holds the task, and what a failure
or a departure leaves to be done (``_detach``, ``_collect``). The event handlers, one
per message type, are ``Scheduler``'s (scheduler.py); the messages themselves are built
in answers.py. A peer's state and the task's indexes change only through
``Task.move`` and the task's index methods (resources.py).

Every method that decides appends the messages to send to ``out``.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from random import Random
from typing import Any

from dragonfly.sched import answers
from dragonfly.sched.evaluator import Evaluator
from dragonfly.sched.resources import (
    RECEIVED_STATES,
    SCHEDULABLE,
    SERVING,
    Host,
    Peer,
    PeerSet,
    PeerState,
    Task,
    TaskState,
    size_class,
)
from dragonfly.sched.selection import DRAWS_PER_CANDIDATE, ParentFilter, ParentSelector
from dragonfly.sched.settings import SchedulerCounters, SchedulerSettings, Send
from dragonfly.trust import Attester
from dragonfly.wire.codec import Message
from dragonfly.wire.messages import Error, ErrorCode, PieceDigest, PieceDigests, TriggerDownload

__all__ = ["WITNESSES", "SchedulerCore", "seed_key"]

# Ordinary peers sent to the origin for a task without seed peers, at most: two that
# agree confirm the digests; a third decides when the first two disagree.
WITNESSES = 3


class SchedulerCore:
    """Hosts, tasks and peers in memory, and the decisions the event handlers share."""

    def __init__(
        self,
        settings: SchedulerSettings | None = None,
        *,
        seed: int = 0,
        evaluator: Evaluator | None = None,
        attester: Attester | None = None,
    ) -> None:
        self._settings = settings or SchedulerSettings()
        # Vouches for a finished task's digests (any scheduler of the cluster checks it);
        # None: a cluster without identity, where every host's word is taken.
        self.attester = attester
        self.evaluator = evaluator or Evaluator()
        self.counters = SchedulerCounters()
        self._rng = Random(seed)
        self._selector = ParentSelector(self.settings, self.evaluator, self._rng)
        self._hosts: dict[str, Host] = {}
        self._seeds: dict[str, Host] = {}  # connected seed hosts not marked bad
        self._tasks: dict[str, Task] = {}
        self._peers: dict[str, Peer] = {}
        self._waiting = PeerSet()  # every task's waiting peers (Task.waiting), for retries
        self._triggers: dict[str, Task] = {}  # tasks whose seed has not registered yet
        # The rejoin grace (settings.rejoin_grace): when it ends, and the tasks that
        # wait for it to seek a source.
        self._rejoin_until: float | None = None
        self._born: float | None = None  # when the first host connected
        self._deferred: dict[str, Task] = {}
        # Decided when the event (or the batch of a host's messages) ends, on what it left:
        self._orphans = PeerSet()  # children that lost a parent: reschedule
        self._new_sources = PeerSet()  # peers that began to serve: offer to others
        self._updates = PeerSet()  # peers whose parent set changed: tell them
        self._next_gc = -math.inf
        # now + wall_offset = unix time (tickets expire in wall time, which the hosts
        # share; the shell sets it, the simulation leaves it).
        self.wall_offset = 0.0

    @property
    def settings(self) -> SchedulerSettings:
        return self._settings

    @settings.setter
    def settings(self, settings: SchedulerSettings) -> None:
        """New knobs (the manager's cluster settings, at once): parent selection too."""
        self._settings = settings
        self._selector.settings = settings

    # ------------------------------------------------------------------ scheduling

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
        if peer.state not in SCHEDULABLE or task.state in (TaskState.FAILED, TaskState.LEAVE):
            return False
        if not task.metadata_known:
            peer.set_parents(())
            self._wait(peer, now)
            return False
        chosen = (
            []
            if task.content_length == 0
            else self._selector.select(peer, prefer, only_prefer=only_prefer, refresh=force)
        )
        if not chosen and task.content_length != 0:
            peer.set_parents(())
            self._wait(peer, now)
            return False
        self._unwait(peer)
        if peer.state is PeerState.PENDING:
            received = size_class(task.content_length, task.piece_length)
            task.move(peer, received)
            peer.received = received
            # (a peer holding pieces reported while it waited, a resumed download, is a
            # source at once)
            task.move(peer, PeerState.RUNNING)
        peer.set_parents(chosen)
        self._send_parents(peer, now, out, force=force)
        task.set_hungry(peer, 0 < len(chosen) < self.settings.candidate_parent_limit)
        return True

    def _send_parents(
        self, peer: Peer, now: float, out: list[Send], *, force: bool = False
    ) -> None:
        """Tell the peer its parent set: the whole set (with the layout, the digests the
        first time, a ticket per parent) the first time and when ``force``d; otherwise
        a parent update, made when the event (or the batch) ends (``_flush_updates``)."""
        task = peer.task
        if peer.told is not None and not force and peer.id in task.downloading:
            self._updates.add(peer)
            return
        peer.told = set(peer.parents)
        # The digests once: a peer in task.downloading gets every later one in
        # PieceDigests, so a parent update need not repeat (and encode) them all.
        full = not peer.digests_sent or peer.id not in task.downloading
        digests = task.digest_list[: answers.DIGESTS_PER_MESSAGE] if full else []
        self._send_candidates(peer, list(peer.parents.values()), digests, now, out)
        if full:
            out.extend(Send(peer.host.id, m) for m in answers.extra_digests(peer))
            peer.digests_sent = peer.id in task.downloading

    def _send_candidates(
        self,
        peer: Peer,
        parents: list[Peer],
        digests: list[PieceDigest],
        now: float,
        out: list[Send],
    ) -> None:
        self.counters.schedule_decisions += 1
        tickets, expires_at = answers.tickets(
            peer, parents, now, self.wall_offset, self.settings.ticket_ttl
        )
        out.append(
            Send(
                peer.host.id,
                answers.candidate_parents(peer, parents, digests, tickets, expires_at),
            )
        )

    def _end_batch(self, now: float, out: list[Send]) -> None:
        """What the event (or the batch of a host's messages) that ends left to decide:
        children that lost a parent get others, peers that began to serve are offered
        to those that need parents, and the peers whose parents changed are told. A
        child whose parent left within the batch that made it a parent, or a source gone
        before the batch ended, costs no decision."""
        while self._orphans or self._new_sources:
            orphans, self._orphans = self._orphans, PeerSet()
            for c in orphans.values():
                if self._peers.get(c.id) is c and not self._schedule(c, now, out):
                    self._ensure_source(c.task, now, out)
            sources, self._new_sources = self._new_sources, PeerSet()
            for p in sources.values():
                if p in p.task.sources:
                    self._offer(p, now, out)
        self._flush_updates(now, out)

    def _flush_updates(self, now: float, out: list[Send]) -> None:
        """The parent updates of the event (or batch) that ends: to each downloading peer
        whose set gained parents it was not told of, those parents only. A parent taken
        away needs no message (a peer keeps a parent until it leaves or fails it), and one
        added and taken away within the batch none either."""
        for peer in self._updates.values():
            told = peer.told
            if told is None or peer.state is not PeerState.RUNNING:
                continue
            if self._peers.get(peer.id) is not peer:
                continue
            new = [p for p in peer.parents.values() if p.id not in told]
            if new:
                told.update(p.id for p in new)
                self._send_candidates(peer, new, [], now, out)
        self._updates.clear()

    def _offer(self, peer: Peer, now: float, out: list[Send]) -> None:
        """The peer began to serve (``_new_sources``): offer it to peers that need
        parents."""
        task = peer.task
        if not task.metadata_known or task.state is TaskState.FAILED:
            return
        load_quality = self.evaluator.load_quality
        for w in list(task.waiting.values()):
            if load_quality(peer.host) <= 0:
                # Its upload slots are all promised: the peers still waiting found no
                # parent before and would search the swarm again for nothing (with
                # thousands waiting, that search for each new source was nearly all of
                # a burst's scheduling); they try again at their retry tick.
                break
            if task.waiting.get(w.id) is w:
                self._schedule(w, now, out, prefer=peer)
        self._top_up(peer, now, out)

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
        for h in list(itertools.islice(task.hungry.values(), DRAWS_PER_CANDIDATE * k)):
            if given >= k or self.evaluator.load_quality(source.host) <= 0:
                break
            if task.hungry.get(h.id) is not h:
                continue
            if self._give(h, source, now, out):
                given += 1
        # Running peers that hold pieces are in the sources index: sample it.
        items = task.sources.items
        n = len(items)
        draws = min(n, DRAWS_PER_CANDIDATE * k)
        rng = self._rng
        for i in range(draws):
            if given >= k or self.evaluator.load_quality(source.host) <= 0:
                break
            h = items[i] if n <= draws else items[rng.randrange(n)]
            if h is source or source.id in h.parents or h.state is not PeerState.RUNNING:
                continue
            if not ParentFilter(h, set())(source):
                continue
            busiest = max(h.parents.values(), key=lambda p: len(p.children), default=None)
            if busiest is None or len(busiest.children) <= len(source.children) + 1:
                continue
            h.set_parents([p for p in h.parents.values() if p is not busiest] + [source])
            self._send_parents(h, now, out)
            given += 1

    def _give(self, peer: Peer, source: Peer, now: float, out: list[Send]) -> bool:
        """Offer ``source`` to a downloading peer short of parents as one more parent (it
        goes to the back of their queue either way); True if it is one of its parents.
        What ``_schedule(peer, prefer=source, only_prefer=True)`` decides, without
        reconsidering the parents it has (they are all live sources: every way a parent
        stops being one takes its children's edges)."""
        limit = self.settings.candidate_parent_limit
        n = len(peer.parents)
        if peer.state is not PeerState.RUNNING or not 0 < n < limit:
            self._schedule(peer, now, out, prefer=source, only_prefer=True)
            return source.id in peer.parents
        if (
            source.id not in peer.parents
            and source in peer.task.sources
            and ParentFilter(peer, set())(source)
        ):
            peer.add_parent(source)
            self._send_parents(peer, now, out)
            n += 1
        peer.task.set_hungry(peer, n < limit)
        return source.id in peer.parents

    # ------------------------------------------------------------------ waiting and retries

    def _wait(self, peer: Peer, now: float) -> None:
        if peer.task.wait(peer):
            peer.attempts = 0
            peer.next_retry = now + self.settings.retry_interval

    def _unwait(self, peer: Peer) -> None:
        peer.task.waiting.discard(peer)
        peer.attempts = 0

    def _retry(self, peer: Peer, now: float, out: list[Send]) -> None:
        """A retry tick of a waiting peer: parents, else (after retry_limit attempts) the
        origin, else (after twice that) TaskFailed.  While the metadata is still being
        fetched by a live source, waiting costs no attempts."""
        if self._schedule(peer, now, out):
            return
        if peer.state not in SCHEDULABLE or peer.task.state is TaskState.FAILED:
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

    # ------------------------------------------------------------------ the origin

    def _back_to_source(self, peer: Peer, now: float, out: list[Send], reason: str) -> None:
        task = peer.task
        peer.attempts = 0
        newly_source = task.move(peer, PeerState.BACK_TO_SOURCE)
        peer.back_to_source = True
        if not peer.host.seed:
            task.origin_hosts.add(peer.host.id)
        self.counters.back_to_source += 1
        out.append(Send(peer.host.id, answers.need_back_to_source(peer, reason)))
        out.extend(Send(peer.host.id, m) for m in answers.extra_digests(peer))
        if newly_source:
            self._new_sources.add(peer)

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
            if p.state in SCHEDULABLE and not p.host.bad and p.host.id not in task.origin_hosts:
                self._back_to_source(p, now, out, "origin fetches disagree: a third decides")
                return

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

    def _send_digests(
        self, task: Task, new_digests: list[PieceDigest], reporter: Peer | None, out: list[Send]
    ) -> None:
        """Newly confirmed digests to every downloading peer (the reporter, if any, has
        them)."""
        for p in task.downloading.values():
            if p is not reporter:
                for chunk in answers.digest_chunks(new_digests):
                    out.append(
                        Send(p.host.id, PieceDigests(peer_id=p.id, task_id=task.id, digests=chunk))
                    )

    # ------------------------------------------------------------------ sources and seeds

    def _has_source(self, task: Task, for_peer: Peer | None = None) -> bool:
        """A seed was just asked to fetch the task, or a peer fetching it from the origin
        or holding all of it exists; with ``for_peer``, it must also be live, not blocked
        by that peer and on another host (one that can become its parent as upload slots
        free up: a peer of its own host never does)."""
        if task.seed_host is not None:
            return True
        sources = task.sources
        return any(
            p in sources
            and (
                for_peer is None
                or (
                    p.id not in for_peer.blocklist
                    and p.host is not for_peer.host
                    and p.host.connected
                )
            )
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
            if p.state in SCHEDULABLE and not p.host.bad:
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

    # ------------------------------------------------------------------ the rejoin grace

    def _deferring_any(self, now: float) -> bool:
        return self._rejoin_until is not None and now < self._rejoin_until

    def _deferring(self, task: Task, now: float) -> bool:
        """Within the rejoin grace (the scheduler's, or the task's): the task's source
        is sought once it ends (tick)."""
        if self._deferring_any(now) or now < task.rejoin_until:
            self._deferred[task.id] = task
            return True
        return False

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
            if p is not except_peer and p.state in SCHEDULABLE:
                self._send_task_failed(p, reason, http_status, out)
                self._detach(p, PeerState.FAILED, now, out)

    def _send_task_failed(self, peer: Peer, reason: str, http_status: int, out: list[Send]) -> None:
        self.counters.task_failures += 1
        out.append(Send(peer.host.id, answers.task_failed(peer, reason, http_status)))

    def _detach(self, peer: Peer, state: PeerState, now: float, out: list[Send]) -> None:
        """FAILED or LEAVE: out of every index, its edges released, its children rescheduled."""
        task = peer.task
        was_source = peer in task.sources
        task.move(peer, state)
        peer.attempts = 0
        self._orphan_children(peer, now, out)
        if was_source:
            self._ensure_source(task, now, out)

    def _orphan_children(self, parent: Peer, now: float, out: list[Send]) -> None:
        """The parent can no longer serve: its children lose the edge, and get others
        when the batch ends (``_end_batch``)."""
        for c in parent.drop_children():
            self._orphans.add(c)

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

    def _error(self, out: list[Send], host_id: str, code: str, text: str, msg: Message) -> None:
        self.counters.errors += 1
        out.append(Send(host_id, Error(code=code, message=text[:1024], ref=msg.TAG)))

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

    @staticmethod
    def _set_layout(task: Task, content_length: int, piece_length: int, piece_count: int) -> None:
        task.content_length = content_length
        task.piece_length = piece_length
        if content_length >= 0:
            piece_count = -(-content_length // piece_length)
        task.piece_count = piece_count
        task.metadata_known = True

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
            if peer in task.sources:
                assert peer.state in SERVING and peer.generation == task.generation, peer
        for task in self._tasks.values():
            task.check_indexes()
        for host in self._hosts.values():
            assert host.active_uploads == load.get(host.id, 0), host
        for pid, peer in self._waiting.items():
            assert self._peers.get(pid) is peer and peer.task.waiting.get(pid) is peer, peer


def seed_key(task_id: str, host_id: str) -> bytes:
    """A seed's rank for a task (rendezvous hashing): the live seed ranked highest gets
    the task, here and in preheat jobs (dragonfly/sched/jobs.py)."""
    return hashlib.sha256(f"{task_id}\0{host_id}".encode()).digest()
