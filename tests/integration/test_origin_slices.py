"""A piece fetched from the origin in slices (dragonfly/peer/source.py, OriginFetcher):
the slices fill exactly the piece's bytes, and one that fails fails the piece with its
own error, not a group of them."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from dragonfly.net.http_client import HTTPClient
from dragonfly.peer.source import OriginChanged, OriginFetcher
from dragonfly.storage import PieceSink
from dragonfly.testing.nginx import Nginx
from tests.p2p_support import MiB, random_file

PIECE = 4 * MiB


async def _sliced(nginx: Nginx, piece: Path, parts: int, replace: Path | None = None) -> None:
    client = HTTPClient()
    try:
        fetcher = OriginFetcher(client, f"{nginx.url}/f.bin", {})
        await fetcher.probe()
        if replace is not None:  # a new version after the probe: other bytes, a new ETag
            later = time.time() + 10
            os.utime(replace, (later, later))
            os.replace(replace, replace.with_name("f.bin"))
        fd = os.open(piece, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            await fetcher.fetch_piece(PieceSink(fd, 1, PIECE, PIECE), parts)
        finally:
            os.close(fd)
    finally:
        await client.aclose()


def _second_piece(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(PIECE)
        return f.read(PIECE)


async def test_slices_fill_the_piece_with_the_origins_bytes(
    tmp_path: Path, www: Path, nginx: Nginx
) -> None:
    random_file(www / "f.bin", 2 * PIECE + 12345)
    await _sliced(nginx, tmp_path / "piece", parts=3)  # 4 MiB in three uneven slices
    got, want = _second_piece(tmp_path / "piece"), _second_piece(www / "f.bin")
    assert len(got) == PIECE and hashlib.sha256(got).digest() == hashlib.sha256(want).digest()


async def test_a_changed_origin_fails_a_sliced_piece_with_its_own_error(
    tmp_path: Path, www: Path, nginx: Nginx
) -> None:
    random_file(www / "f.bin", 2 * PIECE)
    random_file(www / "f.new", 2 * PIECE)
    with pytest.raises(OriginChanged, match="origin content changed during the download"):
        await _sliced(nginx, tmp_path / "piece", parts=4, replace=www / "f.new")
