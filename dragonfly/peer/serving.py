"""Answers a peer's listeners share: a task's bytes streamed as its pieces land, a
request relayed to its origin unchanged, /healthy and /metrics.

The proxy, the registry mirror and the upload server build on these; none of them
imports another.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

from dragonfly.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from dragonfly.metrics import PeerMetrics
from dragonfly.net.http_client import Body, HTTPClientError, StreamedBody
from dragonfly.net.http_connection import Request
from dragonfly.net.http_response import PreparedHead, Responder, prepare_head
from dragonfly.peer.download import Download
from dragonfly.peer.exposure import DestinationRefused
from dragonfly.peer.services import PeerServices
from dragonfly.storage.metadata import TaskRecord
from dragonfly.wire.http_common import (
    Headers,
    RangeNotSatisfiable,
    parse_content_length,
    parse_range,
)

H_TASK_ID = b"x-dragonfly-task-id"

# Request headers that describe the client's connection or ask for a part of the
# body: never sent to the origin for a whole-task fetch.
_NOT_FORWARDED = frozenset(
    {
        "host",
        "range",
        "if-range",
        "if-none-match",
        "if-modified-since",
        "if-match",
        "if-unmodified-since",
        "accept-encoding",
        "proxy-authorization",
        "proxy-connection",
        "connection",
        "keep-alive",
        "te",
        "upgrade",
        "content-length",
        "transfer-encoding",
        "expect",
    }
)


def origin_headers(headers: Headers) -> dict[str, str]:
    """The client's headers that the origin should see when we fetch on its behalf."""
    out: dict[str, str] = {}
    for name, value in headers:
        key = name.decode("latin-1")
        if key in _NOT_FORWARDED or key.startswith("x-dragonfly-"):
            continue
        out[key] = value.decode("latin-1")
    return out


async def serve_common(daemon: PeerServices, path: str, responder: Responder) -> bool:
    """/healthy and /metrics, on both of a peer's listeners; True if answered.

    /healthy is 503 while starting and while a background loop's last run failed (the
    body says "degraded" and names the loop: the daemon keeps serving and retrying)."""
    if path == "/healthy":
        if not daemon.healthy:
            await responder.send(503, b"starting: not connected to every scheduler yet\n")
        elif daemon.supervisor.degraded:
            await responder.send(503, daemon.supervisor.describe().encode())
        else:
            await responder.send(200, b"ok\n")
        return True
    if path == "/metrics":
        await responder.send(200, daemon.metrics.render(), content_type=METRICS_CONTENT_TYPE)
        return True
    return False


def relayed_headers(headers: Headers) -> Headers:
    """A client's request headers as the origin should get them from a relaying proxy:
    every one (repeated ones such as Accept one by one), but for the hop-by-hop ones,
    the proxy's own and the length, which the proxy sets."""
    return Headers(
        (k, v)
        for k, v in headers.without_hop_by_hop()
        if k not in (b"host", b"proxy-authorization", b"content-length", b"expect")
        and not k.startswith(b"x-dragonfly-")
    )


def request_body(request: Request) -> Body:
    """The client's request body as it arrives (never held whole), or b"" without one."""
    length = parse_content_length(request.headers.get("content-length"))
    if request.headers.get("transfer-encoding") is not None:
        return StreamedBody(request.iter_body())
    if length:
        return StreamedBody(request.iter_body(), length)
    return b""


async def relay(
    daemon: PeerServices,
    request: Request,
    url: str,
    responder: Responder,
    *,
    headers: Headers | None = None,
    on_error: Callable[[int, str], Awaitable[None]] | None = None,
) -> None:
    """Pass the request to `url` and stream the answer back unchanged (redirects too).
    The request body streams through as it arrives. An origin that cannot be reached is
    a 502, one the client may not reach a 403 (through `on_error` when given)."""
    hdrs = relayed_headers(request.headers) if headers is None else headers
    fail = on_error or responder.send_error
    try:
        response = await daemon.origin_client.send(
            request.method, url, hdrs, request_body(request), follow_redirects=False
        )
    except DestinationRefused as exc:
        await fail(403, str(exc))
        return
    except HTTPClientError as exc:
        await fail(502, f"origin: {exc}")
        return
    try:
        await responder.start(response.status, response.headers.without_hop_by_hop())
        async for chunk in response.iter_chunks():
            await responder.write(chunk)
        await responder.finish()
    finally:
        await response.aclose()


def _task_headers(
    task_id: str, etag: str, last_modified: str, content_type: str, extra: Headers | None
) -> Headers:
    headers = Headers()
    headers.set(b"accept-ranges", b"bytes")
    headers.set(b"content-type", (content_type or "application/octet-stream").encode())
    if etag:
        headers.set(b"etag", etag.encode())
    if last_modified:
        headers.set(b"last-modified", last_modified.encode())
    headers.set(H_TASK_ID, task_id.encode())
    for name, value in extra or ():
        headers.set(name, value)
    return headers


async def _start_ranged(
    request: Request, responder: Responder, headers: Headers, total: int
) -> tuple[int, int] | None:
    """Start the answer for the request's Range (or the whole): the bytes [start, end] to
    send, or None once a 416 went out."""
    try:
        byte_range = parse_range(request.headers.get("range"), total)
    except RangeNotSatisfiable:
        headers.set(b"content-range", f"bytes */{total}".encode())
        headers.set(b"content-length", b"0")
        await responder.start(416, headers)
        await responder.finish()
        return None
    start, end = (0, total - 1) if byte_range is None else (byte_range.start, byte_range.end)
    headers.set(b"content-length", str(end - start + 1 if total else 0).encode())
    if byte_range is not None:
        headers.set(b"content-range", byte_range.content_range().encode())
    await responder.start(206 if byte_range is not None else 200, headers)
    return start, end


@functools.lru_cache(maxsize=1024)
def _whole_file_head(
    task_id: str, content_length: int, etag: str, last_modified: str
) -> PreparedHead:
    """The 200 head of a held task's whole file, made once per task and version."""
    headers = _task_headers(task_id, etag, last_modified, "", None)
    headers.set(b"content-length", str(content_length).encode())
    return prepare_head(200, headers)


async def serve_held(
    metrics: PeerMetrics,
    record: TaskRecord,
    fd: int,
    request: Request,
    responder: Responder,
    extra_headers: Headers | None = None,
) -> None:
    """A local hit: a complete task this peer holds, from its file `fd`, without starting
    a download (the caller holds the task, or an open file of it)."""
    total = record.content_length
    if extra_headers is None and "range" not in request.headers:
        # The common case (many clients of one file): the same head every time.
        responder.start_prepared(
            _whole_file_head(record.id, total, record.etag, record.last_modified)
        )
        start, end = 0, total - 1
    else:
        headers = _task_headers(record.id, record.etag, record.last_modified, "", extra_headers)
        span = await _start_ranged(request, responder, headers, total)
        if span is None:
            return
        start, end = span
    if request.method != "HEAD" and total:
        await responder.sendfile(fd, start, end - start + 1)
        metrics.local_bytes.inc(end - start + 1)
    await responder.finish()


async def stream_download(
    daemon: PeerServices,
    download: Download,
    request: Request,
    responder: Responder,
    extra_headers: Headers | None = None,
) -> None:
    """Answer with the task's bytes, each piece sent (sendfile) as soon as it is verified.

    When the whole file has a known digest (an OCI blob), its last piece waits until
    the whole file hashed right: a client never holds all the bytes of a wrong file.
    """
    if download.content_length < 0:
        # An origin that sent no length (chunked, no ranges): known once the body ended.
        await download.wait_finished()
    total = download.content_length
    headers = _task_headers(
        download.task_id,
        download.etag,
        download.last_modified,
        download.content_type,
        extra_headers,
    )
    try:
        byte_range = parse_range(request.headers.get("range"), total)
    except RangeNotSatisfiable:
        byte_range = None  # (_start_ranged answers 416)
    if byte_range is None:
        download.want_all()
    elif total:
        download.want_range(byte_range.start, byte_range.end)
    local = download.finished.is_set() and download.bytes_p2p == 0 and download.bytes_source == 0
    if total == 0 and download.request.spec.digest:
        await download.wait_finished()  # an empty "blob" is checked too, before the 200
    span = await _start_ranged(request, responder, headers, total)
    if span is None:
        return
    start, end = span
    if request.method == "HEAD" or total == 0:
        await responder.finish()
        return
    piece_length = download.piece_length
    last_piece = (total - 1) // piece_length
    async with daemon.store.use(download.task_id) as handle:
        fd = handle.file.fd
        position = start
        while position <= end:
            number = position // piece_length
            await download.wait_piece(number)
            if number == last_piece and download.request.spec.digest:
                await download.wait_finished()
            piece_end = min(end, (number + 1) * piece_length - 1)
            await responder.sendfile(fd, position, piece_end - position + 1)
            if local:
                daemon.metrics.download_bytes.labels("local").inc(piece_end - position + 1)
            position = piece_end + 1
    await responder.finish()
