"""The wire messages: one frozen dataclass per message type, registered with the codec.

Peer ↔ scheduler messages travel over one websocket per (host, scheduler) and are
routed by (task_id, peer_id); peer ↔ peer metadata messages travel over the
parent's announcement websocket.  Every websocket starts with a ``Hello`` in both
directions (``check_version`` negotiates).  Limits below are what a receiver
accepts; senders must split longer piece lists over several messages.

Adding a field later: give it a default (and put it last in a ``@compact`` record)
so older peers, which ignore unknown keys, keep working.

Protocol note (manager): schedulers and seed peers talk to the manager over its own
websocket (``/v1/manager``) with ``AnnounceMember`` → ``MemberRegistered``, then a
``Ping`` every keepalive interval (answered by ``Pong``); anyone may ask for
schedulers with ``ListSchedulers`` → ``SchedulerList``. These types travel on that
websocket only, so peers and schedulers of protocol 2 that never connect to a
manager are unaffected (no version change). A member proves its credential after the
Hellos as on the scheduler websocket (``Proof`` both ways); a scheduler then gets its
cluster's settings (``ConfigUpdate``) and the revoked hosts (``Revocations``) whenever
they change, and reports its hosts (``HostsReport``) periodically or on ``SyncHosts``.
manager are unaffected (no version change).

Protocol note (jobs, 4): the manager sends a scheduler ``RunJob`` (preheat, get_task,
delete_task, list_hosts) and gets ``JobResult`` back; the scheduler asks its hosts with
``DownloadTask``, ``StatTask`` and ``DeleteTask``, each answered by a ``TaskAnswer``.
Hosts send ``DownloadRecords`` (one per finished download) to their scheduler, which
forwards them to the manager with the host it proved. Hosts and schedulers send these
only on a channel whose agreed version is 4 or more.

The classes live in records.py (shared limits, field shorthands and nested records),
msg_handshake.py, msg_scheduler.py and msg_manager.py; this module re-exports every
name, and importing it registers every message with the codec, in the order above.
"""

# The modules are imported in the order of the sections, which is the order the messages
# register with the codec (MESSAGE_TYPES).
# isort: off
from dragonfly.wire.records import (
    Claims,
    DIGEST_LEN as DIGEST_LEN,
    DIGEST_MAX as DIGEST_MAX,
    ErrorCode,
    HELD_PIECES_MAX,
    HostInfo,
    ID_MAX as ID_MAX,
    NONCE_MAX as NONCE_MAX,
    OFFSET_MAX as OFFSET_MAX,
    PIECE_LENGTH_MAX as PIECE_LENGTH_MAX,
    PIECE_NUMBER_MAX as PIECE_NUMBER_MAX,
    PROOF_LEN as PROOF_LEN,
    ParentInfo,
    PieceDigest,
    PieceInfo,
    PieceReport,
    REASON_MAX as REASON_MAX,
    REGISTER_HELD_MAX,
    ROLES,
    TICKET_MAX as TICKET_MAX,
    TaskSpec,
    URL_MAX as URL_MAX,
    _digest as _digest,
    _id as _id,
    _number as _number,
    _opt_id as _opt_id,
    _reason as _reason,
)
from dragonfly.wire.msg_handshake import (
    Error,
    Hello,
    Ping,
    Pong,
    Proof,
    check_version,
)
from dragonfly.wire.msg_scheduler import (
    AnnounceDone,
    CandidateParents,
    HeldTask,
    HeldTasks,
    LeaveHost,
    LeavePeer,
    NeedBackToSource,
    PeerFailed,
    PeerFinished,
    PieceAnnounce,
    PieceDigests,
    PieceFailed,
    PiecesFinished,
    RegisterPeer,
    Reschedule,
    Subscribe,
    TaskAttested,
    TaskFailed,
    TaskMetadata,
    TasksRemoved,
    TriggerDownload,
)
from dragonfly.wire.msg_manager import (
    AnnounceMember,
    BATCH_BYTES as BATCH_BYTES,
    BlockRules,
    CONTINUITY_VERSION as CONTINUITY_VERSION,
    ClusterConfig,
    ConfigUpdate,
    DeleteTask,
    DownloadRecord,
    DownloadRecords,
    DownloadTask,
    HostEntry,
    HostsReport,
    JOB_KINDS as JOB_KINDS,
    JOB_SCOPES as JOB_SCOPES,
    JOB_VERSION as JOB_VERSION,
    JobHostResult,
    JobResult,
    JobTask,
    ListSchedulers,
    MemberRegistered,
    REMOVAL_VERSION as REMOVAL_VERSION,
    RESULTS_PER_MESSAGE as RESULTS_PER_MESSAGE,
    ROW_ID_MAX as ROW_ID_MAX,
    Revocations,
    RevokedHost,
    RunJob,
    SchedulerEntry,
    SchedulerList,
    StatTask,
    SyncHosts,
    TaskAnswer,
    batches as batches,
    record_size as record_size,
)
# isort: on

__all__ = [
    "HELD_PIECES_MAX",
    "REGISTER_HELD_MAX",
    "ROLES",
    "AnnounceDone",
    "AnnounceMember",
    "BlockRules",
    "CandidateParents",
    "Claims",
    "ClusterConfig",
    "ConfigUpdate",
    "DeleteTask",
    "DownloadRecord",
    "DownloadRecords",
    "DownloadTask",
    "Error",
    "ErrorCode",
    "HeldTask",
    "HeldTasks",
    "Hello",
    "HostEntry",
    "HostInfo",
    "HostsReport",
    "JobHostResult",
    "JobResult",
    "JobTask",
    "LeaveHost",
    "LeavePeer",
    "ListSchedulers",
    "MemberRegistered",
    "NeedBackToSource",
    "ParentInfo",
    "PeerFailed",
    "PeerFinished",
    "PieceAnnounce",
    "PieceDigest",
    "PieceDigests",
    "PieceFailed",
    "PieceInfo",
    "PieceReport",
    "PiecesFinished",
    "Ping",
    "Pong",
    "Proof",
    "RegisterPeer",
    "Reschedule",
    "Revocations",
    "RevokedHost",
    "RunJob",
    "SchedulerEntry",
    "SchedulerList",
    "StatTask",
    "Subscribe",
    "SyncHosts",
    "TaskAnswer",
    "TaskAttested",
    "TaskFailed",
    "TaskMetadata",
    "TaskSpec",
    "TasksRemoved",
    "TriggerDownload",
    "check_version",
]
