"""CBOR message codec: protocol versions, the message registry, encode/decode (sans-I/O).

The parts: the messages are in messages.py, the compiled schema (the Message base and each
dataclass's generated validator and encoder) in schema.py, the value validators in
validators.py, the structural pre-scan in prescan.py, ProtocolError in errors.py.

Wire format (one websocket binary message = one frame = one CBOR item):

    {"t": "<type tag>", "<field>": <value>, ...}

A flat CBOR map; the reserved key ``"t"`` holds the message's type tag and every
other key is a dataclass field.  Nested dataclasses are maps of their fields,
except classes marked ``@compact``, which are arrays of their fields in
declaration order (used for the per-piece records of the batched messages: a
100-piece report is then ~half the size and decodes faster).  Digests are raw
32-byte byte strings.

Forward compatibility: unknown map keys are ignored, and extra trailing array
elements of a compact record are ignored, so a newer peer may add fields (with
defaults, at the end of compact records) without breaking an older one.  The
protocol version itself is negotiated in the Hello handshake (messages.py).

Decoding is defensive because frames come from untrusted peers: the size check
comes first (the only *fatal* error), then a pure-Python structural pre-scan of
the raw bytes (no indefinite lengths, no tags, no simple values other than
false/true/null, nesting at most ``MAX_DEPTH``, map keys must be text strings
and unique, declared lengths must fit, exactly one item with no trailing bytes),
then cbor2's decoder and schema validation.  Whatever the input, ``decode``
returns a registered message or raises ``ProtocolError``.
"""

import dataclasses
import io
import types
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import cbor2

from dragonfly.wire.errors import ProtocolError
from dragonfly.wire.prescan import _prescan
from dragonfly.wire.schema import _LIMIT_KEYS, _SPECS, _TAG_KEY, Message, _class_spec
from dragonfly.wire.validators import _Invalid, _tname

__all__ = [
    "MAX_FRAME",
    "MESSAGE_TYPES",
    "MIN_PROTOCOL_VERSION",
    "PROTOCOL_VERSION",
    "Message",
    "ProtocolError",
    "compact",
    "decode",
    "encode",
    "limits",
    "message",
    "reused",
]

# 2: RegisterPeer and TriggerDownload carry the task as one TaskSpec record.
# 3: cluster identity: Hello carries a nonce (and a peer's claims), a Proof each way;
#    tickets in CandidateParents and Subscribe; the private flag of a task.
# 4: jobs (DownloadTask, StatTask, DeleteTask → TaskAnswer) and DownloadRecords between
#    hosts and schedulers; a host's software version in HostInfo. A side speaking 3 is
#    never sent these (their senders check the channel's version).
# 5: continuity: RegisterPeer carries the pieces a download holds, HostInfo whether the
#    host is rejoining; HeldTasks and TaskAttested (a restarted scheduler learns who
#    holds what without the origin), sent only to a side speaking 5.
# 6: TasksRemoved: a host tells its schedulers which tasks it no longer holds (evicted,
#    deleted), so no child is sent to a parent without the bytes; sent only to a side
#    speaking 6.
PROTOCOL_VERSION = 6
MIN_PROTOCOL_VERSION = 3
MAX_FRAME = 1 << 20

M = TypeVar("M", bound=type[Message])
T = TypeVar("T", bound=type)


_REGISTRY: dict[str, type[Message]] = {}
MESSAGE_TYPES: Mapping[str, type[Message]] = types.MappingProxyType(_REGISTRY)


def limits(
    *,
    default: Any = dataclasses.MISSING,
    default_factory: Any = dataclasses.MISSING,
    **limit: Any,
) -> Any:
    """``dataclasses.field`` with wire limits as metadata, e.g. ``limits(min=0, max=2**31 - 1)``.

    Keys: min/max (int, float), min_len/max_len (str chars, bytes; also the
    items of a list and the keys/values of a dict), len (exact bytes length),
    max_items (list, dict), choices (str).
    """
    unknown = set(limit) - _LIMIT_KEYS
    if unknown:
        raise TypeError(f"unknown wire limit(s) {sorted(unknown)}")
    return dataclasses.field(default=default, default_factory=default_factory, metadata=limit)


def compact(cls: T) -> T:
    """Mark a nested dataclass to be encoded as an array of its fields (hot records)."""
    cls._wire_compact = True  # type: ignore[attr-defined]
    return cls


def reused(cls: T) -> T:
    """Mark a nested record that senders reuse across messages (the same object in many
    frames): lists of it are encoded from a cache of each record's bytes."""
    cls._wire_reused = True  # type: ignore[attr-defined]
    return cls


def message(tag: str) -> Callable[[M], M]:
    """Register a frozen slotted dataclass as the message with type tag ``tag``."""

    def register(cls: M) -> M:
        if not dataclasses.is_dataclass(cls) or not issubclass(cls, Message):
            raise TypeError(f"{cls.__name__} must be a dataclass subclassing Message")
        if tag in _REGISTRY:
            raise TypeError(f"message tag {tag!r} already registered to {_REGISTRY[tag].__name__}")
        if getattr(cls, "_wire_compact", False):
            raise TypeError(f"{cls.__name__}: a message cannot be compact")
        if any(f.name == "TAG" for f in dataclasses.fields(cls)):
            raise TypeError(f"{cls.__name__}: field name 'TAG' is reserved")
        _class_spec(cls, tag)
        cls.TAG = tag
        _REGISTRY[tag] = cls
        return cls

    return register


# ---------------------------------------------------------------------------
# Public encode / decode
# ---------------------------------------------------------------------------


def encode(msg: Message) -> bytes:
    """Serialize a registered message to one CBOR frame (not validated: trust our own code)."""
    cls = type(msg)
    spec = _SPECS.get(cls)
    tag = getattr(cls, "TAG", None)
    if spec is None or tag is None or _REGISTRY.get(tag) is not cls or spec.to_bytes is None:
        raise TypeError(f"{cls.__name__} is not a registered message")
    return spec.to_bytes(msg)


def decode(frame: bytes | bytearray | memoryview, max_frame: int = MAX_FRAME) -> Message:
    """Parse and validate one frame from a peer; raise ProtocolError for anything invalid."""
    if isinstance(frame, str):
        raise ProtocolError("expected a binary frame, got text")
    if not isinstance(frame, bytes):
        try:
            frame = bytes(frame)
        except Exception as e:
            raise ProtocolError(f"expected a binary frame, got {type(frame).__name__}") from e
    if len(frame) > max_frame:
        raise ProtocolError(
            f"frame of {len(frame)} bytes exceeds the {max_frame}-byte limit", fatal=True
        )
    _prescan(frame)
    try:
        # One read of the whole frame: cbor2.loads reads its BytesIO an item at a time
        # (a Python call per item, 2-3x the cost). The pre-scan proved the frame is one
        # item with no trailing bytes, so reading ahead takes nothing that is not its.
        obj = cbor2.CBORDecoder(io.BytesIO(frame), read_size=len(frame)).decode()
    except Exception as e:  # CBORDecodeError, UnicodeDecodeError, ValueError, ...
        raise ProtocolError(f"invalid CBOR: {e}") from e
    if type(obj) is not dict:
        raise ProtocolError(f"expected a map at top level, got {_tname(obj)}")
    tag = obj.get(_TAG_KEY)
    if type(tag) is not str:
        raise ProtocolError(f"missing or non-string message type key {_TAG_KEY!r}")
    cls = _REGISTRY.get(tag)
    if cls is None:
        raise ProtocolError(f"unknown message type {tag[:64]!r}")
    try:
        return _SPECS[cls].validate(obj)  # type: ignore[no-any-return]
    except _Invalid as e:
        path = "".join(reversed(e.path))
        raise ProtocolError(f"{cls.__name__}{path}: {e.detail}", ref=tag) from None
    except Exception as e:  # a dataclass __post_init__ refusing the value, say
        raise ProtocolError(f"{cls.__name__}: {e}", ref=tag) from e
