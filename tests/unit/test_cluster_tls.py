"""TLS on the cluster's ports: its keys, the files they name, and `python -m dragonfly tls`
(certificates made with the openssl CLI; handshakes over memory streams)."""

from __future__ import annotations

import os
import ssl
import stat
from pathlib import Path

import pytest
import trio

from dragonfly.cli import build_parser, main
from dragonfly.cluster import role_settings
from dragonfly.cluster_tls import (
    cluster_client_tls,
    listener_tls,
    scheduler_tls,
    upload_tls,
)
from dragonfly.config import ConfigError, PeerConfig, SchedulerConfig, load_config
from dragonfly.testing.cluster_tls import LocalTLS
from tests.unit.test_tls import _handshake, _sans


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LocalTLS:
    return LocalTLS(tmp_path_factory.mktemp("tls"))


def _peer(*overrides: str) -> PeerConfig:
    cfg = load_config("peer", env={}, overrides=list(overrides))
    assert isinstance(cfg, PeerConfig)
    return cfg


def _scheduler(*overrides: str) -> SchedulerConfig:
    cfg = load_config("scheduler", env={}, overrides=list(overrides))
    assert isinstance(cfg, SchedulerConfig)
    return cfg


def test_tls_keys_come_in_pairs_and_a_wss_scheduler_needs_the_ca() -> None:
    cases = [
        ("peer", ["upload.tls_cert=/c.pem"], "upload.tls_key"),
        ("peer", ["upload.tls_key=/c.key"], "upload.tls_cert"),
        ("scheduler", ["server.tls_cert=/c.pem"], "server.tls_key"),
        ("scheduler", ["server.tls_key=/c.key"], "server.tls_cert"),
        ("peer", ['scheduler.addresses=["ws://a:1", "wss://b:2"]'], "trust.ca_file"),
    ]
    for role, overrides, key in cases:
        with pytest.raises(ConfigError) as info:
            load_config(role, env={}, overrides=overrides)
        assert info.value.key == key, overrides
        assert info.value.source == "--set"
    cfg = _peer('scheduler.addresses=["wss://b:2"]', "trust.ca_file=/ca.pem")
    assert cfg.trust.ca_file == "/ca.pem"
    # off by default: plain listeners, no CA
    assert scheduler_tls(_scheduler()) is None
    assert upload_tls(_peer()) is None and cluster_client_tls(_peer()) is None


def test_tls_files_are_checked_at_start_naming_the_key(
    pki: LocalTLS, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cert, key = pki.host("host-a")
    _, other_key = pki.host("host-b")
    assert upload_tls(_peer(f"upload.tls_cert={cert}", f"upload.tls_key={key}")) is not None
    assert scheduler_tls(_scheduler(f"server.tls_cert={cert}", f"server.tls_key={key}"))
    open_key = tmp_path / "open.key"
    open_key.write_bytes(key.read_bytes())
    os.chmod(open_key, 0o644)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cases = [
        ((cert, open_key), "upload.tls_key", "open to group or others"),
        ((cert, other_key), "upload.tls_key", "is not the key of"),
        ((tmp_path / "missing.pem", key), "upload.tls_cert", "cannot read"),
        ((garbage, key), "upload.tls_cert", "not a usable PEM pair"),
    ]
    for (c, k), name, problem in cases:
        with pytest.raises(ConfigError, match=problem) as info:
            upload_tls(_peer(f"upload.tls_cert={c}", f"upload.tls_key={k}"))
        assert info.value.key == name
        with pytest.raises(ConfigError, match=problem) as info:
            scheduler_tls(_scheduler(f"server.tls_cert={c}", f"server.tls_key={k}"))
        assert info.value.key == name.replace("upload.", "server.")
    # children reach and verify a peer at host.ip: its certificate must name it
    with pytest.raises(ConfigError, match=r"does not name host\.ip 10\.9\.9\.9") as info:
        upload_tls(_peer(f"upload.tls_cert={cert}", f"upload.tls_key={key}", "host.ip=10.9.9.9"))
    assert info.value.key == "upload.tls_cert"
    for bad in (tmp_path / "missing.pem", garbage):
        with pytest.raises(ConfigError) as info:
            cluster_client_tls(_peer(f"trust.ca_file={bad}"))
        assert info.value.key == "trust.ca_file"
    # before a start (and in `config check`): exit 2, the key named
    assert main(["--role", "scheduler", "--set", f"server.tls_cert={cert}",
                 "--set", f"server.tls_key={open_key}"]) == 2  # fmt: skip
    assert "server.tls_key" in capsys.readouterr().err
    assert main(["config", "check", "--role", "peer", "--set", f"trust.ca_file={garbage}"]) == 2
    assert "trust.ca_file" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="required"):
        listener_tls(str(cert), "", "upload")


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tls init` with a name constraint, then `tls new` for one host and one outside it."""
    base = tmp_path_factory.mktemp("made")
    assert main(["tls", "init", str(base / "ca"), "--permit", "10.0.0.0/8"]) == 0
    new = ["tls", "new", "--ca", str(base / "ca")]
    assert main([*new, "--ip", "10.0.0.5", "--name", "h5.example", "-o", str(base / "h5")]) == 0
    assert main([*new, "--ip", "192.168.1.1", "-o", str(base / "outside")]) == 0
    return base


def test_tls_init_and_new_write_the_files_and_say_how_to_use_them(
    made: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert stat.S_IMODE((made / "ca" / "ca.key").stat().st_mode) == 0o600
    cert, key = made / "h5.pem", made / "h5.key"
    assert _sans(cert) == [("IP Address", "10.0.0.5"), ("DNS", "h5.example")]
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert not [p for p in made.iterdir() if p.name.startswith(".")]  # no temporary left
    ca = str(made / "ca")
    assert main(["tls", "new", "--ca", ca, "--ip", "10.0.0.7", "-o", str(tmp_path / "h7")]) == 0
    out = capsys.readouterr().out
    assert f"upload.tls_cert={tmp_path / 'h7.pem'}" in out
    assert f"server.tls_key={tmp_path / 'h7.key'}" in out
    # bad requests: no name, a name that is no address, no CA there, a CA already there
    assert main(["tls", "new", "--ca", ca, "-o", str(tmp_path / "x")]) == 2
    assert main(["tls", "new", "--ca", ca, "--ip", "host", "-o", str(tmp_path / "x")]) == 2
    assert "not an IP address" in capsys.readouterr().err
    assert main(["tls", "new", "--ca", str(tmp_path), "--ip", "10.0.0.1", "-o", "x"]) == 1
    assert main(["tls", "init", ca]) == 1
    assert "--force" in capsys.readouterr().err


async def test_a_peer_verifies_what_tls_new_made_for_its_names_only(made: Path) -> None:
    client = cluster_client_tls(_peer(f"trust.ca_file={made / 'ca' / 'ca.pem'}"))
    assert client is not None
    server = listener_tls(str(made / "h5.pem"), str(made / "h5.key"), "upload")
    assert server is not None
    await _handshake(server, client, "10.0.0.5")
    await _handshake(server, client, "h5.example")
    with pytest.raises(trio.BrokenResourceError) as info:
        await _handshake(server, client, "10.0.0.6")
    assert "mismatch" in str(info.value.__cause__).lower()
    # the CA's name constraint holds: it cannot vouch for an address outside 10.0.0.0/8
    outside = listener_tls(str(made / "outside.pem"), str(made / "outside.key"), "upload")
    assert outside is not None
    with pytest.raises(trio.BrokenResourceError) as info:
        await _handshake(outside, client, "192.168.1.1")
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value.__cause__)


async def test_the_cluster_ca_is_all_a_peer_trusts(pki: LocalTLS) -> None:
    ctx = cluster_client_tls(_peer(f"trust.ca_file={pki.ca_file}"))
    assert ctx is not None
    assert ctx.cert_store_stats()["x509_ca"] == 1  # not the system's CAs
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    cert, key = pki.host("host-a")
    server = listener_tls(str(cert), str(key), "upload")
    assert server is not None
    await _handshake(server, ctx, "127.0.0.1")
    # another CA's certificate for the same address is refused
    rogue = LocalTLS(pki.directory.parent / "rogue")
    rogue_cert, rogue_key = rogue.host("host-a")
    rogue_server = listener_tls(str(rogue_cert), str(rogue_key), "upload")
    assert rogue_server is not None
    with pytest.raises(trio.BrokenResourceError) as info:
        await _handshake(rogue_server, ctx, "127.0.0.1")
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value.__cause__)


def test_the_cluster_gives_its_nodes_their_tls_itself() -> None:
    assert build_parser().parse_args(["cluster", "--workdir", "w", "--tls"]).tls
    assert not build_parser().parse_args(["cluster", "--workdir", "w"]).tls
    for key in ("upload.tls_cert", "server.tls_key", "trust.ca_file"):
        with pytest.raises(ConfigError, match="the cluster sets this"):
            role_settings(["scheduler", "peer"], [], [f"{key}=/x.pem"])
