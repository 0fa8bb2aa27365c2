"""TLS on the cluster's own ports, and `python -m dragonfly tls`.

Off by default. With it, a scheduler serves wss:// (and https for /metrics, /healthy)
with `server.tls_cert`, a peer its upload port (pieces over https, announcements over
wss) with `upload.tls_cert`, and says so in its HostInfo (`tls`), which the scheduler
passes on in every ParentInfo. A peer verifies schedulers and parents against
`trust.ca_file`, the cluster's own CA, and nothing else: the system's CAs would let any
public certificate for a name or address pass for a cluster member. A parent is
reached at its `host.ip`, so its certificate must name that address (an IP SAN); a
scheduler's, the host of its wss:// address.

Certificates come from the `openssl` command line (dragonfly/net/tls.py), as the
interception CA's do:

    python -m dragonfly tls init DIR [--permit 10.0.0.0/8]
    python -m dragonfly tls new --ca DIR --ip 10.0.0.5 [--name host.example] -o DIR/host

Identity stays with the credentials (dragonfly/trust.py): TLS keeps what crosses the
network (tickets, headers, piece bytes) from being read or replayed by whoever sees it.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import shlex
import ssl
import sys
import tempfile
from pathlib import Path

from dragonfly.config import ConfigError, PeerConfig, SchedulerConfig
from dragonfly.net.tls import (
    STARTUP,
    CAFiles,
    TLSError,
    check_ca,
    check_key_mode,
    make_ca,
    make_leaf,
    openssl,
    server_context,
)

CA_NAME = "Dragonfly cluster CA"
NEW_COMMAND = "python -m dragonfly tls new --ca DIR --ip IP -o PREFIX"


# ---------------------------------------------------------------- from configuration


def listener_tls(cert: str, key: str, section: str) -> ssl.SSLContext | None:
    """The server context of a listener's `SECTION.tls_cert` and `tls_key`; None when
    they are unset. ConfigError naming the key of a file that is missing, unreadable,
    open to others (the key), or that does not go with the other."""
    if not cert and not key:
        return None
    for name, path in (("tls_cert", cert), ("tls_key", key)):
        if not path:  # (load_config refuses one without the other; said again for callers)
            raise ConfigError(STARTUP, f"{section}.{name}", "required with the other TLS file")
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            raise ConfigError(STARTUP, f"{section}.{name}", f"cannot read {path}")
    check_key_mode(key, f"{section}.tls_key", "a TLS key")
    try:
        return server_context(Path(cert), Path(key))
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise ConfigError(
                STARTUP, f"{section}.tls_key", f"{key} is not the key of {cert}"
            ) from None
        raise ConfigError(
            STARTUP, f"{section}.tls_cert", f"{cert} with {key}: not a usable PEM pair: {exc}"
        ) from None


def scheduler_tls(cfg: SchedulerConfig) -> ssl.SSLContext | None:
    """The scheduler's server context (server.tls_cert, server.tls_key), or None."""
    return listener_tls(cfg.server.tls_cert, cfg.server.tls_key, "server")


def upload_tls(cfg: PeerConfig) -> ssl.SSLContext | None:
    """The upload port's server context, or None. Its certificate must name host.ip,
    where children reach this host and check it: a ConfigError naming
    upload.tls_cert otherwise, rather than a peer every child refuses."""
    ctx = listener_tls(cfg.upload.tls_cert, cfg.upload.tls_key, "upload")
    if ctx is None:
        return None
    address = cfg.host.ip
    try:
        ipaddress.ip_address(address)
        flag = "-checkip"
    except ValueError:
        flag = "-checkhost"
    try:
        answer = openssl("x509", "-noout", "-in", cfg.upload.tls_cert, flag, address)
    except TLSError as exc:
        raise ConfigError(STARTUP, "upload.tls_cert", str(exc)) from None
    if b"does match" not in answer:
        raise ConfigError(
            STARTUP,
            "upload.tls_cert",
            f"{cfg.upload.tls_cert} does not name host.ip {address}, where children reach "
            f"and verify this host: make one with `tls new --ip {address}`",
        )
    return ctx


def cluster_client_tls(cfg: PeerConfig) -> ssl.SSLContext | None:
    """How a peer verifies wss:// schedulers and TLS parents: trust.ca_file's CA only,
    the host name or address checked. None without trust.ca_file (then a TLS parent
    cannot be verified, and is not used)."""
    path = cfg.trust.ca_file
    if not path:
        return None
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise ConfigError(STARTUP, "trust.ca_file", f"cannot read {path}")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, names checked
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_verify_locations(cafile=path)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(
            STARTUP, "trust.ca_file", f"{path} holds no usable PEM certificate: {exc}"
        ) from None
    return ctx


def check_tls_files(cfg: PeerConfig | SchedulerConfig) -> None:
    """ConfigError naming the key of the first TLS file that cannot be used (the daemon
    loads them again when it starts)."""
    if isinstance(cfg, SchedulerConfig):
        scheduler_tls(cfg)
    else:
        upload_tls(cfg)
        cluster_client_tls(cfg)


# ---------------------------------------------------------------- `tls`


def tls_command(args: argparse.Namespace) -> int:
    try:
        if args.tls_command == "init":
            ca = make_ca(
                Path(args.dir).absolute(),
                name=CA_NAME,
                days=args.days,
                force=args.force,
                permit=args.permit,
            )
            print(
                f"wrote {ca.cert} (give it to every peer: trust.ca_file)\n"
                f"  and {ca.key} (mode 0600: keep it where certificates are made)\n"
                f"hosts: {NEW_COMMAND.replace('DIR', shlex.quote(str(ca.cert.parent)))}"
            )
            return 0
        if not args.ip and not args.name:
            print("dragonfly tls new: name the host with --ip and/or --name", file=sys.stderr)
            return 2
        for ip in args.ip:
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                print(f"dragonfly tls new: --ip {ip!r} is not an IP address", file=sys.stderr)
                return 2
        ca = CAFiles(Path(args.ca) / "ca.pem", Path(args.ca) / "ca.key")
        check_ca(ca)
        cert, key = new_host_certificate(ca, [*args.ip, *args.name], Path(args.output), args.days)
        print(
            f"wrote {cert} and {key} (mode 0600)\n"
            f"a peer: --set upload.tls_cert={shlex.quote(str(cert))} "
            f"--set upload.tls_key={shlex.quote(str(key))}\n"
            f"a scheduler: --set server.tls_cert={shlex.quote(str(cert))} "
            f"--set server.tls_key={shlex.quote(str(key))}"
        )
    except (FileExistsError, TLSError, OSError) as exc:
        print(f"dragonfly tls {args.tls_command}: {exc}", file=sys.stderr)
        return 1
    return 0


def new_host_certificate(
    ca: CAFiles, hosts: list[str], prefix: Path, days: int = 397
) -> tuple[Path, Path]:
    """PREFIX.pem and PREFIX.key (0600): a server certificate for `hosts`, signed by `ca`.
    Made under temporary names beside them and renamed into place: the key is never
    readable by others, and an interrupted run leaves no half-made pair."""
    prefix = prefix.absolute()
    prefix.parent.mkdir(parents=True, exist_ok=True)
    cert, key = prefix.with_name(prefix.name + ".pem"), prefix.with_name(prefix.name + ".key")
    with tempfile.TemporaryDirectory(dir=prefix.parent, prefix=".tls-") as tmp:
        made_cert, made_key = Path(tmp) / "host.pem", Path(tmp) / "host.key"
        make_leaf(ca, hosts, made_cert, made_key, days=days)
        os.chmod(made_cert, 0o644)
        os.replace(made_key, key)
        os.replace(made_cert, cert)
    return cert, key
