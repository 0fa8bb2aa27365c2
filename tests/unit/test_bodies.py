"""collect: a whole body up to a limit (dragonfly/net/bodies.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from dragonfly.net.bodies import collect


async def _chunks(parts: list[bytes], taken: list[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        taken.append(part)
        yield part


async def test_joins_every_chunk_up_to_the_limit() -> None:
    taken: list[bytes] = []
    assert await collect(_chunks([b"ab", b"", b"cd"], taken), 4) == b"abcd"
    assert await collect(_chunks([], taken), 0) == b""


async def test_past_the_limit_is_none_and_reads_no_further() -> None:
    taken: list[bytes] = []
    assert await collect(_chunks([b"ab", b"cde", b"never"], taken), 4) is None
    assert taken == [b"ab", b"cde"]
