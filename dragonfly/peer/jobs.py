"""A host's part in the manager's jobs, asked by its scheduler: download a task whole
with no client (a preheat), say whether it holds a task, delete a task from its disk.

The task of a DownloadTask is recomputed from its fields: the scheduler's word for its
ID is not taken. A download runs as a client's would (registered with the scheduler,
peer-to-peer where it can), and the answer goes back once the task is whole or has
failed. A task in use (a download or an upload reading it) is deleted once it is
released, waited for up to DELETE_WAIT.
"""

from __future__ import annotations

import contextlib

import trio

from dragonfly.identity import IdentityError
from dragonfly.log import get_logger
from dragonfly.peer.context import DownloadServices
from dragonfly.peer.request import DownloadFailed, DownloadRequest
from dragonfly.peer.scheduler_client import JobMessage, SchedulerConnection, SchedulerLost
from dragonfly.peer.tasks import TaskManager
from dragonfly.storage import StorageError, TaskInUse, TaskState
from dragonfly.wire.messages import DeleteTask, DownloadTask, StatTask, TaskAnswer

log = get_logger("dragonfly.peer.jobs")

DELETE_WAIT = 10.0
DELETE_RETRY = 0.2


class HostJobs:
    def __init__(self, daemon: DownloadServices, tasks: TaskManager) -> None:
        self.daemon = daemon
        self.tasks = tasks

    async def handle(self, msg: JobMessage, conn: SchedulerConnection) -> None:
        if isinstance(msg, DownloadTask):
            answer = await self.download(msg)
        elif isinstance(msg, StatTask):
            answer = await self.stat(msg)
        else:
            answer = await self.delete(msg)
        with contextlib.suppress(SchedulerLost):
            await conn.send(answer)

    async def download(self, msg: DownloadTask) -> TaskAnswer:
        def failed(reason: str) -> TaskAnswer:
            log.warning("preheat failed", task_id=msg.task_id, reason=reason)
            return TaskAnswer(ref=msg.ref, task_id=msg.task_id, ok=False, reason=reason[:1024])

        try:
            request = DownloadRequest(msg.task, dict(msg.headers), private=msg.private)
        except IdentityError as exc:
            return failed(f"bad task: {exc}")
        if request.task_id != msg.task_id:
            return failed(f"task ID {msg.task_id!r} is not the ID of its fields")
        log.info("preheat", task_id=msg.task_id, url=msg.task.url)
        download = self.tasks.open(request)
        try:
            await download.wait_finished()
        except DownloadFailed as exc:
            return failed(exc.reason)
        return TaskAnswer(
            ref=msg.ref,
            task_id=msg.task_id,
            ok=True,
            held=True,
            content_length=max(-1, download.content_length),
        )

    async def stat(self, msg: StatTask) -> TaskAnswer:
        record = await self.daemon.store.get_task(msg.task_id)
        held = record is not None and record.state == TaskState.SUCCEEDED
        return TaskAnswer(
            ref=msg.ref,
            task_id=msg.task_id,
            held=held,
            content_length=record.content_length if held and record is not None else -1,
        )

    async def delete(self, msg: DeleteTask) -> TaskAnswer:
        store = self.daemon.store
        record = await store.get_task(msg.task_id)
        if record is None:
            return TaskAnswer(ref=msg.ref, task_id=msg.task_id, ok=True, held=False)
        reason = ""
        with trio.move_on_after(DELETE_WAIT):
            while True:
                try:
                    await store.delete_task(msg.task_id)
                    reason = ""
                    break
                except TaskInUse:
                    reason = f"the task is in use after {DELETE_WAIT:g}s"
                except StorageError as exc:
                    reason = f"deleting failed: {exc}"
                    break
                await trio.sleep(DELETE_RETRY)
        if reason:
            log.warning("task not deleted", task_id=msg.task_id, reason=reason)
        else:
            log.info("task deleted", task_id=msg.task_id)
        return TaskAnswer(
            ref=msg.ref, task_id=msg.task_id, ok=not reason, held=True, reason=reason[:1024]
        )
