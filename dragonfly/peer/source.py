"""Back to source: fetch a task from its origin, piece by piece.

A 1-byte probe (`Range: bytes=0-0`) learns the length, whether the origin takes
ranges, and its validators (ETag / Last-Modified). With ranges, up to
`concurrency` workers each claim the lowest missing piece and fetch exactly its
range, with `If-Range` so that an origin whose content changed answers 200 and
the task fails instead of mixing two versions. Without ranges, one response is
cut into pieces as it streams. Every piece is spliced straight into the task
file, hashed from disk, and handed to the sink, which records and announces it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import trio

from dragonfly.errors import find_exception
from dragonfly.log import get_logger
from dragonfly.net.http_client import HTTPClient, HTTPClientError, Response, discard
from dragonfly.net.zerocopy import pwrite_all
from dragonfly.ratelimit import RateLimiter
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


class PieceSink(Protocol):
    """What the fetcher writes into: a download's task file and bookkeeping."""

    piece_length: int
    content_length: int

    @property
    def fd(self) -> int: ...

    def claim_next_missing(self) -> int | None:
        """The lowest missing piece nobody is fetching from the origin, marked as claimed."""

    def unclaim(self, number: int) -> None: ...

    async def origin_piece_written(self, number: int, offset: int, length: int) -> None:
        """Bytes of a piece are in the file: hash, verify against any known digest, record."""

    async def set_content_length(self, content_length: int) -> None:
        """A streamed body of unknown length ended: now the length is known."""

    def holds(self, number: int) -> bool:
        """The piece is already recorded (a resumed task)."""

    def check_held_piece(self, number: int, data: bytes | bytearray) -> None:
        """Raise OriginChanged unless `data` is the recorded piece's bytes."""


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
    """Fetches one task from its origin into a PieceSink."""

    def __init__(
        self,
        client: HTTPClient,
        url: str,
        headers: dict[str, str],
        *,
        limiter: RateLimiter | None = None,
        concurrency: int = 8,
        expect_etag: str = "",
        expect_last_modified: str = "",
    ) -> None:
        self.client = client
        self.url = url
        self.headers = origin_request_headers(headers)
        self.limiter = limiter
        self.concurrency = concurrency
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

    async def fetch(self, sink: PieceSink) -> None:
        """Fetch every missing piece into the sink (after `probe`)."""
        assert self.info is not None, "probe first"
        try:
            if self._stream is not None:
                await self._fetch_stream(sink, self._stream)
            elif self.info.content_length > 0:
                try:
                    async with trio.open_nursery() as nursery:
                        for _ in range(self.concurrency):
                            nursery.start_soon(self._range_worker, sink)
                except BaseExceptionGroup as group:
                    # One worker's origin failure ends them all; say which, unwrapped.
                    origin_error = find_exception(group, OriginError)
                    if origin_error is None:
                        raise
                    raise origin_error from None
        finally:
            if self._stream is not None:
                await self._stream.aclose()
                self._stream = None

    async def _range_worker(self, sink: PieceSink) -> None:
        assert self.info is not None
        validator = _validator(self.info.etag, self.info.last_modified)
        while (number := sink.claim_next_missing()) is not None:
            offset = number * sink.piece_length
            length = min(sink.piece_length, sink.content_length - offset)
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
                        raise OriginError(
                            f"origin answered {r.status} to a range request", r.status
                        )
                    cr = parse_content_range(r.headers.get("content-range"))
                    if (
                        cr is None
                        or cr[:2] != (offset, offset + length - 1)
                        or cr[2] != sink.content_length
                    ):
                        raise OriginChanged(
                            f"{self.url}: origin sent range {r.headers.get('content-range')}, "
                            f"expected bytes {offset}-{offset + length - 1}/{sink.content_length}",
                            409,
                        )
                    await self._splice(r, sink.fd, offset, length)
            except HTTPClientError as exc:
                sink.unclaim(number)
                raise OriginError(f"piece {number} from origin: {exc}") from None
            except BaseException:
                sink.unclaim(number)
                raise
            await sink.origin_piece_written(number, offset, length)

    async def _splice(self, response: Response, fd: int, offset: int, length: int) -> None:
        """Body bytes into the file, paced by the back-to-source rate limit."""
        done = 0
        chunk = self.limiter.chunk(SPLICE_CHUNK) if self.limiter else length
        while done < length:
            n = min(chunk, length - done)
            if self.limiter is not None:
                await self.limiter.acquire(n)
            await response.splice_to(fd, offset + done, n)
            done += n

    async def _fetch_stream(self, sink: PieceSink, response: Response) -> None:
        """No ranges: the one body, cut into pieces in order as it arrives."""
        number = 0
        offset = 0
        total = sink.content_length
        if total >= 0:
            while offset < total:
                length = min(sink.piece_length, total - offset)
                if sink.holds(number):
                    # Never write over a recorded piece: compare the bytes instead.
                    buf = bytearray(length)
                    await response.readinto_exactly(buf)
                    sink.check_held_piece(number, buf)
                else:
                    await self._splice(response, sink.fd, offset, length)
                    await sink.origin_piece_written(number, offset, length)
                number += 1
                offset += length
            return
        # Unknown length (chunked): fill pieces until the body ends.
        filled = 0
        async for chunk in response.iter_chunks():
            view = memoryview(chunk)
            while view:
                take = min(len(view), sink.piece_length - filled)
                pwrite_all(sink.fd, view[:take], offset + filled)
                filled += take
                view = view[take:]
                if filled == sink.piece_length:
                    await sink.origin_piece_written(number, offset, filled)
                    number += 1
                    offset += filled
                    filled = 0
        await sink.set_content_length(offset + filled)
        if filled:
            await sink.origin_piece_written(number, offset, filled)
