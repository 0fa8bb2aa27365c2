"""The downloads in progress on a peer, one per task, shared by every client."""

from __future__ import annotations

import trio

from dragonfly.peer.context import DownloadServices
from dragonfly.peer.download import Download
from dragonfly.peer.request import DownloadRequest


class TaskManager:
    """The downloads in progress on this peer, one per task, shared by every client."""

    def __init__(self, daemon: DownloadServices, nursery: trio.Nursery) -> None:
        self.daemon = daemon
        self.nursery = nursery
        self.downloads: dict[str, Download] = {}

    def open(self, request: DownloadRequest) -> Download:
        """The running download of the task, or a new one (a finished task is a local hit).

        A whole-task request widens a running range-only download to the whole task.
        """
        current = self.downloads.get(request.task_id)
        if current is not None and current.error is None and current.accepting:
            if request.whole:
                current.want_all()
            return current
        download = Download(self.daemon, request)
        self.downloads[request.task_id] = download
        self.nursery.start_soon(self._run, download)
        return download

    async def _run(self, download: Download) -> None:
        try:
            await download.run()
        finally:
            if self.downloads.get(download.task_id) is download:
                del self.downloads[download.task_id]

    def active(self, task_id: str) -> Download | None:
        return self.downloads.get(task_id)
