"""`python -m dragonfly config check --role ROLE FILE`: the configuration in effect, each
value with where it came from; exit 2 naming the key of a bad file. And a daemon warns
when a key that nothing reads yet is set."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dragonfly import config
from dragonfly.cli import EXIT_OK, EXIT_USAGE, main
from dragonfly.config import load_config


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dragonfly", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def lines_by_key(text: str) -> dict[str, str]:
    """`key = value  # source` lines by key (the last table's key wins: keys are unique
    enough for these checks)."""
    out = {}
    for line in text.splitlines():
        if " = " in line and not line.startswith("#"):
            out[line.split(" = ", 1)[0]] = line
    return out


def test_each_value_names_its_source(tmp_path: Path) -> None:
    f = tmp_path / "peer.toml"
    f.write_text("[download]\npiece_timeout = '5s'\nread_timeout = '9s'\n")
    env = {"PATH": "/usr/bin:/bin", "DRAGONFLY_DOWNLOAD__READ_TIMEOUT": "11s"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    r = run(
        "config", "check", "--role", "peer", str(f), "--set", "upload.rate_limit=4MB/s", env=env
    )
    assert r.returncode == EXIT_OK, r.stderr
    got = lines_by_key(r.stdout)
    assert got["piece_timeout"] == f"piece_timeout = \"5s\"  # file '{f}'"
    assert (
        got["read_timeout"]
        == 'read_timeout = "11s"  # environment DRAGONFLY_DOWNLOAD__READ_TIMEOUT'
    )
    assert "\nrate_limit = 0  # default\n" in r.stdout  # download's
    assert got["rate_limit"] == 'rate_limit = "4MB/s"  # --set'  # upload's, which comes later
    assert got["concurrent_piece_count"] == "concurrent_piece_count = 8  # default"


def test_the_printout_is_toml_that_loads_to_the_same_configuration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "peer.toml"
    f.write_text(
        "[[proxy.rules]]\nregex = 'blobs/sha256'\nallow_credentials = true\n"
        "[[proxy.rules]]\nregex = '^http://'\n[storage]\ntask_ttl = '90m'\n"
    )
    overrides = ["registry_mirror.insecure=['r:5000']", "scheduler.connect_timeout=0.0015"]
    argv = ["config", "check", "--role", "peer", str(f)]
    assert main([*argv, *(a for o in overrides for a in ("--set", o))]) == EXIT_OK
    printed = tmp_path / "printed.toml"
    printed.write_text(capsys.readouterr().out)
    assert load_config("peer", printed, env={}) == load_config(
        "peer", f, env={}, overrides=overrides
    )


def test_role_and_options_before_or_after_check(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["--set", "log.level=error", "config", "--role", "scheduler", "check"],
        ["config", "--role", "scheduler", "check", "--set", "log.level=error"],
        ["config", "check", "--role", "scheduler", "--log-level", "error"],
    ):
        assert main(argv) == EXIT_OK, argv
        assert "level = 'error'  # --set" in capsys.readouterr().out, argv


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("[download]\npiece_timeout = 'soon'\n", ["peer.toml: download.piece_timeout", "duration"]),
        ("[downlaod]\npiece_timeout = '5s'\n", ["peer.toml: downlaod: unknown key"]),
        ("[scheduler]\nregister_timeout = '10s'\n", ["peer.toml: scheduler.register_timeout:"]),
        ("[proxy.hijack_https]\nca_cert = '/nonexistent/ca.pem'\n", ["hijack_https.ca_cert"]),
        ("not toml = = 1\n", ["not valid TOML"]),
    ],
)
def test_a_bad_file_exits_2_naming_the_key(
    tmp_path: Path, text: str, fragments: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "peer.toml"
    f.write_text(text)
    assert main(["config", "check", "--role", "peer", str(f)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert all(x in err for x in fragments), err


def test_check_needs_a_role(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check", "conf/peer.toml"]) == EXIT_USAGE
    assert "--role" in capsys.readouterr().err


def test_reserved_keys_are_shown_and_a_daemon_warns_when_one_is_set(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Nothing is reserved now (scheduler.manager was, until peers discovered schedulers):
    # the mechanism is shown with a key marked for the test.
    reason = "read by nothing in this test"
    monkeypatch.setattr(config, "RESERVED", {"peer": {"scheduler.manager": reason}})
    assert main(["config", "check", "--role", "peer", "--set", "scheduler.manager=http://m"]) == 0
    out = capsys.readouterr().out
    assert f"# reserved: {reason}\nmanager = 'http://m'" in out

    from dragonfly import nursery

    monkeypatch.setattr(nursery, "RUNNERS", {"peer": lambda cfg: 0}, raising=False)
    argv = ["--role", "peer", "--set", "scheduler.manager=http://m", "--set", "log.format=json"]
    argv += ["--set", "trust.insecure=true"]  # (a peer with a scheduler needs a credential)
    assert main(argv) == 0
    captured = capsys.readouterr()
    logged = captured.out + captured.err
    assert "a reserved key is set" in logged and "scheduler.manager" in logged
    assert main(["--role", "peer", "--set", "log.format=json", "--set", "trust.insecure=true"]) == 0
    captured = capsys.readouterr()
    assert "reserved" not in captured.out + captured.err
