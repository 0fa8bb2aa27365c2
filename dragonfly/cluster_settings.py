"""Which settings reach which role of `python -m dragonfly cluster`, and each role's
configuration resolved from them.

`--config [ROLE:]FILE` and `--set [ROLE:]KEY=VALUE` reach the role they name, or
without one every role that has the key's section (the manager only when named); the
keys the cluster sets for each node itself may not be --set. dragonfly/cluster.py
re-exports every name here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dragonfly.config import (
    ConfigError,
    RoleConfig,
    load_config_sources,
    read_config_file,
    role_keys,
)

NODE_ROLES = ("scheduler", "seed-peer", "peer")
MANAGER = "manager"  # reached only by settings that name it
# Set by the cluster for each node (every role on 127.0.0.1, its own ports and data).
CLUSTER_KEYS = (
    "server.listen",
    "server.port",
    "proxy.port",
    "upload.listen",
    "upload.port",
    "storage.data_dir",
    "scheduler.addresses",
    "scheduler.manager",
    "manager.address",
    "data.dir",
    "trust.secret_file",
    "trust.credential_file",
    # TLS: `--tls` gives each node its own certificate
    "server.tls_cert",
    "server.tls_key",
    "upload.tls_cert",
    "upload.tls_key",
    "trust.ca_file",
    "trust.join_token_file",
    "host.hostname",
)
JOIN_ROLES = ("scheduler", "seed-peer", "peer")
# Set by the cluster only when it starts the manager; without one (--no-manager) they
# may name a manager of one's own.
MANAGER_KEYS = ("scheduler.manager", "manager.address")


def split_role(spec: str) -> tuple[str | None, str]:
    """`ROLE:REST` → (ROLE, REST); without a role before its first ':' → (None, spec)."""
    role, sep, rest = spec.partition(":")
    return (role, rest) if sep and role in (MANAGER, *NODE_ROLES) else (None, spec)


@dataclass(frozen=True)
class RoleSettings:
    """What reaches one role: files for every role, its own file, --set items."""

    shared: tuple[str, ...] = ()
    path: str | None = None
    overrides: tuple[str, ...] = ()


def role_settings(
    roles: Sequence[str], configs: Sequence[str], overrides: Sequence[str]
) -> dict[str, RoleSettings]:
    """Which `--config [ROLE:]FILE` and `--set [ROLE:]KEY=VALUE` reach which of `roles`.

    A ConfigError names a file or key that reaches no role of the cluster, a second
    file for one role, and a --set of a key the cluster sets itself."""
    names = ", ".join(roles)
    shared: list[str] = []
    own: dict[str, str] = {}
    for spec in configs:
        role, path = split_role(spec)
        if role is None:
            for key in read_config_file(path):
                if not any(key in role_keys(r) for r in roles):
                    raise ConfigError(path, key, f"no role of this cluster has it ({names})")
            shared.append(path)
        elif role not in roles:
            raise ConfigError("--config", spec, f"this cluster has no {role} ({names})")
        elif role in own:
            raise ConfigError("--config", spec, f"a second file for the {role}")
        else:
            own[role] = path
    sets: dict[str, list[str]] = {r: [] for r in roles}
    cluster_keys = [k for k in CLUSTER_KEYS if MANAGER in roles or k not in MANAGER_KEYS]
    for item in overrides:
        role, rest = split_role(item)
        key = rest.partition("=")[0].strip()
        if any(key == k or k.startswith(f"{key}.") for k in cluster_keys):
            raise ConfigError("--set", key, "the cluster sets this for each node itself")
        if role is not None and role not in roles:
            raise ConfigError("--set", item, f"this cluster has no {role} ({names})")
        targets = (
            [role]
            if role
            else [r for r in roles if r != MANAGER and key.split(".")[0] in role_keys(r)]
        )
        if not targets:
            raise ConfigError("--set", key, f"no role of this cluster has it ({names})")
        for target in targets:
            sets[target].append(rest)
    return {
        r: RoleSettings(tuple(shared) if r != MANAGER else (), own.get(r), tuple(sets[r]))
        for r in roles
    }


def _resolve(
    role: str, settings: RoleSettings, cluster_sets: list[str]
) -> tuple[RoleConfig, dict[str, str]]:
    """A role's configuration and the source of each value; JSON logs unless set."""
    try:
        return load_config_sources(
            role,
            settings.path,
            shared=settings.shared,
            overrides=["log.format=json", *settings.overrides, *cluster_sets],
        )
    except ConfigError as exc:
        raise ConfigError(f"{exc.source} (for the {role})", exc.key, exc.problem) from None
