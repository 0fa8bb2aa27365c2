"""The members connected to this manager right now (in memory: a member's websocket
lives in one manager process), so that jobs can be handed to a scheduler and its
results routed back to the job that waits for them."""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from dragonfly.net.channel import Channel
from dragonfly.wire.messages import JobResult

RESULT_QUEUE = 64


@dataclass(eq=False)
class MemberSession:
    role: str
    member_id: int
    cluster_id: int
    hostname: str
    ip: str
    features: tuple[str, ...]
    channel: Channel
    _waiters: dict[int, trio.MemorySendChannel[JobResult]] = field(default_factory=dict)

    def expect(self, job_id: int) -> trio.MemoryReceiveChannel[JobResult]:
        """The results of job part `job_id`, as they arrive; the channel ends if the
        member goes away."""
        send, receive = trio.open_memory_channel[JobResult](RESULT_QUEUE)
        old = self._waiters.pop(job_id, None)
        if old is not None:
            old.close()
        self._waiters[job_id] = send
        return receive

    def forget(self, job_id: int) -> None:
        waiter = self._waiters.pop(job_id, None)
        if waiter is not None:
            waiter.close()

    def deliver(self, msg: JobResult) -> bool:
        """Route a result to the job waiting for it; False if none waits (or it lags)."""
        waiter = self._waiters.get(msg.job_id)
        if waiter is None:
            return False
        try:
            waiter.send_nowait(msg)
        except (trio.WouldBlock, trio.ClosedResourceError):
            return False
        return True

    def closed(self) -> None:
        for waiter in self._waiters.values():
            waiter.close()
        self._waiters.clear()


class MemberSessions:
    def __init__(self) -> None:
        self._sessions: dict[tuple[str, int], MemberSession] = {}

    def add(self, session: MemberSession) -> None:
        old = self._sessions.get((session.role, session.member_id))
        if old is not None and old is not session:
            old.closed()
        self._sessions[(session.role, session.member_id)] = session

    def remove(self, session: MemberSession) -> None:
        if self._sessions.get((session.role, session.member_id)) is session:
            del self._sessions[(session.role, session.member_id)]
        session.closed()

    def schedulers(self, cluster_id: int | None = None, feature: str = "") -> list[MemberSession]:
        return [
            s
            for s in self._sessions.values()
            if s.role == "scheduler"
            and (cluster_id is None or s.cluster_id == cluster_id)
            and (not feature or feature in s.features)
        ]

    def scheduler_clusters(self) -> set[int]:
        return {s.cluster_id for s in self.schedulers()}

    def __len__(self) -> int:
        return len(self._sessions)
