"""Constraints between keys of a role's configuration, checked once every source is in.

dragonfly/config.py's load_config_sources calls _check_cross_field, which hands each
role's configuration to its checks here; each error names the source that set the
later of the two keys.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

from dragonfly.config_schema import ConfigError, Origins

if TYPE_CHECKING:
    from dragonfly.config import ManagerConfig, PeerConfig, SchedulerConfig


def is_loopback_listen(address: str) -> bool:
    """Whether a listen address takes connections from this host only."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False  # a host name may resolve anywhere; "" and "0.0.0.0" are every address


def check_manager(cfg: ManagerConfig, origins: Origins) -> None:
    """A manager's constraints between keys."""
    interval = cfg.keepalive.interval
    for key, value in (
        ("keepalive.timeout", cfg.keepalive.timeout),
        ("gc.lease_ttl", cfg.gc.lease_ttl),
    ):
        if value <= interval:
            raise ConfigError(
                origins.get(key, (0, "defaults"))[1],
                key,
                f"must exceed keepalive.interval ({interval}), got {value}",
            )
    if cfg.database.driver == "postgres" and not cfg.database.dsn:
        raise ConfigError(
            origins.get("database.driver", (0, "defaults"))[1],
            "database.dsn",
            "required with database.driver = postgres",
        )
    if cfg.peers.timeout <= cfg.peers.report_interval:
        raise ConfigError(
            origins.get("peers.timeout", (0, "defaults"))[1],
            "peers.timeout",
            f"must exceed peers.report_interval ({cfg.peers.report_interval}), "
            f"got {cfg.peers.timeout}",
        )


def check_scheduler(cfg: SchedulerConfig, origins: Origins) -> None:
    """A scheduler's constraints between keys."""
    _check_tls_pair(origins, "server", cfg.server.tls_cert, cfg.server.tls_key)
    if cfg.trust.join_token_file:
        _check_join_token(origins, "manager.address", cfg.manager.address)


def check_peer(cfg: PeerConfig, origins: Origins) -> None:
    """A peer's (or seed peer's) constraints between keys."""
    if cfg.trust.join_token_file:
        _check_join_token(origins, "scheduler.manager", cfg.scheduler.manager)
    _check_tls_pair(origins, "upload", cfg.upload.tls_cert, cfg.upload.tls_key)
    secure = [a for a in cfg.scheduler.addresses if a.startswith("wss://")]
    if secure and not cfg.trust.ca_file:
        raise ConfigError(
            origins.get("scheduler.addresses", (-1, "defaults"))[1],
            "trust.ca_file",
            f"required with a wss:// scheduler ({secure[0]}): the CA that signed the "
            "schedulers' certificates (the system's CAs are not trusted for them)",
        )
    px = cfg.proxy
    if not is_loopback_listen(px.listen) and not px.allowed_clients and not px.auth_file:
        raise ConfigError(
            origins.get("proxy.listen", (-1, "defaults"))[1],
            "proxy.listen",
            f"{px.listen!r} is beyond loopback: set proxy.allowed_clients (CIDRs) or "
            "proxy.auth_file too, or anyone who reaches the port uses the proxy",
        )
    st = cfg.storage
    if st.low_watermark > st.high_watermark:
        low, high = "storage.low_watermark", "storage.high_watermark"
        unset = (-1, "defaults")
        if origins.get(high, unset)[0] > origins.get(low, unset)[0]:
            raise ConfigError(
                origins[high][1],
                high,
                f"must not be below {low} ({st.low_watermark}), got {st.high_watermark}",
            )
        raise ConfigError(
            origins.get(low, unset)[1],
            low,
            f"must not exceed {high} ({st.high_watermark}), got {st.low_watermark}",
        )


def _check_join_token(origins: Origins, manager_key: str, manager: str) -> None:
    """A join token is presented to a manager: the key naming one must be set too."""
    if not manager:
        raise ConfigError(
            origins.get("trust.join_token_file", (0, "defaults"))[1],
            "trust.join_token_file",
            f"a join token is presented to the manager: set {manager_key} too",
        )


def _check_tls_pair(origins: Origins, section: str, cert: str, key: str) -> None:
    """A listener's tls_cert and tls_key come together (the error names the one missing)."""
    if bool(cert) == bool(key):
        return
    have, missing = ("tls_cert", "tls_key") if cert else ("tls_key", "tls_cert")
    raise ConfigError(
        origins.get(f"{section}.{have}", (-1, "defaults"))[1],
        f"{section}.{missing}",
        f"required when {section}.{have} is set (TLS needs a certificate and its key)",
    )
