"""The piece picker: each rule on a concrete case, completion, and a small deterministic
swarm (its invariants under random event orders: test_picker_model.py)."""

from __future__ import annotations

from collections import Counter

import pytest

from dragonfly.engine.picker import PiecePicker
from tests.unit.picker_support import make

# -- ordering ---------------------------------------------------------------------------------


def test_window_comes_first_and_in_order() -> None:
    picker = make(32, {"a": range(32)}, max_in_flight=6, per_parent_limit=16, window=4)
    picker.set_cursor(10)
    picks = [n for n, _ in picker.pick()]
    assert picks[:4] == [10, 11, 12, 13]
    assert len(picks) == 6
    assert not set(picks[4:]) & set(range(10, 14))


def test_window_skips_held_pieces_and_unknown_digests() -> None:
    picker = PiecePicker(32, have=[11], max_in_flight=3, per_parent_limit=16, window=4)
    picker.digest_known(n for n in range(32) if n != 12)
    picker.add_parent("a")
    picker.parent_has("a", range(32))
    picker.set_cursor(10)
    picks = [n for n, _ in picker.pick()]
    assert picks[:2] == [10, 13]
    assert 11 not in picks and 12 not in picks


def test_without_a_streaming_client_there_is_no_window() -> None:
    picker = make(256, {"a": range(256)}, max_in_flight=8, per_parent_limit=8)
    assert [n for n, _ in picker.pick()] != list(range(8))


def test_rarest_first() -> None:
    picker = make(10, {"a": range(10), "b": range(5)}, max_in_flight=5, per_parent_limit=10)
    first = [n for n, _ in picker.pick()]
    assert sorted(first) == [5, 6, 7, 8, 9]  # held by one parent only
    assert all(ps == {"a"} for ps in picker.in_flight.values())
    for number in first:
        picker.on_success(number, "a", 1, 1.0)
    assert sorted(n for n, _ in picker.pick()) == [0, 1, 2, 3, 4]


def test_rarest_tie_break_is_seeded() -> None:
    def order(seed: int) -> list[int]:
        return [n for n, _ in make(64, {"a": range(64)}, per_parent_limit=8, seed=seed).pick()]

    assert order(1) == order(1)
    assert order(1) != order(2)


# -- parent choice ----------------------------------------------------------------------------


def test_parent_with_most_free_capacity() -> None:
    picker = make(8, max_in_flight=1)
    picker.add_parent("small", capacity=2)
    picker.add_parent("big", capacity=4)
    for pid in ("small", "big"):
        picker.parent_has(pid, range(8))
    assert picker.pick()[0][1] == "big"
    picker = make(8, max_in_flight=4)
    picker.add_parent("a", capacity=4)
    picker.add_parent("b", capacity=4)
    picker.parent_has("a", range(8))
    picker.parent_has("b", range(8))
    # four requests over two equal parents: two each, never three on one
    assert Counter(pid for _, pid in picker.pick()) == {"a": 2, "b": 2}


def test_throughput_breaks_ties() -> None:
    picker = make(16, {"a": range(16), "b": range(16)}, max_in_flight=2)
    first = picker.pick()
    assert {pid for _, pid in first} == {"a", "b"}
    for number, pid in first:
        picker.on_success(number, pid, 1_000_000 if pid == "b" else 1_000, 1.0)
    assert picker.pick()[0][1] == "b"


def test_capacity_and_total_limits() -> None:
    picker = make(16, max_in_flight=10)
    picker.add_parent("a", capacity=2)
    picker.add_parent("b", capacity=1)
    picker.add_parent("none", capacity=0)
    for pid in ("a", "b", "none"):
        picker.parent_has(pid, range(16))
    assert Counter(pid for _, pid in picker.pick()) == {"a": 2, "b": 1}
    assert picker.pick() == []

    picker = make(16, {"a": range(16), "b": range(16)}, max_in_flight=3)
    assert len(picker.pick()) == 3
    assert picker.pick() == []
    number, pid = next((n, p) for n, ps in picker.in_flight.items() for p in ps)
    picker.on_success(number, pid, 1, 1.0)
    assert len(picker.pick()) == 1


# -- gating, failures -------------------------------------------------------------------------


def test_digest_gating() -> None:
    picker = PiecePicker(4, per_parent_limit=4)
    picker.add_parent("a")
    picker.parent_has("a", range(4))
    assert picker.pick() == []
    assert picker.stalled()
    picker.digest_known([2])
    assert picker.pick() == [(2, "a")]


def test_only_parents_that_have_the_piece() -> None:
    picker = make(4, {"a": [0], "b": [1]})
    assert sorted(picker.pick()) == [(0, "a"), (1, "b")]


def test_failed_parent_is_excluded_for_that_piece() -> None:
    picker = make(1, {"a": [0], "b": [0]}, endgame_duplicates=1)
    [(number, first)] = picker.pick()
    picker.on_failure(number, first)
    assert picker.parent_failures(first) == 1
    [(again, second)] = picker.pick()
    assert again == 0 and second != first
    picker.on_failure(0, second)
    assert picker.pick() == []
    assert picker.stalled()
    picker.parent_has(first, [0])  # announcing again does not lift the exclusion
    assert picker.pick() == []


def test_consecutive_failures_suspend_a_parent_until_a_success() -> None:
    picker = make(16, {"a": range(16)}, per_parent_limit=8, max_in_flight=8)
    requests = picker.pick()
    assert len(requests) == 8
    for number, pid in requests[:3]:
        picker.on_failure(number, pid)
    assert picker.suspended_parents() == ["a"]
    assert picker.parent_failures("a") == 3
    assert picker.pick() == []
    number, pid = requests[3]
    picker.on_success(number, pid, 1, 1.0)
    assert picker.suspended_parents() == []
    assert len(picker.pick()) == 4


def test_suspended_parent_alone_means_stalled() -> None:
    picker = make(8, {"a": range(8)}, per_parent_limit=3)
    for number, pid in picker.pick():
        picker.on_failure(number, pid)
    assert picker.pick() == []
    assert picker.stalled()
    picker.add_parent("b")
    picker.parent_has("b", [7])
    assert not picker.stalled()


# -- endgame ----------------------------------------------------------------------------------


def test_endgame_duplicates_and_cancellation() -> None:
    picker = make(2, {"a": [0, 1], "b": [0, 1], "c": [0, 1]}, endgame_duplicates=2)
    requests = picker.pick()
    assert len(requests) == 4
    assert all(len(parents) == 2 for parents in picker.in_flight.values())
    assert all(len(set(ps)) == 2 for ps in picker.in_flight.values())
    assert picker.pick() == []  # at most two parents per piece

    winner = sorted(picker.in_flight[0])[0]
    loser = sorted(picker.in_flight[0])[1]
    assert picker.on_success(0, winner, 10, 1.0) == [(0, loser)]
    assert 0 not in picker.in_flight
    # the cancelled duplicate's late outcome is harmless
    picker.on_failure(0, loser)
    assert picker.parent_failures(loser) == 0
    assert picker.on_success(0, loser, 10, 1.0) == []
    assert picker.have == {0}
    picker._check_invariants()


def test_a_piece_whose_every_copy_is_overdue_gets_one_more() -> None:
    """Two copies at parents that never answer (a silent crash): a third once the newest
    is overdue too, not before; the picker's clock decides (endgame_after 1 s here)."""
    picker = make(1, {"a": [0], "b": [0], "c": [0]}, endgame_duplicates=2)
    first = picker.pick(0.0)
    assert len(first) == 1
    assert picker.pick(0.5) == []  # the first copy is not overdue yet
    second = picker.pick(1.5)
    assert len(second) == 1 and second[0][1] != first[0][1]
    assert picker.pick(2.0) == []  # two copies; the newest is 0.5 s old
    third = picker.pick(2.6)
    assert len(third) == 1
    assert {p for _, p in first + second + third} == {"a", "b", "c"}
    picker.add_parent("d")
    picker.parent_has("d", [0])
    assert picker.pick(10.0) == []  # one past the cap, no more
    picker._check_invariants()


def test_no_endgame_while_a_piece_still_waits() -> None:
    picker = PiecePicker(3, max_in_flight=8, per_parent_limit=4)
    picker.digest_known([0, 1])  # piece 2 is missing but cannot be requested yet
    for pid in ("a", "b"):
        picker.add_parent(pid)
        picker.parent_has(pid, range(3))
    assert len(picker.pick()) == 2
    assert picker.pick() == []
    picker.digest_known([2])
    assert len(picker.pick()) == 4  # piece 2 once, then one duplicate for each piece


def test_endgame_duplicate_failure_keeps_the_other_request() -> None:
    picker = make(1, {"a": [0], "b": [0]})
    assert len(picker.pick()) == 2
    picker.on_failure(0, "a")
    assert picker.in_flight == {0: {"b"}}
    assert picker.pick() == []  # a is excluded for 0
    assert picker.on_success(0, "b", 1, 1.0) == []
    assert picker.done


# -- parents leaving, stalls ------------------------------------------------------------------


def test_remove_parent_requeues_its_pieces() -> None:
    picker = make(8, {"a": range(8), "b": range(4)}, per_parent_limit=4, max_in_flight=8)
    picker.pick()
    from_a = sorted(n for n, ps in picker.in_flight.items() if "a" in ps)
    assert picker.remove_parent("a") == from_a
    assert picker.parents() == ["b"]
    assert all("a" not in ps for ps in picker.in_flight.values())
    again = picker.pick()
    assert all(pid == "b" and n < 4 for n, pid in again)
    picker._check_invariants()
    assert picker.remove_parent("a") == []


def test_late_success_from_a_removed_parent_still_counts() -> None:
    picker = make(2, {"a": [0, 1]})
    picker.pick()
    picker.remove_parent("a")
    assert picker.on_success(0, "a", 1, 1.0) == []
    assert picker.have == {0}
    picker.on_failure(1, "a")  # ignored: no longer in flight
    picker._check_invariants()


def test_stalled() -> None:
    picker = PiecePicker(4)
    assert picker.stalled()  # no parents
    picker.add_parent("a")
    assert picker.stalled()  # a parent without pieces
    picker.parent_has("a", [1])
    assert picker.stalled()  # digest unknown
    picker.digest_known([1])
    assert not picker.stalled()
    [(number, pid)] = picker.pick()
    assert not picker.stalled()  # something in flight
    picker.on_success(number, pid, 1, 1.0)
    assert picker.stalled()
    for n in (0, 2, 3):
        picker.mark_have(n)
    assert picker.done and not picker.stalled()
    assert PiecePicker(0).done


def test_mark_have_drops_requests() -> None:
    picker = make(2, {"a": [0, 1]})
    picker.pick()
    picker.mark_have(0)
    assert 0 not in picker.in_flight and picker.have == {0}
    picker.on_failure(0, "a")
    assert picker.parent_failures("a") == 0
    picker._check_invariants()


def test_bad_arguments() -> None:
    picker = PiecePicker(4)
    picker.add_parent("a")
    with pytest.raises(ValueError):
        picker.parent_has("a", [4])
    with pytest.raises(ValueError):
        picker.digest_known([-1])
    with pytest.raises(ValueError):
        picker.set_cursor(5)
    with pytest.raises(ValueError):
        PiecePicker(4, have=[9])
    with pytest.raises(ValueError):
        picker.add_parent("b", capacity=-1)
    picker.parent_has("unknown", [1])  # an announcement racing a removal is ignored


# -- swarm ------------------------------------------------------------------------------------


def test_children_of_one_seed_spread_their_first_pieces() -> None:
    firsts = []
    for child in ("peer-1", "peer-2", "peer-3"):
        picker = make(256, {"seed": range(256)}, seed=child)
        firsts.append(picker.pick())
    assert len({tuple(n for n, _ in f) for f in firsts}) == 3
    assert len({f[0][0] for f in firsts}) == 3
    again = [make(256, {"seed": range(256)}, seed=c).pick() for c in ("peer-1", "peer-2", "peer-3")]
    assert again == firsts


def run_swarm(pieces: int, children: int, seed: int) -> list[tuple[str, int, str]]:
    """One seed parent holding everything, children fetching from it and from each other,
    rounds of pick-then-succeed. Returns who fetched which piece from whom, in order."""
    names = [f"child-{i}" for i in range(children)]
    pickers = {name: PiecePicker(pieces, seed=seed * 1000 + i) for i, name in enumerate(names)}
    for name, picker in pickers.items():
        picker.digest_known(range(pieces))
        picker.add_parent("seed", capacity=2)
        picker.parent_has("seed", range(pieces))
        for other in names:
            if other != name:
                picker.add_parent(other)
    trace: list[tuple[str, int, str]] = []
    for _ in range(10 * pieces):
        if all(p.done for p in pickers.values()):
            return trace
        landed: list[tuple[str, int, str]] = []
        for name, picker in pickers.items():
            picker.pick()
            for number, parents in sorted(picker.in_flight.items()):
                landed.append((name, number, min(parents)))
        for name, number, parent in landed:
            if number in pickers[name].have:
                continue
            pickers[name].on_success(number, parent, 1 << 20, 0.1)
            trace.append((name, number, parent))
            for other, picker in pickers.items():
                if other != name:
                    picker.parent_has(name, [number])
    raise AssertionError("swarm did not finish")


def test_small_swarm_finishes_deterministically_and_shares() -> None:
    trace = run_swarm(pieces=32, children=3, seed=7)
    assert trace == run_swarm(pieces=32, children=3, seed=7)
    assert trace != run_swarm(pieces=32, children=3, seed=8)
    from_seed = sum(1 for _, _, parent in trace if parent == "seed")
    assert from_seed < 3 * 32  # children served each other part of the file


def test_busy_parent_rests_without_blame() -> None:
    picker = PiecePicker(2, max_in_flight=2, per_parent_limit=1, busy_backoff=0.5)
    picker.digest_known([0, 1])
    for pid in ("a", "b"):
        picker.add_parent(pid)
    picker.parent_has("a", [0, 1])
    picker.parent_has("b", [0])
    assert sorted(picker.pick(10.0)) == [(0, "b"), (1, "a")]  # rarest (1) first
    picker.on_busy(0, "b", 10.0)
    assert picker.busy_until() == 10.5
    assert picker.parent_failures("b") == 0 and picker.suspended_parents() == []
    assert picker.pick(10.1) == []  # a is full, b rests
    assert not picker.stalled()  # resting is not stalled: no Reschedule for it
    assert picker.pick(10.5) == [(0, "b")]
    picker._check_invariants()


def busy_rests(
    picker: PiecePicker, request: tuple[int, str], now: float, times: int
) -> tuple[list[float], float]:
    """Pick ``request`` and answer it busy ``times`` times, each at the end of the last
    rest: the rests, and when the last one ends."""
    rests = []
    for _ in range(times):
        assert picker.pick(now) == [request]
        picker.on_busy(*request, now)
        until = picker.busy_until()
        assert until is not None
        rests.append(until - now)
        assert picker.pick(now) == []  # resting
        now = until
    return rests, now


def test_busy_rest_doubles_and_resets_on_success() -> None:
    picker = PiecePicker(
        1, max_in_flight=1, per_parent_limit=1, busy_backoff=0.25, busy_backoff_max=1.0
    )
    picker.digest_known([0])
    picker.add_parent("a")
    picker.parent_has("a", [0])
    rests, now = busy_rests(picker, (0, "a"), 0.0, 4)
    assert rests == [0.25, 0.5, 1.0, 1.0]
    assert picker.pick(now) == [(0, "a")]
    picker.on_success(0, "a", 10, 0.1)
    assert picker.done and picker.busy_until() is None


def test_busy_rest_grows_to_a_quarter_of_a_piece_time_for_slow_pieces() -> None:
    """A full parent frees a slot about once per fraction of a piece's time: with 20 s
    pieces, asking it every 0.5 s only earns refusals, so the rest grows past 0.5 s, up
    to four times busy_backoff_max (2 s, not a quarter of 20 s)."""
    picker = PiecePicker(
        2, max_in_flight=1, per_parent_limit=1, busy_backoff=0.25, busy_backoff_max=0.5
    )
    picker.digest_known([0, 1])
    picker.add_parent("a")
    picker.parent_has("a", [0, 1])
    assert picker.pick(0.0) == [(0, "a")]
    picker.on_success(0, "a", 16 << 20, 20.0)  # one piece took 20 s
    rests, _ = busy_rests(picker, (1, "a"), 8.0, 5)
    assert rests == [0.25, 0.5, 1.0, 2.0, 2.0]
    picker._check_invariants()


def test_the_per_parent_limit_follows_the_number_of_parents() -> None:
    """Few parents each take an equal share of max_in_flight, never under
    per_parent_limit and at most twice it: one parent 4, two 4 each, three 3 each,
    four or more 2 each."""
    picker = PiecePicker(40, max_in_flight=8, per_parent_limit=2, seed=1)
    picker.digest_known(range(40))

    def load() -> Counter[str]:
        return Counter(p for parents in picker.in_flight.values() for p in parents)

    def land(pid: str, count: int) -> None:
        done = [n for n, parents in picker.in_flight.items() if pid in parents][:count]
        for n in done:
            picker.on_success(n, pid, 1 << 22, 0.1)

    def add(*pids: str) -> None:
        for pid in pids:
            picker.add_parent(pid)
            picker.parent_has(pid, range(40))

    add("a")
    assert len(picker.pick()) == 4 and load() == {"a": 4}  # the only parent: twice 2
    add("b")
    picker.pick()
    assert load() == {"a": 4, "b": 4}  # two parents: 4 each, all of max_in_flight
    add("c", "d", "e", "f")
    land("b", 4)
    picker.pick()  # six parents: per_parent_limit each; a keeps what it has
    assert load()["a"] == 4 and sum(load().values()) == 8
    assert all(load()[pid] <= 2 for pid in "bcdef")
    for pid in "cde":
        picker.remove_parent(pid)
    picker.add_parent("a", capacity=1)  # an explicit capacity still wins
    land("a", 4)
    picker.pick()  # three parents: 3 each
    assert load() == {"a": 1, "b": 3, "f": 3}
    picker._check_invariants()
