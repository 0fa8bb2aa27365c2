"""The piece store's deletion and GC (dragonfly/storage/store.py): remove tasks (row
first, then file) on request, or as ``plan_gc`` (gc.py) chooses from their disk usage.
A mixin of ``PieceStore``: its methods work on the store's state, declared on
``StoreState`` (state.py).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable

import structlog
import trio

from .errors import StorageError, TaskInUse
from .gc import GCConfig, TaskUsage, plan_gc
from .handle import TaskHandle
from .state import StoreState
from .taskfile import task_path

log = structlog.get_logger(__name__)


class RemovalMixin(StoreState):
    """Deleting tasks, and GC."""

    async def delete_task(self, task_id: str) -> bool:
        """Remove a task's row and file. Raises TaskInUse if someone holds it."""
        self._check_open()
        removed = await self._delete_many([task_id], strict=True)
        return task_id in removed

    async def _delete_many(self, task_ids: Iterable[str], *, strict: bool) -> list[str]:
        async with self._lifecycle:
            victims: list[tuple[str, TaskHandle | None]] = []
            for tid in task_ids:
                h = self._handles.get(tid)
                if h is not None and h.in_use:
                    if strict:
                        raise TaskInUse(f"task {tid} is in use")
                    continue
                self._discard_queued(tid)
                if h is not None:
                    self._detach(h)
                victims.append((tid, h))
            if not victims:
                await trio.lowlevel.checkpoint()
                return []
            # A handle still pinned by the in-flight batch is synced first: wait for it.
            if any(h is not None and h.pins for _, h in victims):
                with contextlib.suppress(StorageError):  # failed or not, it is over
                    await self.flush()
            data_dir = self.data_dir

            def _delete() -> list[str]:
                removed = []
                for tid, h in victims:
                    # Row first, then file: a crash in between leaves an orphan file, which
                    # the next start removes; never a row without its bytes.
                    existed = self._db.delete_task(tid)
                    if h is not None:
                        h.file.close()
                    path = task_path(data_dir, tid)
                    try:
                        path.unlink()
                        existed = True
                    except FileNotFoundError:
                        pass
                    if existed:
                        removed.append(tid)
                return removed

            removed = await self._run_db(_delete)
        if removed:
            self.on_removed(removed)
        return removed

    # -- GC -----------------------------------------------------------------------------------

    def _task_sizes_sync(self) -> list[tuple[str, int, float]]:
        rows = []
        for t in self._db.list_tasks():
            try:
                size = os.stat(task_path(self.data_dir, t.id)).st_blocks * 512
            except FileNotFoundError:
                size = 0
            rows.append((t.id, size, t.last_access))
        return rows

    def _gc_inputs_sync(self, quota_bytes: int) -> tuple[list[tuple[str, int, float]], int, int]:
        """(per-task sizes, used bytes, capacity): the quota and the tasks' allocated
        blocks, or with no quota the filesystem's own numbers (other files count)."""
        rows = self._task_sizes_sync()
        if quota_bytes > 0:
            return rows, sum(size for _, size, _ in rows), quota_bytes
        st = os.statvfs(self.data_dir)
        capacity = st.f_blocks * st.f_frsize
        return rows, capacity - st.f_bavail * st.f_frsize, capacity

    def _usage(self, rows: list[tuple[str, int, float]]) -> list[TaskUsage]:
        out = []
        for tid, size, last_access in rows:
            h = self._handles.get(tid)
            out.append(TaskUsage(tid, size, last_access, h is not None and h.in_use))
        return out

    async def disk_usage(self) -> list[TaskUsage]:
        """Per-task bytes on disk (allocated blocks, so sparse holes do not count)."""
        self._check_open()
        await self.flush()
        return self._usage(await self._run_db(self._task_sizes_sync))

    async def run_gc(self, now: float | None = None, config: GCConfig | None = None) -> list[str]:
        """Remove tasks past their TTL, then LRU tasks above the high watermark down to the
        low one; tasks in use are kept. Returns the removed task ids."""
        self._check_open()
        cfg = config or self.gc_config
        when = self._clock() if now is None else now
        await self.flush()
        rows, used, capacity = await self._run_db(self._gc_inputs_sync, cfg.quota_bytes)
        plan = plan_gc(
            self._usage(rows),
            when,
            cfg.ttl,
            used,
            capacity,
            cfg.high_watermark,
            cfg.low_watermark,
        )
        if not plan:
            return []
        removed = await self._delete_many(plan, strict=False)
        log.info("storage.gc", removed=removed, used=used, capacity=capacity)
        return removed
