"""h11 HTTP/1.1 server: the request loop of one connection, and the listeners.

A connection carries requests one after another (keep-alive), each handed with a
`Responder` to the handler (net/http_response.py). A handler that fails before the
response starts yields a 500; after it started, the connection is closed: a client
never gets a silently short body.

Timeouts: `header_timeout` (30 s) bounds the time a client takes to send a request's
headers: from the connection's start for its first request, from the first byte for
the next ones on a kept-alive connection, which may idle `idle_timeout` in between.
`body_timeout` and `send_timeout` bound each wait for the client (net/http_connection.py).
A connection closed with request bytes unread is closed lingeringly (half-close, drain
briefly) so the RST does not destroy the response.

A listener serves at most `max_connections` connections at once: one more is
answered 503 and closed at once, before its request is read (`on_refused` counts it).

Hand-off: where `hand_off` is given, a handler may raise `HandOff` before its response
starts; the connection then goes, with every byte received since that request began,
to `hand_off` (a proxy worker gives the daemon what it cannot serve itself), and another
server takes it up from those bytes (`serve_listeners(handed=...)`).

With `ssl_context`, a listener speaks TLS (the cluster's scheduler and upload ports):
each connection is wrapped in a server-side `trio.SSLStream`, whose handshake runs
under the header timeout; a client that cannot or will not complete it is closed.
"""

from __future__ import annotations

import contextlib
import math
import socket as _socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import trio

from dragonfly.log import get_logger
from dragonfly.net.http_connection import (
    BODY_TIMEOUT,
    RECEIVE_SIZE,
    SEND_TIMEOUT,
    ClientGone,
    HTTPConnection,
    Request,
    _peername,
    announces_body,
)
from dragonfly.net.http_response import SERVER_NAME, Responder, _reason
from dragonfly.net.unix import open_unix_listener
from dragonfly.wire.http_common import Headers

__all__ = [
    "HEADER_TIMEOUT",
    "IDLE_TIMEOUT",
    "HandOff",
    "Handler",
    "Request",
    "Responder",
    "bound_port",
    "serve",
    "serve_connection",
    "serve_listeners",
    "serve_unix",
]

log = get_logger("dragonfly.http.server")

# An unread request body up to this size is drained to keep the connection alive.
DRAIN_LIMIT = 1 << 20
# How long a lingering close reads (and drops) what the client still sends before closing.
LINGER_SECONDS = 1.0
# The time a client may take to send a request's headers (slowloris).
HEADER_TIMEOUT = 30.0
# Idle time between requests on a kept-alive connection.
IDLE_TIMEOUT = 120.0
_FULL = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 39\r\nconnection: close\r\nretry-after: 1\r\n\r\n"
    b"busy: too many connections; try again\n"
)

Handler = Callable[["Request", "Responder"], Awaitable[None]]
# Gives a connection away: its socket, and the bytes received since its request began.
HandOffTo = Callable[[trio.SocketStream, bytes], Awaitable[None]]


class HandOff(Exception):
    """Raised by a handler before its response starts: this connection is another
    server's (see the module's docstring)."""


_SEND_FAILURES = (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError)


async def _answer_protocol_error(c: HTTPConnection, exc: h11.RemoteProtocolError) -> None:
    """A malformed request: answer 4xx if h11 still lets us (it does from IDLE), then close."""
    if c.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return
    status = exc.error_status_hint if 400 <= exc.error_status_hint < 500 else 400
    body = f"bad request: {exc}\n".encode()
    try:
        data = c.conn.send(
            h11.Response(
                status_code=status,
                reason=_reason(status),
                headers=[
                    (b"content-length", str(len(body)).encode()),
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"connection", b"close"),
                    (b"server", SERVER_NAME),
                ],
            )
        )
        data += c.conn.send(h11.Data(data=body)) + c.conn.send(h11.EndOfMessage())
        await c.send_bytes(data)
        await _lingering_close(c.stream)
    except (*_SEND_FAILURES, ClientGone):
        pass


async def _lingering_close(stream: trio.abc.Stream) -> None:
    """Half-close, then drain briefly: closing with unread input sends a RST that
    can destroy the response before the client reads it (or fail the client's
    upload before it looks at the response). Bounded by time, not bytes: a client
    still sending a large body needs all of it taken. A stream that cannot
    half-close (TLS) is only drained."""
    try:
        if isinstance(stream, trio.abc.HalfCloseableStream):
            await stream.send_eof()
        with trio.move_on_after(LINGER_SECONDS):
            while await stream.receive_some(RECEIVE_SIZE):
                pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client is gone: nothing left to protect


async def serve_connection(
    stream: trio.abc.Stream,
    handler: Handler,
    *,
    idle_timeout: float = IDLE_TIMEOUT,
    header_timeout: float = HEADER_TIMEOUT,
    send_timeout: float = SEND_TIMEOUT,
    body_timeout: float = BODY_TIMEOUT,
    peer: str | None = None,
    prefix: bytes = b"",
    hand_off: HandOffTo | None = None,
) -> None:
    """Run requests on one connection until it closes, idles out, or breaks.

    `stream` is a TCP connection or any other trio Stream (TLS in a tunnel);
    `peer` names the client when the stream cannot (default: its socket's address);
    `prefix`: bytes of the connection another server received (a hand-off), read first.
    With `hand_off`, a handler may raise HandOff (a plain TCP stream only).
    """
    c = HTTPConnection(stream, send_timeout=send_timeout, body_timeout=body_timeout, peer=peer)
    if isinstance(stream, trio.SocketStream) and stream.socket.family != _socket.AF_UNIX:
        with contextlib.suppress(OSError):
            stream.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, True)
    if prefix:
        c.feed(prefix)
    recording = hand_off is not None and isinstance(stream, trio.SocketStream)
    # The idle timeout between kept-alive requests: one scope for the connection, whose
    # deadline is set only while it waits (a scope per request costs several µs of a
    # small local hit's ≈ 200).
    idle = trio.CancelScope()
    unread = False
    try:
        with idle:
            unread = await _serve_requests(
                c, handler, _Idle(idle, idle_timeout), header_timeout, recording
            )
        if unread and not idle.cancelled_caught:
            await _lingering_close(stream)
    except HandOff:
        assert hand_off is not None and isinstance(stream, trio.SocketStream)
        assert c.record is not None
        with trio.move_on_after(header_timeout):
            await hand_off(stream, bytes(c.record))
    except (trio.BrokenResourceError, trio.ClosedResourceError, ClientGone):
        return
    finally:
        with trio.move_on_after(1) as cleanup:
            cleanup.shield = True
            await stream.aclose()


@dataclass(slots=True)
class _Idle:
    """A connection's idle-timeout scope and the timeout it sets while waiting."""

    scope: trio.CancelScope
    timeout: float


async def _next_request(c: HTTPConnection, idle: _Idle, header_timeout: float, first: bool) -> Any:
    """The next request's first h11 event, or None when the client took over
    `header_timeout` to send the headers (a client idle too long is cancelled by
    `idle.scope`)."""
    event = c.conn.next_event()
    if event is not h11.NEED_DATA:
        # Pipelined, already here: a checkpoint still, so a client that sends many small
        # requests at once takes its turn with the others.
        await trio.lowlevel.checkpoint()
        return event
    if not first:
        # Between requests a kept-alive connection may idle; the clock for the headers
        # starts with the next request's first byte.
        idle.scope.deadline = trio.current_time() + idle.timeout
        try:
            data = await c.stream.receive_some(RECEIVE_SIZE)
        finally:
            idle.scope.deadline = math.inf
        if idle.scope.cancel_called:
            # The request came in the very tick the idle timeout expired: the scope stays
            # cancelled, so no handler may run in it; the connection closes as idle.
            return None
        c.feed(data)  # (b"": the client closed; ConnectionClosed next)
        event = c.conn.next_event()
        if event is not h11.NEED_DATA:
            return event
    with trio.move_on_after(header_timeout):
        return await c.next_event()
    return None


async def _serve_requests(
    c: HTTPConnection,
    handler: Handler,
    idle: _Idle,
    header_timeout: float,
    recording: bool = False,
) -> bool:
    """The request loop of one connection. True when it ends after a complete response
    with request bytes still unread: then the caller must close lingeringly. HandOff
    (with `recording`) when the handler gives the connection away."""
    first = True
    while True:
        if recording:
            c.start_record()
        try:
            event = await _next_request(c, idle, header_timeout, first)
            first = False
            if event is None:
                return False
        except h11.RemoteProtocolError as exc:
            await _answer_protocol_error(c, exc)
            return False
        if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return False
        if not isinstance(event, h11.Request):
            return False
        headers = Headers.lowercase(event.headers)
        request = Request(
            method=event.method.decode("ascii", "replace"),
            target=event.target.decode("latin-1"),
            headers=headers,
            http_version=event.http_version.decode("ascii", "replace"),
            connection=c,
            _expects_continue=c.conn.they_are_waiting_for_100_continue
            and announces_body(headers),
        )
        responder = Responder(c, request)
        reusable = await _run_handler(handler, request, responder, recording)
        if responder.upgraded:
            return False
        if not reusable:
            return responder.finished and _unread_input(c)
        if c.conn.our_state is h11.MUST_CLOSE or not await _drain_body(request):
            return _unread_input(c)
        if c.conn.states != {h11.CLIENT: h11.DONE, h11.SERVER: h11.DONE}:
            return False
        c.conn.start_next_cycle()


def _unread_input(c: HTTPConnection) -> bool:
    """True if the client may still be sending this request (or sent a bad one).

    Consumes what h11 already buffered (no I/O), so a request without a body whose
    end h11 simply has not reported yet does not count as unread.
    """
    try:
        while c.conn.their_state is h11.SEND_BODY:
            if c.conn.next_event() is h11.NEED_DATA:
                return True
    except h11.RemoteProtocolError:
        return True
    return c.conn.their_state is h11.ERROR


async def _run_handler(
    handler: Handler, request: Request, responder: Responder, may_hand_off: bool = False
) -> bool:
    """Run the handler; True if the connection may carry another request. HandOff passes
    through where the connection may be handed off and no byte of a response went out."""
    try:
        await handler(request, responder)
    except (trio.BrokenResourceError, trio.ClosedResourceError, ClientGone):
        return False
    except HandOff:
        if may_hand_off and not responder.started:
            raise
        log.warning("hand-off refused", target=request.target, started=responder.started)
        if not responder.started:
            with contextlib.suppress(*_SEND_FAILURES):
                await responder.send_error(500, "internal error")
        return False
    except h11.RemoteProtocolError as exc:
        if not responder.started:
            await responder.send_error(400, f"bad request: {exc}")
        return False
    except Exception as exc:
        log.warning(
            "handler failed",
            method=request.method,
            target=request.target,
            error=repr(exc),
            started=responder.started,
        )
        if not responder.started:
            with contextlib.suppress(*_SEND_FAILURES):
                await responder.send_error(500, "internal error")
        return False
    if not responder.finished:
        if not responder.started:
            await responder.send_error(500, "handler sent no response")
        return False
    return True


async def _drain_body(request: Request) -> bool:
    """Read what is left of the request body so the connection can be reused.

    False (close the connection) if the body is too large to be worth reading, is
    malformed, or was never asked for: a client that sent `Expect: 100-continue` and
    got a final response instead need not send its body at all.
    """
    if request._body_done:
        return True
    if request._expects_continue and not request._continue_sent:
        return False
    drained = 0
    try:
        # The common case first, without I/O: a request without a body, whose end h11
        # holds already.
        event = request.connection.conn.next_event()
        if type(event) is h11.EndOfMessage:
            request._body_done = True
            return True
        if isinstance(event, h11.Data):
            drained += len(event.data)
        elif event is not h11.NEED_DATA:
            return False  # (the client closed, or no body was expected after all)
        async for chunk in request.iter_body():
            drained += len(chunk)
            if drained > DRAIN_LIMIT:
                return False
    except h11.RemoteProtocolError:
        return False
    return True


async def serve(
    handler: Handler,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    backlog: int = 1024,
    **options: Any,
) -> None:
    """Serve HTTP on host:port until cancelled; reports the listeners (for the bound port).
    `options` are serve_listeners' (timeouts, max_connections, on_refused)."""
    listeners = await trio.open_tcp_listeners(port, host=host, backlog=backlog)
    await serve_listeners(handler, listeners, task_status=task_status, **options)


async def serve_unix(
    handler: Handler,
    path: Path,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    **options: Any,
) -> None:
    """Serve HTTP on a unix socket at `path` (mode 0600: its owner's only)."""
    listener = await open_unix_listener(path)
    await serve_listeners(handler, [listener], task_status=task_status, peer="local", **options)


async def serve_listeners(
    handler: Handler,
    listeners: list[trio.SocketListener],
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    idle_timeout: float = IDLE_TIMEOUT,
    header_timeout: float = HEADER_TIMEOUT,
    send_timeout: float = SEND_TIMEOUT,
    body_timeout: float = BODY_TIMEOUT,
    max_connections: int | None = None,
    on_refused: Callable[[], None] = lambda: None,
    peer: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    handed: trio.MemoryReceiveChannel[tuple[trio.SocketStream, bytes]] | None = None,
    hand_off: HandOffTo | None = None,
) -> None:
    """Serve HTTP on `listeners` until cancelled, at most `max_connections` at once;
    over TLS with `ssl_context`. Connections handed over by another server arrive on
    `handed` (each with the bytes it received) and count against the same cap; with
    `hand_off`, handlers may give connections away (see the module's docstring)."""
    active = 0

    async def on_connection(stream: trio.SocketStream, prefix: bytes = b"") -> None:
        nonlocal active
        if max_connections is not None and active >= max_connections:
            on_refused()
            if ssl_context is None:
                await _refuse(stream)
            else:  # (a plain-text 503 means nothing to a TLS client)
                await trio.aclose_forcefully(stream)
            return
        active += 1
        conn: trio.abc.Stream = stream
        if ssl_context is not None:
            conn = trio.SSLStream(stream, ssl_context, server_side=True, https_compatible=True)
        # One connection's failure must never reach serve_listeners' nursery: that
        # would take the whole server down.
        try:
            await serve_connection(
                conn,
                handler,
                idle_timeout=idle_timeout,
                header_timeout=header_timeout,
                send_timeout=send_timeout,
                body_timeout=body_timeout,
                peer=peer,
                prefix=prefix,
                hand_off=hand_off,
            )
        except Exception:
            log.exception("connection failed", peer=peer or _peername(stream))
        finally:
            active -= 1

    async def take_handed(
        channel: trio.MemoryReceiveChannel[tuple[trio.SocketStream, bytes]],
        nursery: trio.Nursery,
    ) -> None:
        async for stream, prefix in channel:
            nursery.start_soon(on_connection, stream, prefix)

    async with trio.open_nursery() as nursery:
        started = await nursery.start(trio.serve_listeners, on_connection, listeners)
        if handed is not None:
            nursery.start_soon(take_handed, handed, nursery)
        task_status.started(started)


async def _refuse(stream: trio.SocketStream) -> None:
    """A connection over the cap: say so in one write, without reading, and close."""
    with trio.move_on_after(1):
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await stream.send_all(_FULL)
    await trio.aclose_forcefully(stream)


def bound_port(listeners: list[trio.SocketListener]) -> int:
    return int(listeners[0].socket.getsockname()[1])
