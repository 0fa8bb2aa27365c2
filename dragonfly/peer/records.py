"""Download records: one per download this peer finished or gave up on, sent to a
scheduler in batches (which forwards them to the manager, with the host it proved).

The URL is redacted here (dragonfly/redact.py): what leaves the host never carries a
signature or a token. Records wait in memory for a connected scheduler speaking
protocol 4; at most LIMIT wait (the oldest go first), so a peer without schedulers or
manager spends nothing on them.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from dataclasses import dataclass

from dragonfly.peer.scheduler_client import SchedulerLost, SchedulerPool
from dragonfly.redact import redact_url
from dragonfly.wire.messages import (
    JOB_VERSION,
    URL_MAX,
    DownloadRecord,
    DownloadRecords,
    batches,
    record_size,
)

INTERVAL = 2.0
PER_MESSAGE = 500
LIMIT = 10_000
MAX_PARENTS = 64


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a download did, as its driver knows it at the end."""

    task_id: str
    url: str
    content_length: int
    seconds: float
    bytes_p2p: int
    bytes_source: int
    bytes_local: int
    parents: tuple[str, ...]
    error: str


def record_of(outcome: Outcome, now: float | None = None) -> DownloadRecord:
    return DownloadRecord(
        task_id=outcome.task_id,
        url=redact_url(outcome.url)[:URL_MAX],
        content_length=max(-1, outcome.content_length),
        finished_at=int(time.time() if now is None else now),
        duration_ms=max(0, round(outcome.seconds * 1000)),
        bytes_p2p=outcome.bytes_p2p,
        bytes_source=outcome.bytes_source,
        bytes_local=outcome.bytes_local,
        parents=[p[:255] for p in outcome.parents[:MAX_PARENTS]],
        error=outcome.error[:1024],
    )


class RecordBuffer:
    def __init__(self) -> None:
        self.waiting: deque[DownloadRecord] = deque(maxlen=LIMIT)
        self.sent = 0

    def add(self, outcome: Outcome) -> None:
        self.waiting.append(record_of(outcome))

    async def flush(self, schedulers: SchedulerPool) -> None:
        """What waits goes to the first connected scheduler that can take it (the daemon
        calls this every INTERVAL)."""
        for conn in schedulers.connections.values():
            channel = conn.channel
            if channel is None or channel.version < JOB_VERSION:
                continue
            while self.waiting:
                batch = batches(list(self.waiting), record_size, PER_MESSAGE)[0]
                with contextlib.suppress(SchedulerLost):
                    await conn.send(DownloadRecords(records=batch))
                    for _ in batch:
                        self.waiting.popleft()
                    self.sent += len(batch)
                    continue
                break
            return
