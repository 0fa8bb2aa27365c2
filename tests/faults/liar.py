"""A peer that lies: it tells the scheduler it holds every piece (with the right
digests, learnt from the scheduler itself), announces pieces to children with
made-up digests, and serves garbage bytes. Built from the project's own wire
modules, so it speaks the protocol exactly as a real (malicious) peer would, with a
valid credential of the cluster: a member that behaves badly."""

from __future__ import annotations

import hashlib
import os

import trio

from dragonfly.identity import piece_length_for
from dragonfly.net.channel import Channel, connect
from dragonfly.net.http_server import Request, Responder, bound_port, serve
from dragonfly.peer.scheduler_client import authenticate, scheduler_hello
from dragonfly.trust import Credential, new_nonce
from dragonfly.wire.codec import MIN_PROTOCOL_VERSION, PROTOCOL_VERSION
from dragonfly.wire.messages import (
    AnnounceDone,
    CandidateParents,
    Hello,
    HostInfo,
    NeedBackToSource,
    PieceAnnounce,
    PieceDigests,
    PieceInfo,
    PieceReport,
    PiecesFinished,
    RegisterPeer,
    Subscribe,
    TaskMetadata,
    TaskSpec,
)


class Liar:
    def __init__(self, scheduler: str, task_id: str, url: str, credential: Credential) -> None:
        self.scheduler = scheduler
        self.credential = credential
        self.task_id = task_id
        self.url = url
        self.piece_length = 0
        self.content_length = 0
        self.piece_count = 0
        self.served = 0
        self.registered = trio.Event()

    async def handle(self, request: Request, responder: Responder) -> None:
        path = request.target.split("?")[0]
        if path == "/v1/announce" and responder.is_websocket_request:
            await responder.websocket(self._announce)
            return
        if path.startswith("/pieces/"):
            number = int(path.rsplit("/", 1)[1])
            length = min(self.piece_length, self.content_length - number * self.piece_length)
            self.served += 1
            body = self.piece_bytes(number, length)
            await responder.send(200, body, content_type=b"application/octet-stream")
            return
        await responder.send(404, b"")

    def piece_bytes(self, number: int, length: int) -> bytes:
        return os.urandom(length)

    def announced_digest(self, number: int) -> bytes:
        return os.urandom(32)  # lies about the digest too

    async def _announce(self, ws: object) -> None:
        channel = Channel(ws, name="liar-child")  # type: ignore[arg-type]
        await channel.handshake(
            Hello(version=PROTOCOL_VERSION, min_version=MIN_PROTOCOL_VERSION, role="peer")
        )
        msg = await channel.receive()
        assert isinstance(msg, Subscribe)
        fake = [
            PieceInfo(
                n,
                n * self.piece_length,
                min(self.piece_length, self.content_length - n * self.piece_length),
                self.announced_digest(n),
            )
            for n in range(self.piece_count)
        ]
        await channel.send(PieceAnnounce(task_id=self.task_id, pieces=fake))
        await channel.send(
            AnnounceDone(
                task_id=self.task_id,
                piece_count=self.piece_count,
                content_length=self.content_length,
            )
        )
        await trio.sleep_forever()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(serve, self.handle, "127.0.0.1", 0)
            port = bound_port(listeners)
            host = HostInfo(
                host_id=self.credential.claims.host_id,
                hostname="liar",
                ip="127.0.0.1",
                upload_port=port,
            )
            nonce = new_nonce()
            hello = scheduler_hello(host, "peer", self.credential, nonce)
            async with connect(self.scheduler + "/v1/scheduler", hello) as channel:
                await authenticate(channel, self.credential, nonce)
                await self._register(channel)
                task_status.started()
                async for _ in channel:
                    pass

    async def _register(self, channel: Channel) -> None:
        peer_id = f"liar-peer-{os.getpid()}"
        await channel.send(
            RegisterPeer(peer_id=peer_id, task_id=self.task_id, task=TaskSpec(url=self.url))
        )
        digests: dict[int, bytes] = {}
        parent = ""
        while not self.piece_count or len(digests) < self.piece_count:
            msg = await channel.receive()
            if isinstance(msg, CandidateParents) and msg.piece_length and msg.piece_count > 0:
                self.piece_length = msg.piece_length
                self.content_length = msg.content_length
                self.piece_count = msg.piece_count
                parent = msg.parents[0].peer_id if msg.parents else parent
                digests.update((d.number, d.digest) for d in msg.digests)
            elif isinstance(msg, PieceDigests):
                digests.update((d.number, d.digest) for d in msg.digests)
        # Claim everything, with the true digests: the scheduler cannot tell.
        pl, cl = self.piece_length, self.content_length
        await channel.send(
            PiecesFinished(
                peer_id=peer_id,
                task_id=self.task_id,
                pieces=[
                    PieceReport(n, n * pl, min(pl, cl - n * pl), d, parent, 1)
                    for n, d in sorted(digests.items())
                ],
            )
        )
        self.registered.set()


def made_up_piece(number: int, length: int) -> bytes:
    """The bytes a source liar serves as piece `number`: not the origin's."""
    seed = hashlib.sha256(f"made-up piece {number}".encode()).digest()
    return (seed * (length // len(seed) + 1))[:length]


class SourceLiar(Liar):
    """A member that registers a task first, so that (without seed peers) it is the one
    sent to the origin, and then reports made-up pieces as the origin's: digests that
    match the bytes it serves, which are not the origin's. If its word were enough, a
    child would check its pieces against its digests and keep them."""

    def __init__(
        self, scheduler: str, url: str, content_length: int, credential: Credential
    ) -> None:
        super().__init__(scheduler, TaskSpec(url=url).task_id, url, credential)
        self.content_length = content_length
        self.piece_length = piece_length_for(content_length)
        self.piece_count = -(-content_length // self.piece_length)
        self.sent_to_origin = False

    def piece_bytes(self, number: int, length: int) -> bytes:
        return made_up_piece(number, length)

    def announced_digest(self, number: int) -> bytes:
        offset = number * self.piece_length
        length = min(self.piece_length, self.content_length - offset)
        return hashlib.sha256(made_up_piece(number, length)).digest()

    async def _register(self, channel: Channel) -> None:
        peer_id = f"{self.credential.claims.host_id}-{os.getpid()}"
        await channel.send(
            RegisterPeer(peer_id=peer_id, task_id=self.task_id, task=TaskSpec(url=self.url))
        )
        while True:
            msg = await channel.receive()
            if isinstance(msg, NeedBackToSource):
                break
            if isinstance(msg, CandidateParents):
                return  # not the origin's fetcher: nothing to lie about
        self.sent_to_origin = True
        await channel.send(
            TaskMetadata(
                peer_id=peer_id,
                task_id=self.task_id,
                content_length=self.content_length,
                piece_length=self.piece_length,
                piece_count=self.piece_count,
            )
        )
        reports = []
        for n in range(self.piece_count):
            offset = n * self.piece_length
            length = min(self.piece_length, self.content_length - offset)
            digest = hashlib.sha256(made_up_piece(n, length)).digest()
            reports.append(PieceReport(n, offset, length, digest, "", 1))
        await channel.send(PiecesFinished(peer_id=peer_id, task_id=self.task_id, pieces=reports))
        self.registered.set()
