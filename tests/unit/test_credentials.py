"""Secret and credential files (dragonfly/credentials.py) and `python -m dragonfly token`:
owner-only files, configuration errors that name the key and the command, a daemon's
role bound to its credential's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dragonfly.config import ConfigError, PeerConfig, SchedulerConfig, load_config
from dragonfly.credentials import (
    CREDENTIAL_NAME,
    CredentialFileError,
    check_trust_files,
    credential_path,
    join_token,
    peer_credential,
    read_credential_file,
    read_secret_file,
    scheduler_secrets,
    write_credential_file,
    write_private_text,
)
from dragonfly.trust import SecretRing, Verifier, issue

ROOT = Path(__file__).resolve().parents[2]


def scheduler_config(*overrides: str) -> SchedulerConfig:
    cfg = load_config("scheduler", env={}, overrides=overrides)
    assert isinstance(cfg, SchedulerConfig)
    return cfg


def peer_config(role: str = "peer", *overrides: str) -> PeerConfig:
    cfg = load_config(role, env={}, overrides=overrides)
    assert isinstance(cfg, PeerConfig)
    return cfg


def token(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dragonfly", "token", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        timeout=60,
    )


def test_token_init_new_rotate(tmp_path: Path) -> None:
    secret, cred = tmp_path / "secret.json", tmp_path / "peer.json"
    r = token("init", "--secret-file", str(secret), "--cluster", "prod")
    assert r.returncode == 0, r.stderr
    assert (secret.stat().st_mode & 0o777) == 0o600
    assert token("init", "--secret-file", str(secret)).returncode == 1  # never overwritten
    r = token("new", "--secret-file", str(secret), "--role", "seed-peer", "--host-id", "s-1")
    assert r.returncode == 2 and "-o" in r.stderr  # the output file is required
    args = ["--role", "seed-peer", "--host-id", "s-1", "--ttl", "2d", "-o", str(cred)]
    r = token("new", "--secret-file", str(secret), *args)
    assert r.returncode == 0, r.stderr
    assert (cred.stat().st_mode & 0o777) == 0o600
    credential = read_credential_file(cred)
    assert credential.claims.cluster == "prod" and credential.claims.role == "seed-peer"
    assert 2 * 86400 - 60 < credential.claims.expires_at - time.time() <= 2 * 86400
    before = read_secret_file(secret)
    assert token("rotate", "--secret-file", str(secret)).returncode == 0
    after = read_secret_file(secret)
    assert after.keys[1:] == before.keys[:1] and after.current != before.current
    # What the old key issued still verifies.
    assert Verifier(after).host_key(credential.claims, time.time()) == credential.host_key
    bad = token(
        "new", "--secret-file", str(secret), "--role", "peer", "--host-id", "a b", "-o", "x"
    )
    assert bad.returncode == 1 and "host ID" in bad.stderr


def test_files_readable_by_others_are_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret.json"
    assert token("init", "--secret-file", str(secret)).returncode == 0
    os.chmod(secret, 0o644)
    with pytest.raises(CredentialFileError, match=r"readable by others.*chmod 600"):
        read_secret_file(secret)
    link = tmp_path / "link.json"
    link.symlink_to(secret)
    os.chmod(secret, 0o600)
    with pytest.raises(CredentialFileError, match="cannot read"):
        read_secret_file(link)  # never through a symlink
    junk = tmp_path / "junk.json"
    junk.write_text(json.dumps({"cluster": "c", "keys": [{"id": "k", "secret": "00"}]}))
    os.chmod(junk, 0o600)
    with pytest.raises(CredentialFileError, match="not a cluster secret file"):
        read_secret_file(junk)


def test_roles_refuse_to_start_without_identity_naming_key_and_command(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        scheduler_secrets(scheduler_config())
    assert info.value.key == "trust.secret_file" and "token init" in str(info.value)
    with pytest.raises(ConfigError) as info:
        peer_credential(peer_config())
    assert info.value.key == "trust.credential_file" and "token new" in str(info.value)
    # Insecure mode, or a peer with no scheduler at all, needs nothing.
    assert scheduler_secrets(scheduler_config("trust.insecure=true")) is None
    assert peer_credential(peer_config("peer", "scheduler.addresses=[]")) is None
    # A peer credential does not start a seed peer.
    secret, cred = tmp_path / "s.json", tmp_path / "c.json"
    assert token("init", "--secret-file", str(secret)).returncode == 0
    args = ["--role", "peer", "--host-id", "p", "-o", str(cred)]
    assert token("new", "--secret-file", str(secret), *args).returncode == 0
    seed = peer_config("seed-peer", f"trust.credential_file={cred}")
    with pytest.raises(ConfigError, match="credential is for a peer, this daemon is a seed-peer"):
        peer_credential(seed)
    later = time.time() + 400 * 86400
    with pytest.raises(ConfigError, match="expired"):
        peer_credential(peer_config("peer", f"trust.credential_file={cred}"), now=later)


def test_the_cli_refuses_to_start_a_scheduler_without_a_secret() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "dragonfly", "--role", "scheduler", "--set", "server.port=0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        timeout=60,
    )
    assert r.returncode == 2
    assert "trust.secret_file" in r.stderr and "token init" in r.stderr


def test_a_peer_with_a_join_token_joins_unless_its_credential_holds(tmp_path: Path) -> None:
    """With trust.join_token_file, a missing credential, one of another role, or one
    with less than a third of its life left means "join" (None); a good one is used; a
    token or credential file others can read stops the start naming its key."""
    token = tmp_path / "join-peer.token"
    write_private_text(token, "dfjoin_abc\n", replace=False)
    data = tmp_path / "data"
    sets = (
        f"trust.join_token_file={token}",
        "scheduler.manager=http://m:1",
        f"storage.data_dir={data}",
    )
    cfg = peer_config("peer", *sets)
    assert join_token(cfg) == "dfjoin_abc"
    assert credential_path(cfg) == data / CREDENTIAL_NAME
    assert peer_credential(cfg) is None  # none yet: it joins
    ring = SecretRing.new("c")
    now = time.time()
    write_credential_file(
        credential_path(cfg), issue(ring, host_id="p-1", role="peer", now=now, ttl=300)
    )
    assert peer_credential(cfg, now=now + 100).claims.host_id == "p-1"  # type: ignore[union-attr]
    assert peer_credential(cfg, now=now + 201) is None  # under a third left: join again
    assert peer_credential(peer_config("seed-peer", *sets), now=now) is None  # another role
    os.chmod(credential_path(cfg), 0o644)
    with pytest.raises(ConfigError) as info:
        peer_credential(cfg, now=now)
    assert info.value.key == "trust.credential_file" and "readable by others" in str(info.value)
    os.chmod(token, 0o644)
    with pytest.raises(ConfigError) as info:
        check_trust_files(cfg)
    assert info.value.key == "trust.join_token_file"
    # a scheduler with a join token takes the secret from the manager, not a file
    sched = scheduler_config(f"trust.join_token_file={token}", "manager.address=http://m:1")
    assert scheduler_secrets(sched) is None
    with pytest.raises(ConfigError) as info:
        scheduler_config(f"trust.join_token_file={token}")  # no manager to present it to
    assert info.value.key == "trust.join_token_file" and "manager.address" in str(info.value)
