"""The piece store's batching, flushing, commits, resume and completion checks."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

import pytest
import trio

from dragonfly.storage import (
    DigestMismatch,
    IncompleteTask,
    PieceRecord,
    PieceStore,
    RangeNotAvailable,
    StorageError,
    TaskState,
    UnknownTask,
    task_path,
)
from tests.unit import storage_support
from tests.unit.storage_support import (
    TID,
    TID2,
    TID3,
    KiB,
    file_bytes,
    piece_bytes,
    sha,
)

clock = storage_support.clock  # the shared fixtures
store = storage_support.store

# -- PieceStore -----------------------------------------------------------------------------


async def test_pieces_out_of_order_through_the_store(store: PieceStore) -> None:
    pl, cl = 16 * KiB, 100 * KiB + 5
    pieces = file_bytes(TID, cl, pl)
    h = await store.open_task(TID, url="http://o/x", content_length=cl, piece_length=pl)
    assert h.record.piece_count == len(pieces) == 7
    assert h.file.disk_usage < cl  # sparse
    for n in (6, 2, 0, 5):
        await store.write_piece(h, n, pieces[n], sha(pieces[n]))
    assert store.has_range(TID, 2 * pl, pl)
    assert not store.has_range(TID, 2 * pl, pl + 1)
    assert store.has_range(TID, 5 * pl, cl - 5 * pl)
    fd, off, n = store.read_range(TID, 5 * pl + 10, 100)
    assert os.pread(fd, n, off) == pieces[5][10:110]
    with pytest.raises(RangeNotAvailable):
        store.read_range(TID, pl, 10)
    store.release(h)
    with pytest.raises(RangeNotAvailable, match="not acquired"):
        store.read_range(TID, 0, 10)


async def test_many_piece_done_calls_one_commit(tmp_path: Path) -> None:
    """Without a background flusher, a flush commits everything queued in one hop."""
    store = await PieceStore.create(tmp_path, fsync=False)
    try:
        pl = 1 * KiB
        h = await store.open_task(TID, content_length=200 * pl, piece_length=pl)
        commits: list[int] = []
        real = store._db.commit_batch

        def counting(pieces_by_task, touches=None):  # type: ignore[no-untyped-def]
            commits.append(sum(len(v) for v in pieces_by_task.values()))
            return real(pieces_by_task, touches)

        store._db.commit_batch = counting  # type: ignore[method-assign]
        for n in range(200):
            data = piece_bytes(TID, n, pl)
            h.file.write_at(n * pl, data)
            await store.piece_done(TID, PieceRecord(n, n * pl, pl, sha(data)))
        assert commits == []
        await store.flush()
        assert commits == [200]
        assert len(await store._run_db(store._db.pieces, TID)) == 200
    finally:
        await store.aclose()


async def test_background_flusher_batches(tmp_path: Path) -> None:
    async with PieceStore.open(tmp_path) as store:
        pl = 1 * KiB
        h = await store.open_task(TID, content_length=300 * pl, piece_length=pl)
        commits: list[int] = []
        real = store._db.commit_batch

        def counting(pieces_by_task, touches=None):  # type: ignore[no-untyped-def]
            commits.append(sum(len(v) for v in pieces_by_task.values()))
            return real(pieces_by_task, touches)

        store._db.commit_batch = counting  # type: ignore[method-assign]
        for n in range(300):
            data = piece_bytes(TID, n, pl)
            h.file.write_at(n * pl, data)
            await store.piece_done(h, PieceRecord(n, n * pl, pl, sha(data)))
        await store.flush()
        assert sum(commits) == 300
        assert len(commits) < 100, commits  # batched, not one hop per piece
        store.release(h)


async def test_pieces_are_served_at_once_and_durable_within_sync_delay(tmp_path: Path) -> None:
    """With sync_delay, a verified piece is held (served) at once and neither synced nor
    recorded until the delay passed or someone flushes; a task completed meanwhile is
    complete for the store's readers at once, and in the database with its pieces."""
    pl = 1 * KiB
    pieces = file_bytes(TID, 3 * pl, pl)
    async with PieceStore.open(tmp_path, sync_delay=3600) as store:
        synced: list[int] = []
        h = await store.open_task(TID, content_length=3 * pl, piece_length=pl)
        real_sync = h.file.datasync
        h.file.datasync = lambda: (synced.append(1), real_sync())[1]  # type: ignore[method-assign]
        for n, data in enumerate(pieces):
            await store.write_piece(h, n, data, sha(data))
        assert store.has_range(TID, 0, 3 * pl)  # served at once...
        for _ in range(20):
            await trio.sleep(0.01)
        assert synced == [] and await store._run_db(store._db.pieces, TID) == []  # ...not durable
        rec = await store.complete_task(TID)
        assert rec.state == TaskState.SUCCEEDED and rec.done_bytes == 3 * pl
        stored = await store._run_db(store._db.get_task, TID)
        assert stored is not None and stored.state == TaskState.RUNNING  # not yet in the db
        assert await store.set_attested(TID, "a scheduler's word")  # kept for the mark
        await store.flush()  # someone waits: synced and recorded now, pieces before the mark
        assert synced == [1]
        assert len(await store._run_db(store._db.pieces, TID)) == 3
        stored = await store._run_db(store._db.get_task, TID)
        assert stored is not None and stored.state == TaskState.SUCCEEDED
        assert stored.attested == "a scheduler's word"
        store.release(h)

    async with PieceStore.open(tmp_path, sync_delay=0.05) as store:
        h = await store.open_task(TID2, content_length=pl, piece_length=pl)
        await store.write_piece(h, 0, pieces[0], sha(piece_bytes(TID, 0, pl)))
        for _ in range(500):  # the delay passes: the flusher commits without a waiter
            if await store._run_db(store._db.pieces, TID2):
                break
            await trio.sleep(0.02)
        assert len(await store._run_db(store._db.pieces, TID2)) == 1
        store.release(h)


async def test_idle_files_over_the_cap_close_once_their_pieces_are_flushed(
    tmp_path: Path,
) -> None:
    """Tasks released while their pieces wait for the flush cannot be closed then; the
    flush closes those past the cap of idle open files (a burst of downloads must not
    leave the peer holding more open files than max_idle_handles)."""
    pl = 1 * KiB
    ids = [f"{n:064x}" for n in range(5)]
    async with PieceStore.open(tmp_path, sync_delay=3600, max_idle_handles=2) as store:
        for tid in ids:
            h = await store.open_task(tid, content_length=pl, piece_length=pl)
            data = piece_bytes(tid, 0, pl)
            await store.write_piece(h, 0, data, sha(data))
            store.release(h)
        open_files = [store.handle(tid) for tid in ids]
        assert all(h is not None and not h.detached for h in open_files)  # pinned, kept
        await store.flush()
        assert sum(store.handle(tid) is not None for tid in ids) == 2
        assert sum(h is not None and h.file.closed for h in open_files) == 3


async def test_a_completion_whose_pieces_fail_to_commit_is_undone(tmp_path: Path) -> None:
    """Complete in memory, then the commit of its last pieces fails: the task is running
    again (its pieces are fetched again), never succeeded without its rows."""
    pl = 1 * KiB
    pieces = file_bytes(TID, 2 * pl, pl)
    async with PieceStore.open(tmp_path, sync_delay=3600) as store:
        h = await store.open_task(TID, content_length=2 * pl, piece_length=pl)
        for n, data in enumerate(pieces):
            await store.write_piece(h, n, data, sha(data))
        assert (await store.complete_task(TID)).state == TaskState.SUCCEEDED

        def failing(pieces_by_task, touches=None):  # type: ignore[no-untyped-def]
            raise sqlite3.OperationalError("database is locked")

        real = store._db.commit_batch
        store._db.commit_batch = failing  # type: ignore[method-assign]
        with pytest.raises(StorageError):
            await store.flush()
        store._db.commit_batch = real  # type: ignore[method-assign]
        rec = await store.get_task(TID)
        assert rec is not None and rec.state == TaskState.RUNNING and h.missing() == [0, 1]
        store.release(h)


async def test_a_failed_commit_is_reported_and_retried_until_it_works(tmp_path: Path) -> None:
    """The database refuses a commit (locked, full): the pieces are not recorded, the
    supervisor shows the flusher failing, and the next flush retries the task's use, so
    the flusher learns that the database works again even if nothing else comes."""
    store = await PieceStore.create(tmp_path, fsync=False)
    try:
        pl = 1 * KiB
        h = await store.open_task(TID, content_length=2 * pl, piece_length=pl)
        real = store._db.commit_batch
        seen: list[set[str]] = []

        def failing(pieces_by_task, touches=None):  # type: ignore[no-untyped-def]
            seen.append(set(touches or {}))
            raise sqlite3.OperationalError("database or disk is full")

        store._db.commit_batch = failing  # type: ignore[method-assign]
        data = piece_bytes(TID, 0, pl)
        h.file.write_at(0, data)
        await store.piece_done(h, PieceRecord(0, 0, pl, sha(data)))
        with pytest.raises(StorageError, match="database or disk is full"):
            await store.flush()
        assert not h.is_done(0)  # not recorded: fetched again
        assert store.supervisor.degraded and "store_flush" in store.supervisor.describe()
        store._db.commit_batch = real  # type: ignore[method-assign]
        await store.flush()  # the retried use of TID
        assert not store.supervisor.degraded
        assert seen == [{TID}]
        store.release(h)
    finally:
        await store.aclose()


async def test_resume_after_reopen(tmp_path: Path) -> None:
    pl, cl = 8 * KiB, 64 * KiB
    pieces = file_bytes(TID, cl, pl)
    async with PieceStore.open(tmp_path) as store:
        h = await store.open_task(TID, url="http://o/f", content_length=cl, piece_length=pl)
        for n in (1, 4, 7):
            await store.write_piece(h, n, pieces[n], sha(pieces[n]))
        store.release(h)
    async with PieceStore.open(tmp_path) as store:
        rec = await store.get_task(TID)
        assert rec is not None and rec.state == TaskState.RUNNING
        assert rec.done_bytes == 3 * pl
        h = await store.open_task(TID, url="http://o/f", content_length=cl, piece_length=pl)
        assert h.done == {1, 4, 7}
        assert h.missing() == [0, 2, 3, 5, 6]
        for n in h.missing():
            await store.write_piece(h, n, pieces[n], sha(pieces[n]))
        rec = await store.complete_task(
            TID, "sha256:" + hashlib.sha256(b"".join(pieces)).hexdigest()
        )
        assert rec.state == TaskState.SUCCEEDED
        store.release(h)
    # A succeeded task survives a restart and is served again.
    async with PieceStore.open(tmp_path) as store, store.use(TID) as h:
        assert h.complete
        assert store.has_range(TID, 0, cl)
        fd, off, n = store.read_range(TID, 0, cl)
        assert os.pread(fd, n, off) == b"".join(pieces)


async def test_complete_only_when_every_piece_is_recorded(store: PieceStore) -> None:
    pl, cl = 4 * KiB, 12 * KiB
    pieces = file_bytes(TID, cl, pl)
    h = await store.open_task(TID, content_length=cl, piece_length=pl)
    await store.write_piece(h, 0, pieces[0], sha(pieces[0]))
    await store.write_piece(h, 2, pieces[2], sha(pieces[2]))
    with pytest.raises(IncompleteTask, match="pieces 1 of 3 not recorded") as info:
        await store.complete_task(TID)
    assert info.value.missing == [1]
    rec = await store.get_task(TID)
    assert rec is not None and rec.state == TaskState.RUNNING
    # The database refuses too, whatever the in-memory view says.
    with pytest.raises(IncompleteTask):
        await store._run_db(store._db.mark_succeeded, TID)
    await store.write_piece(h, 1, pieces[1], sha(pieces[1]))
    rec = await store.complete_task(TID)
    assert rec.state == TaskState.SUCCEEDED
    store.release(h)


async def test_bad_piece_is_not_recorded(store: PieceStore) -> None:
    pl = 4 * KiB
    h = await store.open_task(TID, content_length=2 * pl, piece_length=pl)
    good = piece_bytes(TID, 0, pl)
    with pytest.raises(DigestMismatch):
        await store.write_piece(h, 0, b"evil" * (pl // 4), sha(good))
    assert 0 not in h.done
    with pytest.raises(ValueError, match="expected 4096"):
        await store.piece_done(h, PieceRecord(0, 0, 100, sha(good)))
    with pytest.raises(ValueError, match="out of range"):
        await store.piece_done(h, PieceRecord(2, 2 * pl, pl, sha(good)))
    await store.flush()
    assert await store._run_db(store._db.pieces, TID) == []
    store.release(h)


async def test_rewriting_a_done_piece_keeps_the_verified_bytes(store: PieceStore) -> None:
    """Bad bytes for a piece already done used to overwrite the good ones before the
    store noticed the piece was done: the row said "done", the file held garbage."""
    pl = 4 * KiB
    h = await store.open_task(TID, content_length=2 * pl, piece_length=pl)
    good = piece_bytes(TID, 0, pl)
    first = await store.write_piece(h, 0, good, sha(good))
    assert h.is_done(0) and not h.is_done(1)
    again = await store.write_piece(h, 0, b"evil" * (pl // 4), sha(good))
    assert again == first
    assert h.file.read_at(0, pl) == good
    # even with a digest that matches the new bytes: done means done
    other = b"x" * pl
    assert await store.write_piece(h, 0, other, sha(other)) == first
    assert h.file.read_at(0, pl) == good
    await store.flush()
    assert [p.sha256 for p in await store._run_db(store._db.pieces, TID)] == [sha(good)]
    store.release(h)


async def test_concurrent_writes_of_one_piece_leave_verified_bytes(store: PieceStore) -> None:
    pl = 256 * KiB
    h = await store.open_task(TID, content_length=pl, piece_length=pl)
    good = piece_bytes(TID, 0, pl)
    outcomes: list[str] = []

    async def write(data: bytes) -> None:
        try:
            await store.write_piece(h, 0, data, sha(good))
            outcomes.append("ok")
        except DigestMismatch:
            outcomes.append("mismatch")

    async with trio.open_nursery() as nursery:
        for data in (good, b"\0" * pl, good, b"\1" * pl):
            nursery.start_soon(write, data)
    assert h.is_done(0)
    assert h.file.read_at(0, pl) == good
    assert outcomes.count("ok") >= 2  # both good writers; a bad one after them is a no-op
    store.release(h)


async def test_whole_digest_mismatch_fails_and_removes(tmp_path: Path) -> None:
    pl, cl = 4 * KiB, 10 * KiB
    pieces = file_bytes(TID, cl, pl)
    async with PieceStore.open(tmp_path) as store:
        h = await store.open_task(TID, content_length=cl, piece_length=pl)
        for n, data in enumerate(pieces):
            await store.write_piece(h, n, data, sha(data))
        path = h.file.path
        wrong = "sha256:" + "00" * 32
        with pytest.raises(DigestMismatch, match="digest mismatch"):
            await store.complete_task(TID, wrong)
        assert not path.exists()
        rec = await store.get_task(TID)
        assert rec is not None and rec.state == TaskState.FAILED and rec.done_bytes == 0
        assert await store._run_db(store._db.pieces, TID) == []
        with pytest.raises(UnknownTask):
            await store.piece_done(h, PieceRecord(0, 0, pl, sha(pieces[0])))
        store.release(h)
        # Trying again starts from nothing and can succeed.
        h = await store.open_task(TID, content_length=cl, piece_length=pl)
        assert h.done == set() and h.record.state == TaskState.RUNNING
        for n, data in enumerate(pieces):
            await store.write_piece(h, n, data, sha(data))
        good = "sha256:" + hashlib.sha256(b"".join(pieces)).hexdigest()
        assert (await store.complete_task(TID, good)).digest == good
        store.release(h)


async def test_layout_change_restarts_task(store: PieceStore) -> None:
    """Other bytes at the origin: the task starts over, and whoever keeps the old file
    open to serve it (a proxy worker) is told (on_restart), loaded or not."""
    restarted: list[str] = []
    store.on_restart = restarted.append
    pl = 4 * KiB
    data = piece_bytes(TID, 0, pl)
    h = await store.open_task(TID, content_length=2 * pl, piece_length=pl, etag='"v1"')
    await store.write_piece(h, 0, data, sha(data))
    store.release(h)
    h = await store.open_task(TID, content_length=2 * pl, piece_length=pl, etag='"v2"')
    assert h.done == set()
    assert h.record.etag == '"v2"'
    assert restarted == [TID]  # (the handle was loaded)
    await store.write_piece(h, 0, data, sha(data))
    store.release(h)
    await store.flush()
    store._detach(h)  # (no longer loaded: the restart is found in the database)
    store._maybe_close(h)
    h = await store.open_task(TID, content_length=3 * pl, piece_length=pl, etag='"v3"')
    assert h.done == set() and restarted == [TID, TID]
    store.release(h)


async def test_vanished_file_drops_rows_and_orphans_are_removed(tmp_path: Path) -> None:
    async with PieceStore.open(tmp_path) as store:
        for tid in (TID, TID2):
            h = await store.open_task(tid, content_length=4 * KiB, piece_length=4 * KiB)
            data = piece_bytes(tid, 0, 4 * KiB)
            await store.write_piece(h, 0, data, sha(data))
            store.release(h)
    task_path(tmp_path, TID).unlink()
    orphan = task_path(tmp_path, TID3)
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"left behind")
    async with PieceStore.open(tmp_path) as store:
        assert [t.id for t in await store.list_tasks()] == [TID2]
        assert not orphan.exists()
        with pytest.raises(UnknownTask):
            await store.acquire(TID)


async def test_data_dir_is_locked(tmp_path: Path) -> None:
    async with PieceStore.open(tmp_path):
        with pytest.raises(StorageError, match="in use by another process"):
            await PieceStore.create(tmp_path)


async def test_errors_in_body_are_not_wrapped(tmp_path: Path) -> None:
    with pytest.raises(KeyError):
        async with PieceStore.open(tmp_path):
            raise KeyError("boom")
