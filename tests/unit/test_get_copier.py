"""`dragonfly get`'s copy out of the task file (dragonfly/get.py Copier): the verified
prefix as it grows, the pieces verified past it as they land, the file only at the end."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dragonfly.get import Copier, GetError, _ranges

PIECE = 4096


def task_file(tmp_path: Path, size: int) -> tuple[Path, bytes]:
    data = os.urandom(size)
    source = tmp_path / "task"
    source.write_bytes(data)
    return source, data


def piece(n: int, size: int) -> tuple[int, int]:
    return n * PIECE, min(PIECE, size - n * PIECE)


def test_pieces_ahead_are_copied_as_they_land_and_not_again(tmp_path: Path) -> None:
    size = 5 * PIECE + 100
    source, data = task_file(tmp_path, size)
    copier = Copier(tmp_path / "out", None)
    assert not copier.behind(0, []) and copier.behind(0, [piece(3, size)])
    copier.advance(source, PIECE, [piece(3, size), piece(5, size)])
    assert not copier.behind(PIECE, []) and copier.behind(2 * PIECE, [])
    assert copier.copied == PIECE
    out = copier.tmp.read_bytes()
    assert out[3 * PIECE : 4 * PIECE] == data[3 * PIECE : 4 * PIECE]  # out before the prefix
    assert out[5 * PIECE :] == data[5 * PIECE :]
    os.truncate(source, 0)  # nothing is read again from here on: pieces 0, 3 and 5 are out
    with pytest.raises(GetError, match="shorter"):
        copier.advance(source, 2 * PIECE)  # piece 1 was not
    source.write_bytes(data)
    copier.advance(source, 4 * PIECE, [piece(3, size)])  # 3 told again: skipped
    assert copier.copied == 4 * PIECE
    copier.finish(source, size, hard_link=False)
    assert (tmp_path / "out").read_bytes() == data
    assert not copier.tmp.exists()


def test_with_a_digest_only_the_prefix_is_copied_in_order(tmp_path: Path) -> None:
    size = 3 * PIECE
    source, data = task_file(tmp_path, size)
    copier = Copier(tmp_path / "out", hashlib.sha256(data).digest())
    assert not copier.behind(0, [piece(2, size)])  # nothing it would copy
    copier.advance(source, 0, [piece(2, size)])
    assert not copier.tmp.exists()  # nothing copied ahead: the hash goes in order
    copier.finish(source, size, hard_link=False)
    assert (tmp_path / "out").read_bytes() == data


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 8), st.sets(st.integers(0, 8))), max_size=12))
def test_any_order_of_lines_copies_exactly_the_file(
    tmp_path_factory: pytest.TempPathFactory, lines: list[tuple[int, set[int]]]
) -> None:
    """Lines as the daemon sends them (the prefix only grows; pieces told past it), in
    any pattern: the file that appears is the task file."""
    tmp_path = tmp_path_factory.mktemp("copier")
    size = 8 * PIECE + 7
    source, data = task_file(tmp_path, size)
    copier = Copier(tmp_path / "out", None)
    ready_pieces, told = 0, set()
    for grow, landed in lines:
        ready_pieces = min(9, ready_pieces + grow)
        ahead = sorted(n for n in landed if n > ready_pieces and n not in told)
        told.update(ahead)
        ready = min(ready_pieces * PIECE, size)
        copier.advance(source, ready, [piece(n, size) for n in ahead])
        assert copier.copied == ready
    copier.finish(source, size, hard_link=False)
    assert (tmp_path / "out").read_bytes() == data


@pytest.mark.parametrize(
    "value", ["x", [[1]], [[1, -2]], [["1", 2]], [[True, 2]], [[0, 1, 2]], {"a": 1}]
)
def test_a_malformed_ahead_is_a_clear_error(value: object) -> None:
    with pytest.raises(GetError, match="malformed 'ahead'"):
        _ranges(value)
    assert _ranges([[0, 5], [10, 5]]) == [(0, 5), (10, 5)]
