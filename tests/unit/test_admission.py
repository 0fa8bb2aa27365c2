"""The parent's admission rule (dragonfly/engine/admission.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from dragonfly.engine.admission import Admission


def ask(
    rule: Admission,
    child: str | None,
    *,
    active: int = 2,
    waiting: int = 2,
    others: bool = False,
    first: bool = False,
    now: float = 0.0,
) -> bool:
    """rule.refuses, by default with both slots sending and the queue at its limit."""
    return rule.refuses(child, active=active, waiting=waiting, others=others, first=first, now=now)


def test_room_in_the_slots_or_the_queue_takes_anyone() -> None:
    rule = Admission(slots=2, queue_limit=2)
    assert not ask(rule, None, active=1, waiting=5, others=True)
    assert not ask(rule, None, waiting=1, others=True)
    assert ask(rule, None, others=True)


def test_the_only_child_may_keep_slots_more_waiting() -> None:
    rule = Admission(slots=2, queue_limit=2)
    assert rule.sole_queue == 4
    assert not ask(rule, "a")  # 2 waiting already: the queue is full for anyone else
    assert not ask(rule, "a", waiting=3)
    assert ask(rule, "a", waiting=4)
    rule = Admission(slots=1, queue_limit=0)  # no queue at all: one waits behind the slot
    assert not ask(rule, "a", active=1, waiting=0)
    assert ask(rule, "a", active=1, waiting=1)
    assert ask(rule, None, active=1, waiting=0)


def test_another_childs_requests_end_the_only_childs_extra_queue() -> None:
    rule = Admission(slots=2, queue_limit=2)
    assert ask(rule, "a", others=True)


def test_a_child_turned_away_counts_until_its_rest_is_over() -> None:
    """b was answered busy (a held requests then): a's extra requests are refused while
    b rests, so that b finds the queue short when it asks again."""
    rule = Admission(slots=2, queue_limit=2, memory=2.5)
    assert ask(rule, "b", others=True, now=10.0)
    assert ask(rule, "a", now=11.0)
    assert ask(rule, "a", now=12.5)
    assert not ask(rule, "a", now=12.6)  # b forgotten; a's own refusals do not count


def test_a_child_refused_alone_is_still_the_only_child() -> None:
    rule = Admission(slots=2, queue_limit=2)
    assert ask(rule, "a", waiting=4)
    assert not ask(rule, "a", waiting=3, now=0.1)


def test_a_held_back_first_copy_is_never_refused() -> None:
    rule = Admission(slots=2, queue_limit=2)
    assert not ask(rule, None, others=True, waiting=10**6, first=True)


@given(
    st.lists(
        st.tuples(
            st.sampled_from([None, "a", "b", "c"]),
            st.integers(0, 4),
            st.integers(0, 8),
            st.booleans(),
            st.floats(0, 3.0),
        ),
        max_size=60,
    )
)
def test_the_fixed_limits_hold_whenever_the_parent_cannot_take_more(
    steps: list[tuple[str | None, int, int, bool, float]],
) -> None:
    """Whatever came before: a request finding room is taken; one finding every slot and
    the queue full is refused when another child holds requests, when it names no child,
    when another child was refused within the memory, or when the only child already
    keeps sole_queue waiting; and only children refused within the memory are kept."""
    rule = Admission(slots=2, queue_limit=2, memory=2.5)
    now = 0.0
    refused_at: dict[str, float] = {}
    for child, active, waiting, others, step in steps:
        now += step
        refused = ask(rule, child, active=active, waiting=waiting, others=others, now=now)
        if active < 2 or waiting < 2:
            assert not refused
            continue
        recent = {c for c, at in refused_at.items() if now - at <= 2.5}
        if others or child is None or waiting >= 4 or recent - {child}:
            assert refused
        else:
            assert not refused
        if refused and child is not None:
            refused_at[child] = now
        assert set(rule._refused) <= {c for c, at in refused_at.items() if now - at <= 2.5}
