"""Shared helpers for the scheduler tests: task IDs, digests, a World driving a Scheduler."""

from __future__ import annotations

import hashlib
from typing import Any, TypeVar

from dragonfly.sched.scheduler import Scheduler, SchedulerSettings, Send
from dragonfly.wire.codec import Message, encode
from dragonfly.wire.messages import (
    CandidateParents,
    HostInfo,
    PieceReport,
    PiecesFinished,
    RegisterPeer,
    TaskMetadata,
    TaskSpec,
)

M = TypeVar("M", bound=Message)
PL = 1 << 20  # piece length used throughout (each task names it: the scheduler checks it)
URL = "http://origin/file.bin"
SPECS: dict[str, TaskSpec] = {}  # task ID -> what it is made of


def tid(name: str) -> str:
    """The ID of the test's task called `name` (the scheduler checks IDs against specs)."""
    spec = TaskSpec(url=f"{URL}?task={name}", piece_length=PL)
    SPECS[spec.task_id] = spec
    return spec.task_id


T1, T2, T3 = tid("t1"), tid("t2"), tid("t3")


def digest(n: int, task: str = T1) -> bytes:
    return hashlib.sha256(f"{task}/{n}".encode()).digest()


BAD = b"\xff" * 32


class World:
    """A scheduler, a clock, and shorthands for what hosts send."""

    def __init__(self, settings_: SchedulerSettings | None = None, seed: int = 0) -> None:
        self.s = Scheduler(settings_, seed=seed)
        self.now = 0.0
        self.sent: list[Send] = []

    def _record(self, sends: list[Send]) -> list[Send]:
        for d in sends:
            encode(d.message)  # every decision must be a valid wire message
        self.sent.extend(sends)
        return sends

    def connect(self, name: str, **kw: Any) -> list[Send]:
        info = HostInfo(host_id=name, hostname=name, ip="127.0.0.1", upload_port=4000, **kw)
        return self._record(self.s.host_connected(info, self.now))

    def disconnect(self, name: str) -> list[Send]:
        return self._record(self.s.host_disconnected(name, self.now))

    def send(self, host: str, msg: Message) -> list[Send]:
        return self._record(self.s.handle(host, msg, self.now))

    def tick(self, dt: float = 0.5) -> list[Send]:
        self.now += dt
        return self._record(self.s.tick(self.now))

    def register(self, host: str, peer: str, task: str = T1, **kw: Any) -> list[Send]:
        spec = kw.pop("spec", None) or SPECS[task]
        return self.send(host, RegisterPeer(peer_id=peer, task_id=task, task=spec, **kw))

    def metadata(self, host: str, peer: str, length: int = 10 * PL, task: str = T1) -> list[Send]:
        count = -(-length // PL)
        return self.send(
            host,
            TaskMetadata(
                peer_id=peer,
                task_id=task,
                content_length=length,
                piece_length=PL,
                piece_count=count,
                etag='"v1"',
                content_type="application/octet-stream",
            ),
        )

    def pieces(
        self,
        host: str,
        peer: str,
        numbers: list[int],
        parent: str = "",
        task: str = T1,
        bad: bool = False,
    ) -> list[Send]:
        reports = [
            PieceReport(
                number=n,
                offset=n * PL,
                length=PL,
                digest=BAD if bad else digest(n, task),
                parent_id=parent,
            )
            for n in numbers
        ]
        return self.send(host, PiecesFinished(peer_id=peer, task_id=task, pieces=reports))

    def seeded_task(self, task: str = T1, length: int = 10 * PL) -> None:
        """A seed host, a task fetched by the seed with metadata and piece 0 known."""
        self.connect("seed", seed=True)
        self.register("seed", "s1", task)
        self.metadata("seed", "s1", length, task)
        if length:
            self.pieces("seed", "s1", [0], task=task)


def of(sends: list[Send], cls: type[M], host: str | None = None) -> list[M]:
    return [
        d.message
        for d in sends
        if isinstance(d.message, cls) and (host is None or d.host_id == host)
    ]


def parents_of(msg: CandidateParents) -> list[str]:
    return [p.peer_id for p in msg.parents]
