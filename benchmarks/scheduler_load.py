"""Load generator of `python -m benchmarks scheduler`: simulated hosts on real websockets.

Why about 740 lines: one worker program (run by benchmarks/scheduler.py) with its own
epoll loop and websocket framing instead of trio's, and the host's side of every exchange.

One process drives a slice of the simulated hosts, each host on its own websocket to
the scheduler, from one epoll loop. The websocket framing is written here (RFC 6455:
an HTTP/1.1 upgrade with a checked Sec-WebSocket-Accept, then binary frames, every
client frame masked with a fresh key as the RFC requires), and the messages are the
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
import base64
import hashlib
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

from dragonfly.credentials import read_secret_file
from dragonfly.net.channel import websocket_accept_key
from dragonfly.peer.scheduler_client import scheduler_hello
from dragonfly.trust import (
    Credential,
    check_proof,
    issue,
    new_nonce,
    peer_proof,
    scheduler_proof,
)
from dragonfly.wire.codec import Message, decode, encode
from dragonfly.wire.messages import (
    CandidateParents,
    Hello,
    HostInfo,
    LeaveHost,
    LeavePeer,
    PeerFinished,
    PieceReport,
    PiecesFinished,
    Proof,
    RegisterPeer,
    TaskMetadata,
    TaskSpec,
)

PIECE_LENGTH = 4 << 20
BIN = 0.1  # seconds per bin of the throughput time series
_RECV = 1 << 18


@dataclass(frozen=True)
class SimTask:
    """One simulated download: its URL, task ID, layout and the origin's piece digests."""

    index: int
    url: str
    task_id: str
    content_length: int
    piece_length: int
    piece_count: int
    digests: tuple[bytes, ...]

    @property
    def spec(self) -> TaskSpec:
        # The piece length is named: the scheduler accepts no other layout for the task.
        return TaskSpec(url=self.url, piece_length=self.piece_length)


def make_tasks(count: int, pieces: int, piece_length: int = PIECE_LENGTH) -> list[SimTask]:
    """The same tasks in every worker: IDs and digests derive from the index only."""
    tasks = []
    for i in range(count):
        url = f"http://origin.bench.invalid/blobs/{i:05d}.bin"
        tid = TaskSpec(url=url, piece_length=piece_length).task_id
        digests = tuple(hashlib.sha256(f"{tid}:{n}".encode()).digest() for n in range(pieces))
        tasks.append(SimTask(i, url, tid, pieces * piece_length, piece_length, pieces, digests))
    return tasks


def host_id(index: int, seed: bool) -> str:
    return f"bench-seed-{index:04d}" if seed else f"bench-host-{index:05d}"


def host_info(index: int, seed: bool, seed_upload_slots: int = 1000) -> HostInfo:
    name = host_id(index, seed)
    return HostInfo(
        host_id=name,
        hostname=name,
        ip="127.0.0.1",
        upload_port=20000 + index if not seed else 19000 + index,
        # A few zones, so the evaluator's location term has something to compare.
        location=f"bench|zone-{index % 4}",
        seed=seed,
        # A simulated peer leaves as soon as it finishes, so nearly every parent is a
        # seed: with a plain host's 50 upload slots, most registrations would wait for
        # a slot and the run would measure the slots, not the scheduler.
        upload_limit=seed_upload_slots if seed else 50,
    )


# ---------------------------------------------------------------------------
# RFC 6455 framing (client side)
# ---------------------------------------------------------------------------


def client_frame(payload: bytes, opcode: int = 0x2, rng: random.Random | None = None) -> bytes:
    """One final, masked frame. Masking XORs the payload with the 4-byte key repeated;
    done as one big-int XOR, which is C speed in CPython."""
    n = len(payload)
    key = (rng or random).getrandbits(32).to_bytes(4, "big")
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 1 << 16:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    if not n:
        return head + key
    mask = int.from_bytes((key * (n // 4 + 1))[:n], "big")
    return head + key + (int.from_bytes(payload, "big") ^ mask).to_bytes(n, "big")


class FrameError(Exception):
    pass


def parse_frames(buf: bytearray, limit: int = 1 << 30) -> tuple[list[tuple[int, bytes]], int]:
    """Complete server frames (at most `limit`) at the start of `buf` as (opcode,
    payload), and the bytes they used. A server never masks its frames."""
    frames: list[tuple[int, bytes]] = []
    pos, n = 0, len(buf)
    while n - pos >= 2 and len(frames) < limit:
        b0, ln = buf[pos], buf[pos + 1]
        if ln & 0x80:
            raise FrameError("masked frame from the server")
        ln &= 0x7F
        hdr = 2
        if ln == 126:
            if n - pos < 4:
                break
            ln, hdr = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
        elif ln == 127:
            if n - pos < 10:
                break
            ln, hdr = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
        end = pos + hdr + ln
        if end > n:
            break
        if not b0 & 0x80:
            raise FrameError("fragmented frame (the scheduler never fragments)")
        frames.append((b0 & 0x0F, bytes(buf[pos + hdr : end])))
        pos = end
    return frames, pos


def _next_message(sock: socket.socket, buf: bytearray, what: str) -> Message:
    """The next server frame's message (blocking); `buf` keeps the bytes after it."""
    while True:
        frames, used = parse_frames(buf, limit=1)
        if frames:
            opcode, payload = frames[0]
            del buf[:used]
            if opcode != 0x2:
                raise ConnectionError(f"expected {what}, got opcode {opcode}")
            return decode(payload)
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"scheduler closed before {what}")
        buf += chunk


def handshake(
    port: int, info: HostInfo, role: str, timeout: float, credential: Credential | None = None
) -> tuple[socket.socket, bytes]:
    """Websocket upgrade to /v1/scheduler, the Hello exchange and, with a credential, the
    proofs both ways, blocking. Returns the socket and any bytes received after."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    key = base64.b64encode(os.urandom(16))
    sock.sendall(
        b"GET /v1/scheduler HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
        % (port, key)
    )
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("scheduler closed during the websocket upgrade")
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    if b" 101 " not in lines[0] + b" ":
        raise ConnectionError(f"upgrade refused: {lines[0]!r}")
    headers = dict(line.split(b":", 1) for line in lines[1:] if b":" in line)
    accept = {k.strip().lower(): v.strip() for k, v in headers.items()}.get(b"sec-websocket-accept")
    if accept != websocket_accept_key(key.decode()).encode():
        raise ConnectionError("bad Sec-WebSocket-Accept")
    nonce = new_nonce()
    hello = scheduler_hello(info, role, credential, nonce)
    sock.sendall(client_frame(encode(hello)))
    buf = bytearray(rest)
    answer = _next_message(sock, buf, "the scheduler's hello")
    if not isinstance(answer, Hello):
        raise ConnectionError(f"expected the scheduler's hello, got {answer!r}")
    if credential is not None:
        key = credential.host_key
        proof = peer_proof(key, nonce, answer.nonce, credential.claims)
        sock.sendall(client_frame(encode(Proof(proof=proof))))
        theirs = _next_message(sock, buf, "the scheduler's proof")
        if not isinstance(theirs, Proof):
            raise ConnectionError(f"expected the scheduler's proof, got {theirs!r}")
        check_proof(scheduler_proof(key, nonce, answer.nonce), theirs.proof, "scheduler")
    return sock, bytes(buf)  # anything after it is for the loop


# ---------------------------------------------------------------------------
# Messages, encoded as the codec would (checked against it at start-up)
# ---------------------------------------------------------------------------


def pieces_payload(peer_id: str, task: SimTask, first: int, last: int, parents: list[str]) -> bytes:
    """PiecesFinished for pieces [first, last): the codec's wire form built directly (a
    compact PieceReport is [number, offset, length, digest, parent_id, cost_ms]), which
    skips building a dataclass per piece; self_check() proves the bytes decode to the
    same message the codec would have made."""
    pl, digests, k = task.piece_length, task.digests, len(parents)
    pieces = [[n, n * pl, pl, digests[n], parents[n % k], 40] for n in range(first, last)]
    return cbor2.dumps(
        {"t": "pieces_finished", "peer_id": peer_id, "task_id": task.task_id, "pieces": pieces}
    )


def _answer_prefix(tag: str) -> bytes:
    """The bytes after the map head of a message whose first field is peer_id, up to
    its value: the codec writes "t" first, then the fields in declaration order."""
    return cbor2.dumps({"t": tag, "peer_id": ""})[1:-1]


_CANDIDATES = _answer_prefix("candidate_parents")


def peek_candidates(payload: bytes) -> str | None:
    """The peer_id of a CandidateParents without decoding it (most of them are parent
    updates for peers that already left, and carry every digest of the task); None if
    the payload is not one, or not laid out as expected (then it is decoded in full)."""
    p = 1 + len(_CANDIDATES)
    if payload[1:p] != _CANDIDATES or len(payload) <= p + 1:
        return None
    ib = payload[p]
    if 0x60 <= ib < 0x78:
        start, n = p + 1, ib - 0x60
    elif ib == 0x78:
        start, n = p + 2, payload[p + 1]
    else:
        return None
    return payload[start : start + n].decode()


def self_check(task: SimTask) -> None:
    built = decode(pieces_payload("p", task, 0, min(3, task.piece_count), ["a", "b"]))
    reports = [
        PieceReport(n, n * task.piece_length, task.piece_length, task.digests[n], "ab"[n % 2], 40)
        for n in range(min(3, task.piece_count))
    ]
    expected = PiecesFinished(peer_id="p", task_id=task.task_id, pieces=reports)
    if built != expected:
        raise AssertionError(f"hand-built PiecesFinished differs: {built!r} != {expected!r}")
    answer = encode(CandidateParents(peer_id="bench-peer", task_id=task.task_id))
    if peek_candidates(answer) != "bench-peer":
        raise AssertionError("the CandidateParents fast path does not match the codec")


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
