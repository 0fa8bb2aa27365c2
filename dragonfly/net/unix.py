"""Unix sockets for local APIs: owner-only listeners, and paths longer than the kernel's
108-byte limit for socket addresses (reached through /proc/self/fd of the directory)."""

from __future__ import annotations

import contextlib
import os
import socket as _socket
import stat
from collections.abc import Iterator
from pathlib import Path

import trio

# sun_path holds 108 bytes with its terminating NUL; leave a margin.
_MAX_PATH = 100


@contextlib.contextmanager
def _reachable(path: Path) -> Iterator[str]:
    """A name for `path` short enough for a socket address, valid inside the block."""
    if len(os.fsencode(path)) <= _MAX_PATH:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


async def open_unix_listener(path: Path, backlog: int = 128) -> trio.SocketListener:
    """Listen on a unix socket at `path`, mode 0600. A socket left there by an earlier
    process is replaced; any other file there is an error (never deleted)."""
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise FileExistsError(f"{path} exists and is not a socket: not replacing it")
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        with _reachable(path) as name:
            await sock.bind(name)
        # Before listen(): nobody can connect yet, so nobody gets in before the mode is set.
        os.chmod(path, 0o600)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


async def open_unix_stream(path: Path) -> trio.SocketStream:
    """Connect to the unix socket at `path` (OSError if nothing listens there)."""
    sock = trio.socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        with _reachable(path) as name:
            await sock.connect(name)
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)
