"""Config: file < environment < --set, units, and errors that name the key."""

from __future__ import annotations

import dataclasses
import tempfile
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
    load_config_sources,
    render_effective,
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


@pytest.mark.parametrize("role", ["peer", "seed-peer", "scheduler", "manager"])
def test_mutating_one_config_in_place_leaves_others_alone(role: str) -> None:
    """Defaults are deep-copied: lists, rules and sections are never shared."""
    a, b = load_config(role, env={}), load_config(role, env={})
    for x, y in zip(dataclasses.fields(a), dataclasses.fields(b), strict=True):
        if dataclasses.is_dataclass(getattr(a, x.name)):
            assert getattr(a, x.name) is not getattr(b, y.name)
    if isinstance(a, PeerConfig) and isinstance(b, PeerConfig):
        assert a.scheduler.addresses is not b.scheduler.addresses
        a.scheduler.addresses.append("ws://other:1")
        a.proxy.filtered_query_params.append("token")
        a.proxy.rules[0].direct = True
        a.proxy.rules.append(a.proxy.rules[0])
        assert b.scheduler.addresses == ["ws://127.0.0.1:8002"]
        assert b.proxy.filtered_query_params == []
        assert len(b.proxy.rules) == 1 and b.proxy.rules[0].direct is False
        assert load_config(role, env={}) == b


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[storage]\ntask_ttl = nan\n", "storage.task_ttl"),
        ("[storage]\ntask_ttl = inf\n", "storage.task_ttl"),
        ("[storage]\ntask_ttl = -inf\n", "storage.task_ttl"),
        ("[storage]\ntask_ttl = 1e999\n", "storage.task_ttl"),
        ("[storage]\ntask_ttl = " + "9" * 400 + "\n", "storage.task_ttl"),
        ("[storage]\ndisk_quota = inf\n", "storage.disk_quota"),
        ("[storage]\ndisk_quota = nan\n", "storage.disk_quota"),
        ("[upload]\nrate_limit = inf\n", "upload.rate_limit"),
        ("[storage]\nhigh_watermark = nan\n", "storage.high_watermark"),
        ("[storage]\nlow_watermark = nan\n", "storage.low_watermark"),
        ("[download]\nconcurrent_piece_count = inf\n", "download.concurrent_piece_count"),
    ],
)
def test_file_non_finite_numbers_are_config_errors(tmp_path: Path, text: str, key: str) -> None:
    """int(inf) used to raise OverflowError, and nan passed every min/max check."""
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config("peer", f, env={})
    assert info.value.key == key and str(f) in str(info.value)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("download.piece_timeout", "nan"),
        ("download.piece_timeout", "inf"),
        ("download.piece_timeout", "-Infinity"),
        ("download.piece_timeout", "1e999"),
        ("storage.task_ttl", "NaN"),
        ("storage.high_watermark", "nan"),
        ("storage.high_watermark", "inf"),
        ("storage.low_watermark", "nan"),
        ("storage.disk_quota", "inf"),
        ("upload.rate_limit", "nan"),
        ("download.concurrent_piece_count", "nan"),
    ],
)
def test_text_non_finite_numbers_are_config_errors(key: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config("peer", env={}, overrides=[f"{key}={value}"])
    assert info.value.key == key and info.value.source == "--set"
    env_name = "DRAGONFLY_" + key.upper().replace(".", "__")
    with pytest.raises(ConfigError) as info:
        load_config("peer", env={env_name: value})
    assert info.value.key == key and info.value.source == f"environment {env_name}"
    with pytest.raises(ConfigError) as info:
        load_config(
            "peer", env={}, overrides=[f"{key.split('.')[0]}={{{key.split('.')[1]} = nan}}"]
        )
    assert info.value.key == key


@pytest.mark.parametrize(
    "key",
    ["storage.disk_quota", "upload.rate_limit", "storage.task_ttl", "storage.high_watermark"],
)
def test_absurdly_long_numbers_are_config_errors(key: str) -> None:
    for value in ("1" * 5000, "0." + "0" * 5000 + "1", "1" * 5000 + "s"):
        with pytest.raises(ConfigError) as info:
            load_config("peer", env={}, overrides=[f"{key}={value}"])
        assert info.value.key == key
        assert len(str(info.value)) < 300, "the value is shortened in the message"


def test_absurdly_long_integers_are_config_errors(tmp_path: Path) -> None:
    """tomllib's int() raises a plain ValueError past 4300 digits; it must not escape."""
    f = tmp_path / "huge.toml"
    f.write_text("[storage]\ndisk_quota = " + "1" * 5000 + "\n")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_config("peer", f, env={})
    assert str(f) in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config("peer", env={}, overrides=["download.concurrent_piece_count=" + "1" * 5000])
    assert info.value.key == "download.concurrent_piece_count"
    with pytest.raises(ConfigError) as info:
        load_config("peer", env={}, overrides=["storage={disk_quota = " + "1" * 5000 + "}"])
    assert info.value.key == "storage"
    cfg = load_config("peer", env={}, overrides=["proxy.filtered_query_params=" + "1" * 5000])
    assert isinstance(cfg, PeerConfig) and cfg.proxy.filtered_query_params == ["1" * 5000]


def test_env_sections_of_other_roles_are_ignored() -> None:
    """One environment often serves several roles on a host."""
    shared = {
        "DRAGONFLY_STORAGE__FSYNC": "false",  # peer only
        "DRAGONFLY_SCHEDULER__ADDRESSES": "ws://s:1",  # peer only
        "DRAGONFLY_SCHEDULING__RETRY_LIMIT": "7",  # scheduler only
        "DRAGONFLY_DATABASE__PATH": "/db",  # manager only
        "DRAGONFLY_NOSUCH__THING": "x",  # no role
        "DRAGONFLY_SERVER__PORT": "9000",  # scheduler and manager
        "DRAGONFLY_LOG__LEVEL": "debug",  # every role
    }
    sched = load_config("scheduler", env=shared)
    assert isinstance(sched, SchedulerConfig)
    assert (sched.scheduling.retry_limit, sched.server.port) == (7, 9000)
    peer = load_config("peer", env=shared)
    assert isinstance(peer, PeerConfig)
    assert peer.storage.fsync is False and peer.scheduler.addresses == ["ws://s:1"]
    manager = load_config("manager", env=shared)
    assert manager.log.level == "debug" and manager.server.port == 9000
    # [manager] is a scheduler section (the manager it registers with), not a role's name.
    sched = load_config("scheduler", env={"DRAGONFLY_MANAGER__ADDRESS": "http://m:8080"})
    assert isinstance(sched, SchedulerConfig) and sched.manager.address == "http://m:8080"
    assert load_config("peer", env={"DRAGONFLY_MANAGER__ADDRESS": "x"}) == load_config(
        "peer", env={}
    )


def test_env_unknown_key_in_a_known_section_is_an_error() -> None:
    with pytest.raises(ConfigError, match="environment DRAGONFLY_STORAGE__FSINC") as info:
        load_config("peer", env={"DRAGONFLY_STORAGE__FSINC": "false"})
    assert info.value.key == "storage.fsinc" and "unknown key" in str(info.value)
    with pytest.raises(ConfigError, match="unknown key"):
        load_config("scheduler", env={"DRAGONFLY_SERVER__PROT": "1"})


def test_set_stays_strict_about_sections() -> None:
    with pytest.raises(ConfigError, match=r"--set: storage: unknown key"):
        load_config("scheduler", env={}, overrides=["storage.fsync=false"])


@pytest.mark.parametrize(
    ("file_text", "env", "overrides", "source", "key"),
    [
        # The file set both: the file is named, as before.
        ("high_watermark = 0.5\nlow_watermark = 0.6\n", {}, [], "FILE", "storage.low_watermark"),
        # The file was fine; the environment or --set made it wrong.
        (
            "high_watermark = 0.7\n",
            {"DRAGONFLY_STORAGE__LOW_WATERMARK": "0.75"},
            [],
            "environment DRAGONFLY_STORAGE__LOW_WATERMARK",
            "storage.low_watermark",
        ),
        (
            "high_watermark = 0.7\n",
            {},
            ["storage.low_watermark=0.75"],
            "--set",
            "storage.low_watermark",
        ),
        ("", {}, ["storage.low_watermark=0.95"], "--set", "storage.low_watermark"),
        ("", {}, ["storage.high_watermark=0.5"], "--set", "storage.high_watermark"),
        (
            "low_watermark = 0.5\n",
            {},
            ["storage={high_watermark = 0.4}"],
            "--set",
            "storage.high_watermark",
        ),
        (
            "low_watermark = 0.5\n",
            {"DRAGONFLY_STORAGE__HIGH_WATERMARK": "0.4"},
            [],
            "environment DRAGONFLY_STORAGE__HIGH_WATERMARK",
            "storage.high_watermark",
        ),
        # --set lowered high_watermark last, even though the environment set low_watermark.
        (
            "",
            {"DRAGONFLY_STORAGE__LOW_WATERMARK": "0.5"},
            ["storage.high_watermark=0.4"],
            "--set",
            "storage.high_watermark",
        ),
    ],
)
def test_cross_field_error_names_the_source_that_made_it_wrong(
    tmp_path: Path,
    file_text: str,
    env: dict[str, str],
    overrides: list[str],
    source: str,
    key: str,
) -> None:
    f = tmp_path / "peer.toml"
    f.write_text("[storage]\n" + file_text)
    with pytest.raises(ConfigError) as info:
        load_config("peer", f, env=env, overrides=overrides)
    expected = str(f) if source == "FILE" else source
    assert (info.value.source, info.value.key) == (expected, key)
    assert str(info.value).startswith(f"{expected}: {key}: must not")


@given(st.integers(min_value=0, max_value=2**50))
def test_size_round_trip(n: int) -> None:
    assert parse_size(format_size(n)) == n


@given(st.integers(min_value=0, max_value=10**7))
def test_duration_round_trip_ms(ms: int) -> None:
    assert parse_duration(format_duration(ms / 1000)) == pytest.approx(ms / 1000)


@given(st.floats(min_value=0, max_value=1e12, allow_nan=False))
def test_any_duration_is_written_so_that_it_reads_back(seconds: float) -> None:
    """`config check` and the cluster's node files write durations back as TOML: every
    value a config accepts must read back as itself (1e-06 was written '1e-06s')."""
    cfg, sources = load_config_sources(
        "scheduler", env={}, overrides=[f"scheduling.retry_interval={seconds!r}"]
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scheduler.toml"
        path.write_text(render_effective("scheduler", cfg, sources))
        assert load_config("scheduler", path, env={}) == cfg


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


def test_unit_parsing_refuses_non_finite_and_absurd_numbers() -> None:
    for bad in ("nan", "NaN", "inf", "-inf", "Infinity", "1e999", "1e400s", "1" * 400 + "d"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    for bad in ("nan", "inf", "1e999", "nanMiB", "infGB"):
        with pytest.raises(ValueError):
            parse_size(bad)
        with pytest.raises(ValueError):
            parse_rate(bad + "/s")
    huge = "1" * 5000
    for parse in (parse_size, parse_rate, parse_duration):
        for bad in (huge, huge + "MiB", huge + "/s", "0." + "0" * 5000 + "1", huge + "ms"):
            with pytest.raises(ValueError) as info:
                parse(bad)
            assert len(str(info.value)) < 200
    # Still exact near the limit, where a float would round.
    assert parse_size("9007199254740993") == 2**53 + 1
    assert parse_size("1" * 30) == int("1" * 30)
    assert parse_duration("1" * 30 + "ms") == pytest.approx(float("1" * 27))
