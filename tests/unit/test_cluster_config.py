"""How `cluster --config [ROLE:]FILE --set [ROLE:]KEY=VALUE` reach the cluster's roles, and
the errors that stop a cluster before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from dragonfly.cli import EXIT_USAGE, main
from dragonfly.cluster import Cluster, RoleSettings, role_settings, split_role
from dragonfly.config import ConfigError

ROLES = ["scheduler", "seed-peer", "peer"]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("peer:download.piece_timeout=30s", ("peer", "download.piece_timeout=30s")),
        ("seed-peer:/etc/df/seed.toml", ("seed-peer", "/etc/df/seed.toml")),
        ('scheduler.addresses=["ws://a:1"]', (None, 'scheduler.addresses=["ws://a:1"]')),
        (
            "registry_mirror.upstream=http://r:5000",
            (None, "registry_mirror.upstream=http://r:5000"),
        ),
        ("/tmp/a:b.toml", (None, "/tmp/a:b.toml")),
        ("manager:auth.signup=true", ("manager", "auth.signup=true")),
        ("console:x=1", (None, "console:x=1")),  # not a role a cluster runs
    ],
)
def test_split_role(spec: str, expected: tuple[str | None, str]) -> None:
    assert split_role(spec) == expected


def test_a_set_without_role_reaches_every_role_with_its_section() -> None:
    got = role_settings(
        ROLES,
        [],
        [
            "log.level=debug",
            "download.piece_timeout=5s",
            "scheduling.retry_limit=2",
            "peer:download.piece_timeout=7s",
            "scheduler:log.level=error",
        ],
    )
    assert got["scheduler"].overrides == (
        "log.level=debug",
        "scheduling.retry_limit=2",
        "log.level=error",
    )
    assert got["seed-peer"].overrides == ("log.level=debug", "download.piece_timeout=5s")
    assert got["peer"].overrides == (
        "log.level=debug",
        "download.piece_timeout=5s",
        "download.piece_timeout=7s",
    )


def test_files_for_every_role_and_for_one(tmp_path: Path) -> None:
    shared = tmp_path / "all.toml"
    shared.write_text("[log]\nlevel = 'warning'\n[scheduling]\nretry_limit = 2\n")
    peer = tmp_path / "peer.toml"
    peer.write_text("[download]\npiece_timeout = '5s'\n")
    got = role_settings(ROLES, [str(shared), f"peer:{peer}"], [])
    assert got["peer"] == RoleSettings(shared=(str(shared),), path=str(peer))
    assert got["scheduler"] == RoleSettings(shared=(str(shared),))


@pytest.mark.parametrize(
    ("configs", "overrides", "roles", "key", "fragment"),
    [
        ([], ["downlaod.piece_timeout=5s"], ROLES, "downlaod.piece_timeout", "no role"),
        (
            [],
            ["scheduling.retry_limit=2"],
            ["seed-peer", "peer"],
            "scheduling.retry_limit",
            "no role",
        ),
        ([], ["peer:proxy.port=7000"], ROLES, "proxy.port", "the cluster sets"),
        ([], ["storage.data_dir=/x"], ROLES, "storage.data_dir", "the cluster sets"),
        ([], ["server={port = 1}"], ROLES, "server", "the cluster sets"),
        (
            [],
            ["seed-peer:log.level=info"],
            ["scheduler", "peer"],
            "seed-peer:log.level=info",
            "no seed-peer",
        ),
        (["seed-peer:/x.toml"], [], ["scheduler", "peer"], "seed-peer:/x.toml", "no seed-peer"),
        (["peer:/a.toml", "peer:/b.toml"], [], ROLES, "peer:/b.toml", "second file"),
    ],
)
def test_settings_that_reach_no_role_or_the_clusters_own_keys_are_errors(
    configs: list[str], overrides: list[str], roles: list[str], key: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        role_settings(roles, configs, overrides)
    assert info.value.key == key and fragment in info.value.problem


def test_a_shared_file_with_a_table_no_role_has_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "all.toml"
    f.write_text("[log]\nlevel = 'warning'\n[downlaod]\npiece_timeout = '5s'\n")
    with pytest.raises(ConfigError) as info:
        role_settings(ROLES, [str(f)], [])
    assert (info.value.source, info.value.key) == (str(f), "downlaod")


def test_a_bad_value_names_the_role_before_anything_starts(tmp_path: Path) -> None:
    cluster = Cluster(tmp_path / "w", overrides=["peer:download.piece_timeout=soon"])
    with pytest.raises(ConfigError) as info:
        cluster.start()
    assert str(info.value).startswith("--set (for the peer): download.piece_timeout:")
    assert not (tmp_path / "w").exists() and not cluster.nodes


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (["--set", "downlaod.piece_timeout=5s"], ["downlaod.piece_timeout", "no role"]),
        (["--set", "peer:upload.port=7000"], ["upload.port", "the cluster sets"]),
        (["--seed-peers", "0", "--set", "seed-peer:log.level=info"], ["no seed-peer"]),
        (["--set", "scheduler:scheduling.retry_limit=0"], ["for the scheduler", "at least 1"]),
        (["--config", "peer:/nonexistent/peer.toml"], ["/nonexistent/peer.toml", "cannot read"]),
    ],
)
def test_the_cluster_command_exits_2_naming_the_problem(
    tmp_path: Path, argv: list[str], fragments: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    workdir = tmp_path / "w"
    assert main(["cluster", "--workdir", str(workdir), *argv]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert all(f in err for f in fragments), err
    assert not workdir.exists()


def test_a_plan_never_gives_two_nodes_one_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel may hand out a port it just handed out (bind to 0, close): two nodes
    given the same one, the second fails to start while the first's /healthy answers
    for it. A plan skips ports it already gave."""
    ports = iter([40000, 40000, 40001, 40001, 40002, *range(40003, 40100)])
    monkeypatch.setattr("dragonfly.cluster.free_port", lambda: next(ports))
    cluster = Cluster(tmp_path, schedulers=1, seed_peers=1, peers=2)
    cluster._plan(cluster.check())
    given = [
        int(value.rsplit(":", 1)[1].split("/", 1)[0])
        for node in cluster.nodes
        for key, value in node.info.items()
        if key in ("url", "proxy", "upload")
    ]
    assert len(given) == len(set(given)) >= 6
