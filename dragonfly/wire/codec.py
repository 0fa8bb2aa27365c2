"""CBOR message codec: schema machinery, strict pre-scan, encode/decode (sans-I/O).

Why about 870 lines: the schema machinery, the pre-scan and the decoder are one format's
rules, each check stated once and relied on by the next; the messages are in messages.py.

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
then ``cbor2.loads`` and schema validation.  Whatever the input, ``decode``
returns a registered message or raises ``ProtocolError``.
"""

import dataclasses
import math
import operator
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

import cbor2

__all__ = [
    "MAX_DEPTH",
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
MAX_DEPTH = 8

DEFAULT_MAX_LEN = 8192  # str: characters; bytes: bytes
DEFAULT_MAX_ITEMS = 10000
DEFAULT_INT_MIN = -(2**63)
DEFAULT_INT_MAX = 2**64 - 1

_TAG_KEY = "t"
_LIMIT_KEYS = frozenset({"min", "max", "min_len", "max_len", "len", "max_items", "choices"})


class ProtocolError(Exception):
    """A frame that breaks the protocol; the message names what was wrong.

    ``fatal`` is True only for an oversize frame (the caller closes the
    connection); otherwise the caller answers with an Error message and goes on.
    ``ref`` is the offending message's type tag when it was known.
    """

    def __init__(self, message: str, *, fatal: bool = False, ref: str | None = None) -> None:
        super().__init__(message)
        self.fatal = fatal
        self.ref = ref


class Message:
    """Base of all registered messages (dataclasses); ``TAG`` is set by ``@message``."""

    __slots__ = ()
    TAG: ClassVar[str]


M = TypeVar("M", bound=type[Message])
T = TypeVar("T", bound=type)


# ---------------------------------------------------------------------------
# Schema machinery
# ---------------------------------------------------------------------------


class _Invalid(Exception):
    """Internal validation failure; ``path`` is collected innermost-first on the way out."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.path: list[str] = []


_Validator = Callable[[Any], Any]
_Encoder = Callable[[Any], Any] | None  # None: the value is already CBOR-ready
# Given a variable name, a Python expression that is True when the value is valid
# as is (the generated fast path); None when the full validator must always run.
_Fast = Callable[[str], str] | None


@dataclasses.dataclass(frozen=True, slots=True)
class _TypeSpec:
    validate: _Validator  # raises _Invalid, returns the (possibly converted) value
    encode: _Encoder
    fast: _Fast


@dataclasses.dataclass(slots=True)
class _ClassSpec:
    cls: type
    compact: bool
    validate: _Validator
    encode: Callable[[Any], Any]  # to a CBOR-ready value (for nesting)
    to_bytes: Callable[[Any], bytes] | None = None  # messages: the whole frame


_REGISTRY: dict[str, type[Message]] = {}
_SPECS: dict[type, _ClassSpec] = {}
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


def _fmt_num(n: int | float) -> str:
    """Render big bounds readably: 1099511627776 -> 2**40, 2147483647 -> 2**31-1."""
    if isinstance(n, float):
        return repr(n)
    if n < 0:
        return "-" + _fmt_num(-n)
    if n >= 1 << 16:
        if n & (n - 1) == 0:
            return f"2**{n.bit_length() - 1}"
        if (n + 1) & n == 0:
            return f"2**{n.bit_length()}-1"
    return str(n)


def _tname(x: Any) -> str:
    return "null" if x is None else type(x).__name__


def _check(validate: _Validator, value: Any, segment: str) -> Any:
    """Slow path of generated code: full validation, naming the field on failure."""
    try:
        return validate(value)
    except _Invalid as e:
        e.path.append(segment)
        raise


def _missing(segment: str) -> Any:
    e = _Invalid("missing required field")
    e.path.append(segment)
    raise e


def _class_spec(cls: type, tag: str | None = None) -> _ClassSpec:
    """Build (once) and cache generated validator/encoder functions for a dataclass.

    Generated code (like dataclasses' own __init__) keeps decode fast: one inline
    type/range test per field, the full validator only for nested values or on
    failure, and the frozen instance built by setting its slots directly.
    """
    spec = _SPECS.get(cls)
    if spec is not None:
        if tag is not None:
            raise TypeError(f"{cls.__name__} is already used as a nested record")
        return spec
    is_compact = bool(getattr(cls, "_wire_compact", False))
    hints = typing.get_type_hints(cls)
    ns: dict[str, Any] = {
        "_Invalid": _Invalid,
        "_tname": _tname,
        "_check": _check,
        "_missing": _missing,
        "_MISSING": dataclasses.MISSING,
        "_new": object.__new__,
        "_cls": cls,
    }
    fields = dataclasses.fields(cls)
    use_slots = not hasattr(cls, "__post_init__") and all(
        isinstance(cls.__dict__.get(f.name), types.MemberDescriptorType) for f in fields
    )
    body: list[str] = []
    enc_items: list[str] = [] if tag is None else [f"{_TAG_KEY!r}: {tag!r}"]
    n_required = 0
    for i, f in enumerate(fields):
        if f.name == _TAG_KEY and tag is not None:
            raise TypeError(f"{cls.__name__}: field name {_TAG_KEY!r} is reserved")
        if not f.init:
            raise TypeError(f"{cls.__name__}.{f.name}: init=False fields are not supported")
        meta = dict(f.metadata)
        unknown = set(meta) - _LIMIT_KEYS
        if unknown:
            raise TypeError(f"{cls.__name__}.{f.name}: unknown wire limit(s) {sorted(unknown)}")
        try:
            ts = _compile(hints[f.name], meta)
        except TypeError as e:
            raise TypeError(f"{cls.__name__}.{f.name}: {e}") from None
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required:
            if is_compact and n_required != i:
                raise TypeError(f"{cls.__name__}: compact records need required fields first")
            n_required += 1
        a, seg = f"a{i}", repr("." + f.name)
        ns[f"_v{i}"] = ts.validate
        if ts.fast is None:
            check = f"{a} = _check(_v{i}, {a}, {seg})"
        else:
            check = f"if not ({ts.fast(a)}): {a} = _check(_v{i}, {a}, {seg})"
        if f.default_factory is not dataclasses.MISSING:
            ns[f"_f{i}"] = f.default_factory
            fallback = f"{a} = _f{i}()"
        elif f.default is not dataclasses.MISSING:
            ns[f"_d{i}"] = f.default
            fallback = f"{a} = _d{i}"
        else:
            fallback = f"{a} = _missing({seg})"
        if is_compact:
            if required:
                body += [f"{a} = x[{i}]", check]
            else:
                body += [
                    f"if n > {i}:",
                    f"    {a} = x[{i}]",
                    f"    {check}",
                    "else:",
                    f"    {fallback}",
                ]
        else:
            body += [
                f"{a} = get({f.name!r}, _MISSING)",
                f"if {a} is _MISSING:",
                f"    {fallback}",
                "else:",
                f"    {check}",
            ]
        value = f"o.{f.name}"
        if ts.encode is not None:
            ns[f"_e{i}"] = ts.encode
            value = f"_e{i}({value})"
        enc_items.append(value if is_compact else f"{f.name!r}: {value}")
        if use_slots:
            ns[f"_s{i}"] = cls.__dict__[f.name].__set__
    n = len(fields)
    if is_compact:
        head = [
            "if type(x) is not list:",
            f"    raise _Invalid('expected array of {n} items, got ' + _tname(x))",
            "n = len(x)",
            f"if n < {n_required}:",
            f"    raise _Invalid('expected at least {n_required} array items, got ' + str(n))",
        ]  # extra trailing items: fields of a newer version, ignored
    else:
        head = [
            "if type(x) is not dict:",
            "    raise _Invalid('expected map, got ' + _tname(x))",
            "get = x.get",
        ]
    if use_slots:
        tail = ["o = _new(_cls)", *(f"_s{i}(o, a{i})" for i in range(n)), "return o"]
    else:
        tail = ["return _cls(" + ", ".join(f"{f.name}=a{i}" for i, f in enumerate(fields)) + ")"]
    src = "def validate(x):\n" + "".join(f"    {line}\n" for line in head + body + tail)
    if is_compact:
        src += "def encode(o):\n    return [" + ", ".join(enc_items) + "]\n"
    else:
        src += "def encode(o):\n    return {" + ", ".join(enc_items) + "}\n"
    exec(compile(src, f"<wire codec for {cls.__qualname__}>", "exec"), ns)
    spec = _ClassSpec(cls=cls, compact=is_compact, validate=ns["validate"], encode=ns["encode"])
    if tag is not None:
        spec.to_bytes = _frame_encoder(cls, tag, hints, ns)
    _SPECS[cls] = spec
    return spec


# ---------------------------------------------------------------------------
# Frame encoding with cached records
# ---------------------------------------------------------------------------
#
# The scheduler sends the same records again and again: a task's PieceDigest list in
# every CandidateParents of that task, a parent's ParentInfo to each of its children.
# Encoding them is most of the cost of those messages (cbor2 spends ~0.5 us per small
# array), so a message's lists of records are written from a cache of each record's
# CBOR bytes, keyed by the record object (only for record classes marked @reused: a
# record sent once would only fill the cache).  The records are frozen dataclasses
# of scalars: their bytes cannot change.  Such lists come last in the message's map (one
# cbor2 call writes every other field); the decoder does not care about key order.

# Records per class; past it that class's cache starts afresh.  One class's churn (a
# ParentInfo per peer, gone when the peer leaves) does not evict another's hot records
# (a task's digests).  At most a few MiB per class.
_RECORD_CACHE_LIMIT = 1 << 14


class _RecordCache:
    """id(record) -> its CBOR bytes.  `keep` holds every cached record alive, so an id in
    `raw` cannot be reused by another object while this cache exists: a hit by id is a
    hit on the very same object."""

    __slots__ = ("keep", "raw")

    def __init__(self) -> None:
        self.raw: dict[int, bytes] = {}
        self.keep: list[object] = []

    def add(self, record: object, data: bytes) -> None:
        self.keep.append(record)  # first keep it alive, then make it findable
        self.raw[id(record)] = data


# The current cache of each @reused class (a new one replaces a full one: readers of
# the old one stay consistent).
_record_caches: dict[type, _RecordCache] = {}


def _array_head(n: int) -> bytes:
    if n < 24:
        return bytes((0x80 | n,))
    if n < 0x100:
        return bytes((0x98, n))
    if n < 0x10000:
        return b"\x99" + n.to_bytes(2, "big")
    if n < 0x100000000:
        return b"\x9a" + n.to_bytes(4, "big")
    return b"\x9b" + n.to_bytes(8, "big")


# A whole list is cached too when it has at least this many records: a task's digest
# list goes out unchanged in every CandidateParents of the task, and checking it item by
# item for identity (C speed) is ~3x cheaper than looking each record up.  Shorter lists
# (a peer's few parents) vary too much to be worth it.  Bounded by the bytes it holds.
_WHOLE_LIST_MIN = 8
_WHOLE_LIST_BYTES = 16 << 20


def _record_list_encoder(record_cls: type) -> Callable[[Any], bytes]:
    dumps = cbor2.dumps
    is_ = operator.is_
    record_encode = _class_spec(record_cls).encode
    caches = _record_caches
    caches.setdefault(record_cls, _RecordCache())
    # (id of the first record, length) -> (the records, the array's bytes); the tuple
    # keeps the records alive, so a match checked by identity is the same list.
    lists: dict[tuple[int, int], tuple[tuple[Any, ...], bytes]] = {}
    held = [0]  # bytes in `lists`

    def encode_list(items: Any) -> bytes:
        n = len(items)
        if n >= _WHOLE_LIST_MIN:
            hit = lists.get((id(items[0]), n))
            if hit is not None and all(map(is_, items, hit[0])):
                return hit[1]
        cache = caches[record_cls]
        parts = list(map(cache.raw.get, map(id, items)))
        try:
            # (a None in parts raises TypeError: the records not cached yet, below)
            data = _array_head(n) + b"".join(parts)  # type: ignore[arg-type]
        except TypeError:
            for i, part in enumerate(parts):
                if part is None:
                    item = items[i]
                    parts[i] = encoded = dumps(record_encode(item))
                    if len(cache.keep) >= _RECORD_CACHE_LIMIT:
                        cache = caches[record_cls] = _RecordCache()
                    cache.add(item, encoded)
            data = _array_head(n) + b"".join(parts)  # type: ignore[arg-type]  # (none left)
        if n >= _WHOLE_LIST_MIN:
            key = (id(items[0]), n)
            replaced = lists.pop(key, None)
            if replaced is not None:
                held[0] -= len(replaced[1])
            if held[0] + len(data) > _WHOLE_LIST_BYTES:
                lists.clear()
                held[0] = 0
            lists[key] = (tuple(items), data)
            held[0] += len(data)
        return data

    return encode_list


_SCALARS = (int, str, bytes, bool, float, type(None))


def _cacheable_record(tp: Any) -> type | None:
    """The record class of a `list[Record]` field whose records can be cached: marked
    @reused, a frozen dataclass with scalar fields only (so its bytes never change)."""
    if typing.get_origin(tp) is not list:
        return None
    (item,) = typing.get_args(tp)
    if not (isinstance(item, type) and dataclasses.is_dataclass(item)):
        return None
    if not getattr(item, "_wire_reused", False):
        return None
    if not item.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        return None
    for hint in typing.get_type_hints(item).values():
        args = typing.get_args(hint) if typing.get_origin(hint) is not None else (hint,)
        if not all(a in _SCALARS for a in args):
            return None
    return item


def _frame_encoder(
    cls: type, tag: str, hints: dict[str, Any], ns: dict[str, Any]
) -> Callable[[Any], bytes]:
    """A message's frame: one map head for every field, the plain fields written by one
    cbor2 call (its own 1-byte map head dropped), then each list of cacheable records."""
    fields = dataclasses.fields(cls)
    plain_enc: Callable[[Any], Any] = ns["encode"]
    records = {f.name: _cacheable_record(hints[f.name]) for f in fields}
    if len(fields) + 1 >= 24 or not any(records.values()):  # (a map head of one byte)
        return lambda o: cbor2.dumps(plain_enc(o))
    env: dict[str, Any] = {"_dumps": cbor2.dumps, "_join": b"".join}
    plain = [f"{_TAG_KEY!r}: {tag!r}"]
    lists = []
    for i, f in enumerate(fields):
        record = records[f.name]
        if record is not None:
            env[f"_r{i}"] = _record_list_encoder(record)
            lists += [repr(cbor2.dumps(f.name)), f"_r{i}(o.{f.name})"]
        elif f"_e{i}" in ns:  # the field's own encoder (a nested record, an optional...)
            env[f"_e{i}"] = ns[f"_e{i}"]
            plain.append(f"{f.name!r}: _e{i}(o.{f.name})")
        else:
            plain.append(f"{f.name!r}: o.{f.name}")
    head = repr(bytes((0xA0 | (len(fields) + 1),)))
    parts = [head, "_dumps({" + ", ".join(plain) + "})[1:]", *lists]
    src = "def to_bytes(o):\n    return _join((" + ", ".join(parts) + ",))\n"
    exec(compile(src, f"<wire frame encoder for {cls.__qualname__}>", "exec"), env)
    return env["to_bytes"]  # type: ignore[no-any-return]


def _compile(tp: Any, meta: dict[str, Any]) -> _TypeSpec:
    """Validator, encoder and fast-path test for one annotated type with its limits."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1 or len(typing.get_args(tp)) != 2:
            raise TypeError(f"unsupported union {tp!r} (only T | None)")
        inner = _compile(args[0], meta)
        inner_v, inner_e, inner_fast = inner.validate, inner.encode, inner.fast

        def v_opt(x: Any) -> Any:
            return None if x is None else inner_v(x)

        e_opt = None if inner_e is None else (lambda x: None if x is None else inner_e(x))
        fast_opt = None if inner_fast is None else (lambda a: f"{a} is None or ({inner_fast(a)})")
        return _TypeSpec(v_opt, e_opt, fast_opt)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        item_meta = {k: v for k, v in meta.items() if k != "max_items"}
        return _list(_compile(item_tp, item_meta), meta.get("max_items", DEFAULT_MAX_ITEMS))
    if origin is dict:
        if typing.get_args(tp) != (str, str):
            raise TypeError(f"unsupported dict type {tp!r} (only dict[str, str])")
        v = _str_dict(
            meta.get("max_items", DEFAULT_MAX_ITEMS), meta.get("max_len", DEFAULT_MAX_LEN)
        )
        return _TypeSpec(v, None, None)
    if tp is bool:
        return _TypeSpec(_bool, None, lambda a: f"type({a}) is bool")
    if tp is int:
        lo, hi = int(meta.get("min", DEFAULT_INT_MIN)), int(meta.get("max", DEFAULT_INT_MAX))
        return _TypeSpec(_int(lo, hi), None, lambda a: f"type({a}) is int and {lo} <= {a} <= {hi}")
    if tp is float:
        return _TypeSpec(_float(meta.get("min", -math.inf), meta.get("max", math.inf)), None, None)
    if tp is str:
        mn, mx = int(meta.get("min_len", 0)), int(meta.get("max_len", DEFAULT_MAX_LEN))
        choices = meta.get("choices")
        fast = (
            None
            if choices is not None
            else (lambda a: f"type({a}) is str and {mn} <= len({a}) <= {mx}")
        )
        return _TypeSpec(_str(mn, mx, choices), None, fast)
    if tp is bytes:
        if "len" in meta:
            mn = mx = int(meta["len"])
        else:
            mn, mx = int(meta.get("min_len", 0)), int(meta.get("max_len", DEFAULT_MAX_LEN))
        return _TypeSpec(
            _bytes(mn, mx), None, lambda a: f"type({a}) is bytes and {mn} <= len({a}) <= {mx}"
        )
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if issubclass(tp, Message):
            raise TypeError(f"a message ({tp.__name__}) cannot be nested")
        spec = _class_spec(tp)
        return _TypeSpec(spec.validate, spec.encode, None)
    raise TypeError(f"unsupported field type {tp!r}")


def _bool(x: Any) -> Any:
    if type(x) is not bool:
        raise _Invalid(f"expected bool, got {_tname(x)}")
    return x


def _int(lo: int, hi: int) -> _Validator:
    desc = f"expected int in [{_fmt_num(lo)}, {_fmt_num(hi)}]"

    def v(x: Any) -> Any:
        if type(x) is not int:  # bool is not an int on this wire
            raise _Invalid(f"{desc}, got {_tname(x)}")
        if x < lo or x > hi:
            raise _Invalid(f"{desc}, got {x}")
        return x

    return v


def _float(lo: float, hi: float) -> _Validator:
    desc = f"expected finite float in [{_fmt_num(lo)}, {_fmt_num(hi)}]"

    def v(x: Any) -> Any:
        t = type(x)
        if t is int:
            try:
                x = float(x)
            except OverflowError:
                raise _Invalid(f"{desc}, got {x}") from None
        elif t is not float:
            raise _Invalid(f"{desc}, got {_tname(x)}")
        if not (lo <= x <= hi) or not math.isfinite(x):
            raise _Invalid(f"{desc}, got {x!r}")
        return x

    return v


def _str(min_len: int, max_len: int, choices: Any) -> _Validator:
    allowed = frozenset(choices) if choices is not None else None
    shown = "|".join(sorted(allowed)) if allowed is not None else ""

    def v(x: Any) -> Any:
        if type(x) is not str:
            raise _Invalid(f"expected str, got {_tname(x)}")
        n = len(x)
        if n > max_len or n < min_len:
            raise _Invalid(f"expected str of {min_len}..{max_len} chars, got {n}")
        if allowed is not None and x not in allowed:
            raise _Invalid(f"expected one of {shown}, got {x[:64]!r}")
        return x

    return v


def _bytes(min_len: int, max_len: int) -> _Validator:
    desc = f"{min_len}" if min_len == max_len else f"{min_len}..{max_len}"

    def v(x: Any) -> Any:
        if type(x) is not bytes:
            raise _Invalid(f"expected bytes, got {_tname(x)}")
        n = len(x)
        if n > max_len or n < min_len:
            raise _Invalid(f"expected {desc} bytes, got {n}")
        return x

    return v


def _list(item: _TypeSpec, max_items: int) -> _TypeSpec:
    item_v, item_e = item.validate, item.encode

    def v(x: Any) -> Any:
        if type(x) is not list:
            raise _Invalid(f"expected array, got {_tname(x)}")
        if len(x) > max_items:
            raise _Invalid(f"expected at most {max_items} items, got {len(x)}")
        try:
            return [item_v(it) for it in x]
        except _Invalid:
            pass
        for i, it in enumerate(x):  # error path: find the culprit again to name its index
            _check(item_v, it, f"[{i}]")
        raise AssertionError("unreachable: item validation is deterministic")

    if item_e is None:
        return _TypeSpec(v, None, None)
    enc = item_e
    return _TypeSpec(v, lambda xs: [enc(x) for x in xs], None)


def _str_dict(max_items: int, max_len: int) -> _Validator:
    def v(x: Any) -> Any:
        if type(x) is not dict:
            raise _Invalid(f"expected map, got {_tname(x)}")
        if len(x) > max_items:
            raise _Invalid(f"expected at most {max_items} entries, got {len(x)}")
        for key, value in x.items():
            if type(key) is not str or len(key) > max_len:
                got = f"str of {len(key)} chars" if type(key) is str else _tname(key)
                raise _Invalid(f"expected keys of at most {max_len} chars, got {got}")
            if type(value) is not str or len(value) > max_len:
                got = f"str of {len(value)} chars" if type(value) is str else _tname(value)
                e = _Invalid(f"expected str of at most {max_len} chars, got {got}")
                e.path.append(f"[{key[:32]!r}]")
                raise e
        return x

    return v


# ---------------------------------------------------------------------------
# Structural pre-scan of untrusted bytes
# ---------------------------------------------------------------------------


def _scalar_sizes() -> bytes:
    """Initial byte -> total size of a fixed-size scalar item, 0 for anything else.

    Scalars: integers (major 0, 1), false/true/null and half/single/double floats.
    """
    sizes = bytearray(256)
    for ib in range(256):
        major, ai = ib >> 5, ib & 31
        if major in (0, 1) or (major == 7 and ai in (20, 21, 22, 25, 26, 27)):
            if ai < 24:
                sizes[ib] = 1
            elif ai < 28:
                sizes[ib] = 1 + (1 << (ai - 24))
    return bytes(sizes)


_SCALAR_SIZE = _scalar_sizes()


def _prescan(data: bytes, max_depth: int = MAX_DEPTH) -> None:
    """Check the raw CBOR structure before cbor2 sees it; raise ProtocolError on anything odd.

    One iterative pass, O(bytes), no recursion.  Map keys must be text strings;
    duplicates are found by comparing their content bytes (so a non-minimal length
    head cannot smuggle a duplicate past the check).  Overrunning the end shows up
    as an IndexError or as ``pos > n`` at the end: both mean truncated.
    """
    n = len(data)
    pos = 0
    sizes = _SCALAR_SIZE
    stack: list[tuple[int, set[bytes] | None]] = []  # the enclosing containers' state
    rem = 1  # items (map: entries) left in the current container; the root holds one
    keys: set[bytes] | None = None  # seen keys when the current container is a map
    try:
        while True:
            if keys is not None:  # a map entry: first its key, which must be a text string
                ib = data[pos]
                if 0x60 <= ib <= 0x77:
                    start = pos + 1
                    end = start + ib - 0x60
                elif ib == 0x78:  # a one-byte length, inline: the common long-ish key
                    start = pos + 2
                    end = start + data[pos + 1]
                else:
                    if not 0x78 <= ib <= 0x7B:
                        if ib == 0x7F or ib == 0xBF or ib == 0x9F or ib == 0x5F:
                            raise ProtocolError("indefinite-length item not allowed")
                        raise ProtocolError("map key must be a text string")
                    start, end = _long_string(data, pos, n)
                if end > n:
                    raise ProtocolError(
                        f"string of {end - start} bytes exceeds the {n - start} remaining bytes"
                    )
                key = data[start:end]
                if key in keys:
                    raise ProtocolError(f"duplicate map key {_show_key(key)}")
                keys.add(key)
                pos = end
            ib = data[pos]
            size = sizes[ib]
            if size:
                pos += size
            else:
                major = ib >> 5
                ai = ib & 31
                if ai > 27:
                    if ai == 31:
                        raise ProtocolError("indefinite-length item not allowed")
                    raise ProtocolError(f"reserved CBOR additional info {ai} at byte {pos}")
                if major == 2 or major == 3:
                    if ai < 24:
                        start = pos + 1
                        end = start + ai
                    elif ai == 24:  # one-byte length (a digest, an id), inline: hot
                        start = pos + 2
                        end = start + data[pos + 1]
                    else:
                        start, end = _long_string(data, pos, n)
                    if end > n:
                        raise ProtocolError(
                            f"string of {end - start} bytes exceeds the {n - start} remaining bytes"
                        )
                    pos = end
                elif major == 4 or major == 5:
                    if len(stack) >= max_depth:
                        raise ProtocolError(f"nesting deeper than {max_depth}")
                    if ai < 24:
                        count = ai
                        pos += 1
                    else:
                        start, _ = _long_string(data, pos, n)
                        count = int.from_bytes(data[pos + 1 : start], "big")
                        pos = start
                    if (count if major == 4 else 2 * count) > n - pos:
                        raise ProtocolError(
                            f"container of {count} items exceeds the {n - pos} remaining bytes"
                        )
                    if count:
                        stack.append((rem, keys))
                        rem = count
                        keys = set() if major == 5 else None
                        continue
                elif major == 6:
                    raise ProtocolError("CBOR tags not allowed")
                else:  # major 7 (0 and 1 are all scalars)
                    raise ProtocolError(f"CBOR simple value {ib & 31} not allowed")
            # one item finished: close every container it completes
            rem -= 1
            while not rem:
                if not stack:
                    break
                rem, keys = stack.pop()
                rem -= 1
            else:
                continue
            break
    except IndexError:
        raise ProtocolError(f"truncated CBOR item ({n} bytes)") from None
    if pos > n:
        raise ProtocolError(f"truncated CBOR item ({n} bytes)")
    if pos != n:
        raise ProtocolError(f"trailing bytes after CBOR item ({pos} of {n} consumed)")


def _long_string(data: bytes, pos: int, n: int) -> tuple[int, int]:
    """(start, end) of the payload of the string whose head at ``pos`` has a 1..8-byte
    length argument (also used for container counts: then start is past the head)."""
    start = pos + 1 + (1 << ((data[pos] & 31) - 24))
    if start > n:
        raise IndexError
    length = data[pos + 1] if start == pos + 2 else int.from_bytes(data[pos + 1 : start], "big")
    return start, start + length


def _show_key(key: bytes) -> str:
    try:
        return repr(key.decode("utf-8")[:64])
    except UnicodeDecodeError:
        return repr(key[:64])


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
        obj = cbor2.loads(frame)
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
