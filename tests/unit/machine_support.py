"""Shared helpers for the download machine tests: parents, candidates, a machine, an opened one."""

from __future__ import annotations

import hashlib
from typing import Any, TypeVar

from dragonfly.engine.actions import (
    Action,
    MachineConfig,
    Send,
)
from dragonfly.engine.machine import DownloadMachine
from dragonfly.wire.messages import (
    CandidateParents,
    ParentInfo,
    PieceDigest,
    TaskSpec,
)

A = TypeVar("A")
PL = 4 << 20
SPEC = TaskSpec(url="http://origin/file.bin")
TASK = SPEC.task_id


def digest(n: int) -> bytes:
    return hashlib.sha256(f"piece {n}".encode()).digest()


def parent(name: str) -> ParentInfo:
    return ParentInfo(peer_id=name, host_id=f"h-{name}", ip="10.0.0.1", upload_port=4000)


def of(actions: list[Action], kind: type[A]) -> list[A]:
    return [a for a in actions if isinstance(a, kind)]


def sent(actions: list[Action], kind: type[A]) -> list[A]:
    return [a.message for a in of(actions, Send) if isinstance(a.message, kind)]  # type: ignore[misc]


def candidates(
    pieces: int, parents: list[str], known: int | None = None, length: int | None = None
) -> CandidateParents:
    return CandidateParents(
        peer_id="me",
        task_id=TASK,
        parents=[parent(p) for p in parents],
        content_length=pieces * PL if length is None else length,
        piece_length=PL,
        piece_count=pieces,
        digests=[PieceDigest(n, digest(n)) for n in range(pieces if known is None else known)],
    )


def machine(**kw: Any) -> DownloadMachine:
    cfg = kw.pop("config", MachineConfig(concurrent_pieces=4, piece_timeout=10.0))
    return DownloadMachine(TASK, "me", SPEC, config=cfg, **kw)


def opened(m: DownloadMachine, pieces: int, parents: list[str], **kw: Any) -> list[Action]:
    """Registered, given parents and the layout, the task opened: the actions so far."""
    out = m.connected(0.0)
    out += m.scheduler_message(candidates(pieces, parents, **kw), 0.0)
    out += m.task_opened({}, 0.0)
    return out
