"""The messages the scheduler core sends to peers, built from what it holds: a peer's
parents with their tickets, the task's digests in messages of bounded size, the
origin, failures.  Pure functions of the resources (sans-I/O); the decisions of when to
send them are the core's (core.py)."""

from __future__ import annotations

from collections.abc import Iterable

from dragonfly.sched.resources import Peer, Task
from dragonfly.wire.messages import (
    CandidateParents,
    NeedBackToSource,
    PieceDigest,
    PieceDigests,
    TaskFailed,
)

__all__ = [
    "DIGESTS_PER_MESSAGE",
    "TICKET_STEP",
    "candidate_parents",
    "digest_chunks",
    "extra_digests",
    "need_back_to_source",
    "task_failed",
    "tickets",
]

# Digests per message: [number, 32 bytes] is ~40 bytes of CBOR, so 8000 stay far below
# the 1 MiB frame and the codec's 10,000-item list limit.
DIGESTS_PER_MESSAGE = 8000
# Ticket expiries are rounded up to this many seconds (see tickets()).
TICKET_STEP = 60


def tickets(
    peer: Peer, parents: list[Peer], now: float, wall_offset: float, ttl: float
) -> tuple[list[bytes], int]:
    """A ticket per parent (none without identity) and their expiry. The expiry is
    rounded up to TICKET_STEP, so the many parent updates of a peer reuse the tickets
    already made for it (a ticket is an HMAC: cheap, but ~14 updates of up to 8 parents
    per registration add up)."""
    if ttl <= 0:
        return [], 0
    expires_at = -(-int(now + wall_offset + ttl) // TICKET_STEP) * TICKET_STEP
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
                b"" if key is None else key.mint(peer.task.id, peer.host.id, p.host.id, expires_at)
            )
            made[p.id] = ticket
        out.append(ticket)
    return out, expires_at


def candidate_parents(
    peer: Peer,
    parents: list[Peer],
    digests: list[PieceDigest],
    ticket_list: list[bytes],
    expires_at: int,
) -> CandidateParents:
    task = peer.task
    return CandidateParents(
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
        tickets=ticket_list,
        ticket_expires_at=expires_at,
        private=task.private,
    )


def need_back_to_source(peer: Peer, reason: str) -> NeedBackToSource:
    task = peer.task
    return NeedBackToSource(
        peer_id=peer.id,
        task_id=task.id,
        reason=reason,
        content_length=task.content_length if task.metadata_known else -1,
        piece_length=task.piece_length,
        digests=task.digest_list[:DIGESTS_PER_MESSAGE],
        etag=task.etag,
        last_modified=task.last_modified,
        private=task.private,
    )


def digest_chunks(items: list[PieceDigest]) -> Iterable[list[PieceDigest]]:
    for i in range(0, len(items), DIGESTS_PER_MESSAGE):
        yield items[i : i + DIGESTS_PER_MESSAGE]


def extra_digests(peer: Peer) -> list[PieceDigests]:
    """The task's digests beyond the first message's DIGESTS_PER_MESSAGE."""
    task: Task = peer.task
    if len(task.digest_list) <= DIGESTS_PER_MESSAGE:
        return []
    return [
        PieceDigests(peer_id=peer.id, task_id=task.id, digests=chunk)
        for chunk in digest_chunks(task.digest_list[DIGESTS_PER_MESSAGE:])
    ]


def task_failed(peer: Peer, reason: str, http_status: int) -> TaskFailed:
    return TaskFailed(
        task_id=peer.task.id, reason=reason[:1024], peer_id=peer.id, http_status=http_status
    )
