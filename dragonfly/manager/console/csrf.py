"""CSRF tokens for the console's forms (sans-I/O).

A signed-in form carries HMAC(key, "form" | session jti): only a page rendered for that
session has it, and a sign-out ends it. The sign-in form, before any session, carries
HMAC(key, "signin" | a random value in a SameSite=Strict cookie) (double submit). The
session cookie itself is SameSite=Strict and HttpOnly: another site's page cannot make
the browser send it at all; the token covers same-site pages (another port of the same
host is the same site).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

PRE_COOKIE = "df_signin"


def _mac(key: str, purpose: str, value: str) -> str:
    return hmac.new(key.encode(), f"{purpose}\0{value}".encode(), hashlib.sha256).hexdigest()[:40]


def form_token(key: str, jti: str) -> str:
    return _mac(key, "form", jti)


def signin_token(key: str, cookie: str) -> str:
    return _mac(key, "signin", cookie)


def new_pre_cookie() -> str:
    return secrets.token_urlsafe(24)


def valid(expected: str, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(expected, given or "")
