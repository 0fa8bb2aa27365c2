"""Which child hears of which piece, and when: a parent's announcement schedule.

Sans-I/O: the upload server (dragonfly/peer/upload.py, via the download's subscriptions)
and the swarm simulation drive it with events (a child subscribes or leaves, a piece
lands, the clock reaches ``next_due()``) and send the announcements it returns.

Why a schedule and not "tell everyone at once": a peer that fetches from the origin is
the only way new bytes enter the swarm, and its upload is as fast as the origin feeds it.
Told of a new piece at the same moment, all of its children ask for that same piece (it
is the rarest one for each of them), so its upload carries the piece many times over and
new pieces enter the swarm at a fraction of the rate they could. Staggered, each new
piece is first announced to one child (in turn), which passes it on to the swarm; the
other children hear of it ``reveal_after`` seconds after that first copy was uploaded,
and not while another new piece still awaits its first copy (a child told of an old
piece asks this parent for it, and when this parent's upload is no faster than the
origin, each such second copy holds the new pieces back for as long as it takes; with
this rule the simulation of 1,000 peers and 16 MiB pieces went from 0.56 to 0.68), so
none of them waits for good on a piece that only this parent has (a first child that
leaves, or does not fetch its piece within ``give_up_after``, passes it to the next
child in turn). The upload server serves first copies ahead of other requests. This is BitTorrent's
"super-seeding", on a timer because a parent here does not see its children's
announcements.

A normal peer announces at once (``stagger=False``): copies it uploads are needed by
each child anyway.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

__all__ = ["GIVE_UP_AFTER", "REVEAL_AFTER", "AnnounceSchedule"]

# The schedule's timers, as the daemon runs them (the simulation takes the same).
REVEAL_AFTER = 10.0
GIVE_UP_AFTER = 30.0

Child = TypeVar("Child", bound=Hashable)


class AnnounceSchedule(Generic[Child]):
    """The announcements of one parent for one task.

    Every method returns ``(child, numbers)`` pairs to announce now; a child is anything
    hashable (a channel, a simulated node's id).
    """

    def __init__(
        self,
        *,
        stagger: bool,
        reveal_after: float = REVEAL_AFTER,
        give_up_after: float = GIVE_UP_AFTER,
    ) -> None:
        if reveal_after < 0 or give_up_after < 0:
            raise ValueError("reveal_after and give_up_after must be >= 0")
        self.stagger = stagger
        self.reveal_after = reveal_after
        self.give_up_after = give_up_after
        self._children: dict[Child, None] = {}  # subscription order: the turn order
        self._turn = 0
        self._revealed: list[int] = []  # every child may know these
        self._revealed_set: set[int] = set()
        self._first: dict[int, Child] = {}  # held-back piece -> the child to fetch it first
        self._told: dict[int, set[Child]] = {}  # held-back piece -> every child told of it
        self._timed: set[int] = set()  # held-back pieces whose first copy was uploaded
        self._pending: list[tuple[float, int]] = []  # heap of (reveal time, piece)
        self._ready: dict[int, None] = {}  # due to be revealed once no first copy is owed
        # Held-back pieces still with the child first told of them, their copy not yet
        # uploaded: reveals wait for these only (one passed on to another child, its
        # first never fetching it, does not hold every other reveal back for long).
        self._owed: set[int] = set()

    @property
    def children(self) -> int:
        return len(self._children)

    def subscribe(self, child: Child) -> list[tuple[Child, list[int]]]:
        """A child subscribed: it hears of every revealed piece now."""
        self._children[child] = None
        return [(child, list(self._revealed))] if self._revealed else []

    def known(self, numbers: Iterable[int]) -> None:
        """Pieces held before anyone subscribed (resumed from disk): revealed, silently."""
        self._reveal([n for n in numbers if n not in self._revealed_set and n not in self._first])

    def unsubscribe(self, child: Child) -> list[tuple[Child, list[int]]]:
        """A child left: its held-back pieces go to the next children in turn."""
        self._children.pop(child, None)
        for told in self._told.values():
            told.discard(child)  # (a child that subscribes again must be told again)
        orphans = [n for n, c in self._first.items() if c == child and n not in self._timed]
        return self._pass_on(orphans)

    def _pass_on(self, numbers: list[int]) -> list[tuple[Child, list[int]]]:
        """Give held-back pieces to the next child in turn not yet told of them (or to
        all: every child was told, or none is left)."""
        if not numbers:
            return []
        children = list(self._children)
        out: dict[Child, list[int]] = {}
        reveal: list[int] = []
        for n in numbers:
            self._owed.discard(n)
            told = self._told.setdefault(n, set())
            fresh = [c for c in children if c not in told]
            if not fresh:
                reveal.append(n)
                continue
            child = fresh[self._turn % len(fresh)]
            self._turn += 1
            self._first[n] = child
            told.add(child)
            out.setdefault(child, []).append(n)
        return list(out.items()) + self._reveal_now(reveal)

    def landed(self, numbers: Iterable[int], now: float) -> list[tuple[Child, list[int]]]:
        """Pieces now held: to one child each in turn (staggered), else to every child."""
        numbers = [n for n in numbers if n not in self._revealed_set and n not in self._first]
        if not numbers:
            return []
        children = list(self._children)
        if not self.stagger or len(children) <= 1:
            self._reveal(numbers)
            return [(c, numbers) for c in children] if children else []
        out: dict[Child, list[int]] = {}
        give_up = now + self.give_up_after
        for n in numbers:
            child = children[self._turn % len(children)]
            self._turn += 1
            self._first[n] = child
            self._told[n] = {child}
            self._owed.add(n)
            heapq.heappush(self._pending, (give_up, n))
            out.setdefault(child, []).append(n)
        return list(out.items())

    def held_back(self, number: int) -> bool:
        """Whether the piece awaits its first copy (its request goes ahead of others)."""
        return number in self._first and number not in self._timed

    def owes_first_copies(self) -> bool:
        """Whether a held-back piece still awaits its first copy from the child first
        told of it: until it has gone out, a second copy of another piece would take the
        upload the swarm's new pieces come through. (A piece passed on to another child
        no longer counts: that first child may never fetch it.)"""
        return bool(self._owed)

    def uploaded(self, number: int, now: float) -> None:
        """A copy of the piece went out in full: the others hear of it reveal_after later."""
        if number in self._first and number not in self._timed:
            self._timed.add(number)
            self._owed.discard(number)
            heapq.heappush(self._pending, (now + self.reveal_after, number))

    def next_due(self) -> float | None:
        """When ``due`` next has something to announce (None: nothing is held back)."""
        if self._ready and not self.owes_first_copies():
            return 0.0  # (at once)
        pending = self._pending
        while pending and pending[0][1] not in self._first:
            heapq.heappop(pending)  # revealed already (its other timer fired first)
        return pending[0][0] if pending else None

    def due(self, now: float) -> list[tuple[Child, list[int]]]:
        """Reveal the held-back pieces whose time has come to the children not yet told."""
        pending = self._pending
        reveal: list[int] = []
        stale: list[int] = []
        seen: set[int] = set()
        while pending and pending[0][0] <= now:
            n = heapq.heappop(pending)[1]
            if n not in self._first or n in seen:
                continue  # revealed already, or its other timer fired in this same call
            seen.add(n)
            if n in self._timed:
                self._ready[n] = None  # (each of its two timers may bring it here)
            else:  # its first child never fetched it: the next one gets the chance
                stale.append(n)
                heapq.heappush(pending, (now + self.give_up_after, n))
        passed = self._pass_on(stale)  # (first: a piece passed on is no longer owed)
        if self._ready and not self.owes_first_copies():
            # Revealed once every new piece has gone out: a child told of a piece asks
            # this parent for it, and a copy of an old piece would take the upload the
            # new ones enter the swarm through.
            reveal, self._ready = [n for n in self._ready if n in self._first], {}
        return self._reveal_now(reveal) + passed

    def _reveal_now(self, numbers: list[int]) -> list[tuple[Child, list[int]]]:
        if not numbers:
            return []
        out: dict[Child, list[int]] = {}
        for n in numbers:
            self._first.pop(n, None)
            self._timed.discard(n)
            self._owed.discard(n)
            self._ready.pop(n, None)
            told = self._told.pop(n, set())
            for c in self._children:
                if c not in told:
                    out.setdefault(c, []).append(n)
        self._reveal(numbers)
        return list(out.items())

    def reveal_all(self) -> list[tuple[Child, list[int]]]:
        """Announce everything held back now (e.g. the parent has every piece and the
        children with nowhere else to go should not wait)."""
        self._pending.clear()
        self._ready.clear()
        return self._reveal_now(list(self._first))

    def _reveal(self, numbers: list[int]) -> None:
        for n in numbers:
            if n not in self._revealed_set:
                self._revealed_set.add(n)
                self._revealed.append(n)
