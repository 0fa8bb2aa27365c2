"""Messages, each with at most one file descriptor, between a daemon and the worker
processes it started: a unix SOCK_SEQPACKET socket pair (one message per send, never
split or merged; a descriptor travels with SCM_RIGHTS).

The payload is pickled. That is safe here and only here: the pair is made by the daemon
and inherited by its own child, never bound to a path or a port, so no other process
can write to it (and the child runs the daemon's own code as the daemon's user).

A payload too large for one datagram (a long block list, thousands of removed tasks)
travels in an anonymous memory file whose descriptor is the message's; a message that
carries a descriptor of its own must fit in one. A receiver out of descriptors gets the
message without its descriptor (`fd` None) rather than losing the channel.
"""

from __future__ import annotations

import array
import os
import pickle
import socket
from typing import Any

import trio

# The largest message sent as one datagram (a handed-off connection carries the bytes of
# its request: at most ≈ 144 KiB); larger ones go in a memory file. The socket buffers
# are asked for twice this (Linux allows that much at its smallest default limits).
MESSAGE_LIMIT = 192 * 1024
_FD_SPACE = socket.CMSG_SPACE(array.array("i", [0]).itemsize)
_INLINE, _IN_FILE = b"I", b"F"


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
        of the same file or socket). ChannelClosed if the other end is gone; ValueError
        for a message with a descriptor too large for one datagram."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        kind, spill = _INLINE, None
        if len(data) > MESSAGE_LIMIT:
            if fd is not None:
                raise ValueError(f"message of {len(data)} bytes, over {MESSAGE_LIMIT}")
            kind, spill, data = _IN_FILE, _memory_file(data), b""
            fd = spill
        ancillary = []
        if fd is not None:
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
        try:
            async with self._send_lock:
                await self._sock.sendmsg([kind + data], ancillary)
        except (OSError, trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            raise ChannelClosed(str(exc)) from None
        finally:
            if spill is not None:
                os.close(spill)

    async def receive(self) -> tuple[Any, int | None]:
        """The next message and the descriptor that came with it (the caller owns it:
        close it). ChannelClosed when the other end closed."""
        try:
            data, ancillary, flags, _ = await self._sock.recvmsg(
                MESSAGE_LIMIT + 2, _FD_SPACE, socket.MSG_CMSG_CLOEXEC
            )
        except (OSError, trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            raise ChannelClosed(str(exc)) from None
        fds: list[int] = []
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received = array.array("i")
                received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
                fds.extend(received)
        if not data or flags & socket.MSG_TRUNC or len(fds) > 1 or data[:1] not in (
            _INLINE,
            _IN_FILE,
        ):
            for extra in fds:
                os.close(extra)
            raise ChannelClosed("the other end closed" if not data else "a malformed message")
        fd: int | None = fds[0] if fds else None
        if flags & socket.MSG_CTRUNC:
            # (out of descriptors here: the kernel dropped it; the message still counts)
            if fd is not None:
                os.close(fd)
            fd = None
        payload = data[1:]
        if data[:1] == _IN_FILE:
            if fd is None:
                raise ChannelClosed("a large message lost its memory file (out of descriptors)")
            try:
                payload = _read_all(fd)
            finally:
                os.close(fd)
            fd = None
        return pickle.loads(payload), fd

    def close(self) -> None:
        self._sock.close()


def _memory_file(data: bytes) -> int:
    """An anonymous file holding `data`, positioned at its start."""
    fd = os.memfd_create("dragonfly-message", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_all(fd: int) -> bytes:
    parts = []
    while chunk := os.read(fd, 1 << 20):
        parts.append(chunk)
    return b"".join(parts)
