"""The command line: help, config errors (exit 2), roles not built yet (exit 3)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dragonfly.cli import EXIT_NOT_BUILT, EXIT_USAGE, main


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dragonfly", *args], capture_output=True, text=True, timeout=60
    )


def test_help_explains_roles_and_subcommands() -> None:
    r = run("--help")
    assert r.returncode == 0
    for word in ("--role", "--config", "--set", "get", "cluster", "sim", "seed-peer", "Exit codes"):
        assert word in r.stdout


def test_no_arguments_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == EXIT_USAGE


def test_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    f = tmp_path / "peer.toml"
    f.write_text("[upload]\nrate_limit = 'lots'\n")
    r = run("--role", "peer", "--config", str(f))
    assert r.returncode == EXIT_USAGE
    assert "upload.rate_limit" in r.stderr and str(f) in r.stderr
    r = run("--role", "scheduler", "--set", "scheduling.candidate_parent_limit=0")
    assert r.returncode == EXIT_USAGE and "at least 1" in r.stderr


def test_unknown_role_is_usage_error() -> None:
    r = run("--role", "tracker")
    assert r.returncode == EXIT_USAGE and "invalid choice" in r.stderr


@pytest.mark.parametrize("role", ["manager", "scheduler", "seed-peer", "peer"])
def test_a_role_without_a_runner_says_so(
    role: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from dragonfly import nursery

    monkeypatch.setattr(nursery, "RUNNERS", {}, raising=False)
    assert main(["--role", role, "--config", f"conf/{role}.toml"]) == EXIT_NOT_BUILT
    assert f"role '{role}' is not built yet" in capsys.readouterr().err


def test_a_role_runner_gets_the_validated_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from dragonfly import nursery
    from dragonfly.config import PeerConfig

    seen: list[object] = []
    monkeypatch.setattr(
        nursery, "RUNNERS", {"peer": lambda cfg: seen.append(cfg) or 0}, raising=False
    )
    assert main(["--role", "peer", "--set", "download.concurrent_piece_count=3"]) == 0
    (cfg,) = seen
    assert isinstance(cfg, PeerConfig) and cfg.download.concurrent_piece_count == 3


def test_config_defaults_prints_toml() -> None:
    r = run("config", "--role", "peer", "--defaults")
    assert (
        r.returncode == 0 and "[download]" in r.stdout and "concurrent_piece_count = 8" in r.stdout
    )
