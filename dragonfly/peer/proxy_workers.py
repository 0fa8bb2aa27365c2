"""The daemon's side of its proxy workers (proxy.workers; the worker itself is
dragonfly/peer/proxy_worker.py).

Each worker is a child process that inherits the proxy's listening socket and one end
of a private socket pair. Over the pair the daemon sends its setup (configuration, own
ports, block list), answers lookups with an open descriptor of a complete, shared task's
file (or no), tells of removed tasks and of a new block list; the worker sends
connections it hands off (with the bytes it read of their request), and once a second
its counts and the tasks it served (which count as a use for GC).

A worker that exits is started again with the supervisor's backoff (the daemon reports
itself degraded meanwhile); the daemon keeps accepting on the port itself, so clients
are served while no worker runs. A stopping daemon closes the pairs: the workers exit.
"""

from __future__ import annotations

import contextlib
import functools
import math
import socket
import sys

import trio

from dragonfly.log import get_logger
from dragonfly.net.fdpass import ChannelClosed, FdChannel
from dragonfly.peer.proxy_worker import FORWARDED_COUNTERS, WorkerSetup
from dragonfly.peer.services import PeerServices
from dragonfly.storage import UnknownTask

log = get_logger("dragonfly.peer.proxy_workers")

# How long a stopping worker may take to exit before it is killed.
STOP_GRACE = 3.0
# Task IDs per "removed" message (a GC pass may remove thousands at once).
REMOVED_PER_MESSAGE = 1000
_BOOT = "import sys; from dragonfly.peer.proxy_worker import main; sys.exit(main(sys.argv[1:]))"
# -P: the daemon's working directory is not put on the worker's import path (a module
# planted there would run as the daemon's user).
_PYTHON = [sys.executable, "-P", "-c", _BOOT]


class WorkerExited(Exception):
    """A proxy worker ended while the daemon runs (restarted with backoff)."""


class ProxyWorkers:
    """The daemon's proxy workers; `handed` yields the connections they give back."""

    def __init__(self, daemon: PeerServices, count: int) -> None:
        self.daemon = daemon
        self.count = count
        self._handed_send, self.handed = trio.open_memory_channel[tuple[trio.SocketStream, bytes]](
            math.inf
        )
        self._channels: set[FdChannel] = set()
        self._nursery: trio.Nursery | None = None

    async def run(self, listeners: list[trio.SocketListener], own_ports: list[int]) -> None:
        """Keep `count` workers running on `listeners` until cancelled."""
        fds = [listener.socket.fileno() for listener in listeners]
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for index in range(self.count):
                    nursery.start_soon(
                        self.daemon.supervisor.restarting,
                        f"proxy worker {index}",
                        functools.partial(self._run_one, index, fds, own_ports),
                    )
        finally:
            self._nursery = None  # (a removal after this has no worker to tell)

    def tell_all(self, message: object) -> None:
        """Send `message` to every running worker (a removal, a new block list)."""
        if self._nursery is None:
            return
        for channel in list(self._channels):
            self._nursery.start_soon(_send_quietly, channel, message)

    def removed(self, task_ids: list[str]) -> None:
        """The store removed these tasks: the workers close their files."""
        ids = list(task_ids)
        for start in range(0, len(ids), REMOVED_PER_MESSAGE):
            self.tell_all(("removed", ids[start : start + REMOVED_PER_MESSAGE]))

    def restarted(self, task_id: str) -> None:
        """The task's bytes start over (the origin changed them): its old file is not
        to be served any more."""
        self.removed([task_id])

    async def _run_one(self, index: int, fds: list[int], own_ports: list[int]) -> None:
        ours, theirs = FdChannel.pair()
        try:
            process = await trio.lowlevel.open_process(
                [*_PYTHON, str(theirs.fileno()), *map(str, fds)],
                pass_fds=(theirs.fileno(), *fds),
            )
        finally:
            theirs.close()
        try:
            gate = self.daemon.proxy_gate
            users = dict(gate.users.users) if gate.users is not None else None
            setup = WorkerSetup(
                index, self.daemon.config, own_ports, self.daemon.block_list, users
            )
            await ours.send(("setup", setup))
            self._channels.add(ours)
            if self.daemon.block_list is not setup.block_list:  # (changed meanwhile)
                await ours.send(("block_list", self.daemon.block_list))
            log.info("proxy worker started", worker=index, pid=process.pid)
            async with trio.open_nursery() as nursery:
                await self._serve(index, ours, nursery)
                nursery.cancel_scope.cancel()
        except ChannelClosed:
            pass
        finally:
            self._channels.discard(ours)
            ours.close()
            with trio.CancelScope(shield=True):
                with trio.move_on_after(STOP_GRACE):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
        raise WorkerExited(f"proxy worker {index} exited with status {process.returncode}")

    async def _serve(self, index: int, channel: FdChannel, nursery: trio.Nursery) -> None:
        """A worker's messages until it closes its end."""
        while True:
            try:
                message, fd = await channel.receive()
            except ChannelClosed:
                return
            kind = message[0] if isinstance(message, tuple) and message else None
            if kind == "connection" and fd is not None and isinstance(message[1], bytes):
                sock = trio.socket.from_stdlib_socket(socket.socket(fileno=fd))
                self._handed_send.send_nowait((trio.SocketStream(sock), message[1]))
                continue
            if fd is not None:
                socket.close(fd)
            if kind == "connection":
                # (the daemon was out of descriptors: the kernel dropped the connection's)
                log.warning("a connection from a proxy worker was lost", worker=index)
                continue
            if kind == "lookup" and isinstance(message[1], str):
                nursery.start_soon(self._answer, channel, message[1])
            elif kind == "stats":
                self._count(index, message[1], message[2])
            else:
                log.warning("a proxy worker sent an unknown message", kind=repr(kind)[:40])

    async def _answer(self, channel: FdChannel, task_id: str) -> None:
        """A complete task everyone may be served, with its file; else no (the worker
        hands the request to the daemon, which decides as it always does)."""
        store = self.daemon.store
        try:
            async with store.use(task_id) as handle:  # (UnknownTask: not held)
                # (complete: every piece verified, the file is never written again;
                # a download that is still winding down does not change its bytes)
                if handle.complete and not handle.record.private:
                    await channel.send(("task", task_id, handle.record), handle.file.fd)
                    return
        except UnknownTask:
            pass
        except ChannelClosed:
            return
        except Exception as exc:  # (out of descriptors, a database error): the daemon's
            log.warning("a proxy worker's lookup failed", task_id=task_id, error=repr(exc))
        await _send_quietly(channel, ("task", task_id, None))

    def _count(self, index: int, gained: object, served: object) -> None:
        """A worker's report: its counts added to the daemon's, its tasks used now."""
        metrics = self.daemon.metrics
        for key, delta in gained.items() if isinstance(gained, dict) else ():
            name, labels = key
            if name in FORWARDED_COUNTERS and isinstance(delta, int | float) and delta > 0:
                getattr(metrics, name).labels(*labels).inc(delta)
                if key == ("proxy_requests", ("p2p",)):  # (a worker's are all local hits)
                    metrics.proxy_worker_requests.labels(str(index)).inc(delta)
        for task_id in served if isinstance(served, list) else ():
            if isinstance(task_id, str):
                self.daemon.store.touch(task_id)


async def _send_quietly(channel: FdChannel, message: object) -> None:
    # (a worker that is gone takes nothing more; its successor starts with an empty cache)
    with contextlib.suppress(ChannelClosed):
        await channel.send(message)
