"""h11 HTTP/1.1 client for going back to the origin (and fetching pieces from parents).

Why about 700 lines: the raw body reads (splice, read_into) and the pool's reuse of a
connection after them share one connection's state; split, each half would reach into the other.

h11 parses the status line and headers. A Content-Length body is then read
straight from the socket: spliced into a file (`splice_to`) or received into
a caller's buffer (`read_into`), never through h11's buffer, which copies.
Chunked and close-delimited bodies go through h11. After a raw body read the
connection is reused with a fresh h11.Connection.

A request body is bytes, or a `StreamedBody` (an async iterator and, when known, its
length) that goes out as it is produced: a proxy relays a client's upload without
holding it. A streamed body is sent once: on a fresh connection, never retried,
and a redirect is returned to the caller instead of followed.

`resolver` (optional) maps a host and port to the addresses to connect to; the
peer's proxy passes one that refuses addresses its client may not reach, so the
address checked is the address connected to. `unix_socket` sends every request
to a local unix socket instead (the peer's local API).

Errors are `HTTPClientError` subclasses whose message names the URL and what
went wrong (connect, timeout, protocol, a body cut short).
"""

from __future__ import annotations

import contextlib
import select
import socket as _socket
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import h11
import trio

from dragonfly.net.unix import open_unix_stream
from dragonfly.net.zerocopy import IncompleteBody, SplicePipe, pwrite_all, splice_to_file
from dragonfly.wire.http_common import Headers, parse_content_length

RECEIVE_SIZE = 256 * 1024
# Reads while the response head is awaited: a head is a few hundred bytes, and whatever
# body comes with it is copied through Python (the rest is spliced, or read in bulk).
HEAD_RECEIVE_SIZE = 4096
MAX_HEADER_BYTES = 64 * 1024
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Methods safe to resend when a pooled connection turns out to be closed (RFC 9110 9.2.2):
# the server may have acted on the first attempt; for these that does no harm.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
USER_AGENT = b"dragonfly/0.1"


class HTTPClientError(Exception):
    """A request that could not be completed."""


@dataclass(frozen=True)
class StreamedBody:
    """A request body sent as it is produced; `length` None: chunked."""

    chunks: AsyncIterable[bytes]
    length: int | None = None


Body = bytes | StreamedBody
# host, port → the addresses to connect to (in order); raises HTTPClientError to refuse.
Resolver = Callable[[str, int], Awaitable[list[str]]]


class ConnectError(HTTPClientError):
    pass


class HTTPTimeout(HTTPClientError):
    pass


class BadResponse(HTTPClientError):
    pass


class BodyIncomplete(HTTPClientError):
    pass


class TooManyRedirects(HTTPClientError):
    pass


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str
    host: str
    port: int

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default else f"{host}:{self.port}"


def split_url(url: str) -> tuple[Origin, str]:
    """(origin, origin-form target) of an absolute http(s) URL."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise HTTPClientError(f"invalid URL {url!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HTTPClientError(f"not an absolute http(s) URL: {url!r}")
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Origin(parts.scheme, parts.hostname, port), target


class _Conn:
    """A connection to one origin; `raw` is the TCP socket when not TLS (for splice)."""

    def __init__(self, origin: Origin, stream: trio.abc.Stream, raw: trio.socket.SocketType | None):
        self.origin = origin
        self.stream = stream
        self.raw = raw
        self.pipe: SplicePipe | None = None

    def looks_closed(self) -> bool:
        """An idle plain-HTTP connection with something to read (EOF, or stray bytes) is
        unusable: check without blocking before sending a request on it. Under TLS the
        socket may hold session tickets, so only plain connections are checked."""
        if self.raw is None:
            return False
        poller = select.poll()
        poller.register(self.raw.fileno(), select.POLLIN | select.POLLERR | select.POLLHUP)
        try:
            return bool(poller.poll(0))
        except OSError:
            return True

    async def aclose(self) -> None:
        if self.pipe is not None:
            self.pipe.close()
            self.pipe = None
        with trio.move_on_after(1) as scope:
            scope.shield = True
            await self.stream.aclose()


@dataclass
class Response:
    """A response whose body has not been read yet."""

    url: str
    status: int
    reason: str
    headers: Headers
    http_version: str
    _client: HTTPClient = field(repr=False)
    _conn: _Conn = field(repr=False)
    _h11: h11.Connection = field(repr=False)
    _read_timeout: float = field(repr=False)
    _raw_remaining: int | None = field(default=None, repr=False)  # Content-Length mode
    _buffered: bytes = field(default=b"", repr=False)
    _done: bool = field(default=False, repr=False)
    # Two separate facts: aclose() ran (the connection was pooled or closed, so a second
    # aclose must not touch it), and the connection is unusable (close, never pool).
    _returned: bool = field(default=False, repr=False)
    _broken: bool = field(default=False, repr=False)
    received: int = 0

    @property
    def content_length(self) -> int | None:
        return parse_content_length(self.headers.get("content-length"))

    @property
    def complete(self) -> bool:
        return self._done

    # -- raw (Content-Length) reads -------------------------------------

    def _take_buffered(self, limit: int) -> bytes:
        chunk, self._buffered = self._buffered[:limit], self._buffered[limit:]
        return chunk

    def _advance(self, n: int) -> None:
        self.received += n
        if self._raw_remaining is not None:
            self._raw_remaining -= n
            if self._raw_remaining == 0:
                self._done = True

    def _short(self) -> BodyIncomplete:
        total = self.content_length
        return BodyIncomplete(
            f"{self.url}: connection closed after {self.received} of {total} body bytes"
        )

    def _reset(self, exc: BaseException) -> BodyIncomplete:
        """The connection failed mid-body (a reset...): say how far the body got."""
        self._broken = True
        total = self.content_length
        return BodyIncomplete(
            f"{self.url}: connection broken after {self.received} of {total} body bytes: {exc}"
        )

    async def _receive(self, max_bytes: int) -> bytes | bytearray:
        try:
            with trio.fail_after(self._read_timeout):
                return await self._conn.stream.receive_some(max_bytes)
        except trio.TooSlowError:
            raise HTTPTimeout(
                f"{self.url}: no data for {self._read_timeout}s after {self.received} body bytes"
            ) from None
        except (trio.BrokenResourceError, OSError) as exc:
            raise self._reset(exc) from None

    async def read_into(self, buf: memoryview | bytearray) -> int:
        """Read up to len(buf) body bytes into buf; 0 at the end of the body."""
        view = memoryview(buf)
        if self._done or not len(view):
            return 0
        if self._raw_remaining is None:
            chunk = await self._next_h11_data(len(view))
            view[: len(chunk)] = chunk
            return len(chunk)
        want = min(len(view), self._raw_remaining)
        if self._buffered:
            chunk = self._take_buffered(want)
            view[: len(chunk)] = chunk
            self._advance(len(chunk))
            return len(chunk)
        if self._conn.raw is not None:
            try:
                with trio.fail_after(self._read_timeout):
                    n = await self._conn.raw.recv_into(view[:want])
            except trio.TooSlowError:
                raise HTTPTimeout(f"{self.url}: no data for {self._read_timeout}s") from None
            except OSError as exc:
                raise self._reset(exc) from None
        else:
            data = await self._receive(want)
            n = len(data)
            view[:n] = data
        if n == 0:
            raise self._short()
        self._advance(n)
        return n

    async def readinto_exactly(self, buf: memoryview | bytearray) -> None:
        view = memoryview(buf)
        filled = 0
        while filled < len(view):
            n = await self.read_into(view[filled:])
            if n == 0:
                raise self._short()
            filled += n

    async def splice_to(
        self,
        fd: int,
        offset: int,
        count: int | None = None,
        *,
        on_written: Callable[[int, bool], None] | None = None,
    ) -> int:
        """Write `count` body bytes (default: the rest) into file `fd` at `offset`.

        Zero-copy (socket → pipe → file) for plain HTTP with Content-Length;
        through a buffer and os.pwrite otherwise (TLS, chunked bodies). When spliced,
        `on_written(end, last)` follows the bytes into the file (zerocopy.splice_to_file),
        in a worker thread.
        """
        if self._raw_remaining is not None:
            want = self._raw_remaining if count is None else min(count, self._raw_remaining)
        elif count is None:
            return await self._copy_rest(fd, offset)
        else:
            want = count
        written = 0
        raw = self._conn.raw
        splicing = self._raw_remaining is not None and raw is not None
        if self._buffered and want:
            chunk = self._take_buffered(want)
            pwrite_all(fd, chunk, offset)
            self._advance(len(chunk))
            written = len(chunk)
            if splicing and on_written is not None:
                on_written(offset + written, written == want)
        if splicing and raw is not None and written < want:
            if self._conn.pipe is None:
                self._conn.pipe = SplicePipe()
            try:
                n = await splice_to_file(
                    raw,
                    fd,
                    offset + written,
                    want - written,
                    self._conn.pipe,
                    read_timeout=self._read_timeout,
                    on_written=on_written,
                )
            except IncompleteBody as exc:
                self._broken = True  # the connection is done
                self.received += exc.moved
                if isinstance(exc.__cause__, ConnectionError):
                    raise self._reset(exc.__cause__) from None
                raise self._short() from None
            except trio.TooSlowError:
                self._broken = True
                raise HTTPTimeout(f"{self.url}: no data for {self._read_timeout}s") from None
            except OSError as exc:
                self._broken = True  # e.g. the file side failed: the stream is mid-body
                raise BodyIncomplete(f"{self.url}: receiving body failed: {exc}") from None
            self._advance(n)
            return want
        # Filled whole before each write: TLS hands over one record (16 KiB) at a time,
        # and a write per record would cost a syscall for each.
        buf = memoryview(bytearray(min(RECEIVE_SIZE, max(1, want - written))))
        while written < want:
            view = buf[: min(len(buf), want - written)]
            await self.readinto_exactly(view)
            pwrite_all(fd, view, offset + written)
            written += len(view)
        return written

    async def _copy_rest(self, fd: int, offset: int) -> int:
        written = 0
        async for chunk in self.iter_chunks():
            pwrite_all(fd, chunk, offset + written)
            written += len(chunk)
        return written

    async def iter_chunks(self, size: int = RECEIVE_SIZE) -> AsyncIterator[bytes]:
        """The rest of the body, in chunks as they arrive."""
        if self._raw_remaining is None:
            while not self._done:
                chunk = await self._next_h11_data(size)
                if chunk:
                    yield chunk
            return
        buf = bytearray(size)
        while not self._done:
            n = await self.read_into(buf)
            if n == 0:
                return
            yield bytes(buf[:n])

    async def read(self, limit: int = 16 << 20) -> bytes:
        """The whole body; BadResponse past `limit` bytes."""
        parts: list[bytes] = []
        size = 0
        async for chunk in self.iter_chunks():
            size += len(chunk)
            if size > limit:
                raise BadResponse(f"{self.url}: body larger than {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    # -- h11-parsed bodies ----------------------------------------------

    async def _next_h11_data(self, limit: int) -> bytes:
        if self._buffered:
            chunk = self._take_buffered(limit)
            self.received += len(chunk)
            return chunk
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise BadResponse(f"{self.url}: malformed body: {exc}") from None
            if event is h11.NEED_DATA:
                # b"" (EOF) ends a close-delimited body: h11 then reports EndOfMessage.
                data = await self._receive(RECEIVE_SIZE)
                self._h11.receive_data(data)  # type: ignore[arg-type]  # (h11 takes a bytearray)
                continue
            if isinstance(event, h11.Data):
                chunk = bytes(event.data)
                if len(chunk) > limit:
                    chunk, self._buffered = chunk[:limit], chunk[limit:]
                self.received += len(chunk)
                return chunk
            if isinstance(event, h11.EndOfMessage):
                self._done = True
                return b""
            if isinstance(event, h11.ConnectionClosed):
                raise self._short()
            raise BadResponse(f"{self.url}: unexpected {type(event).__name__} in body")

    def _keep_alive(self) -> bool:
        """Whether the server lets the connection carry another request."""
        tokens = {
            t.strip().lower() for v in self.headers.get_all("connection") for t in v.split(",")
        }
        if "close" in tokens:
            return False
        # HTTP/1.0 closes after each response unless it says otherwise.
        return self.http_version != "1.0" or "keep-alive" in tokens

    async def aclose(self) -> None:
        """Release the connection: back to the pool if the body was read to the end.
        Only the first call acts: the connection may be someone else's by the second."""
        if self._returned:
            await trio.lowlevel.checkpoint()
            return
        self._returned = True
        reusable = not self._broken and self._done and self._keep_alive()
        if reusable and self._raw_remaining is None:
            reusable = self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE
        if reusable:
            self._client._release(self._conn)
        else:
            await self._conn.aclose()


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


async def discard(response: Response, limit: int = 1 << 20) -> None:
    """Read and drop a small body (a redirect's, an error's) so the connection can be
    reused, then release the response."""
    try:
        size = 0
        async for chunk in response.iter_chunks():
            size += len(chunk)
            if size > limit:
                break
    except HTTPClientError:
        pass
    await response.aclose()
