"""Command line: `python -m dragonfly --role ROLE` and the subcommands.

Exit codes: 0 success, 1 a failed operation, 2 bad usage or configuration,
3 a part that is not built yet.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from dragonfly import __version__
from dragonfly.config import ROLES, ConfigError, PeerConfig, RoleConfig, load_config, render_toml
from dragonfly.log import LEVELS, configure

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_BUILT = 3

ROLE_HELP = {
    "manager": "clusters, keepalive, dynamic config, preheat jobs, web console",
    "scheduler": "decides who downloads which piece from whom",
    "seed-peer": "a peer that fetches from the origin first: the root of the P2P tree",
    "peer": "HTTP proxy, download engine and upload server on every host",
}

# A role is runnable once dragonfly.nursery has a runner for it: a callable
# taking the validated config and returning the exit code.
RoleRunner = Callable[[RoleConfig], int]


def _role_runner(role: str) -> RoleRunner | None:
    from dragonfly import nursery

    runners: dict[str, RoleRunner] = getattr(nursery, "RUNNERS", {})
    return runners.get(role)


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
        "\nExit codes: 0 ok, 1 failed, 2 bad usage or config, 3 not built yet.",
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

    cluster = sub.add_parser("cluster", help="run a local cluster of roles on loopback")
    cluster.add_argument("--schedulers", type=int, default=1)
    cluster.add_argument("--seed-peers", type=int, default=1)
    cluster.add_argument("--peers", type=int, default=3)
    cluster.add_argument("--workdir", required=True, help="directory for data, logs, cluster.json")
    _add_config_args(cluster, subcommand=True)

    # The simulation has options of its own: `main` hands everything after `sim` to it.
    sub.add_parser("sim", help="simulate a swarm in virtual time (sim --help lists its options)")

    ca = sub.add_parser("ca", help="the CA for HTTPS interception (proxy.hijack_https)")
    ca_sub = ca.add_subparsers(dest="ca_command", metavar="ACTION", required=True)
    ca_init = ca_sub.add_parser(
        "init", help="make DIR/ca.pem and DIR/ca.key and print how to use and trust them"
    )
    ca_init.add_argument("dir", metavar="DIR", help="directory for ca.pem and ca.key")
    ca_init.add_argument("--force", action="store_true", help="replace an existing CA in DIR")
    ca_init.add_argument("--name", default="Dragonfly proxy CA", help="the CA's common name")
    ca_init.add_argument("--days", type=int, default=3650, help="validity (default 3650)")
    ca_init.add_argument(
        "--permit",
        action="append",
        default=[],
        metavar="DOMAIN",
        help="name constraint: the CA vouches for DOMAIN and its subdomains only (repeatable; "
        "an IP network works too); recommended",
    )

    users = sub.add_parser(
        "proxy-user", help="add or replace a user of proxy.auth_file (password from stdin)"
    )
    users.add_argument("file", metavar="FILE", help="the auth file (made 0600 if new)")
    users.add_argument("user", metavar="USER")

    conf = sub.add_parser("config", help="print a role's configuration")
    conf.add_argument("--role", dest="config_role", choices=ROLES, required=True)
    conf.add_argument(
        "--defaults", action="store_true", help="print the documented defaults as TOML"
    )
    _add_config_args(conf, subcommand=True)
    return parser


def _add_config_args(parser: argparse.ArgumentParser, *, subcommand: bool = False) -> None:
    """--config, --set and --log-level, accepted before and after a subcommand.

    A subcommand's copies default to SUPPRESS: argparse copies every attribute
    of the subcommand's namespace over the main one, so a real default there
    would erase values given before the subcommand. Its --set collects into its
    own list, which main() appends to the one given before the subcommand.
    """
    suppress: dict[str, object] = {"default": argparse.SUPPRESS} if subcommand else {}
    parser.add_argument("--config", metavar="FILE", help="TOML configuration file", **suppress)
    parser.add_argument(
        "--set",
        metavar="SECTION.KEY=VALUE",
        action="append",
        default=argparse.SUPPRESS if subcommand else [],
        dest="subcommand_overrides" if subcommand else "overrides",
        help="override one configuration key (repeatable)",
    )
    parser.add_argument("--log-level", choices=LEVELS, help="overrides log.level", **suppress)


def _overrides(args: argparse.Namespace) -> list[str]:
    """--set items in command-line order, then --log-level (the more specific option)."""
    overrides = [*args.overrides, *getattr(args, "subcommand_overrides", [])]
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
    if args.command == "proxy-user":
        from dragonfly.proxy_user import proxy_user_command

        return proxy_user_command(args)

    role = args.role or {"get": "peer", "cluster": "peer", "sim": "scheduler"}[args.command]
    try:
        cfg = load_config(role, args.config, overrides=_overrides(args))
    except ConfigError as exc:
        print(f"dragonfly: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # `get` is a client: only warnings unless asked, so its output stays readable.
    quiet = args.command == "get" and not args.log_level and not _overrides_log_level(args)
    redacted = cfg.proxy.filtered_query_params if isinstance(cfg, PeerConfig) else []
    configure("warning" if quiet else cfg.log.level, cfg.log.format, redacted_params=redacted)
    if isinstance(cfg, PeerConfig):
        # Files the configuration names (CA certificates and keys) are checked here, for
        # the daemon and `get`'s one-shot peer alike, so a bad one stops the start with
        # the key's name instead of a traceback.
        from dragonfly.net.tls import check_peer_files
        from dragonfly.peer.exposure import check_proxy_files

        try:
            check_peer_files(cfg)
            check_proxy_files(cfg.proxy)
        except ConfigError as exc:
            print(f"dragonfly: configuration error: {exc}", file=sys.stderr)
            return EXIT_USAGE
    if args.command == "get":
        from dragonfly.get import run_get

        assert isinstance(cfg, PeerConfig)
        return run_get(args, cfg)
    if args.command == "cluster":
        from pathlib import Path

        from dragonfly.cluster import run_cluster

        if min(args.schedulers, args.seed_peers, args.peers) < 0 or args.schedulers < 1:
            print(
                "dragonfly: cluster needs at least one scheduler and no negative counts",
                file=sys.stderr,
            )
            return EXIT_USAGE
        return run_cluster(Path(args.workdir), args.schedulers, args.seed_peers, args.peers)
    if args.command is not None:
        print(f"dragonfly: '{args.command}' is not built yet", file=sys.stderr)
        return EXIT_NOT_BUILT
    runner = _role_runner(role)
    if runner is None:
        print(f"dragonfly: role '{role}' is not built yet", file=sys.stderr)
        return EXIT_NOT_BUILT
    return runner(cfg)


def _config_command(args: argparse.Namespace) -> int:
    if args.defaults:
        sys.stdout.write(render_toml(args.config_role))
        return EXIT_OK
    try:
        cfg = load_config(args.config_role, args.config, overrides=_overrides(args))
    except ConfigError as exc:
        print(f"dragonfly: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(cfg)
    return EXIT_OK


def _overrides_log_level(args: argparse.Namespace) -> bool:
    return any(item.startswith("log.level=") for item in _overrides(args))
