"""The CBOR codec: round trips for every message, hostile bytes, and the named failure cases."""

import dataclasses
import os
import types
import typing
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dragonfly.wire import schema
from dragonfly.wire.codec import (
    MAX_FRAME,
    MESSAGE_TYPES,
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    Message,
    ProtocolError,
    decode,
    encode,
)
from dragonfly.wire.messages import (
    CandidateParents,
    Error,
    Hello,
    HostInfo,
    ParentInfo,
    PieceDigest,
    PieceReport,
    PiecesFinished,
    Ping,
    RegisterPeer,
    TaskSpec,
    check_version,
)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DIGEST = bytes(range(32))

# ---------------------------------------------------------------------------
# Strategies derived from the dataclass schema (type hints + wire limits)
# ---------------------------------------------------------------------------


def _strategy(tp: Any, meta: dict[str, Any]) -> st.SearchStrategy[Any]:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return st.none() | _strategy(inner, meta)
    if origin is list:
        (item,) = typing.get_args(tp)
        item_meta = {k: v for k, v in meta.items() if k != "max_items"}
        return st.lists(_strategy(item, item_meta), max_size=min(meta.get("max_items", 10), 4))
    if origin is dict:
        text = st.text(max_size=min(meta.get("max_len", 8192), 12))
        return st.dictionaries(text, text, max_size=4)
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(
            meta.get("min", schema.DEFAULT_INT_MIN), meta.get("max", schema.DEFAULT_INT_MAX)
        )
    if tp is float:
        return st.floats(meta.get("min"), meta.get("max"), allow_nan=False, allow_infinity=False)
    if tp is str:
        if "choices" in meta:
            return st.sampled_from(sorted(meta["choices"]))
        return st.text(min_size=meta.get("min_len", 0), max_size=min(meta.get("max_len", 8192), 24))
    if tp is bytes:
        if "len" in meta:
            return st.binary(min_size=meta["len"], max_size=meta["len"])
        return st.binary(max_size=min(meta.get("max_len", 8192), 48))
    if dataclasses.is_dataclass(tp):
        return _record(tp)
    raise TypeError(f"no strategy for {tp!r}")


def _record(cls: type) -> st.SearchStrategy[Any]:
    hints = typing.get_type_hints(cls)
    return st.builds(
        cls, **{f.name: _strategy(hints[f.name], dict(f.metadata)) for f in dataclasses.fields(cls)}
    )


ALL_TYPES = sorted(MESSAGE_TYPES.values(), key=lambda c: c.TAG)
any_message = st.one_of([_record(cls) for cls in ALL_TYPES])


def test_every_message_is_documented_and_tagged() -> None:
    assert len(ALL_TYPES) >= 20
    for cls in ALL_TYPES:
        assert cls.__doc__ and dataclasses.is_dataclass(cls), cls
        assert MESSAGE_TYPES[cls.TAG] is cls


@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda c: c.TAG)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_round_trip(cls: type[Message], data: st.DataObject) -> None:
    msg = data.draw(_record(cls))
    frame = encode(msg)
    assert decode(frame) == msg
    assert cbor2.loads(frame)["t"] == cls.TAG


# ---------------------------------------------------------------------------
# Hostile input: only ProtocolError, ever
# ---------------------------------------------------------------------------


def _decode_or_protocol_error(frame: bytes) -> None:
    try:
        msg = decode(frame)
    except ProtocolError as e:
        assert str(e)
        assert not e.fatal  # only oversize frames are fatal
    else:
        assert isinstance(msg, Message)


@SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_protocol_error(frame: bytes) -> None:
    _decode_or_protocol_error(frame)


EDITS = st.integers(1, 4)
INSERTS = st.binary(min_size=1, max_size=4)


def mutate(
    original: bytes,
    data: st.DataObject,
    edits: st.SearchStrategy[int] = EDITS,
    inserts: st.SearchStrategy[bytes] = INSERTS,
) -> bytes:
    """The frame with a few random edits: bits flipped, bytes set, inserted, deleted, cut."""
    frame = bytearray(original)
    for _ in range(data.draw(edits)):
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate", "set"]))
        i = data.draw(st.integers(0, max(len(frame) - 1, 0)))
        if op == "flip" and frame:
            frame[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "set" and frame:
            frame[i] = data.draw(st.integers(0, 255))
        elif op == "insert":
            frame[i:i] = data.draw(inserts)
        elif op == "delete" and frame:
            del frame[i : i + data.draw(st.integers(1, 4))]
        elif op == "truncate":
            del frame[i:]
    return bytes(frame)


@SETTINGS
@given(msg=any_message, data=st.data())
def test_mutated_frames_raise_only_protocol_error(msg: Message, data: st.DataObject) -> None:
    _decode_or_protocol_error(mutate(encode(msg), data))


cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=10)
    | st.binary(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=6)
    ),
    max_leaves=20,
)


@SETTINGS
@given(
    tag=st.sampled_from(sorted(MESSAGE_TYPES)),
    fields=st.dictionaries(
        st.sampled_from(["peer_id", "task_id", "pieces", "digests", "host", "version", "number"])
        | st.text(max_size=6),
        cbor_values,
        max_size=8,
    ),
)
def test_wrong_shaped_fields_raise_only_protocol_error(tag: str, fields: dict[str, Any]) -> None:
    fields["t"] = tag
    _decode_or_protocol_error(cbor2.dumps(fields))


# ---------------------------------------------------------------------------
# Named failure cases
# ---------------------------------------------------------------------------


def _err(frame: bytes, **kw: Any) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode(frame, **kw)
    return info.value


def _text(s: str) -> bytes:
    raw = s.encode()
    assert len(raw) < 24
    return bytes([0x60 + len(raw)]) + raw


def _ping_map(*entries: bytes, count: int | None = None) -> bytes:
    """A hand-built map whose entries are raw key+value byte strings."""
    n = len(entries) if count is None else count
    return bytes([0xA0 + n]) + b"".join(entries)


T_PING = _text("t") + _text("ping")


def test_valid_hand_built_frame() -> None:
    assert decode(_ping_map(T_PING, _text("nonce") + b"\x07")) == Ping(7)


def test_trailing_bytes() -> None:
    frame = encode(Ping(1))
    e = _err(frame + b"\x00\x01")
    assert f"({len(frame)} of {len(frame) + 2} consumed)" in str(e)
    assert "trailing bytes" in str(e)


def test_duplicate_keys() -> None:
    e = _err(_ping_map(T_PING, _text("nonce") + b"\x01", _text("nonce") + b"\x02"))
    assert "duplicate map key 'nonce'" in str(e)
    # the same key with a non-minimal length head is still the same key
    e = _err(_ping_map(T_PING, _text("nonce") + b"\x01", b"\x78\x05nonce\x02"))
    assert "duplicate map key" in str(e)
    # duplicates in a nested map (headers) too
    headers = b"\xa2" + _text("a") + _text("1") + _text("a") + _text("2")
    frame = _ping_map(
        _text("t") + _text("trigger_download"),
        _text("task_id") + _text("x"),
        _text("url") + _text("http://o/f"),
        _text("headers") + headers,
    )
    assert "duplicate map key 'a'" in str(_err(frame))


@pytest.mark.parametrize(
    "frame",
    [
        b"\xbf" + T_PING + _text("nonce") + b"\x01\xff",  # indefinite map
        _ping_map(T_PING, _text("nonce") + b"\x9f\x01\xff"),  # indefinite array
        _ping_map(T_PING, _text("nonce") + b"\x7f\x61a\xff"),  # indefinite text
        _ping_map(T_PING, _text("nonce") + b"\x5f\x41a\xff"),  # indefinite bytes
        _ping_map(T_PING, b"\x7f\x61a\xff" + b"\x01"),  # indefinite key
    ],
    ids=["map", "array", "text", "bytes", "key"],
)
def test_indefinite_length(frame: bytes) -> None:
    assert "indefinite-length item not allowed" in str(_err(frame))


@pytest.mark.parametrize(
    "value, words",
    [
        (b"\xc1\x01", "tags not allowed"),  # epoch datetime
        (b"\xc2\x41\x01", "tags not allowed"),  # bignum
        (b"\xd9\xd9\xf7\x01", "tags not allowed"),  # self-described CBOR
        (b"\xf7", "simple value 23"),  # undefined
        (b"\xe0", "simple value 0"),
        (b"\xf8\x20", "simple value"),
        (b"\x1c", "reserved"),
    ],
)
def test_forbidden_items(value: bytes, words: str) -> None:
    assert words in str(_err(_ping_map(T_PING, _text("nonce") + value)))


def test_floats_null_bools_pass_the_prescan_and_fail_validation() -> None:
    for value in (b"\xf9\x3c\x00", b"\xfa\x3f\x80\x00\x00", b"\xfb" + bytes(8), b"\xf5", b"\xf6"):
        e = _err(_ping_map(T_PING, _text("nonce") + value))
        assert str(e).startswith("Ping.nonce: expected int in [0, 2**64-1], got ")
        assert e.ref == "ping"


def test_deep_nesting() -> None:
    deep = b"\x81" * 20 + b"\x01"
    assert "nesting deeper than 8" in str(_err(_ping_map(T_PING, _text("nonce") + deep)))
    # depth 8 itself is structurally fine (the schema then rejects it)
    ok = b"\x81" * 7 + b"\x01"
    assert "expected int" in str(_err(_ping_map(T_PING, _text("nonce") + ok)))


def test_declared_lengths_beyond_the_frame() -> None:
    assert "exceeds the" in str(_err(_ping_map(T_PING, _text("nonce") + b"\x7a\xff\xff\xff\xff")))
    assert "exceeds the" in str(_err(_ping_map(T_PING, _text("nonce") + b"\x9b" + b"\xff" * 8)))
    assert "exceeds the" in str(_err(b"\xbb" + b"\x7f" + b"\xff" * 7))
    assert "truncated" in str(_err(b""))
    assert "truncated" in str(_err(encode(Ping(2**40))[:-1]))


def test_non_text_keys_and_bad_utf8() -> None:
    assert "map key must be a text string" in str(_err(_ping_map(T_PING, b"\x01\x01")))
    e = _err(_ping_map(_text("t") + b"\x62\xff\xfe"))
    assert "invalid CBOR" in str(e)


def test_top_level_shapes() -> None:
    assert "top level" in str(_err(cbor2.dumps([1, 2])))
    assert "message type key" in str(_err(cbor2.dumps({"nonce": 1})))
    assert "message type key" in str(_err(cbor2.dumps({"t": 5})))
    assert "binary frame" in str(_err("text frame"))  # type: ignore[arg-type]
    assert decode(bytearray(encode(Ping(3)))) == Ping(3)
    assert decode(memoryview(encode(Ping(3)))) == Ping(3)


def test_oversize_frame_is_fatal() -> None:
    e = _err(b"\x00" * (MAX_FRAME + 1))
    assert e.fatal
    assert str(e) == f"frame of {MAX_FRAME + 1} bytes exceeds the {MAX_FRAME}-byte limit"
    frame = encode(Ping(1))
    assert _err(frame, max_frame=len(frame) - 1).fatal
    assert decode(frame, max_frame=len(frame)) == Ping(1)


def test_unknown_type() -> None:
    e = _err(cbor2.dumps({"t": "foo", "x": 1}))
    assert str(e) == "unknown message type 'foo'"
    assert e.ref is None and not e.fatal


def test_missing_required_field() -> None:
    e = _err(cbor2.dumps({"t": "leave_peer", "peer_id": "p"}))
    assert str(e) == "LeavePeer.task_id: missing required field"
    assert e.ref == "leave_peer"


def test_bool_is_not_an_int() -> None:
    e = _err(cbor2.dumps({"t": "ping", "nonce": True}))
    assert str(e) == "Ping.nonce: expected int in [0, 2**64-1], got bool"


def test_out_of_range_int() -> None:
    frame = cbor2.dumps(
        {"t": "announce_done", "task_id": "x", "piece_count": 2**31 + 1, "content_length": 0}
    )
    expected = "AnnounceDone.piece_count: expected int in [0, 2**31], got 2147483649"
    assert str(_err(frame)) == expected
    port = {"host_id": "h", "hostname": "n", "ip": "1.2.3.4", "upload_port": 0}
    frame = cbor2.dumps(
        {"t": "hello", "version": 1, "min_version": 1, "role": "peer", "host": port}
    )
    assert str(_err(frame)) == "Hello.host.upload_port: expected int in [1, 65535], got 0"


def _pieces_frame(pieces: list[list[Any]]) -> bytes:
    return cbor2.dumps({"t": "pieces_finished", "peer_id": "p", "task_id": "t", "pieces": pieces})


def test_wrong_digest_length_names_the_piece() -> None:
    good = [0, 0, 4, DIGEST, "", 1]
    e = _err(_pieces_frame([good] * 3 + [[3, 12, 4, DIGEST[:31], "", 1]]))
    assert str(e) == "PiecesFinished.pieces[3].digest: expected 32 bytes, got 31"
    e = _err(_pieces_frame([[0, 0, 4, DIGEST.hex(), "", 1]]))
    assert str(e) == "PiecesFinished.pieces[0].digest: expected bytes, got str"
    e = _err(_pieces_frame([[0, 0, "4", DIGEST, "", 1]]))
    assert str(e) == "PiecesFinished.pieces[0].length: expected int in [0, 2**40], got str"
    e = _err(_pieces_frame([[0, 0, 4]]))
    assert "expected at least 5 array items, got 3" in str(e)


def test_unknown_fields_are_ignored() -> None:
    frame = cbor2.dumps({"t": "ping", "nonce": 5, "future_field": {"a": [1, 2.5, None]}})
    assert decode(frame) == Ping(5)
    # compact records: trailing elements from a newer version are ignored too,
    # and trailing optional fields may be left out
    frame = _pieces_frame([[1, 4, 4, DIGEST, "par", 9, "new", 1], [2, 8, 4, DIGEST, ""]])
    msg = decode(frame)
    assert msg == PiecesFinished(
        "p", "t", [PieceReport(1, 4, 4, DIGEST, "par", 9), PieceReport(2, 8, 4, DIGEST, "", 0)]
    )


def test_optional_fields_take_their_defaults() -> None:
    frame = {"t": "register_peer", "peer_id": "p", "task_id": "t", "task": {"url": "u"}}
    msg = decode(cbor2.dumps(frame))
    assert msg == RegisterPeer("p", "t", TaskSpec(url="u"))
    assert msg.headers == {} and msg.task.piece_length is None and not msg.need_back_to_source


def test_error_message_round_trip() -> None:
    err = Error(code="protocol", message="unknown message type 'foo'", ref="")
    assert decode(encode(err)) == err


def test_encode_rejects_unregistered() -> None:
    with pytest.raises(TypeError):
        encode(PieceDigest(0, DIGEST))  # type: ignore[arg-type]


def test_hundred_piece_report() -> None:
    pieces = [
        PieceReport(i, i * (4 << 20), 4 << 20, os.urandom(32), "parent-peer-id", i)
        for i in range(100)
    ]
    msg = PiecesFinished("peer-id", "task-id", pieces)
    frame = encode(msg)
    assert len(frame) < 8000  # compact records
    assert decode(frame) == msg


def test_candidate_parents_round_trip() -> None:
    msg = CandidateParents(
        "p",
        "t",
        parents=[ParentInfo("pp", "hh", "10.0.0.1", 4000, seed=True)],
        content_length=10,
        piece_length=4 << 20,
        piece_count=1,
        digests=[PieceDigest(0, DIGEST)],
    )
    assert decode(encode(msg)) == msg


# ---------------------------------------------------------------------------
# Version negotiation
# ---------------------------------------------------------------------------


def _hello(lo: int, hi: int) -> Hello:
    return Hello(version=hi, min_version=lo, role="peer", host=HostInfo("h", "n", "1.2.3.4", 80))


def test_version_overlap_negotiates_the_lower_maximum() -> None:
    assert check_version(_hello(3, 3)) == 3  # a host of protocol 3: no jobs, no records
    assert check_version(_hello(1, PROTOCOL_VERSION + 1)) == PROTOCOL_VERSION
    assert check_version(_hello(2, 5), local_min=1, local_max=3) == 3
    assert check_version(_hello(1, 2), local_min=1, local_max=3) == 2


def test_version_without_overlap_names_both_ranges() -> None:
    with pytest.raises(ProtocolError) as info:
        check_version(_hello(PROTOCOL_VERSION + 1, PROTOCOL_VERSION + 2))
    assert str(info.value) == (
        f"peer speaks protocol {PROTOCOL_VERSION + 1}..{PROTOCOL_VERSION + 2}, "
        f"this side {MIN_PROTOCOL_VERSION}..{PROTOCOL_VERSION}"
    )
    assert info.value.ref == "hello"
    with pytest.raises(ProtocolError, match=r"peer speaks protocol 1\.\.1, this side 2\.\.4"):
        check_version(_hello(1, 1), local_min=2, local_max=4)
    with pytest.raises(ProtocolError, match="empty version range"):
        check_version(_hello(4, 2))
