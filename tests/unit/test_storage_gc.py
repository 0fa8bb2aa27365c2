"""The piece store's eviction, in-use protection, touches, reloads and whole digest."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import trio

from dragonfly.storage import (
    DigestMismatch,
    GCConfig,
    PieceStore,
    StorageError,
    TaskInUse,
    TaskState,
    task_path,
)
from tests.unit import storage_support
from tests.unit.storage_support import (
    TID,
    TID2,
    TID3,
    FakeClock,
    KiB,
    MiB,
    file_bytes,
    piece_bytes,
    sha,
)

clock = storage_support.clock  # the shared fixtures
store = storage_support.store


async def test_in_use_task_never_evicted(store: PieceStore, clock: FakeClock) -> None:
    pl = 64 * KiB
    for tid in (TID, TID2, TID3):
        h = await store.open_task(tid, content_length=4 * pl, piece_length=pl)
        for n in range(4):
            data = piece_bytes(tid, n, pl)
            await store.write_piece(h, n, data, sha(data))
        await store.complete_task(tid)
        store.release(h)
        clock.now += 10
    usage = {u.task_id: u.size_bytes for u in await store.disk_usage()}
    assert all(size >= 4 * pl for size in usage.values())
    async with store.use(TID):  # the oldest one
        with pytest.raises(TaskInUse):
            await store.delete_task(TID)
        # Everything is past its TTL: all but the task in use go.
        removed = await store.run_gc(now=clock.now + 1e6, config=GCConfig(ttl=60))
        assert sorted(removed) == sorted([TID2, TID3])
        assert store.has_range(TID, 0, 4 * pl)
    assert await store.run_gc(now=clock.now + 1e6, config=GCConfig(ttl=60)) == [TID]
    assert await store.list_tasks() == []


async def test_gc_evicts_lru_down_to_low_watermark(store: PieceStore, clock: FakeClock) -> None:
    pl = 128 * KiB
    for tid in (TID, TID2, TID3):
        h = await store.open_task(tid, content_length=2 * pl, piece_length=pl)
        for n in range(2):
            data = piece_bytes(tid, n, pl)
            await store.write_piece(h, n, data, sha(data))
        store.release(h)
        clock.now += 10
    async with store.use(TID):  # touching makes TID the most recently used
        pass
    # 3 x 256 KiB in a 1 MiB quota is 75 %: above a 50 % high watermark, LRU go until <= 30 %.
    cfg = GCConfig(ttl=1e9, quota_bytes=1 * MiB, high_watermark=0.5, low_watermark=0.3)
    removed = await store.run_gc(config=cfg)
    assert removed == [TID2, TID3]
    assert [t.id for t in await store.list_tasks()] == [TID]
    assert not task_path(store.data_dir, TID2).exists()


async def test_empty_file_completes(store: PieceStore) -> None:
    h = await store.open_task(TID, content_length=0, piece_length=4 * MiB)
    assert h.record.piece_count == 0 and h.missing() == []
    rec = await store.complete_task(TID, "sha256:" + hashlib.sha256(b"").hexdigest())
    assert rec.state == TaskState.SUCCEEDED
    assert store.has_range(TID, 0, 0)
    store.release(h)


async def test_unknown_length_then_set(store: PieceStore) -> None:
    pl = 4 * KiB
    pieces = [piece_bytes(TID, 0, pl), piece_bytes(TID, 1, pl), piece_bytes(TID, 2, 100)]
    h = await store.open_task(TID, url="http://o/chunked", piece_length=pl)
    assert (h.record.content_length, h.record.piece_count) == (-1, -1)
    for n, data in enumerate(pieces):
        await store.write_piece(h, n, data, sha(data))
    with pytest.raises(StorageError, match="piece count unknown"):
        await store.complete_task(TID)
    rec = await store.set_content_length(TID, 2 * pl + 100)
    assert rec.piece_count == 3
    assert (await store.complete_task(TID)).state == TaskState.SUCCEEDED
    assert h.file.size == 2 * pl + 100
    store.release(h)


async def test_touch_is_batched(tmp_path: Path, clock: FakeClock) -> None:
    store = await PieceStore.create(tmp_path, clock=clock, fsync=False)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            h = await store.open_task(TID, content_length=10, piece_length=10)
            store.release(h)
            await store.flush()
            hops: list[int] = []
            real = store._db.commit_batch

            def counting(pieces_by_task, touches=None):  # type: ignore[no-untyped-def]
                hops.append(len(touches or {}))
                return real(pieces_by_task, touches)

            store._db.commit_batch = counting  # type: ignore[method-assign]
            for _ in range(50):
                clock.now += 1
                async with store.use(TID):
                    pass
            assert hops == []  # uses alone cause no thread hop...
            await store.flush()  # ...until a flush (or touch_interval) writes them, at once
            assert hops == [1]
            rec = await store._run_db(store._db.get_task, TID)
            assert rec is not None and rec.last_access == clock.now
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()


async def test_reopening_a_loaded_task_updates_it(store: PieceStore) -> None:
    h = await store.open_task(TID, url="http://o/a", piece_length=4 * KiB)
    again = await store.open_task(TID, content_length=10 * KiB, piece_length=4 * KiB, etag='"e"')
    assert again is h and h.users == 2
    assert (h.record.content_length, h.record.piece_count, h.record.etag) == (10 * KiB, 3, '"e"')
    assert h.file.size == 10 * KiB
    rec = await store._run_db(store._db.get_task, TID)
    assert rec is not None and rec.piece_count == 3
    store.release(h)
    store.release(h)
    assert not h.in_use


async def test_new_version_while_old_one_is_read(store: PieceStore) -> None:
    """The origin changed (new ETag) while a reader holds the old task: the task starts
    over in a new file and the reader keeps reading the old bytes, never a mix."""
    pl = 64 * KiB
    old = await store.open_task(TID, content_length=2 * pl, piece_length=pl, etag='"v1"')
    data = piece_bytes(TID, 0, pl)
    await store.write_piece(old, 0, data, sha(data))
    async with store.use(TID) as reader:
        fresh = await store.open_task(TID, content_length=2 * pl, piece_length=pl, etag='"v2"')
        assert fresh is not reader and not fresh.pieces
        assert os.pread(reader.file.fd, pl, 0) == data
        store.release(fresh)
    store.release(old)


async def test_whole_digest_follows_the_prefix_and_stops_when_the_task_goes(
    tmp_path: Path,
) -> None:
    """peer/whole_digest.py: the whole file's digest from the verified prefix as it grows,
    pieces landing out of order; the store takes it instead of hashing the file again,
    and a wrong one fails the task like a wrong file would."""
    from dragonfly.peer.whole_digest import WholeDigest

    pl, cl = 4 * KiB, 10 * KiB
    pieces = file_bytes(TID, cl, pl)
    whole = b"".join(pieces)
    want = "sha256:" + hashlib.sha256(whole).hexdigest()
    async with PieceStore.open(tmp_path) as store:
        h = await store.open_task(TID, content_length=cl, piece_length=pl, digest=want)
        hasher = WholeDigest(store, h)
        for n in (1, 0, 2):  # the prefix: nothing, then two pieces, then the whole
            await store.write_piece(h, n, pieces[n], sha(pieces[n]))
            prefix = pl * next(i for i in range(4) if i not in h.done)
            await hasher.advance(min(prefix, cl))
            assert hasher.hashed == min(prefix, cl)
        digest = await hasher.digest(cl)
        assert digest == hashlib.sha256(whole).digest()
        assert (await store.complete_task(TID, hashed=digest)).digest == want
        store.release(h)
        # a digest that is not the named one fails the task and removes its file
        h = await store.open_task(TID2, content_length=cl, piece_length=pl, digest=want)
        other = file_bytes(TID2, cl, pl)
        for n, data in enumerate(other):
            await store.write_piece(h, n, data, sha(data))
        hasher = WholeDigest(store, h)
        wrong = await hasher.digest(cl)
        with pytest.raises(DigestMismatch):
            await store.complete_task(TID2, hashed=wrong)
        assert not h.file.path.exists()
        # ... and a hasher of a removed task says so instead of reading a closed file
        assert await WholeDigest(store, h).digest(cl) is None
        store.release(h)
