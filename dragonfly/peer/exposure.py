"""The proxy's exposure, the trio shell: which clients get in, and where they may go.

The rules are dragonfly/engine/access.py's. Here: Proxy-Authorization checked against
the argon2 hashes of `proxy.auth_file` (in a worker thread, one at a time, and
remembered for a while so a client's every request does not pay for a hash), and
destinations resolved once and checked, so that the address checked is the address
connected to.

Which client a connection serves travels in a context variable, `CLIENT`, set by the
proxy for each request: a download the request starts runs in a copy of that context
(trio tasks inherit their spawner's), so the daemon's origin client, whose resolver
is `checked_addresses`, applies the same client's rules to every connection it opens
for that download, redirects included. Connections made for no proxy client (a seed
peer's trigger, piece transfers between peers) carry no CLIENT and are not limited.
"""

from __future__ import annotations

import contextvars
import dataclasses
import errno
import hashlib
import os
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import trio
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from dragonfly.config import ConfigError, ProxySection
from dragonfly.engine.access import (
    AccessPolicy,
    IPAddress,
    basic_credentials,
    ip_of,
    parse_users,
)
from dragonfly.net.http_client_errors import ConnectError

STARTUP = "startup check"
# A verified credential is trusted this long before its hash is checked again.
CREDENTIAL_TTL = 300.0
MAX_REMEMBERED = 4096


class DestinationRefused(ConnectError):
    """The proxy's client may not reach this address; the message says why."""


@dataclass(frozen=True)
class ClientScope:
    """The proxy client that a connection is made for, and the rules it is under."""

    policy: AccessPolicy
    client: IPAddress | None


CLIENT: contextvars.ContextVar[ClientScope | None] = contextvars.ContextVar(
    "dragonfly_proxy_client", default=None
)


def is_local_address(ip: IPAddress) -> bool:
    """Whether `ip` is one of this host's addresses (binding to it works only then)."""
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((str(ip), 0))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                return False
            raise
    return True


async def checked_addresses(host: str, port: int) -> list[str]:
    """The addresses to connect to for host:port on behalf of the current proxy client;
    DestinationRefused if any of them is one that client may not reach (a name that
    also resolves to loopback is refused whole). With no client in the context, or a
    client on loopback, the host is returned as it is: trio resolves it."""
    scope = CLIENT.get()
    if scope is None or scope.policy.on_loopback(scope.client):
        return [host]
    literal = ip_of(host)
    if literal is not None:
        found = [literal]
    else:
        try:
            infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ConnectError(f"cannot resolve {host}: {exc.strerror or exc}") from None
        found = []
        for *_, sockaddr in infos:
            ip = ip_of(str(sockaddr[0]))
            if ip is not None and ip not in found:
                found.append(ip)
    policy = scope.policy
    for ip in found:
        local = policy.needs_local_check(port) and is_local_address(ip)
        reason = policy.destination_refusal(scope.client, ip, port, local=local)
        if reason is not None:
            shown = host if literal is not None else f"{host} ({ip})"
            raise DestinationRefused(
                f"{shown}:{port} is {reason}: not reachable through this proxy for "
                f"{scope.client} (proxy.allowed_destinations lists exceptions)"
            )
    return [str(ip) for ip in found]


class ProxyUsers:
    """The users of `proxy.auth_file`, and the credentials verified recently."""

    def __init__(self, users: dict[str, str]) -> None:
        self.users = users
        self._hasher = PasswordHasher()
        self._verified: dict[bytes, float] = {}  # sha256(user, password) → good until
        self._one_at_a_time = trio.CapacityLimiter(1)  # argon2 takes memory and CPU
        # Unknown users cost a hash too, so that timing does not tell which users exist.
        self._dummy = next(iter(users.values()), None) or self._hasher.hash("-")

    @classmethod
    def load(cls, path: str) -> ProxyUsers:
        """ConfigError naming proxy.auth_file for an unreadable, empty or malformed file."""
        key = "proxy.auth_file"
        try:
            mode = os.stat(path).st_mode
            if mode & 0o022:
                raise ConfigError(
                    STARTUP,
                    key,
                    f"{path} is writable by group or others (mode {stat.S_IMODE(mode):03o}): "
                    f"anyone could add a user; run chmod 600 {path}",
                )
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(STARTUP, key, f"cannot read {path}: {exc}") from None
        try:
            users = parse_users(text, path)
        except ValueError as exc:
            raise ConfigError(STARTUP, key, str(exc)) from None
        if not users:
            raise ConfigError(STARTUP, key, f"{path} lists no user")
        return cls(users)

    async def authenticate(self, header: str | None) -> str | None:
        """The user a Proxy-Authorization header proves, or None."""
        credentials = basic_credentials(header)
        if credentials is None:
            return None
        user, password = credentials
        key = hashlib.sha256(f"{len(user)}:{user}:{password}".encode()).digest()
        now = time.monotonic()
        if self._verified.get(key, 0.0) > now:
            return user
        hashed = self.users.get(user)
        ok = await trio.to_thread.run_sync(
            self._verify, hashed or self._dummy, password, limiter=self._one_at_a_time
        )
        if not ok or hashed is None:
            return None
        if len(self._verified) >= MAX_REMEMBERED:
            self._verified = {k: t for k, t in self._verified.items() if t > now}
            if len(self._verified) >= MAX_REMEMBERED:
                self._verified.clear()
        self._verified[key] = now + CREDENTIAL_TTL
        return user

    def _verify(self, hashed: str, password: str) -> bool:
        try:
            return self._hasher.verify(hashed, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False


class ProxyGate:
    """Lets a proxy client in: from loopback or proxy.allowed_clients, or authenticated."""

    def __init__(self, proxy: ProxySection, users: dict[str, str] | None = None) -> None:
        """`users`: the auth file's users as already read (a proxy worker's copy of the
        daemon's gate), rather than the file read again."""
        self.policy = AccessPolicy.from_config(proxy)
        if users is not None:
            self.users: ProxyUsers | None = ProxyUsers(users)
        else:
            self.users = ProxyUsers.load(proxy.auth_file) if proxy.auth_file else None

    def bind_ports(self, ports: list[int]) -> None:
        """The daemon's listeners are bound: their ports are off limits from now on."""
        self.policy = dataclasses.replace(self.policy, own_ports=frozenset(ports))

    async def admit(self, client: IPAddress | None, authorization: str | None) -> str | None:
        """None if the client may go on; else why not: "auth" (407) or "client" (403)."""
        if self.policy.client_allowed(client):
            return None
        if self.users is None:
            return "client"
        if await self.users.authenticate(authorization) is None:
            return "auth"
        return None


def check_proxy_files(proxy: ProxySection) -> None:
    """ConfigError naming the key if proxy.auth_file cannot be used (for the CLI to say
    before the daemon starts)."""
    if proxy.auth_file:
        ProxyUsers.load(proxy.auth_file)


def write_user(path: str, user: str, password: str) -> None:
    """Add or replace USER in the auth file (argon2 hash; the file stays 0600)."""
    if not user or ":" in user or any(c.isspace() for c in user):
        raise ValueError(f"user {user!r}: no ':' or white space, not empty")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""
    users = parse_users(text, path)
    users[user] = PasswordHasher().hash(password)
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("".join(f"{u}:{h}\n" for u, h in users.items()))
    os.replace(tmp, path)
