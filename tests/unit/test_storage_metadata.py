"""MetadataDB: schema migrations, batched piece commits, completion rules."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from dragonfly.storage import IncompleteTask, MetadataDB, PieceRecord, TaskState, UnknownTask

TID = "ab" * 32
TID2 = "cd" * 32


def piece(n: int, length: int = 100) -> PieceRecord:
    return PieceRecord(n, n * 100, length, hashlib.sha256(b"%d" % n).digest())


@pytest.fixture
def db(tmp_path: Path) -> MetadataDB:
    return MetadataDB(tmp_path / "m.db")


def test_schema_and_pragmas(db: MetadataDB, tmp_path: Path) -> None:
    assert db.db.journal_mode == "wal"
    assert db.conn.execute("PRAGMA foreign_keys").fetchone() == (1,)
    assert {"tasks", "pieces", "_sqlite_migrations"} <= set(db.db.table_names())
    db.close()
    # Reopening applies nothing twice.
    again = MetadataDB(tmp_path / "m.db")
    counts = again.conn.execute(
        "SELECT COUNT(*), COUNT(DISTINCT name) FROM _sqlite_migrations"
    ).fetchone()
    # (redacted URLs came second, the tasks' private flag third, specs and attestations
    # fourth)
    assert counts == (4, 4)


def test_upsert_keeps_progress(db: MetadataDB) -> None:
    t = db.upsert_task(TID, now=1.0, url="u", content_length=250, piece_length=100, piece_count=3)
    assert t.state == TaskState.PENDING and t.created_at == 1.0
    db.record_pieces(TID, [piece(0), piece(1)])
    t = db.upsert_task(TID, now=2.0, etag='"e"')
    assert t.state == TaskState.RUNNING
    assert (t.created_at, t.last_access, t.done_bytes, t.etag) == (1.0, 2.0, 200, '"e"')
    with pytest.raises(TypeError):
        db.upsert_task(TID, now=3.0, bogus=1)


def test_mark_succeeded_requires_every_piece(db: MetadataDB) -> None:
    db.upsert_task(TID, now=1.0, content_length=250, piece_length=100, piece_count=3)
    db.record_pieces(TID, [piece(0), piece(2, 50)])
    with pytest.raises(IncompleteTask) as info:
        db.mark_succeeded(TID)
    assert info.value.missing == [1]
    assert db.get_task(TID).state != TaskState.SUCCEEDED  # type: ignore[union-attr]
    db.record_pieces(TID, [piece(1)])
    t = db.mark_succeeded(TID, "sha256:" + "aa" * 32)
    assert t.state == TaskState.SUCCEEDED and t.done_bytes == 250


def test_commit_batch_is_one_transaction_and_skips_deleted_tasks(db: MetadataDB) -> None:
    db.upsert_task(TID, now=1.0, piece_length=100)
    db.upsert_task(TID2, now=1.0, piece_length=100)
    db.delete_task(TID2)
    skipped = db.commit_batch(
        {TID: [piece(n) for n in range(50)], TID2: [piece(0)]}, {TID: 5.0, TID2: 5.0}
    )
    assert skipped == {TID2}
    assert len(db.pieces(TID)) == 50
    assert db.get_task(TID).last_access == 5.0  # type: ignore[union-attr]
    db.touch(TID, 3.0)  # never backwards
    assert db.get_task(TID).last_access == 5.0  # type: ignore[union-attr]
    with pytest.raises(UnknownTask):
        db.record_pieces(TID2, [piece(0)])


def test_delete_removes_pieces(db: MetadataDB) -> None:
    db.upsert_task(TID, now=1.0)
    db.record_pieces(TID, [piece(0)])
    assert db.delete_task(TID)
    assert not db.delete_task(TID)
    assert db.conn.execute("SELECT COUNT(*) FROM pieces").fetchone() == (0,)
    assert db.list_tasks() == []


def test_piece_record_validates() -> None:
    with pytest.raises(ValueError):
        PieceRecord(0, 0, 10, b"short")
    with pytest.raises(ValueError):
        PieceRecord(-1, 0, 10, b"x" * 32)


def test_a_store_of_before_continuity_keeps_its_tasks(tmp_path: Path) -> None:
    """A database made before specs and attestations were kept opens with its tasks, which
    have neither (they are re-announced only once a download of them finishes again)."""
    import sqlite3

    old = MetadataDB(tmp_path / "old.db")
    old.upsert_task(TID, now=1.0, url="u", content_length=250, piece_length=100, piece_count=3)
    old.close()
    conn = sqlite3.connect(tmp_path / "old.db")
    conn.execute("DELETE FROM _sqlite_migrations WHERE name LIKE 'm004%'")
    conn.execute("ALTER TABLE tasks DROP COLUMN spec")
    conn.execute("ALTER TABLE tasks DROP COLUMN attested")
    conn.commit()
    conn.close()
    again = MetadataDB(tmp_path / "old.db")
    task = again.get_task(TID)
    assert task is not None and task.piece_count == 3
    assert not task.spec and not task.attested


def test_complete_tasks_are_those_a_host_re_announces(db: MetadataDB) -> None:
    """Succeeded tasks within the piece limit, with every digest in piece order; a task
    still running, or of more pieces than HeldTasks carries, is not one."""
    assert not db.has_complete_tasks(10) and db.complete_tasks(10) == []
    db.upsert_task(TID, now=1.0, content_length=250, piece_length=100, piece_count=3)
    db.record_pieces(TID, [piece(2, 50), piece(0), piece(1)])
    db.upsert_task(TID2, now=1.0, content_length=250, piece_length=100, piece_count=3)
    db.record_pieces(TID2, [piece(0)])
    assert not db.has_complete_tasks(10)
    db.mark_succeeded(TID)
    assert db.has_complete_tasks(10) and not db.has_complete_tasks(2)
    ((record, digests),) = db.complete_tasks(10)
    assert record.id == TID and digests == b"".join(piece(n).sha256 for n in range(3))
    assert db.complete_tasks(2) == []
