"""kill -9 a writer mid-download: whatever the store says is done must be on disk, intact.

A subprocess writes the pieces of one task through the real PieceStore (fsync on) and prints
the pieces it knows are durable after each flush. The test SIGKILLs it at some point, reopens
the store, checks every recorded piece against its expected digest, then resumes the task and
completes it with the exact expected bytes.
"""

from __future__ import annotations

import hashlib
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dragonfly.storage import IncompleteTask, PieceStore, TaskState

REPO = Path(__file__).resolve().parents[2]
TID = "c0ffee" * 10 + "beef"
PIECE = 64 * 1024
COUNT = 40


def piece_data(n: int) -> bytes:
    """Deterministic piece contents (same formula as in the writer)."""
    return hashlib.sha256(b"piece-%d" % n).digest() * (PIECE // 32)


WRITER = textwrap.dedent(
    """
    import hashlib, sys, trio
    from dragonfly.storage import PieceStore

    PIECE, COUNT, TID = {piece}, {count}, {tid!r}

    def piece_data(n):
        return hashlib.sha256(b"piece-%d" % n).digest() * (PIECE // 32)

    async def main():
        async with PieceStore.open(sys.argv[1], fsync=True, sync_delay=float(sys.argv[2])) as store:
            h = await store.open_task(
                TID, url="http://origin/blob", content_length=PIECE * COUNT, piece_length=PIECE
            )
            order = [(n * 7) % COUNT for n in range(COUNT)]  # out of order, deterministic
            written = []
            for n in order:
                data = piece_data(n)
                await store.write_piece(h, n, data, hashlib.sha256(data).digest())
                written.append(n)
                if len(written) % 3 == 0:
                    await store.flush()
                    print("DURABLE", ",".join(map(str, written)), flush=True)
                await trio.sleep(0.003)
            print("IDLE", flush=True)
            await trio.sleep_forever()

    trio.run(main)
    """
).format(piece=PIECE, count=COUNT, tid=TID)


def run_writer_until(data_dir: Path, flushes: int, delay: float, sync_delay: float) -> set[int]:
    """Start the writer, SIGKILL it ``delay`` seconds after its ``flushes``-th durable
    report (a delay lets it get into the next writes and commits). Returns what it had
    reported durable."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(data_dir), str(sync_delay)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    durable: set[int] = set()
    seen = 0
    deadline = time.monotonic() + 60
    assert proc.stdout is not None
    try:
        while seen < flushes:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([proc.stdout], [], [], max(remaining, 0))
            if not ready:
                pytest.fail("writer produced no output in time")
            line = proc.stdout.readline().decode()
            if not line:
                err = proc.stderr.read().decode() if proc.stderr else ""
                pytest.fail(f"writer exited early ({proc.wait()}): {err}")
            if line.startswith("DURABLE "):
                durable = {int(x) for x in line.split()[1].split(",")}
                seen += 1
            elif line.startswith("IDLE"):
                break
        time.sleep(delay)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return durable


# sync_delay 10 s: pieces are durable only when the writer flushes (the daemon's way, where
# the kill lands while verified pieces wait for their sync); 0: after every landing batch.
@pytest.mark.parametrize(
    ("flushes", "delay", "sync_delay"),
    [(1, 0.0, 0.0), (4, 0.005, 0.0), (9, 0.013, 0.0), (4, 0.005, 10.0), (9, 0.013, 10.0)],
)
async def test_kill_9_mid_write_then_resume(
    tmp_path: Path, flushes: int, delay: float, sync_delay: float
) -> None:
    data_dir = tmp_path / "data"
    durable = run_writer_until(data_dir, flushes, delay, sync_delay)
    assert len(durable) >= 3 * min(flushes, COUNT // 3)

    async with PieceStore.open(data_dir) as store:
        tasks = await store.list_tasks()
        assert [t.id for t in tasks] == [TID]
        assert tasks[0].state == TaskState.RUNNING
        h = await store.acquire(TID)
        recorded = set(h.done)
        # Everything reported durable before the kill is recorded...
        assert durable <= recorded
        # ...and every recorded piece is on disk with the right bytes.
        for n in recorded:
            p = h.pieces[n]
            assert (p.offset, p.length) == (n * PIECE, PIECE)
            assert p.sha256 == hashlib.sha256(piece_data(n)).digest()
            assert h.file.digest(p.offset, p.length) == p.sha256
        assert await store.verify_task(TID) == []
        if len(recorded) < COUNT:
            with pytest.raises(IncompleteTask):
                await store.complete_task(TID)
        store.release(h)

        # Resume: write what is missing, then complete against the whole-file digest.
        h = await store.open_task(
            TID, url="http://origin/blob", content_length=PIECE * COUNT, piece_length=PIECE
        )
        assert set(h.done) == recorded
        for n in h.missing():
            data = piece_data(n)
            await store.write_piece(h, n, data, hashlib.sha256(data).digest())
        expected = b"".join(piece_data(n) for n in range(COUNT))
        whole = "sha256:" + hashlib.sha256(expected).hexdigest()
        record = await store.complete_task(TID, whole)
        assert record.state == TaskState.SUCCEEDED
        fd, off, length = store.read_range(TID, 0, PIECE * COUNT)
        assert os.pread(fd, length, off) == expected
        store.release(h)

    async with PieceStore.open(data_dir) as store:
        record = await store.get_task(TID)
        assert record is not None and record.state == TaskState.SUCCEEDED
