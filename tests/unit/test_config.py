"""Config: file < environment < --set, units, and errors that name the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dragonfly.config import (
    ROLES,
    ConfigError,
    PeerConfig,
    SchedulerConfig,
    load_config,
    render_toml,
)
from dragonfly.units import format_duration, format_size, parse_duration, parse_rate, parse_size

CONF = Path(__file__).resolve().parents[2] / "conf"


@pytest.mark.parametrize("role", ROLES)
def test_conf_file_is_the_documented_defaults(role: str) -> None:
    """conf/ROLE.toml holds every key with its default; it must not drift from the schema."""
    assert (CONF / f"{role}.toml").read_text() == render_toml(role)


@pytest.mark.parametrize("role", ROLES)
def test_conf_file_loads_to_defaults(role: str) -> None:
    from dragonfly.config import default_config

    assert load_config(role, CONF / f"{role}.toml", env={}) == default_config(role)


def test_every_key_has_a_comment() -> None:
    for role in ROLES:
        lines = render_toml(role).splitlines()
        for i, line in enumerate(lines):
            if " = " in line and not line.startswith("#"):
                assert lines[i - 1].startswith("# "), f"{role}: {line} has no comment"


def test_precedence_file_env_set(tmp_path: Path) -> None:
    f = tmp_path / "peer.toml"
    f.write_text("[download]\nconcurrent_piece_count = 3\nrate_limit = '10MB/s'\n")
    cfg = load_config("peer", f, env={})
    assert isinstance(cfg, PeerConfig)
    assert cfg.download.concurrent_piece_count == 3
    assert cfg.download.rate_limit == 10_000_000
    cfg = load_config("peer", f, env={"DRAGONFLY_DOWNLOAD__CONCURRENT_PIECE_COUNT": "5"})
    assert cfg.download.concurrent_piece_count == 5
    cfg = load_config(
        "peer",
        f,
        env={"DRAGONFLY_DOWNLOAD__CONCURRENT_PIECE_COUNT": "5"},
        overrides=["download.concurrent_piece_count=7"],
    )
    assert cfg.download.concurrent_piece_count == 7


def test_seed_peer_defaults() -> None:
    cfg = load_config("seed-peer", env={})
    assert isinstance(cfg, PeerConfig) and cfg.seed.enabled
    peer = load_config("peer", env={})
    assert isinstance(peer, PeerConfig) and not peer.seed.enabled
    assert cfg.proxy.port != peer.proxy.port


def test_units_and_lists_from_text() -> None:
    cfg = load_config(
        "peer",
        env={
            "DRAGONFLY_STORAGE__DISK_QUOTA": "2GiB",
            "DRAGONFLY_STORAGE__TASK_TTL": "1h30m",
            "DRAGONFLY_SCHEDULER__ADDRESSES": "ws://a:1,ws://b:2",
            "DRAGONFLY_SEED__ENABLED": "yes",
            "DRAGONFLY_PEER": "http://127.0.0.1:1",  # not a config key: ignored
        },
        overrides=['proxy.filtered_query_params=["token", "sig"]'],
    )
    assert isinstance(cfg, PeerConfig)
    assert cfg.storage.disk_quota == 2 * 1024**3
    assert cfg.storage.task_ttl == 5400.0
    assert cfg.scheduler.addresses == ["ws://a:1", "ws://b:2"]
    assert cfg.seed.enabled is True
    assert cfg.proxy.filtered_query_params == ["token", "sig"]


def test_proxy_rules_table_list(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text(
        "[[proxy.rules]]\nregex = 'blobs/sha256'\nallow_credentials = true\n"
        "[[proxy.rules]]\nregex = '.*'\ndirect = true\n"
    )
    cfg = load_config("peer", f, env={})
    assert isinstance(cfg, PeerConfig)
    assert [(r.regex, r.direct, r.allow_credentials) for r in cfg.proxy.rules] == [
        ("blobs/sha256", False, True),
        (".*", True, False),
    ]


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        (
            "[download]\nconcurrent_piece_count = 'x'\n",
            "download.concurrent_piece_count",
            "integer",
        ),
        (
            "[download]\nconcurrent_piece_count = 0\n",
            "download.concurrent_piece_count",
            "at least 1",
        ),
        (
            "[download]\nconcurrent_piece_count = true\n",
            "download.concurrent_piece_count",
            "integer",
        ),
        ("[download]\nbogus = 1\n", "download.bogus", "unknown key"),
        ("[nosuch]\nx = 1\n", "nosuch", "unknown key"),
        ("download = 3\n", "download", "table"),
        ("[storage]\ndisk_quota = '3 parsecs'\n", "storage.disk_quota", "not a size"),
        ("[storage]\ntask_ttl = 'soon'\n", "storage.task_ttl", "not a duration"),
        ("[log]\nlevel = 'loud'\n", "log.level", "one of"),
        ("[[proxy.rules]]\nregex = '(['\n", "proxy.rules[0].regex", "regular expression"),
        ("[scheduler]\naddresses = ['http://x']\n", "scheduler.addresses[0]", "wss?"),
        ("[upload]\nport = 70000\n", "upload.port", "at most 65535"),
        (
            "[storage]\nhigh_watermark = 0.5\nlow_watermark = 0.6\n",
            "storage.low_watermark",
            "must not exceed",
        ),
    ],
)
def test_file_errors_name_file_key_and_expectation(
    tmp_path: Path, text: str, key: str, fragment: str
) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config("peer", f, env={})
    assert info.value.key == key
    assert str(f) in str(info.value)
    assert fragment in str(info.value)


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    f = tmp_path / "broken.toml"
    f.write_text("[download\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config("peer", f, env={})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config("peer", tmp_path / "absent.toml", env={})


def test_env_and_set_errors_name_their_source() -> None:
    with pytest.raises(ConfigError, match="environment DRAGONFLY_UPLOAD__RATE_LIMIT"):
        load_config("peer", env={"DRAGONFLY_UPLOAD__RATE_LIMIT": "fast"})
    with pytest.raises(ConfigError, match=r"--set: scheduling\.retry_limit"):
        load_config("scheduler", env={}, overrides=["scheduling.retry_limit=-1"])
    with pytest.raises(ConfigError, match=r"expected section\.key=value"):
        load_config("scheduler", env={}, overrides=["scheduling.retry_limit"])


def test_scheduler_config_keys() -> None:
    cfg = load_config("scheduler", env={}, overrides=["scheduling.candidate_parent_limit=6"])
    assert isinstance(cfg, SchedulerConfig)
    assert cfg.scheduling.candidate_parent_limit == 6
    assert cfg.scheduling.filter_parent_limit == 40


def test_defaults_are_not_shared_between_instances() -> None:
    a = load_config("peer", env={}, overrides=["proxy.filtered_query_params=['x']"])
    b = load_config("peer", env={})
    assert isinstance(a, PeerConfig) and isinstance(b, PeerConfig)
    assert b.proxy.filtered_query_params == []
    assert dataclasses.asdict(b)["proxy"]["rules"][0]["regex"] == "^http://"


@given(st.integers(min_value=0, max_value=2**50))
def test_size_round_trip(n: int) -> None:
    assert parse_size(format_size(n)) == n


@given(st.integers(min_value=0, max_value=10**7))
def test_duration_round_trip_ms(ms: int) -> None:
    assert parse_duration(format_duration(ms / 1000)) == pytest.approx(ms / 1000)


def test_unit_parsing() -> None:
    assert parse_size("4MiB") == 4 * 1024 * 1024
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_rate("20MB/s") == 20_000_000
    assert parse_rate("100MiB/s") == 100 * 1024 * 1024
    assert parse_duration("5m") == 300
    assert parse_duration("250ms") == 0.25
    assert parse_duration("1h30m") == 5400
    for bad in ("", "MiB", "-1", "4 XB", "1.5"):
        with pytest.raises(ValueError):
            parse_size(bad)
    for bad in ("", "5 minutes", "m5", "1h-3m"):
        with pytest.raises(ValueError):
            parse_duration(bad)
