"""Piece and task metadata in SQLite (through sqlite-utils), WAL mode.

Synchronous on purpose: the store calls it from one worker thread at a time (serialised by a
``trio.CapacityLimiter(1)``), so the connection is opened with ``check_same_thread=False``.
Only pieces whose bytes were verified and made durable are ever recorded here: a row in
``pieces`` is the promise that the bytes on disk hash to ``sha256``.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlite_utils import Database, Migrations

from dragonfly.redact import redact_url

from .errors import IncompleteTask, StorageError, UnknownTask
from .private import open_private, secure_existing

__all__ = ["MIGRATIONS", "MetadataDB", "PieceRecord", "TaskRecord", "TaskState"]


class TaskState(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class PieceRecord:
    """A verified piece: where it lies in the task file and the digest it hashes to."""

    number: int
    offset: int
    length: int
    sha256: bytes

    def __post_init__(self) -> None:
        if self.number < 0 or self.offset < 0 or self.length < 0:
            raise ValueError(f"invalid piece {self.number}: offset={self.offset} len={self.length}")
        if len(self.sha256) != 32:
            raise ValueError(f"piece {self.number}: sha256 must be 32 bytes")


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """One row of ``tasks``; ``content_length``/``piece_count`` are -1 while unknown."""

    id: str
    url: str = ""
    tag: str = ""
    application: str = ""
    content_length: int = -1
    piece_length: int = 0
    piece_count: int = -1
    state: TaskState = TaskState.PENDING
    digest: str = ""
    etag: str = ""
    last_modified: str = ""
    created_at: float = 0.0
    last_access: float = 0.0
    done_bytes: int = 0
    # Made from a request with credentials: served to a client only after the origin
    # said yes to that client's (dragonfly/peer/private.py).
    private: bool = False
    # What the task is made of, as JSON, its URL redacted (dragonfly/peer/reannounce.py),
    # and the attestation a scheduler gave of its digests: re-announced after a restart.
    spec: str = ""
    attested: str = ""

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> TaskRecord:
        values = {f.name: row[f.name] for f in dataclasses.fields(cls)}
        values["state"] = TaskState(values["state"])
        values["private"] = bool(values["private"])
        return cls(**values)


MIGRATIONS = Migrations("dragonfly.storage")


@MIGRATIONS()
def m001_tasks_and_pieces(db: Database) -> None:
    """Initial schema. Raw SQL because CHECKs and ON DELETE CASCADE need it."""
    db.execute(
        """
        CREATE TABLE tasks (
            id TEXT PRIMARY KEY,
            url TEXT NOT NULL DEFAULT '',
            tag TEXT NOT NULL DEFAULT '',
            application TEXT NOT NULL DEFAULT '',
            content_length INTEGER NOT NULL DEFAULT -1,
            piece_length INTEGER NOT NULL DEFAULT 0,
            piece_count INTEGER NOT NULL DEFAULT -1,
            state TEXT NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending', 'running', 'succeeded', 'failed')),
            digest TEXT NOT NULL DEFAULT '',
            etag TEXT NOT NULL DEFAULT '',
            last_modified TEXT NOT NULL DEFAULT '',
            created_at REAL NOT NULL,
            last_access REAL NOT NULL,
            done_bytes INTEGER NOT NULL DEFAULT 0
        )
        """
    )
    db.execute("CREATE INDEX tasks_last_access ON tasks (last_access)")
    db.execute(
        """
        CREATE TABLE pieces (
            task_id TEXT NOT NULL REFERENCES tasks (id) ON DELETE CASCADE,
            number INTEGER NOT NULL,
            "offset" INTEGER NOT NULL,
            length INTEGER NOT NULL,
            sha256 BLOB NOT NULL CHECK (length(sha256) = 32),
            state TEXT NOT NULL DEFAULT 'done' CHECK (state = 'done'),
            PRIMARY KEY (task_id, number)
        ) WITHOUT ROWID
        """
    )


@MIGRATIONS()
def m002_redact_urls(db: Database) -> None:
    """URLs stored before redaction existed lose their signatures and passwords."""
    rows = db.execute("SELECT id, url FROM tasks").fetchall()
    db.conn.executemany(
        "UPDATE tasks SET url = ? WHERE id = ?",
        [(redact_url(url), tid) for tid, url in rows if redact_url(url) != url],
    )


@MIGRATIONS()
def m003_private_tasks(db: Database) -> None:
    """Tasks made from requests with credentials are marked (never unmarked)."""
    db.execute("ALTER TABLE tasks ADD COLUMN private INTEGER NOT NULL DEFAULT 0")


@MIGRATIONS()
def m004_specs_and_attestations(db: Database) -> None:
    """A task's spec and attestation, so a restarted host re-announces what it holds."""
    db.execute("ALTER TABLE tasks ADD COLUMN spec TEXT NOT NULL DEFAULT ''")
    db.execute("ALTER TABLE tasks ADD COLUMN attested TEXT NOT NULL DEFAULT ''")


_TASK_FIELDS = frozenset(f.name for f in dataclasses.fields(TaskRecord)) - {"id"}

_INSERT_PIECE = """
    INSERT INTO pieces (task_id, number, "offset", length, sha256, state)
    VALUES (?, ?, ?, ?, ?, 'done')
    ON CONFLICT (task_id, number) DO UPDATE SET
        "offset" = excluded."offset", length = excluded.length,
        sha256 = excluded.sha256, state = 'done'
"""

_UPDATE_DONE_BYTES = """
    UPDATE tasks SET
        done_bytes = (SELECT COALESCE(SUM(length), 0) FROM pieces WHERE task_id = :id),
        state = CASE WHEN state = 'pending' THEN 'running' ELSE state END
    WHERE id = :id
"""


class MetadataDB:
    """Tasks and verified pieces of one peer. Not thread-safe: one thread at a time."""

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_ms: int = 5000) -> None:
        self.path = Path(path)
        # SQLite gives its -wal and -shm files the database file's mode: create that one
        # 0600 (never through a symlink) before SQLite opens it.
        os.close(open_private(self.path, os.O_RDWR | os.O_CREAT))
        for suffix in ("-wal", "-shm"):
            secure_existing(self.path.with_name(self.path.name + suffix))
        conn = sqlite3.connect(str(self.path), check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            self.db = Database(conn)
            self.db.enable_wal()
            # WAL + NORMAL: a commit survives a process crash; on power loss the last commits
            # may roll back, which is safe because the bytes were fdatasync'ed before the rows.
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            MIGRATIONS.apply(self.db)
        except BaseException:
            conn.close()
            raise
        self.conn = conn

    def close(self) -> None:
        self.conn.close()

    # -- tasks --------------------------------------------------------------------------------

    def get_task(self, task_id: str) -> TaskRecord | None:
        cur = self.conn.execute("SELECT * FROM tasks WHERE id = ?", (task_id,))
        row = cur.fetchone()
        if row is None:
            return None
        cols = [d[0] for d in cur.description]
        return TaskRecord.from_row(dict(zip(cols, row, strict=True)))

    def _require(self, task_id: str) -> TaskRecord:
        task = self.get_task(task_id)
        if task is None:
            raise UnknownTask(f"unknown task {task_id}")
        return task

    def upsert_task(self, task_id: str, *, now: float, **fields: Any) -> TaskRecord:
        """Create the task, or update the given columns of an existing one.

        Columns not given keep their value (state, created_at, done_bytes of an interrupted
        task survive, so it resumes). ``now`` is the creation time / last access.
        """
        unknown = set(fields) - _TASK_FIELDS
        if unknown:
            raise TypeError(f"unknown task fields: {sorted(unknown)}")
        if "state" in fields:
            fields["state"] = str(TaskState(fields["state"]))
        if "url" in fields:
            fields["url"] = redact_url(fields["url"])  # no signature or password on disk
        table = self.db.table("tasks")
        with self.db.atomic():
            if self.get_task(task_id) is None:
                row = {"created_at": now, "last_access": now, **fields, "id": task_id}
                table.insert(row)
            else:
                table.update(task_id, {"last_access": now, **fields})
        return self._require(task_id)

    def update_task(self, task_id: str, **fields: Any) -> TaskRecord:
        """Set some columns of an existing task."""
        unknown = set(fields) - _TASK_FIELDS
        if unknown:
            raise TypeError(f"unknown task fields: {sorted(unknown)}")
        if "state" in fields:
            fields["state"] = str(TaskState(fields["state"]))
        if "url" in fields:
            fields["url"] = redact_url(fields["url"])
        with self.db.atomic():
            self._require(task_id)
            if fields:
                self.db.table("tasks").update(task_id, fields)
        return self._require(task_id)

    def set_state(self, task_id: str, state: TaskState | str) -> TaskRecord:
        return self.update_task(task_id, state=state)

    def touch(self, task_id: str, now: float) -> None:
        """Record a use; never moves last_access backwards."""
        self.touch_many({task_id: now})

    def touch_many(self, touches: Mapping[str, float]) -> None:
        with self.db.atomic():
            self._touch(touches)

    def _touch(self, touches: Mapping[str, float]) -> None:
        self.conn.executemany(
            "UPDATE tasks SET last_access = max(last_access, ?) WHERE id = ?",
            [(now, tid) for tid, now in touches.items()],
        )

    def delete_task(self, task_id: str) -> bool:
        """Remove the task and its pieces; False if it did not exist."""
        with self.db.atomic():
            self.conn.execute("DELETE FROM pieces WHERE task_id = ?", (task_id,))
            cur = self.conn.execute("DELETE FROM tasks WHERE id = ?", (task_id,))
        return cur.rowcount > 0

    def reset_task(self, task_id: str, state: TaskState | str = TaskState.PENDING) -> TaskRecord:
        """Forget every piece (their bytes are gone or wrong) and set ``state``."""
        with self.db.atomic():
            self._require(task_id)
            self.conn.execute("DELETE FROM pieces WHERE task_id = ?", (task_id,))
            self.db.table("tasks").update(
                task_id, {"state": str(TaskState(state)), "done_bytes": 0, "attested": ""}
            )
        return self._require(task_id)

    def list_tasks(self) -> list[TaskRecord]:
        return [TaskRecord.from_row(r) for r in self.db.table("tasks").rows_where(order_by="id")]

    def has_complete_tasks(self, max_pieces: int) -> bool:
        """Whether complete_tasks would name any (without reading their digests)."""
        row = self.conn.execute(
            "SELECT 1 FROM tasks WHERE state = 'succeeded' AND piece_count BETWEEN 0 AND ? LIMIT 1",
            (max_pieces,),
        ).fetchone()
        return row is not None

    def complete_tasks(self, max_pieces: int) -> list[tuple[TaskRecord, bytes]]:
        """Succeeded tasks of at most ``max_pieces`` pieces, each with every piece's
        digest in piece order (what HeldTasks announces)."""
        tasks = {
            r["id"]: TaskRecord.from_row(r)
            for r in self.db.query(
                "SELECT * FROM tasks WHERE state = 'succeeded' AND piece_count BETWEEN 0 AND ?",
                [max_pieces],
            )
        }
        digests: dict[str, list[bytes]] = {tid: [] for tid in tasks}
        cur = self.conn.execute(
            "SELECT p.task_id, p.sha256 FROM pieces p JOIN tasks t ON t.id = p.task_id "
            "WHERE t.state = 'succeeded' AND t.piece_count BETWEEN 0 AND ? "
            "AND p.number < t.piece_count ORDER BY p.task_id, p.number",
            (max_pieces,),
        )
        for tid, digest in cur:
            digests[tid].append(bytes(digest))
        return [
            (task, b"".join(digests[tid]))
            for tid, task in tasks.items()
            if len(digests[tid]) == task.piece_count  # (complete means every piece)
        ]

    # -- pieces -------------------------------------------------------------------------------

    def record_pieces(self, task_id: str, pieces: Iterable[PieceRecord]) -> int:
        """Record verified pieces of one task in one transaction; returns how many."""
        skipped = self.commit_batch({task_id: list(pieces)})
        if skipped:
            raise UnknownTask(f"unknown task {task_id}")
        row = self.conn.execute("SELECT COUNT(*) FROM pieces WHERE task_id = ?", (task_id,))
        return int(row.fetchone()[0])

    def commit_batch(
        self,
        pieces_by_task: Mapping[str, Sequence[PieceRecord]],
        touches: Mapping[str, float] | None = None,
    ) -> set[str]:
        """Commit the pieces of many tasks and their last-access times in ONE transaction.

        Pieces of tasks that no longer exist (deleted meanwhile) are skipped, not fatal: one
        vanished task must not make the whole batch roll back. Returns the skipped task ids.
        """
        skipped: set[str] = set()
        with self.db.atomic():
            rows: list[tuple[str, int, int, int, bytes]] = []
            present: list[str] = []
            for tid, pieces in pieces_by_task.items():
                if not pieces:
                    continue
                if self.conn.execute("SELECT 1 FROM tasks WHERE id = ?", (tid,)).fetchone():
                    present.append(tid)
                    rows.extend((tid, p.number, p.offset, p.length, p.sha256) for p in pieces)
                else:
                    skipped.add(tid)
            self.conn.executemany(_INSERT_PIECE, rows)
            self.conn.executemany(_UPDATE_DONE_BYTES, [{"id": tid} for tid in present])
            if touches:
                self._touch(touches)
        return skipped

    def pieces(self, task_id: str) -> list[PieceRecord]:
        cur = self.conn.execute(
            'SELECT number, "offset", length, sha256 FROM pieces '
            "WHERE task_id = ? AND state = 'done' ORDER BY number",
            (task_id,),
        )
        return [PieceRecord(n, o, ln, bytes(h)) for n, o, ln, h in cur]

    def drop_pieces(self, task_id: str, numbers: Iterable[int]) -> None:
        """Forget pieces found bad or missing on disk; the task goes back to running."""
        nums = [(task_id, n) for n in numbers]
        if not nums:
            return
        with self.db.atomic():
            self.conn.executemany("DELETE FROM pieces WHERE task_id = ? AND number = ?", nums)
            self.conn.execute(_UPDATE_DONE_BYTES, {"id": task_id})
            self.conn.execute(
                "UPDATE tasks SET state = 'running' WHERE id = ? AND state = 'succeeded'",
                (task_id,),
            )

    def missing_pieces(self, task_id: str) -> list[int]:
        """Piece numbers in ``0..piece_count-1`` that are not recorded."""
        task = self._require(task_id)
        have = {p.number for p in self.pieces(task_id)}
        return [n for n in range(max(task.piece_count, 0)) if n not in have]

    def mark_succeeded(self, task_id: str, digest: str | None = None) -> TaskRecord:
        """Mark the task complete, but only if every piece 0..piece_count-1 is recorded.

        Also checks that the recorded pieces add up to the content length when it is known,
        so a task can never be marked complete with a gap.
        """
        with self.db.atomic():
            task = self._require(task_id)
            if task.piece_count < 0:
                raise StorageError(f"task {task_id}: piece count unknown, cannot complete")
            pieces = [p for p in self.pieces(task_id) if p.number < task.piece_count]
            have = {p.number for p in pieces}
            missing = [n for n in range(task.piece_count) if n not in have]
            if missing:
                raise IncompleteTask(task_id, missing, task.piece_count)
            total = sum(p.length for p in pieces)
            if task.content_length >= 0 and total != task.content_length:
                raise StorageError(
                    f"task {task_id}: pieces cover {total} bytes, "
                    f"content length is {task.content_length}"
                )
            update: dict[str, Any] = {"state": str(TaskState.SUCCEEDED), "done_bytes": total}
            if digest:
                update["digest"] = digest
            self.db.table("tasks").update(task_id, update)
        return self._require(task_id)
