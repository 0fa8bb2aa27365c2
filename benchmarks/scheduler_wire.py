"""The wire side of the scheduler load (benchmarks/scheduler_load.py): simulated tasks and
hosts, the client's websocket framing (RFC 6455: an HTTP/1.1 upgrade with a checked
Sec-WebSocket-Accept, then binary frames, every client frame masked with a fresh key),
the handshake (upgrade, then Hello both ways with the credential's proofs), the
PiecesFinished payloads and a quick look at the scheduler's answers. No event loop here.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
import socket
from dataclasses import dataclass

import cbor2

from dragonfly.net.channel import websocket_accept_key
from dragonfly.peer.scheduler_client import scheduler_hello
from dragonfly.trust import (
    Credential,
    check_proof,
    new_nonce,
    peer_proof,
    scheduler_proof,
)
from dragonfly.wire.codec import Message, decode, encode
from dragonfly.wire.messages import (
    CandidateParents,
    Hello,
    HostInfo,
    PieceReport,
    PiecesFinished,
    Proof,
    TaskSpec,
)

PIECE_LENGTH = 4 << 20


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
