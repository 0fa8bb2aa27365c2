"""The HTTP client's response and how its body is read, on one origin connection.

A Content-Length body is read straight from the socket: spliced into a file
(`splice_to`) or received into a caller's buffer (`read_into`), never through
h11's buffer, which copies. Chunked and close-delimited bodies go through h11.
`aclose()` hands a connection whose body was read to the end back to the client's
pool (reused with a fresh h11.Connection), and closes any other.
"""

from __future__ import annotations

import select
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import h11
import trio

from dragonfly.net.bodies import collect
from dragonfly.net.http_client_errors import (
    BadResponse,
    BodyIncomplete,
    HTTPClientError,
    HTTPTimeout,
)
from dragonfly.net.http_origin import Origin
from dragonfly.net.zerocopy import IncompleteBody, SplicePipe, pwrite_all, splice_to_file
from dragonfly.wire.http_common import Headers, parse_content_length

if TYPE_CHECKING:
    from dragonfly.net.http_client import HTTPClient

RECEIVE_SIZE = 256 * 1024


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
        body = await collect(self.iter_chunks(), limit)
        if body is None:
            raise BadResponse(f"{self.url}: body larger than {limit} bytes")
        return body

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
