"""What this host holds, announced again to the schedulers that need to hear it.

A scheduler keeps its knowledge in memory: after it restarts, or when a task's place
on the ring moves to the next scheduler because its own went away, nobody there knows
who holds the task, and the next request for it would go to the origin again. So each
time a scheduler connection comes up, this host sends it (HeldTasks, in batches,
before any download may use the connection) every complete task that scheduler now
owns on the ring; and when a connection is lost, the tasks it owned go to the scheduler
that owns them next. Each task carries its digests and the attestation a scheduler gave
for them when this host finished it (TaskAttested, kept with the task), which is what
lets a scheduler believe an ordinary host's digests without asking the origin.

Downloads in flight say what they hold themselves, when they register again
(DownloadMachine.connected).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import trio

from dragonfly.log import get_logger
from dragonfly.peer.scheduler_client import SchedulerConnection, SchedulerLost, SchedulerPool
from dragonfly.redact import redact_url
from dragonfly.storage import PieceStore, TaskRecord
from dragonfly.wire.messages import (
    CONTINUITY_VERSION,
    HELD_PIECES_MAX,
    REMOVAL_VERSION,
    HeldTask,
    HeldTasks,
    TaskAttested,
    TaskSpec,
    TasksRemoved,
)

if TYPE_CHECKING:
    from dragonfly.peer.tasks import TaskManager

log = get_logger("dragonfly.peer.reannounce")

# A batch stays well under the 1 MiB frame; HeldTasks takes at most 1024 tasks.
BATCH_BYTES = 512 * 1024
BATCH_TASKS = 1024


def spec_json(spec: TaskSpec) -> str:
    """A task's spec as kept at rest: its URL without signature or password (a spec
    whose URL lost its signature no longer makes the task's ID; the task is then
    re-announced on its attestation alone)."""
    return json.dumps(
        {
            "url": redact_url(spec.url),
            "tag": spec.tag,
            "application": spec.application,
            "filtered_query_params": spec.filtered_query_params,
            "piece_length": spec.piece_length,
            "digest": spec.digest,
            "scope": spec.scope,
        },
        separators=(",", ":"),
    )


def spec_from_json(text: str) -> TaskSpec | None:
    if not text:
        return None
    try:
        return TaskSpec(**json.loads(text))
    except (ValueError, TypeError):
        return None  # (a damaged row: the task is announced without its spec)


def attested_json(msg: TaskAttested) -> str:
    return json.dumps(
        {
            "content_length": msg.content_length,
            "piece_length": msg.piece_length,
            "private": msg.private,
            "etag": msg.etag,
            "last_modified": msg.last_modified,
            "attestation": msg.attestation.hex(),
        },
        separators=(",", ":"),
    )


def held_task(record: TaskRecord, digests: bytes) -> HeldTask | None:
    """The task as HeldTasks announces it: with the facts its attestation covers, when
    it has one for this layout; else with what this host knows (a seed's word, or a
    cluster without identity, is enough; anyone else's is not)."""
    facts: dict[str, Any] = {}
    if record.attested:
        try:
            facts = json.loads(record.attested)
        except ValueError:
            facts = {}
    if (facts.get("content_length"), facts.get("piece_length")) != (
        record.content_length,
        record.piece_length,
    ):
        facts = {}
    try:
        return HeldTask(
            task_id=record.id,
            task=spec_from_json(record.spec),
            content_length=record.content_length,
            piece_length=record.piece_length,
            digests=digests,
            private=bool(facts.get("private", record.private)),
            etag=str(facts.get("etag", record.etag)),
            last_modified=str(facts.get("last_modified", record.last_modified)),
            attestation=bytes.fromhex(facts.get("attestation", "")),
        )
    except (ValueError, TypeError):
        return None


class Reannouncer:
    """Follows the host's scheduler connections (scheduler_client.ConnectionListener)."""

    def __init__(self, store: PieceStore, pool: SchedulerPool, tasks: TaskManager) -> None:
        self.store = store
        self.pool = pool
        self.tasks = tasks
        self.holds_at_start = False
        # Per scheduler address: the tasks it heard from this host since it connected.
        self._sent: dict[str, set[str]] = {}
        self._moved = trio.Event()  # a connection was lost: its tasks have new owners
        self._removed: set[str] = set()  # tasks the store let go, not yet told
        self._removals = trio.Event()
        self.announced = 0  # tasks sent, for tests and logs

    async def load(self) -> None:
        """Before the schedulers are connected: whether this host holds anything."""
        self.holds_at_start = await self.store.has_complete_tasks(HELD_PIECES_MAX)

    def rejoining(self, conn: SchedulerConnection) -> bool:
        return self.holds_at_start or bool(self.tasks.downloads)

    async def connected(self, conn: SchedulerConnection) -> None:
        self._sent[conn.address] = set()
        await self._announce(only=conn)

    def lost(self, conn: SchedulerConnection) -> None:
        self._sent.pop(conn.address, None)
        self._moved.set()

    async def attested(self, msg: TaskAttested) -> None:
        await self.store.set_attested(msg.task_id, attested_json(msg))

    def removed(self, task_ids: list[str]) -> None:
        """The store let these tasks go (PieceStore.on_removed): run() tells the schedulers."""
        for sent in self._sent.values():
            sent.difference_update(task_ids)
        self._removed.update(task_ids)
        self._removals.set()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._follow_moves)
            nursery.start_soon(self._tell_removals)

    async def _follow_moves(self) -> None:
        """Tasks of a lost scheduler go to the ones that own them now."""
        while True:
            await self._moved.wait()
            self._moved = trio.Event()
            await self._announce(only=None)

    async def _tell_removals(self) -> None:
        """Every connected scheduler hears which tasks this host no longer holds: one that
        still named it as their parent would send children to a host without the bytes.
        (Any scheduler may have heard of the task from this host: a download registers
        with the first one up on the ring, which need not be the owner now.)"""
        while True:
            await self._removals.wait()
            self._removals = trio.Event()
            ids, self._removed = sorted(self._removed), set()
            for conn in list(self.pool.connections.values()):
                channel = conn.channel
                if not conn.up or channel is None or channel.version < REMOVAL_VERSION:
                    continue  # (one that is down hears the host's holdings when it is back)
                for start in range(0, len(ids), BATCH_TASKS):
                    try:
                        await conn.send(TasksRemoved(task_ids=ids[start : start + BATCH_TASKS]))
                    except SchedulerLost:
                        break

    async def _announce(self, only: SchedulerConnection | None) -> None:
        channel = only.channel if only is not None else None
        if only is not None and (channel is None or channel.version < CONTINUITY_VERSION):
            return
        batches: dict[str, list[HeldTask]] = {}
        sizes: dict[str, int] = {}
        for record, digests in await self.store.complete_tasks(HELD_PIECES_MAX):
            owner = self.pool.owner(record.id)
            if owner is None or (only is not None and owner is not only):
                continue
            sent = self._sent.setdefault(owner.address, set())
            if record.id in sent:
                continue
            held = held_task(record, digests)
            if held is None:
                continue
            batch = batches.setdefault(owner.address, [])
            batch.append(held)
            sent.add(record.id)
            sizes[owner.address] = sizes.get(owner.address, 0) + len(digests) + 512
            if len(batch) >= BATCH_TASKS or sizes[owner.address] >= BATCH_BYTES:
                await self._send(owner, batch)
                batches[owner.address], sizes[owner.address] = [], 0
        for address, batch in batches.items():
            if batch:
                await self._send(self.pool.connections[address], batch)

    async def _send(self, conn: SchedulerConnection, batch: list[HeldTask]) -> None:
        channel = conn.channel
        if channel is None or channel.version < CONTINUITY_VERSION:
            return
        try:
            await conn.send(HeldTasks(tasks=batch))
        except SchedulerLost:
            return  # (it is announced again when the connection is back)
        self.announced += len(batch)
        log.info("held tasks announced", scheduler=conn.address, tasks=len(batch))
