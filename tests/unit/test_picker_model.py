"""The piece picker under random event orders: every decision checked against a simple
model (a hypothesis state machine), and every run finishing once a healthy parent holds
everything."""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from dragonfly.engine.picker import PiecePicker
from tests.unit.picker_support import drain

PIECES = 8
PARENTS = ("a", "b", "c", "d")
MAX_IN_FLIGHT = 5
PER_PARENT = 2
DUPLICATES = 2
THRESHOLD = 3
ENDGAME_AFTER = 1.0  # the picker's default: no copy is overdue sooner


class PickerMachine(RuleBasedStateMachine):
    """Drives a picker with random events and checks every decision against a simple model."""

    @initialize(
        seed=st.integers(0, 2**16),
        have=st.sets(st.integers(0, PIECES - 1), max_size=3),
        known=st.sets(st.integers(0, PIECES - 1)),
        holds=st.lists(st.sets(st.integers(0, PIECES - 1), min_size=1), min_size=1, max_size=3),
    )
    def start(self, seed: int, have: set[int], known: set[int], holds: list[set[int]]) -> None:
        """Start with some parents and digests, so that short runs reach interesting states."""
        self.picker = PiecePicker(
            PIECES,
            have=have,
            max_in_flight=MAX_IN_FLIGHT,
            per_parent_limit=PER_PARENT,
            window=3,
            endgame_duplicates=DUPLICATES,
            failure_threshold=THRESHOLD,
            seed=seed,
        )
        self.have = set(have)
        self.known: set[int] = set()
        self.holds: dict[str, set[int]] = {}
        self.capacity: dict[str, int | None] = {}  # None: the limit that follows the count
        self.streak: dict[str, int] = {}
        self.excluded: set[tuple[int, str]] = set()
        self.flight: dict[int, set[str]] = {}
        self.latest: dict[int, float] = {}  # piece -> start of its newest clocked request
        self.now = 0.0
        self.digest_known(known)
        for pid, pieces in zip(PARENTS, holds, strict=False):
            self.add_parent(pid, None)
            self.parent_has(pid, pieces)

    def requests(self) -> list[tuple[int, str]]:
        return sorted((n, p) for n, ps in self.flight.items() for p in ps)

    def effective_capacity(self, pid: str) -> int:
        if self.streak[pid] >= THRESHOLD:
            return 0
        capacity = self.capacity[pid]
        if capacity is None:  # a share of MAX_IN_FLIGHT, within [PER_PARENT, 2 PER_PARENT]
            share = -(-MAX_IN_FLIGHT // len(self.capacity))
            return min(max(PER_PARENT, share), 2 * PER_PARENT)
        return capacity

    @rule(pid=st.sampled_from(PARENTS), capacity=st.none() | st.integers(0, 3))
    def add_parent(self, pid: str, capacity: int | None) -> None:
        self.picker.add_parent(pid, capacity=capacity)
        self.capacity[pid] = capacity
        self.holds.setdefault(pid, set())
        self.streak.setdefault(pid, 0)

    @rule(pid=st.sampled_from(PARENTS), pieces=st.sets(st.integers(0, PIECES - 1)))
    def parent_has(self, pid: str, pieces: set[int]) -> None:
        self.picker.parent_has(pid, sorted(pieces))
        if pid in self.holds:
            self.holds[pid] |= pieces

    @rule(pieces=st.sets(st.integers(0, PIECES - 1)))
    def digest_known(self, pieces: set[int]) -> None:
        self.picker.digest_known(pieces)
        self.known |= pieces

    @rule(cursor=st.none() | st.integers(0, PIECES))
    def set_cursor(self, cursor: int | None) -> None:
        self.picker.set_cursor(cursor)

    @rule()
    def pick(self) -> None:
        missing_before = PIECES - len(self.have)
        self.check_new(self.picker.pick(), missing_before, clocked=False)

    @rule(step=st.floats(0, 1) | st.floats(1, 40))
    def pick_later(self, step: float) -> None:
        """A pick with a clock: resting parents are left out (a cached set of free
        parents must follow rests beginning and ending)."""
        self.now += step
        missing_before = PIECES - len(self.have)
        new = self.picker.pick(self.now)
        assert not any(self.picker.resting(pid, self.now) for _, pid in new)
        self.check_new(new, missing_before, clocked=True)

    @precondition(lambda self: bool(self.flight))
    @rule(index=st.integers(0, 100))
    def cancel(self, index: int) -> None:
        number, pid = self.end_request(index)
        self.picker.on_cancelled(number, pid)

    def end_request(self, index: int) -> tuple[int, str]:
        """One of the requests in flight, taken out of the model's flight table."""
        requests = self.requests()
        number, pid = requests[index % len(requests)]
        self.flight[number].discard(pid)
        if not self.flight[number]:
            del self.flight[number]
        return number, pid

    @rule(number=st.integers(0, PIECES - 1))
    def mark_have(self, number: int) -> None:
        """A piece from elsewhere (the origin, the disk): its requests end unblamed."""
        self.picker.mark_have(number)
        self.flight.pop(number, None)
        self.have.add(number)

    @precondition(lambda self: bool(self.flight))
    @rule(index=st.integers(0, 100))
    def busy(self, index: int) -> None:
        number, pid = self.end_request(index)
        self.picker.on_busy(number, pid, self.now)

    def check_new(self, new: list[tuple[int, str]], missing_before: int, *, clocked: bool) -> None:
        before = {n: set(ps) for n, ps in self.flight.items()}
        # (a piece out of flight since has no newest request: the picker forgets it too)
        self.latest = {n: t for n, t in self.latest.items() if n in self.flight}
        latest_before = dict(self.latest)
        for number, pid in new:
            assert number not in self.have
            assert number in self.known
            assert number in self.holds.get(pid, ())
            assert (number, pid) not in self.excluded
            assert pid not in self.flight.get(number, ())
            self.flight.setdefault(number, set()).add(pid)
        duplicated = {n for n, _ in new if n in before} | {
            n for n, c in Counter(n for n, _ in new).items() if c > 1
        }
        if duplicated:  # endgame only once every missing piece is in flight
            assert len(self.flight) == missing_before
            for n in duplicated:  # past the cap only once even the newest copy is overdue
                assert len(self.flight[n]) <= DUPLICATES or (
                    clocked
                    and len(self.flight[n]) == DUPLICATES + 1
                    and len(before.get(n, ())) >= DUPLICATES
                    and self.now - latest_before.get(n, self.now) > ENDGAME_AFTER
                )
        if clocked:
            for n, _ in new:
                self.latest[n] = self.now
        load = Counter(p for _, p in self.requests())
        for pid in {p for _, p in new}:
            assert load[pid] <= self.effective_capacity(pid)
        if new:
            assert sum(load.values()) <= MAX_IN_FLIGHT

    @precondition(lambda self: bool(self.flight))
    @rule(index=st.integers(0, 100), nbytes=st.integers(0, 10**6), seconds=st.floats(0, 10))
    def succeed(self, index: int, nbytes: int, seconds: float) -> None:
        requests = self.requests()
        number, pid = requests[index % len(requests)]
        cancel = self.picker.on_success(number, pid, nbytes, seconds)
        assert sorted(cancel) == sorted((number, p) for p in self.flight[number] if p != pid)
        del self.flight[number]
        self.have.add(number)
        self.streak[pid] = 0

    @precondition(lambda self: bool(self.flight))
    @rule(index=st.integers(0, 100))
    def fail(self, index: int) -> None:
        number, pid = self.end_request(index)
        self.picker.on_failure(number, pid)
        self.excluded.add((number, pid))
        self.streak[pid] += 1

    @rule(number=st.integers(0, PIECES - 1), pid=st.sampled_from(PARENTS))
    def stale_outcome(self, number: int, pid: str) -> None:
        """Outcomes of requests no longer in flight change nothing."""
        if pid in self.flight.get(number, ()):
            return
        failures = self.picker.parent_failures(pid)
        self.picker.on_failure(number, pid)
        if number in self.have:
            assert self.picker.on_success(number, pid, 1, 1.0) == []
        assert self.picker.parent_failures(pid) == failures

    @rule(pid=st.sampled_from(PARENTS))
    def remove_parent(self, pid: str) -> None:
        requeued = self.picker.remove_parent(pid)
        assert requeued == sorted(n for n, ps in self.flight.items() if pid in ps)
        for number in requeued:
            self.flight[number].discard(pid)
            if not self.flight[number]:
                del self.flight[number]
        for table in (self.holds, self.capacity, self.streak):
            table.pop(pid, None)

    @invariant()
    def consistent(self) -> None:
        picker = self.picker
        picker._check_invariants()
        assert picker.have == self.have
        assert {n: set(ps) for n, ps in picker.in_flight.items()} == self.flight
        assert picker.missing == PIECES - len(self.have)
        assert picker.done == (len(self.have) == PIECES)
        if picker.stalled():
            assert picker.pick() == []

    def teardown(self) -> None:
        """With a healthy parent holding everything and every digest known, it finishes."""
        picker = self.picker
        picker.add_parent("good")
        picker.parent_has("good", range(PIECES))
        picker.digest_known(range(PIECES))
        drain(picker, limit=4 * PIECES)
        assert picker.done and not picker.in_flight
        picker._check_invariants()


PickerMachine.TestCase.settings = settings(
    max_examples=120,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestPickerMachine = PickerMachine.TestCase
