"""A whole HTTP body read into memory, up to a limit: a client's response and a server's
request stream their bodies the same way, and each caller names its own error."""

from __future__ import annotations

from collections.abc import AsyncIterable


async def collect(chunks: AsyncIterable[bytes], limit: int) -> bytes | None:
    """The chunks joined; None as soon as they pass `limit` bytes (the rest is not read)."""
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)
