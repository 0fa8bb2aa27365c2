"""Handing a connection to another server (net/http_server.py's HandOff), the socket pair
that carries it between processes (net/fdpass.py), and a proxy worker's open files."""

from __future__ import annotations

import os
import re
import socket

import pytest
import trio
import trio.testing
from structlog.testing import capture_logs

from dragonfly.blocklist import BlockList
from dragonfly.config import PeerConfig, load_config
from dragonfly.net.fdpass import MESSAGE_LIMIT, ChannelClosed, FdChannel
from dragonfly.net.http_server import HandOff, Request, Responder, bound_port, serve_listeners
from dragonfly.peer.proxy_worker import HeldFiles, HeldOnlyProxy, Worker, WorkerSetup
from dragonfly.peer.request import DownloadRequest
from dragonfly.storage.metadata import TaskRecord, TaskState
from dragonfly.wire.http_common import Headers


async def _front(request: Request, responder: Responder) -> None:
    """Answers /here itself; gives everything else away (after a start, too late)."""
    if request.target == "/here":
        await responder.send(200, b"front\n")
    elif request.target == "/late":
        await responder.start(200, [(b"content-length", b"10")])
        raise HandOff
    else:
        raise HandOff


async def _back(request: Request, responder: Responder) -> None:
    body = await request.read_body()
    await responder.send(200, b"back " + request.target.encode() + b" " + body + b"\n")


async def _exchange(port: int, data: bytes, answers: int) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(data)
    received = b""
    with trio.fail_after(10):
        while received.count(b"HTTP/1.1 ") < answers or not received.endswith(b"\n"):
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            received += chunk
    await stream.aclose()
    return received


async def test_a_handed_off_connection_goes_on_where_it_left(nursery: trio.Nursery) -> None:
    handed_send, handed = trio.open_memory_channel[tuple[trio.SocketStream, bytes]](10)
    given: list[bytes] = []

    async def hand_off(stream: trio.SocketStream, received: bytes) -> None:
        # As a worker does: the socket travels as a new descriptor, then the old one closes.
        given.append(received)
        sock = trio.socket.from_stdlib_socket(socket.socket(fileno=os.dup(stream.socket.fileno())))
        await handed_send.send((trio.SocketStream(sock), received))

    front = await trio.open_tcp_listeners(0, host="127.0.0.1")
    back_listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(
        lambda task_status: serve_listeners(
            _front, front, hand_off=hand_off, task_status=task_status
        )
    )
    await nursery.start(
        lambda task_status: serve_listeners(
            _back, back_listeners, handed=handed, task_status=task_status
        )
    )
    # Pipelined in one write: the front answers the first, the rest is the back's, the
    # body of the last included (the front never read it).
    requests = (
        b"GET /here HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /there HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /here HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /there HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
    )
    answer = await _exchange(bound_port(front), requests, 4)
    bodies = [part.split(b"\r\n\r\n", 1)[1] for part in answer.split(b"HTTP/1.1 200 OK")[1:]]
    assert bodies == [b"front\n", b"back /there \n", b"back /here \n", b"back /there hello\n"]
    assert given == [requests[len(b"GET /here HTTP/1.1\r\nHost: x\r\n\r\n") :]]

    # Sent in pieces: the bytes of the request read so far all travel.
    stream = await trio.open_tcp_stream("127.0.0.1", bound_port(front))
    await stream.send_all(b"GET /here HTTP/1.1\r\nHost: x\r\n\r\nPOST /there HTTP/1.1\r\nHo")
    await trio.sleep(0.1)
    await stream.send_all(b"st: x\r\nContent-Length: 3\r\n\r\nab")
    await trio.sleep(0.1)
    await stream.send_all(b"c")
    received = b""
    with trio.fail_after(10):
        while not received.endswith(b"back /there abc\n"):
            received += await stream.receive_some(65536)
    await stream.aclose()
    assert received.count(b"HTTP/1.1 200 OK") == 2 and b"front\n" in received


async def test_a_hand_off_after_the_answer_started_is_refused(nursery: trio.Nursery) -> None:
    async def hand_off(stream: trio.SocketStream, received: bytes) -> None:
        raise AssertionError("handed off after the response started")

    front = await trio.open_tcp_listeners(0, host="127.0.0.1")
    await nursery.start(
        lambda task_status: serve_listeners(
            _front, front, hand_off=hand_off, task_status=task_status
        )
    )
    with capture_logs() as logs:
        answer = await _exchange(bound_port(front), b"GET /late HTTP/1.1\r\nHost: x\r\n\r\n", 1)
    # Not given away (the head was made): closed, with no body (the head is held until
    # the body's first bytes, so here nothing at all went out).
    assert answer.partition(b"\r\n\r\n")[2] == b""
    assert any(entry["event"] == "hand-off refused" for entry in logs)


async def test_the_socket_pair_carries_messages_and_descriptors() -> None:
    ours, theirs_sock = FdChannel.pair()
    theirs = FdChannel(theirs_sock)
    read_end, write_end = os.pipe()
    await ours.send(("file", {"n": 1}), write_end)
    os.close(write_end)
    message, fd = await theirs.receive()
    assert message == ("file", {"n": 1}) and fd is not None
    os.write(fd, b"through a passed descriptor")
    os.close(fd)
    assert os.read(read_end, 100) == b"through a passed descriptor"
    os.close(read_end)

    await theirs.send(("no descriptor",))
    assert await ours.receive() == (("no descriptor",), None)
    # Larger than one datagram: through a memory file (a long block list, say); with a
    # descriptor of its own a message must fit in one.
    big = ("block_list", os.urandom(3 * MESSAGE_LIMIT))
    await ours.send(big)
    assert await theirs.receive() == (big, None)
    read_end, write_end = os.pipe()
    with pytest.raises(ValueError, match="over"):
        await ours.send(b"x" * (MESSAGE_LIMIT + 1), write_end)
    os.close(read_end)
    os.close(write_end)
    theirs.close()
    with pytest.raises(ChannelClosed):
        await ours.receive()
    with pytest.raises(ChannelClosed):
        await ours.send(("anyone there?",))
    ours.close()


async def test_a_workers_file_closes_once_removed_and_unused() -> None:
    ours, theirs_sock = FdChannel.pair()
    held = HeldFiles(ours, limit=2)
    record = TaskRecord("a" * 64, content_length=3, state=TaskState.SUCCEEDED)

    def descriptor() -> int:
        r, w = os.pipe()
        os.close(w)
        return r

    fd = descriptor()
    held.answered(record.id, record, fd)
    task = await held.lookup(record.id)
    assert task is not None and task.fd == fd
    held.use(task)
    held.removed([record.id])
    assert task.closed and os.fstat(fd)  # still open while it is being served
    assert await _lookup_unanswered(held, record.id) is None
    held.release(task)
    assert task.fd == -1
    with pytest.raises(OSError):
        os.fstat(fd)
    assert held.served == {record.id}

    # Beyond the limit the least recently used closes (not one in use).
    fds = [descriptor() for _ in range(3)]
    for n, f in enumerate(fds):
        held.answered(f"{n}" * 64, TaskRecord(f"{n}" * 64), f)
    with pytest.raises(OSError):
        os.fstat(fds[0])
    assert all(os.fstat(f) for f in fds[1:])
    held.answered("9" * 64, None, None)  # a "no": nothing kept
    held.close_all()
    ours.close()
    theirs_sock.close()


async def _lookup_unanswered(held: HeldFiles, task_id: str) -> object:
    """A lookup the daemon does not answer here: None after a short wait."""
    with trio.move_on_after(0.2):
        return await held.lookup(task_id)
    return None


class _Client:
    peer = "127.0.0.1:40000"


class _Answers:
    """A responder that keeps what the handler answered."""

    def __init__(self) -> None:
        self.started = False
        self.errors: list[tuple[int, str]] = []

    async def send_error(self, status: int, message: str) -> None:
        self.started = True
        self.errors.append((status, message))


def _request(url: str, *headers: tuple[bytes, bytes]) -> Request:
    pairs = [(b"host", b"x"), *headers]
    return Request("GET", url, Headers.lowercase(pairs), "1.1", _Client())  # type: ignore[arg-type]


async def test_a_worker_applies_the_block_list_and_hands_off_what_is_not_its(
    nursery: trio.Nursery,
) -> None:
    daemon, theirs = FdChannel.pair()
    config = load_config("peer", overrides=["proxy.workers=1"])
    assert isinstance(config, PeerConfig)
    worker = Worker(FdChannel(theirs), WorkerSetup(0, config, [1, 2], BlockList()))
    nursery.start_soon(worker._listen)
    proxy = HeldOnlyProxy(worker.services, worker.held)

    # The daemon's new block list reaches the worker, which refuses as the daemon does.
    await daemon.send(("block_list", BlockList(urls=(re.compile(r"/secret/"),))))
    await trio.testing.wait_all_tasks_blocked(0.05)
    assert not worker.services.block_list.empty
    answers = _Answers()
    await proxy(_request("http://origin.example/secret/x.bin"), answers)  # type: ignore[arg-type]
    assert answers.errors and answers.errors[0][0] == 403 and "block list" in answers.errors[0][1]
    # counted as the daemon counts it: a P2P request, refused for the block list
    counts = worker.counts()
    assert counts[("proxy_requests", ("p2p",))] == 1
    assert counts[("proxy_refusals", ("blocked",))] == 1

    # What only the daemon may decide is handed off before anything is answered: a
    # private task, a digest to check, a request with a body, the daemon's own paths, a
    # URL no rule sends through P2P, and a task the daemon does not hold.
    url = "http://origin.example/pub/x.bin"
    for request in (
        _request(url, (b"authorization", b"Bearer t")),
        _request(url, (b"content-length", b"3")),
        _request("/healthy"),
        _request(url, (b"x-dragonfly-use-p2p", b"false")),
    ):
        answers = _Answers()
        with pytest.raises(HandOff):
            await proxy(request, answers)  # type: ignore[arg-type]
        assert not answers.started
    not_held = _Answers()
    outcome: list[str] = []

    async def ask() -> None:
        try:
            await proxy(_request(url), not_held)  # type: ignore[arg-type]
        except HandOff:
            outcome.append("handed off")

    with trio.fail_after(5):
        async with trio.open_nursery() as inner:
            inner.start_soon(ask)
            message, _ = await daemon.receive()
            assert message == ("lookup", DownloadRequest.for_url(url).task_id)
            await daemon.send(("task", message[1], None))  # the daemon: not held
    assert outcome == ["handed off"] and not not_held.started
    assert ("proxy_requests", ("p2p",)) not in worker.counts()  # (the daemon counts those)
    daemon.close()
