"""The peer's local API for `python -m dragonfly get`, on a unix socket in the data
directory (DATA_DIR/api.sock, mode 0600 in a 0700 directory).

Only processes of the daemon's own user (and root) can open it: no client of the
proxy, and no request the proxy relays, can reach it. `POST /_dragonfly/tasks` with a
JSON body starts (or joins) a download and answers progress as JSON lines, each with
the task file's path, how many bytes from its start are verified (`ready`) and the
pieces verified past those since the last line (`ahead`: [offset, length] pairs), which
the client copies out itself while the rest arrives (it can read it: it is the same
user); the last line says the download succeeded or why it failed.
"""

from __future__ import annotations

import json

import trio

from dragonfly.blocklist import refused
from dragonfly.identity import IdentityError
from dragonfly.local_api_path import LOCAL_API
from dragonfly.net.http_server import Request, Responder
from dragonfly.peer.download import Download
from dragonfly.peer.request import DownloadFailed, DownloadRequest
from dragonfly.peer.services import PeerServices
from dragonfly.storage.taskfile import task_path


class LocalAPIHandler:
    """Routes of the local API socket."""

    def __init__(self, daemon: PeerServices) -> None:
        self.daemon = daemon

    async def __call__(self, request: Request, responder: Responder) -> None:
        path = request.target.split("?", 1)[0]
        if path != LOCAL_API or request.method != "POST":
            await responder.send(404, f"not found: POST {LOCAL_API}\n".encode())
            return
        try:
            spec = json.loads(await request.read_body(limit=1 << 20))
            url = spec["url"]
            if not isinstance(url, str):
                raise TypeError("url must be a string")
            headers = spec.get("headers", {})
            req = DownloadRequest.for_url(
                url,
                tag=str(spec.get("tag", "")),
                application=str(spec.get("application", "")),
                headers={str(k).lower(): str(v) for k, v in headers.items()},
                filtered_query_params=list(self.daemon.config.proxy.filtered_query_params)
                + [str(p) for p in spec.get("filtered_query_params", [])],
                back_to_source=bool(spec.get("back_to_source", True)),
                credential_headers=self.daemon.config.proxy.credential_headers,
            )
        except (ValueError, KeyError, TypeError, AttributeError, IdentityError) as exc:
            await responder.send_error(400, f"bad download request: {exc}")
            return
        priority = spec.get("priority")
        refusal = refused(
            self.daemon.block_list, req.spec, None if priority is None else str(priority)
        )
        if refusal is not None:
            await responder.send_error(*refusal)
            return
        download = self.daemon.tasks.open(req)
        with download.attached():
            await self._report_progress(req, download, responder)

    async def _report_progress(
        self, req: DownloadRequest, download: Download, responder: Responder
    ) -> None:
        await responder.start(200, [(b"content-type", b"application/x-ndjson")])

        async def line(obj: dict[str, object]) -> None:
            await responder.write((json.dumps(obj) + "\n").encode())

        try:
            await download.wait_metadata()
            path = str(task_path(self.daemon.data_dir, req.task_id))
            told: set[int] = set()
            # `ready`: the verified bytes from the start of the file, and `ahead`: pieces
            # verified past them, which the client may copy out of `path` meanwhile.
            while not download.finished.is_set():
                ready = download.verified_prefix
                await line(
                    {
                        "completed": download.completed_bytes,
                        "total": download.content_length,
                        "ready": ready,
                        "ahead": download.verified_ahead(told),
                        "path": path,
                    }
                )
                with trio.move_on_after(0.1):
                    await download.wait_prefix_past(ready)
            await line(
                {
                    "state": "succeeded",
                    "task_id": req.task_id,
                    "path": path,
                    "content_length": download.content_length,
                    "completed": download.content_length,
                    "total": download.content_length,
                    "ready": download.content_length,
                }
            )
        except DownloadFailed as exc:
            await line({"state": "failed", "reason": exc.reason, "http_status": exc.http_status})
        await responder.finish()
