"""The sans-I/O GC policy: TTL first, then LRU from the high watermark down to the low one."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dragonfly.storage import GCConfig, TaskUsage, plan_gc


def usage(task_id: str, size: int, last_access: float, in_use: bool = False) -> TaskUsage:
    return TaskUsage(task_id, size, last_access, in_use)


# -- concrete cases -------------------------------------------------------------------------


def test_nothing_to_do_below_high_watermark() -> None:
    tasks = [usage("a", 10, 100.0), usage("b", 10, 200.0)]
    assert plan_gc(tasks, 300.0, 1000.0, 80, 100, 0.85, 0.7) == []


def test_ttl_expired_go_even_with_plenty_of_room() -> None:
    tasks = [usage("a", 10, 100.0), usage("b", 10, 250.0), usage("c", 10, 0.0, in_use=True)]
    assert plan_gc(tasks, 300.0, 100.0, 30, 1000, 0.85, 0.7) == ["a"]


def test_lru_until_low_watermark() -> None:
    tasks = [
        usage("new", 30, 400.0),
        usage("old", 30, 100.0),
        usage("mid", 30, 200.0),
        usage("busy", 30, 50.0, in_use=True),
    ]
    # 120 of 130 used (92 %): above 85 %, evict LRU until <= 0.5 * 130 = 65.
    assert plan_gc(tasks, 500.0, math.inf, 120, 130, 0.85, 0.5) == ["old", "mid"]


def test_ttl_removals_count_before_lru() -> None:
    tasks = [usage("stale", 50, 0.0), usage("a", 20, 900.0), usage("b", 20, 950.0)]
    # After dropping the stale task 40 of 100 remain: below the high watermark already.
    assert plan_gc(tasks, 1000.0, 500.0, 90, 100, 0.8, 0.3) == ["stale"]


def test_only_in_use_tasks_left() -> None:
    tasks = [usage("a", 60, 0.0, in_use=True), usage("b", 30, 1.0)]
    assert plan_gc(tasks, 10.0, math.inf, 95, 100, 0.8, 0.5) == ["b"]


def test_capacity_zero_disables_watermarks() -> None:
    assert plan_gc([usage("a", 10, 0.0)], 1.0, math.inf, 10, 0, 0.8, 0.5) == []


@pytest.mark.parametrize(("high", "low"), [(0.5, 0.6), (1.2, 0.5), (0.8, -0.1)])
def test_bad_watermarks(high: float, low: float) -> None:
    with pytest.raises(ValueError, match="watermarks"):
        plan_gc([], 0.0, 1.0, 0, 100, high, low)
    with pytest.raises(ValueError, match="watermarks"):
        GCConfig(high_watermark=high, low_watermark=low)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="quota_bytes"):
        GCConfig(quota_bytes=-1)
    with pytest.raises(ValueError, match="ttl"):
        GCConfig(ttl=-5)


# -- properties -----------------------------------------------------------------------------

task_lists = st.lists(
    st.builds(
        TaskUsage,
        task_id=st.text("abcdefghij", min_size=1, max_size=6),
        size_bytes=st.integers(0, 1000),
        last_access=st.floats(0, 1000, allow_nan=False),
        in_use=st.booleans(),
    ),
    max_size=25,
    unique_by=lambda t: t.task_id,
)


# (tasks, now, ttl, used_bytes, capacity_bytes, high_watermark, low_watermark)
Scenario = tuple[list[TaskUsage], float, float, int, int, float, float]


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    tasks = draw(task_lists)
    now = draw(st.floats(0, 2000, allow_nan=False))
    ttl = draw(st.one_of(st.just(math.inf), st.floats(0, 1500, allow_nan=False)))
    other = draw(st.integers(0, 5000))  # bytes on the filesystem that are not tasks'
    used = sum(t.size_bytes for t in tasks) + other
    capacity = draw(st.integers(1, 30000))
    low = draw(st.floats(0, 1))
    high = draw(st.floats(low, 1))
    return tasks, now, ttl, used, capacity, high, low


@given(scenarios())
def test_never_returns_in_use_and_no_duplicates(scenario: Scenario) -> None:
    tasks, now, ttl, used, capacity, high, low = scenario
    plan = plan_gc(tasks, now, ttl, used, capacity, high, low)
    busy = {t.task_id for t in tasks if t.in_use}
    assert not busy & set(plan)
    assert len(plan) == len(set(plan))
    assert set(plan) <= {t.task_id for t in tasks}


@given(scenarios())
def test_ttl_expired_always_included(scenario: Scenario) -> None:
    tasks, now, ttl, used, capacity, high, low = scenario
    plan = set(plan_gc(tasks, now, ttl, used, capacity, high, low))
    for t in tasks:
        if not t.in_use and now - t.last_access > ttl:
            assert t.task_id in plan


@given(scenarios())
def test_at_or_below_low_watermark_unless_only_in_use_left(scenario: Scenario) -> None:
    tasks, now, ttl, used, capacity, high, low = scenario
    plan = set(plan_gc(tasks, now, ttl, used, capacity, high, low))
    freed = sum(t.size_bytes for t in tasks if t.task_id in plan)
    after_ttl = used - sum(
        t.size_bytes for t in tasks if not t.in_use and now - t.last_access > ttl
    )
    if after_ttl > high * capacity:
        left_evictable = [t for t in tasks if not t.in_use and t.task_id not in plan]
        assert used - freed <= low * capacity or not left_evictable
    else:
        # Below the high watermark only the TTL rule removes anything.
        assert all(now - t.last_access > ttl for t in tasks if t.task_id in plan)


@given(scenarios())
def test_lru_order_and_minimal(scenario: Scenario) -> None:
    tasks, now, ttl, used, capacity, high, low = scenario
    plan = plan_gc(tasks, now, ttl, used, capacity, high, low)
    by_id = {t.task_id: t for t in tasks}
    expired = {t.task_id for t in tasks if not t.in_use and now - t.last_access > ttl}
    lru = [by_id[tid] for tid in plan if tid not in expired]
    # TTL removals come first, then the LRU evictions, oldest first.
    assert plan[: len(plan) - len(lru)] == [tid for tid in plan if tid in expired]
    keys = [(t.last_access, t.task_id) for t in lru]
    assert keys == sorted(keys)
    if lru:
        # Nothing kept (and evictable) is older than the newest LRU eviction...
        kept = [t for t in tasks if not t.in_use and t.task_id not in plan]
        assert all((t.last_access, t.task_id) > keys[-1] for t in kept)
        # ...and it stopped as soon as the low watermark was reached.
        freed_before_last = sum(by_id[tid].size_bytes for tid in plan[:-1])
        assert used - freed_before_last > low * capacity
