"""The codec's fast paths give the general paths' results: the pre-scan's (arrays of
scalars and short strings skipped in one loop) accepts exactly what the general path
accepts and refuses with the same error; a list of compact records validated in one loop
gives what validating each record gives, or the same error."""

import dataclasses
from typing import Any
from unittest import mock

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dragonfly.wire import prescan
from dragonfly.wire.codec import decode, encode
from dragonfly.wire.errors import ProtocolError
from dragonfly.wire.messages import PieceDigest, PieceReport, PiecesFinished
from dragonfly.wire.schema import _SPECS, _mutable_twin
from dragonfly.wire.validators import _Invalid
from tests.unit.test_codec import mutate

SETTINGS = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Values whose arrays the fast path takes: scalars, short strings, flat arrays of them.
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64 - 1)
    | st.floats()
    | st.text(max_size=30)
    | st.binary(max_size=40)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=30) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=60,
)
# Raw items that either path must refuse or treat specially, spliced in at random.
ODD_ITEMS = [
    *(b"\xc1\x01", b"\xf7", b"\xe0", b"\x1c", b"\x9f\x01\xff", b"\x5f\xff", b"\x80", b"\xa0"),
    *(b"\x78\xff", b"\x58\x40", b"\x99\x00\x05", b"\x9b" + b"\xff" * 8, b"\x81" * 10 + b"\x01"),
]
odd_items = st.sampled_from(ODD_ITEMS)


def _outcome(frame: bytes) -> str:
    try:
        prescan._prescan(frame)
    except ProtocolError as e:
        return f"{e} fatal={e.fatal}"
    return "ok"


def _general_outcome(frame: bytes) -> str:
    with mock.patch.object(prescan, "_skip_flat", lambda *args: -1):
        return _outcome(frame)


@SETTINGS
@given(value=values, data=st.data())
def test_fast_path_agrees_with_the_general_path(value: object, data: st.DataObject) -> None:
    frame = mutate(
        cbor2.dumps(value), data, st.integers(0, 3), st.binary(min_size=1, max_size=3) | odd_items
    )
    assert _outcome(frame) == _general_outcome(frame)


def test_fast_path_is_taken_for_compact_records() -> None:
    record = [7, 7 << 22, 4 << 20, bytes(32), "parent-" * 3, 40]
    frame = cbor2.dumps({"t": "pieces_finished", "pieces": [record] * 16})
    with mock.patch.object(prescan, "_skip_flat", wraps=prescan._skip_flat) as skip:
        prescan._prescan(frame)
    # one call for the array of records, one for each record inside it, and no more
    assert [call.args[2] for call in skip.call_args_list] == [16] + [6] * 16


def test_depth_limit_is_kept_on_the_fast_path() -> None:
    # 8 levels of arrays, the last of scalars: allowed; one more is not, even flat
    assert _outcome(b"\x81" * 7 + b"\x82\x01\x02") == "ok"
    assert _outcome(b"\x81" * 8 + b"\x82\x01\x02").startswith("nesting deeper than 8")
    assert _outcome(b"\x81" * 7 + b"\x81\x80").startswith("nesting deeper than 8")
    for frame in (
        b"\x81" * 7 + b"\x82\x01\x02",
        b"\x81" * 7 + b"\x81\x80",
        b"\x81" * 6 + b"\x81\x80",
    ):
        assert _outcome(frame) == _general_outcome(frame)


def _validated(validate: Any, xs: list[Any]) -> Any:
    try:
        return validate(xs)
    except _Invalid as e:
        return ("invalid", e.detail, e.path)


# Records as a peer sends them, or with one field (or the length) off.
record_fields = st.integers(-1, 2**33) | st.binary(min_size=31, max_size=33) | st.text(max_size=3)


@st.composite
def near_records(draw: st.DrawFn) -> list[Any]:
    n = draw(st.integers(0, 9))
    record = [n, n << 22, 4 << 20, draw(st.binary(min_size=32, max_size=32)), "p" * n, 40]
    if draw(st.booleans()):
        record[draw(st.integers(0, 5))] = draw(record_fields | st.none())
    return record[: draw(st.sampled_from([6, 6, 2, 5, 7]))]


records = st.lists(
    near_records() | st.lists(record_fields | st.none(), max_size=7) | scalars, max_size=12
)


@pytest.mark.parametrize("cls", [PieceReport, PieceDigest])
@SETTINGS
@given(xs=records)
def test_many_records_validate_as_each_one(cls: type, xs: list[Any]) -> None:
    spec = _SPECS[cls]
    assert spec.many is not None
    one_by_one = _validated(lambda items: [spec.validate(x) for x in items], xs)
    assert _validated(spec.many, xs) == one_by_one


def test_decoded_records_are_the_frozen_classes_themselves() -> None:
    reports = [
        PieceReport(n, n << 22, 4 << 20, bytes([n]) * 32, f"parent-{n}", 40) for n in range(3)
    ]
    msg = decode(encode(PiecesFinished(peer_id="p", task_id="t", pieces=reports)))
    assert type(msg) is PiecesFinished
    assert msg == PiecesFinished(peer_id="p", task_id="t", pieces=reports)
    for got, sent in zip(msg.pieces, reports, strict=True):
        assert type(got) is PieceReport
        assert got == sent and hash(got) == hash(sent)
        with pytest.raises(dataclasses.FrozenInstanceError):
            got.number = 9  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        msg.peer_id = "q"  # type: ignore[misc]


def test_a_class_of_another_layout_gets_no_twin() -> None:
    @dataclasses.dataclass(frozen=True)
    class WithDict:
        a: int

    @dataclasses.dataclass(frozen=True, slots=True)
    class Slotted:
        a: int

    assert _mutable_twin(WithDict) is None
    twin = _mutable_twin(Slotted)
    assert twin is not None
    draft = object.__new__(twin)
    draft.a = 1
    draft.__class__ = Slotted
    assert draft == Slotted(1)
