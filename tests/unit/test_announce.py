"""The announcement schedule of a parent (dragonfly/engine/announce.py)."""

from __future__ import annotations

from collections import defaultdict

from hypothesis import given, settings
from hypothesis import strategies as st

from dragonfly.engine.announce import AnnounceSchedule


def told(out: list[tuple[str, list[int]]]) -> dict[str, list[int]]:
    d: dict[str, list[int]] = defaultdict(list)
    for child, numbers in out:
        d[child].extend(numbers)
    return dict(d)


def test_unstaggered_tells_everyone_at_once() -> None:
    s: AnnounceSchedule[str] = AnnounceSchedule(stagger=False)
    assert s.subscribe("a") == []
    s.subscribe("b")
    assert told(s.landed([3], 0.0)) == {"a": [3], "b": [3]}
    assert s.subscribe("c") == [("c", [3])]  # the backlog
    assert s.next_due() is None


def test_staggered_piece_goes_to_one_child_then_to_all_after_its_first_upload() -> None:
    s: AnnounceSchedule[str] = AnnounceSchedule(stagger=True, reveal_after=2.0)
    for c in ("a", "b", "c"):
        s.subscribe(c)
    assert told(s.landed([0, 1, 2], 0.0)) == {"a": [0], "b": [1], "c": [2]}  # in turn
    assert s.held_back(0) and s.held_back(1)
    assert s.subscribe("d") == []  # nothing revealed yet
    s.uploaded(0, 5.0)
    assert not s.held_back(0)  # its first copy is out: no priority any more
    assert s.next_due() == 7.0
    assert s.due(6.9) == []
    # Due, but pieces 1 and 2 still await their first copies: a child told of 0 would
    # ask this parent for it, and that copy would hold the new pieces back.
    assert s.owes_first_copies()
    assert s.due(7.0) == [] and s.next_due() == 30.0  # (1 and 2: their give-up timers)
    s.uploaded(1, 7.5)
    assert s.due(7.5) == []
    s.uploaded(2, 8.0)
    assert not s.owes_first_copies()
    assert s.next_due() == 0.0  # at once
    assert told(s.due(8.0)) == {"b": [0], "c": [0], "d": [0]}  # not a again
    assert s.subscribe("e") == [("e", [0])]
    assert s.next_due() == 9.5  # piece 1's turn
    assert told(s.due(9.5)) == {"a": [1], "c": [1], "d": [1], "e": [1]}


def test_a_first_child_that_never_fetches_passes_the_piece_on() -> None:
    s: AnnounceSchedule[str] = AnnounceSchedule(stagger=True, give_up_after=10.0)
    s.subscribe("a")
    s.subscribe("b")
    assert told(s.landed([0], 0.0)) == {"a": [0]}
    assert told(s.due(10.0)) == {"b": [0]}  # the next in turn gets its chance
    assert s.held_back(0)
    # b left too: every child left was told of it, so it is simply revealed.
    assert s.unsubscribe("b") == []
    assert not s.held_back(0) and s.subscribe("c") == [("c", [0])]


def test_the_last_child_leaving_reveals_and_reveal_all_flushes() -> None:
    s: AnnounceSchedule[str] = AnnounceSchedule(stagger=True)
    s.subscribe("a")
    s.subscribe("b")
    s.landed([0, 1], 0.0)
    assert told(s.reveal_all()) == {"a": [1], "b": [0]}
    assert s.next_due() is None
    assert s.subscribe("c") == [("c", [0, 1])]


def test_a_child_that_comes_back_is_told_again() -> None:
    s: AnnounceSchedule[str] = AnnounceSchedule(stagger=True)
    s.subscribe("a")
    s.subscribe("b")
    s.landed([0], 0.0)  # to a first
    assert told(s.unsubscribe("a")) == {"b": [0]}
    s.subscribe("a")
    assert told(s.reveal_all()) == {"a": [0]}


def test_known_pieces_are_revealed_silently() -> None:
    s: AnnounceSchedule[str] = AnnounceSchedule(stagger=True)
    s.known([4, 5])
    assert s.subscribe("a") == [("a", [4, 5])]
    assert s.landed([4], 1.0) == []  # already known: nothing new


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("sub"), st.integers(0, 5)),
            st.tuples(st.just("unsub"), st.integers(0, 5)),
            st.tuples(st.just("land"), st.integers(0, 30)),
            st.tuples(st.just("upload"), st.integers(0, 30)),
            st.tuples(st.just("tick"), st.integers(0, 5)),
        ),
        max_size=80,
    ),
    st.booleans(),
)
def test_every_child_hears_of_every_piece_exactly_once(ops: list, stagger: bool) -> None:
    """Whatever happens, after reveal_all every child still subscribed has been told of
    every landed piece exactly once, and never of a piece that did not land."""
    s: AnnounceSchedule[str] = AnnounceSchedule(
        stagger=stagger, reveal_after=1.0, give_up_after=3.0
    )
    heard: dict[str, list[int]] = {}
    landed: set[int] = set()
    now = 0.0

    def record(out: list[tuple[str, list[int]]]) -> None:
        for child, numbers in out:
            assert child in heard, "told a child that is not subscribed"
            heard[child].extend(numbers)

    for op, arg in ops:
        child = f"c{arg}"
        if op == "sub" and child not in heard:
            heard[child] = []
            record(s.subscribe(child))
        elif op == "unsub" and child in heard:
            del heard[child]
            record(s.unsubscribe(child))
        elif op == "land":
            landed.add(arg)
            record(s.landed([arg], now))
        elif op == "upload" and arg in landed:
            s.uploaded(arg, now)
        elif op == "tick":
            now += arg
            record(s.due(now))
    record(s.reveal_all())
    for child, numbers in heard.items():
        assert sorted(numbers) == sorted(set(numbers)), f"{child} told twice: {numbers}"
        assert set(numbers) == landed, child


def test_a_piece_due_twice_while_reveals_wait_is_told_once() -> None:
    """Both of a piece's timers (its give-up and its reveal) may come due while reveals
    wait for another piece's first copy; it is still told to each child once."""
    s: AnnounceSchedule[str] = AnnounceSchedule(stagger=True, reveal_after=10.0)
    for c in ("a", "b", "c"):
        s.subscribe(c)
    s.landed([0], 0.0)  # to a
    s.uploaded(0, 1.0)
    s.landed([1], 2.0)  # to b, owed
    assert s.due(11.0) == [] and s.due(30.0) == []  # 0's reveal, then its give-up timer
    s.uploaded(1, 30.5)
    assert told(s.due(31.0)) == {"b": [0], "c": [0]}
    assert s.subscribe("d") == [("d", [0])]


def test_a_first_child_that_never_fetches_holds_other_reveals_back_only_once() -> None:
    """A held-back piece passed on to the next child no longer holds the other reveals
    back: reveals wait for each piece's first child, not for a chain of them."""
    s: AnnounceSchedule[str] = AnnounceSchedule(stagger=True, reveal_after=10.0)
    for c in ("a", "b", "c"):
        s.subscribe(c)
    s.landed([0], 0.0)  # to a
    s.uploaded(0, 1.0)
    s.landed([1], 2.0)  # to b, which never fetches it
    assert s.due(11.0) == []  # 0 waits: 1 is owed
    assert told(s.due(32.0)) == {"a": [1], "b": [0], "c": [0]}  # 1 passed on; 0 revealed
    assert s.held_back(1) and not s.owes_first_copies()


def test_reveal_all_forgets_pieces_waiting_to_be_revealed() -> None:
    s: AnnounceSchedule[str] = AnnounceSchedule(stagger=True, reveal_after=1.0)
    s.subscribe("a")
    s.subscribe("b")
    s.landed([0, 1], 0.0)
    s.uploaded(0, 0.5)
    assert s.due(1.5) == []  # 1 owed
    assert told(s.reveal_all()) == {"a": [1], "b": [0]}
    assert s.next_due() is None
