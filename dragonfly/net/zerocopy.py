"""Moving bytes between sockets and files without copying them through Python.

trio sockets are non-blocking and trio has no sendfile: these loops call
`os.sendfile` / `os.splice` themselves, wait for readiness on EAGAIN and
checkpoint between chunks so other tasks run and cancellation is honoured.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import trio

F_SETPIPE_SZ = 1031
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


class IncompleteBody(OSError):
    """The other side closed before the announced number of bytes arrived."""

    def __init__(self, message: str, moved: int = 0) -> None:
        super().__init__(message)
        self.moved = moved


def _pipe_max_size() -> int:
    try:
        return int(Path("/proc/sys/fs/pipe-max-size").read_text())
    except (OSError, ValueError):
        return 1 << 20


PIPE_SIZE = min(1 << 20, _pipe_max_size())


class SplicePipe:
    """A pipe enlarged for splicing socket → pipe → file; reusable, close when done."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            self.size = fcntl.fcntl(self.write_fd, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            self.size = 1 << 16
        self.buffered = 0  # bytes in the pipe not yet moved to a file

    def discard(self) -> None:
        """Throw away bytes a failed transfer left in the pipe, so the next one starts empty."""
        while self.buffered > 0:
            try:
                chunk = os.read(self.read_fd, min(self.buffered, 1 << 16))
            except BlockingIOError:
                break
            if not chunk:
                break
            self.buffered -= len(chunk)
        self.buffered = 0

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> SplicePipe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def sendfile_all(
    sock: trio.socket.SocketType,
    fd: int,
    offset: int,
    count: int,
    *,
    write_timeout: float = float("inf"),
) -> int:
    """Send `count` bytes of file `fd` from `offset` on `sock` with os.sendfile.

    Raises IncompleteBody if the file is shorter than `count`, trio.TooSlowError if
    the socket stays unwritable for `write_timeout` seconds (a peer that stopped
    reading). Socket errors (BrokenPipeError, ConnectionResetError...) propagate.
    The caller must be the only task sending on `sock`.
    """
    sent_total = 0
    out_fd = sock.fileno()
    if count >= _BIG_SEND:
        _widen_send_buffer(sock)
    while sent_total < count:
        try:
            sent = os.sendfile(out_fd, fd, offset + sent_total, count - sent_total)
        except BlockingIOError:
            with trio.fail_after(write_timeout):
                await trio.lowlevel.wait_writable(sock)
            continue
        if sent == 0:
            raise IncompleteBody(
                f"file ended after {sent_total} of {count} bytes at offset {offset}"
            )
        sent_total += sent
        if sent_total < count:
            # (not after the last send: a small body then costs no trip through the
            # event loop; whoever sends the next one has waited for a request to do so)
            await trio.lowlevel.checkpoint()
    return sent_total


# A send buffer of at least this much for large bodies: on a link capped below the
# machine's speed (a rate-limited peer, a shaped network) the kernel's small default
# buffer wakes the sender every few kilobytes, and each wakeup is a trip through the
# event loop; with 1 MiB it is a few dozen a second.
_BIG_SEND = 256 * 1024
_SEND_BUFFER = 1 << 20


def _widen_send_buffer(sock: trio.socket.SocketType) -> None:
    with contextlib.suppress(OSError):
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < _SEND_BUFFER:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER)


async def splice_to_file(
    sock: trio.socket.SocketType,
    fd: int,
    offset: int,
    count: int,
    pipe: SplicePipe,
    *,
    read_timeout: float = float("inf"),
    on_written: Callable[[int, bool], None] | None = None,
) -> int:
    """Move exactly `count` bytes from `sock` into file `fd` at `offset` via a pipe.

    `on_written(end, last)`, when given, is called in the worker thread each time the file
    holds the bytes up to offset `end` (`last`: all `count` of them), e.g. to hash them
    while they are hot in the cache; an exception from it fails the call.

    The splicing runs in a worker thread: both copies (socket → pipe → page cache)
    then overlap with the event loop's own sends on another core. Cancellation
    stops the thread within a poll interval, and this call returns only after it
    stopped, so no write to the file outlives the caller.

    Raises IncompleteBody if the socket closes or is reset first (with the bytes
    moved so far; a reset chains the ConnectionError as its cause),
    trio.TooSlowError if no byte arrives for `read_timeout` seconds. Bytes a
    failed call leaves in the pipe are discarded by the next call.
    """
    pipe.discard()
    stop = threading.Event()
    stopped = trio.Event()
    token = trio.lowlevel.current_trio_token()
    lock = threading.Lock()
    started = False

    def work() -> int:
        nonlocal started
        with lock:
            if stop.is_set():  # cancelled before the thread got going: do nothing
                raise _Stopped()
            started = True
        try:
            return _splice_blocking(
                sock.fileno(), fd, offset, count, pipe, read_timeout, stop, on_written
            )
        finally:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(stopped.set)

    try:
        return await trio.to_thread.run_sync(
            work, abandon_on_cancel=True, limiter=_splice_limiter()
        )
    except trio.Cancelled:
        with lock:
            stop.set()
            running = started
        if running:  # wait until the thread wrote its last byte
            with trio.CancelScope(shield=True):
                await stopped.wait()
        raise


_SPLICE_THREADS = 64
_limiter: trio.CapacityLimiter | None = None


def _splice_limiter() -> trio.CapacityLimiter:
    """Splices get threads of their own: waiting for trio's shared pool behind other
    work would stall the data path."""
    global _limiter
    if _limiter is None:
        _limiter = trio.CapacityLimiter(_SPLICE_THREADS)
    return _limiter


_POLL_SECONDS = 0.05


class _Stopped(Exception):
    pass


def _splice_blocking(
    in_fd: int,
    fd: int,
    offset: int,
    count: int,
    pipe: SplicePipe,
    read_timeout: float,
    stop: threading.Event,
    on_written: Callable[[int, bool], None] | None = None,
) -> int:
    """The splice loop for a worker thread, on a non-blocking socket: waits with poll,
    in short slices so `stop` is seen promptly."""
    poller = select.poll()
    poller.register(in_fd, select.POLLIN | select.POLLERR | select.POLLHUP)
    moved = 0
    idle_since = time.monotonic()
    lowat = 1
    try:
        while moved < count:
            if stop.is_set():
                raise _Stopped()
            if pipe.buffered == 0:
                try:
                    n = os.splice(
                        in_fd, pipe.write_fd, min(pipe.size, count - moved), flags=_SPLICE_FLAGS
                    )
                except BlockingIOError:
                    if time.monotonic() - idle_since > read_timeout:
                        raise trio.TooSlowError from None
                    # Wake once a good batch waits (or the rest of the body): a body
                    # arriving at a capped rate would otherwise wake this loop for every
                    # packet. (poll still times out in a slice: no batch is ever missed.)
                    want = min(_RECV_BATCH, count - moved)
                    if want != lowat:
                        lowat = _set_rcvlowat(in_fd, want)
                    poller.poll(int(_POLL_SECONDS * 1000))
                    continue
                except ConnectionError as exc:
                    raise IncompleteBody(
                        f"connection broken after {moved} of {count} bytes: {exc}", moved
                    ) from exc
                if n == 0:
                    raise IncompleteBody(f"connection closed after {moved} of {count} bytes", moved)
                pipe.buffered = n
                idle_since = time.monotonic()
            # The file side never blocks; SPLICE_F_NONBLOCK only concerns the pipe.
            while pipe.buffered:
                written = os.splice(
                    pipe.read_fd, fd, pipe.buffered, offset_dst=offset + moved, flags=_SPLICE_FLAGS
                )
                pipe.buffered -= written
                moved += written
            if on_written is not None:
                on_written(offset + moved, moved == count)
    finally:
        if lowat != 1:
            _set_rcvlowat(in_fd, 1)  # the connection is reused for the next response
    return moved


_RECV_BATCH = 256 * 1024


def _set_rcvlowat(fd: int, value: int) -> int:
    """SO_RCVLOWAT on a socket given by fd; returns what is now in force."""
    try:
        s = socket.socket(fileno=fd)
    except OSError:
        return 1
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, value)
        return value
    except OSError:
        return 1
    finally:
        s.detach()  # the fd belongs to the caller's socket


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """os.pwrite until every byte is written (pwrite may write less)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n
