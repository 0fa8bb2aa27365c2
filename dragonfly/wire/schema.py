"""The message schema compiled to code: the Message base, the wire limits, and for each
dataclass a generated validator and encoder (sans-I/O).

Generated code keeps decode and encode fast; a message's frame writer takes the bytes of
records it has sent before from a cache.  Registration (``@message``) is in codec.py.
"""

import dataclasses
import io
import math
import operator
import threading
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar

import cbor2

from dragonfly.wire.validators import (
    _bool,
    _bytes,
    _check,
    _float,
    _int,
    _Invalid,
    _list,
    _str,
    _str_dict,
    _tname,
    _TypeSpec,
    _Validator,
)

__all__ = [
    "DEFAULT_INT_MAX",
    "DEFAULT_INT_MIN",
    "DEFAULT_MAX_ITEMS",
    "DEFAULT_MAX_LEN",
    "Message",
]

DEFAULT_MAX_LEN = 8192  # str: characters; bytes: bytes
DEFAULT_MAX_ITEMS = 10000
DEFAULT_INT_MIN = -(2**63)
DEFAULT_INT_MAX = 2**64 - 1

_TAG_KEY = "t"
_LIMIT_KEYS = frozenset({"min", "max", "min_len", "max_len", "len", "max_items", "choices"})


class Message:
    """Base of all registered messages (dataclasses); ``TAG`` is set by ``@message``."""

    __slots__ = ()
    TAG: ClassVar[str]


@dataclasses.dataclass(slots=True)
class _ClassSpec:
    cls: type
    compact: bool
    validate: _Validator
    encode: Callable[[Any], Any]  # to a CBOR-ready value (for nesting)
    to_bytes: Callable[[Any], bytes] | None = None  # messages: the whole frame
    many: _Validator | None = None  # a list of compact records (see _many_source)


_SPECS: dict[type, _ClassSpec] = {}


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
    fast_tests: list[str] = []  # each field's inline test, while every field has one
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
            fast_tests = []
        else:
            if len(fast_tests) == i:
                fast_tests.append(ts.fast(a))
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
    twin = _mutable_twin(cls) if use_slots else None
    if twin is not None:
        ns["_twin"] = twin
        stores = (f"o.{f.name} = a{i}" for i, f in enumerate(fields))
        tail = ["o = _new(_twin)", *stores, "o.__class__ = _cls", "return o"]
    elif use_slots:
        tail = ["o = _new(_cls)", *(f"_s{i}(o, a{i})" for i in range(n)), "return o"]
    else:
        tail = ["return _cls(" + ", ".join(f"{f.name}=a{i}" for i, f in enumerate(fields)) + ")"]
    src = "def validate(x):\n" + "".join(f"    {line}\n" for line in head + body + tail)
    if is_compact:
        src += "def encode(o):\n    return [" + ", ".join(enc_items) + "]\n"
    else:
        src += "def encode(o):\n    return {" + ", ".join(enc_items) + "}\n"
    if is_compact and len(fast_tests) == n:
        src += _many_source(n, fast_tests, tail)
    exec(compile(src, f"<wire codec for {cls.__qualname__}>", "exec"), ns)
    spec = _ClassSpec(
        cls=cls,
        compact=is_compact,
        validate=ns["validate"],
        encode=ns["encode"],
        many=ns.get("validate_many"),
    )
    if tag is not None:
        spec.to_bytes = _frame_encoder(cls, tag, hints, ns)
    _SPECS[cls] = spec
    return spec


def _mutable_twin(cls: type) -> type | None:
    """A plain class with the slots of the frozen slotted ``cls``: the generated validators
    fill one with plain stores and then make it a ``cls`` by setting its ``__class__`` (the
    same layout, so CPython allows it), about half the cost of calling each frozen slot's
    setter. None where CPython refuses the assignment (another layout)."""
    slots = cls.__dict__.get("__slots__", ())
    twin = type(f"_{cls.__name__}Draft", cls.__bases__, {"__slots__": slots})
    draft: Any = object.__new__(twin)
    try:
        draft.__class__ = cls
    except TypeError:
        return None
    return twin


def _many_source(n: int, tests: list[str], tail: list[str]) -> str:
    """validate_many(xs): a list of compact records in one loop. A record with all its
    fields, each passing its inline test, is built on the spot; any other goes through
    validate (which raises naming the field), so the result is validate's for each."""
    names = ", ".join(f"a{i}" for i in range(n))
    *build, last = tail  # (building the record, then "return RECORD")
    build.append(f"append({last.removeprefix('return ')})")
    lines = [
        "out = []",
        "append = out.append",
        "for x in xs:",
        f"    if type(x) is list and len(x) == {n}:",
        f"        {names}, = x",
        "        if " + " and ".join(f"({t})" for t in tests) + ":",
        *(f"            {line}" for line in build),
        "            continue",
        "    append(validate(x))",
        "return out",
    ]
    return "def validate_many(xs):\n" + "".join(f"    {line}\n" for line in lines)


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
        return _TypeSpec(spec.validate, spec.encode, None, spec.many)
    raise TypeError(f"unsupported field type {tp!r}")


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


class _Encoders(threading.local):
    """Each thread's own cbor2 encoder, reused: cbor2 sets up a new encoder (its table of
    types) in ~2.5 us, as long as encoding a whole small frame takes."""

    def __init__(self) -> None:
        self.encoder = cbor2.CBOREncoder(io.BytesIO())


_encoders = _Encoders()


def _dumps(value: Any) -> bytes:
    """``cbor2.dumps(value)`` (the same bytes) with this thread's encoder."""
    out = io.BytesIO()
    encoder = _encoders.encoder
    encoder.fp = out
    try:
        encoder.encode(value)
    except BaseException:
        _encoders.encoder = cbor2.CBOREncoder(io.BytesIO())  # nothing kept from a failure
        raise
    return out.getvalue()


# A whole list is cached too when it has at least this many records: a task's digest
# list goes out unchanged in every CandidateParents of the task, and checking it item by
# item for identity (C speed) is ~3x cheaper than looking each record up.  Shorter lists
# (a peer's few parents) vary too much to be worth it.  Bounded by the bytes it holds.
_WHOLE_LIST_MIN = 8
_WHOLE_LIST_BYTES = 16 << 20


def _record_list_encoder(record_cls: type) -> Callable[[Any], bytes]:
    dumps = _dumps
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
        return lambda o: _dumps(plain_enc(o))
    env: dict[str, Any] = {"_dumps": _dumps, "_join": b"".join}
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
