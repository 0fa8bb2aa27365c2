"""The manager's sections of the configuration (and the scheduler's [manager] client).

ManagerConfig (dragonfly/config.py) is made of these, with HostSection, LogSection
and ListenSection; SchedulerConfig's [manager] is ManagerClientSection. Every name
here is re-exported by dragonfly.config, the place to import them from.
"""

from __future__ import annotations

from dataclasses import dataclass

from dragonfly.config_schema import Duration, opt


@dataclass
class ManagerDataSection:
    """The manager's own files."""

    dir: str = opt(
        "~/.local/share/dragonfly/manager",
        "directory (0700) of the SQLite database, the session key and the first root password",
    )


@dataclass
class DatabaseSection:
    """The manager's database."""

    driver: str = opt(
        "sqlite", "sqlite (one file) or postgres (several managers)", choices=("sqlite", "postgres")
    )
    path: str = opt("manager.db", "SQLite database file; relative: inside data.dir")
    dsn: str = opt(
        "", "PostgreSQL connection string (driver = postgres), e.g. postgresql://df@db/dragonfly"
    )


@dataclass
class ManagerAuthSection:
    """Accounts and sessions."""

    signup: bool = opt(False, "anyone may sign up (as guest); root may add users either way")
    jwt_key: str = opt(
        "",
        "HS256 key signing sessions (32+ characters); empty: made at first start in data.dir "
        "(required with postgres)",
        item_regex=r"^(|.{32,})$",
    )
    session_ttl: Duration = opt(86400.0, "a session token is valid this long", min=60)
    refresh_ttl: Duration = opt(
        604800.0, "refresh_token renews a session this long after its sign-in", min=60
    )
    cookie_secure: bool = opt(False, "mark the session cookie Secure (serve the API over TLS)")


@dataclass
class KeepaliveSection:
    """Liveness of schedulers and seed peers."""

    interval: Duration = opt(5.0, "keepalive interval members are told to keep", min=0.1)
    timeout: Duration = opt(
        15.0, "a member silent this long is inactive (three intervals)", min=0.1
    )
    remove_after: Duration = opt(1800.0, "an inactive member is removed after this long", min=1)


@dataclass
class ManagerGCSection:
    """Background work, run by one manager at a time."""

    lease_ttl: Duration = opt(
        15.0, "another manager takes background work over this long after one stops", min=0.5
    )
    audit_ttl: Duration = opt(604800.0, "audit rows are kept this long", min=60)


@dataclass
class ManagerTrustSection:
    """Cluster identity: the manager holds the cluster secret and issues credentials."""

    secret_file: str = opt(
        "",
        "cluster secret (mode 0600); empty: DATA_DIR/cluster-secret.json, made at first start "
        "(required with postgres: every manager must issue under the same secret)",
    )
    credential_ttl: Duration = opt(
        31536000.0, "how long a credential issued against a join token is valid", min=3600
    )


@dataclass
class ManagerPeersSection:
    """The peers table, kept from what schedulers report."""

    report_interval: Duration = opt(
        60.0, "how often each scheduler reports the hosts connected to it", min=0.1
    )
    timeout: Duration = opt(
        180.0, "a peer no scheduler reported for this long is inactive", min=0.1
    )
    remove_after: Duration = opt(1800.0, "an inactive peer is removed after this long", min=1)


@dataclass
class JobsSection:
    """Preheat, task and sync jobs."""

    ttl: Duration = opt(21600.0, "job rows are removed this long after they were made", min=60)
    dispatch_timeout: Duration = opt(
        60.0,
        "a job part no manager could hand to a scheduler of its cluster fails after this long",
        min=1,
    )


@dataclass
class RecordsSection:
    """Download records the peers report (through their schedulers)."""

    max_rows: int = opt(100_000, "download records kept; the oldest go first", min=100)
    traffic_ttl: Duration = opt(
        7_776_000.0, "hourly traffic per cluster is kept this long", min=3600
    )


@dataclass
class ManagerClientSection:
    """The manager this scheduler registers with."""

    address: str = opt(
        "",
        "manager URL (http://HOST:PORT) to register with; empty: none",
        item_regex=r"^(https?://[^/?#]+/?)?$",
    )
    cluster_id: int = opt(1, "scheduler cluster this scheduler joins", min=1, max=2**63 - 1)
