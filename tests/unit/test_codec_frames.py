"""The frame encoder: lists of @reused records written from a cache of their bytes."""

from __future__ import annotations

import hashlib
import threading

import cbor2
import pytest

from dragonfly.wire import schema
from dragonfly.wire.codec import decode, encode
from dragonfly.wire.messages import (
    CandidateParents,
    NeedBackToSource,
    ParentInfo,
    PieceDigest,
    PieceDigests,
    PieceReport,
    PiecesFinished,
)
from dragonfly.wire.schema import _SPECS


def _digests(n: int) -> list[PieceDigest]:
    return [PieceDigest(i, hashlib.sha256(str(i).encode()).digest()) for i in range(n)]


def _parents(n: int) -> list[ParentInfo]:
    return [
        ParentInfo(peer_id=f"p{i}", host_id=f"h{i}", ip="10.0.0.1", upload_port=1000 + i)
        for i in range(n)
    ]


def _plain(msg: object) -> bytes:
    """What the codec wrote before the cache: one cbor2 call over the whole map."""
    return cbor2.dumps(_SPECS[type(msg)].encode(msg))


@pytest.mark.parametrize("digests", [0, 1, 23, 24, 255, 256, 8000])
def test_cached_lists_encode_the_same_map(digests: int) -> None:
    msg = CandidateParents(
        peer_id="child",
        task_id="t" * 64,
        parents=_parents(3),
        content_length=10,
        piece_length=4,
        piece_count=3,
        digests=_digests(digests),
        etag='"e"',
    )
    for _ in range(2):  # a miss, then a hit
        frame = encode(msg)
        assert cbor2.loads(frame) == cbor2.loads(_plain(msg))
        assert decode(frame) == msg
        assert len(frame) == len(_plain(msg))


def test_equal_records_that_are_other_objects() -> None:
    a, b = _digests(5), _digests(5)
    ma = PieceDigests(peer_id="x", task_id="t", digests=a)
    mb = PieceDigests(peer_id="x", task_id="t", digests=b)
    assert encode(ma) == encode(mb)
    changed = [*a[:4], PieceDigest(4, b"\0" * 32)]
    assert decode(encode(PieceDigests(peer_id="x", task_id="t", digests=changed))).digests == (
        changed
    )


def test_only_reused_records_are_cached() -> None:
    report = PieceReport(0, 0, 4, b"\1" * 32, "", 0)
    encode(PiecesFinished(peer_id="x", task_id="t", pieces=[report]))
    assert PieceReport not in schema._record_caches
    digest = PieceDigest(7, b"\2" * 32)
    encode(NeedBackToSource(peer_id="x", task_id="t", digests=[digest]))
    assert schema._record_caches[PieceDigest].raw[id(digest)] == cbor2.dumps([7, b"\2" * 32])


def test_the_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(schema, "_RECORD_CACHE_LIMIT", 10)
    monkeypatch.setitem(schema._record_caches, PieceDigest, schema._RecordCache())
    for _ in range(5):
        msg = PieceDigests(peer_id="x", task_id="t", digests=_digests(7))
        assert decode(encode(msg)) == msg
        cache = schema._record_caches[PieceDigest]
        assert len(cache.keep) <= 10
        assert len(cache.raw) == len(cache.keep)


def test_a_cached_list_is_matched_item_by_item() -> None:
    """Same first record and length, another record inside: not the cached list."""
    digests = _digests(30)
    first = PieceDigests(peer_id="x", task_id="t", digests=digests)
    assert decode(encode(first)) == first
    assert decode(encode(first)) == first  # the whole-list hit
    other = [*digests[:10], PieceDigest(10, b"\3" * 32), *digests[11:]]
    changed = PieceDigests(peer_id="x", task_id="t", digests=other)
    assert decode(encode(changed)) == changed
    assert (
        decode(encode(PieceDigests(peer_id="x", task_id="t", digests=digests[:29]))).digests
        == (digests[:29])
    )
    assert decode(encode(first)) == first


def test_the_reused_encoder_writes_what_cbor2_dumps_writes() -> None:
    values = [{"t": "x", "n": [1, -2, 2**40], "b": b"\x00" * 40, "s": "é" * 30}, [], {}, None]
    for value in values:
        assert schema._dumps(value) == cbor2.dumps(value)
    # a value that does not encode leaves nothing behind (a cycle-detection entry, say)
    cyclic: list[object] = [1]
    cyclic.append(cyclic)
    for bad in (object(), cyclic):
        with pytest.raises(cbor2.CBOREncodeError):
            schema._dumps(bad)
        for value in values:
            assert schema._dumps(value) == cbor2.dumps(value)


def test_each_thread_encodes_with_its_own_encoder() -> None:
    seen: list[object] = []

    def in_thread() -> None:
        assert schema._dumps([1, "a"]) == cbor2.dumps([1, "a"])
        seen.append(schema._encoders.encoder)

    worker = threading.Thread(target=in_thread)
    worker.start()
    worker.join(timeout=10)
    assert len(seen) == 1
    assert seen[0] is not schema._encoders.encoder
