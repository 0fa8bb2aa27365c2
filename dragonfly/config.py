"""Typed configuration: TOML file < environment (DRAGONFLY_SECTION__KEY) < --set.

Each role's configuration is a dataclass of sections; each section a dataclass
of typed fields whose metadata holds the documentation and the constraints.
The same schema validates every source, renders conf/ROLE.toml, and names the
key, the source and what was expected in every error. The machinery (opt, units,
loading a source, rendering TOML) is dragonfly/config_schema.py; the manager's
sections are dragonfly/config_manager.py and the constraints between keys
dragonfly/config_checks.py, both re-exported here: import every section from here.

Why about 650 lines: most of it is the schema, one dataclass per section with each
key's documentation and bounds.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dragonfly.config_checks import (
    check_manager,
    check_peer,
    check_scheduler,
)
from dragonfly.config_checks import (
    is_loopback_listen as is_loopback_listen,  # (re-exported)
)
from dragonfly.config_manager import (
    DatabaseSection,
    JobsSection,
    KeepaliveSection,
    ManagerAuthSection,
    ManagerClientSection,
    ManagerDataSection,
    ManagerGCSection,
    ManagerPeersSection,
    ManagerTrustSection,
    RecordsSection,
)
from dragonfly.config_schema import (
    ConfigError,
    Duration,
    Loader,
    Origins,
    Rate,
    Size,
    fields_of,
    opt,
    render,
    set_path,
    type_hints,
)

ROLES = ("manager", "scheduler", "seed-peer", "peer")
ENV_PREFIX = "DRAGONFLY_"


# ---------------------------------------------------------------- sections


@dataclass
class HostSection:
    """This host as other nodes see it."""

    hostname: str = opt("", "host name reported to the scheduler; empty: the machine's name")
    ip: str = opt("127.0.0.1", "address other peers use to reach this host's servers")
    idc: str = opt("", "data center; parents in the same IDC are preferred")
    location: str = opt(
        "", "location as '|'-separated levels (country|region|zone); prefix matches score higher"
    )


@dataclass
class LogSection:
    """Logging."""

    level: str = opt("info", "log level", choices=("debug", "info", "warning", "error", "critical"))
    format: str = opt(
        "auto", "auto: console on a terminal, JSON otherwise", choices=("auto", "json", "console")
    )


@dataclass
class ListenSection:
    """The role's server (also /metrics and /healthy)."""

    listen: str = opt("127.0.0.1", "address to listen on")
    port: int = opt(0, "port to listen on; 0 picks a free one", min=0, max=65535)


@dataclass
class SchedulerClientSection:
    """How a peer finds and talks to schedulers."""

    addresses: list[str] = opt(
        ["ws://127.0.0.1:8002"],
        "scheduler websocket URLs; a task goes to the one its ID hashes to",
        item_regex=r"^wss?://",
    )
    manager: str = opt(
        "",
        "manager URL (http://HOST:PORT): schedulers and the cluster's settings are asked "
        "there (scheduler.addresses serve until it answers), a seed peer registers there; "
        "empty: none",
        item_regex=r"^(https?://[^/?#]+/?)?$",
    )
    refresh_interval: Duration = opt(
        60.0, "how often the manager is asked for schedulers and settings", min=0.1
    )
    connect_timeout: Duration = opt(5.0, "time to connect to a scheduler", min=0.001)
    rejoin_timeout: Duration = opt(
        30.0,
        "when every scheduler of a running download's ring is lost, how long it goes on "
        "with its parents and waits for one to come back (a restart) before it goes to "
        "the origin for what it lacks",
        min=0,
    )


@dataclass
class DownloadSection:
    """The download engine."""

    concurrent_piece_count: int = opt(8, "pieces fetched at once per task", min=1, max=256)
    rate_limit: Rate = opt(0, "total download rate in bytes/s across tasks; 0: unlimited", min=0)
    back_to_source: bool = opt(True, "go to the origin when no parent can serve")
    back_to_source_rate_limit: Rate = opt(0, "origin download rate in bytes/s; 0: unlimited", min=0)
    origin_concurrency: int = opt(
        4, "concurrent Range requests to an origin that accepts ranges", min=1, max=64
    )
    piece_timeout: Duration = opt(30.0, "time for one piece from one parent", min=0.001)
    stall_timeout: Duration = opt(
        90.0,
        "no piece, digest or announcement for this long: ask for other parents; as long "
        "again: the origin (where allowed), else fail (504); bounds every client's wait",
        min=0.001,
    )
    connect_timeout: Duration = opt(10.0, "time to connect to an origin or parent", min=0.001)
    read_timeout: Duration = opt(60.0, "time without a byte from an origin", min=0.001)
    origin_ca_file: str = opt(
        "",
        "extra CA certificates (PEM) trusted for https origins and registries, beside the system's",
    )


@dataclass
class UploadSection:
    """The upload server that serves pieces to other peers."""

    listen: str = opt("127.0.0.1", "address of the upload server (also /metrics, /healthy)")
    port: int = opt(0, "port of the upload server; 0 picks a free one", min=0, max=65535)
    max_connections: int = opt(
        1024, "connections served at once; more are closed at once (counted)", min=1, max=1000000
    )
    rate_limit: Rate = opt(0, "total upload rate in bytes/s; 0: unlimited", min=0)
    concurrent_limit: int = opt(
        2, "pieces sent at once; few, so that each lands soon and is passed on", min=1, max=10000
    )
    queue_limit: int = opt(
        2,
        "piece requests that wait for a sending slot; more are answered 503 at once, "
        "unless one child alone is asking (then up to concurrent_limit more)",
        min=0,
        max=10000,
    )
    children_limit: int = opt(
        16, "children the scheduler may give this host at once, over all tasks", min=1, max=10000
    )
    min_rate: Rate = opt(
        64 * 1024,
        "a child reading a piece slower than this loses its upload slot; 0: no minimum",
        min=0,
    )
    tls_cert: str = opt(
        "",
        "certificate (PEM, naming host.ip) to serve pieces over HTTPS and announcements over "
        "wss; see `tls new`; empty: plain TCP",
    )
    tls_key: str = opt("", "the certificate's private key (PEM, mode 0600)")


@dataclass
class ProxyRule:
    """Which URLs go through P2P."""

    regex: str = opt(r"^http://", "URLs matching this regex are handled by this rule", regex=True)
    direct: bool = opt(False, "true: pass matching requests straight to the origin")
    allow_credentials: bool = opt(
        False, "true: requests with Authorization/Cookie may use P2P (after origin check)"
    )


@dataclass
class HijackHTTPSSection:
    """Intercept CONNECT tunnels to matching hosts so their requests can use P2P."""

    ca_cert: str = opt("", "CA certificate (PEM) that signs the leaf certificates; see `ca init`")
    ca_key: str = opt("", "the CA's private key (PEM)")
    hosts: list[str] = opt(
        [],
        "regexes of HOST:PORT whose CONNECT is intercepted; empty: every tunnel is blind",
        regex=True,
    )
    leaf_cache_size: int = opt(
        1024, "leaf certificates kept in memory (least recently used go first)", min=1, max=100000
    )
    leaf_rate: int = opt(
        60,
        "new leaf certificates made per minute at most (bursts of as many); "
        "a CONNECT beyond it gets 503",
        min=1,
        max=100000,
    )


@dataclass
class ProxySection:
    """The HTTP proxy in front of wget, curl and other clients."""

    listen: str = opt(
        "127.0.0.1",
        "address of the proxy; beyond loopback, allowed_clients or auth_file is required",
    )
    port: int = opt(0, "port of the proxy; 0 picks a free one", min=0, max=65535)
    max_connections: int = opt(
        1024, "connections served at once; more are closed at once (counted)", min=1, max=1000000
    )
    allowed_clients: list[str] = opt(
        [],
        "networks (CIDR) whose clients may use the proxy without credentials; loopback always may",
        cidr=True,
    )
    auth_file: str = opt(
        "",
        "USER:ARGON2-HASH lines (`proxy-user` adds one); other clients must then send "
        "Proxy-Authorization Basic",
    )
    allowed_destinations: list[str] = opt(
        [],
        "networks (CIDR) that clients not on loopback may reach through the proxy though "
        "loopback or link-local",
        cidr=True,
    )
    connect_ports: list[int] = opt([443], "ports a CONNECT may reach", min=1, max=65535)
    rules: list[ProxyRule] = opt([ProxyRule()], "first matching rule wins; no match: direct")
    filtered_query_params: list[str] = opt(
        [], "query parameters left out of task IDs, added to the signed-URL defaults"
    )
    prefetch: bool = opt(False, "on a Range request, fetch the rest of the file in the background")
    credential_headers: list[str] = opt(
        [],
        "request headers that carry credentials (e.g. X-Api-Key, PRIVATE-TOKEN): like "
        "Authorization, they make a task private",
    )
    private_check_ttl: Duration = opt(
        60.0,
        "how long the origin's yes to a client's URL and credentials for a private task is trusted",
        min=0,
    )
    workers: int = opt(
        0,
        "processes beside the daemon that answer local hits on the proxy port, for many "
        "clients of a few files (one per spare core); 0: the daemon answers every request",
        min=0,
        max=64,
    )
    hijack_https: HijackHTTPSSection = opt(HijackHTTPSSection(), "")


@dataclass
class RegistryMirrorSection:
    """OCI registry mirror on the proxy listener."""

    upstream: str = opt(
        "",
        "default upstream registry URL, e.g. https://registry-1.docker.io; a request's "
        "X-Dragonfly-Registry header or ?ns=HOST (containerd) names another",
        item_regex=r"^(https?://[^/?#]+/?)?$",
    )
    insecure: list[str] = opt(
        [], "HOST[:PORT] registries reached over plain http when named by ?ns= (else https)"
    )
    auth_cache_ttl: Duration = opt(
        60.0,
        "how long a registry's yes to a credential reading a blob of a repository is trusted",
        min=0,
    )


@dataclass
class StorageSection:
    """The piece store on local disk."""

    data_dir: str = opt("~/.local/share/dragonfly/peer", "directory of task files and metadata")
    fsync: bool = opt(True, "fdatasync pieces before recording them (crash-safe metadata)")
    sync_delay: Duration = opt(
        10.0,
        "a verified piece is served at once and made durable (fdatasync, recorded) at most "
        "this long after; a crash costs at most this much of a download, fetched again",
        min=0,
        max=3600,
    )
    task_ttl: Duration = opt(21600.0, "tasks unused this long are removed", min=1)
    disk_quota: Size = opt(0, "bytes the store may use; 0: the filesystem's capacity", min=0)
    high_watermark: float = opt(0.9, "evict LRU tasks when use passes this share", min=0.01, max=1)
    low_watermark: float = opt(0.8, "evict down to this share of the quota", min=0.0, max=1)
    gc_interval: Duration = opt(60.0, "how often GC runs", min=0.1)


@dataclass
class SeedSection:
    """Seed peer behaviour."""

    enabled: bool = opt(False, "announce this peer as a seed peer (root of the P2P tree)")
    cluster_id: int = opt(
        1, "seed peer cluster joined at the manager (scheduler.manager)", min=1, max=2**63 - 1
    )


@dataclass
class SchedulerServerSection(ListenSection):
    """The role's server (also /metrics and /healthy)."""

    max_connections: int = opt(
        10000, "connections served at once; more are closed at once (counted)", min=1, max=1000000
    )
    tls_cert: str = opt(
        "",
        "certificate (PEM) to serve wss:// and https (/metrics, /healthy); see `tls new`; "
        "empty: plain TCP",
    )
    tls_key: str = opt("", "the certificate's private key (PEM, mode 0600)")


@dataclass
class PeerTrustSection:
    """Cluster identity: this host's credential (see docs/SECURITY.md)."""

    credential_file: str = opt(
        "",
        "host credential (mode 0600) made by `python -m dragonfly token new`, or where the "
        "one the manager issues is kept (empty: DATA_DIR/credential.json); required with "
        "schedulers unless insecure or join_token_file",
    )
    join_token_file: str = opt(
        "",
        "file (mode 0600) with the manager's join token for this role: without a usable "
        "credential the daemon joins at scheduler.manager and keeps what it is issued",
    )
    insecure: bool = opt(
        False, "no identity: schedulers and children are taken at their word (trusted networks)"
    )
    ca_file: str = opt(
        "",
        "the cluster's CA (PEM, see `tls init`) that wss:// schedulers and TLS parents must "
        "be signed by; the system's CAs are not trusted for them",
    )


@dataclass
class SchedulerTrustSection:
    """Cluster identity: the secret that makes and checks host credentials."""

    secret_file: str = opt(
        "",
        "cluster secret (mode 0600) made by `python -m dragonfly token init`; required "
        "unless insecure or join_token_file",
    )
    join_token_file: str = opt(
        "",
        "file (mode 0600) with the manager's scheduler join token: the cluster secret and "
        "this scheduler's credential come from manager.address at start (kept in memory)",
    )
    insecure: bool = opt(False, "no identity: hosts are taken at their word for their ID and role")
    ticket_ttl: Duration = opt(
        1800.0, "how long a ticket lets a child fetch a task from a parent", min=120
    )


@dataclass
class SchedulerLimitsSection:
    """Bounds per host, so one member cannot make the cluster work for it alone."""

    peers_per_host: int = opt(
        10000, "downloads one host may have registered at once", min=1, max=10**7
    )
    registration_rate: int = opt(
        1000, "registrations per second one host may make (bursts of as many)", min=1, max=10**7
    )


@dataclass
class SchedulingSection:
    """Scheduling decisions."""

    candidate_parent_limit: int = opt(8, "parents handed to a peer at once", min=1, max=64)
    filter_parent_limit: int = opt(40, "candidates considered per decision", min=1, max=10000)
    back_to_source_count: int = opt(
        3, "peers of one task that may go back to source at once", min=0, max=1000
    )
    retry_limit: int = opt(5, "scheduling attempts before back to source", min=1, max=1000)
    retry_interval: Duration = opt(0.5, "pause between scheduling attempts", min=0)
    rejoin_grace: Duration = opt(
        3.0,
        "after the first host that held tasks before reconnects (this scheduler restarted, "
        "or took over from one), how long a task nobody is known to hold waits for the "
        "hosts' re-announcements before a seed or the origin is asked",
        min=0,
        max=60,
    )


@dataclass
class SchedulerGCSection:
    """Collection of quiet resources on the scheduler."""

    peer_ttl: Duration = opt(600.0, "a peer silent this long is dropped", min=1)
    task_ttl: Duration = opt(3600.0, "a task without peers this long is dropped", min=1)
    host_ttl: Duration = opt(300.0, "a host without a connection this long is dropped", min=1)
    interval: Duration = opt(30.0, "how often collection runs", min=0.1)


# ---------------------------------------------------------------- roles


@dataclass
class PeerConfig:
    """Configuration of a peer (and, with seed.enabled, a seed peer)."""

    host: HostSection = opt(HostSection(), "")
    log: LogSection = opt(LogSection(), "")
    scheduler: SchedulerClientSection = opt(SchedulerClientSection(), "")
    download: DownloadSection = opt(DownloadSection(), "")
    upload: UploadSection = opt(UploadSection(), "")
    proxy: ProxySection = opt(ProxySection(), "")
    registry_mirror: RegistryMirrorSection = opt(RegistryMirrorSection(), "")
    storage: StorageSection = opt(StorageSection(), "")
    seed: SeedSection = opt(SeedSection(), "")
    trust: PeerTrustSection = opt(PeerTrustSection(), "")


@dataclass
class SchedulerConfig:
    """Configuration of a scheduler."""

    host: HostSection = opt(HostSection(), "")
    log: LogSection = opt(LogSection(), "")
    server: SchedulerServerSection = opt(SchedulerServerSection("127.0.0.1", 8002), "")
    scheduling: SchedulingSection = opt(SchedulingSection(), "")
    gc: SchedulerGCSection = opt(SchedulerGCSection(), "")
    trust: SchedulerTrustSection = opt(SchedulerTrustSection(), "")
    limits: SchedulerLimitsSection = opt(SchedulerLimitsSection(), "")
    manager: ManagerClientSection = opt(ManagerClientSection(), "")


@dataclass
class ManagerConfig:
    """Configuration of the manager."""

    log: LogSection = opt(LogSection(), "")
    server: ListenSection = opt(ListenSection("127.0.0.1", 8080), "")
    data: ManagerDataSection = opt(ManagerDataSection(), "")
    database: DatabaseSection = opt(DatabaseSection(), "")
    auth: ManagerAuthSection = opt(ManagerAuthSection(), "")
    keepalive: KeepaliveSection = opt(KeepaliveSection(), "")
    gc: ManagerGCSection = opt(ManagerGCSection(), "")
    trust: ManagerTrustSection = opt(ManagerTrustSection(), "")
    peers: ManagerPeersSection = opt(ManagerPeersSection(), "")
    jobs: JobsSection = opt(JobsSection(), "")
    records: RecordsSection = opt(RecordsSection(), "")


RoleConfig = PeerConfig | SchedulerConfig | ManagerConfig


def _peer_defaults(seed: bool) -> PeerConfig:
    # Fixed default ports, so a user knows where a daemon's proxy and metrics are;
    # a seed peer on the same host gets its own set.
    cfg = PeerConfig()
    base = 65010 if seed else 65000
    cfg.proxy.port, cfg.upload.port = base + 1, base + 2
    if seed:
        cfg.seed.enabled = True
        cfg.storage.data_dir = "~/.local/share/dragonfly/seed-peer"
    return cfg


def default_config(role: str) -> RoleConfig:
    if role in ("peer", "seed-peer"):
        return _peer_defaults(seed=role == "seed-peer")
    if role == "scheduler":
        return SchedulerConfig()
    if role == "manager":
        return ManagerConfig()
    raise ConfigError("--role", "role", f"expected one of {', '.join(ROLES)}, got {role!r}")


# Keys a role accepts that nothing reads yet, with the reason, per role: a dotted key,
# a section (each key in it) or "" (every key of the role). conf/ROLE.toml marks each
# with `# reserved: REASON`, `config check` shows it, and a daemon warns when one is set.
RESERVED: dict[str, dict[str, str]] = {}


def reserved_reason(role: str, key: str) -> str | None:
    """Why nothing reads `key` (dotted) of `role` yet; None for a key that is read."""
    marks = RESERVED.get(role, {})
    parts = key.split(".")
    for n in range(len(parts) + 1):
        reason = marks.get(".".join(parts[:n]))
        if reason is not None:
            return reason
    return None


def _check_cross_field(cfg: RoleConfig, origins: Origins) -> None:
    """Constraints between keys (dragonfly/config_checks.py); the error names the source
    that set the later of the two."""
    if isinstance(cfg, ManagerConfig):
        check_manager(cfg, origins)
    elif isinstance(cfg, SchedulerConfig):
        check_scheduler(cfg, origins)
    else:
        check_peer(cfg, origins)


def load_config(
    role: str,
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Iterable[str] = (),
) -> RoleConfig:
    """Build a role's configuration from defaults, a TOML file, the environment and --set.

    An environment variable naming a section this role does not have is ignored:
    one environment often serves several roles on a host. An unknown key inside
    a section this role has is still an error, and --set is always strict.
    """
    return load_config_sources(role, path, env=env, overrides=overrides)[0]


def load_config_sources(
    role: str,
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Iterable[str] = (),
    shared: Iterable[str | os.PathLike[str]] = (),
) -> tuple[RoleConfig, dict[str, str]]:
    """load_config, and the source that set each key not left at its default: the file's
    path, "environment NAME" or "--set", by dotted key (list items as `rules[0].regex`).

    `shared` files are read before `path` and, like the environment, give this role only
    the tables it has (a cluster's file for all of its roles)."""
    cfg = default_config(role)
    origins: Origins = {}
    own = role_keys(role)
    for shared_path in shared:
        table = read_config_file(shared_path)
        mine = {key: value for key, value in table.items() if key in own}
        Loader(str(shared_path), False, origins).apply_table(cfg, mine, "")
    if path is not None:
        Loader(str(path), False, origins).apply_table(cfg, read_config_file(path), "")
    hints = type_hints(type(cfg))
    sections = {name for name, tp in hints.items() if dataclasses.is_dataclass(tp)}
    for name, raw in sorted((env if env is not None else os.environ).items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        dotted = name[len(ENV_PREFIX) :].lower().replace("__", ".")
        if dotted.partition(".")[0] not in sections:
            continue
        set_path(cfg, dotted, raw, Loader(f"environment {name}", True, origins))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError("--set", item, "expected section.key=value")
        set_path(cfg, key.strip(), raw, Loader("--set", True, origins))
    _check_cross_field(cfg, origins)
    return cfg, {key: source for key, (_, source) in origins.items()}


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A TOML file's tables; a file that cannot be read or parsed is a ConfigError."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, "(file)", f"cannot read: {exc.strerror}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "(file)", f"not valid TOML: {exc}") from None
    except ValueError:  # tomllib's int() refuses integers beyond its digit limit
        raise ConfigError(source, "(file)", "not valid TOML: an integer too long") from None


def role_keys(role: str) -> set[str]:
    """The top-level names of a role's configuration: its sections and top-level keys."""
    return set(fields_of(type(default_config(role))))


def resolved_hostname(host: HostSection) -> str:
    return host.hostname or platform.node()


def data_dir(storage: StorageSection) -> Path:
    return Path(os.path.expanduser(storage.data_dir))


# ---------------------------------------------------------------- rendering


def render_toml(role: str) -> str:
    """conf/ROLE.toml: every key with its default and a one-line comment."""
    header = [
        f"# Dragonfly {role} configuration: every key, with its default.",
        f"# python -m dragonfly --role {role} --config conf/{role}.toml",
        "# Override any key with DRAGONFLY_SECTION__KEY=value or --set section.key=value.",
        "# Sizes take units (4MiB, 1GB), rates bytes/s (20MB/s), durations 30s/5m/1h.",
    ]
    return render(default_config(role), header, RESERVED.get(role, {}), None)


def render_effective(role: str, cfg: RoleConfig, sources: Mapping[str, str]) -> str:
    """`config check`: every key with the value in effect and where that value came from
    (`sources` as load_config_sources gives them). The text is TOML that loads to `cfg`."""

    def source_of(key: str) -> str:
        source = sources.get(key)
        if source is None:
            return "default"
        if source == "--set" or source.startswith("environment "):
            return source
        return f"file {source!r}"  # repr: a newline in a path must not end the comment

    header = [
        f"# Dragonfly {role} configuration in effect: every key, and where its value came",
        "# from (default < file < environment DRAGONFLY_SECTION__KEY < --set).",
    ]
    return render(cfg, header, RESERVED.get(role, {}), source_of)
