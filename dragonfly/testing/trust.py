"""A cluster secret and host credentials in one directory, for clusters on one machine:
`python -m dragonfly cluster` (and so `make demo`, the tests and the benchmarks) and
tests that start daemons in-process run with identity on, as a real cluster does."""

from __future__ import annotations

import os
import time
from pathlib import Path

from dragonfly.credentials import (
    DEFAULT_TTL,
    read_credential_file,
    read_secret_file,
    write_credential_file,
    write_secret_file,
)
from dragonfly.trust import Credential, SecretRing, Ticket, TicketKey, issue

SECRET_NAME = "secret.json"


class LocalIssuer:
    """DIR/secret.json (made on first use) and DIR/HOST_ID.json credentials made from it."""

    def __init__(self, directory: Path, cluster: str = "local") -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        self.secret_file = directory / SECRET_NAME
        if self.secret_file.exists():
            self.ring = read_secret_file(self.secret_file)
        else:
            self.ring = SecretRing.new(cluster)
            write_secret_file(self.secret_file, self.ring, replace=False)

    def credential(self, host_id: str, role: str, *, ttl: float = DEFAULT_TTL) -> Credential:
        return issue(self.ring, host_id=host_id, role=role, now=time.time(), ttl=ttl)

    def credential_file(self, host_id: str, role: str, *, ttl: float = DEFAULT_TTL) -> Path:
        """A credential for `host_id` as `role`, written to DIR/HOST_ID.json."""
        path = self.directory / f"{host_id}.json"
        write_credential_file(path, self.credential(host_id, role, ttl=ttl))
        return path

    def scheduler_overrides(self) -> list[str]:
        """--set items that give a scheduler this cluster's secret."""
        return [f"trust.secret_file={self.secret_file}"]

    def peer_overrides(self, host_id: str, role: str = "peer") -> list[str]:
        """--set items that give a peer (or seed peer) a credential of this cluster."""
        return [f"trust.credential_file={self.credential_file(host_id, role)}"]

    def ticket_header(
        self, task_id: str, parent_host_id: str, child_host_id: str = "test-child", ttl: int = 600
    ) -> str:
        """The X-Dragonfly-Ticket value a scheduler of this cluster would give
        `child_host_id` to fetch `task_id` from `parent_host_id` (a credential this
        issuer wrote): what a test that fetches pieces by hand sends."""
        parent = read_credential_file(self.directory / f"{parent_host_id}.json")
        return ticket_header(parent, task_id, child_host_id, ttl)


def ticket_header(parent: Credential, task_id: str, child_host_id: str, ttl: int) -> str:
    """The X-Dragonfly-Ticket value that lets `child_host_id` fetch `task_id` from the
    holder of `parent` for `ttl` seconds (negative: already expired)."""
    expires_at = int(time.time()) + ttl
    parent_host_id = parent.claims.host_id
    mac = TicketKey(parent.host_key).mint(task_id, child_host_id, parent_host_id, expires_at)
    return Ticket(child_host_id, expires_at, mac).header()
