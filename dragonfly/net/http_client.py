"""h11 HTTP/1.1 client for going back to the origin (and fetching pieces from parents):
sending requests, the keep-alive pool per origin, and redirects.

h11 parses the status line and headers; the body is read through the `Response`
(http_client_response), which hands its connection back to the pool when done.

A request body is bytes, or a `StreamedBody` (an async iterator and, when known, its
length) that goes out as it is produced: a proxy relays a client's upload without
holding it. A streamed body is sent once: on a fresh connection, never retried,
and a redirect is returned to the caller instead of followed.

`resolver` (optional) maps a host and port to the addresses to connect to; the
peer's proxy passes one that refuses addresses its client may not reach, so the
address checked is the address connected to. `unix_socket` sends every request
to a local unix socket instead (the peer's local API).

Errors are `HTTPClientError` subclasses (http_client_errors) whose message names the
URL and what went wrong.
"""

from __future__ import annotations

import contextlib
import socket as _socket
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

import h11
import trio

from dragonfly.net.http_client_errors import (
    BadResponse,
    ConnectError,
    HTTPClientError,
    HTTPTimeout,
    TooManyRedirects,
)
from dragonfly.net.http_client_response import Response, _Conn, discard
from dragonfly.net.http_origin import Origin, split_url
from dragonfly.net.unix import open_unix_stream
from dragonfly.wire.http_common import Headers

# HTTPClientError is what most callers catch: it stays importable from here.
__all__ = [
    "Body",
    "HTTPClient",
    "HTTPClientError",
    "Resolver",
    "StreamedBody",
]

# Reads while the response head is awaited: a head is a few hundred bytes, and whatever
# body comes with it is copied through Python (the rest is spliced, or read in bulk).
HEAD_RECEIVE_SIZE = 4096
MAX_HEADER_BYTES = 64 * 1024
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Methods safe to resend when a pooled connection turns out to be closed (RFC 9110 9.2.2):
# the server may have acted on the first attempt; for these that does no harm.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
USER_AGENT = b"dragonfly/0.1"


@dataclass(frozen=True)
class StreamedBody:
    """A request body sent as it is produced; `length` None: chunked."""

    chunks: AsyncIterable[bytes]
    length: int | None = None


Body = bytes | StreamedBody
# host, port → the addresses to connect to (in order); raises HTTPClientError to refuse.
Resolver = Callable[[str, int], Awaitable[list[str]]]


class HTTPClient:
    """Requests with a small keep-alive pool per origin, redirects and timeouts."""

    def __init__(
        self,
        *,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        ssl_context: ssl.SSLContext | None = None,
        max_redirects: int = 10,
        max_idle_per_origin: int = 8,
        max_idle: int = 64,
        resolver: Resolver | None = None,
        unix_socket: Path | None = None,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.ssl_context = ssl_context
        self.max_redirects = max_redirects
        self.max_idle_per_origin = max_idle_per_origin
        self.max_idle = max_idle  # over every origin: a client of many hosts holds few
        self.resolver = resolver
        self.unix_socket = unix_socket
        self._idle: dict[Origin, list[_Conn]] = {}

    def _ssl(self) -> ssl.SSLContext:
        if self.ssl_context is None:
            self.ssl_context = ssl.create_default_context()
        return self.ssl_context

    async def _open(self, origin: Origin) -> trio.SocketStream:
        if self.unix_socket is not None:
            return await open_unix_stream(self.unix_socket)
        hosts = [origin.host]
        if self.resolver is not None:
            hosts = await self.resolver(origin.host, origin.port)
        failure: OSError | None = None
        for host in hosts:  # each address the resolver checked, in turn
            try:
                tcp = await trio.open_tcp_stream(host, origin.port)
            except OSError as exc:
                failure = exc
                continue
            tcp.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, True)
            return tcp
        raise failure or OSError(f"{origin.host} has no address")

    async def _connect(self, origin: Origin, url: str) -> _Conn:
        try:
            with trio.fail_after(self.connect_timeout):
                tcp = await self._open(origin)
                if origin.scheme == "https":
                    tls = trio.SSLStream(
                        tcp, self._ssl(), server_hostname=origin.host, https_compatible=True
                    )
                    try:
                        await tls.do_handshake()
                    except BaseException:
                        await trio.aclose_forcefully(tcp)
                        raise
                    return _Conn(origin, tls, None)
                return _Conn(origin, tcp, tcp.socket)
        except trio.TooSlowError:
            raise HTTPTimeout(
                f"{url}: connecting to {origin.host_header} took over {self.connect_timeout}s"
            ) from None
        except (OSError, trio.BrokenResourceError) as exc:
            # trio wraps TLS failures (certificate verification...) in BrokenResourceError
            reason = exc.__cause__ if isinstance(exc, trio.BrokenResourceError) else exc
            raise ConnectError(
                f"{url}: cannot connect to {origin.host_header}: {reason or exc!r}"
            ) from None

    def _release(self, conn: _Conn) -> None:
        idle = self._idle.setdefault(conn.origin, [])
        if len(idle) < self.max_idle_per_origin:
            idle.append(conn)
        else:
            trio.lowlevel.spawn_system_task(conn.aclose)
        # Over the total: the longest-known origin's oldest idle connection goes.
        excess = sum(len(conns) for conns in self._idle.values()) - self.max_idle
        for origin in list(self._idle):
            conns = self._idle[origin]
            while excess > 0 and conns:
                trio.lowlevel.spawn_system_task(conns.pop(0).aclose)
                excess -= 1
            if not conns:
                del self._idle[origin]
            if excess <= 0:
                break

    async def aclose(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                await conn.aclose()
        self._idle.clear()

    @asynccontextmanager
    async def request(
        self,
        method: str,
        url: str,
        headers: Headers | Iterable[tuple[bytes | str, bytes | str]] = (),
        body: Body = b"",
        *,
        follow_redirects: bool = True,
    ) -> AsyncIterator[Response]:
        """Send a request; yields the response with its body unread."""
        hdrs = headers if isinstance(headers, Headers) else Headers(headers)
        response = await self.send(method, url, hdrs, body, follow_redirects=follow_redirects)
        try:
            yield response
        finally:
            with trio.CancelScope(shield=True):
                await response.aclose()

    async def send(
        self,
        method: str,
        url: str,
        headers: Headers,
        body: Body = b"",
        *,
        follow_redirects: bool = True,
    ) -> Response:
        """Send a request and return the response (call `aclose()` on it when done)."""
        # A streamed body is gone once sent: a redirect cannot resend it.
        follow_redirects = follow_redirects and not isinstance(body, StreamedBody)
        for _ in range(self.max_redirects + 1):
            response = await self._send_once(method, url, headers, body)
            location = response.headers.get("location")
            if not follow_redirects or response.status not in REDIRECT_STATUSES or not location:
                return response
            await discard(response)
            next_url = urljoin(url, location)
            if split_url(next_url)[0] != split_url(url)[0]:
                # Credentials are for the origin that asked; never leak them elsewhere.
                headers = Headers(
                    (k, v) for k, v in headers if k not in (b"authorization", b"cookie")
                )
            if response.status == 303 and method != "HEAD":
                method, body = "GET", b""
            url = next_url
        raise TooManyRedirects(f"{url}: more than {self.max_redirects} redirects")

    async def _send_once(self, method: str, url: str, headers: Headers, body: Body) -> Response:
        origin, target = split_url(url)
        # A streamed body cannot be sent twice: it never risks a pooled connection the
        # server may have closed meanwhile.
        idle = None if isinstance(body, StreamedBody) else self._idle.get(origin)
        # A pooled connection may have been closed by the server meanwhile. Ones that
        # visibly were are dropped unused; if one fails before any response byte, an
        # idempotent request is retried on a fresh connection. Others are not: the
        # server may have acted on them before closing.
        while idle:
            conn = idle.pop()
            if conn.looks_closed():
                await conn.aclose()
                continue
            try:
                return await self._exchange(conn, method, url, target, headers, body)
            except _StaleConnection as exc:
                await conn.aclose()
                if method not in IDEMPOTENT_METHODS:
                    raise BadResponse(
                        f"{url}: pooled connection closed before a response "
                        f"(not retried: {method} is not idempotent): {exc}"
                    ) from None
            except BaseException:
                await conn.aclose()
                raise
        conn = await self._connect(origin, url)
        try:
            return await self._exchange(conn, method, url, target, headers, body)
        except _StaleConnection as exc:
            await conn.aclose()
            raise BadResponse(f"{url}: connection closed before a response: {exc}") from None
        except BaseException:
            await conn.aclose()
            raise

    async def _exchange(
        self, conn: _Conn, method: str, url: str, target: str, headers: Headers, body: Body
    ) -> Response:
        h = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEADER_BYTES)
        out = Headers(headers.without_hop_by_hop())
        out.set(b"host", conn.origin.host_header)
        if b"user-agent" not in out:
            out.add(b"user-agent", USER_AGENT)
        out.remove(b"content-length")
        length = body.length if isinstance(body, StreamedBody) else len(body)
        if length is None:
            out.set(b"transfer-encoding", b"chunked")
        elif isinstance(body, StreamedBody) or body or method in ("POST", "PUT", "PATCH"):
            out.set(b"content-length", str(length).encode())
        data = h.send(h11.Request(method=method, target=target, headers=out.pairs()))
        if isinstance(body, bytes) and body:
            data += h.send(h11.Data(data=body))
        got_any = False
        try:
            if isinstance(body, StreamedBody):
                await conn.stream.send_all(data)
                data = b""
                try:
                    async for chunk in body.chunks:
                        if chunk:
                            # An origin that takes no byte for read_timeout is as dead
                            # as one that sends none.
                            with trio.fail_after(self.read_timeout):
                                await conn.stream.send_all(h.send(h11.Data(data=chunk)))
                    end = h.send(h11.EndOfMessage())
                except h11.LocalProtocolError as exc:  # more or fewer bytes than announced
                    raise BadResponse(
                        f"{url}: request body does not match its length: {exc}"
                    ) from None
                got_any = True  # the body is gone: never retried as a stale connection
            else:
                end = h.send(h11.EndOfMessage())
            await conn.stream.send_all(data + end)
            while True:
                event = h.next_event()
                if event is h11.NEED_DATA:
                    with trio.fail_after(self.read_timeout):
                        received = await conn.stream.receive_some(HEAD_RECEIVE_SIZE)
                    if not received and not got_any:
                        raise _StaleConnection("closed")
                    got_any = True
                    h.receive_data(received)  # type: ignore[arg-type]  # (h11 takes a bytearray)
                    continue
                if isinstance(event, h11.InformationalResponse):
                    continue
                if isinstance(event, h11.Response):
                    break
                raise BadResponse(f"{url}: unexpected {type(event).__name__} before response")
        except trio.TooSlowError:
            await conn.aclose()
            raise HTTPTimeout(f"{url}: no response within {self.read_timeout}s") from None
        except h11.RemoteProtocolError as exc:
            await conn.aclose()
            raise BadResponse(f"{url}: malformed response: {exc}") from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            if not got_any:
                raise _StaleConnection(str(exc)) from None
            await conn.aclose()
            raise BadResponse(f"{url}: connection broken during the response: {exc}") from None
        resp_headers = Headers(event.headers)
        response = Response(
            url=url,
            status=event.status_code,
            reason=event.reason.decode("latin-1"),
            headers=resp_headers,
            http_version=event.http_version.decode("ascii", "replace"),
            _client=self,
            _conn=conn,
            _h11=h,
            _read_timeout=self.read_timeout,
        )
        body_expected = method != "HEAD" and event.status_code not in (204, 304)
        body_expected = body_expected and not 100 <= event.status_code < 200
        length = response.content_length
        chunked = "chunked" in (resp_headers.get("transfer-encoding") or "").lower()
        if not body_expected or length == 0:
            response._done = True
            response._raw_remaining = 0 if length == 0 and body_expected else None
            if not body_expected:
                # h11 knows there is no body: let it reach DONE for pooling.
                _h11_finish_empty(h)
        elif length is not None and not chunked:
            response._raw_remaining = length
            response._buffered = bytes(h.trailing_data[0])
            if len(response._buffered) > length:
                await conn.aclose()
                raise BadResponse(f"{url}: more bytes than Content-Length {length}")
        return response


class _StaleConnection(Exception):
    """A pooled connection that the server had closed: safe to retry."""


def _h11_finish_empty(h: h11.Connection) -> None:
    """Let h11 see the (empty) end of a bodiless response so both sides reach DONE."""
    with contextlib.suppress(h11.RemoteProtocolError):
        h.next_event()
