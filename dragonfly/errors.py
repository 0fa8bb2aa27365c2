"""Helpers for exceptions that come out of trio nurseries."""

from __future__ import annotations

from typing import TypeVar

E = TypeVar("E", bound=BaseException)


def find_exception(exc: BaseException, kind: type[E]) -> E | None:
    """The first `kind` inside an exception or (nested) exception group: a nursery wraps
    what its tasks raise, and the caller usually cares about one kind."""
    if isinstance(exc, kind):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = find_exception(inner, kind)
            if found is not None:
                return found
    return None
