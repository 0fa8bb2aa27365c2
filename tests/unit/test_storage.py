"""Task files, the piece store's batching, resume, completion checks and in-use protection."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from dragonfly.net.zerocopy import splice_to_file
from dragonfly.storage import (
    DigestMismatch,
    GCConfig,
    IncompleteBody,
    IncompleteTask,
    PieceRecord,
    PieceStore,
    RangeNotAvailable,
    SplicePipe,
    StorageError,
    TaskFile,
    TaskInUse,
    TaskState,
    UnknownTask,
    task_path,
)
from dragonfly.storage.taskfile import FileHasher

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


# -- TaskFile -------------------------------------------------------------------------------


def test_write_out_of_order_and_read_back(tmp_path: Path) -> None:
    pl = 64 * KiB
    pieces = file_bytes(TID, 4 * pl + 123, pl)
    with TaskFile.open(tmp_path, TID, content_length=4 * pl + 123) as f:
        assert f.path == tmp_path / "tasks" / "ab" / TID
        for n in (3, 0, 4, 2, 1):
            assert f.write_at(n * pl, memoryview(pieces[n])) == len(pieces[n])
        for n, data in enumerate(pieces):
            assert f.read_at(n * pl, len(data)) == data
            assert f.digest(n * pl, len(data)) == sha(data)
        whole = b"".join(pieces)
        assert f.size == len(whole)
        assert f.digest(0, len(whole)) == sha(whole)
        # An unaligned range crossing page and piece boundaries.
        assert f.digest(1000, 70_000) == sha(whole[1000:71_000])
        assert f.digest(5, 0) == sha(b"")
    assert os.stat(tmp_path / "tasks" / "ab" / TID).st_mode & 0o777 == 0o600  # owner only


def test_task_file_is_sparse_until_written(tmp_path: Path) -> None:
    with TaskFile.open(tmp_path, TID, content_length=8 * MiB) as f:
        assert f.size == 8 * MiB
        assert f.disk_usage < 64 * KiB
        f.write_at(4 * MiB, b"x" * (256 * KiB))
        assert 256 * KiB <= f.disk_usage < 1 * MiB


def test_digest_past_end_is_refused(tmp_path: Path) -> None:
    with (
        TaskFile.open(tmp_path, TID, content_length=1000) as f,
        pytest.raises(ValueError, match="past the end"),
    ):
        f.digest(900, 200)


@pytest.mark.parametrize("bad", ["../etc", "a", "", "ab/cd", ".hidden", "x" * 300])
def test_unsafe_task_ids_are_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError):
        task_path(tmp_path, bad)


def test_oci_digest_task_id_is_accepted(tmp_path: Path) -> None:
    p = task_path(tmp_path, "sha256:" + "0" * 64)
    assert p.parent.parent == tmp_path / "tasks"


# -- splice from trio sockets ---------------------------------------------------------------

SocketPair = tuple[trio.socket.SocketType, trio.socket.SocketType]


async def unix_pair() -> SocketPair:
    a, b = trio.socket.socketpair()
    return a, b


async def tcp_pair() -> SocketPair:
    listener = trio.socket.socket()
    with listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = trio.socket.socket()
        await client.connect(listener.getsockname())
        server, _ = await listener.accept()
    return client, server


async def send_all(sock: trio.socket.SocketType, data: bytes, close: bool) -> None:
    view = memoryview(data)
    while view:
        n = await sock.send(view[: 256 * KiB])
        view = view[n:]
    if close:
        sock.close()


@pytest.mark.parametrize("make_pair", [unix_pair, tcp_pair], ids=["unix", "tcp"])
async def test_splice_from_socket_full_length(
    tmp_path: Path, make_pair: Callable[[], SocketPair]
) -> None:
    sender, receiver = await make_pair()
    data = os.urandom(3 * MiB + 7)
    with sender, receiver, TaskFile.open(tmp_path, TID, content_length=4 * MiB) as f:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_all, sender, data, False)
            moved = await f.splice_from_socket(receiver, 1000, len(data))
        assert moved == len(data)
        assert f.digest(1000, len(data)) == sha(data)
        assert f.read_at(0, 1000) == b"\0" * 1000


@pytest.mark.parametrize("make_pair", [unix_pair, tcp_pair], ids=["unix", "tcp"])
async def test_splice_from_socket_peer_closes_early(
    tmp_path: Path, make_pair: Callable[[], SocketPair]
) -> None:
    sender, receiver = await make_pair()
    with receiver, TaskFile.open(tmp_path, TID, content_length=4096) as f, SplicePipe() as pipe:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_all, sender, b"y" * 1000, True)
            with pytest.raises(IncompleteBody, match="connection closed after 1000 of 4096 bytes"):
                await f.splice_from_socket(receiver, 0, 4096, pipe)
        assert pipe.buffered == 0
        assert f.read_at(0, 1000) == b"y" * 1000


@settings(max_examples=40, deadline=None)
@given(
    start=st.integers(0, 5000),
    cuts=st.lists(st.integers(1, 300 * KiB), max_size=8),
    extra=st.integers(0, 3),
)
def test_file_hasher_hashes_what_was_written_in_order(
    tmp_path_factory: pytest.TempPathFactory, start: int, cuts: list[int], extra: int
) -> None:
    """Whatever the sizes of the writes, the digest is the file's bytes of exactly the
    range written; asked for another range, it has none."""
    data = os.urandom(sum(cuts))
    path = tmp_path_factory.mktemp("h") / "f"
    with open(path, "wb+") as f:
        hasher = FileHasher(f.fileno(), start)
        end = start
        for i, cut in enumerate(cuts):
            os.pwrite(f.fileno(), data[end - start : end - start + cut], end)
            end += cut
            hasher.written(end, last=i == len(cuts) - 1)
        assert hasher.digest_of(start, len(data)) == sha(data)
        assert hasher.digest_of(start, len(data) + 1 + extra) is None
        assert hasher.digest_of(start + 1, len(data)) is None


async def test_a_piece_hashed_as_it_lands_needs_no_second_pass(
    store: PieceStore, tmp_path: Path
) -> None:
    """Spliced with hash_as_written, the piece is checked and recorded without a worker
    thread hashing it again; wrong bytes are refused all the same."""
    pl = 512 * KiB
    pieces = file_bytes(TID, 2 * pl, pl)
    h = await store.open_task(TID, content_length=2 * pl, piece_length=pl)
    hops: list[object] = []
    real = store._run_io

    async def counting(fn, *args):  # type: ignore[no-untyped-def]
        hops.append(fn)
        return await real(fn, *args)

    store._run_io = counting  # type: ignore[method-assign]

    async def splice_piece(n: int, expected: bytes) -> PieceRecord | None:
        a, b = trio.socket.socketpair()
        with a, b, SplicePipe() as pipe:
            # (the sink is checked as it ends, outside the nursery)
            async with store.writing(h, n, expected) as sink, trio.open_nursery() as nursery:
                nursery.start_soon(trio.SocketStream(a).send_all, pieces[n])
                hashed = sink.hash_as_written()
                await splice_to_file(b, sink.fd, sink.offset, pl, pipe, on_written=hashed)
        return sink.record

    record = await splice_piece(0, sha(pieces[0]))
    assert record is not None and record.sha256 == sha(pieces[0])
    with pytest.raises(DigestMismatch):
        await splice_piece(1, sha(b"something else"))
    assert hops == []
    assert set(h.pieces) == {0}
    store.release(h)


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
    pl = 4 * KiB
    data = piece_bytes(TID, 0, pl)
    h = await store.open_task(TID, content_length=2 * pl, piece_length=pl, etag='"v1"')
    await store.write_piece(h, 0, data, sha(data))
    store.release(h)
    h = await store.open_task(TID, content_length=2 * pl, piece_length=pl, etag='"v2"')
    assert h.done == set()
    assert h.record.etag == '"v2"'
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
