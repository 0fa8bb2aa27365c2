"""Task identity and piece sizing (sans-I/O).

Every peer in a cluster must derive the same task ID for the same content, or
the swarm splits. The ID is a sha256 over the URL with the query parameters that
change per request (signatures, expiry, session tokens of signed URLs) removed,
plus the tag, the application and an explicit piece length when one is given.
For OCI blobs the blob digest itself is the ID, so one layer pulled from two
registries or two repositories is one task.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import unquote_plus, urlsplit, urlunsplit

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

MIN_PIECE_LENGTH = 4 * MiB
MAX_PIECE_LENGTH = 64 * MiB
TARGET_PIECE_COUNT = 500
# An explicit piece length (a task that names one) is a power of two in this range:
# one byte per piece would make the origin serve one request and the store write one
# row per byte.
MIN_EXPLICIT_PIECE_LENGTH = 1 * MiB
MAX_EXPLICIT_PIECE_LENGTH = MAX_PIECE_LENGTH

# Query parameters of signed URLs: they differ per request for the same object.
# A trailing "*" is a prefix match; matching is case-insensitive.
DEFAULT_FILTERED_QUERY_PARAMS: tuple[str, ...] = (
    # AWS S3 (SigV4 and SigV2) and S3-compatible stores
    "X-Amz-*",
    "AWSAccessKeyId",
    # Google Cloud Storage
    "X-Goog-*",
    "GoogleAccessId",
    # Alibaba OSS and Huawei OBS (SigV2-style query signing)
    "OSSAccessKeyId",
    "AccessKeyId",
    "Expires",
    "Signature",
    "SecurityToken",
    "security-token",
    "x-obs-security-token",
    # Tencent COS
    "q-*",
    "x-cos-security-token",
)

_SHA256_DIGEST = re.compile(r"^sha256:([0-9a-f]{64})$")


class IdentityError(ValueError):
    """A URL or digest that cannot name a task."""


@dataclass(frozen=True, slots=True)
class QueryFilter:
    """Decides which query parameters are left out of a task ID."""

    exact: frozenset[str]
    prefixes: tuple[str, ...]

    @classmethod
    def from_patterns(cls, patterns: Iterable[str]) -> QueryFilter:
        exact: set[str] = set()
        prefixes: list[str] = []
        for pattern in patterns:
            p = pattern.strip().lower()
            if not p:
                continue
            if p.endswith("*"):
                prefixes.append(p[:-1])
            else:
                exact.add(p)
        return cls(frozenset(exact), tuple(prefixes))

    def drops(self, name: str) -> bool:
        n = name.lower()
        return n in self.exact or any(n.startswith(p) for p in self.prefixes)


DEFAULT_QUERY_FILTER = QueryFilter.from_patterns(DEFAULT_FILTERED_QUERY_PARAMS)


def filter_url(url: str, query_filter: QueryFilter = DEFAULT_QUERY_FILTER) -> str:
    """The URL with filtered query parameters removed and the fragment dropped.

    The remaining parameters are kept byte-for-byte and in order: re-encoding
    them ('%7E' → '~', 'flag' → 'flag=', ';' → '%3B') would give a signed URL
    a different task ID than the same URL unsigned, and reordering could merge
    two URLs an origin treats as different. Only a parameter's name is decoded,
    to match it against the filter.
    """
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise IdentityError(f"invalid URL {url!r}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise IdentityError(f"URL must be absolute http(s), got {url!r}")
    segments = parts.query.split("&")
    kept = [s for s in segments if not query_filter.drops(unquote_plus(s.partition("=")[0]))]
    query = "&".join(kept) if len(kept) != len(segments) else parts.query
    return urlunsplit((parts.scheme, parts.netloc, parts.path or "/", query, ""))


def task_id(
    url: str,
    *,
    tag: str = "",
    application: str = "",
    piece_length: int | None = None,
    filtered_query_params: Sequence[str] = (),
    use_default_filters: bool = True,
) -> str:
    """The task ID (64 hex chars) for a URL download.

    `filtered_query_params` are added to the defaults (or replace them when
    `use_default_filters` is false).
    """
    query_filter = _query_filter(filtered_query_params, use_default_filters)
    if piece_length is not None and piece_length <= 0:
        raise IdentityError(f"piece length must be positive, got {piece_length}")
    h = hashlib.sha256()
    # Length-prefixed fields: no two different inputs share an encoding.
    for field in (
        "dragonfly-task-v1",
        filter_url(url, query_filter),
        tag,
        application,
        str(piece_length) if piece_length is not None else "",
    ):
        data = field.encode()
        h.update(len(data).to_bytes(4, "big"))
        h.update(data)
    return h.hexdigest()


def _query_filter(filtered_query_params: Sequence[str], use_defaults: bool = True) -> QueryFilter:
    """The defaults plus `filtered_query_params` (or these alone)."""
    if use_defaults and not filtered_query_params:
        return DEFAULT_QUERY_FILTER
    patterns = list(DEFAULT_FILTERED_QUERY_PARAMS) if use_defaults else []
    return QueryFilter.from_patterns([*patterns, *filtered_query_params])


# Request headers that always carry credentials.
CREDENTIAL_HEADERS = ("authorization", "cookie")


def carries_credentials(
    url: str,
    headers: Mapping[str, str],
    filtered_query_params: Sequence[str] = (),
    *,
    extra_headers: Sequence[str] = (),
) -> bool:
    """Whether a request carries credentials: Authorization or Cookie, a header named in
    `extra_headers` (X-Api-Key, PRIVATE-TOKEN...), or a query parameter left out of the
    task ID (the signature of a presigned URL). A task made by such a request is private:
    its ID is shared with requests that carry none, so the origin decides per client."""
    names = {*CREDENTIAL_HEADERS, *(h.strip().lower() for h in extra_headers)}
    if any(name.lower() in names for name in headers):
        return True
    if "?" not in url:
        return False  # (no query: no parameter left out of the ID)
    query_filter = _query_filter(filtered_query_params)
    query = urlsplit(url).query
    return any(
        query_filter.drops(unquote_plus(segment.partition("=")[0]))
        for segment in query.split("&")
        if segment
    )


def blob_task_id(digest: str) -> str:
    """The task ID of an OCI blob: the hex of its sha256 digest."""
    m = _SHA256_DIGEST.match(digest.strip())
    if m is None:
        raise IdentityError(f"blob digest must be 'sha256:' and 64 lowercase hex, got {digest!r}")
    return m.group(1)


def is_sha256_digest(digest: str) -> bool:
    """'sha256:' and 64 lowercase hex, exactly."""
    return _SHA256_DIGEST.match(digest) is not None


def parse_sha256_digest(digest: str) -> bytes:
    """'sha256:HEX' to the 32 raw bytes."""
    return bytes.fromhex(blob_task_id(digest))


def next_power_of_two(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def check_piece_length(piece_length: int) -> int:
    """An explicit piece length: a power of two in [1 MiB, 64 MiB], else IdentityError."""
    if (
        not MIN_EXPLICIT_PIECE_LENGTH <= piece_length <= MAX_EXPLICIT_PIECE_LENGTH
        or piece_length & (piece_length - 1)
    ):
        raise IdentityError(
            f"piece length must be a power of two from {MIN_EXPLICIT_PIECE_LENGTH} to "
            f"{MAX_EXPLICIT_PIECE_LENGTH} bytes, got {piece_length}"
        )
    return piece_length


def piece_length_for(content_length: int, explicit: int | None = None) -> int:
    """The one rule for a task's piece length: an explicit one (checked), else
    next_power_of_two(content_length / 500) in [4 MiB, 64 MiB].

    An unknown length (negative) gets the minimum: the file is cut as it streams.
    """
    if explicit is not None:
        return check_piece_length(explicit)
    if content_length <= 0:
        return MIN_PIECE_LENGTH
    wanted = next_power_of_two(-(-content_length // TARGET_PIECE_COUNT))
    return min(MAX_PIECE_LENGTH, max(MIN_PIECE_LENGTH, wanted))


def piece_count(content_length: int, piece_length: int) -> int:
    """Number of pieces; an empty file has none."""
    if content_length < 0:
        raise IdentityError("piece count of a file of unknown length")
    return -(-content_length // piece_length)


def piece_range(number: int, content_length: int, piece_length: int) -> tuple[int, int]:
    """(offset, length) of piece `number`."""
    offset = number * piece_length
    if number < 0 or offset >= content_length:
        raise IdentityError(f"piece {number} is outside a file of {content_length} bytes")
    return offset, min(piece_length, content_length - offset)


@dataclass(frozen=True, slots=True)
class PieceLayout:
    """How a file of known length is cut into pieces: every piece is ``piece_length``
    bytes but the last, which holds the rest."""

    content_length: int
    piece_length: int

    def __post_init__(self) -> None:
        if self.content_length < 0 or self.piece_length <= 0:
            raise IdentityError(
                f"no layout for {self.content_length} bytes in {self.piece_length}-byte pieces"
            )

    @property
    def piece_count(self) -> int:
        return -(-self.content_length // self.piece_length)

    def offset(self, number: int) -> int:
        return number * self.piece_length

    def length(self, number: int) -> int:
        """Bytes in piece `number` (which must exist)."""
        return piece_range(number, self.content_length, self.piece_length)[1]

    def pieces_of(self, start: int, end: int) -> range:
        """The pieces holding bytes [start, end] (inclusive), clipped to the file."""
        last = min(end, self.content_length - 1)
        if start > last:
            return range(0)
        return range(start // self.piece_length, last // self.piece_length + 1)


def spec_task_id(
    url: str,
    *,
    tag: str = "",
    application: str = "",
    filtered_query_params: Sequence[str] = (),
    piece_length: int | None = None,
    digest: str = "",
    scope: str = "",
) -> str:
    """The ID of a task made of these fields (see wire.messages.TaskSpec)."""
    return _spec_task_id(
        url, tag, application, tuple(filtered_query_params), piece_length, digest, scope
    )


# Every proxy request and every registration names its task's fields: the same few URLs
# many times over. (An IdentityError is raised again each time: lru_cache keeps no error.)
@functools.lru_cache(maxsize=4096)
def _spec_task_id(
    url: str,
    tag: str,
    application: str,
    filtered_query_params: tuple[str, ...],
    piece_length: int | None,
    digest: str,
    scope: str,
) -> str:
    if piece_length is not None:
        check_piece_length(piece_length)
    if digest:
        return blob_task_id(digest)
    return task_id(
        url,
        tag=f"{tag}\0credentials:{scope}" if scope else tag,
        application=application,
        piece_length=piece_length,
        filtered_query_params=filtered_query_params,
    )


def credential_scope(headers: dict[str, str]) -> str:
    """The scope of a download made with someone's credentials (Authorization, Cookie),
    "" when it carries none."""
    credentials = headers.get("authorization", "") + "\0" + headers.get("cookie", "")
    if credentials == "\0":
        return ""
    return hashlib.sha256(credentials.encode()).hexdigest()[:32]
