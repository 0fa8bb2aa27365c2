"""Sans-I/O HTTP helpers: Range / Content-Range parsing and the Headers multi-map."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dragonfly.wire.http_common import (
    ByteRange,
    Headers,
    RangeNotSatisfiable,
    parse_content_length,
    parse_content_range,
    parse_range,
)

# -- Range ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "total", "want"),
    [
        (None, 100, None),
        ("bytes=0-9", 100, ByteRange(0, 9, 100)),
        ("bytes=10-", 100, ByteRange(10, 99, 100)),
        ("bytes=-7", 100, ByteRange(93, 99, 100)),
        ("bytes=-700", 100, ByteRange(0, 99, 100)),  # suffix longer than the body: all
        ("bytes=90-1000", 100, ByteRange(90, 99, 100)),  # last past the end: clamped
        ("BYTES = 1 - 2", 100, ByteRange(1, 2, 100)),
        ("bytes=0005-0009", 100, ByteRange(5, 9, 100)),
        ("bytes=9-5", 100, None),  # invalid: ignored
        ("bytes=-", 100, None),
        ("bytes=0-1,5-6", 100, None),  # several ranges: served whole
        ("items=0-1", 100, None),
        ("bytes=٣-٤", 100, None),  # non-ASCII digits are not digits here
    ],
)
def test_parse_range(header: str | None, total: int, want: ByteRange | None) -> None:
    assert parse_range(header, total) == want


@pytest.mark.parametrize(("header", "total"), [("bytes=100-", 100), ("bytes=-0", 100)])
def test_unsatisfiable_ranges(header: str, total: int) -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, total)


def test_empty_body_satisfies_no_range() -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_range("bytes=-5", 0)
    with pytest.raises(RangeNotSatisfiable):
        parse_range("bytes=0-", 0)


def test_huge_positions_are_handled_without_int_conversion_errors() -> None:
    """More than 4300 digits made int() raise ValueError: a 500 instead of an answer."""
    huge = "9" * 5000
    with pytest.raises(RangeNotSatisfiable):
        parse_range(f"bytes={huge}-", 100)
    with pytest.raises(RangeNotSatisfiable):
        parse_range(f"bytes={huge}-{huge}", 100)
    assert parse_range(f"bytes=10-{huge}", 100) == ByteRange(10, 99, 100)
    assert parse_range(f"bytes=-{huge}", 100) == ByteRange(0, 99, 100)
    assert parse_range(f"bytes={'0' * 5000}1-2", 100) == ByteRange(1, 2, 100)
    # 19 digits still fit: just past any real file
    with pytest.raises(RangeNotSatisfiable):
        parse_range("bytes=9999999999999999999-", 1 << 62)


@given(
    total=st.integers(min_value=0, max_value=1 << 63),
    first=st.one_of(st.just(""), st.integers(min_value=0).map(str), st.text("0123456789")),
    last=st.one_of(st.just(""), st.integers(min_value=0).map(str), st.text("0123456789")),
)
def test_parse_range_properties(total: int, first: str, last: str) -> None:
    try:
        r = parse_range(f"bytes={first}-{last}", total)
    except RangeNotSatisfiable:
        return
    if r is None:
        return
    assert 0 <= r.start <= r.end < total == r.total
    assert r.length == r.end - r.start + 1
    assert r.content_range() == f"bytes {r.start}-{r.end}/{total}"


@given(st.text(max_size=200), st.integers(min_value=0, max_value=1 << 40))
def test_parse_range_never_fails_otherwise(header: str, total: int) -> None:
    with contextlib.suppress(RangeNotSatisfiable):
        parse_range(header, total)


# -- Content-Range / Content-Length ---------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "want"),
    [
        (None, None),
        ("bytes 0-99/1000", (0, 99, 1000)),
        ("bytes 0-99/*", (0, 99, None)),
        ("Bytes 5-5/6", (5, 5, 6)),
        ("bytes 10-5/100", None),
        ("bytes 0-100/100", None),  # end past the total
        ("bytes */100", None),  # the 416 form carries no range
        ("bytes 0-99", None),
        ("bytes 0-" + "9" * 5000 + "/*", None),
        ("bytes 0-1/" + "9" * 5000, None),
        ("bytes " + "9" * 5000 + "-1/*", None),
    ],
)
def test_parse_content_range(header: str | None, want: tuple[int, int, int | None] | None) -> None:
    assert parse_content_range(header) == want


@given(
    start=st.integers(min_value=0, max_value=1 << 62),
    length=st.integers(min_value=1, max_value=1 << 40),
    extra=st.integers(min_value=0, max_value=1 << 40),
)
def test_content_range_round_trip(start: int, length: int, extra: int) -> None:
    r = ByteRange(start, start + length - 1, start + length + extra)
    assert parse_content_range(r.content_range()) == (r.start, r.end, r.total)


@given(st.text(max_size=100))
def test_parse_content_range_never_raises(header: str) -> None:
    parse_content_range(header)


@pytest.mark.parametrize(
    ("value", "want"),
    [
        (None, None),
        ("0", 0),
        (" 42 ", 42),
        ("-1", None),
        ("1e3", None),
        ("²", None),  # str.isdigit() says yes, int() says no
        ("9" * 5000, None),
    ],
)
def test_parse_content_length(value: str | None, want: int | None) -> None:
    assert parse_content_length(value) == want


# -- Headers --------------------------------------------------------------------------------


def test_headers_are_case_insensitive_and_ordered() -> None:
    h = Headers([("Content-Type", "text/plain"), (b"X-A", b"1"), ("x-a", "2")])
    assert h.get("content-type") == "text/plain"
    assert h.get(b"CONTENT-TYPE") == "text/plain"
    assert h.get("missing") is None and h.get("missing", "d") == "d"
    assert h.get_all("X-a") == ["1", "2"]
    assert "X-A" in h and b"x-a" in h and "nope" not in h and 5 not in h
    assert list(h) == [(b"content-type", b"text/plain"), (b"x-a", b"1"), (b"x-a", b"2")]
    assert len(h) == 3
    h.set("X-A", "3")
    assert h.get_all("x-a") == ["3"]
    h.add("x-a", "4")
    assert h.get_all("x-a") == ["3", "4"]
    h.remove("X-A")
    assert "x-a" not in h
    pairs = h.pairs()
    pairs.append((b"z", b"z"))
    assert "z" not in h  # pairs() is a copy


def test_latin1_values_round_trip() -> None:
    h = Headers([(b"x", b"caf\xe9")])
    assert h.get("x") == "café"
    h2 = Headers([("y", "café")])
    assert h2.pairs() == [(b"y", b"caf\xe9")]


def test_without_hop_by_hop_drops_listed_and_named_headers() -> None:
    h = Headers(
        [
            ("Connection", "keep-alive, X-Secret"),
            ("Keep-Alive", "timeout=5"),
            ("Transfer-Encoding", "chunked"),
            ("X-Secret", "s"),
            ("Upgrade", "websocket"),
            ("Content-Length", "5"),
            ("X-Keep", "k"),
        ]
    )
    assert h.without_hop_by_hop().pairs() == [(b"content-length", b"5"), (b"x-keep", b"k")]
    assert len(h) == 7  # the original is untouched


@given(
    st.lists(
        st.tuples(st.text("abcXYZ-", min_size=1, max_size=5), st.text(max_size=10).map(str.strip)),
        max_size=10,
    )
)
def test_headers_get_all_matches_a_lowercase_scan(items: list[tuple[str, str]]) -> None:
    latin = [(k, v.encode("latin-1", "replace").decode("latin-1")) for k, v in items]
    h = Headers(latin)
    for name, _ in latin:
        want = [v for k, v in latin if k.lower() == name.lower()]
        assert h.get_all(name.upper()) == want
        assert h.get(name) == want[0]
