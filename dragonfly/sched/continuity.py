"""Continuity (issue 12), the scheduler's side (sans-I/O): attestations for finished
peers, and what a (re)connected host says it holds becoming serving peers and pieces.

A peer that finishes a task whose every digest is known gets a ``TaskAttested`` (an
HMAC of the task's layout, digests, private flag and the origin's validators under a
key of the cluster, ``trust.Attester``); when its host reconnects, to this scheduler
restarted or to the next of the ring, it re-announces the task (``HeldTasks``) with that
attestation and becomes a serving peer without anyone going back to the origin. A
download that registers again names the pieces it holds (``RegisterPeer.held``). The
handlers are ``Scheduler``'s (scheduler.py: ``_on_held_tasks``, ``_on_register``); the
rejoin grace that holds back seeds and the origin meanwhile is the core's.
"""

from __future__ import annotations

from dragonfly.identity import IdentityError, piece_length_for
from dragonfly.sched.core import SchedulerCore
from dragonfly.sched.resources import MAX_TRACKED_PIECES, Host, Peer, PeerState, Task, TaskState
from dragonfly.sched.settings import Send
from dragonfly.wire.messages import (
    CONTINUITY_VERSION,
    HeldTask,
    PieceDigest,
    RegisterPeer,
    TaskAttested,
    TaskSpec,
)

__all__ = ["ContinuityCore"]


class ContinuityCore(SchedulerCore):
    """The core, with held tasks and held pieces taken in and finished peers attested."""

    def _attest(self, peer: Peer, out: list[Send]) -> None:
        """A peer that finished a task whose every digest is known gets an attestation
        of them, which it shows when it re-announces the task (HeldTasks). One message
        per task serves every finished peer (it names none): the HMAC over every digest
        is made again only when what it covers changed."""
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
        made_of = (
            task.generation,
            task.content_length,
            task.piece_length,
            len(task.digests),
            task.private,
            task.etag,
            task.last_modified,
        )
        if task.attested is None or task.attested[0] != made_of:
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
            attested = TaskAttested(
                task_id=task.id,
                content_length=facts.content_length,
                piece_length=facts.piece_length,
                private=facts.private,
                etag=facts.etag,
                last_modified=facts.last_modified,
                attestation=self.attester.attest(facts),
            )
            task.attested = (made_of, attested)
        out.append(Send(peer.host.id, task.attested[1]))

    def _adopt_held_pieces(self, peer: Peer, msg: RegisterPeer, out: list[Send]) -> None:
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
        held: list[int] = []
        for piece in msg.held:
            n = piece.number
            if (count >= 0 and n >= count) or n >= MAX_TRACKED_PIECES:
                self.counters.bad_reports += 1
                continue
            known = task.digests.get(n)
            if known is None and trusted and task.metadata_known:
                taken.append(piece)
            elif known is not None and known != piece.digest:
                self.counters.bad_reports += 1
                continue
            held.append(n)
        peer.finished.update(held)
        self._take_digests(task, taken, peer, out)

    def _take_digests(
        self, task: Task, digests: list[PieceDigest], source: Peer | None, out: list[Send]
    ) -> None:
        """Digests from a trusted source become the task's; its downloads hear them."""
        new: list[PieceDigest] = []
        for d in digests:
            if d.number not in task.digests:
                task.digests[d.number] = d.digest
                entry = PieceDigest(number=d.number, digest=d.digest)
                task.digest_list.append(entry)
                new.append(entry)
        if new:
            self._send_digests(task, new, source, out)

    def _adopt_held_task(self, host: Host, held: HeldTask, now: float, out: list[Send]) -> None:
        """One task a host holds whole: a serving peer of it, with the task's layout and
        digests where the scheduler did not know them (only from an attestation, a seed
        peer, or a cluster without identity)."""
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
            task = Task(
                held.task_id,
                held.task if spec_ok else None,
                now,
                waiting_everywhere=self._waiting,
            )
            self._tasks[held.task_id] = task
        if task.state is TaskState.FAILED:
            return
        newly_known = not task.metadata_known
        if newly_known:
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
        self.counters.reannounced += 1
        # Offered to the peers that wait and the hungry when the event ends (_end_batch).
        if task.move(peer, PeerState.SUCCEEDED):
            self._new_sources.add(peer)
        elif newly_known:  # (its host is bad: others may serve them now they know the layout)
            for w in list(task.waiting.values()):
                if task.waiting.get(w.id) is w:
                    self._schedule(w, now, out)


def _spec_makes(spec: TaskSpec, task_id: str) -> bool:
    try:
        return spec.task_id == task_id
    except IdentityError:
        return False
