"""Scoring a candidate parent for a child: higher is better.

Dragonfly's default rule, with the weights as attributes so a benchmark can try
another rule by subclassing or by passing different weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from dragonfly.sched.resources import Host, Peer

__all__ = ["Evaluator"]


@dataclass
class Evaluator:
    """score = load·load_quality + idc·same_idc + location·prefix_match + host_type·type.

    Load dominates so that work spreads to whoever has free upload slots; the
    topology terms only break near-ties; a seed scores lower than a normal peer
    with the same load so that peers take over serving as soon as they hold pieces.
    """

    load_weight: float = 0.6
    idc_weight: float = 0.2
    location_weight: float = 0.1
    host_type_weight: float = 0.1
    location_levels: int = 5  # prefix levels that make a full location match
    seed_host_type: float = 0.5
    normal_host_type: float = 1.0

    def score(self, child: Peer, parent: Peer) -> float:
        ch, ph = child.host, parent.host
        return (
            self.load_weight * self.load_quality(ph)
            + self.idc_weight * self.same_idc(ch, ph)
            + self.location_weight * self.location_match(ch, ph)
            + self.host_type_weight * self.host_type(ph)
        )

    @staticmethod
    def load_quality(host: Host) -> float:
        """Share of the host's upload slots not yet promised to children."""
        limit = host.info.upload_limit
        if limit <= 0:
            return 0.0
        free = 1.0 - host.active_uploads / limit
        return 0.0 if free < 0.0 else (1.0 if free > 1.0 else free)

    @staticmethod
    def same_idc(child: Host, parent: Host) -> float:
        a, b = child.info.idc, parent.info.idc
        return 1.0 if a and a == b else 0.0

    def location_match(self, child: Host, parent: Host) -> float:
        """Matching leading '|'-separated levels, over location_levels, capped at 1."""
        a, b = child.location_levels, parent.location_levels
        n = 0
        for x, y in zip(a, b, strict=False):
            if x != y:
                break
            n += 1
        return min(1.0, n / self.location_levels) if self.location_levels > 0 else 0.0

    def host_type(self, host: Host) -> float:
        return self.seed_host_type if host.seed else self.normal_host_type
