"""Who may use a peer's proxy, and where it may take them (sans-I/O).

A client on loopback is this host: it could open any connection itself, so the proxy
lets it reach anything. Any other client must come from `proxy.allowed_clients` or
authenticate (Proxy-Authorization Basic against `proxy.auth_file`), and it may not
reach what only this host should: loopback, link-local (169.254/16 with the cloud
metadata services, fe80::/10), the unspecified address, or the daemon's own ports
on this host's addresses, unless `proxy.allowed_destinations` lists the address.
CONNECT reaches `proxy.connect_ports` only, whoever asks.

The checks take the address the proxy will actually connect to, after resolution:
the trio shell (dragonfly/peer/exposure.py) resolves once, checks, and connects to
the checked address, so a name that resolves elsewhere the second time gains nothing.
"""

from __future__ import annotations

import base64
import binascii
import functools
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from dragonfly.config import ProxySection

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_LINK_LOCAL = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"))


@functools.lru_cache(maxsize=4096)  # (every request parses its client's address)
def ip_of(address: str) -> IPAddress | None:
    """The IP address in `address` ("1.2.3.4", "::1", "[::1]", "fe80::1%eth0"), IPv4-mapped
    IPv6 unwrapped (::ffff:127.0.0.1 is 127.0.0.1); None if it is not an address."""
    text = address.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    text = text.split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def client_ip(peer: str) -> IPAddress | None:
    """The address of a client named "HOST:PORT" (IPv6 as the socket gives it: "::1:5000"
    or "[::1]:5000"); None when unknown ("?", a unix socket)."""
    host, sep, port = peer.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return ip_of(host)


def networks(items: Iterable[str]) -> tuple[IPNetwork, ...]:
    """CIDRs (or single addresses) as networks; config.py validated them already."""
    return tuple(ipaddress.ip_network(item.strip(), strict=False) for item in items)


@dataclass(frozen=True)
class AccessPolicy:
    """The proxy's rules for clients and destinations."""

    allowed_clients: tuple[IPNetwork, ...] = ()
    allowed_destinations: tuple[IPNetwork, ...] = ()
    connect_ports: frozenset[int] = frozenset({443})
    own_ports: frozenset[int] = frozenset()  # the daemon's listeners, once bound

    @classmethod
    def from_config(cls, proxy: ProxySection, own_ports: Iterable[int] = ()) -> AccessPolicy:
        return cls(
            allowed_clients=networks(proxy.allowed_clients),
            allowed_destinations=networks(proxy.allowed_destinations),
            connect_ports=frozenset(proxy.connect_ports),
            own_ports=frozenset(own_ports),
        )

    @staticmethod
    def on_loopback(client: IPAddress | None) -> bool:
        return client is not None and client.is_loopback

    def client_allowed(self, client: IPAddress | None) -> bool:
        """May this client use the proxy without credentials?"""
        if self.on_loopback(client):
            return True
        return client is not None and any(client in net for net in self.allowed_clients)

    def connect_port_allowed(self, port: int) -> bool:
        return port in self.connect_ports

    def destination_refusal(
        self, client: IPAddress | None, address: IPAddress, port: int, *, local: bool
    ) -> str | None:
        """Why `client` may not reach address:port (None: it may). `local` says whether the
        address is one of this host's (only asked about the daemon's own ports)."""
        if self.on_loopback(client):
            return None
        ip = ip_of(str(address)) or address
        if any(ip in net for net in self.allowed_destinations):
            return None
        if ip.is_loopback:
            return "a loopback address"
        if ip.is_link_local or any(ip in net for net in _LINK_LOCAL):
            return "a link-local address"
        if ip.is_unspecified:
            return "the unspecified address (this host)"
        if port in self.own_ports and local:
            return "this daemon's own port"
        return None

    def needs_local_check(self, port: int) -> bool:
        """Whether destination_refusal needs to know if the address is this host's."""
        return port in self.own_ports


def basic_credentials(header: str | None) -> tuple[str, str] | None:
    """(user, password) of a `Basic` Proxy-Authorization header; None if absent or malformed."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic" or not token.strip():
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    if not sep or not user:
        return None
    return user, password


def parse_users(text: str, source: str) -> dict[str, str]:
    """USER:HASH lines (blank lines and # comments skipped) as {user: argon2 hash}.

    ValueError naming the line for a line without a user or with a hash that is not an
    argon2 one (a clear-text password must never sit in this file)."""
    users: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user or any(c.isspace() for c in user):
            raise ValueError(f"{source} line {number}: expected USER:HASH")
        if not hashed.startswith("$argon2"):
            raise ValueError(
                f"{source} line {number}: the hash of {user!r} is not an argon2 hash "
                "(make one with `python -m dragonfly proxy-user FILE USER`)"
            )
        users[user] = hashed
    return users
