"""The API's HTTP conventions (Dragonfly's): JSON bodies, `{"message": ...}` errors,
`page`/`per_page` lists with a `Link` header, RFC 3339 times.

Request bodies are decoded and validated by msgspec against the resource's
`Struct` (a C extension, no Rust): the type, the bounds (`Meta`) and unknown keys
(ignored, as Dragonfly does) in one pass, and its error names the field
(`... - at $.scopes.cidrs[0]`). The answer to a bad body is 422.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, TypeVar
from urllib.parse import urlencode

import msgspec
from starlette.requests import Request
from starlette.responses import Response

T = TypeVar("T")

MAX_BODY = 1 << 20
DEFAULT_PER_PAGE = 10
MAX_PER_PAGE = 1000
MAX_QUERY_VALUE = 1024


class ApiError(Exception):
    """Answered as `{"message": message}` with `status`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def not_found(what: str = "record not found") -> ApiError:
    return ApiError(404, what)


def json_response(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(msgspec.json.encode(value), status, headers, media_type="application/json")


def empty_response(status: int = 200) -> Response:
    """Deletes and association PUTs: 200 with an empty body, as Dragonfly answers."""
    return Response(b"", status)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return json_response({"message": message}, status, headers)


async def read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
        raise ApiError(413, f"request body over {MAX_BODY} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise ApiError(413, f"request body over {MAX_BODY} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def decode(request: Request, kind: type[T]) -> T:
    """The request's JSON body as `kind`, validated; 422 naming the field otherwise."""
    body = await read_body(request)
    if not body.strip():
        body = b"{}"
    try:
        return msgspec.json.decode(body, type=kind, strict=True)
    except msgspec.ValidationError as exc:
        raise ApiError(422, f"invalid request body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ApiError(422, f"request body is not JSON: {exc}") from None


def path_id(request: Request, name: str = "id") -> int:
    """A numeric path parameter; one that is not a row id is answered 404."""
    text = request.path_params.get(name, "")
    if not isinstance(text, str) or not text.isdigit() or len(text) > 19:
        raise not_found()
    return int(text)


def query_str(request: Request, name: str) -> str | None:
    value = request.query_params.get(name)
    if value is not None and len(value) > MAX_QUERY_VALUE:
        raise ApiError(422, f"query parameter {name}: longer than {MAX_QUERY_VALUE} characters")
    return value


def query_int(request: Request, name: str) -> int | None:
    value = query_str(request, name)
    if value is None or value == "":
        return None
    if not value.isdigit() or len(value) > 18:
        raise ApiError(422, f"query parameter {name}: expected a non-negative integer")
    return int(value)


def query_choice(request: Request, name: str, choices: tuple[str, ...]) -> str | None:
    value = query_str(request, name)
    if value is None or value == "":
        return None
    if value not in choices:
        raise ApiError(422, f"query parameter {name}: expected one of {', '.join(choices)}")
    return value


def pagination(request: Request) -> tuple[int, int]:
    """`page` (from 1) and `per_page` (1..MAX_PER_PAGE); missing or 0 take the defaults."""
    page = query_int(request, "page") or 1
    per_page = query_int(request, "per_page") or DEFAULT_PER_PAGE
    if per_page > MAX_PER_PAGE:
        raise ApiError(422, f"query parameter per_page: at most {MAX_PER_PAGE}")
    return page, per_page


def link_header(
    path: str, query: list[tuple[str, str]], page: int, per_page: int, total: int
) -> str:
    """Dragonfly's Link header: prev, next, first, last; the query re-encoded in sorted
    key order with page and per_page replaced. An empty list has last = 0, as there."""
    total_pages = -(-total // per_page)
    rest = [(k, v) for k, v in query if k not in ("page", "per_page")]

    def url(number: int) -> str:
        items = sorted([*rest, ("page", str(number)), ("per_page", str(per_page))])
        return f"{path}?{urlencode(items)}"

    prev = 1 if page == 1 else page - 1
    nxt = page if page == total_pages else page + 1
    links = ((prev, "prev"), (nxt, "next"), (1, "first"), (total_pages, "last"))
    return ",".join(f"<{url(n)}>;rel={rel}" for n, rel in links)


def list_response(
    request: Request, items: list[Any], page: int, per_page: int, total: int
) -> Response:
    link = link_header(
        request.url.path, list(request.query_params.multi_items()), page, per_page, total
    )
    return json_response(items, headers={"Link": link})


def rfc3339(seconds: float) -> str:
    """Epoch seconds as RFC 3339 in UTC (Go's time.Time JSON form)."""
    if seconds <= 0:
        return "0001-01-01T00:00:00Z"
    text = dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat()
    return text.replace("+00:00", "Z")


def parse_rfc3339(text: str) -> float:
    try:
        moment = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(422, f"expected an RFC 3339 time, got {text[:40]!r}") from None
    if moment.tzinfo is None:
        raise ApiError(422, f"an RFC 3339 time needs its offset (Z or +HH:MM): {text[:40]!r}")
    return moment.timestamp()
