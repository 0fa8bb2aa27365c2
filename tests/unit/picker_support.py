"""Helpers shared by the piece picker's tests (test_picker.py, test_picker_model.py)."""

from __future__ import annotations

from collections.abc import Iterable

from dragonfly.engine.picker import PiecePicker


def make(n: int, parents: dict[str, Iterable[int]] | None = None, **kwargs: object) -> PiecePicker:
    """A picker whose digests are all known and whose parents announced their pieces."""
    picker = PiecePicker(n, **kwargs)  # type: ignore[arg-type]
    picker.digest_known(range(n))
    for pid, pieces in (parents or {}).items():
        picker.add_parent(pid)
        picker.parent_has(pid, pieces)
    return picker


def drain(picker: PiecePicker, limit: int = 10_000) -> list[tuple[int, str]]:
    """Pick and succeed until done; returns every request made, in order."""
    trace: list[tuple[int, str]] = []
    for _ in range(limit):
        if picker.done:
            return trace
        requests = picker.pick()
        assert requests or picker.in_flight, "no progress"
        trace.extend(requests)
        for number, pid in sorted((n, p) for n, ps in picker.in_flight.items() for p in ps):
            if number not in picker.have:
                picker.on_success(number, pid, 1000, 0.01)
    raise AssertionError("did not finish")
