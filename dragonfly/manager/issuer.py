"""The manager as the cluster's issuer: it holds the cluster secret and makes host
credentials for hosts that present a join token.

The secret is `trust.secret_file`, or DATA_DIR/cluster-secret.json (0600), made at the
first start; with PostgreSQL it must be configured, since every manager has to issue
under the same secret. A joining host never picks its own ID: the manager makes one
from the host name it gives and 8 random hex digits, so nobody can take another
host's identity by joining under its name (and a revoked ID is never issued again).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from dragonfly.config import ConfigError, ManagerConfig
from dragonfly.credentials import CredentialFileError, read_secret_file, write_secret_file
from dragonfly.manager.bootstrap import data_dir
from dragonfly.trust import Credential, SecretRing, issue, name_from

SECRET_FILE = "cluster-secret.json"
JOIN_ROLES = ("peer", "seed-peer", "scheduler")


def secret_path(cfg: ManagerConfig) -> Path:
    if cfg.trust.secret_file:
        return Path(os.path.expanduser(cfg.trust.secret_file))
    return data_dir(cfg) / SECRET_FILE


def load_ring(cfg: ManagerConfig) -> SecretRing:
    """The cluster secret (made on first use in the data directory); ConfigError naming
    trust.secret_file when it cannot be used."""
    key = "trust.secret_file"
    if not cfg.trust.secret_file and cfg.database.driver == "postgres":
        raise ConfigError(
            "configuration",
            key,
            "required with database.driver = postgres (every manager must issue credentials "
            "under the same secret): make one with "
            "`python -m dragonfly token init --secret-file FILE`",
        )
    path = secret_path(cfg)
    try:
        if not cfg.trust.secret_file and not os.path.lexists(path):
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_secret_file(
                path, SecretRing.new(f"dragonfly-{secrets.token_hex(4)}"), replace=False
            )
        return read_secret_file(path)
    except (CredentialFileError, OSError) as exc:
        raise ConfigError(str(path), key, str(exc)) from None


def new_host_id(role: str, hostname: str) -> str:
    """A fresh host ID: the host name (what credentials may carry of it) and 8 hex digits."""
    return f"{name_from(hostname, role)}-{secrets.token_hex(4)}"


def issue_credential(
    ring: SecretRing, role: str, hostname: str, now: float, ttl: float
) -> Credential:
    return issue(ring, host_id=new_host_id(role, hostname), role=role, now=now, ttl=ttl)
