"""The cluster's CA and one certificate per node in one directory, for clusters on one
machine: `python -m dragonfly cluster --tls` (and so the tests and benchmarks that run
with TLS on) and tests that start daemons in-process, as `tls init` and `tls new` make
them for a real cluster."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from dragonfly.cluster_tls import CA_NAME, new_host_certificate
from dragonfly.net.tls import CAFiles, make_ca

LOOPBACK = ("127.0.0.1",)


class LocalTLS:
    """DIR/ca.pem and DIR/ca.key (made on first use) and DIR/NAME.pem, DIR/NAME.key for
    each node, naming the addresses it is reached at (127.0.0.1 by default)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        ca = CAFiles(directory / "ca.pem", directory / "ca.key")
        self.ca = ca if ca.cert.exists() and ca.key.exists() else make_ca(directory, name=CA_NAME)

    @property
    def ca_file(self) -> Path:
        return self.ca.cert

    def host(self, name: str, ips: tuple[str, ...] = LOOPBACK) -> tuple[Path, Path]:
        """(certificate, key) of node `name`, made once."""
        cert, key = self.directory / f"{name}.pem", self.directory / f"{name}.key"
        if not (cert.exists() and key.exists()):
            new_host_certificate(self.ca, list(ips), self.directory / name)
        return cert, key

    def scheduler_settings(self, name: str, ips: tuple[str, ...] = LOOPBACK) -> dict[str, str]:
        """The keys that make a scheduler serve wss:// and https with its certificate."""
        cert, key = self.host(name, ips)
        return {"server.tls_cert": str(cert), "server.tls_key": str(key)}

    def peer_settings(self, name: str, ips: tuple[str, ...] = LOOPBACK) -> dict[str, str]:
        """The keys that make a peer serve its upload port over TLS and verify schedulers
        and parents with this CA."""
        cert, key = self.host(name, ips)
        return {
            "upload.tls_cert": str(cert),
            "upload.tls_key": str(key),
            "trust.ca_file": str(self.ca_file),
        }

    def scheduler_overrides(self, name: str) -> list[str]:
        """scheduler_settings as --set items."""
        return [f"{k}={v}" for k, v in self.scheduler_settings(name).items()]

    def peer_overrides(self, name: str, ips: tuple[str, ...] = LOOPBACK) -> list[str]:
        """peer_settings as --set items."""
        return [f"{k}={v}" for k, v in self.peer_settings(name, ips).items()]

    def client_context(self) -> ssl.SSLContext:
        """What a client that trusts this CA (and nothing else) verifies the nodes with."""
        return ssl.create_default_context(cafile=str(self.ca_file))
