"""What the scheduler core is given and what it gives back: its knobs
(``SchedulerSettings``), its decisions (``Send``) and its counts (``SchedulerCounters``,
which the trio shell exports as its Prometheus metrics)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from dragonfly.wire.codec import Message

if TYPE_CHECKING:
    from dragonfly.config import SchedulerConfig

__all__ = ["Decision", "SchedulerCounters", "SchedulerSettings", "Send"]


@dataclass(frozen=True, slots=True)
class SchedulerSettings:
    """The knobs of scheduling and collection (config: [scheduling] and [gc])."""

    candidate_parent_limit: int = 8  # parents handed to a peer at once
    filter_parent_limit: int = 40  # candidates scored per decision
    back_to_source_count: int = 3  # peers of one task fetching from the origin at once
    retry_limit: int = 5  # retries without a parent before back to source
    retry_interval: float = 0.5  # seconds between retries of a waiting peer
    # After the first rejoining host connects, a task nobody is known to hold waits this
    # long for the re-announcements before a seed or the origin is asked.
    rejoin_grace: float = 3.0
    peer_ttl: float = 600.0  # a peer silent this long is dropped
    task_ttl: float = 3600.0  # a task without peers this long is dropped
    host_ttl: float = 300.0  # a disconnected host is forgotten after this long
    gc_interval: float = 30.0  # how often tick() runs the collection pass
    # Not in the config file (yet): a triggered seed that has not registered the task
    # after this long is presumed lost; the next seed (or a waiting peer) takes over.
    seed_trigger_timeout: float = 5.0
    # Running peers with fewer parents than the limit offered each new serving peer.
    top_up_limit: int = 8
    # Tickets handed out with each parent last this long (0: none, a cluster without
    # identity; config: [trust]).
    ticket_ttl: float = 0.0
    # Bounds per host (config: [limits]).
    peers_per_host: int = 10000
    registration_rate: float = 1000.0

    @classmethod
    def from_config(cls, cfg: SchedulerConfig) -> SchedulerSettings:
        s, gc = cfg.scheduling, cfg.gc
        return cls(
            candidate_parent_limit=s.candidate_parent_limit,
            filter_parent_limit=s.filter_parent_limit,
            back_to_source_count=s.back_to_source_count,
            retry_limit=s.retry_limit,
            retry_interval=s.retry_interval,
            rejoin_grace=s.rejoin_grace,
            peer_ttl=gc.peer_ttl,
            task_ttl=gc.task_ttl,
            host_ttl=gc.host_ttl,
            gc_interval=gc.interval,
            ticket_ttl=0.0 if cfg.trust.insecure else cfg.trust.ticket_ttl,
            peers_per_host=cfg.limits.peers_per_host,
            registration_rate=cfg.limits.registration_rate,
        )


@dataclass(frozen=True, slots=True)
class Send:
    """Deliver ``message`` to the host ``host_id`` over its websocket."""

    host_id: str
    message: Message


Decision = Send


@dataclass
class SchedulerCounters:
    """Monotonic counts, exported as /metrics by the shell (dragonfly/metrics.py)."""

    registrations: int = 0  # peers registered
    piece_reports: int = 0  # pieces reported finished (PiecesFinished)
    schedule_decisions: int = 0  # CandidateParents sent
    back_to_source: int = 0  # NeedBackToSource sent
    triggers: int = 0  # TriggerDownload sent
    bad_reports: int = 0  # reports that contradict what the scheduler knows
    task_failures: int = 0  # TaskFailed sent
    errors: int = 0  # Error replies
    refused_registrations: int = 0  # over a host's bounds (peers_per_host, rate)
    reannounced: int = 0  # held tasks a (re)connected host made serving peers of (HeldTasks)
    collected_peers: int = 0
    collected_tasks: int = 0
    collected_hosts: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
