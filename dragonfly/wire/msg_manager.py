"""Scheduler / seed peer ↔ manager messages (the manager's websocket), and the jobs
(manager → scheduler → hosts) with the download records (hosts → scheduler → manager)."""

from collections.abc import Callable
from dataclasses import dataclass, field

from dragonfly.wire.codec import (
    Message,
    limits,
    message,
)
from dragonfly.wire.records import (
    ID_MAX,
    OFFSET_MAX,
    URL_MAX,
    HostInfo,
    T,
    TaskSpec,
    _id,
    _reason,
)

# ---------------------------------------------------------------------------
# Scheduler / seed peer <-> manager (the manager's websocket)
# ---------------------------------------------------------------------------

ROW_ID_MAX = 2**63 - 1


@message("announce_member")
@dataclass(frozen=True, slots=True)
class AnnounceMember(Message):
    """Scheduler or seed peer → manager, first after the Hello: who it is and which
    cluster it joins (the Hello's role says which kind of member). ``ip`` is what the
    member says of itself; the manager records the address it sees."""

    hostname: str = limits(min_len=1, max_len=255)
    ip: str = limits(min_len=1, max_len=64)
    port: int = limits(min=1, max=65535)
    cluster_id: int = limits(min=1, max=ROW_ID_MAX)
    idc: str = limits(default="", max_len=256)
    location: str = limits(default="", max_len=256)
    features: list[str] = field(default_factory=list, metadata=dict(max_items=16, max_len=64))
    download_port: int = limits(default=0, min=0, max=65535)  # a seed peer's upload port
    version: str = limits(default="", max_len=64)


@message("member_registered")
@dataclass(frozen=True, slots=True)
class MemberRegistered(Message):
    """Manager → member: its row, and how often to send a keepalive (``Ping``)."""

    member_id: int = limits(min=1, max=ROW_ID_MAX)
    keepalive_ms: int = limits(min=1, max=2**31)
    # A scheduler reports its hosts (HostsReport) this often; 0: only when asked.
    hosts_report_ms: int = limits(default=0, min=0, max=2**31)


@dataclass(frozen=True, slots=True)
class BlockRules:
    """Downloads a cluster refuses (Dragonfly's block_list.task.download): by the task's
    application, tag, URL (regular expressions, searched) or the request's priority."""

    applications: list[str] = field(
        default_factory=list, metadata=dict(max_items=1000, max_len=1024)
    )
    urls: list[str] = field(default_factory=list, metadata=dict(max_items=1000, max_len=1024))
    tags: list[str] = field(default_factory=list, metadata=dict(max_items=1000, max_len=1024))
    priorities: list[int] = field(default_factory=list, metadata=dict(max_items=7, min=0, max=6))


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """A scheduler cluster's settings for its schedulers, seed peers and peers (the
    manager's cluster config): parent limits, how many children a host serves at once,
    and the block lists of peers and of seed peers."""

    cluster_id: int = limits(min=1, max=ROW_ID_MAX)
    candidate_parent_limit: int = limits(min=1, max=64)
    filter_parent_limit: int = limits(min=1, max=10000)
    peer_load_limit: int = limits(min=1, max=2**16)
    seed_peer_load_limit: int = limits(min=1, max=2**20)
    peer_block: BlockRules = field(default_factory=BlockRules)
    seed_peer_block: BlockRules = field(default_factory=BlockRules)
    revision: str = limits(default="", max_len=64)  # changes whenever the settings do


@message("list_schedulers")
@dataclass(frozen=True, slots=True)
class ListSchedulers(Message):
    """Any host → manager: which schedulers should I use? ``cluster_id`` 0 lets the
    manager rank the clusters for this host (its IP is the one the manager sees)."""

    hostname: str = limits(default="", max_len=255)
    idc: str = limits(default="", max_len=256)
    location: str = limits(default="", max_len=256)
    cluster_id: int = limits(default=0, min=0, max=ROW_ID_MAX)


@dataclass(frozen=True, slots=True)
class SchedulerEntry:
    """An active scheduler in SchedulerList."""

    id: int = limits(min=1, max=ROW_ID_MAX)
    hostname: str = limits(max_len=255)
    ip: str = limits(min_len=1, max_len=64)
    port: int = limits(min=1, max=65535)
    idc: str = limits(default="", max_len=256)
    location: str = limits(default="", max_len=256)
    features: list[str] = field(default_factory=list, metadata=dict(max_items=16, max_len=64))


@message("scheduler_list")
@dataclass(frozen=True, slots=True)
class SchedulerList(Message):
    """Manager → host: the active schedulers of the best cluster (none: cluster_id 0)."""

    cluster_id: int = limits(min=0, max=ROW_ID_MAX)
    schedulers: list[SchedulerEntry] = field(default_factory=list, metadata=dict(max_items=1024))
    config: ClusterConfig | None = None  # that cluster's settings for its hosts


@message("config_update")
@dataclass(frozen=True, slots=True)
class ConfigUpdate(Message):
    """Manager → scheduler, after MemberRegistered and whenever its cluster's settings
    change: apply them (no restart)."""

    config: ClusterConfig


@dataclass(frozen=True, slots=True)
class RevokedHost:
    """Every credential of ``host_id`` issued at or before ``before`` (unix seconds) is
    revoked."""

    host_id: str = _id()
    before: int = limits(min=0, max=2**40)


@message("revocations")
@dataclass(frozen=True, slots=True)
class Revocations(Message):
    """Manager → scheduler, after MemberRegistered and whenever the list changes: the
    whole list of revoked hosts. A scheduler refuses their handshakes and drops their
    connections."""

    hosts: list[RevokedHost] = field(default_factory=list, metadata=dict(max_items=10000))


@message("sync_hosts")
@dataclass(frozen=True, slots=True)
class SyncHosts(Message):
    """Manager → scheduler: report your hosts now (HostsReport)."""


@message("hosts_report")
@dataclass(frozen=True, slots=True)
class HostsReport(Message):
    """Scheduler → manager: the hosts connected to it, in parts; ``last`` ends a report.
    What the manager's peers table shows."""

    hosts: list[HostInfo] = field(default_factory=list, metadata=dict(max_items=2000))
    last: bool = True


# ---------------------------------------------------------------------------
# Jobs (manager → scheduler → hosts) and download records (hosts → scheduler → manager)
# ---------------------------------------------------------------------------

JOB_KINDS = ("preheat", "get_task", "delete_task", "list_hosts")
JOB_SCOPES = ("single_seed_peer", "all_seed_peers", "all_peers")
JOB_VERSION = 4  # the protocol version that has them
CONTINUITY_VERSION = 5  # the one that has HeldTasks and TaskAttested
REMOVAL_VERSION = 6  # the one that has TasksRemoved
RESULTS_PER_MESSAGE = 2000
BATCH_BYTES = 256 * 1024  # a batch's estimated size, far below the 1 MiB frame


def batches(items: list[T], size: Callable[[T], int], max_items: int) -> list[list[T]]:
    """`items` in order, split so that no batch has more than `max_items` or (by the
    estimate `size`) more than BATCH_BYTES: a list of long URLs still fits its frames."""
    out: list[list[T]] = []
    current: list[T] = []
    used = 0
    for item in items:
        n = size(item)
        if current and (len(current) >= max_items or used + n > BATCH_BYTES):
            out.append(current)
            current, used = [], 0
        current.append(item)
        used += n
    if current:
        out.append(current)
    return out


@dataclass(frozen=True, slots=True)
class JobTask:
    """One task of a job. ``task`` is what it is made of (the receiver recomputes the ID
    from it); get_task and delete_task may name a bare ``task_id`` instead. ``headers``
    go to the origin (a registry's Authorization); ``private``: made with credentials."""

    task_id: str = _id()
    task: TaskSpec | None = None
    headers: dict[str, str] = field(
        default_factory=dict, metadata=dict(max_items=64, max_len=URL_MAX)
    )
    private: bool = False


@message("run_job")
@dataclass(frozen=True, slots=True)
class RunJob(Message):
    """Manager → scheduler: run one job part on this scheduler's hosts; answered by
    JobResult messages, the last one ``final``. Hosts are chosen by ``scope``, then
    ``ips`` over ``count`` over ``percentage`` (0: not given)."""

    job_id: int = limits(min=1, max=ROW_ID_MAX)
    kind: str = limits(choices=JOB_KINDS)
    tasks: list[JobTask] = field(default_factory=list, metadata=dict(max_items=1024))
    scope: str = limits(default="single_seed_peer", choices=JOB_SCOPES)
    ips: list[str] = field(default_factory=list, metadata=dict(max_items=100, max_len=64))
    count: int = limits(default=0, min=0, max=200)
    percentage: int = limits(default=0, min=0, max=100)
    concurrent_tasks: int = limits(default=8, min=1, max=100)
    concurrent_peers: int = limits(default=500, min=1, max=1000)
    timeout_ms: int = limits(default=3_600_000, min=1, max=2**31)


@dataclass(frozen=True, slots=True)
class JobHostResult:
    """What one host did with one task of a job (or, for get_task, that it holds it)."""

    task_id: str = _id()
    host_id: str = _id()
    url: str = limits(default="", max_len=URL_MAX)
    hostname: str = limits(default="", max_len=255)
    ip: str = limits(default="", max_len=64)
    seed: bool = False
    ok: bool = True
    reason: str = _reason()


@dataclass(frozen=True, slots=True)
class HostEntry:
    """A host connected to a scheduler (list_hosts)."""

    host_id: str = _id()
    hostname: str = limits(default="", max_len=255)
    ip: str = limits(default="", max_len=64)
    upload_port: int = limits(default=0, min=0, max=65535)
    proxy_port: int = limits(default=0, min=0, max=65535)
    idc: str = limits(default="", max_len=256)
    location: str = limits(default="", max_len=256)
    seed: bool = False
    version: str = limits(default="", max_len=64)


@message("job_result")
@dataclass(frozen=True, slots=True)
class JobResult(Message):
    """Scheduler → manager: a job part's results, in as many messages as they need;
    ``error`` (on the final one) says why the part failed as a whole."""

    job_id: int = limits(min=1, max=ROW_ID_MAX)
    results: list[JobHostResult] = field(
        default_factory=list, metadata=dict(max_items=RESULTS_PER_MESSAGE)
    )
    hosts: list[HostEntry] = field(
        default_factory=list, metadata=dict(max_items=RESULTS_PER_MESSAGE)
    )
    error: str = _reason()
    final: bool = True


@message("download_task")
@dataclass(frozen=True, slots=True)
class DownloadTask(Message):
    """Scheduler → host: download this task whole, as a client's request would (a
    preheat); answered by TaskAnswer. ``ref`` is the scheduler's, echoed back."""

    ref: int = limits(min=1, max=2**63 - 1)
    task_id: str = _id()
    task: TaskSpec  # type: ignore[misc]  # (_id() sets no default: mypy cannot see it)
    headers: dict[str, str] = field(
        default_factory=dict, metadata=dict(max_items=64, max_len=URL_MAX)
    )
    private: bool = False


@message("stat_task")
@dataclass(frozen=True, slots=True)
class StatTask(Message):
    """Scheduler → host: do you hold this task whole? Answered by TaskAnswer."""

    ref: int = limits(min=1, max=2**63 - 1)
    task_id: str = _id()


@message("delete_task")
@dataclass(frozen=True, slots=True)
class DeleteTask(Message):
    """Scheduler → host: remove this task from your disk; answered by TaskAnswer."""

    ref: int = limits(min=1, max=2**63 - 1)
    task_id: str = _id()


@message("task_answer")
@dataclass(frozen=True, slots=True)
class TaskAnswer(Message):
    """Host → scheduler: the outcome of DownloadTask (``ok``), StatTask (``held``) or
    DeleteTask (``held``: it was there; ``ok``: it is gone)."""

    ref: int = limits(min=1, max=2**63 - 1)
    task_id: str = _id()
    ok: bool = True
    held: bool = False
    content_length: int = limits(default=-1, min=-1, max=OFFSET_MAX)
    reason: str = _reason()


@dataclass(frozen=True, slots=True)
class DownloadRecord:
    """One finished (or failed) download on a host. The host fields are left empty by
    the host and filled by its scheduler with the host it proved."""

    task_id: str = _id()
    url: str = limits(default="", max_len=URL_MAX)  # redacted
    content_length: int = limits(default=-1, min=-1, max=OFFSET_MAX)
    finished_at: int = limits(default=0, min=0, max=2**40)  # unix seconds
    duration_ms: int = limits(default=0, min=0, max=2**40)
    bytes_p2p: int = limits(default=0, min=0, max=OFFSET_MAX)
    bytes_source: int = limits(default=0, min=0, max=OFFSET_MAX)
    bytes_local: int = limits(default=0, min=0, max=OFFSET_MAX)
    parents: list[str] = field(default_factory=list, metadata=dict(max_items=64, max_len=255))
    error: str = _reason()
    host_id: str = limits(default="", max_len=ID_MAX)
    hostname: str = limits(default="", max_len=255)
    ip: str = limits(default="", max_len=64)


def record_size(r: DownloadRecord) -> int:
    """A record's encoded size, about (for `batches`)."""
    return 200 + len(r.task_id) + len(r.url) + len(r.error) + sum(len(p) + 2 for p in r.parents)


@message("download_records")
@dataclass(frozen=True, slots=True)
class DownloadRecords(Message):
    """Host → scheduler, and scheduler → manager: finished downloads, batched."""

    records: list[DownloadRecord] = field(default_factory=list, metadata=dict(max_items=1000))
