"""The download machine's back-to-source, range-client and lingering rules."""

from __future__ import annotations

import pytest

from dragonfly.engine.actions import (
    Announce,
    Complete,
    Failed,
    Fetch,
    FetchOrigin,
    MachineConfig,
    OpenTask,
    ProbeOrigin,
    RangesDone,
    StreamOrigin,
    Unsubscribe,
)
from dragonfly.engine.machine import Phase
from dragonfly.engine.source import OriginPace
from dragonfly.wire.messages import (
    LeavePeer,
    NeedBackToSource,
    PieceDigest,
    PiecesFinished,
    RegisterPeer,
    TaskMetadata,
)
from tests.unit.machine_support import (
    PL,
    TASK,
    digest,
    machine,
    of,
    opened,
    sent,
)

# ---------------------------------------------------------------------------- back to source


def test_back_to_source_fetches_the_missing_pieces_in_order() -> None:
    m = machine(config=MachineConfig(origin_concurrency=2))
    opened(m, 5, ["a"], known=2)
    m.parent_announced("a", [0], 0.0)
    out = m.scheduler_message(
        NeedBackToSource(
            peer_id="me",
            task_id=TASK,
            content_length=5 * PL,
            piece_length=PL,
            digests=[PieceDigest(0, digest(0))],
            etag='"v1"',
        ),
        1.0,
    )
    assert Unsubscribe("a") in out
    assert of(out, ProbeOrigin) == [ProbeOrigin('"v1"', "")]
    assert m.phase is Phase.SOURCE
    out = m.origin_probed(5 * PL, True, '"v1"', "", "", 1.1)
    (meta,) = sent(out, TaskMetadata)
    assert (meta.content_length, meta.piece_length, meta.piece_count) == (5 * PL, PL, 5)
    # The origin's rate is not known yet: the first piece alone, by both requests.
    assert of(out, FetchOrigin) == [FetchOrigin(0, 2)]
    # 0.1 s a piece: a fast origin; pieces side by side, one request each.
    out = m.origin_piece_landed(0, digest(0), PL, 1.2)
    assert of(out, FetchOrigin) == [FetchOrigin(1), FetchOrigin(2)]
    for n in (1, 2, 3, 4):
        out = m.origin_piece_landed(n, digest(n), PL, 1.3)
    assert of(out, Complete)
    reports = [r for msg in sent(m.completed(2.0), PiecesFinished) for r in msg.pieces]
    assert all(r.parent_id == "" for r in reports)


def test_a_slow_origin_sends_one_piece_at_a_time_in_slices() -> None:
    """A piece that takes a second at the origin's rate comes alone over all four
    requests, so that each lands as soon as it can (engine/source.py: origin_split)."""
    m = machine(config=MachineConfig(origin_concurrency=4))
    opened(m, 3, ["a"])
    m.scheduler_message(NeedBackToSource(peer_id="me", task_id=TASK), 1.0)
    out = m.origin_probed(3 * PL, True, "", "", "", 1.0)
    assert of(out, FetchOrigin) == [FetchOrigin(0, 4)]
    out = m.origin_piece_landed(0, digest(0), PL, 2.0)
    assert of(out, FetchOrigin) == [FetchOrigin(1, 4)]
    out = m.origin_piece_landed(1, digest(1), PL, 3.0)
    assert of(out, FetchOrigin) == [FetchOrigin(2, 4)]


def test_the_origin_pace_switches_with_hysteresis() -> None:
    """Fast under a quarter second a piece, slow again only over half a second; a piece's
    time is its own time x its share of the requests in flight when it was claimed."""
    pace = OriginPace()
    assert not pace.fast and pace.piece_seconds is None  # not measured: slices
    pace.claim(0, 4, 0.0)
    pace.claimed_all()
    pace.landed(0, 0.1)
    assert pace.fast and pace.piece_seconds == pytest.approx(0.1)
    for n in (1, 2, 3, 4):  # side by side, one request each: a quarter of the link each
        pace.claim(n, 1, 0.1)
    pace.claimed_all()
    assert pace.requests == 4
    pace.landed(1, 1.7)  # 1.6 s at a quarter share: 0.4 s a piece; smoothed 0.25
    assert pace.fast and pace.piece_seconds == pytest.approx(0.25)
    pace.landed(2, 4.1)  # 1.0 s a piece; smoothed 0.625: over the 0.5 s edge
    assert not pace.fast and pace.requests == 2
    assert 3 in pace and 1 not in pace


def test_an_origin_piece_other_than_the_known_digest_fails_409() -> None:
    m = machine()
    opened(m, 2, ["a"])
    m.scheduler_message(NeedBackToSource(peer_id="me", task_id=TASK), 1.0)
    m.origin_probed(2 * PL, True, "", "", "", 1.1)
    (failed,) = of(m.origin_piece_landed(0, b"\0" * 32, PL, 1.2), Failed)
    assert failed.http_status == 409


def test_no_scheduler_goes_to_the_origin_or_fails_when_not_allowed() -> None:
    m = machine()
    assert of(m.no_scheduler(0.0), ProbeOrigin)
    out = m.origin_probed(3, False, "", "", "", 0.1)  # tiny, no ranges
    assert of(out, OpenTask) == [OpenTask(3, 4 << 20, "", "", "")]
    assert of(m.task_opened({}, 0.2), StreamOrigin)
    off = machine(back_to_source=False)
    (failed,) = of(off.no_scheduler(0.0), Failed)
    assert "back-to-source is off" in failed.reason


def test_a_seed_registers_asking_for_the_origin_and_staggers_its_announcements() -> None:
    m = machine(seed_trigger=True, config=MachineConfig(reveal_after=2.0, origin_concurrency=1))
    (reg,) = sent(m.connected(0.0), RegisterPeer)
    assert reg.need_back_to_source
    m.scheduler_message(NeedBackToSource(peer_id="me", task_id=TASK), 0.1)
    m.origin_probed(2 * PL, True, "", "", "", 0.2)
    m.task_opened({}, 0.3)
    assert m.child_subscribed("c1", 0.3) == [] and m.child_subscribed("c2", 0.3) == []
    out = m.origin_piece_landed(0, digest(0), PL, 1.0)
    assert of(out, Announce) == [Announce("c1", [0])]  # one child first
    assert m.held_back(0)
    assert m.piece_uploaded(0, 1.5) == []
    assert of(m.tick(3.5), Announce) == [Announce("c2", [0])]  # the rest, later


# ---------------------------------------------------------------------------- clients


def test_a_range_only_download_fetches_its_pieces_and_stays_partial() -> None:
    m = machine(whole=False)
    m.client_attached()
    out = opened(m, 10, ["a"]) + m.want_range(PL * 3 + 5, PL * 4 + 1, 0.1)
    out += m.parent_announced("a", range(10), 0.2)
    fetches = of(out, Fetch)
    assert sorted(f.number for f in fetches) == [3, 4]
    for f in fetches:
        out = m.piece_landed(f.fetch_id, f.number, "a", PL, 1.0)
    assert not of(out, RangesDone)  # a client is still attached
    out = m.client_detached(1.5)
    assert sent(out, LeavePeer) and of(out, RangesDone) and m.done and not m.finished


def test_want_all_widens_a_range_only_download() -> None:
    m = machine(whole=False)
    m.client_attached()
    opened(m, 3, ["a"])
    m.want_range(0, 10, 0.0)
    m.want_all(0.0)
    out = m.parent_announced("a", range(3), 0.1)
    assert len(of(out, Fetch)) == 3  # all three are wanted now (a sole parent takes them)


def test_the_picker_follows_the_streaming_client() -> None:
    m = machine(config=MachineConfig(concurrent_pieces=1, per_parent_limit=1))
    opened(m, 40, ["a"])
    m.streaming_from(17)
    (f,) = of(m.parent_announced("a", range(40), 0.0), Fetch)
    assert f.number == 17


# ---------------------------------------------------------------------------- lingering


def test_an_ended_seed_lingers_while_pieces_are_held_back() -> None:
    m = machine(seed_trigger=True, config=MachineConfig(reveal_after=5.0, linger_limit=60.0))
    m.connected(0.0)
    m.scheduler_message(NeedBackToSource(peer_id="me", task_id=TASK), 0.0)
    m.origin_probed(PL, True, "", "", "", 0.0)
    m.task_opened({}, 0.0)
    m.child_subscribed("c1", 0.0)
    m.child_subscribed("c2", 0.0)
    m.origin_piece_landed(0, digest(0), PL, 1.0)
    m.completed(1.1)
    assert m.lingering(2.0)
    assert of(m.reveal_all(), Announce) == [Announce("c2", [0])]
    assert not m.lingering(2.0)
