"""HTTP pieces shared by the h11 server and client (sans-I/O): headers, ranges."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

HeaderPairs = list[tuple[bytes, bytes]]

# Hop-by-hop headers (RFC 9110 7.6.1): never forwarded by a proxy.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


class Headers:
    """An ordered, case-insensitive multi-map of header names (lowercase) to values."""

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[bytes | str, bytes | str]] = ()) -> None:
        self._items: HeaderPairs = [(_b(k).lower(), _b(v)) for k, v in items]

    @classmethod
    def lowercase(cls, items: Iterable[tuple[bytes, bytes]]) -> Headers:
        """Headers whose names are lowercase bytes already (h11's events): not converted
        again (a request's headers are read on every one of a server's requests)."""
        headers = cls.__new__(cls)
        headers._items = list(items)
        return headers

    def get(self, name: str | bytes, default: str | None = None) -> str | None:
        key = _key(name)
        for k, v in self._items:
            if k == key:
                return v.decode("latin-1")
        return default

    def get_all(self, name: str | bytes) -> list[str]:
        key = _b(name).lower()
        return [v.decode("latin-1") for k, v in self._items if k == key]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, (str, bytes)):
            return False
        key = _key(name)
        for k, _ in self._items:  # noqa: SIM110  (no generator made per call: a hot path)
            if k == key:
                return True
        return False

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"

    def set(self, name: str | bytes, value: str | bytes) -> None:
        self.remove(name)
        self._items.append((_b(name).lower(), _b(value)))

    def add(self, name: str | bytes, value: str | bytes) -> None:
        self._items.append((_b(name).lower(), _b(value)))

    def remove(self, name: str | bytes) -> None:
        key = _b(name).lower()
        self._items = [(k, v) for k, v in self._items if k != key]

    def pairs(self) -> HeaderPairs:
        return list(self._items)

    def without_hop_by_hop(self) -> Headers:
        """A copy without hop-by-hop headers, including those named in Connection."""
        named = {
            token.strip().lower().encode("latin-1")
            for value in self.get_all("connection")
            for token in value.split(",")
        }
        drop = HOP_BY_HOP | named
        return Headers((k, v) for k, v in self._items if k not in drop)


def _b(value: str | bytes) -> bytes:
    return value.encode("latin-1") if isinstance(value, str) else value


_KEYS: dict[str | bytes, bytes] = {}


def _key(name: str | bytes) -> bytes:
    """A header name as stored (lowercase bytes); the names a program asks for are few,
    so they are converted once (the cache is bounded all the same)."""
    key = _KEYS.get(name)
    if key is None:
        key = _b(name).lower()
        if len(_KEYS) < 512:
            _KEYS[name] = key
    return key


class RangeNotSatisfiable(ValueError):
    """A Range header that no byte of the representation satisfies (416)."""


@dataclass(frozen=True, slots=True)
class ByteRange:
    """An inclusive byte range [start, end] of a representation of `total` bytes."""

    start: int
    end: int
    total: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self) -> str:
        return f"bytes {self.start}-{self.end}/{self.total}"


# re.ASCII: without it \d also matches non-ASCII digits, which int() would accept.
_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE | re.ASCII)

# Positions are converted only up to this many significant digits: int() of a huge digit
# string is slow and past 4300 digits raises ValueError. 10**19 exceeds any real size
# (sizes fit in a signed 64-bit integer), so a longer number stands for "larger than any".
_MAX_DIGITS = 19
_HUGE: int = 10**_MAX_DIGITS


def _position(digits: str) -> int:
    """A decimal byte position, capped at _HUGE (which no representation reaches)."""
    significant = digits.lstrip("0")
    if len(significant) > _MAX_DIGITS:
        return _HUGE
    return int(significant or "0")


def parse_content_length(value: str | None) -> int | None:
    """A Content-Length value as an int; None if absent, not plain ASCII digits, or absurd."""
    if value is None:
        return None
    value = value.strip()
    if not value.isascii() or not value.isdigit():
        return None
    n = _position(value)
    return None if n >= _HUGE else n


def parse_range(header: str | None, total: int) -> ByteRange | None:
    """Parse a single-range `Range` header against a representation of `total` bytes.

    None means "serve the whole representation": no header, a header we do not
    understand, or several ranges (RFC 9110 lets a server ignore Range).
    Raises RangeNotSatisfiable for a syntactically valid range outside the body.
    Positions too large for any file are handled without converting them whole:
    a huge first position is unsatisfiable, a huge last one means "to the end".
    """
    if header is None:
        return None
    m = _RANGE.match(header)
    if m is None:
        return None
    first, last = m.group(1), m.group(2)
    if first == "" and last == "":
        return None
    if first == "":
        suffix = _position(last)
        if suffix == 0 or total == 0:
            raise RangeNotSatisfiable(f"suffix range {header[:64]!r} of a {total}-byte body")
        return ByteRange(max(0, total - suffix), total - 1, total)
    start = _position(first)
    end = _position(last) if last else total - 1
    if last and end < start:
        return None  # invalid: ignore the header
    if start >= total:
        raise RangeNotSatisfiable(f"range {header[:64]!r} starts past a {total}-byte body")
    return ByteRange(start, min(end, total - 1), total)


_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE | re.ASCII)


def parse_content_range(header: str | None) -> tuple[int, int, int | None] | None:
    """'bytes 0-99/1000' → (0, 99, 1000); total None for '*'; None if absent or invalid
    (including positions too large for any file)."""
    if header is None:
        return None
    m = _CONTENT_RANGE.match(header)
    if m is None:
        return None
    start, end = _position(m.group(1)), _position(m.group(2))
    total = None if m.group(3) == "*" else _position(m.group(3))
    if end >= _HUGE or (total is not None and total >= _HUGE):
        return None
    if end < start or (total is not None and end >= total):
        return None
    return start, end, total
