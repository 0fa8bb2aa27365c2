"""Opening a data directory: one process at a time (``lock_data_dir``), and the metadata
made to agree with the task files after a restart or a crash (``recover``)."""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

import structlog

from .errors import StorageError
from .metadata import MetadataDB
from .private import link_refused, open_private
from .taskfile import task_path

__all__ = ["LOCK_NAME", "lock_data_dir", "recover"]

log = structlog.get_logger(__name__)

LOCK_NAME = "lock"


def lock_data_dir(data_dir: Path) -> int:
    """One process per data directory: two stores over one SQLite file and task files
    would each believe they own the pieces."""
    fd = open_private(data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StorageError(f"data directory {data_dir} is in use by another process") from None
    return fd


def recover(data_dir: Path, db: MetadataDB) -> None:
    """Make the database agree with the files after a restart or a crash.

    Rows of a task whose file vanished are dropped; pieces lying past the end of a truncated
    file are forgotten; files no row points to (a crash between deleting a row and its file)
    are removed. Running tasks stay as they are: they resume from their pieces.
    """
    known: set[str] = set()
    for task in db.list_tasks():
        try:
            st = os.lstat(task_path(data_dir, task.id))
        except (FileNotFoundError, ValueError):
            db.delete_task(task.id)
            log.info("storage.recover.drop_task", task_id=task.id, reason="file missing")
            continue
        if stat.S_ISLNK(st.st_mode):
            raise link_refused(task_path(data_dir, task.id))
        known.add(task.id)
        beyond = [p.number for p in db.pieces(task.id) if p.offset + p.length > st.st_size]
        if beyond:
            db.drop_pieces(task.id, beyond)
    tasks_dir = data_dir / "tasks"
    for sub in tasks_dir.iterdir():
        if sub.is_symlink():
            raise link_refused(sub)
        if not sub.is_dir():
            continue
        for f in sub.iterdir():
            if f.name not in known and f.is_file():
                f.unlink(missing_ok=True)
                log.info("storage.recover.remove_orphan", path=str(f))
