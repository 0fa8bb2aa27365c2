"""Messages, each with at most one file descriptor, between a daemon and the worker
processes it started: a unix SOCK_SEQPACKET socket pair (one message per send, never
split or merged; a descriptor travels with SCM_RIGHTS).

The payload is pickled. That is safe here and only here: the pair is made by the daemon
and inherited by its own child, never bound to a path or a port, so no other process
can write to it (and the child runs the daemon's own code as the daemon's user).
"""

from __future__ import annotations

import array
import os
import pickle
import socket
from typing import Any

import trio

# The largest message (a handed-off connection carries the bytes of its request).
MESSAGE_LIMIT = 512 * 1024
_FD_SPACE = socket.CMSG_SPACE(array.array("i", [0]).itemsize)


class ChannelClosed(Exception):
    """The other end closed the pair (it exited, or is stopping this one)."""


class FdChannel:
    """One end of a socket pair carrying pickled messages and descriptors."""

    def __init__(self, sock: socket.socket) -> None:
        # A message may be as large as MESSAGE_LIMIT: the kernel's default buffer is not.
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, 2 * MESSAGE_LIMIT)
        self._sock = trio.socket.from_stdlib_socket(sock)
        self._send_lock = trio.Lock()

    @classmethod
    def pair(cls) -> tuple[FdChannel, socket.socket]:
        """This process's end, and the other end (inheritable, for a child's pass_fds)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        theirs.set_inheritable(True)
        return cls(ours), theirs

    @classmethod
    def from_fd(cls, fd: int) -> FdChannel:
        """The end a parent passed down as descriptor `fd`."""
        sock = socket.socket(fileno=fd)
        sock.set_inheritable(False)
        return cls(sock)

    async def send(self, message: Any, fd: int | None = None) -> None:
        """Send one message (with `fd`, which the other end receives as a new descriptor
        of the same file or socket). ChannelClosed if the other end is gone."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        if len(data) > MESSAGE_LIMIT:
            raise ValueError(f"message of {len(data)} bytes, over {MESSAGE_LIMIT}")
        ancillary = []
        if fd is not None:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
        async with self._send_lock:
            try:
                await self._sock.sendmsg([data], ancillary)
            except (BrokenPipeError, ConnectionResetError, OSError) as exc:
                raise ChannelClosed(str(exc)) from None

    async def receive(self) -> tuple[Any, int | None]:
        """The next message and the descriptor that came with it (the caller owns it:
        close it). ChannelClosed when the other end closed."""
        try:
            data, ancillary, flags, _ = await self._sock.recvmsg(
                MESSAGE_LIMIT + 1, _FD_SPACE, socket.MSG_CMSG_CLOEXEC
            )
        except (ConnectionResetError, OSError) as exc:
            raise ChannelClosed(str(exc)) from None
        fds: list[int] = []
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received = array.array("i")
                received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
                fds.extend(received)
        if not data:
            for fd in fds:
                os.close(fd)
            raise ChannelClosed("the other end closed")
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(fds) > 1:
            for fd in fds:
                os.close(fd)
            raise ChannelClosed("a message was cut short (over the size limit)")
        return pickle.loads(data), (fds[0] if fds else None)

    def close(self) -> None:
        self._sock.close()
