"""Handing a connection to another server (net/http_server.py's HandOff), the socket pair
that carries it between processes (net/fdpass.py), and a proxy worker's open files."""

from __future__ import annotations

import os
import socket

import pytest
import trio
from structlog.testing import capture_logs

from dragonfly.net.fdpass import MESSAGE_LIMIT, ChannelClosed, FdChannel
from dragonfly.net.http_server import HandOff, Request, Responder, bound_port, serve_listeners
from dragonfly.peer.proxy_worker import HeldFiles
from dragonfly.storage.metadata import TaskRecord, TaskState


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
    with pytest.raises(ValueError, match="over"):
        await ours.send(b"x" * (MESSAGE_LIMIT + 1))
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
    with held.using(task):
        held.removed([record.id])
        assert task.closed and os.fstat(fd)  # still open while it is being served
        assert await _lookup_unanswered(held, record.id) is None
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
