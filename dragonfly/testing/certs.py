"""A throwaway CA and a server certificate signed by it (openssl CLI, via wire.tls).

For tests of https origins on loopback (the certificate names 127.0.0.1 and localhost).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dragonfly.wire.tls import make_ca, make_leaf


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
