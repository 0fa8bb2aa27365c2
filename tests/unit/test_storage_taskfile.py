"""Task files, splicing from sockets into them, and hashing as pieces land."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from dragonfly.net.zerocopy import splice_to_file
from dragonfly.storage import (
    DigestMismatch,
    IncompleteBody,
    PieceRecord,
    PieceStore,
    SplicePipe,
    TaskFile,
    task_path,
)
from dragonfly.storage.taskfile import FileHasher
from tests.unit import storage_support
from tests.unit.storage_support import (
    TID,
    KiB,
    MiB,
    file_bytes,
    sha,
)

clock = storage_support.clock  # the shared fixtures
store = storage_support.store

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
