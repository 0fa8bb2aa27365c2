"""A piece fetched from the origin (dragonfly/peer/source.py, OriginFetcher): slices fill
exactly the piece's bytes, one that fails fails the piece with its own error (not a
group of them), and a body shorter than the range asked for fails it too (never a hole
recorded as the origin's bytes)."""

from __future__ import annotations

import functools
import hashlib
import os
import time
from pathlib import Path

import pytest
import trio

from dragonfly.net.http_client import HTTPClient
from dragonfly.peer.source import OriginChanged, OriginError, OriginFetcher
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


async def _short_origin(stream: trio.SocketStream) -> None:
    """An origin whose 206 names the range asked for, but whose Content-Length and body
    stop 100 bytes short of it."""
    total = 2 * PIECE
    data = b""
    while True:
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            data += chunk
        head, data = data.split(b"\r\n\r\n", 1)
        line = next(h for h in head.split(b"\r\n") if h.lower().startswith(b"range:"))
        first, last = (int(x) for x in line.split(b"=", 1)[1].split(b"-"))
        size = last - first + 1 if last == first else last - first + 1 - 100
        await stream.send_all(
            b"HTTP/1.1 206 Partial Content\r\n"
            + f"Content-Range: bytes {first}-{last}/{total}\r\n".encode()
            + f'Content-Length: {size}\r\nETag: "v1"\r\n\r\n'.encode()
            + b"x" * size
        )


async def test_a_body_short_of_its_range_fails_the_piece(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        serve = functools.partial(trio.serve_tcp, _short_origin, 0, host="127.0.0.1")
        (listener,) = await nursery.start(serve)
        port = listener.socket.getsockname()[1]
        client = HTTPClient()
        try:
            fetcher = OriginFetcher(client, f"http://127.0.0.1:{port}/f.bin", {})
            await fetcher.probe()
            fd = os.open(tmp_path / "piece", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                with pytest.raises(OriginError, match="100 bytes short"):
                    await fetcher.fetch_piece(PieceSink(fd, 1, PIECE, PIECE))
            finally:
                os.close(fd)
        finally:
            await client.aclose()
        nursery.cancel_scope.cancel()
