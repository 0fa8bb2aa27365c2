"""Cluster secrets and host credentials on disk, and `python -m dragonfly token`.

The files are JSON, owner-only (mode 0600, checked at load: a secret others can read
is no secret). What they mean is dragonfly/trust.py's business; this module reads and
writes them and turns a missing or bad one into a configuration error that names the
key and the command that makes it.

    python -m dragonfly token init --secret-file F [--cluster NAME]
    python -m dragonfly token rotate --secret-file F [--keep N]
    python -m dragonfly token new --secret-file F --role ROLE --host-id ID [--ttl 365d] -o FILE
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dragonfly.config import ConfigError, PeerConfig, SchedulerConfig
from dragonfly.trust import ClusterKey, Credential, SecretRing, TrustError, issue
from dragonfly.units import parse_duration
from dragonfly.wire.messages import Claims

STARTUP = "startup check"  # the source named in configuration errors found at start
DEFAULT_TTL = 365 * 86400.0
INIT_COMMAND = "python -m dragonfly token init --secret-file FILE"
NEW_COMMAND = "python -m dragonfly token new --secret-file FILE --role ROLE --host-id ID -o FILE"


class CredentialFileError(ValueError):
    """A secret or credential file that cannot be used; the message says why."""


# ---------------------------------------------------------------- files


def _read_private(path: Path) -> Any:
    """The JSON of an owner-only regular file (never through a symlink)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise CredentialFileError(f"cannot read {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise CredentialFileError(f"{path} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise CredentialFileError(
                f"{path} is readable by others (mode {mode:04o}): chmod 600 {path}"
            )
        data = f.read(1 << 16)
    try:
        return json.loads(data)
    except ValueError as exc:
        raise CredentialFileError(f"{path} is not JSON: {exc}") from None


def _write_private(path: Path, doc: dict[str, Any], *, replace: bool) -> None:
    """Write JSON owner-only, atomically (a temporary file renamed into place)."""
    if not replace and os.path.lexists(path):
        raise CredentialFileError(f"{path} exists (not replaced)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_secret_file(path: str | os.PathLike[str]) -> SecretRing:
    doc = _read_private(Path(path))
    try:
        keys = tuple(ClusterKey(k["id"], bytes.fromhex(k["secret"])) for k in doc["keys"])
        return SecretRing(str(doc["cluster"]), keys)
    except (KeyError, TypeError, ValueError) as exc:  # TrustError is a ValueError
        raise CredentialFileError(f"{path} is not a cluster secret file: {exc}") from None


def write_secret_file(path: str | os.PathLike[str], ring: SecretRing, *, replace: bool) -> None:
    doc = {
        "cluster": ring.cluster,
        "keys": [{"id": k.key_id, "secret": k.secret.hex()} for k in ring.keys],
    }
    _write_private(Path(path), doc, replace=replace)


def read_credential_file(path: str | os.PathLike[str]) -> Credential:
    doc = _read_private(Path(path))
    try:
        c = doc["claims"]
        claims = Claims(
            cluster=str(c["cluster"]),
            host_id=str(c["host_id"]),
            role=str(c["role"]),
            issued_at=int(c["issued_at"]),
            expires_at=int(c["expires_at"]),
            key_id=str(c["key_id"]),
        )
        key = bytes.fromhex(doc["host_key"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CredentialFileError(f"{path} is not a host credential: {exc}") from None
    if len(key) != 32:
        raise CredentialFileError(f"{path}: host_key must be 32 bytes, got {len(key)}")
    return Credential(claims, key)


def write_credential_file(path: str | os.PathLike[str], credential: Credential) -> None:
    c = credential.claims
    doc = {
        "claims": {
            "cluster": c.cluster,
            "host_id": c.host_id,
            "role": c.role,
            "issued_at": c.issued_at,
            "expires_at": c.expires_at,
            "key_id": c.key_id,
        },
        "host_key": credential.host_key.hex(),
    }
    _write_private(Path(path), doc, replace=True)


# ---------------------------------------------------------------- what a role starts with


def scheduler_secrets(cfg: SchedulerConfig) -> SecretRing | None:
    """The cluster secret a scheduler verifies hosts with; None in insecure mode.
    ConfigError naming trust.secret_file when it is missing or unusable."""
    trust = cfg.trust
    if trust.insecure:
        return None
    if not trust.secret_file:
        raise ConfigError(
            STARTUP,
            "trust.secret_file",
            f"no cluster secret: make one with `{INIT_COMMAND}` and set trust.secret_file, "
            "or set trust.insecure = true (trusted networks only)",
        )
    try:
        return read_secret_file(os.path.expanduser(trust.secret_file))
    except CredentialFileError as exc:
        raise ConfigError(STARTUP, "trust.secret_file", str(exc)) from None


def peer_credential(cfg: PeerConfig, *, now: float | None = None) -> Credential | None:
    """The credential a peer proves itself with; None in insecure mode or, without one,
    for a peer with no scheduler (it then serves no piece to anyone). ConfigError naming
    trust.credential_file otherwise."""
    trust = cfg.trust
    role = "seed-peer" if cfg.seed.enabled else "peer"
    if trust.insecure:
        return None
    if not trust.credential_file:
        if not cfg.scheduler.addresses:
            return None
        raise ConfigError(
            STARTUP,
            "trust.credential_file",
            f"no host credential: make one with `{NEW_COMMAND}` (the --role {role}) and set "
            "trust.credential_file, or set trust.insecure = true (trusted networks only)",
        )
    key = "trust.credential_file"
    try:
        credential = read_credential_file(os.path.expanduser(trust.credential_file))
        credential.check_time(time.time() if now is None else now)
    except (CredentialFileError, TrustError) as exc:
        raise ConfigError(STARTUP, key, str(exc)) from None
    if credential.claims.role != role:
        raise ConfigError(
            STARTUP,
            key,
            f"the credential is for a {credential.claims.role}, this daemon is a {role} "
            f"(make one with --role {role})",
        )
    return credential


def check_trust_files(cfg: PeerConfig | SchedulerConfig) -> None:
    """ConfigError naming the key if the role's secret or credential cannot be used
    (the daemon loads it again when it starts)."""
    if isinstance(cfg, SchedulerConfig):
        scheduler_secrets(cfg)
    else:
        peer_credential(cfg)


# ---------------------------------------------------------------- `token`


def add_token_parser(sub: Any) -> None:
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


def token_command(args: argparse.Namespace) -> int:
    try:
        if args.token_command == "init":
            ring = SecretRing.new(args.cluster or f"dragonfly-{os.urandom(4).hex()}")
            write_secret_file(args.secret_file, ring, replace=False)
            print(
                f"wrote {args.secret_file}: cluster {ring.cluster}, key {ring.current.key_id}\n"
                f"schedulers: --set trust.secret_file={args.secret_file}\n"
                f"hosts: python -m dragonfly token new --secret-file {args.secret_file} "
                "--role peer|seed-peer --host-id ID -o FILE"
            )
        elif args.token_command == "rotate":
            ring = read_secret_file(args.secret_file).rotated(keep=args.keep)
            write_secret_file(args.secret_file, ring, replace=True)
            print(f"{args.secret_file}: new key {ring.current.key_id}, keys {len(ring.keys)}")
        else:
            try:
                ttl = parse_duration(args.ttl)
            except ValueError as exc:
                print(f"dragonfly token new: --ttl: {exc}", file=sys.stderr)
                return 2
            ring = read_secret_file(args.secret_file)
            credential = issue(ring, host_id=args.host_id, role=args.role, now=time.time(), ttl=ttl)
            write_credential_file(args.output, credential)
            print(
                f"wrote {args.output}: {args.role} {args.host_id} of cluster {ring.cluster}, "
                f"until {time.strftime('%Y-%m-%d', time.gmtime(credential.claims.expires_at))}\n"
                f"that host: --set trust.credential_file={args.output}"
            )
    except (CredentialFileError, TrustError, OSError) as exc:
        print(f"dragonfly token {args.token_command}: {exc}", file=sys.stderr)
        return 1
    return 0
