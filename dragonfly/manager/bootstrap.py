"""First start: the data directory, the session signing key, the schema, the seeded
roles and cluster, and the root user.

The root password is `DRAGONFLY_INITIAL_ROOT_PASSWORD` when set, else generated,
written to DATA_DIR/root-password (0600) and printed once; never a well-known
default. The session key is `auth.jwt_key`, else generated into DATA_DIR/jwt.key
(0600); with PostgreSQL it must be configured, since every manager has to sign and
check sessions with the same key.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

import trio

from dragonfly.config import ConfigError, ManagerConfig
from dragonfly.log import get_logger
from dragonfly.manager import auth
from dragonfly.manager.models import (
    PeerClusterConfig,
    SchedulerClusterConfig,
    Scopes,
    SeedClientConfig,
    SeedPeerClusterConfig,
    builtins,
)
from dragonfly.manager.store import Conflict, Database, Tx, rows
from dragonfly.manager.store.migrations import migrate

log = get_logger("dragonfly.manager")
ROOT_PASSWORD_ENV = "DRAGONFLY_INITIAL_ROOT_PASSWORD"
ROOT_PASSWORD_FILE = "root-password"
JWT_KEY_FILE = "jwt.key"
MIN_JWT_KEY = 32


def data_dir(cfg: ManagerConfig) -> Path:
    return Path(os.path.expanduser(cfg.data.dir))


def database_path(cfg: ManagerConfig) -> Path:
    path = Path(os.path.expanduser(cfg.database.path))
    return path if path.is_absolute() else data_dir(cfg) / path


def prepare_data_dir(cfg: ManagerConfig) -> Path:
    directory = data_dir(cfg)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    return directory


def _write_secret(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")


def session_key(cfg: ManagerConfig) -> str:
    """The configured key, or the one kept in the data directory (made on first use)."""
    if cfg.auth.jwt_key:
        return cfg.auth.jwt_key
    if cfg.database.driver == "postgres":
        raise ConfigError(
            "configuration",
            "auth.jwt_key",
            "required with database.driver = postgres (every manager must sign sessions "
            "with the same key); e.g. the output of `openssl rand -base64 48`",
        )
    path = prepare_data_dir(cfg) / JWT_KEY_FILE
    if not path.exists():
        _write_secret(path, secrets.token_urlsafe(48))
    key = path.read_text().strip()
    if len(key) < MIN_JWT_KEY:
        raise ConfigError(str(path), "auth.jwt_key", f"a key of at least {MIN_JWT_KEY} characters")
    return key


def initial_root_password(environ: dict[str, str] | os._Environ[str]) -> tuple[str, bool]:
    """(password, generated)."""
    given = environ.get(ROOT_PASSWORD_ENV)
    if given is not None:
        if not 8 <= len(given) <= 128:
            raise ConfigError(
                f"environment {ROOT_PASSWORD_ENV}", "root password", "8 to 128 characters"
            )
        return given, False
    return secrets.token_urlsafe(18), True


def _seed(tx: Tx, now: float) -> bool:
    """Roles and the default cluster; True while there are no users yet."""
    for role in (auth.ROOT, auth.GUEST):
        tx.execute("INSERT INTO roles (name) VALUES (?) ON CONFLICT DO NOTHING", [role])
        for obj, action in auth.default_permissions(role):
            tx.execute(
                "INSERT INTO role_permissions (role, object, action) VALUES (?, ?, ?) "
                "ON CONFLICT DO NOTHING",
                [role, obj, action],
            )
    first_start = tx.one("SELECT id FROM users LIMIT 1") is None
    if first_start and tx.one("SELECT id FROM scheduler_clusters LIMIT 1") is None:
        seed = rows.insert(
            tx,
            "seed_peer_clusters",
            {"name": "cluster-1", "config": rows.dumps(builtins(SeedPeerClusterConfig()))},
            now,
        )
        cluster = rows.insert(
            tx,
            "scheduler_clusters",
            {
                "name": "cluster-1",
                "config": rows.dumps(builtins(SchedulerClusterConfig())),
                "client_config": rows.dumps(builtins(PeerClusterConfig())),
                "seed_client_config": rows.dumps(builtins(SeedClientConfig())),
                "scopes": rows.dumps(builtins(Scopes())),
                "is_default": 1,
            },
            now,
        )
        tx.execute(
            "INSERT INTO scheduler_cluster_seed_peer_clusters "
            "(scheduler_cluster_id, seed_peer_cluster_id) VALUES (?, ?)",
            [cluster["id"], seed["id"]],
        )
    return first_start


def _create_root(tx: Tx, encoded: str, now: float) -> bool:
    if tx.one("SELECT id FROM users LIMIT 1") is not None:
        return False
    try:
        root = rows.insert(tx, "users", {"name": "root", "encrypted_password": encoded}, now)
    except Conflict:
        return False
    tx.execute("INSERT INTO user_roles (user_id, role) VALUES (?, ?)", [root["id"], auth.ROOT])
    return True


async def bootstrap(cfg: ManagerConfig, db: Database, now: float) -> None:
    """Migrate and seed; on the very first start create root and say its password."""

    def schema(tx: Tx) -> bool:
        applied = migrate(tx, now)
        if applied:
            log.info("database migrated", applied=applied, driver=db.dialect)
        return _seed(tx, now)

    if not await db.run(schema):
        return
    password, generated = initial_root_password(os.environ)
    encoded = await trio.to_thread.run_sync(auth.hash_password, password)
    if not await db.run(lambda tx: _create_root(tx, encoded, now)):
        return  # another manager on the same database was first
    if generated:
        path = prepare_data_dir(cfg) / ROOT_PASSWORD_FILE
        path.unlink(missing_ok=True)
        _write_secret(path, password)
        print(
            f"dragonfly manager: first start: user root, password {password} "
            f"(also in {path}, mode 0600; change it with reset_password)",
            file=sys.stdout,
            flush=True,
        )
    log.info("root user created", password_from=ROOT_PASSWORD_ENV if not generated else "generated")
