"""A static file server on the h11 + sendfile layer, the benchmark's contender to nginx.

python -m benchmarks.file_server ROOT PORT
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

import trio

from dragonfly.net.http_response import send_file_response
from dragonfly.net.http_server import Request, Responder, serve


def make_handler(root: Path):
    root = root.resolve()

    async def handler(request: Request, responder: Responder) -> None:
        if request.method not in ("GET", "HEAD"):
            await responder.send(405, b"method not allowed\n")
            return
        path = (root / unquote(urlsplit(request.target).path).lstrip("/")).resolve()
        if root not in path.parents or not path.is_file():
            await responder.send(404, b"not found\n")
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            await send_file_response(request, responder, fd, size)
        finally:
            os.close(fd)

    return handler


async def main(root: Path, port: int) -> None:
    await serve(make_handler(root), "127.0.0.1", port)


if __name__ == "__main__":
    trio.run(main, Path(sys.argv[1]), int(sys.argv[2]))
