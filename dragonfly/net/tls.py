"""Certificates for HTTPS interception, made with the `openssl` command line.

The proxy terminates TLS for hijacked hosts with a leaf certificate signed by a
CA the user made with `python -m dragonfly ca init DIR` and trusts on its
clients. Certificates are made by the `openssl` binary (already needed by the
project), not by the `cryptography` package: that one carries a compiled Rust
extension, and nothing else in the project needs one. The standard library's
`ssl` module loads the results and builds the TLS contexts.

Keys are EC P-256 (fast to make, accepted everywhere). Leaf certificates carry
what strict verifiers (Python 3.13's VERIFY_X509_STRICT, browsers) want:
subjectAltName, serverAuth, key identifiers, CA:FALSE. They are made on the fly
in a worker thread and cached in memory per host (`LeafCache`), bounded in number
(LRU) and in the rate at which new ones are made.

`make_ca(..., permit=[...])` writes a CA with X.509 name constraints: clients then
accept its certificates for the permitted names only, so its key, if stolen, cannot
impersonate any other site to them. The key's file mode is checked when a peer loads
it: a key that group or others can read is refused.
"""

from __future__ import annotations

import collections
import functools
import ipaddress
import os
import re
import secrets
import ssl
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import trio

from dragonfly.config import ConfigError, DownloadSection, HijackHTTPSSection, PeerConfig
from dragonfly.ratelimit import TokenBucket

CA_DAYS = 3650
# Leaf lifetime: under the 398 days clients accept for a server certificate.
LEAF_DAYS = 397
# A cached leaf is remade this long before it expires.
LEAF_RENEW_SECONDS = 7 * 86400
LEAF_CACHE_SIZE = 1024
LEAF_RATE = 60  # new leaf certificates a minute
OPENSSL_TIMEOUT = 30.0
STARTUP = "startup check"  # the source named in config errors found when files are read

_EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1")
# DNS names as a CONNECT can carry them (ASCII, IDNA already applied).
DNS_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?$")


class TLSError(Exception):
    """A certificate could not be made or loaded; the message says why."""


class LeafBudgetSpent(TLSError):
    """Too many new leaf certificates lately: this one is not made now."""


@dataclass(frozen=True)
class CAFiles:
    """A CA certificate and its private key (PEM files)."""

    cert: Path
    key: Path


def openssl(*args: str, cwd: Path | None = None) -> bytes:
    """Run the openssl CLI and return what it printed; TLSError with its stderr if it fails."""
    try:
        return subprocess.run(
            ["openssl", *args],
            check=True,
            capture_output=True,
            timeout=OPENSSL_TIMEOUT,
            cwd=cwd,
        ).stdout
    except FileNotFoundError:
        raise TLSError("the openssl command is not installed (apt-get install openssl)") from None
    except subprocess.CalledProcessError as exc:
        detail = exc.stderr.decode(errors="replace").strip().splitlines()
        raise TLSError(f"openssl {args[0]} failed: {' / '.join(detail[-3:])}") from None
    except subprocess.TimeoutExpired:
        raise TLSError(f"openssl {args[0]} took over {OPENSSL_TIMEOUT}s") from None


# ---------------------------------------------------------------- the CA


def name_constraints(permit: list[str]) -> str:
    """The nameConstraints extension value permitting `permit` (DNS names, which include
    their subdomains, or IP networks); '' for none. When no IP network is permitted,
    every IP address is excluded: DNS constraints alone leave IP SANs unconstrained."""
    subtrees: list[str] = []
    for item in permit:
        try:
            net = ipaddress.ip_network(item, strict=False)
        except ValueError:
            name = item.lower()
            if not is_dns_name(name.lstrip(".")):
                raise TLSError(f"--permit {item!r}: not a DNS name or an IP network") from None
            subtrees.append(f"permitted;DNS:{name}")
        else:
            subtrees.append(f"permitted;IP:{net.network_address}/{net.netmask}")
    if not subtrees:
        return ""
    if not any(";IP:" in t for t in subtrees):
        subtrees += ["excluded;IP:0.0.0.0/0.0.0.0", "excluded;IP:::/::"]
    return "critical," + ",".join(subtrees)


def make_ca(
    directory: Path,
    *,
    name: str = "Dragonfly proxy CA",
    days: int = CA_DAYS,
    force: bool = False,
    permit: list[str] | None = None,
) -> CAFiles:
    """Write DIRECTORY/ca.pem and DIRECTORY/ca.key (mode 0600).

    With `permit`, the CA may only vouch for those names (X.509 name constraints).
    FileExistsError if either exists and not `force`. Both files are written
    under temporary names and renamed into place: an interrupted run leaves
    no half-made CA, and the key is never readable by others, even briefly.
    """
    constraints = name_constraints(permit or [])
    directory.mkdir(parents=True, exist_ok=True)
    files = CAFiles(directory / "ca.pem", directory / "ca.key")
    if not force:
        for path in (files.cert, files.key):
            if path.exists():
                raise FileExistsError(f"{path} exists (use --force to replace it)")
    if not re.fullmatch(r"[A-Za-z0-9 ._-]{1,64}", name):
        raise TLSError(f"CA name {name!r}: use 1-64 letters, digits, spaces, '.', '_' or '-'")
    with tempfile.TemporaryDirectory(dir=directory, prefix=".ca-") as tmp:
        work = Path(tmp)  # mkdtemp makes it 0700: nothing inside is readable by others
        conf = work / "ca.cnf"
        conf.write_text(
            "[req]\ndistinguished_name = dn\nprompt = no\nx509_extensions = ext\n"
            f"[dn]\nCN = {name}\nO = Dragonfly\n"
            "[ext]\nbasicConstraints = critical,CA:TRUE,pathlen:0\n"
            "keyUsage = critical,keyCertSign,cRLSign\n"
            "subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid:always\n"
            + (f"nameConstraints = {constraints}\n" if constraints else "")
        )
        key, cert = work / "ca.key", work / "ca.pem"
        openssl("req", "-x509", *_EC, "-nodes", "-sha256", "-config", str(conf),
                "-keyout", str(key), "-out", str(cert), "-days", str(days),
                "-set_serial", _serial())  # fmt: skip
        os.chmod(key, 0o600)
        os.chmod(cert, 0o644)
        os.replace(key, files.key)
        os.replace(cert, files.cert)
    return files


def check_ca(ca: CAFiles) -> None:
    """TLSError unless both files load and the key belongs to the certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(str(ca.cert), str(ca.key))
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise TLSError(f"key {ca.key} does not belong to certificate {ca.cert}") from None
        raise TLSError(f"cannot load {ca.cert} with key {ca.key}: {exc}") from None
    # A leaf or other non-CA certificate would sign leaves that no client accepts.
    out = openssl("x509", "-noout", "-ext", "basicConstraints", "-in", str(ca.cert))
    if b"CA:TRUE" not in out:
        raise TLSError(f"{ca.cert} is not a CA certificate (no basicConstraints CA:TRUE)")


# ---------------------------------------------------------------- leaf certificates


def is_dns_name(name: str) -> bool:
    """A syntactically valid DNS host name (labels of letters, digits and hyphens)."""
    return DNS_NAME.match(name) is not None and ".." not in name


def host_san(host: str) -> str:
    """The subjectAltName entry naming `host` (IP or DNS); TLSError if it is neither."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return f"IP:{ipaddress.ip_address(bare)}"
    except ValueError:
        pass
    if not is_dns_name(bare):
        raise TLSError(f"{host!r} is not a host name or IP address")
    return f"DNS:{bare.lower()}"


def make_leaf(
    ca: CAFiles, hosts: list[str], cert_out: Path, key_out: Path, *, days: int = LEAF_DAYS
) -> None:
    """Write a server certificate for `hosts` (the first is its CN), signed by `ca`.

    Blocking (two openssl runs): from trio, call it in a worker thread.
    """
    if not hosts:
        raise TLSError("a leaf certificate needs at least one host")
    sans = [host_san(h) for h in hosts]
    common_name = sans[0].split(":", 1)[1][:64]
    with tempfile.TemporaryDirectory(prefix="dragonfly-leaf-") as tmp:
        work = Path(tmp)
        conf, csr = work / "leaf.cnf", work / "leaf.csr"
        # Our own config file: the system's openssl.cnf may add extensions of its own.
        conf.write_text(
            "[req]\ndistinguished_name = dn\nprompt = no\n"
            f"[dn]\nCN = {common_name}\n"
            "[ext]\nbasicConstraints = critical,CA:FALSE\n"
            "keyUsage = critical,digitalSignature\nextendedKeyUsage = serverAuth\n"
            "subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid,issuer\n"
            f"subjectAltName = {','.join(sans)}\n"
        )
        openssl("req", "-new", *_EC, "-nodes", "-config", str(conf),
                "-keyout", str(key_out), "-out", str(csr))  # fmt: skip
        os.chmod(key_out, 0o600)
        # -set_serial, not -CAcreateserial: that would write a serial file next to the
        # CA, whose directory the daemon need not be able to write.
        openssl("x509", "-req", "-sha256", "-in", str(csr), "-CA", str(ca.cert),
                "-CAkey", str(ca.key), "-set_serial", _serial(), "-days", str(days),
                "-extfile", str(conf), "-extensions", "ext", "-out", str(cert_out))  # fmt: skip


def _serial() -> str:
    """A random positive 127-bit serial: unique without keeping a serial file."""
    return f"0x{secrets.randbits(127) | (1 << 120):x}"


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A TLS server context presenting `cert` (PEM; may hold its chain after it)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # The requests inside are served by our HTTP/1.1 server: never let a client pick h2.
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def leaf_context(ca: CAFiles, host: str, *, days: int = LEAF_DAYS) -> ssl.SSLContext:
    """Make a leaf certificate for `host` and return a server context for it.

    Blocking; the leaf's key only exists on disk (0600, private temp dir) while
    the context loads it.
    """
    with tempfile.TemporaryDirectory(prefix="dragonfly-leaf-") as tmp:
        cert, key = Path(tmp) / "leaf.pem", Path(tmp) / "leaf.key"
        make_leaf(ca, [host], cert, key, days=days)
        try:
            return server_context(cert, key)
        except ssl.SSLError as exc:
            raise TLSError(f"cannot load the certificate made for {host}: {exc}") from None


class LeafCache:
    """Server contexts for hijacked hosts: made once per host, in a worker thread.

    Concurrent first requests for one host share one openssl run. Bounded (LRU),
    and an entry is remade shortly before its certificate expires. At most
    `per_minute` certificates are made a minute (in bursts of as many): a client
    naming ever new hosts cannot keep the CPU minting (LeafBudgetSpent).
    """

    def __init__(
        self,
        ca: CAFiles,
        *,
        max_entries: int = LEAF_CACHE_SIZE,
        days: int = LEAF_DAYS,
        per_minute: int = LEAF_RATE,
    ) -> None:
        self.ca = ca
        self.max_entries = max_entries
        self.days = days
        self.per_minute = per_minute
        self._budget = TokenBucket(per_minute / 60, burst=per_minute, now=time.monotonic())
        self._ready: collections.OrderedDict[str, tuple[ssl.SSLContext, float]] = (
            collections.OrderedDict()
        )
        self._pending: dict[str, trio.Event] = {}
        self.made = 0  # certificates made so far (for tests and logs)

    async def context(self, host: str) -> ssl.SSLContext:
        """The server context for `host`; TLSError if no certificate can be made."""
        host = host.lower()
        while True:
            entry = self._ready.get(host)
            if entry is not None and entry[1] > time.time():
                self._ready.move_to_end(host)
                await trio.lowlevel.checkpoint()
                return entry[0]
            pending = self._pending.get(host)
            if pending is None:
                break
            await pending.wait()  # another task is making it: use its result (or retry)
        if not self._budget.try_take(1, time.monotonic()):
            raise LeafBudgetSpent(
                f"no certificate for {host} now: {self.per_minute} new certificates a minute "
                "at most (proxy.hijack_https.leaf_rate)"
            )
        done = self._pending[host] = trio.Event()
        try:
            make = functools.partial(leaf_context, self.ca, host, days=self.days)
            ctx = await trio.to_thread.run_sync(make)
            self.made += 1
            renew_at = time.time() + self.days * 86400 - min(LEAF_RENEW_SECONDS, self.days * 43200)
            self._ready[host] = (ctx, renew_at)
            self._ready.move_to_end(host)
            while len(self._ready) > self.max_entries:
                self._ready.popitem(last=False)
            return ctx
        finally:
            del self._pending[host]
            done.set()


# ---------------------------------------------------------------- from configuration


def origin_ssl_context(download: DownloadSection) -> ssl.SSLContext:
    """Verification of https origins: the system's CAs plus `download.origin_ca_file`."""
    ctx = ssl.create_default_context()
    if download.origin_ca_file:
        path = download.origin_ca_file
        key = "download.origin_ca_file"
        if not os.access(path, os.R_OK):
            raise ConfigError(STARTUP, key, f"cannot read {path}")
        try:
            ctx.load_verify_locations(cafile=path)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ConfigError(
                STARTUP, key, f"{path} holds no usable PEM certificate: {exc}"
            ) from None
    return ctx


def check_key_mode(path: str, key: str, what: str) -> None:
    """ConfigError naming `key` when the private key at `path` is open to group or others."""
    mode = os.stat(path).st_mode
    if mode & 0o077:
        raise ConfigError(
            STARTUP,
            key,
            f"{path} is open to group or others (mode {stat.S_IMODE(mode):03o}): "
            f"{what} must be its owner's only; run chmod 600 {path}",
        )


def hijack_ca(section: HijackHTTPSSection) -> CAFiles | None:
    """The CA that signs hijacked hosts' certificates; None when hijacking is off.

    ConfigError naming the key for a missing or unreadable file, a key that does
    not match the certificate, or hosts given without a CA.
    """
    prefix = "proxy.hijack_https."
    if not section.ca_cert and not section.ca_key:
        if section.hosts:
            raise ConfigError(
                STARTUP, prefix + "ca_cert", "hosts are set but no CA is (see `ca init`)"
            )
        return None
    for name in ("ca_cert", "ca_key"):
        path = getattr(section, name)
        if not path:
            other = "ca_key" if name == "ca_cert" else "ca_cert"
            raise ConfigError(STARTUP, prefix + name, f"required when {prefix}{other} is set")
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            raise ConfigError(STARTUP, prefix + name, f"cannot read {path}")
    check_key_mode(section.ca_key, prefix + "ca_key", "the CA's key")
    ca = CAFiles(Path(section.ca_cert), Path(section.ca_key))
    try:
        check_ca(ca)
    except TLSError as exc:
        which = "ca_key" if "does not belong" in str(exc) else "ca_cert"
        raise ConfigError(STARTUP, prefix + which, str(exc)) from None
    return ca


def check_peer_files(cfg: PeerConfig) -> None:
    """Load every certificate file a peer's configuration names; ConfigError naming
    the key of the first that is wrong. (The daemon loads them again when it starts.)"""
    origin_ssl_context(cfg.download)
    hijack_ca(cfg.proxy.hijack_https)
