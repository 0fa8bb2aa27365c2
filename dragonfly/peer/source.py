"""Back to source: the origin's side of fetching a task, one piece at a time.

A 1-byte probe (`Range: bytes=0-0`) learns the length, whether the origin takes
ranges, and its validators (ETag / Last-Modified). With ranges, each piece is one
request for exactly its range, or several for slices of it (the download machine says
how many: engine/source.py, origin_split), each with `If-Range`, so that an origin whose
content changed answers 200 and the task fails instead of mixing two versions. Without
ranges, the probe's one response is read in order, piece by piece. Bytes are
spliced straight into the store's piece sink; which pieces to fetch, and when, is
the download machine's decision (dragonfly/engine/machine.py).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass

import trio

from dragonfly.engine.source import MIN_PART
from dragonfly.errors import find_exception
from dragonfly.log import get_logger
from dragonfly.net.http_client import HTTPClient, HTTPClientError
from dragonfly.net.http_client_response import Response, discard
from dragonfly.net.zerocopy import pwrite_all
from dragonfly.peer.context import DownloadContext
from dragonfly.ratelimit import RateLimiter
from dragonfly.storage import DigestMismatch, PieceSink, StorageError, TaskHandle
from dragonfly.wire.http_common import Headers, parse_content_range

log = get_logger("dragonfly.peer.source")

# Request headers a client sent that must not reach the origin on our behalf.
_DROP_REQUEST_HEADERS = frozenset(
    {"range", "if-range", "host", "accept-encoding", "content-length", "expect"}
)
SPLICE_CHUNK = 4 << 20


class OriginError(Exception):
    """The origin refused or failed; `http_status` is its status (0: no HTTP answer)."""

    def __init__(self, message: str, http_status: int = 0) -> None:
        super().__init__(message)
        self.http_status = http_status


class OriginChanged(OriginError):
    """The origin's content changed while the task was being fetched."""


@dataclass(frozen=True)
class OriginInfo:
    content_length: int  # -1: unknown (chunked, no ranges)
    accepts_ranges: bool
    etag: str
    last_modified: str
    content_type: str


def origin_request_headers(headers: dict[str, str]) -> Headers:
    """The client's headers that go to the origin (credentials included where allowed)."""
    out = Headers((k, v) for k, v in headers.items() if k.lower() not in _DROP_REQUEST_HEADERS)
    return out.without_hop_by_hop()


def _validator(etag: str, last_modified: str) -> str:
    # If-Range needs a strong ETag; a weak one never matches, Last-Modified is next best.
    if etag and not etag.startswith("W/"):
        return etag
    return last_modified


class OriginFetcher:
    """One task's origin: the probe, then pieces into the store's sinks."""

    def __init__(
        self,
        client: HTTPClient,
        url: str,
        headers: dict[str, str],
        *,
        limiter: RateLimiter | None = None,
        expect_etag: str = "",
        expect_last_modified: str = "",
    ) -> None:
        self.client = client
        self.url = url
        self.headers = origin_request_headers(headers)
        self.limiter = limiter
        self.expect_etag = expect_etag
        self.expect_last_modified = expect_last_modified
        self.info: OriginInfo | None = None
        self._stream: Response | None = None  # a 200 to the probe: the whole body

    async def probe(self) -> OriginInfo:
        """Learn length, range support and validators; keep a 200 body for streaming."""
        hdrs = Headers(self.headers)
        hdrs.set("range", "bytes=0-0")
        try:
            response = await self.client.send("GET", self.url, hdrs)
        except HTTPClientError as exc:
            raise OriginError(f"origin unreachable: {exc}") from None
        status = response.status
        h = response.headers
        etag, last_modified = h.get("etag") or "", h.get("last-modified") or ""
        content_type = h.get("content-type") or ""
        if status == 206:
            cr = parse_content_range(h.get("content-range"))
            await discard(response)
            if cr is None or cr[2] is None:
                raise OriginError(f"{self.url}: 206 without a usable Content-Range", 502)
            info = OriginInfo(cr[2], True, etag, last_modified, content_type)
        elif status == 416:
            # bytes=0-0 of an empty representation
            cr_total = (h.get("content-range") or "").rsplit("/", 1)[-1]
            await discard(response)
            if cr_total.strip() != "0":
                raise OriginError(f"{self.url}: origin answered 416 to bytes=0-0", 502)
            info = OriginInfo(0, True, etag, last_modified, content_type)
        elif status == 200:
            length = response.content_length
            info = OriginInfo(
                length if length is not None else -1, False, etag, last_modified, content_type
            )
            self._stream = response
        else:
            await discard(response)
            raise OriginError(f"origin answered {status} {response.reason}", status)
        self._check_same_version(info)
        self.info = info
        return info

    def _check_same_version(self, info: OriginInfo) -> None:
        if self.expect_etag and info.etag and info.etag != self.expect_etag:
            raise OriginChanged(
                f"{self.url}: origin content changed (ETag {self.expect_etag} → {info.etag})", 409
            )
        if (
            self.expect_last_modified
            and info.last_modified
            and info.last_modified != self.expect_last_modified
        ):
            raise OriginChanged(
                f"{self.url}: origin content changed (Last-Modified "
                f"{self.expect_last_modified} → {info.last_modified})",
                409,
            )

    @property
    def stream(self) -> Response | None:
        """The probe's 200 body (an origin without ranges): read it in order, piece by
        piece, with ``read_piece``/``skip_piece`` or ``chunks``."""
        return self._stream

    async def fetch_piece(self, sink: PieceSink, parts: int = 1) -> None:
        """The sink's piece by Range requests, spliced into it (after ``probe``): one, or
        ``parts`` at once for slices of it (fewer where a slice would be under MIN_PART
        bytes). One failed slice fails the piece (the others are cancelled; the store
        records nothing) with its own error."""
        assert self.info is not None, "probe first"
        assert sink.length is not None
        parts = max(1, min(parts, sink.length // MIN_PART))
        if parts == 1:
            await self._fetch_range(sink, sink.offset, sink.length, sink.hash_as_written())
            return
        # Slices land out of order: the store hashes the piece from the file at the end.
        size, extra = divmod(sink.length, parts)
        try:
            async with trio.open_nursery() as nursery:
                offset = sink.offset
                for i in range(parts):
                    length = size + (i < extra)
                    nursery.start_soon(self._fetch_range, sink, offset, length, None)
                    offset += length
        except BaseExceptionGroup as group:
            for kind in (OriginChanged, OriginError, OSError):  # the most telling first
                found = find_exception(group, kind)
                if found is not None:
                    raise found from None
            raise

    async def _fetch_range(
        self,
        sink: PieceSink,
        offset: int,
        length: int,
        hashed: Callable[[int, bool], None] | None,
    ) -> None:
        """Bytes [offset, offset + length) of the file by one Range request, into the sink."""
        assert self.info is not None
        total = self.info.content_length
        validator = _validator(self.info.etag, self.info.last_modified)
        hdrs = Headers(self.headers)
        hdrs.set("range", f"bytes={offset}-{offset + length - 1}")
        if validator:
            hdrs.set("if-range", validator)
        try:
            async with self.client.request("GET", self.url, hdrs) as r:
                if r.status == 200:
                    raise OriginChanged(
                        f"{self.url}: origin content changed during the download "
                        "(a Range request with If-Range got the whole new body)",
                        409,
                    )
                if r.status != 206:
                    raise OriginError(f"origin answered {r.status} to a range request", r.status)
                cr = parse_content_range(r.headers.get("content-range"))
                if cr is None or cr[:2] != (offset, offset + length - 1) or cr[2] != total:
                    raise OriginChanged(
                        f"{self.url}: origin sent range {r.headers.get('content-range')}, "
                        f"expected bytes {offset}-{offset + length - 1}/{total}",
                        409,
                    )
                await self._splice(r, sink.fd, offset, length, hashed)
        except HTTPClientError as exc:
            raise OriginError(f"piece {sink.number} from origin: {exc}") from None

    async def read_piece(self, sink: PieceSink) -> None:
        """The next ``sink.length`` bytes of the streamed body into the sink."""
        assert self._stream is not None and sink.length is not None
        try:
            await self._splice(
                self._stream, sink.fd, sink.offset, sink.length, sink.hash_as_written()
            )
        except HTTPClientError as exc:
            raise OriginError(f"origin body: {exc}") from None

    async def skip_piece(self, length: int) -> bytes:
        """The next ``length`` bytes of the streamed body, in memory: a piece already
        held is compared, never written over."""
        assert self._stream is not None
        buf = bytearray(length)
        try:
            await self._stream.readinto_exactly(buf)
        except HTTPClientError as exc:
            raise OriginError(f"origin body: {exc}") from None
        return bytes(buf)

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """The streamed body of unknown length, as it arrives."""
        assert self._stream is not None
        try:
            async for chunk in self._stream.iter_chunks():
                yield chunk
        except HTTPClientError as exc:
            raise OriginError(f"origin body: {exc}") from None

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()
            self._stream = None

    async def _splice(
        self,
        response: Response,
        fd: int,
        offset: int,
        length: int,
        hashed: Callable[[int, bool], None] | None,
    ) -> None:
        """``length`` body bytes into the file at ``offset``, paced by the back-to-source
        rate limit, hashed as they land where ``hashed`` is given."""
        done = 0
        chunk = self.limiter.chunk(SPLICE_CHUNK) if self.limiter else length
        while done < length:
            n = min(chunk, length - done)
            if self.limiter is not None:
                await self.limiter.acquire(n)
            got = await response.splice_to(fd, offset + done, n, on_written=hashed)
            if got < n:  # the body ended first (its Content-Length says less): a hole
                raise OriginError(
                    f"{response.url}: the origin's body ended {length - done - got} bytes "
                    f"short of the {length} asked for",
                    502,
                )
            done += n


class OriginLink:
    """A download's origin: performs the machine's ProbeOrigin, FetchOrigin and
    StreamOrigin and feeds back what the origin did. An origin failure (or a piece that
    is not what the task's first fetch was) ends in the machine's ``origin_failed``."""

    def __init__(self, dl: DownloadContext) -> None:
        self.dl = dl
        self.fetcher: OriginFetcher | None = None

    async def aclose(self) -> None:
        if self.fetcher is not None:
            await self.fetcher.aclose()

    async def run(self, work: Callable[[], Awaitable[None]]) -> None:
        dl = self.dl
        try:
            await work()
        except OriginError as exc:
            dl.feed(dl.machine.origin_failed(str(exc), exc.http_status, trio.current_time()))
        except DigestMismatch as exc:
            reason = f"origin content changed: {exc}"
            dl.feed(dl.machine.origin_failed(reason, 409, trio.current_time()))
        except (StorageError, OSError) as exc:
            reason = f"storing the origin's bytes failed: {exc}"
            dl.feed(dl.machine.origin_failed(reason, 0, trio.current_time()))

    async def probe(self, expect_etag: str, expect_last_modified: str) -> None:
        dl = self.dl
        await self.aclose()
        self.fetcher = OriginFetcher(
            dl.daemon.origin_client,
            dl.spec.url,
            dl.origin_headers,
            limiter=dl.daemon.source_limiter,
            expect_etag=expect_etag,
            expect_last_modified=expect_last_modified,
        )
        info = await self.fetcher.probe()
        dl.feed(
            dl.machine.origin_probed(
                info.content_length,
                info.accepts_ranges,
                info.etag,
                info.last_modified,
                info.content_type,
                trio.current_time(),
            )
        )

    async def fetch_piece(self, number: int, parts: int = 1) -> None:
        fetcher, handle = self.fetcher, self.dl.handle
        assert fetcher is not None and handle is not None
        async with self.dl.daemon.store.writing(handle, number) as sink:
            if not sink.done:
                await fetcher.fetch_piece(sink, parts)
        self._landed(sink)

    def _landed(self, sink: PieceSink) -> None:
        dl, record = self.dl, sink.record
        assert record is not None
        dl.count_landed(record.number, record.length, "back_to_source")
        dl.feed(
            dl.machine.origin_piece_landed(
                record.number, record.sha256, record.length, trio.current_time()
            )
        )

    async def stream(self) -> None:
        """No ranges: the one body, cut into pieces in order as it arrives."""
        fetcher, handle = self.fetcher, self.dl.handle
        assert fetcher is not None and handle is not None
        machine, store = self.dl.machine, self.dl.daemon.store
        lay = machine.layout
        if lay.geometry is None:
            await self._stream_unknown_length(fetcher, handle)
            return
        for number in range(lay.piece_count):
            length = lay.geometry.length(number)
            if machine.holds(number):
                # Never write over a recorded piece: compare the bytes instead.
                data = await fetcher.skip_piece(length)
                if hashlib.sha256(data).digest() != machine.digests.get(number):
                    raise OriginChanged(
                        f"origin content changed: piece {number} differs from the stored one",
                        409,
                    )
                continue
            async with store.writing(handle, number) as sink:
                await fetcher.read_piece(sink)
            self._landed(sink)

    async def _stream_unknown_length(self, fetcher: OriginFetcher, handle: TaskHandle) -> None:
        """A body of unknown length (chunked): pieces filled until it ends."""
        dl = self.dl
        store, machine = dl.daemon.store, dl.machine
        piece_length = machine.layout.piece_length
        number, filled = 0, 0
        pending: list[bytes] = []

        async def write(n: int, parts: list[bytes], size: int) -> None:
            async with store.writing(handle, n) as sink:
                offset = sink.offset
                for part in parts:
                    pwrite_all(sink.fd, part, offset)
                    offset += len(part)
                sink.length = size
            self._landed(sink)

        async with contextlib.aclosing(fetcher.chunks()) as body:
            async for chunk in body:
                view = memoryview(chunk)
                while view:
                    take = min(len(view), piece_length - filled)
                    pending.append(bytes(view[:take]))
                    filled += take
                    view = view[take:]
                    if filled == piece_length:
                        await write(number, pending, filled)
                        number, filled, pending = number + 1, 0, []
        total = number * piece_length + filled
        await store.set_content_length(dl.task_id, total)
        # The last, short piece is recorded once the length says how long it is.
        dl.feed(machine.content_length_known(total, trio.current_time()))
        if filled:
            await write(number, pending, filled)
