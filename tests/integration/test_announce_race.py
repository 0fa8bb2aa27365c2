"""A child that subscribes to a parent whose download just finished (issue 16).

The download has set `finished` but its run has not ended yet: it still holds its store
handle while its last messages go to the scheduler. A child subscribing in that gap used
to get AnnounceDone without any PieceAnnounce, so it knew the parent was done but not
that the parent held anything, never asked it for a piece, and waited for good — the
"curl still waiting after 10 minutes" of the issue. The parent must announce every piece
before it says it is done.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import trio

from dragonfly.config import PeerConfig, load_config
from dragonfly.peer.upload import UploadHandler
from dragonfly.storage import PieceStore
from dragonfly.wire.codec import Message
from dragonfly.wire.messages import AnnounceDone, PieceAnnounce

PL = 1 << 20
TASK = "a" * 64


class RecordingChannel:
    """What a parent sends a child, recorded; the child says nothing more."""

    def __init__(self) -> None:
        self.sent: list[Message] = []

    async def send(self, msg: Message) -> None:
        self.sent.append(msg)

    async def receive(self) -> Message:
        await trio.sleep_forever()
        raise AssertionError("unreachable")


async def test_a_child_subscribing_as_the_download_ends_hears_every_piece(tmp_path: Path):
    cfg = load_config("peer", env={}, overrides=["download.piece_timeout=0.2s"])
    assert isinstance(cfg, PeerConfig)
    async with PieceStore.open(tmp_path / "data") as store:
        handle = await store.open_task(
            TASK, url="http://o/f", content_length=3 * PL, piece_length=PL
        )
        for n in range(3):
            data = bytes([n]) * PL
            await store.write_piece(handle, n, data, hashlib.sha256(data).digest())
        await store.complete_task(TASK)
        finished = trio.Event()
        finished.set()
        # The download as it is in the gap: finished, done, its handle not yet released.
        download = SimpleNamespace(done=True, finished=finished, handle=handle)
        tasks = SimpleNamespace(active=lambda task_id: download if task_id == TASK else None)
        daemon = SimpleNamespace(config=cfg, store=store, tasks=tasks)
        channel = RecordingChannel()
        await UploadHandler(daemon)._announce_task(channel, TASK)  # type: ignore[arg-type]
        store.release(handle)
    announced = [p.number for m in channel.sent if isinstance(m, PieceAnnounce) for p in m.pieces]
    assert sorted(announced) == [0, 1, 2]
    assert isinstance(channel.sent[-1], AnnounceDone)
    assert channel.sent.index(channel.sent[-1]) > 0  # the pieces came first
