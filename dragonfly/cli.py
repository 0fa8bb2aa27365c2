"""Command line: `python -m dragonfly --role ROLE` and the subcommands.

Exit codes: 0 success, 1 a failed operation, 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from dragonfly import __version__
from dragonfly.config import (
    ROLES,
    ConfigError,
    PeerConfig,
    RoleConfig,
    load_config_sources,
    render_effective,
    render_toml,
    reserved_reason,
)
from dragonfly.log import LEVELS, configure, get_logger

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

ROLE_HELP = {
    "manager": "clusters, keepalive, dynamic config, preheat jobs, web console",
    "scheduler": "decides who downloads which piece from whom",
    "seed-peer": "a peer that fetches from the origin first: the root of the P2P tree",
    "peer": "HTTP proxy, download engine and upload server on every host",
}

# Each role's runner (dragonfly.nursery.RUNNERS): a callable taking the validated
# config and returning the exit code.
RoleRunner = Callable[[RoleConfig], int]


def _role_runner(role: str) -> RoleRunner:
    from dragonfly import nursery

    runners: dict[str, RoleRunner] = nursery.RUNNERS
    return runners[role]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dragonfly",
        description=(
            "Dragonfly: peer-to-peer file distribution and image acceleration. "
            "Run a role as a daemon with --role, or use a subcommand."
        ),
        epilog="Roles:\n"
        + "\n".join(f"  {r:<10} {h}" for r, h in ROLE_HELP.items())
        + "\n\nConfiguration: TOML file < DRAGONFLY_SECTION__KEY environment < --set."
        "\nExit codes: 0 ok, 1 failed, 2 bad usage or config.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dragonfly {__version__}")
    parser.add_argument("--role", choices=ROLES, help="run this role as a daemon")
    _add_config_args(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    get = sub.add_parser("get", help="download a URL through the local peer (like dfget)")
    get.add_argument("url", help="http(s) URL to download")
    get.add_argument("-O", "--output", required=True, help="file to write when complete")
    get.add_argument(
        "--peer",
        help="the peer daemon's data directory, whose api.sock is its local API "
        "(default: $DRAGONFLY_PEER, else storage.data_dir)",
    )
    get.add_argument("--digest", help="sha256:HEX the file must have; a mismatch fails")
    get.add_argument("--tag", default="", help="task tag (part of the task ID)")
    get.add_argument("--application", default="", help="application (part of the task ID)")
    get.add_argument(
        "--priority",
        type=int,
        choices=range(7),
        default=None,
        metavar="0-6",
        help="download priority (Dragonfly's levels; a cluster may block some)",
    )
    get.add_argument(
        "--filtered-query-param",
        action="append",
        default=[],
        metavar="NAME",
        help="query parameter left out of the task ID (repeatable)",
    )
    get.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="'K: V'",
        help="request header (repeatable)",
    )
    get.add_argument(
        "--no-back-to-source", action="store_true", help="fail rather than fetch from the origin"
    )
    get.add_argument(
        "--hard-link",
        action="store_true",
        help="hard-link the task file instead of copying (editing the output then edits the cache)",
    )
    _add_config_args(get, subcommand=True)

    cluster = sub.add_parser(
        "cluster",
        help="run a local cluster of roles on loopback",
        description="Run a manager, schedulers, seed peers and peers on loopback, each its "
        "own process. --config and --set take an optional ROLE: prefix (manager, scheduler, "
        "seed-peer, peer): with it they reach that role only; without it, every role but the "
        "manager that has the key's section. Each node's resolved configuration is written "
        "to WORKDIR/conf/NODE.toml.",
    )
    cluster.add_argument("--schedulers", type=int, default=1)
    cluster.add_argument("--seed-peers", type=int, default=1)
    cluster.add_argument("--peers", type=int, default=3)
    cluster.add_argument("--workdir", required=True, help="directory for data, logs, cluster.json")
    cluster.add_argument(
        "--tls",
        action="store_true",
        help="TLS on the scheduler and upload ports (a CA and certificates in WORKDIR/tls)",
    )
    cluster.add_argument(
        "--no-manager",
        action="store_true",
        help="no manager: schedulers by address, a secret and credentials made here",
    )
    cluster.add_argument(
        "--config",
        metavar="[ROLE:]FILE",
        action="append",
        default=argparse.SUPPRESS,
        dest="cluster_configs",
        help="TOML file of ROLE, or of every role for the tables it has (repeatable)",
    )
    _add_config_args(
        cluster,
        subcommand=True,
        config=False,
        set_help="[ROLE:]SECTION.KEY=VALUE: one key of ROLE, or of every role with that "
        "section (repeatable)",
    )

    # The simulation has options of its own: `main` hands everything after `sim` to it.
    sub.add_parser("sim", help="simulate a swarm in virtual time (sim --help lists its options)")

    ca = sub.add_parser("ca", help="the CA for HTTPS interception (proxy.hijack_https)")
    ca_sub = ca.add_subparsers(dest="ca_command", metavar="ACTION", required=True)
    ca_init = ca_sub.add_parser(
        "init", help="make DIR/ca.pem and DIR/ca.key and print how to use and trust them"
    )
    _add_ca_init_args(
        ca_init,
        dir_help="directory for ca.pem and ca.key",
        permit_metavar="DOMAIN",
        permit_help="name constraint: the CA vouches for DOMAIN and its subdomains only "
        "(repeatable; an IP network works too); recommended",
    )
    ca_init.add_argument("--name", default="Dragonfly proxy CA", help="the CA's common name")

    users = sub.add_parser(
        "proxy-user", help="add or replace a user of proxy.auth_file (password from stdin)"
    )
    users.add_argument("file", metavar="FILE", help="the auth file (made 0600 if new)")
    users.add_argument("user", metavar="USER")

    _add_token_parser(sub)
    _add_tls_parser(sub)

    conf = sub.add_parser(
        "config",
        help="print a role's configuration in effect, each value with its source",
        description="Print the configuration ROLE would run with, as TOML, each value with "
        "where it came from (default, file, environment, --set); exit 2 naming the key "
        "that is wrong. `config check --role ROLE FILE` checks FILE.",
    )
    conf.add_argument("--role", dest="config_role", choices=ROLES)
    conf.add_argument(
        "--defaults", action="store_true", help="print the documented defaults as TOML"
    )
    _add_config_args(conf, subcommand=True)
    conf_sub = conf.add_subparsers(dest="config_action", metavar="ACTION")
    check = conf_sub.add_parser(
        "check", help="check FILE (with the environment and --set) and print what takes effect"
    )
    check.add_argument("--role", dest="config_role", choices=ROLES, default=argparse.SUPPRESS)
    check.add_argument("file", nargs="?", metavar="FILE", help="the TOML file (as --config)")
    _add_config_args(check, subcommand=True, overrides_dest="check_overrides")
    return parser


def _add_ca_init_args(
    parser: argparse.ArgumentParser, *, dir_help: str | None, permit_metavar: str, permit_help: str
) -> None:
    """What making a CA takes, for the proxy's CA (`ca init`) and the cluster's (`tls init`)."""
    parser.add_argument("dir", metavar="DIR", help=dir_help)
    parser.add_argument("--force", action="store_true", help="replace an existing CA in DIR")
    parser.add_argument("--days", type=int, default=3650, help="validity (default 3650)")
    parser.add_argument(
        "--permit", action="append", default=[], metavar=permit_metavar, help=permit_help
    )


# The token and tls parsers are defined here, not beside their commands: building the
# parser must not import the trust and TLS code (every `get` would pay for it).


def _add_token_parser(sub: Any) -> None:
    token = sub.add_parser("token", help="cluster secret and host credentials (identity)")
    actions = token.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    init = actions.add_parser("init", help="make a cluster secret file (for schedulers)")
    init.add_argument("--secret-file", required=True, metavar="FILE")
    init.add_argument("--cluster", default="", help="the cluster's name (default: random)")
    rotate = actions.add_parser(
        "rotate", help="a new current key; older keys keep verifying what they issued"
    )
    rotate.add_argument("--secret-file", required=True, metavar="FILE")
    rotate.add_argument("--keep", type=int, default=1, help="previous keys kept (default 1)")
    new = actions.add_parser("new", help="make a host credential (for a peer or seed peer)")
    new.add_argument("--secret-file", required=True, metavar="FILE")
    new.add_argument("--role", required=True, choices=("peer", "seed-peer"))
    new.add_argument("--host-id", required=True, metavar="ID", help="the host's ID, unique")
    new.add_argument("--ttl", default="365d", help="validity (default 365d)")
    new.add_argument("-o", "--output", required=True, metavar="FILE")


def _add_tls_parser(sub: Any) -> None:
    tls = sub.add_parser(
        "tls", help="the cluster's CA and host certificates (TLS on scheduler and upload ports)"
    )
    actions = tls.add_subparsers(dest="tls_command", metavar="ACTION", required=True)
    init = actions.add_parser("init", help="make DIR/ca.pem and DIR/ca.key, the cluster's CA")
    _add_ca_init_args(
        init,
        dir_help=None,
        permit_metavar="NET|DOMAIN",
        permit_help="name constraint: the CA vouches for these networks and domains only "
        "(repeatable; e.g. the cluster's 10.0.0.0/8)",
    )
    new = actions.add_parser(
        "new", help="make PREFIX.pem and PREFIX.key, a host's certificate signed by the CA"
    )
    new.add_argument("--ca", required=True, metavar="DIR", help="the directory of `tls init`")
    new.add_argument(
        "--ip",
        action="append",
        default=[],
        metavar="IP",
        help="an address the host is reached at (repeatable): a peer's host.ip, "
        "a scheduler's address in scheduler.addresses",
    )
    new.add_argument(
        "--name", action="append", default=[], metavar="DNS", help="a DNS name (repeatable)"
    )
    new.add_argument("--days", type=int, default=397, help="validity (default 397)")
    new.add_argument("-o", "--output", required=True, metavar="PREFIX")


def _add_config_args(
    parser: argparse.ArgumentParser,
    *,
    subcommand: bool = False,
    config: bool = True,
    overrides_dest: str = "subcommand_overrides",
    set_help: str = "override one configuration key (repeatable)",
) -> None:
    """--config, --set and --log-level, accepted before and after a subcommand.

    A subcommand's copies default to SUPPRESS: argparse copies every attribute
    of the subcommand's namespace over the main one, so a real default there
    would erase values given before the subcommand. Its --set collects into its
    own list (`overrides_dest`), which main() appends to the one given before it.
    """
    default = argparse.SUPPRESS if subcommand else None
    if config:
        parser.add_argument(
            "--config", metavar="FILE", help="TOML configuration file", default=default
        )
    parser.add_argument(
        "--set",
        metavar="SECTION.KEY=VALUE",
        action="append",
        default=argparse.SUPPRESS if subcommand else [],
        dest=overrides_dest if subcommand else "overrides",
        help=set_help,
    )
    parser.add_argument("--log-level", choices=LEVELS, help="overrides log.level", default=default)


def _overrides(args: argparse.Namespace) -> list[str]:
    """--set items in command-line order, then --log-level (the more specific option)."""
    overrides = [
        *args.overrides,
        *getattr(args, "subcommand_overrides", []),
        *getattr(args, "check_overrides", []),
    ]
    if args.log_level:
        overrides.append(f"log.level={args.log_level}")
    return overrides


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sim"]:
        from dragonfly.sim.cli import main as sim_main

        return sim_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None and args.role is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.command == "config":
        return _config_command(args)
    if args.command == "ca":
        from dragonfly.ca import ca_command

        return ca_command(args)
    if args.command == "token":
        from dragonfly.credentials import token_command

        return token_command(args)
    if args.command == "tls":
        from dragonfly.cluster_tls import tls_command

        return tls_command(args)
    if args.command == "cluster":
        return _cluster_command(args)
    if args.command == "proxy-user":
        from dragonfly.proxy_user import proxy_user_command

        return proxy_user_command(args)

    role = args.role or {"get": "peer", "sim": "scheduler"}[args.command]
    try:
        cfg, sources = load_config_sources(role, args.config, overrides=_overrides(args))
        if args.command != "get":  # (get checks them when it runs a peer itself)
            _check_files(cfg)
    except ConfigError as exc:
        print(f"dragonfly: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # `get` is a client: only warnings unless asked, so its output stays readable.
    quiet = args.command == "get" and not args.log_level and not _overrides_log_level(args)
    redacted = cfg.proxy.filtered_query_params if isinstance(cfg, PeerConfig) else []
    configure("warning" if quiet else cfg.log.level, cfg.log.format, redacted_params=redacted)
    for key in sources:
        reason = reserved_reason(role, key)
        if reason is not None:
            get_logger("dragonfly.config").warning(
                "a reserved key is set", key=key, source=sources[key], reserved=reason
            )
    if args.command == "get":
        from dragonfly.get import run_get

        assert isinstance(cfg, PeerConfig)
        return run_get(args, cfg)
    runner = _role_runner(role)
    if role != "manager":
        # The cluster secret or host credential: missing or readable by others stops the
        # start with the key's name and the command that makes one.
        from dragonfly.config import SchedulerConfig
        from dragonfly.credentials import check_trust_files

        assert isinstance(cfg, (PeerConfig, SchedulerConfig))
        try:
            check_trust_files(cfg)
        except ConfigError as exc:
            print(f"dragonfly: configuration error: {exc}", file=sys.stderr)
            return EXIT_USAGE
    return runner(cfg)


def _check_files(cfg: RoleConfig) -> None:
    """Files the configuration names (CA certificates and keys), checked before a start
    (the daemon's and `get`'s one-shot peer's) and by `config check`, so a bad one is a
    ConfigError naming its key instead of a traceback."""
    from dragonfly.cluster_tls import check_tls_files
    from dragonfly.config import SchedulerConfig

    if isinstance(cfg, PeerConfig):
        from dragonfly.net.tls import check_peer_files
        from dragonfly.peer.exposure import check_proxy_files

        check_peer_files(cfg)
        check_proxy_files(cfg.proxy)
    if isinstance(cfg, (PeerConfig, SchedulerConfig)):
        check_tls_files(cfg)


def _config_command(args: argparse.Namespace) -> int:
    role = args.config_role
    if role is None:
        print("dragonfly: config needs --role ROLE", file=sys.stderr)
        return EXIT_USAGE
    if args.defaults:
        sys.stdout.write(render_toml(role))
        return EXIT_OK
    path = getattr(args, "file", None) or args.config
    try:
        cfg, sources = load_config_sources(role, path, overrides=_overrides(args))
        _check_files(cfg)
    except ConfigError as exc:
        print(f"dragonfly: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    sys.stdout.write(render_effective(role, cfg, sources))
    return EXIT_OK


def _cluster_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dragonfly.cluster import run_cluster

    if min(args.schedulers, args.seed_peers, args.peers) < 0 or args.schedulers < 1:
        print(
            "dragonfly: cluster needs at least one scheduler and no negative counts",
            file=sys.stderr,
        )
        return EXIT_USAGE
    configs = [*([args.config] if args.config else []), *getattr(args, "cluster_configs", [])]
    return run_cluster(
        Path(args.workdir),
        args.schedulers,
        args.seed_peers,
        args.peers,
        configs=configs,
        overrides=_overrides(args),
        tls=args.tls,
        manager=not args.no_manager,
    )


def _overrides_log_level(args: argparse.Namespace) -> bool:
    return any(item.startswith("log.level=") for item in _overrides(args))
