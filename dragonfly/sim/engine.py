"""The discrete-event loop and the bandwidth model of the swarm simulation.

Deterministic by construction: events live in a heap of ``(time, sequence, fn, arg)``
(the sequence breaks ties in the order events were scheduled), nothing reads the wall
clock, and nothing iterates a set whose order depends on string hashing.

Bandwidth model.  Every endpoint (the origin, each simulated host) has an upload
capacity and optionally a download capacity.  A transfer ("flow") of one piece from A
to B progresses at a rate recomputed whenever a flow starts or ends on A (or on B, when
B has a download cap):

* each flow gets a cap of ``B.down / (flows into B)`` (infinite without a download cap);
* A's upload is water-filled over its flows: flows capped below the equal share get
  their cap, the rest of the uplink is split equally over the others.

Without download caps this *is* max-min fairness (the uplinks are the only shared
resources, and a processor-sharing uplink is exactly its equal split).  With download
caps it is a conservative approximation of max-min fairness: a downlink is split
equally between its flows even when one of them is held back by a busy uplink, so the
simulation never moves more bytes than the links allow and may move fewer; the measured
efficiency can only err low.

Rates are recomputed lazily: starting or ending flows marks uploaders dirty, and the
loop recomputes each dirty uploader once after the event that touched it (the clock
does not move inside an event, so settling the bytes moved so far is exact).
A flow's completion is a heap event; when its rate changes a new event is pushed and
the old one is recognised as stale by its time (``Flow.due``).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["Endpoint", "EventLoop", "Flow", "Network"]

INF = math.inf


class EventLoop:
    """A heap of (time, sequence, fn, arg); ``fn(arg)`` runs at ``time``."""

    __slots__ = ("_after_event", "_heap", "_seq", "events", "now")

    def __init__(self) -> None:
        self.now = 0.0
        self.events = 0  # events run, stale flow completions included
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
        "name",
        "queue",
        "received",
        "sent",
        "slots",
        "up",
        "uploads",
    )

    def __init__(self, name: str, up: float, down: float = INF, slots: int = 1 << 30) -> None:
        if up <= 0 or down <= 0:
            raise ValueError(f"{name}: capacities must be positive")
        self.name = name
        self.up = float(up)
        self.down = float(down)
        self.slots = slots  # concurrent uploads; more wait in ``queue`` (a load limit)
        self.uploads: dict[int, Flow] = {}
        self.downloads: dict[int, Flow] = {}
        self.queue: deque[Flow] = deque()
        self.sent = 0.0  # bytes uploaded (whole and cancelled-partial flows)
        self.received = 0.0

    def __repr__(self) -> str:
        return f"<Endpoint {self.name} up={len(self.uploads)} down={len(self.downloads)}>"


class Flow:
    """One piece moving from ``src`` to ``dst``; ``on_done(flow)`` runs when it lands."""

    __slots__ = (
        "active",
        "done",
        "dst",
        "due",
        "id",
        "on_done",
        "rate",
        "remaining",
        "size",
        "src",
        "started",
        "tag",
        "updated",
    )

    def __init__(
        self,
        fid: int,
        src: Endpoint,
        dst: Endpoint,
        size: int,
        on_done: Callable[[Flow], None],
        tag: Any,
        now: float,
    ) -> None:
        self.id = fid
        self.src = src
        self.dst = dst
        self.size = size
        self.remaining = float(size)
        self.rate = 0.0
        self.updated = now
        self.started = now
        self.due = INF
        self.on_done = on_done
        self.tag = tag
        self.active = False  # moving bytes (False while queued)
        self.done = False  # landed or cancelled


class Network:
    """Flows between endpoints with the rates described in the module docstring."""

    __slots__ = ("_dirty", "_ids", "_loop", "_no_down_caps", "flows_done", "flows_cancelled")

    def __init__(self, loop: EventLoop, *, download_caps: bool) -> None:
        self._loop = loop
        self._ids = itertools.count()
        self._dirty: dict[int, Endpoint] = {}  # id(endpoint) -> endpoint, insertion-ordered
        self._no_down_caps = not download_caps
        self.flows_done = 0
        self.flows_cancelled = 0
        loop.set_after_event(self.flush)

    # -- flows ----------------------------------------------------------------------

    def start(
        self,
        src: Endpoint,
        dst: Endpoint,
        size: int,
        on_done: Callable[[Flow], None],
        tag: Any = None,
    ) -> Flow:
        """Begin moving ``size`` bytes (queued behind the uploader's load limit)."""
        now = self._loop.now
        flow = Flow(next(self._ids), src, dst, size, on_done, tag, now)
        if len(src.uploads) >= src.slots:
            src.queue.append(flow)
        else:
            self._activate(flow, now)
        return flow

    def cancel(self, flow: Flow) -> None:
        """Stop a flow (an endgame duplicate that lost the race); its bytes so far count."""
        if flow.done:
            return
        flow.done = True
        self.flows_cancelled += 1
        if not flow.active:
            flow.src.queue.remove(flow)
            return
        now = self._loop.now
        moved = flow.size - max(0.0, flow.remaining - flow.rate * (now - flow.updated))
        flow.src.sent += moved
        flow.dst.received += moved
        self._deactivate(flow)

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
        queue = src.queue
        while queue and len(src.uploads) < src.slots:
            self._activate(queue.popleft(), self._loop.now)

    def _touch(self, src: Endpoint, dst: Endpoint) -> None:
        dirty = self._dirty
        dirty[id(src)] = src
        if not self._no_down_caps and dst.down < INF:
            # dst's flow count changed: every flow into it has a new cap.
            for f in dst.downloads.values():
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

    # -- rates ----------------------------------------------------------------------

    def flush(self) -> None:
        """Recompute the rates of every dirty uploader's flows (after each event)."""
        dirty = self._dirty
        if not dirty:
            return
        now = self._loop.now
        push = self._loop.at
        complete = self._complete
        simple = self._no_down_caps
        while dirty:
            _, ep = dirty.popitem()
            flows = ep.uploads
            n = len(flows)
            if not n:
                continue
            if simple:
                share = ep.up / n
                for f in flows.values():
                    if f.rate != share:
                        _set_rate(f, share, now, push, complete)
            else:
                for f, rate in _water_fill(ep):
                    if f.rate != rate:
                        _set_rate(f, rate, now, push, complete)


def _set_rate(
    f: Flow,
    rate: float,
    now: float,
    push: Callable[[float, Callable[[Any], None], Any], None],
    complete: Callable[[Flow], None],
) -> None:
    """Settle the bytes moved at the old rate, then schedule the landing at the new one."""
    rem = f.remaining - f.rate * (now - f.updated)
    if rem < 0.0:
        rem = 0.0
    f.remaining = rem
    f.updated = now
    f.rate = rate
    due = now + rem / rate
    f.due = due
    push(due, complete, f)


def _water_fill(ep: Endpoint) -> list[tuple[Flow, float]]:
    """The uplink's capacity over its flows, each held to its downlink's equal share."""
    capped: list[tuple[float, int, Flow]] = []
    for f in ep.uploads.values():
        dst = f.dst
        capped.append((dst.down / len(dst.downloads), f.id, f))
    capped.sort()
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
