"""The piece picker's parents: what it knows of each, and which are free to take a request.

Sans-I/O bookkeeping for dragonfly/engine/picker.py, which holds the policy. Bitsets are
indexed by position in the picker's permutation, not by piece number.

Why the free parents are kept rather than found: the simulation picks at nearly every
event of each of its peers and most picks start nothing, so ``FreeParents`` keeps the
parents that may take a request now, their free slots and the union of what they serve,
and brings one parent's entry up to date whenever that parent changes (a request starts
or ends, it announces, fails, rests, comes or goes).
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["FreeParents", "ParentState"]


class ParentState:
    """What the picker knows about one parent."""

    __slots__ = (
        "busy_streak",
        "busy_until",
        "capacity",
        "consecutive_failures",
        "failures",
        "has_bits",
        "in_flight",
        "rank",
        "serve_bits",
        "throughput",
    )

    def __init__(self, capacity: int | None, rank: float) -> None:
        self.capacity = capacity  # None: the picker's per_parent_limit
        self.busy_until = 0.0  # refused a request for want of upload slots: rest till then
        self.busy_streak = 0  # refusals since its last success: the rest doubles with each
        self.has_bits = 0  # pieces it announced
        self.serve_bits = 0  # pieces it announced and did not fail on
        self.in_flight: set[int] = set()
        self.failures = 0
        self.consecutive_failures = 0
        self.throughput: float | None = None  # EWMA of bytes/s, None until measured
        self.rank = rank  # seeded random tie-break


class FreeParents:
    """The parents free to take a request (slots left, not suspended after failures, and
    not resting after a "busy" answer when picks honour rests), with their free slots
    and the union of what they serve. ``parents`` and ``resting`` are the picker's own
    tables, read here, never written."""

    __slots__ = (
        "_honours_rest",
        "_limit",
        "_max_in_flight",
        "_parents",
        "_resting",
        "_share",
        "_threshold",
        "slots",
        "union",
    )

    def __init__(
        self,
        parents: Mapping[str, ParentState],
        resting: Mapping[str, ParentState],
        *,
        per_parent_limit: int,
        max_in_flight: int,
        failure_threshold: int,
    ) -> None:
        self._parents = parents
        self._resting = resting
        self._limit = per_parent_limit
        self._max_in_flight = max_in_flight
        self._share = per_parent_limit  # the limit as it follows the number of parents
        self._threshold = failure_threshold
        self.slots: dict[str, int] | None = None  # None: to be found again
        self.union = 0
        self._honours_rest = False  # built for a pick(now): resting parents left out

    def capacity(self, parent: ParentState) -> int:
        """Requests the parent may have in flight (0 while suspended after failures)."""
        if parent.consecutive_failures >= self._threshold:
            return 0
        return self._share if parent.capacity is None else parent.capacity

    def counted(self) -> None:
        """A parent came or went: the per-parent limit follows their number."""
        share = self.share(len(self._parents))
        if share != self._share:
            self._share = share
            self.slots = None  # every parent's free slots changed

    def share(self, parents: int) -> int:
        """Requests each of ``parents`` parents may take (without a capacity of its own).

        A child with few parents would otherwise leave most of its ``max_in_flight``
        unused (one parent, 2 of 8), each request's round trip in series with the
        transfers; so each may take an equal share of ``max_in_flight``, never less than
        ``per_parent_limit`` and at most twice it: enough for the next pieces to wait at
        the parent while others are sent, not so many that the last waits out
        piece_timeout at a slow parent. With four or more parents (at the defaults) the
        limit is unchanged and the swarm's pieces spread as before. Every registered
        parent counts, suspended or resting ones too. A parent whose slots are all taken
        by other children answers "busy" whatever a child asks
        (dragonfly/engine/admission.py).
        """
        limit = self._limit
        if not parents:
            return limit
        return min(max(limit, -(-self._max_in_flight // parents)), 2 * limit)

    def current(self, honour_rest: bool) -> tuple[dict[str, int], int]:
        """The free parents with their slots, and the union of what they serve."""
        if self.slots is None or self._honours_rest != honour_rest:
            self.slots, self.union = self.find(self._resting if honour_rest else {})
            self._honours_rest = honour_rest
        return self.slots, self.union

    def find(self, resting: Mapping[str, ParentState]) -> tuple[dict[str, int], int]:
        """The free parents and their union, from scratch."""
        free: dict[str, int] = {}
        union = 0
        for parent_id, parent in self._parents.items():
            slots = self.capacity(parent) - len(parent.in_flight)
            if slots > 0 and parent_id not in resting:
                free[parent_id] = slots
                union |= parent.serve_bits
        return free, union

    def refresh(self, parent_id: str) -> None:
        """Bring one parent's entry up to date after it changed."""
        free = self.slots
        if free is None:
            return
        parent = self._parents.get(parent_id)
        slots = 0
        if parent is not None and not (self._honours_rest and parent_id in self._resting):
            slots = self.capacity(parent) - len(parent.in_flight)
        if slots > 0:
            assert parent is not None
            free[parent_id] = slots
            self.union |= parent.serve_bits
        elif free.pop(parent_id, None) is not None:
            self.union = self._union(free)

    def serves_more(self, parent_id: str) -> None:
        """The parent announced pieces (its serve bits only grew)."""
        if self.slots is not None and parent_id in self.slots:
            self.union |= self._parents[parent_id].serve_bits

    def serves_less(self, parent_id: str) -> None:
        """The parent failed on a piece (its serve bits shrank)."""
        if self.slots is not None and parent_id in self.slots:
            self.union = self._union(self.slots)
        self.refresh(parent_id)

    def took(self, parent_id: str) -> bool:
        """A request to the parent started; True when that was its last free slot."""
        free = self.slots
        assert free is not None
        slots = free[parent_id] - 1
        if slots:
            free[parent_id] = slots
            return False
        del free[parent_id]
        self.union = self._union(free)
        return True

    def check(self) -> None:
        """The kept entries equal a fresh finding (for tests)."""
        assert self._share == self.share(len(self._parents))
        if self.slots is not None:
            resting = self._resting if self._honours_rest else {}
            assert (self.slots, self.union) == self.find(resting)

    def _union(self, free: Mapping[str, int]) -> int:
        union = 0
        for pid in free:
            union |= self._parents[pid].serve_bits
        return union
