"""A cluster's block lists (dragonfly/blocklist.py): each kind of rule refuses what it
names and says which rule it was; nothing else is refused; X-Dragonfly-Priority is
0 to 6 or a 400."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dragonfly.blocklist import BlockList, parse_priority, refused
from dragonfly.wire.messages import BlockRules, ClusterConfig, TaskSpec

RULES = BlockRules(
    applications=["batch"], urls=[r"^http://internal\.", "("], tags=["nightly"], priorities=[1]
)
BLOCK = BlockList.of(RULES, cluster_id=7)


def spec(url: str = "http://origin/f.bin", application: str = "", tag: str = "") -> TaskSpec:
    return TaskSpec(url=url, application=application, tag=tag)


def test_each_rule_refuses_and_names_itself() -> None:
    cases = {
        "application 'batch'": (spec(application="batch"), 0),
        "tag 'nightly'": (spec(tag="nightly"), 0),
        "URL regex '^http://internal\\\\.'": (spec("http://internal.example/x"), 0),
        "priority 1": (spec(), 1),
    }
    for rule, (task, priority) in cases.items():
        assert BLOCK.refusal(task, priority) == f"blocked by cluster 7's block list: {rule}"
    assert BLOCK.refusal(spec(application="interactive", tag="daily"), 0) is None
    assert BLOCK.refusal(spec("http://origin/internal.bin"), 6) is None  # searched, anchored
    assert len(BLOCK.urls) == 1  # the regex that does not compile is skipped


@given(
    url=st.from_regex(r"http://[a-h]{1,8}/[a-z]{0,8}", fullmatch=True),
    application=st.text(alphabet="abcxyz", max_size=6),
    tag=st.text(alphabet="abcxyz", max_size=6),
    priority=st.integers(min_value=0, max_value=6),
)
def test_nothing_else_is_refused_and_an_empty_list_refuses_nothing(
    url: str, application: str, tag: str, priority: int
) -> None:
    task = spec(url, application, tag)
    assert BlockList().refusal(task, priority) is None
    assert BlockList().empty and not BLOCK.empty
    expected = application == "batch" or tag == "nightly" or priority == 1
    assert (BLOCK.refusal(task, priority) is not None) == expected


def test_peers_and_seed_peers_have_their_own_lists() -> None:
    config = ClusterConfig(
        cluster_id=3,
        candidate_parent_limit=3,
        filter_parent_limit=15,
        peer_load_limit=200,
        seed_peer_load_limit=2000,
        peer_block=BlockRules(tags=["p"]),
        seed_peer_block=BlockRules(tags=["s"]),
    )
    peer, seed = BlockList.for_role(config, seed=False), BlockList.for_role(config, seed=True)
    assert peer.refusal(spec(tag="p")) and not peer.refusal(spec(tag="s"))
    assert seed.refusal(spec(tag="s")) and not seed.refusal(spec(tag="p"))
    assert BlockList.for_role(None, seed=False).empty


@pytest.mark.parametrize(
    ("header", "answer"),
    [
        (None, None),
        ("0", None),
        ("1", (403, "dragonfly: blocked by cluster 7's block list: priority 1")),
        ("7", (400, "X-Dragonfly-Priority: expected 0 to 6, got '7'")),
        ("-1", (400, "X-Dragonfly-Priority: expected 0 to 6, got '-1'")),
        ("high", (400, "X-Dragonfly-Priority: expected 0 to 6, got 'high'")),
    ],
)
def test_priority_header(header: str | None, answer: tuple[int, str] | None) -> None:
    assert refused(BLOCK, spec(), header) == answer
    if answer is None:
        assert parse_priority(header) in (0, int(header or 0))
