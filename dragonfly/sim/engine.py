"""The discrete-event loop and the bandwidth model of the swarm simulation.

Deterministic by construction: events live in a heap of ``(time, sequence, fn, arg)``
(the sequence breaks ties in the order events were scheduled), nothing reads the wall
clock, and nothing iterates a set whose order depends on string hashing.

Bandwidth model.  Every endpoint (the origin, each simulated host) has an upload
capacity and optionally a download capacity.  A transfer ("flow") of one piece from A
to B moves at a fair share of A's uplink and B's downlink:

* Without download caps (``UplinkNetwork``) the uplinks are the only shared resources,
  and max-min fairness is exact and simple: A's uplink is split equally between A's
  active flows (processor sharing).  Each uplink keeps a virtual clock (bytes served to
  each of its flows so far) and a heap of its flows' virtual finish tags, so a flow
  starting or ending costs O(log n) and one event in the loop's heap per uplink change.
* With download caps (``FairNetwork``) each flow gets a cap of ``B.down / (flows into
  B)`` and A's uplink is water-filled over its flows under those caps.  That is a
  conservative approximation of max-min fairness: a downlink is split equally between
  its flows even when one of them is held back by a busy uplink, so the simulation
  never moves more bytes than the links allow and may move fewer (the measured
  efficiency can only err low).  Rates are recomputed for the uplinks a change touches
  (the uplink itself, and every uplink feeding B when B's flow count changed).

Either way an uplink also has a number of upload slots (the peer's concurrent upload
limit): flows beyond it wait in a FIFO queue without moving, as requests wait for the
real upload server's capacity limiter.

Both recompute lazily: starting or ending flows marks uplinks dirty and the loop
recomputes each dirty uplink once after the event that touched it (the clock does not
move inside an event, so settling what moved so far is exact).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = [
    "INF",
    "Endpoint",
    "EventLoop",
    "FairNetwork",
    "Flow",
    "Network",
    "UplinkNetwork",
    "make_network",
]

INF = math.inf
_TAG_SLACK = 1e-3  # bytes: virtual finish tags this close to the clock count as reached


class EventLoop:
    """A heap of (time, sequence, fn, arg); ``fn(arg)`` runs at ``time``."""

    __slots__ = ("_after_event", "_heap", "_seq", "events", "now")

    def __init__(self) -> None:
        self.now = 0.0
        self.events = 0  # events run, stale completions included
        self._heap: list[tuple[float, int, Callable[[Any], None], Any]] = []
        self._seq = itertools.count()
        self._after_event: Callable[[], None] | None = None

    def at(self, time: float, fn: Callable[[Any], None], arg: Any = None) -> None:
        """Run ``fn(arg)`` at ``time`` (never earlier than now)."""
        if time < self.now:
            time = self.now
        heapq.heappush(self._heap, (time, next(self._seq), fn, arg))

    def after(self, delay: float, fn: Callable[[Any], None], arg: Any = None) -> None:
        heapq.heappush(self._heap, (self.now + delay, next(self._seq), fn, arg))

    def set_after_event(self, hook: Callable[[], None] | None) -> None:
        """A function run after every event (the network's rate recomputation)."""
        self._after_event = hook

    def run(self, until: float, stop: Callable[[], bool]) -> None:
        """Run events in order until ``stop()`` holds, the heap is empty, or the next
        event lies beyond ``until``."""
        heap = self._heap
        pop = heapq.heappop
        hook = self._after_event
        events = self.events
        if hook is not None:
            hook()  # changes made before the loop started (flows started at setup)
        try:
            while heap and not stop():
                if heap[0][0] > until:
                    break
                time, _, fn, arg = pop(heap)
                self.now = time
                events += 1
                fn(arg)
                if hook is not None:
                    hook()
        finally:
            self.events = events

    def __len__(self) -> int:
        return len(self._heap)


class Endpoint:
    """One node's links: capacities in bytes/s, its active flows, its upload queue."""

    __slots__ = (
        "down",
        "downloads",
        "due",
        "name",
        "queue",
        "received",
        "sent",
        "slots",
        "tags",
        "up",
        "uploads",
        "vt",
        "vt_time",
    )

    def __init__(self, name: str, up: float, down: float = INF, slots: int = 1 << 30) -> None:
        if not up > 0 or not down > 0:
            raise ValueError(f"{name}: capacities must be positive")
        self.name = name
        self.up = float(up)
        self.down = float(down)
        self.slots = slots  # concurrent uploads; more wait in ``queue``
        self.uploads: dict[int, Flow] = {}
        self.downloads: dict[int, Flow] = {}
        self.queue: deque[Flow] = deque()
        self.sent = 0.0  # bytes uploaded (landed flows and cancelled ones' partial bytes)
        self.received = 0.0
        # UplinkNetwork: bytes served to each active flow since the uplink was last idle,
        # as of vt_time; the flows' finish tags; when the first of them lands.
        self.vt = 0.0
        self.vt_time = 0.0
        self.tags: list[tuple[float, int, Flow]] = []
        self.due = INF

    def __repr__(self) -> str:
        return f"<Endpoint {self.name} up={len(self.uploads)} down={len(self.downloads)}>"


class Flow:
    """One piece moving from ``src`` to ``dst``; ``on_done(flow)`` runs when it lands."""

    __slots__ = (
        "active",
        "data",
        "done",
        "dst",
        "due",
        "finish",
        "id",
        "on_done",
        "rate",
        "remaining",
        "size",
        "src",
        "started",
        "updated",
    )

    def __init__(
        self,
        fid: int,
        src: Endpoint,
        dst: Endpoint,
        size: int,
        on_done: Callable[[Flow], None],
        data: Any,
        now: float,
    ) -> None:
        self.id = fid
        self.src = src
        self.dst = dst
        self.size = size
        self.on_done = on_done
        self.data = data  # the caller's
        self.started = now  # when it was asked for (queueing included)
        self.active = False  # moving bytes (False while queued)
        self.done = False  # landed or cancelled
        # FairNetwork: bytes left as of ``updated``, at ``rate``, landing at ``due``.
        self.remaining = float(size)
        self.rate = 0.0
        self.updated = now
        self.due = INF
        # UplinkNetwork: the uplink's virtual clock reading at which it lands.
        self.finish = 0.0


class Network:
    """Flows between endpoints: the queueing common to both models."""

    __slots__ = ("_dirty", "_ids", "_loop", "flows_cancelled", "flows_done")

    def __init__(self, loop: EventLoop) -> None:
        self._loop = loop
        self._ids = itertools.count()
        self._dirty: dict[int, Endpoint] = {}  # id(endpoint) -> endpoint, insertion-ordered
        self.flows_done = 0
        self.flows_cancelled = 0
        loop.set_after_event(self.flush)

    def start(
        self,
        src: Endpoint,
        dst: Endpoint,
        size: int,
        on_done: Callable[[Flow], None],
        data: Any = None,
        *,
        urgent: bool = False,
    ) -> Flow:
        """Begin moving ``size`` bytes (queued behind the uploader's slots; ``urgent``:
        at the head of the queue)."""
        now = self._loop.now
        flow = Flow(next(self._ids), src, dst, size, on_done, data, now)
        if len(src.uploads) >= src.slots:
            if urgent:
                src.queue.appendleft(flow)
            else:
                src.queue.append(flow)
        else:
            self._activate(flow, now)
        return flow

    def cancel(self, flow: Flow) -> float:
        """Stop a flow (a lost endgame race, a timeout); returns the bytes it had moved,
        which count as sent and received."""
        if flow.done:
            return 0.0
        flow.done = True
        self.flows_cancelled += 1
        if not flow.active:
            flow.src.queue.remove(flow)
            return 0.0
        moved = self.moved(flow)
        flow.src.sent += moved
        flow.dst.received += moved
        self._deactivate(flow)
        return moved

    def moved(self, flow: Flow) -> float:
        """Bytes the flow has moved so far."""
        raise NotImplementedError

    def flush(self) -> None:
        """Recompute what the last event changed (run by the loop after every event)."""
        raise NotImplementedError

    def _activate(self, flow: Flow, now: float) -> None:
        raise NotImplementedError

    def _deactivate(self, flow: Flow) -> None:
        raise NotImplementedError

    def _dequeue(self, src: Endpoint) -> None:
        queue = src.queue
        while queue and len(src.uploads) < src.slots:
            self._activate(queue.popleft(), self._loop.now)


class UplinkNetwork(Network):
    """Exact max-min fairness when only uplinks are shared: processor sharing per uplink."""

    __slots__ = ()

    @staticmethod
    def _settle(ep: Endpoint, now: float) -> None:
        n = len(ep.uploads)
        if n:
            ep.vt += ep.up / n * (now - ep.vt_time)
        ep.vt_time = now

    def moved(self, flow: Flow) -> float:
        if not flow.active:
            return 0.0
        src = flow.src
        vt = src.vt + src.up / len(src.uploads) * (self._loop.now - src.vt_time)
        left = flow.finish - vt
        return flow.size - (left if left > 0.0 else 0.0)

    def _activate(self, flow: Flow, now: float) -> None:
        src = flow.src
        self._settle(src, now)
        flow.active = True
        flow.finish = src.vt + flow.size
        heapq.heappush(src.tags, (flow.finish, flow.id, flow))
        src.uploads[flow.id] = flow
        flow.dst.downloads[flow.id] = flow
        self._dirty[id(src)] = src

    def _deactivate(self, flow: Flow) -> None:
        src = flow.src
        self._settle(src, self._loop.now)
        flow.active = False
        del src.uploads[flow.id]
        del flow.dst.downloads[flow.id]
        self._dirty[id(src)] = src
        self._dequeue(src)

    def _due(self, src: Endpoint) -> None:
        """Heap callback: the uplink's first flow lands now (unless the event is stale)."""
        now = self._loop.now
        if src.due != now:
            return
        src.due = INF
        self._settle(src, now)
        tags = src.tags
        reached = src.vt + _TAG_SLACK
        landed: list[Flow] = []
        while tags and (tags[0][2].done or tags[0][0] <= reached):
            flow = heapq.heappop(tags)[2]
            if not flow.done:
                landed.append(flow)
        for flow in landed:
            flow.done = True
            flow.active = False
            del src.uploads[flow.id]
            del flow.dst.downloads[flow.id]
            src.sent += flow.size
            flow.dst.received += flow.size
        self.flows_done += len(landed)
        self._dirty[id(src)] = src
        self._dequeue(src)
        for flow in landed:
            flow.on_done(flow)

    def flush(self) -> None:
        dirty = self._dirty
        if not dirty:
            return
        now = self._loop.now
        at = self._loop.at
        due_cb = self._due
        while dirty:
            _, ep = dirty.popitem()
            tags = ep.tags
            while tags and tags[0][2].done:
                heapq.heappop(tags)
            n = len(ep.uploads)
            if not n:
                ep.vt = 0.0  # idle: restart the virtual clock (keeps the numbers small)
                ep.vt_time = now
                tags.clear()
                ep.due = INF
                continue
            due = now + (tags[0][0] - ep.vt) * n / ep.up
            if due < now:
                due = now
            if due != ep.due:
                ep.due = due
                at(due, due_cb, ep)


class FairNetwork(Network):
    """Download caps too: per-flow rates, water-filled per uplink (see module doc)."""

    __slots__ = ()

    def moved(self, flow: Flow) -> float:
        if not flow.active:
            return 0.0
        left = flow.remaining - flow.rate * (self._loop.now - flow.updated)
        return flow.size - (left if left > 0.0 else 0.0)

    def _activate(self, flow: Flow, now: float) -> None:
        flow.active = True
        flow.updated = now
        src, dst = flow.src, flow.dst
        src.uploads[flow.id] = flow
        dst.downloads[flow.id] = flow
        self._touch(src, dst)

    def _deactivate(self, flow: Flow) -> None:
        flow.active = False
        src, dst = flow.src, flow.dst
        del src.uploads[flow.id]
        del dst.downloads[flow.id]
        self._touch(src, dst)
        self._dequeue(src)

    def _touch(self, src: Endpoint, dst: Endpoint) -> None:
        dirty = self._dirty
        dirty[id(src)] = src
        if dst.down < INF:
            for f in dst.downloads.values():  # dst's flow count changed: new caps
                dirty[id(f.src)] = f.src

    def _complete(self, flow: Flow) -> None:
        """Heap callback: the flow's bytes are all there, unless the event is stale."""
        if flow.done or flow.due != self._loop.now:
            return
        flow.done = True
        flow.remaining = 0.0
        flow.src.sent += flow.size
        flow.dst.received += flow.size
        self.flows_done += 1
        self._deactivate(flow)
        flow.on_done(flow)

    def flush(self) -> None:
        dirty = self._dirty
        if not dirty:
            return
        now = self._loop.now
        at = self._loop.at
        complete = self._complete
        while dirty:
            _, ep = dirty.popitem()
            if not ep.uploads:
                continue
            for f, rate in _water_fill(ep):
                if f.rate == rate:
                    continue
                left = f.remaining - f.rate * (now - f.updated)
                f.remaining = left if left > 0.0 else 0.0
                f.updated = now
                f.rate = rate
                f.due = now + f.remaining / rate
                at(f.due, complete, f)


def _water_fill(ep: Endpoint) -> list[tuple[Flow, float]]:
    """The uplink's capacity over its flows, each held to its downlink's equal share."""
    capped = sorted((f.dst.down / len(f.dst.downloads), f.id, f) for f in ep.uploads.values())
    left = ep.up
    k = len(capped)
    out: list[tuple[Flow, float]] = []
    for i, (cap, _, f) in enumerate(capped):
        share = left / (k - i)
        if cap < share:
            out.append((f, cap))
            left -= cap
        else:
            out.extend((g, share) for _, _, g in capped[i:])
            break
    return out


def make_network(loop: EventLoop, *, download_caps: bool) -> Network:
    """The exact uplink-only model unless some endpoint has a download cap."""
    return FairNetwork(loop) if download_caps else UplinkNetwork(loop)
