"""A throwaway CA and a server certificate signed by it (openssl CLI, via wire.tls).

For tests of https origins on loopback (the certificate names 127.0.0.1 and localhost).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dragonfly.net.tls import CAFiles, make_ca, make_leaf


@dataclass(frozen=True)
class TestPKI:
    __test__ = False  # not a test class, though pytest sees its name in test modules

    ca_cert: Path
    server_cert: Path
    server_key: Path


def make_pki(directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> TestPKI:
    directory.mkdir(parents=True, exist_ok=True)
    ca = make_ca(directory, name="dragonfly test CA", days=2, force=True)
    cert, key = directory / "server.pem", directory / "server.key"
    make_leaf(ca, list(hosts), cert, key, days=2)
    return TestPKI(ca.cert, cert, key)


SYSTEM_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def ca_bundle(path: Path, ca_cert: Path) -> Path:
    """The system's CAs plus `ca_cert` in one file: what `ca init` tells users to point
    REQUESTS_CA_BUNDLE / SSL_CERT_FILE at."""
    system = SYSTEM_CA_BUNDLE.read_bytes() if SYSTEM_CA_BUNDLE.exists() else b""
    path.write_bytes(system + ca_cert.read_bytes())
    return path


def hijack_options(
    ca: CAFiles, hosts: str, rules: str, origin_ca: Path, ports: list[int]
) -> list[str]:
    """--set options for peers that intercept CONNECT to hosts matching the TOML array
    `hosts` on `ports` (the test origins' ports: CONNECT reaches those only), with proxy
    rules `rules` (a TOML array of tables), trusting `origin_ca`."""
    return [
        "--set", f"proxy.hijack_https.ca_cert={ca.cert}",
        "--set", f"proxy.hijack_https.ca_key={ca.key}",
        "--set", f"proxy.hijack_https.hosts={hosts}",
        "--set", f"proxy.rules={rules}",
        "--set", f"download.origin_ca_file={origin_ca}",
        "--set", f"proxy.connect_ports={ports}",
    ]  # fmt: skip
