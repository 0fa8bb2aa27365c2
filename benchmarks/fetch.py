"""Download one URL to a file with dragonfly's h11 client (spliced, zero-copy).

python -m benchmarks.fetch URL OUT
"""

from __future__ import annotations

import os
import sys

import trio

from dragonfly.net.http_client import HTTPClient


async def fetch(url: str, out: str) -> int:
    client = HTTPClient()
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        async with client.request("GET", url) as response:
            if response.status != 200:
                raise SystemExit(f"{url}: HTTP {response.status}")
            return await response.splice_to(fd, 0)
    finally:
        os.close(fd)
        await client.aclose()


if __name__ == "__main__":
    print(trio.run(fetch, sys.argv[1], sys.argv[2]))
