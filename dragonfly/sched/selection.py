"""Choosing a peer's parents: which serving peers may parent it, a bounded sample of
them, and the best-scored (sans-I/O; the core decides when, core.py).

Cost per decision follows the sample, not the swarm: at most ``filter_parent_limit``
candidates are scored, drawn lazily from the task's index of serving peers.
"""

from __future__ import annotations

import heapq
from random import Random

from dragonfly.sched.evaluator import Evaluator
from dragonfly.sched.resources import WHOLE, Peer
from dragonfly.sched.settings import SchedulerSettings

__all__ = ["DRAWS_PER_CANDIDATE", "ParentFilter", "ParentSelector", "useful"]

# Bounds one decision's cost independent of the swarm's size: random draws from the
# task's serving peers per candidate wanted.
DRAWS_PER_CANDIDATE = 4


class ParentFilter:
    """Whether a serving peer may parent ``child`` in one decision: not itself, not an
    excluded or blocked one, not on its host or a bad/disconnected host or one whose
    upload slots are all promised to children, and holding some piece the child lacks.

    Parent edges may form cycles: A fetching piece 5 from B while B fetches piece 7
    from A is how a swarm uses every host's upload. A child only ever requests pieces
    its parent announced, so a cycle cannot deadlock; an acyclic parent graph, on the
    other hand, caps a swarm fed at the origin's rate to a chain (the prefix of its
    topological order must spend all its upload on the next peer).
    """

    __slots__ = ("child", "exclude")

    def __init__(self, child: Peer, exclude: set[str]) -> None:
        self.child = child
        self.exclude = exclude

    def __call__(self, c: Peer) -> bool:
        child = self.child
        if c is child or c.id in self.exclude or c.id in child.blocklist:
            return False
        h = c.host
        if h is child.host or not h.connected or h.bad or h.active_uploads >= h.info.upload_limit:
            return False  # (a host with every upload slot promised answers "busy")
        return useful(c, child)


def useful(parent: Peer, child: Peer) -> bool:
    """Whether ``parent`` holds, or is about to hold, a piece ``child`` lacks: one that
    finished, or fetches from the origin, has (or will have) every piece."""
    return parent.state in WHOLE or parent.finished.has_outside(child.finished)


class ParentSelector:
    """The parent sets of one scheduler: its settings, evaluator and seeded random
    source (the only randomness of the scheduler)."""

    def __init__(self, settings: SchedulerSettings, evaluator: Evaluator, rng: Random) -> None:
        self.settings = settings
        self.evaluator = evaluator
        self.rng = rng

    def select(
        self, peer: Peer, prefer: Peer | None, *, only_prefer: bool = False, refresh: bool = False
    ) -> list[Peer]:
        """Keep the parents that still serve, fill up with the best-scored candidates
        that hold something the peer lacks (``only_prefer``: with ``prefer`` alone, if it
        may parent this peer).  ``refresh`` (the peer is stalled or lost a parent): keep
        only parents that hold a piece the peer lacks, so that a stalled peer gets new
        ones rather than the same set again."""
        limit = self.settings.candidate_parent_limit
        sources = peer.task.sources
        keep = [
            p
            for p in peer.parents.values()
            if p in sources
            and p.id not in peer.blocklist
            and p.host.connected
            and (not refresh or useful(p, peer))
        ][:limit]
        need = limit - len(keep)
        if need <= 0:
            return keep
        accept = ParentFilter(peer, {p.id for p in keep})
        if only_prefer:
            if prefer is not None and prefer in sources and accept(prefer):
                keep.append(prefer)
            return keep
        candidates = self.candidates(peer, accept, prefer)
        score = self.evaluator.score
        best = heapq.nlargest(need, candidates, key=lambda c: score(peer, c))
        return keep + best

    def candidates(self, child: Peer, accept: ParentFilter, prefer: Peer | None) -> list[Peer]:
        """Up to filter_parent_limit serving peers of the task that may parent ``child``:
        all of them in index order when few, else a seeded random sample drawn lazily
        (a partial Fisher-Yates) with a bounded number of draws, so the cost follows
        the sample, not the swarm."""
        limit = self.settings.filter_parent_limit
        items = child.task.sources.items
        n = len(items)
        out: list[Peer] = []
        if prefer is not None and prefer in child.task.sources and accept(prefer):
            out.append(prefer)
            accept.exclude.add(prefer.id)
        if n <= limit - len(out):
            out.extend(c for c in items if accept(c))
            return out
        rng = self.rng
        swapped: dict[int, int] = {}
        draws = min(n, DRAWS_PER_CANDIDATE * limit + len(child.blocklist))
        for i in range(draws):
            j = rng.randrange(i, n)
            pick = swapped.get(j, j)
            swapped[j] = swapped.get(i, i)
            c = items[pick]
            if accept(c):
                out.append(c)
                if len(out) >= limit:
                    break
        return out
