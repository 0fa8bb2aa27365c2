"""Whether a parent takes a piece request or answers "busy" at once.

Sans-I/O: the peer's upload server (dragonfly/peer/upload.py) and the simulation
(dragonfly/sim/swarm.py) ask the same ``Admission`` with the same rule.

A parent sends ``slots`` pieces at once, few, so that each lands soon and is passed on;
up to ``queue_limit`` more requests wait for a slot. Beyond that it answers "busy" and
the child asks another parent meanwhile, rather than queue behind pieces already moving.
Two kinds of request are taken anyway:

* a held-back piece's first copy (dragonfly/engine/announce.py): the swarm needs it;
* a request from the only child asking, while fewer than ``slots + queue_limit`` of its
  requests wait: nobody else waits behind them. With the picker's limit that follows
  the number of parents (dragonfly/engine/picker_parents.py), a single downloader of a
  file that one or two hosts hold keeps a parent's next pieces waiting at it while
  others are sent, each request's round trip off the transfer's path, however small
  the parent's queue is configured: the limits follow demand.

"Only child" means: no other child holds a request here now, and none was answered
"busy" within ``memory`` seconds (a child turned away rests up to 2 s, and must find the
queue short when it asks again rather than still filled by the first child's extras;
those extras are at most ``slots`` pieces' worth of waiting). A requester the parent
cannot name (``None``: no ticket) is never the only child.
"""

from __future__ import annotations

__all__ = ["REFUSED_MEMORY", "Admission"]

REFUSED_MEMORY = 2.5  # seconds a refused child counts as present (its rest: <= 2 s)


class Admission:
    """One parent's admission rule over all its tasks."""

    __slots__ = ("_memory", "_refused", "queue_limit", "slots", "sole_queue")

    def __init__(self, *, slots: int, queue_limit: int, memory: float = REFUSED_MEMORY) -> None:
        self.slots = slots
        self.queue_limit = queue_limit
        self.sole_queue = slots + queue_limit  # requests the only child may keep waiting
        self._memory = memory
        self._refused: dict[str, float] = {}  # child -> when it was last answered busy

    def refuses(
        self,
        child: str | None,
        *,
        active: int,
        waiting: int,
        others: bool,
        first: bool,
        now: float,
    ) -> bool:
        """True: answer "busy" now. ``active``: pieces being sent; ``waiting``: requests
        waiting for a slot; ``others``: a child other than ``child`` holds one of those;
        ``first``: the request is for a held-back piece's first copy."""
        if first or active < self.slots or waiting < self.queue_limit:
            return False
        refused = self._refused
        while refused:  # oldest first: forget children refused more than ``memory`` ago
            name, at = next(iter(refused.items()))
            if now - at <= self._memory:
                break
            del refused[name]
        if child is None:
            return True
        if waiting < self.sole_queue and not others and refused.keys() <= {child}:
            return False
        refused.pop(child, None)
        refused[child] = now  # (kept in order of the last refusal)
        return True
