"""The command line: help, config errors (exit 2), the role runners."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dragonfly.cli import EXIT_USAGE, main


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


def test_a_role_runner_gets_the_validated_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from dragonfly import nursery
    from dragonfly.config import PeerConfig

    seen: list[object] = []
    monkeypatch.setattr(
        nursery, "RUNNERS", {"peer": lambda cfg: seen.append(cfg) or 0}, raising=False
    )
    # (without a credential only a peer with no scheduler starts: see test_trust_files.py)
    args = ["--set", "download.concurrent_piece_count=3", "--set", "scheduler.addresses=[]"]
    assert main(["--role", "peer", *args]) == 0
    (cfg,) = seen
    assert isinstance(cfg, PeerConfig) and cfg.download.concurrent_piece_count == 3


def test_config_defaults_prints_toml() -> None:
    r = run("config", "--role", "peer", "--defaults")
    assert (
        r.returncode == 0 and "[download]" in r.stdout and "concurrent_piece_count = 8" in r.stdout
    )


def test_config_before_the_subcommand_is_used() -> None:
    """Subcommand defaults used to erase --config given before the subcommand (exit 3)."""
    r = run("--config", "/nonexistent/peer.toml", "get", "http://o/f", "-O", "f")
    assert r.returncode == EXIT_USAGE and "/nonexistent/peer.toml" in r.stderr


@pytest.mark.parametrize("before", [True, False])
@pytest.mark.parametrize(
    ("option", "value", "fragment"),
    [
        ("--config", "/nonexistent/peer.toml", "cannot read"),
        ("--set", "log.level=loud", "expected one of"),
    ],
)
def test_config_options_work_before_and_after_a_subcommand(
    before: bool, option: str, value: str, fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    for command in (["get", "http://o/f", "-O", "f"], ["cluster", "--workdir", "w"]):
        argv = [option, value, *command] if before else [*command, option, value]
        assert main(argv) == EXIT_USAGE, argv
        assert fragment in capsys.readouterr().err


@pytest.mark.parametrize("before", [True, False])
def test_config_command_takes_options_before_and_after(
    before: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    options = ["--set", "download.concurrent_piece_count=3", "--log-level", "debug"]
    command = ["config", "--role", "peer"]
    assert main([*options, *command] if before else [*command, *options]) == 0
    out = capsys.readouterr().out
    assert "concurrent_piece_count = 3  # --set" in out and "level = 'debug'  # --set" in out


def test_set_before_and_after_a_subcommand_add_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "peer.toml"
    f.write_text("[download]\nconcurrent_piece_count = 2\n")
    argv = [
        "--config",
        str(f),
        "--set",
        "download.concurrent_piece_count=3",
        "--set",
        "upload.port=7001",
        "config",
        "--role",
        "peer",
        "--set",
        "download.concurrent_piece_count=4",
        "--log-level",
        "error",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "concurrent_piece_count = 4  # --set" in out
    assert "port = 7001  # --set" in out and "level = 'error'  # --set" in out
    # A --config after the subcommand wins over one before it.
    assert (
        main(["--config", "/nonexistent.toml", "config", "--role", "peer", "--config", str(f)]) == 0
    )
    assert f"concurrent_piece_count = 2  # file '{f}'" in capsys.readouterr().out
