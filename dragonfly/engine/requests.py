"""The piece requests a download has in flight: bookkeeping, not policy.

Each request has an ID (what the driver quotes back), a piece, a parent and the time it
started. Kept in request order, so the oldest is first: the one whose timeout comes next.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["Request", "RequestTable"]


@dataclass(slots=True)
class Request:
    fetch_id: int
    number: int
    parent_id: str
    started: float


class RequestTable:
    """Requests in flight, by ID, by (piece, parent) and in start order."""

    __slots__ = ("_by_id", "_by_key", "_next")

    def __init__(self) -> None:
        self._by_id: dict[int, Request] = {}  # insertion (start) order
        self._by_key: dict[tuple[int, str], int] = {}
        self._next = 0

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Request]:
        return iter(list(self._by_id.values()))

    def start(self, number: int, parent_id: str, now: float) -> Request:
        request = Request(self._next, number, parent_id, now)
        self._next += 1
        self._by_id[request.fetch_id] = request
        self._by_key[(number, parent_id)] = request.fetch_id
        return request

    def get(self, fetch_id: int) -> Request | None:
        return self._by_id.get(fetch_id)

    def find(self, number: int, parent_id: str) -> Request | None:
        fid = self._by_key.get((number, parent_id))
        return None if fid is None else self._by_id[fid]

    def pop(self, fetch_id: int) -> Request | None:
        """Take a request out (None: not in flight any more, e.g. cancelled already)."""
        request = self._by_id.pop(fetch_id, None)
        if request is not None:
            del self._by_key[(request.number, request.parent_id)]
        return request

    def of_piece(self, number: int) -> list[Request]:
        return [r for r in self._by_id.values() if r.number == number]

    def next_timeout(self, timeout: float) -> float | None:
        """When the oldest request times out (None: nothing in flight)."""
        for request in self._by_id.values():
            return request.started + timeout
        return None

    def timed_out(self, now: float, timeout: float) -> list[Request]:
        """The requests that have been in flight ``timeout`` or longer at ``now``, oldest
        first. The same sum as ``next_timeout``: a comparison of ``started`` with
        ``now - timeout`` rounds differently, and at ``next_timeout``'s moment would find
        nothing due, and the caller's timer would fire at that moment again forever."""
        out = []
        for request in self._by_id.values():
            if request.started + timeout > now:
                break
            out.append(request)
        return out
