"""Load generator of `python -m benchmarks scheduler`: simulated hosts on real websockets.

One worker program (run by benchmarks/scheduler.py) with its own epoll loop instead of
trio's; the websocket framing, the handshake and the host's messages are in
benchmarks/scheduler_wire.py.

One process drives a slice of the simulated hosts, each host on its own websocket to
the scheduler, from one epoll loop. The websocket framing is written by hand, in
benchmarks/scheduler_wire.py (RFC 6455: an HTTP/1.1 upgrade with a checked
Sec-WebSocket-Accept, then binary frames, every client frame masked with a fresh key
as the RFC requires), and the messages are the
project's CBOR wire messages. The load is deliberately lighter than a real peer (no
trio, no wsproto, the scheduler's answers are decoded but not validated) so that on a
2-core machine the scheduler, not the load, is the bottleneck.

Protocol with the parent (benchmarks/scheduler.py): once every host of this worker has
finished its handshake (websocket upgrade, then Hello both ways), the worker prints
`ready`; the parent writes `go START` on stdin, START a time.monotonic() value (one
clock for every process on Linux); the worker runs until START + warmup + duration,
lets every outstanding registration finish (bounded by --drain), says LeaveHost,
closes every websocket cleanly and prints one JSON line of results.

Each host proves a credential as a real peer does (the worker makes them from the
cluster secret of --secret-file, as `dragonfly cluster` does), so the figures include
the handshake's and the tickets' cost; without --secret-file the scheduler must run
with trust.insecure.

A plain host runs --peers-per-host download slots; each slot loops as fast as it can:
  RegisterPeer (a random task) -> CandidateParents (or NeedBackToSource)
  -> PiecesFinished x ceil(pieces / batch), each piece naming one of the offered parents
  -> PeerFinished -> LeavePeer -> RegisterPeer for another task ...
A back-to-source answer is served as a real peer would: TaskMetadata, pieces with the
origin's digests, PeerFinished, LeavePeer. A seed host answers each TriggerDownload at
once: RegisterPeer -> NeedBackToSource -> TaskMetadata -> PiecesFinished (the origin
digests, in batches) -> PeerFinished, and then keeps the task and serves it.

python -m benchmarks.scheduler_load --port P --worker 0 --workers 2 ... (see main())
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any

import cbor2

from benchmarks.scheduler_wire import (
    SimTask,
    client_frame,
    handshake,
    host_info,
    make_tasks,
    parse_frames,
    peek_candidates,
    pieces_payload,
    self_check,
)
from dragonfly.credentials import read_secret_file
from dragonfly.trust import issue
from dragonfly.wire.codec import Message, encode
from dragonfly.wire.messages import (
    HostInfo,
    LeaveHost,
    LeavePeer,
    PeerFinished,
    RegisterPeer,
    TaskMetadata,
)

BIN = 0.1  # seconds per bin of the throughput time series
_RECV = 1 << 18


# ---------------------------------------------------------------------------
# The worker
# ---------------------------------------------------------------------------


class SimHost:
    __slots__ = ("closed", "fd", "index", "info", "out", "rbuf", "seed", "sock", "wbuf")

    def __init__(
        self, index: int, seed: bool, info: HostInfo, sock: socket.socket, rest: bytes
    ) -> None:
        self.index = index
        self.seed = seed
        self.info = info
        self.sock = sock
        self.fd = sock.fileno()
        self.rbuf = bytearray(rest)
        self.out: list[bytes] = []  # frames queued in this loop turn, sent in one write
        self.wbuf = b""  # what the kernel did not take yet
        self.closed = False


@dataclass
class Pending:
    host: SimHost
    task: SimTask
    sent: float


class Counts:
    """What this worker sent and received; the parent adds the workers up."""

    def __init__(self) -> None:
        self.c: dict[str, int] = {
            "registrations": 0,  # RegisterPeer sent (plain and seed hosts)
            "seed_registrations": 0,
            "pieces": 0,  # piece reports sent (pieces inside PiecesFinished)
            "pieces_messages": 0,
            "finished": 0,  # PeerFinished sent
            "left": 0,  # LeavePeer sent
            "candidate_answers": 0,  # first answer CandidateParents
            "back_to_source_answers": 0,  # first answer NeedBackToSource
            "parent_updates": 0,  # later CandidateParents (parent set changed)
            "piece_digests": 0,
            "attestations": 0,  # TaskAttested: a finished peer's proof (protocol 5)
            "triggers": 0,
            "task_failed": 0,
            "errors": 0,  # Error messages from the scheduler
            "unexpected": 0,  # anything else, or an answer for an unknown peer
            "closed_by_scheduler": 0,
            "frames_sent": 0,
            "frames_received": 0,
            "bytes_sent": 0,
            "bytes_received": 0,
        }
        self.error_samples: list[str] = []

    def __getitem__(self, key: str) -> int:
        return self.c[key]

    def add(self, key: str, n: int = 1) -> None:
        self.c[key] += n


class Worker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tasks = make_tasks(args.tasks, args.pieces)
        self.by_id = {t.task_id: t for t in self.tasks}
        self.rng = random.Random(args.rng_seed * 1000 + args.worker)
        self.counts = Counts()
        self.hosts: dict[int, SimHost] = {}  # by fd
        self.pending: dict[str, Pending] = {}  # peer id -> its registration awaiting an answer
        self.seq = 0
        self.dirty: set[SimHost] = set()
        self.ep = select.epoll()
        self.start = 0.0
        self.window = (0.0, 0.0)
        self.stopping = False
        self.latencies: list[float] = []  # seconds, registrations sent inside the window
        self.bins: dict[str, list[int]] = {"answers": [], "pieces": [], "registrations": []}

    # -- set-up -------------------------------------------------------------------

    def connect(self) -> None:
        a = self.args
        mine = [(i, False) for i in range(a.worker, a.hosts, a.workers)]
        mine += [(i, True) for i in range(a.worker, a.seed_hosts, a.workers)]
        ring = read_secret_file(a.secret_file) if a.secret_file else None
        for index, seed in mine:
            info = host_info(index, seed, a.seed_upload_slots)
            role = "seed-peer" if seed else "peer"
            credential = None
            if ring is not None:
                credential = issue(
                    ring, host_id=info.host_id, role=role, now=time.time(), ttl=86400
                )
            sock, rest = handshake(a.port, info, role, a.timeout, credential)
            sock.setblocking(False)
            h = SimHost(index, seed, info, sock, rest)
            self.hosts[h.fd] = h
            self.ep.register(h.fd, select.EPOLLIN)

    # -- sending ------------------------------------------------------------------

    def _queue(self, h: SimHost, payload: bytes) -> None:
        h.out.append(client_frame(payload, rng=self.rng))
        self.dirty.add(h)
        self.counts.add("frames_sent")

    def _send(self, h: SimHost, msg: Message) -> None:
        self._queue(h, encode(msg))

    def _flush(self) -> None:
        for h in self.dirty:
            if h.closed:
                continue
            data = b"".join(h.out)
            h.out.clear()
            self.counts.add("bytes_sent", len(data))
            if h.wbuf:
                h.wbuf += data
                continue
            try:
                sent = h.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._lost(h)
                continue
            if sent < len(data):
                h.wbuf = data[sent:]
                self.ep.modify(h.fd, select.EPOLLIN | select.EPOLLOUT)
        self.dirty.clear()

    def _writable(self, h: SimHost) -> None:
        try:
            sent = h.sock.send(h.wbuf)
        except BlockingIOError:
            return
        except OSError:
            self._lost(h)
            return
        h.wbuf = h.wbuf[sent:]
        if not h.wbuf:
            self.ep.modify(h.fd, select.EPOLLIN)

    def _bin(self, name: str, t: float, n: int = 1) -> None:
        i = int((t - self.start) / BIN)
        if i < 0:
            return
        series = self.bins[name]
        if i >= len(series):
            series.extend([0] * (i + 1 - len(series)))
        series[i] += n

    # -- the simulated peers --------------------------------------------------------

    def register(self, h: SimHost, task: SimTask, now: float) -> None:
        self.seq += 1
        peer_id = f"{h.info.host_id}-{'seed' if h.seed else 'peer'}-{self.seq}"
        self._send(h, RegisterPeer(peer_id=peer_id, task_id=task.task_id, task=task.spec))
        self.pending[peer_id] = Pending(h, task, now)
        self.counts.add("registrations")
        if h.seed:
            self.counts.add("seed_registrations")
        self._bin("registrations", now)

    def _next(self, h: SimHost, now: float) -> None:
        if not self.stopping:
            self.register(h, self.tasks[self.rng.randrange(len(self.tasks))], now)

    def _report(
        self, h: SimHost, peer_id: str, task: SimTask, parents: list[str], t: float
    ) -> None:
        """Every piece, in batches, then PeerFinished."""
        batch = self.args.batch
        for first in range(0, task.piece_count, batch):
            last = min(first + batch, task.piece_count)
            self._queue(h, pieces_payload(peer_id, task, first, last, parents))
            self.counts.add("pieces", last - first)
            self.counts.add("pieces_messages")
        self._bin("pieces", t, task.piece_count)
        self._send(
            h,
            PeerFinished(
                peer_id=peer_id,
                task_id=task.task_id,
                content_length=task.content_length,
                piece_count=task.piece_count,
            ),
        )
        self.counts.add("finished")

    def _from_origin(self, h: SimHost, peer_id: str, task: SimTask, now: float) -> None:
        self._send(
            h,
            TaskMetadata(
                peer_id=peer_id,
                task_id=task.task_id,
                content_length=task.content_length,
                piece_length=task.piece_length,
                piece_count=task.piece_count,
                etag=f'"{task.task_id[:16]}"',
                content_type="application/octet-stream",
            ),
        )
        self._report(h, peer_id, task, [""], now)  # "" = fetched from the origin

    def _leave(self, h: SimHost, peer_id: str, task: SimTask) -> None:
        self._send(h, LeavePeer(peer_id=peer_id, task_id=task.task_id))
        self.counts.add("left")

    def on_message(self, h: SimHost, payload: bytes, now: float) -> None:
        peer_id = peek_candidates(payload)
        if peer_id is not None and peer_id not in self.pending:
            self.counts.add("parent_updates")
            return
        msg = cbor2.loads(payload)
        tag = msg.get("t") if type(msg) is dict else None
        c = self.counts
        if tag == "candidate_parents":
            peer_id = msg["peer_id"]
            p = self.pending.pop(peer_id, None)
            if p is None:
                c.add("parent_updates")
                return
            if now >= self.window[0] and p.sent >= self.window[0] and p.sent < self.window[1]:
                self.latencies.append(now - p.sent)
            c.add("candidate_answers")
            self._bin("answers", now)
            parents = [x["peer_id"] for x in msg["parents"]] or [""]
            self._report(h, peer_id, p.task, parents, now)
            self._leave(h, peer_id, p.task)
            self._next(h, now)
        elif tag == "need_back_to_source":
            peer_id = msg["peer_id"]
            p = self.pending.pop(peer_id, None)
            if p is None:
                c.add("unexpected")
                return
            c.add("back_to_source_answers")
            self._bin("answers", now)
            self._from_origin(h, peer_id, p.task, now)
            if not h.seed:  # a seed keeps the task and serves it
                self._leave(h, peer_id, p.task)
                self._next(h, now)
        elif tag == "piece_digests":
            c.add("piece_digests")
        elif tag == "task_attested":
            c.add("attestations")
        elif tag == "trigger_download":
            c.add("triggers")
            task = self.by_id.get(msg["task_id"])
            if h.seed and task is not None:
                self.register(h, task, now)
            else:
                c.add("unexpected")
        elif tag == "task_failed":
            c.add("task_failed")
            p = self.pending.pop(msg.get("peer_id", ""), None)
            if p is not None and not h.seed:
                self._next(h, now)
        elif tag == "error":
            c.add("errors")
            if len(c.error_samples) < 5:
                c.error_samples.append(f"{msg.get('code')}: {msg.get('message')}")
        else:
            c.add("unexpected")

    def _readable(self, h: SimHost, now: float) -> None:
        try:
            data = h.sock.recv(_RECV)
        except BlockingIOError:
            return
        except OSError:
            self._lost(h)
            return
        if not data:
            self._lost(h)
            return
        self.counts.add("bytes_received", len(data))
        buf = h.rbuf
        buf += data
        frames, used = parse_frames(buf)
        del buf[:used]
        for opcode, payload in frames:
            self.counts.add("frames_received")
            if opcode == 0x2:
                self.on_message(h, payload, now)
            elif opcode == 0x9:  # ping: pong with the same payload
                h.out.append(client_frame(payload, 0xA, self.rng))
                self.dirty.add(h)
            elif opcode == 0x8:
                self._lost(h)
                return

    def _lost(self, h: SimHost) -> None:
        if h.closed:
            return
        h.closed = True
        if not self.stopping:
            self.counts.add("closed_by_scheduler")
        self.ep.unregister(h.fd)
        h.sock.close()
        for peer_id in [k for k, p in self.pending.items() if p.host is h]:
            del self.pending[peer_id]

    # -- the run --------------------------------------------------------------------

    def run(self, start: float) -> None:
        a = self.args
        self.start = start
        self.window = (start + a.warmup, start + a.warmup + a.duration)
        end = self.window[1]
        while time.monotonic() < start:
            time.sleep(min(0.01, max(0.0, start - time.monotonic())))
        now = time.monotonic()
        for h in list(self.hosts.values()):
            if not h.seed:
                for _ in range(a.peers_per_host):
                    self._next(h, now)
        self._flush()
        drain_until = end + a.drain
        while True:
            now = time.monotonic()
            if now >= end and not self.stopping:
                self.stopping = True
            if self.stopping and (not self.pending or now >= drain_until):
                break
            timeout = min(max(end - now, 0.0), 0.05) if not self.stopping else 0.05
            for fd, ev in self.ep.poll(timeout):
                h = self.hosts[fd]
                if h.closed:
                    continue
                if ev & select.EPOLLOUT:
                    self._writable(h)
                if ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                    self._readable(h, now)
            self._flush()
        self.stopping = True
        self.close()

    def close(self) -> None:
        """LeaveHost and a close frame on every websocket, then wait (briefly) for the
        scheduler to close its side, so nothing sent is lost to a reset."""
        for h in self.hosts.values():
            if not h.closed:
                self._send(h, LeaveHost(host_id=h.info.host_id))
                h.out.append(client_frame((1000).to_bytes(2, "big"), 0x8, self.rng))
        self._flush()
        open_ = {h.fd: h for h in self.hosts.values() if not h.closed}
        deadline = time.monotonic() + 5.0
        while open_ and time.monotonic() < deadline:
            for fd, ev in self.ep.poll(0.05):
                h = open_.get(fd)
                if h is None:
                    continue
                if ev & select.EPOLLOUT and h.wbuf:
                    self._writable(h)
                    continue
                try:
                    data = h.sock.recv(_RECV)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    del open_[fd]
                    h.closed = True
                    self.ep.unregister(fd)
                    h.sock.close()
        for h in open_.values():
            h.sock.close()

    def result(self) -> dict[str, Any]:
        return {
            "worker": self.args.worker,
            "pid": os.getpid(),
            "hosts": sum(1 for h in self.hosts.values() if not h.seed),
            "seed_hosts": sum(1 for h in self.hosts.values() if h.seed),
            "counts": self.counts.c,
            "unanswered": len(self.pending),
            "unanswered_samples": [
                f"{pid} (task {p.task.index}, sent at +{p.sent - self.start:.2f} s)"
                for pid, p in list(self.pending.items())[:5]
            ],
            "error_samples": self.counts.error_samples,
            "latencies": [round(x, 6) for x in self.latencies],
            "bins": self.bins,
        }


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scheduler_load")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--worker", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--hosts", type=int, default=1000)
    p.add_argument("--seed-hosts", type=int, default=4)
    p.add_argument("--tasks", type=int, default=100)
    p.add_argument("--pieces", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--peers-per-host", type=int, default=1)
    p.add_argument("--seed-upload-slots", type=int, default=1000)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--drain", type=float, default=15.0)
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--rng-seed", type=int, default=1)
    p.add_argument("--secret-file", default="", help="the scheduler's cluster secret")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    worker = Worker(args)
    self_check(worker.tasks[0])
    worker.connect()
    print("ready", flush=True)
    line = sys.stdin.readline().split()
    if len(line) != 2 or line[0] != "go":
        return 1
    worker.run(float(line[1]))
    print(json.dumps(worker.result()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
