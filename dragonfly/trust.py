"""Cluster identity: secrets, host credentials, proofs and tickets (sans-I/O).

A cluster has a secret (32 random bytes with a key id, so it can be rotated) held by
whoever issues credentials: the schedulers, later the manager. A host credential is
a set of claims (cluster, host ID, role, issue and expiry times, key id) and

    host_key = HMAC-SHA256(secret, canonical(claims))

Only the issuer can make the key for given claims, and a scheduler recomputes it from
the claims alone, so a host is never taken at its word for its ID or role. The key
itself never travels: on the scheduler websocket both sides prove they know it over
fresh nonces (`peer_proof`, then `scheduler_proof`, which a peer checks: it does not
know the cluster secret, only its own key). For every parent it hands a child, the
scheduler adds a ticket, a MAC under the parent's host key naming the task, the
child's host, the parent's host and an expiry; the parent checks it with its own key
(`TicketKey.verify`). Upload ports serve only against tickets.

Every MAC input is a label and length-prefixed fields, so no two different inputs (a
ticket and a proof, two sets of claims) share an encoding. Time is an argument (unix
seconds): nothing here reads a clock, a file or a socket. Randomness (`new_secret`,
`new_nonce`) comes from `secrets`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field
from typing import Protocol

from dragonfly.wire.messages import Claims

__all__ = [
    "ISSUED_ROLES",
    "NONCE_LEN",
    "SECRET_LEN",
    "TICKET_HEADER",
    "TICKET_LEN",
    "TICKET_REFRESH_MARGIN",
    "AttestedFacts",
    "Attester",
    "ClusterKey",
    "Credential",
    "SecretRing",
    "Ticket",
    "TicketKey",
    "TrustError",
    "Verifier",
    "canonical",
    "check_proof",
    "derive_host_key",
    "issue",
    "name_from",
    "new_nonce",
    "peer_proof",
    "scheduler_proof",
]

SECRET_LEN = 32
NONCE_LEN = 32
TICKET_LEN = 16  # bytes of HMAC-SHA256 kept in a ticket
# A child asks the scheduler for fresh tickets this long before its tickets expire
# (covers clock skew between the scheduler and the parent, and a request in flight).
TICKET_REFRESH_MARGIN = 60
# How far a credential's issue time may be ahead of a verifier's clock.
CLOCK_SKEW = 300
# A scheduler's credential (issued by the manager) proves it on the manager's websocket.
ISSUED_ROLES = ("peer", "seed-peer", "scheduler")
TICKET_HEADER = "x-dragonfly-ticket"

# Host IDs, cluster names and key ids: printable, no spaces (a ticket header carries a
# host ID), at most 128 characters (the wire's limit for IDs).
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}$")
_KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")


class TrustError(ValueError):
    """A credential, proof or ticket that does not hold. ``reason`` is a short name
    for logs and metrics (expired, unknown_key, proof, ticket, ...)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _mac_input(label: bytes, *fields: str | bytes | int) -> bytes:
    parts = [label]
    for value in fields:
        data = value if isinstance(value, bytes) else str(value).encode()
        parts.append(len(data).to_bytes(4, "big"))
        parts.append(data)
    return b"".join(parts)


def check_name(kind: str, value: str) -> str:
    """A host ID or cluster name as credentials carry it; TrustError otherwise."""
    if not _NAME.match(value):
        raise TrustError(
            "malformed",
            f"{kind} {value[:64]!r}: letters, digits and . _ : @ + - only "
            "(starting with a letter or digit), at most 128 characters",
        )
    return value


def name_from(text: str, fallback: str, *, length: int = 96) -> str:
    """`text` (a host name) made fit to start a host ID: characters IDs do not take
    become '-', the first is a letter or digit, at most `length` characters."""
    name = re.sub(r"[^A-Za-z0-9._:@+-]", "-", text).lstrip("._:@+-")[:length]
    return name or fallback


# ---------------------------------------------------------------- the cluster secret


@dataclass(frozen=True, slots=True)
class ClusterKey:
    """One cluster secret and the id credentials name it by."""

    key_id: str
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not _KEY_ID.match(self.key_id):
            raise TrustError(
                "malformed", f"key id {self.key_id[:40]!r}: at most 32 of [A-Za-z0-9._-]"
            )
        if len(self.secret) != SECRET_LEN:
            raise TrustError(
                "malformed",
                f"key {self.key_id}: a secret is {SECRET_LEN} bytes, got {len(self.secret)}",
            )


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_LEN)


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_LEN)


@dataclass(frozen=True, slots=True)
class SecretRing:
    """A cluster's name and its secrets: ``keys[0]`` signs new credentials, the others
    (previous keys, kept after a rotation) still verify the credentials made with them."""

    cluster: str
    keys: tuple[ClusterKey, ...]

    def __post_init__(self) -> None:
        check_name("cluster", self.cluster)
        if not self.keys:
            raise TrustError("malformed", "a cluster secret file needs at least one key")
        ids = [k.key_id for k in self.keys]
        if len(set(ids)) != len(ids):
            raise TrustError("malformed", f"key ids must be distinct, got {ids}")

    @classmethod
    def new(cls, cluster: str) -> SecretRing:
        return cls(cluster, (ClusterKey(secrets.token_hex(4), new_secret()),))

    @property
    def current(self) -> ClusterKey:
        return self.keys[0]

    def find(self, key_id: str) -> ClusterKey | None:
        return next((k for k in self.keys if k.key_id == key_id), None)

    def rotated(self, keep: int = 1) -> SecretRing:
        """A new current key; the newest ``keep`` of the others stay to verify."""
        key = ClusterKey(secrets.token_hex(4), new_secret())
        while self.find(key.key_id) is not None:  # (a 1-in-4-billion collision)
            key = ClusterKey(secrets.token_hex(4), new_secret())
        return SecretRing(self.cluster, (key, *self.keys[: max(keep, 0)]))


# ---------------------------------------------------------------- credentials


def canonical(claims: Claims) -> bytes:
    """The claims as the host key is computed over them (one encoding per claims)."""
    return _mac_input(
        b"dragonfly-claims-v1",
        claims.cluster,
        claims.host_id,
        claims.role,
        claims.issued_at,
        claims.expires_at,
        claims.key_id,
    )


def derive_host_key(secret: bytes, claims: Claims) -> bytes:
    return hmac.digest(secret, canonical(claims), "sha256")


@dataclass(frozen=True, slots=True)
class Credential:
    """What a peer or seed peer holds: its claims and the key that goes with them."""

    claims: Claims
    host_key: bytes = field(repr=False)

    def check_time(self, now: float) -> None:
        """TrustError once the credential expired (a peer refuses to start with it)."""
        if now >= self.claims.expires_at:
            raise TrustError(
                "expired",
                f"the credential of {self.claims.host_id} expired (at {self.claims.expires_at})",
            )


def issue(ring: SecretRing, *, host_id: str, role: str, now: float, ttl: float) -> Credential:
    """A credential for ``host_id`` in ``role``, valid ``ttl`` seconds from ``now``,
    under the ring's current key."""
    check_name("host ID", host_id)
    if role not in ISSUED_ROLES:
        raise TrustError(
            "malformed", f"role must be one of {', '.join(ISSUED_ROLES)}, got {role!r}"
        )
    if ttl <= 0:
        raise TrustError("malformed", f"a credential's lifetime must be positive, got {ttl}")
    key = ring.current
    claims = Claims(
        cluster=ring.cluster,
        host_id=host_id,
        role=role,
        issued_at=int(now),
        expires_at=int(now + ttl),
        key_id=key.key_id,
    )
    return Credential(claims, derive_host_key(key.secret, claims))


class Verifier:
    """The issuer's side: the host key of claims, if they are this cluster's and valid
    now. Keys are cached per claims (bounded), so a reconnecting host costs a lookup."""

    def __init__(self, ring: SecretRing, *, cache_size: int = 1 << 16) -> None:
        self.ring = ring
        self.cache_size = cache_size
        self._keys: dict[bytes, bytes] = {}
        # host ID → the issue time at or before which its credentials are revoked
        self.revoked: dict[str, int] = {}

    def is_revoked(self, claims: Claims) -> bool:
        before = self.revoked.get(claims.host_id)
        return before is not None and claims.issued_at <= before

    def host_key(self, claims: Claims, now: float) -> bytes:
        """The key a host with these claims holds; TrustError naming why there is none."""
        if claims.cluster != self.ring.cluster:
            raise TrustError(
                "cluster",
                f"the credential is for cluster {claims.cluster!r}, not {self.ring.cluster!r}",
            )
        key = self.ring.find(claims.key_id)
        if key is None:
            raise TrustError(
                "unknown_key", f"the credential names an unknown key {claims.key_id!r}"
            )
        if now >= claims.expires_at:
            raise TrustError("expired", f"the credential expired at {claims.expires_at}")
        if claims.issued_at > now + CLOCK_SKEW:
            raise TrustError(
                "not_yet_valid", f"the credential is issued in the future ({claims.issued_at})"
            )
        if self.is_revoked(claims):
            raise TrustError("revoked", f"the credential of {claims.host_id} is revoked")
        check_name("host ID", claims.host_id)
        text = canonical(claims)
        cached = self._keys.get(text)
        if cached is None:
            if len(self._keys) >= self.cache_size:
                self._keys.clear()
            cached = self._keys[text] = derive_host_key(key.secret, claims)
        return cached


# ---------------------------------------------------------------- the handshake


def peer_proof(host_key: bytes, peer_nonce: bytes, scheduler_nonce: bytes, claims: Claims) -> bytes:
    """What a peer sends after the Hellos: it holds the key of these claims."""
    data = _mac_input(b"dragonfly-proof-peer-v1", peer_nonce, scheduler_nonce, canonical(claims))
    return hmac.digest(host_key, data, "sha256")


def scheduler_proof(host_key: bytes, peer_nonce: bytes, scheduler_nonce: bytes) -> bytes:
    """What a scheduler answers a proven peer with: it could compute that peer's key,
    so it holds the cluster secret."""
    data = _mac_input(b"dragonfly-proof-scheduler-v1", peer_nonce, scheduler_nonce)
    return hmac.digest(host_key, data, "sha256")


def check_proof(expected: bytes, got: bytes, who: str) -> None:
    if not hmac.compare_digest(expected, got):
        raise TrustError("proof", f"wrong proof from the {who}")


# ---------------------------------------------------------------- tickets


@dataclass(frozen=True, slots=True)
class Ticket:
    """A child's permission to fetch one task from one parent until ``expires_at``."""

    child_host_id: str
    expires_at: int
    mac: bytes

    def header(self) -> str:
        """The X-Dragonfly-Ticket value a child sends with each piece request."""
        mac = base64.urlsafe_b64encode(self.mac).rstrip(b"=").decode()
        return f"{self.expires_at} {mac} {self.child_host_id}"

    @classmethod
    def from_header(cls, value: str) -> Ticket:
        expires, _, rest = value.strip().partition(" ")
        mac, _, child = rest.partition(" ")
        try:
            raw = base64.urlsafe_b64decode(mac + "=" * (-len(mac) % 4))
        except (binascii.Error, ValueError):
            raw = b""
        if (
            not expires.isdigit()
            or len(expires) > 13
            or len(raw) != TICKET_LEN
            or not _NAME.match(child)
        ):
            raise TrustError("ticket", "malformed ticket header: expected 'EXPIRES MAC HOST_ID'")
        return cls(child, int(expires), raw)

    def stale(self, now: float) -> bool:
        """Whether it expires within TICKET_REFRESH_MARGIN (time to ask for a fresh one)."""
        return now >= self.expires_at - TICKET_REFRESH_MARGIN


class TicketKey:
    """Tickets under one host key: the scheduler mints them with a parent's key, the
    parent verifies them with its own (the HMAC's keyed state is prepared once)."""

    __slots__ = ("_hmac",)

    def __init__(self, host_key: bytes) -> None:
        self._hmac = hmac.new(host_key, digestmod=hashlib.sha256)

    def mint(self, task_id: str, child_host_id: str, parent_host_id: str, expires_at: int) -> bytes:
        h = self._hmac.copy()
        h.update(
            _mac_input(b"dragonfly-ticket-v1", task_id, child_host_id, parent_host_id, expires_at)
        )
        return h.digest()[:TICKET_LEN]

    def verify(self, ticket: Ticket | None, task_id: str, parent_host_id: str, now: float) -> None:
        """TrustError unless ``ticket`` lets its child fetch ``task_id`` from this host now."""
        if ticket is None:
            raise TrustError("ticket", "no ticket: ask the scheduler for this parent")
        expected = self.mint(task_id, ticket.child_host_id, parent_host_id, ticket.expires_at)
        if not hmac.compare_digest(expected, ticket.mac):
            raise TrustError("ticket", f"the ticket is not for task {task_id} from this host")
        if now >= ticket.expires_at:
            raise TrustError("ticket_expired", f"the ticket expired at {ticket.expires_at}")


class Attester:
    """Vouches that a task's layout, per-piece digests and origin metadata are the ones
    its trusted sources reported.

    A scheduler gives a peer that finished a task an attestation of them; after a
    restart, or to another scheduler of the ring, the peer re-announces the task with
    it, and any scheduler of the cluster (they share the secret) takes them as its own:
    without asking the origin again, and without believing an ordinary peer's word. An
    attestation is the key ID's length and the key ID, then HMAC-SHA256 under a key
    derived from that cluster key (never the key that signs credentials)."""

    def __init__(self, ring: SecretRing) -> None:
        self._keys = {
            k.key_id: hmac.digest(k.secret, b"dragonfly-attestation-key-v1", "sha256")
            for k in ring.keys
        }
        self._current = ring.current.key_id

    def _mac(self, key: bytes, facts: AttestedFacts) -> bytes:
        data = _mac_input(
            b"dragonfly-task-v1",
            facts.task_id,
            facts.content_length,
            facts.piece_length,
            hashlib.sha256(facts.digests).digest(),
            int(facts.private),
            facts.etag,
            facts.last_modified,
        )
        return hmac.digest(key, data, "sha256")

    def attest(self, facts: AttestedFacts) -> bytes:
        kid = self._current.encode()
        return bytes([len(kid)]) + kid + self._mac(self._keys[self._current], facts)

    def check(self, attestation: bytes, facts: AttestedFacts) -> bool:
        if not attestation:
            return False
        size = attestation[0]
        kid, mac = attestation[1 : 1 + size], attestation[1 + size :]
        key = self._keys.get(kid.decode(errors="replace"))
        if key is None or len(mac) != 32:
            return False
        return hmac.compare_digest(self._mac(key, facts), mac)


class AttestedFacts(Protocol):
    """What an attestation covers (HeldTask and TaskAttested carry these)."""

    @property
    def task_id(self) -> str: ...
    @property
    def content_length(self) -> int: ...
    @property
    def piece_length(self) -> int: ...
    @property
    def digests(self) -> bytes: ...  # every piece's raw sha256, in piece order
    @property
    def private(self) -> bool: ...
    @property
    def etag(self) -> str: ...
    @property
    def last_modified(self) -> str: ...
