"""Task IDs and piece sizing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dragonfly.identity import (
    MAX_PIECE_LENGTH,
    MIN_PIECE_LENGTH,
    IdentityError,
    MiB,
    blob_task_id,
    filter_url,
    piece_count,
    piece_length_for,
    piece_range,
    task_id,
)

BASE = "http://origin.example/models/model.bin"


def test_signed_url_parameters_do_not_change_the_task() -> None:
    plain = task_id(BASE)
    s3 = (
        BASE + "?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=a%2F20261129&"
        "X-Amz-Date=20261129T000000Z&X-Amz-Expires=900&X-Amz-Signature=abc&X-Amz-SignedHeaders=host"
    )
    gcs = BASE + "?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Signature=ff&X-Goog-Expires=60"
    oss = BASE + "?OSSAccessKeyId=k&Expires=1700000000&Signature=s%3D&security-token=t"
    cos = BASE + "?q-sign-algorithm=sha1&q-ak=k&q-sign-time=1;2&q-key-time=1;2&q-signature=x"
    obs = BASE + "?AccessKeyId=k&Expires=1&Signature=s&x-obs-security-token=t"
    assert {task_id(u) for u in (s3, gcs, oss, cos, obs)} == {plain}


def test_other_parameters_and_their_order_matter() -> None:
    assert task_id(BASE + "?version=1") != task_id(BASE + "?version=2")
    assert task_id(BASE + "?a=1&b=2") != task_id(BASE + "?b=2&a=1")
    assert filter_url(BASE + "?a=1&X-Amz-Date=1&b=2") == BASE + "?a=1&b=2"
    assert filter_url(BASE + "#frag") == BASE


@pytest.mark.parametrize(
    "query",
    [
        "a=b%7E",  # urlencode would decode %7E to ~
        "flag",  # urlencode would write flag=
        "a=1;b=2",  # urlencode would escape ; as %3B
        "a=%2F+b&c=d%20e",
        "a=1&&b=",
        "x=%E2%9C%93&y=a+b",
        "Expires",  # a bare filtered name is still filtered; nothing is left
    ],
)
def test_filtering_keeps_the_other_parameters_byte_for_byte(query: str) -> None:
    """Signed and unsigned URLs of one object must be one task, whatever the encoding."""
    unsigned = BASE + "?" + query
    kept = "" if query == "Expires" else "?" + query
    assert filter_url(unsigned) == BASE + kept
    for signed in (
        f"{unsigned}&Expires=1&Signature=s%3D",
        f"{BASE}?X-Amz-Date=1&{query}&X-Amz-Signature=x",
        f"{BASE}?OSSAccessKeyId=k&{query}",
    ):
        assert filter_url(signed) == BASE + kept
        assert task_id(signed) == task_id(unsigned)


def test_filtered_names_are_matched_decoded() -> None:
    assert filter_url(BASE + "?X%2DAmz%2DDate=1&a=1") == BASE + "?a=1"
    assert filter_url(BASE + "?expires=1&a=1&SIGNATURE=2") == BASE + "?a=1"
    assert filter_url(BASE + "?Expiresx=1&a=1") == BASE + "?Expiresx=1&a=1"


def test_user_filters_add_to_the_defaults() -> None:
    a = task_id(BASE + "?token=1&X-Amz-Signature=x", filtered_query_params=["token"])
    b = task_id(BASE + "?token=2", filtered_query_params=["token"])
    assert a == b == task_id(BASE, filtered_query_params=["token"])
    assert task_id(BASE, filtered_query_params=["token"]) == task_id(BASE)
    only_user = task_id(BASE + "?X-Amz-Date=1", use_default_filters=False)
    assert only_user != task_id(BASE)


def test_tag_application_and_piece_length_separate_tasks() -> None:
    ids = {
        task_id(BASE),
        task_id(BASE, tag="t"),
        task_id(BASE, application="app"),
        task_id(BASE, piece_length=8 * MiB),
        task_id(BASE, tag="ta", application="pp"),
        task_id(BASE, tag="t", application="app"),
    }
    assert len(ids) == 6
    assert len(task_id(BASE)) == 64


def test_bad_urls_are_named() -> None:
    for bad in ("ftp://x/y", "/relative", "http://", "http://[::1"):
        with pytest.raises(IdentityError):
            task_id(bad)


def test_blob_task_id_is_the_digest() -> None:
    hexd = "a" * 64
    assert blob_task_id(f"sha256:{hexd}") == hexd
    for bad in ("sha256:xyz", "sha512:" + "a" * 128, "a" * 64, "sha256:" + "A" * 64):
        with pytest.raises(IdentityError):
            blob_task_id(bad)


@pytest.mark.parametrize(
    ("length", "expected"),
    [
        (-1, 4 * MiB),
        (0, 4 * MiB),
        (1, 4 * MiB),
        (1024 * MiB, 4 * MiB),
        (2000 * MiB, 4 * MiB),
        (2001 * MiB, 8 * MiB),
        (10 * 1024 * MiB, 32 * MiB),
        (100 * 1024 * MiB, 64 * MiB),
    ],
)
def test_piece_length(length: int, expected: int) -> None:
    assert piece_length_for(length) == expected


@given(st.integers(min_value=1, max_value=2**45))
def test_piece_length_properties(length: int) -> None:
    p = piece_length_for(length)
    assert MIN_PIECE_LENGTH <= p <= MAX_PIECE_LENGTH
    assert p & (p - 1) == 0
    if MIN_PIECE_LENGTH < p < MAX_PIECE_LENGTH:
        assert p >= length / 500 > p / 2
    n = piece_count(length, p)
    first, last = piece_range(0, length, p), piece_range(n - 1, length, p)
    assert first[0] == 0 and 0 < last[1] <= p
    assert (n - 1) * p + last[1] == length == last[0] + last[1]


def test_piece_range_bounds() -> None:
    assert piece_count(0, 4 * MiB) == 0
    assert piece_range(1, 5 * MiB, 4 * MiB) == (4 * MiB, MiB)
    with pytest.raises(IdentityError):
        piece_range(2, 5 * MiB, 4 * MiB)
    assert piece_length_for(123, explicit=1 * MiB) == MiB
