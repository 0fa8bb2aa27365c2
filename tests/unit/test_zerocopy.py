"""Splicing socket → file in a worker thread: exact bytes, and cancellation that never
leaves a writer behind (even when cancelled before the thread started)."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from dragonfly.net import zerocopy
from dragonfly.net.zerocopy import IncompleteBody, SplicePipe, splice_to_file


async def test_splice_exact_bytes_at_offset(tmp_path: Path) -> None:
    a, b = trio.socket.socketpair()
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    data = os.urandom(3 * 1024 * 1024 + 5)
    with a, b, SplicePipe() as pipe:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.SocketStream(a).send_all, data)
            assert await splice_to_file(b, fd, 100, len(data), pipe) == len(data)
        assert os.pread(fd, len(data), 100) == data
    os.close(fd)


async def test_on_written_follows_the_bytes_into_the_file(tmp_path: Path) -> None:
    """Each call says the file holds the bytes up to `end` (in order, in the thread that
    splices); the last one says all of them are."""
    a, b = trio.socket.socketpair()
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    data = os.urandom(2 * 1024 * 1024 + 3)
    calls: list[tuple[int, bool, bytes]] = []

    def on_written(end: int, last: bool) -> None:
        calls.append((end, last, os.pread(fd, end - 100, 100)))

    with a, b, SplicePipe() as pipe:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.SocketStream(a).send_all, data)
            await splice_to_file(b, fd, 100, len(data), pipe, on_written=on_written)
    os.close(fd)
    ends = [end for end, _, _ in calls]
    assert ends == sorted(ends) and ends[-1] == 100 + len(data)
    assert [last for _, last, _ in calls] == [False] * (len(calls) - 1) + [True]
    assert all(data.startswith(held) for _, _, held in calls)


async def test_short_body_is_named(tmp_path: Path) -> None:
    a, b = trio.socket.socketpair()
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    with b, SplicePipe() as pipe:
        await a.send(b"x" * 10)
        a.close()
        try:
            await splice_to_file(b, fd, 0, 100, pipe)
        except IncompleteBody as exc:
            assert exc.moved == 10 and "10 of 100" in str(exc)
        else:
            raise AssertionError("a closed socket must be an error")
    os.close(fd)


async def test_cancel_before_the_thread_starts_and_mid_splice(tmp_path: Path) -> None:
    a, b = trio.socket.socketpair()
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    limiter = trio.CapacityLimiter(1)
    zerocopy._limiter = limiter
    try:
        await limiter.acquire()  # every splice thread slot is taken
        with a, b, SplicePipe() as pipe:
            with trio.move_on_after(0.2) as waited:
                await splice_to_file(b, fd, 0, 100, pipe)
            assert waited.cancelled_caught  # returned: no hang on a thread that never ran
            limiter.release()
            await a.send(b"x" * 10)
            with trio.move_on_after(0.3) as waited:
                await splice_to_file(b, fd, 0, 100, pipe)
            assert waited.cancelled_caught
            await a.send(b"y" * 100)
            assert await splice_to_file(b, fd, 0, 100, pipe) == 100
            assert os.pread(fd, 100, 0) == b"y" * 100
    finally:
        zerocopy._limiter = None
        os.close(fd)
