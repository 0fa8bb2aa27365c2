"""Credentials and permissions, without I/O: password hashes, session JWTs, personal
access tokens, and the role check.

- Passwords: argon2id (argon2-cffi; bcrypt >= 4 is a Rust extension).
- Sessions: HS256 JWTs (PyJWT) with Dragonfly's claims (`id`, `exp`, `orig_iat`) plus
  `iat`, a `jti` (a sign-out revokes that one token) and `gen`, the user's session
  generation (a password change or reset bumps it: every older token dies).
- Personal access tokens: 256 random bits, shown once; only their SHA-256 is kept
  (a random token needs no slow hash, and a hash can be looked up by index).
- Roles: a role is a set of (object, action) permissions, the object an API group
  (`clusters`, `users`, ...), the action `read` or `*` (everything).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from typing import Any

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

ROOT, GUEST = "root", "guest"
READ, ALL = "read", "*"
ACTIONS = (READ, ALL)
# The API groups that permissions name (the first path segment after /api/v1/).
GROUPS = (
    "users",
    "roles",
    "permissions",
    "clusters",
    "scheduler-clusters",
    "schedulers",
    "scheduler-features",
    "seed-peer-clusters",
    "seed-peers",
    "peers",
    "configs",
    "applications",
    "personal-access-tokens",
    "audits",
    "join-tokens",
    "host-credentials",
    "revocations",
    "jobs",
    "download-records",
    "traffic",
)
PAT_SCOPES = ("job", "cluster")
# /oapi/v1/<resource> → the scope a token needs.
OAPI_SCOPES = {"clusters": "cluster", "jobs": "job"}
PAT_PREFIX = "dfpat_"

_hasher = PasswordHasher()
_GROUP = re.compile(r"^/(?:o?api)/v[0-9]+/([-_a-zA-Z]*)")


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(encoded: str, password: str) -> bool:
    try:
        return _hasher.verify(encoded, password)
    except (VerificationError, InvalidHashError):
        return False


# A hash to verify against when the user does not exist, so that a wrong name and a
# wrong password take the same time.
DUMMY_HASH = hash_password(secrets.token_urlsafe(16))


# ------------------------------------------------------------------ sessions


class BadToken(Exception):
    """A session token that is malformed, forged, expired or of no use."""


@dataclass(frozen=True)
class Session:
    user_id: int
    jti: str
    generation: int
    issued_at: float
    expires_at: float
    orig_iat: float


def issue_session(
    key: str,
    user_id: int,
    generation: int,
    now: float,
    ttl: float,
    orig_iat: float | None = None,
) -> tuple[str, Session]:
    session = Session(
        user_id=user_id,
        jti=secrets.token_urlsafe(16),
        generation=generation,
        issued_at=now,
        expires_at=now + ttl,
        orig_iat=now if orig_iat is None else orig_iat,
    )
    claims = {
        "id": user_id,
        "iat": int(now),
        "exp": int(session.expires_at),
        "orig_iat": int(session.orig_iat),
        "jti": session.jti,
        "gen": generation,
    }
    return jwt.encode(claims, key, algorithm="HS256"), session


def read_session(key: str, token: str, now: float, *, refresh_window: float = 0.0) -> Session:
    """The session a token carries. Expired tokens are refused unless `refresh_window` >
    0 and the first sign-in (`orig_iat`) is within it (the refresh endpoint)."""
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=["HS256"],
            options={"verify_exp": False, "require": ["exp", "iat", "id", "jti", "gen"]},
        )
    except jwt.PyJWTError as exc:
        raise BadToken(str(exc)) from None
    user_id, exp, iat = claims.get("id"), claims.get("exp"), claims.get("iat")
    orig, gen = claims.get("orig_iat", iat), claims.get("gen")
    jti = claims.get("jti")
    numbers = (user_id, exp, iat, orig, gen)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in numbers):
        raise BadToken("malformed claims")
    if not isinstance(jti, str) or not jti:
        raise BadToken("malformed claims")
    if now >= exp and not (refresh_window > 0 and now < orig + refresh_window):
        raise BadToken("expired")
    return Session(user_id, jti, gen, float(iat), float(exp), float(orig))  # type: ignore[arg-type]


# ------------------------------------------------------------------ access tokens


def new_access_token() -> tuple[str, str]:
    """A fresh personal access token and the hash that is stored."""
    token = PAT_PREFIX + secrets.token_urlsafe(32)
    return token, token_hash(token)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def check_access_token(
    state: str, expired_at: float, scopes: list[str], required: str | None, now: float
) -> str | None:
    """Why a (found) token may not be used for a route needing scope `required`, or None."""
    if state != "active":
        return "Token is inactive"
    if now > expired_at:
        return "Token has expired"
    if required is None or required not in scopes:
        return (
            "Token doesn't have permission to access this resource. "
            f"Required permission: {required or 'unknown resource'}"
        )
    return None


# ------------------------------------------------------------------ roles


def api_group(path: str) -> str | None:
    m = _GROUP.match(path)
    return m.group(1) if m else None


def action_for(method: str) -> str:
    return READ if method in ("GET", "HEAD", "OPTIONS") else ALL


def allowed(permissions: set[tuple[str, str]], group: str, action: str) -> bool:
    """Whether a holder of `permissions` may do `action` on `group`."""
    return (group, ALL) in permissions or (action == READ and (group, READ) in permissions)


def default_permissions(role: str) -> list[tuple[str, str]]:
    """What the seeded roles may do: root everything, guest read everything."""
    action = ALL if role == ROOT else READ
    return [(group, action) for group in GROUPS]
