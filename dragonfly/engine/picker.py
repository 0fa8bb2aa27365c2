"""The piece picker of one download: which piece to request next, and from which parent.

One policy over one incremental index (the availability buckets, the in-flight table);
what it knows of each parent, and which parents are free now, is in picker_parents.py.

Sans-I/O (docs/ARCHITECTURE.md): events go in, decisions come out,
no sockets and no clock. The trio download engine of a real peer drives it, and so does the
discrete-event simulation of thousands of peers, so every call is cheap: availability is kept
incrementally, and the pieces waiting to be requested live in one bitset per availability
count ("bucket"), indexed by a seeded random permutation of the piece numbers. Walking a
bucket's bits lowest first therefore yields the rarest pieces in a random order that is
stable for a given seed, and intersecting a bucket with the union of the free parents'
bitsets skips every piece nobody free can serve without looking at it. The free parents
and that union are kept up to date (``FreeParents``) rather than found at each pick.

Policy, in the order it applies:

* a piece is requested only once its origin-side digest is known (it could not be verified
  otherwise), never when already held, and never from a parent that lacks it or failed on it;
* the in-order window ``[cursor, cursor + window)`` comes first, lowest first: a streaming
  client is waiting for those bytes;
* then rarest first, ties broken by the seeded permutation, so that children of one parent
  fetch different pieces and the swarm spreads them;
* a parent takes up to ``per_parent_limit`` requests, or an equal share of ``max_in_flight``
  when there are few parents (at most twice ``per_parent_limit``), so a child with few
  parents keeps its pieces in flight;
* each piece goes to the parent with the most free slots, then the best measured throughput,
  then a seeded random rank;
* endgame: once every missing piece is in flight, spare slots duplicate in-flight pieces on
  other parents (a piece whose request is overdue, up to ``endgame_duplicates`` copies, one
  more once even the newest is overdue); the first success returns the duplicates for the
  engine to cancel.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet

from dragonfly.engine.picker_parents import FreeParents, ParentState

__all__ = ["PiecePicker"]

_EWMA_ALPHA = 0.3  # weight of the newest throughput sample
_MIN_SECONDS = 1e-6  # a piece timed at zero seconds still yields a finite rate
_NOBODY: frozenset[str] = frozenset()  # no parent to skip


class PiecePicker:
    """Decides which pieces a download requests from which parents.

    ``seed`` may be an int, str or bytes; a peer passes something of its own (its peer ID)
    so that its picks differ from its siblings' while staying reproducible.
    """

    def __init__(
        self,
        piece_count: int,
        *,
        have: Iterable[int] = (),
        max_in_flight: int = 8,
        per_parent_limit: int = 2,
        window: int = 8,
        endgame_duplicates: int = 2,
        endgame_after: float = 1.0,
        failure_threshold: int = 3,
        busy_backoff: float = 0.25,
        busy_backoff_max: float = 0.5,
        seed: int | str | bytes = 0,
    ) -> None:
        if piece_count < 0:
            raise ValueError(f"piece_count must be >= 0, got {piece_count}")
        minimums = {
            "max_in_flight": (max_in_flight, 1),
            "per_parent_limit": (per_parent_limit, 0),
            "window": (window, 0),
            "endgame_duplicates": (endgame_duplicates, 1),  # 1: no endgame duplicates
            "failure_threshold": (failure_threshold, 1),
        }
        for name, (value, minimum) in minimums.items():
            if value < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {value}")
        self._n = piece_count
        self._max_in_flight = max_in_flight
        self._window = window
        self._endgame_duplicates = endgame_duplicates
        # A piece is duplicated only once its request is overdue: longer than this, and
        # longer than three typical piece times. Racing a healthy request wastes a copy.
        self._endgame_after = endgame_after
        self._piece_seconds = 0.0  # EWMA of successful piece times
        self._now: float | None = None
        self._request_started: dict[int, float] = {}  # piece -> start of its first request
        self._latest_started: dict[int, float] = {}  # piece -> start of its latest request
        self._failure_threshold = failure_threshold
        self._busy_backoff = busy_backoff
        self._busy_backoff_max = busy_backoff_max
        self._resting: dict[str, ParentState] = {}  # parents resting after a "busy" answer
        self._rng = random.Random(seed)

        perm = list(range(piece_count))
        self._rng.shuffle(perm)
        self._perm = perm  # position -> piece
        self._pos = [0] * piece_count  # piece -> position
        for pos, number in enumerate(perm):
            self._pos[number] = pos

        self._have: set[int] = set()
        self._known = bytearray(piece_count)  # digest known
        self._waiting = bytearray(piece_count)  # missing, digest known, not in flight
        self._avail = [0] * piece_count  # parents that announced the piece
        self._buckets: dict[int, int] = {}  # availability -> bitset of waiting pieces
        self._waiting_bits = 0
        self._in_flight: dict[int, set[str]] = {}
        self._requests = 0  # (piece, parent) pairs in flight, duplicates included
        self._parents: dict[str, ParentState] = {}
        self._excluded: dict[str, int] = {}  # parent -> bitset; survives remove_parent
        self._tput_sum = 0.0  # over parents with a measured throughput
        self._tput_count = 0
        self._cursor: int | None = None
        self._free = FreeParents(
            self._parents,
            self._resting,
            per_parent_limit=per_parent_limit,
            max_in_flight=max_in_flight,
            failure_threshold=failure_threshold,
        )
        for number in have:
            self._check_number(number)
            self._have.add(number)

    # -- state ------------------------------------------------------------------------------

    @property
    def piece_count(self) -> int:
        return self._n

    @property
    def have(self) -> AbstractSet[int]:
        """Pieces held (a live view: do not mutate)."""
        return self._have

    @property
    def missing(self) -> int:
        return self._n - len(self._have)

    @property
    def done(self) -> bool:
        return len(self._have) == self._n

    @property
    def in_flight(self) -> Mapping[int, AbstractSet[str]]:
        """Piece -> parents it is requested from (a live view: do not mutate)."""
        return self._in_flight

    @property
    def requests_in_flight(self) -> int:
        """(piece, parent) requests in flight, endgame duplicates included."""
        return self._requests

    @property
    def cursor(self) -> int | None:
        return self._cursor

    def parents(self) -> list[str]:
        return list(self._parents)

    def parent_failures(self, parent_id: str) -> int:
        """Failures of this parent since it was added (0 for an unknown parent)."""
        parent = self._parents.get(parent_id)
        return parent.failures if parent is not None else 0

    def suspended_parents(self) -> list[str]:
        """Parents given no new requests after too many consecutive failures.

        The engine reports these so the scheduler replaces them.
        """
        return [
            pid
            for pid, p in self._parents.items()
            if p.consecutive_failures >= self._failure_threshold
        ]

    def stalled(self) -> bool:
        """Nothing in flight, not done, and no usable parent can serve any waiting piece.

        The engine then asks the scheduler for other parents (or goes back to source).
        """
        if self.done or self._in_flight:
            return False
        waiting = self._waiting_bits
        return not any(
            p.serve_bits & waiting for p in self._parents.values() if self._free.capacity(p) > 0
        )

    # -- parents ------------------------------------------------------------------------------

    def add_parent(self, parent_id: str, *, capacity: int | None = None) -> None:
        """Register a parent; ``capacity`` overrides per_parent_limit for it.

        Adding a known parent again only updates its capacity.
        """
        if capacity is not None and capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        parent = self._parents.get(parent_id)
        if parent is None:
            self._parents[parent_id] = ParentState(capacity, self._rng.random())
            self._free.counted()
        else:
            parent.capacity = capacity
        self._free.refresh(parent_id)

    def remove_parent(self, parent_id: str) -> list[int]:
        """Forget a parent: its pieces no longer count, its requests go back to the queue.

        Returns the pieces that were in flight from it. Unknown parents are ignored (an
        engine may learn twice that a parent left).
        """
        parent = self._parents.pop(parent_id, None)
        self._resting.pop(parent_id, None)
        if parent is None:
            return []
        self._free.counted()
        self._free.refresh(parent_id)
        bits = parent.has_bits
        while bits:
            low = bits & -bits
            bits ^= low
            number = self._perm[low.bit_length() - 1]
            self._set_avail(number, self._avail[number] - 1)
        if parent.throughput is not None:
            self._tput_count -= 1
            self._tput_sum = self._tput_sum - parent.throughput if self._tput_count else 0.0
        requeued = sorted(parent.in_flight)
        for number in requeued:
            self._drop_request(number, parent_id, parent)
        return requeued

    def parent_has(self, parent_id: str, numbers: Iterable[int]) -> None:
        """A parent announced pieces. Announcements from unknown parents are ignored: they
        may arrive after the engine removed the parent."""
        parent = self._parents.get(parent_id)
        if parent is None:
            return
        excluded = self._excluded.get(parent_id, 0)
        n, pos_of = self._n, self._pos
        before = parent.serve_bits
        for number in numbers:
            if not 0 <= number < n:
                self._check_number(number)  # raises
            bit = 1 << pos_of[number]
            if parent.has_bits & bit:
                continue
            parent.has_bits |= bit
            if not excluded & bit:
                parent.serve_bits |= bit
            self._set_avail(number, self._avail[number] + 1)
        if parent.serve_bits != before:
            self._free.serves_more(parent_id)

    def digest_known(self, numbers: Iterable[int]) -> None:
        """The origin-side digests of these pieces arrived: they may now be requested."""
        for number in numbers:
            self._check_number(number)
            if not self._known[number]:
                self._known[number] = 1
                self._enqueue(number)

    def set_cursor(self, number: int | None) -> None:
        """The lowest piece a streaming client still waits for (None: nobody streams)."""
        if number is not None and not 0 <= number <= self._n:
            raise ValueError(f"cursor {number} outside [0, {self._n}]")
        self._cursor = number

    def mark_have(self, number: int) -> None:
        """A piece arrived by other means (back to source, resumed from disk); any requests
        for it are dropped without counting as failures, the engine cancels them itself."""
        self._check_number(number)
        if number in self._have:
            return
        for pid in sorted(self._in_flight.get(number, ())):
            self._drop_request(number, pid, self._parents[pid], requeue=False)
        self._complete(number)

    # -- decisions ----------------------------------------------------------------------------

    def pick(self, now: float | None = None) -> list[tuple[int, str]]:
        """New (piece, parent) requests to start now, most urgent first.

        `now` (seconds) enables overdue-only endgame; without it, endgame duplicates
        any in-flight piece (the simple rule, for callers without a clock).
        """
        self._now = now
        budget = self._max_in_flight - self._requests
        if budget <= 0 or self.done:
            return []
        if now is not None and self._resting:
            for rested in [r for r, p in self._resting.items() if p.busy_until <= now]:
                del self._resting[rested]
                self._free.refresh(rested)
        free, union = self._free.current(honour_rest=now is not None)
        if not free:
            return []
        out: list[tuple[int, str]] = []

        # 1. the in-order window ahead of a streaming client
        cursor = self._cursor
        if cursor is not None and self._waiting_bits:
            for number in range(cursor, min(cursor + self._window, self._n)):
                if not self._waiting[number]:
                    continue
                pid = self._choose(self._pos[number], free, _NOBODY)
                if pid is None:
                    continue
                if self._start(number, pid, out):
                    union = self._free.union
                budget -= 1
                if not budget or not free:
                    return out

        # 2. rarest first, seeded random order within one availability
        if union & self._waiting_bits:
            for avail in sorted(self._buckets):
                bits = self._buckets.get(avail, 0) & union
                while bits:
                    low = bits & -bits
                    bits ^= low
                    pos = low.bit_length() - 1
                    pid = self._choose(pos, free, _NOBODY)
                    if pid is None:  # cannot happen: bits only hold pieces a free parent serves
                        continue
                    if self._start(self._perm[pos], pid, out):
                        if not free:
                            return out
                        union = self._free.union
                        bits &= union
                    budget -= 1
                    if not budget:
                        return out

        # 3. endgame: every missing piece is in flight; duplicate on other parents
        if self._endgame_duplicates > 1 and len(self._in_flight) == self.missing:
            progress = True
            while progress and budget and free:
                progress = False
                for number in sorted(self._in_flight, key=self._endgame_order):
                    requesters = self._in_flight[number]
                    if not self._overdue(number):
                        continue
                    # One past the cap once even the newest copy is overdue: the parents
                    # asked may be dead (a silent crash answers nothing until piece_timeout).
                    cap = self._endgame_duplicates + self._overdue(number, latest=True)
                    if len(requesters) >= cap:
                        continue
                    pid = self._choose(self._pos[number], free, requesters)
                    if pid is None:
                        continue
                    self._start(number, pid, out)
                    progress = True
                    budget -= 1
                    if not budget or not free:
                        break
        return out

    def on_success(
        self, number: int, parent_id: str, nbytes: int, seconds: float
    ) -> list[tuple[int, str]]:
        """A piece arrived and verified. Returns the other requests for it (endgame
        duplicates) for the engine to cancel; calls about them later are harmless."""
        self._check_number(number)
        parent = self._parents.get(parent_id)
        requesters = self._in_flight.get(number)
        if parent is not None and requesters is not None and parent_id in requesters:
            self._measure(parent, nbytes, seconds)
            if parent.consecutive_failures >= self._failure_threshold:
                parent.consecutive_failures = 0
                self._free.refresh(parent_id)  # no longer suspended
            parent.consecutive_failures = 0
            parent.busy_streak = 0
        if number in self._have:
            return []
        cancel: list[tuple[int, str]] = []
        for pid in sorted(requesters or ()):
            self._drop_request(number, pid, self._parents[pid], requeue=False)
            if pid != parent_id:
                cancel.append((number, pid))
        self._complete(number)
        return cancel

    def on_failure(self, number: int, parent_id: str) -> None:
        """A request failed (error, timeout, bad digest): the piece goes back to the queue,
        the parent is never asked for it again and its failure is counted. Failures of
        requests no longer in flight (cancelled duplicates, removed parents) are ignored."""
        parent = self._end_request(number, parent_id)
        if parent is None:
            return
        bit = 1 << self._pos[number]
        self._excluded[parent_id] = self._excluded.get(parent_id, 0) | bit
        parent.serve_bits &= ~bit
        parent.failures += 1
        parent.consecutive_failures += 1
        self._free.serves_less(parent_id)

    def on_busy(self, number: int, parent_id: str, now: float) -> None:
        """The parent refused the request at once: every upload slot of its host is taken.
        Not the parent's fault and not the piece's: the piece goes back to the queue and
        the parent rests (``busy_backoff``, doubling with each refusal in a row up to
        ``busy_backoff_max``, or a quarter of a typical piece's time where that is longer,
        at most four times ``busy_backoff_max``: a full parent frees a slot about that
        often, and asking it sooner only earns more refusals; ``pick(now)`` honours it).
        (The piece time counts waiting in parents' queues and is one for all parents:
        hence the cap.)"""
        parent = self._end_request(number, parent_id)
        if parent is None:
            return
        cap = self._busy_backoff_max
        longest = max(cap, min(self._piece_seconds / 4, 4 * cap))
        rest = min(self._busy_backoff * (1 << min(parent.busy_streak, 16)), longest)
        parent.busy_streak += 1
        parent.busy_until = max(parent.busy_until, now + rest)
        self._resting[parent_id] = parent
        self._free.refresh(parent_id)

    def resting(self, parent_id: str, now: float) -> bool:
        """Whether the parent still rests after a "busy" answer at ``now``."""
        parent = self._resting.get(parent_id)
        return parent is not None and parent.busy_until > now

    def busy_until(self) -> float | None:
        """The earliest moment a resting parent that could serve a waiting piece takes
        requests again (None: none is resting); the engine wakes the picker then."""
        waiting = self._waiting_bits
        best: float | None = None
        for p in self._resting.values():
            if p.serve_bits & waiting and (best is None or p.busy_until < best):
                best = p.busy_until
        return best

    def on_cancelled(self, number: int, parent_id: str) -> None:
        """The engine abandoned a request without blaming the parent (it stopped it for
        another request of the same piece, or shut down): the piece goes back to the
        queue. Harmless for a request no longer in flight."""
        self._end_request(number, parent_id)

    # -- internals ----------------------------------------------------------------------------

    def _end_request(self, number: int, parent_id: str) -> ParentState | None:
        """Take a (piece, parent) request out of flight, the piece back to the queue;
        None (and nothing done) if that request is no longer in flight."""
        self._check_number(number)
        requesters = self._in_flight.get(number)
        parent = self._parents.get(parent_id)
        if requesters is None or parent_id not in requesters or parent is None:
            return None
        self._drop_request(number, parent_id, parent)
        return parent

    def _check_number(self, number: int) -> None:
        if not 0 <= number < self._n:
            raise ValueError(f"piece {number} outside [0, {self._n})")

    def _enqueue(self, number: int) -> None:
        """Put a piece in its bucket if it is now waiting to be requested."""
        if (
            self._waiting[number]
            or not self._known[number]
            or number in self._have
            or number in self._in_flight
        ):
            return
        self._waiting[number] = 1
        bit = 1 << self._pos[number]
        avail = self._avail[number]
        self._buckets[avail] = self._buckets.get(avail, 0) | bit
        self._waiting_bits |= bit

    def _dequeue(self, number: int) -> None:
        if not self._waiting[number]:
            return
        self._waiting[number] = 0
        bit = 1 << self._pos[number]
        avail = self._avail[number]
        rest = self._buckets[avail] ^ bit
        if rest:
            self._buckets[avail] = rest
        else:
            del self._buckets[avail]
        self._waiting_bits ^= bit

    def _set_avail(self, number: int, avail: int) -> None:
        """Change a piece's availability, moving it to its new bucket if it waits."""
        old = self._avail[number]
        self._avail[number] = avail
        if self._waiting[number]:
            bit = 1 << self._pos[number]
            buckets = self._buckets
            rest = buckets[old] ^ bit
            if rest:
                buckets[old] = rest
            else:
                del buckets[old]
            buckets[avail] = buckets.get(avail, 0) | bit

    def _neutral_throughput(self) -> float:
        return self._tput_sum / self._tput_count if self._tput_count else 0.0

    def _choose(self, pos: int, free: Mapping[str, int], skip: AbstractSet[str]) -> str | None:
        """The free parent that serves the piece at ``pos`` with the most free slots, then
        the best throughput (unmeasured counts as the average), then the seeded rank."""
        best: str | None = None
        best_key: tuple[int, float, float] = (0, 0.0, 0.0)
        neutral = self._neutral_throughput()
        for pid, slots in free.items():
            parent = self._parents[pid]
            if not (parent.serve_bits >> pos) & 1 or pid in skip:
                continue
            tput = neutral if parent.throughput is None else parent.throughput
            key = (slots, tput, parent.rank)
            if best is None or key > best_key:
                best, best_key = pid, key
        return best

    def _overdue(self, number: int, *, latest: bool = False) -> bool:
        """The piece's first request (or, with ``latest``, its newest) is out for longer
        than pieces take (three times the typical time, at least ``endgame_after``)."""
        if self._now is None:
            return not latest
        started = (self._latest_started if latest else self._request_started).get(number, self._now)
        return self._now - started > max(self._endgame_after, 3 * self._piece_seconds)

    def _start(self, number: int, pid: str, out: list[tuple[int, str]]) -> bool:
        """Record a request; returns True when it used the parent's last free slot (the
        union of what the free parents serve is then found again)."""
        if self._now is not None:
            if number not in self._in_flight:
                self._request_started[number] = self._now
            self._latest_started[number] = self._now
        self._dequeue(number)
        self._in_flight.setdefault(number, set()).add(pid)
        self._parents[pid].in_flight.add(number)
        self._requests += 1
        out.append((number, pid))
        return self._free.took(pid)

    def _drop_request(
        self, number: int, pid: str, parent: ParentState, *, requeue: bool = True
    ) -> None:
        requesters = self._in_flight[number]
        requesters.discard(pid)
        parent.in_flight.discard(number)
        self._requests -= 1
        self._free.refresh(pid)
        if not requesters:
            del self._in_flight[number]
            self._request_started.pop(number, None)
            self._latest_started.pop(number, None)
            if requeue:
                self._enqueue(number)

    def _complete(self, number: int) -> None:
        self._dequeue(number)
        self._have.add(number)

    def _measure(self, parent: ParentState, nbytes: int, seconds: float) -> None:
        self._piece_seconds = (
            seconds if not self._piece_seconds else 0.7 * self._piece_seconds + 0.3 * seconds
        )
        rate = nbytes / max(seconds, _MIN_SECONDS)
        if parent.throughput is None:
            parent.throughput = rate
            self._tput_count += 1
            self._tput_sum += rate
        else:
            new = _EWMA_ALPHA * rate + (1 - _EWMA_ALPHA) * parent.throughput
            self._tput_sum += new - parent.throughput
            parent.throughput = new

    def _endgame_order(self, number: int) -> tuple[int, bool, int]:
        """Fewest requests first, then the streaming window, then the seeded order."""
        cursor = self._cursor
        in_window = cursor is not None and cursor <= number < cursor + self._window
        return (len(self._in_flight[number]), not in_window, self._pos[number])

    def _check_invariants(self) -> None:
        """Recompute the incremental state from scratch and compare (for tests: O(n·parents))."""
        avail = [0] * self._n
        for pid, parent in self._parents.items():
            excluded = self._excluded.get(pid, 0)
            assert parent.serve_bits == parent.has_bits & ~excluded, pid
            for pos in range(self._n):
                if (parent.has_bits >> pos) & 1:
                    avail[self._perm[pos]] += 1
            for number in parent.in_flight:
                assert pid in self._in_flight.get(number, ()), (number, pid)
        assert avail == self._avail
        buckets: dict[int, int] = {}
        waiting_bits = 0
        for number in range(self._n):
            waiting = (
                bool(self._known[number])
                and number not in self._have
                and number not in self._in_flight
            )
            assert bool(self._waiting[number]) == waiting, number
            if waiting:
                bit = 1 << self._pos[number]
                buckets[avail[number]] = buckets.get(avail[number], 0) | bit
                waiting_bits |= bit
        assert buckets == self._buckets
        assert waiting_bits == self._waiting_bits
        requests = 0
        for number, requesters in self._in_flight.items():
            assert requesters, number
            assert number not in self._have, number
            for pid in requesters:
                assert number in self._parents[pid].in_flight, (number, pid)
            requests += len(requesters)
        assert requests == self._requests
        self._free.check()
        measured = [p.throughput for p in self._parents.values() if p.throughput is not None]
        assert len(measured) == self._tput_count
        assert abs(sum(measured) - self._tput_sum) <= 1e-6 * max(1.0, abs(self._tput_sum))
