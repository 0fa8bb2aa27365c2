"""The scheduler's brain: resources, their state machines, the evaluator (sans-I/O)."""

from dragonfly.sched.evaluator import Evaluator
from dragonfly.sched.resources import (
    Host,
    IllegalTransition,
    Peer,
    PeerState,
    Task,
    TaskState,
)
from dragonfly.sched.scheduler import (
    Decision,
    Scheduler,
    SchedulerCounters,
    SchedulerSettings,
    Send,
)

__all__ = [
    "Decision",
    "Evaluator",
    "Host",
    "IllegalTransition",
    "Peer",
    "PeerState",
    "Scheduler",
    "SchedulerCounters",
    "SchedulerSettings",
    "Send",
    "Task",
    "TaskState",
]
