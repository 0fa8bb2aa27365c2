"""Shared helpers and fixtures for the storage tests: piece contents, a fake clock, a store."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dragonfly.storage import (
    GCConfig,
    PieceStore,
)

KiB = 1024
MiB = 1024 * KiB
TID = "ab" * 32
TID2 = "cd" * 32
TID3 = "ef" * 32


def piece_bytes(task_id: str, n: int, length: int) -> bytes:
    """Deterministic, piece-specific content."""
    block = hashlib.sha256(f"{task_id}/{n}".encode()).digest()
    return (block * (length // 32 + 1))[:length]


def file_bytes(task_id: str, content_length: int, piece_length: int) -> list[bytes]:
    return [
        piece_bytes(task_id, n, min(piece_length, content_length - off))
        for n, off in enumerate(range(0, content_length, piece_length))
    ]


def sha(b: bytes) -> bytes:
    return hashlib.sha256(b).digest()


class FakeClock:
    """Wall-clock stand-in: the store takes time from a callable."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def store(tmp_path: Path, clock: FakeClock) -> AsyncIterator[PieceStore]:
    async with PieceStore.open(
        tmp_path / "data", clock=clock, gc_config=GCConfig(quota_bytes=1 * MiB)
    ) as s:
        yield s
