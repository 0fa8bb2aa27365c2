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

from dragonfly.config import ConfigError, PeerConfig, SchedulerConfig, data_dir
from dragonfly.trust import ClusterKey, Credential, SecretRing, TrustError, issue
from dragonfly.units import parse_duration
from dragonfly.wire.messages import Claims

STARTUP = "startup check"  # the source named in configuration errors found at start
DEFAULT_TTL = 365 * 86400.0
CREDENTIAL_NAME = "credential.json"  # in a peer's data directory, when the manager issued it
INIT_COMMAND = "python -m dragonfly token init --secret-file FILE"
NEW_COMMAND = "python -m dragonfly token new --secret-file FILE --role ROLE --host-id ID -o FILE"


class CredentialFileError(ValueError):
    """A secret or credential file that cannot be used; the message says why."""


# ---------------------------------------------------------------- files


def _read_private(path: Path) -> Any:
    """The JSON of an owner-only regular file (never through a symlink)."""
    data = _read_private_bytes(path)
    try:
        return json.loads(data)
    except ValueError as exc:
        raise CredentialFileError(f"{path} is not JSON: {exc}") from None


def _read_private_bytes(path: Path) -> bytes:
    """The bytes of an owner-only regular file (never through a symlink)."""
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
        return f.read(1 << 16)


def _write_private(path: Path, doc: dict[str, Any], *, replace: bool) -> None:
    """Write JSON owner-only, atomically (a temporary file renamed into place)."""
    write_private_text(path, json.dumps(doc, indent=2) + "\n", replace=replace)


def write_private_text(path: Path, text: str, *, replace: bool) -> None:
    """Write `text` owner-only, atomically (a temporary file renamed into place)."""
    if not replace and os.path.lexists(path):
        raise CredentialFileError(f"{path} exists (not replaced)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ring_doc(ring: SecretRing) -> dict[str, Any]:
    """A cluster secret as its file (and the manager's answer to a scheduler) has it."""
    return {
        "cluster": ring.cluster,
        "keys": [{"id": k.key_id, "secret": k.secret.hex()} for k in ring.keys],
    }


def ring_from_doc(doc: Any, source: str = "the answer") -> SecretRing:
    try:
        keys = tuple(ClusterKey(k["id"], bytes.fromhex(k["secret"])) for k in doc["keys"])
        return SecretRing(str(doc["cluster"]), keys)
    except (KeyError, TypeError, ValueError) as exc:  # TrustError is a ValueError
        raise CredentialFileError(f"{source} is not a cluster secret file: {exc}") from None


def credential_doc(credential: Credential) -> dict[str, Any]:
    """A host credential as its file (and the manager's answer to a join) has it."""
    c = credential.claims
    return {
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


def credential_from_doc(doc: Any, source: str = "the answer") -> Credential:
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
        raise CredentialFileError(f"{source} is not a host credential: {exc}") from None
    if len(key) != 32:
        raise CredentialFileError(f"{source}: host_key must be 32 bytes, got {len(key)}")
    return Credential(claims, key)


def read_secret_file(path: str | os.PathLike[str]) -> SecretRing:
    return ring_from_doc(_read_private(Path(path)), str(path))


def write_secret_file(path: str | os.PathLike[str], ring: SecretRing, *, replace: bool) -> None:
    _write_private(Path(path), ring_doc(ring), replace=replace)


def read_credential_file(path: str | os.PathLike[str]) -> Credential:
    return credential_from_doc(_read_private(Path(path)), str(path))


def write_credential_file(path: str | os.PathLike[str], credential: Credential) -> None:
    _write_private(Path(path), credential_doc(credential), replace=True)


def read_join_token(path: str | os.PathLike[str]) -> str:
    """The join token in an owner-only file (one line)."""
    raw = _read_private_bytes(Path(path))
    token = raw.decode("ascii", errors="replace").strip()
    if not token or len(token) > 256 or not token.isprintable() or " " in token:
        raise CredentialFileError(f"{path} does not hold a join token (one line, no spaces)")
    return token


# ---------------------------------------------------------------- what a role starts with


def scheduler_secrets(cfg: SchedulerConfig) -> SecretRing | None:
    """The cluster secret a scheduler verifies hosts with; None in insecure mode and for
    a scheduler that gets it from the manager (trust.join_token_file). ConfigError naming
    trust.secret_file when it is missing or unusable."""
    trust = cfg.trust
    if trust.insecure or trust.join_token_file:
        return None
    if not trust.secret_file:
        raise ConfigError(
            STARTUP,
            "trust.secret_file",
            f"no cluster secret: make one with `{INIT_COMMAND}` and set trust.secret_file, "
            "set trust.join_token_file to get it from the manager, "
            "or set trust.insecure = true (trusted networks only)",
        )
    try:
        return read_secret_file(os.path.expanduser(trust.secret_file))
    except CredentialFileError as exc:
        raise ConfigError(STARTUP, "trust.secret_file", str(exc)) from None


def join_token(cfg: PeerConfig | SchedulerConfig) -> str | None:
    """The join token the role presents to the manager, if it has one (ConfigError naming
    trust.join_token_file when the file cannot be used)."""
    if not cfg.trust.join_token_file:
        return None
    try:
        return read_join_token(os.path.expanduser(cfg.trust.join_token_file))
    except CredentialFileError as exc:
        raise ConfigError(STARTUP, "trust.join_token_file", str(exc)) from None


def credential_path(cfg: PeerConfig) -> Path:
    """Where a peer's credential is (or, issued by the manager, is kept)."""
    if cfg.trust.credential_file:
        return Path(os.path.expanduser(cfg.trust.credential_file))
    return data_dir(cfg.storage) / CREDENTIAL_NAME


def peer_credential(cfg: PeerConfig, *, now: float | None = None) -> Credential | None:
    """The credential a peer proves itself with; None in insecure mode, without one for a
    peer with no scheduler and no manager (it then serves no piece to anyone), and for a
    peer that joins at the manager (trust.join_token_file) and has no credential that
    holds for a third of its lifetime more. ConfigError naming trust.credential_file
    otherwise."""
    trust = cfg.trust
    role = "seed-peer" if cfg.seed.enabled else "peer"
    if trust.insecure:
        return None
    now = time.time() if now is None else now
    key = "trust.credential_file"
    if trust.join_token_file:
        path = credential_path(cfg)
        if not os.path.lexists(path):
            return None
        try:
            credential = read_credential_file(path)
        except CredentialFileError as exc:
            raise ConfigError(STARTUP, key, str(exc)) from None
        claims = credential.claims
        if (
            claims.role != role
            or now >= claims.expires_at - (claims.expires_at - claims.issued_at) / 3
        ):
            return None  # a new one is asked for
        return credential
    if not trust.credential_file:
        if not cfg.scheduler.addresses and not cfg.scheduler.manager:
            return None
        raise ConfigError(
            STARTUP,
            key,
            f"no host credential: make one with `{NEW_COMMAND}` (the --role {role}) and set "
            "trust.credential_file, set trust.join_token_file to join at the manager, "
            "or set trust.insecure = true (trusted networks only)",
        )
    try:
        credential = read_credential_file(os.path.expanduser(trust.credential_file))
        credential.check_time(now)
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
    """ConfigError naming the key if the role's secret, credential or join token cannot
    be used (the daemon loads it again when it starts)."""
    join_token(cfg)
    if isinstance(cfg, SchedulerConfig):
        scheduler_secrets(cfg)
    else:
        peer_credential(cfg)


# ---------------------------------------------------------------- `token`


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
