"""A cluster's block lists, applied (sans-I/O): which downloads its peers, seed peers and
schedulers refuse, by the task's application, tag and URL and the request's priority.

The manager sends them (`ClusterConfig.peer_block` for peers, `seed_peer_block` for
seed peers); a refused download names the rule that refused it, so a client (the
proxy's 403, `dragonfly get`) can tell which list to look at. A URL rule is a regular
expression searched in the URL; one that does not compile is skipped (the manager
checks them before it stores them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from dragonfly.wire.messages import BlockRules, ClusterConfig, TaskSpec

PRIORITY_HEADER = "x-dragonfly-priority"  # Dragonfly's download priority, 0 to 6
PRIORITY_MAX = 6


class BadPriority(ValueError):
    pass


def parse_priority(value: str | None) -> int:
    """The priority a request names (X-Dragonfly-Priority); 0 when it names none."""
    if value is None or not value.strip():
        return 0
    text = value.strip()
    if not text.isdigit() or int(text) > PRIORITY_MAX:
        raise BadPriority(f"X-Dragonfly-Priority: expected 0 to {PRIORITY_MAX}, got {text[:16]!r}")
    return int(text)


@dataclass(frozen=True)
class BlockList:
    cluster_id: int = 0
    applications: frozenset[str] = frozenset()
    tags: frozenset[str] = frozenset()
    urls: tuple[re.Pattern[str], ...] = ()
    priorities: frozenset[int] = frozenset()
    empty: bool = field(init=False)

    def __post_init__(self) -> None:
        empty = not (self.applications or self.tags or self.urls or self.priorities)
        object.__setattr__(self, "empty", empty)

    @classmethod
    def of(cls, rules: BlockRules, cluster_id: int = 0) -> BlockList:
        compiled = []
        for pattern in rules.urls:
            try:
                compiled.append(re.compile(pattern))
            except re.error:
                continue
        return cls(
            cluster_id=cluster_id,
            applications=frozenset(rules.applications),
            tags=frozenset(rules.tags),
            urls=tuple(compiled),
            priorities=frozenset(rules.priorities),
        )

    @classmethod
    def for_role(cls, config: ClusterConfig | None, *, seed: bool) -> BlockList:
        """The list a peer (or, `seed`, a seed peer) of the cluster applies."""
        if config is None:
            return cls()
        return cls.of(config.seed_peer_block if seed else config.peer_block, config.cluster_id)

    def refusal(self, spec: TaskSpec, priority: int = 0) -> str | None:
        """Why the cluster refuses this download (naming the rule), or None."""
        if self.empty:
            return None
        if spec.application and spec.application in self.applications:
            rule = f"application {spec.application!r}"
        elif spec.tag and spec.tag in self.tags:
            rule = f"tag {spec.tag!r}"
        elif priority in self.priorities:
            rule = f"priority {priority}"
        else:
            pattern = next((p for p in self.urls if p.search(spec.url)), None)
            if pattern is None:
                return None
            rule = f"URL regex {pattern.pattern!r}"
        where = f"cluster {self.cluster_id}" if self.cluster_id else "the cluster"
        return f"blocked by {where}'s block list: {rule}"


def refused(
    block: BlockList, spec: TaskSpec, priority_header: str | None
) -> tuple[int, str] | None:
    """What a peer answers a client's download that the cluster refuses: (400, why) for a
    bad X-Dragonfly-Priority, (403, the rule) for a blocked one; None to go ahead."""
    try:
        priority = parse_priority(priority_header)
    except BadPriority as exc:
        return 400, str(exc)
    reason = block.refusal(spec, priority)
    return None if reason is None else (403, f"dragonfly: {reason}")
