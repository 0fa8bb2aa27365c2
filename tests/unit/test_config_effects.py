"""Settings shown by what they change, where that is a sans-I/O decision or the CLI's own
doing: the scheduler's settings, a host's children limit, the log format and level.
tests/unit/test_config_keys.py lists which test shows which key."""

from __future__ import annotations

import dataclasses
import json

import pytest

from dragonfly.cli import main
from dragonfly.config import SchedulerConfig
from dragonfly.log import get_logger
from dragonfly.sched.scheduler import SchedulerSettings
from dragonfly.wire.messages import CandidateParents
from tests.unit.sched_support import World, of, parents_of

# Each key of the scheduler's [scheduling] and [gc] tables, and the setting it becomes.
SETTINGS = {
    "scheduling.candidate_parent_limit": "candidate_parent_limit",
    "scheduling.filter_parent_limit": "filter_parent_limit",
    "scheduling.back_to_source_count": "back_to_source_count",
    "scheduling.retry_limit": "retry_limit",
    "scheduling.retry_interval": "retry_interval",
    "scheduling.rejoin_grace": "rejoin_grace",
    "gc.peer_ttl": "peer_ttl",
    "gc.task_ttl": "task_ttl",
    "gc.host_ttl": "host_ttl",
    "gc.interval": "gc_interval",
}


def test_every_scheduling_and_gc_key_becomes_its_setting() -> None:
    """The scheduler core's own tests show what each setting decides; here each key,
    away from its default, is the setting the core gets."""
    cfg = SchedulerConfig()
    tables = {"scheduling": cfg.scheduling, "gc": cfg.gc}
    keys = {f"{name}.{f.name}" for name, t in tables.items() for f in dataclasses.fields(t)}
    assert keys == set(SETTINGS), "a scheduling or gc key without its setting here"
    for key in SETTINGS:
        table, field = key.split(".")
        setattr(tables[table], field, getattr(tables[table], field) + 2)
    settings = SchedulerSettings.from_config(cfg)
    default = SchedulerSettings.from_config(SchedulerConfig())
    for key, attr in SETTINGS.items():
        table, field = key.split(".")
        assert getattr(settings, attr) == getattr(tables[table], field) != getattr(default, attr)


@pytest.mark.parametrize("limit", [1, 2])
def test_a_hosts_children_limit_caps_the_children_it_is_given(limit: int) -> None:
    """upload.children_limit reaches the scheduler as the host's upload_limit
    (tests/integration/test_config_effects.py); a host at its limit is nobody's new parent."""
    w = World()
    w.connect("seed", seed=True, upload_limit=limit)
    w.register("seed", "s1")
    w.metadata("seed", "s1")
    w.pieces("seed", "s1", [0])
    got = []
    for h in "ab":
        w.connect(h)
        got.append([parents_of(a) for a in of(w.register(h, f"p{h}"), CandidateParents, h)])
    # the second child waits for a parent when the seed has no free slot
    assert got == [[["s1"]], [["s1"]] if limit == 2 else []]


@pytest.mark.parametrize("role", ["scheduler", "manager"])
@pytest.mark.parametrize("fmt", ["json", "console"])
def test_log_format(
    fmt: str, role: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from dragonfly import nursery

    def runner(cfg: object) -> int:
        get_logger("test").warning("hello", n=1)
        return 0

    monkeypatch.setattr(nursery, "RUNNERS", {role: runner}, raising=False)
    # (a scheduler without a cluster secret starts only in insecure mode)
    insecure = ["--set", "trust.insecure=true"] if role == "scheduler" else []
    assert main(["--role", role, "--set", f"log.format={fmt}", *insecure]) == 0
    line = capsys.readouterr().err.strip().splitlines()[-1]
    if fmt == "json":
        assert json.loads(line)["event"] == "hello"
    else:
        assert "hello" in line and "n=1" in line
        with pytest.raises(ValueError):
            json.loads(line)


@pytest.mark.parametrize("role", ["scheduler", "manager"])
def test_log_level(
    role: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """At log.level = warning the role's info lines are dropped (the default, info, keeps them)."""
    from dragonfly import nursery

    def runner(cfg: object) -> int:
        log = get_logger("test")
        log.info("below the level")
        log.warning("at the level")
        return 0

    monkeypatch.setattr(nursery, "RUNNERS", {role: runner}, raising=False)
    insecure = ["--set", "trust.insecure=true"] if role == "scheduler" else []  # (no secret)
    args = ["--set", "log.level=warning", "--set", "log.format=json", *insecure]
    assert main(["--role", role, *args]) == 0
    events = [json.loads(line)["event"] for line in capsys.readouterr().err.strip().splitlines()]
    assert events == ["at the level"]
