"""Bytes on disk: sparse task files, piece metadata in SQLite, digests, GC."""

from dragonfly.net.zerocopy import IncompleteBody, SplicePipe

from .errors import (
    DigestMismatch,
    IncompleteTask,
    RangeNotAvailable,
    StorageError,
    TaskInUse,
    UnknownTask,
)
from .gc import GCConfig, TaskUsage, plan_gc
from .handle import PieceSink, TaskHandle
from .metadata import MetadataDB, PieceRecord, TaskRecord, TaskState
from .store import PieceStore
from .taskfile import TaskFile, task_path, validate_task_id

__all__ = [
    "DigestMismatch",
    "GCConfig",
    "IncompleteBody",
    "IncompleteTask",
    "MetadataDB",
    "PieceRecord",
    "PieceSink",
    "PieceStore",
    "RangeNotAvailable",
    "SplicePipe",
    "StorageError",
    "TaskFile",
    "TaskHandle",
    "TaskInUse",
    "TaskRecord",
    "TaskState",
    "TaskUsage",
    "UnknownTask",
    "plan_gc",
    "task_path",
    "validate_task_id",
]
