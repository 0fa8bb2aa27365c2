"""TasksRemoved (protocol 6): a host tells its scheduler which tasks it no longer holds.
Only the sender's own peers go: a member naming a task another host holds changes
nothing, and an outsider without a credential is refused before its message counts.
(A lying member can only make itself look poorer.)"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import trio

from dragonfly.config import SchedulerConfig, load_config
from dragonfly.net.channel import Channel, connect
from dragonfly.nursery.scheduler import SchedulerServer
from dragonfly.peer.scheduler_client import authenticate, scheduler_hello
from dragonfly.testing.trust import LocalIssuer
from dragonfly.trust import new_nonce
from dragonfly.wire.codec import Message
from dragonfly.wire.messages import (
    CandidateParents,
    Error,
    LeavePeer,
    PeerFinished,
    PieceReport,
    PiecesFinished,
    RegisterPeer,
    TaskMetadata,
    TaskSpec,
    TasksRemoved,
    TriggerDownload,
)
from tests.security.support import hello, host_info, speak

SIZE = 1 << 20
PIECE = 4 << 20  # (the piece length of a 1 MiB file)
SPEC = TaskSpec(url="http://origin.invalid/held.bin")


async def member(
    stack: contextlib.AsyncExitStack, url: str, issuer: LocalIssuer, name: str, role: str
) -> Channel:
    credential = issuer.credential(name, role)
    nonce = new_nonce()
    host = host_info(name, seed=role == "seed-peer")
    channel = await stack.enter_async_context(
        connect(url, scheduler_hello(host, role, credential, nonce))
    )
    await authenticate(channel, credential, nonce)
    return channel


async def until(channel: Channel, kind: type[Message]) -> Message:
    """The first message of `kind` the scheduler sends on `channel` (others skipped)."""
    with trio.fail_after(10):
        async for msg in channel:
            if isinstance(msg, kind):
                return msg
    raise AssertionError(f"the channel closed before a {kind.__name__}")


async def handled(channel: Channel, nonce: int) -> None:
    """Everything sent on `channel` before this is handled: the scheduler answers a host's
    messages in order, and a LeavePeer of a peer it never saw with an Error."""
    await channel.send(LeavePeer(peer_id=f"barrier-{nonce}", task_id=SPEC.task_id))
    error = await until(channel, Error)
    assert isinstance(error, Error) and error.ref == "leave_peer", error


async def test_only_the_senders_own_peers_go(tmp_path: Path) -> None:
    issuer = LocalIssuer(tmp_path / "trust")
    cfg = load_config(
        "scheduler", env={}, overrides=["server.port=0", *issuer.scheduler_overrides()]
    )
    assert isinstance(cfg, SchedulerConfig)
    server = SchedulerServer(cfg)
    task = SPEC.task_id
    async with trio.open_nursery() as nursery, contextlib.AsyncExitStack() as stack:
        port = await nursery.start(server.run)
        url = f"ws://127.0.0.1:{port}/v1/scheduler"

        # A seed peer fetches the task and holds it whole.
        seed = await member(stack, url, issuer, "seed-1", "seed-peer")
        peer_id = "seed-1-held"
        await seed.send(RegisterPeer(peer_id=peer_id, task_id=task, task=SPEC))
        await seed.send(
            TaskMetadata(
                peer_id=peer_id,
                task_id=task,
                content_length=SIZE,
                piece_length=PIECE,
                piece_count=1,
            )
        )
        digest = hashlib.sha256(b"the piece").digest()
        report = PieceReport(number=0, offset=0, length=SIZE, digest=digest, parent_id="")
        await seed.send(PiecesFinished(peer_id=peer_id, task_id=task, pieces=[report]))
        await seed.send(
            PeerFinished(peer_id=peer_id, task_id=task, content_length=SIZE, piece_count=1)
        )
        await handled(seed, 1)

        # An outsider without a credential says the seed's task is gone: refused.
        _, closed = await speak(
            url, hello(host_info("outsider")), [TasksRemoved(task_ids=[task])], listen=3
        )
        assert closed
        # A member says so for a task it does not hold: nothing of the seed's goes.
        liar = await member(stack, url, issuer, "liar-1", "peer")
        await liar.send(TasksRemoved(task_ids=[task]))
        await handled(liar, 2)

        # The next downloader is still sent to the seed.
        downloader = await member(stack, url, issuer, "peer-1", "peer")
        await downloader.send(RegisterPeer(peer_id="peer-1-d", task_id=task, task=SPEC))
        answer = await until(downloader, CandidateParents)
        assert isinstance(answer, CandidateParents)
        assert [p.peer_id for p in answer.parents] == [peer_id]

        # The seed itself says it let the task go: it is asked to fetch the task again
        # for the downloader that waits, instead of being its parent.
        await seed.send(TasksRemoved(task_ids=[task]))
        trigger = await until(seed, TriggerDownload)
        assert isinstance(trigger, TriggerDownload) and trigger.task_id == task
        nursery.cancel_scope.cancel()
