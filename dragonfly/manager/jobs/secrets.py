"""A job's secrets (a registry password, request headers such as Authorization) are
never stored in clear: they are sealed in the job row with XSalsa20-Poly1305 (PyNaCl's
SecretBox, libsodium through CFFI), under a key derived from the manager's session key
(`auth.jwt_key`, or DATA_DIR/jwt.key): every manager that may run the job can open
them, and whoever reads the database alone cannot. The rest of the job's arguments are
stored, and shown, with the secret values left out.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import nacl.exceptions
import nacl.secret

_CONTEXT = b"dragonfly manager: job secrets v1"


class SealError(Exception):
    """Sealed secrets that this manager's key cannot open."""


class Sealer:
    def __init__(self, session_key: str) -> None:
        key = hmac.new(session_key.encode(), _CONTEXT, hashlib.sha256).digest()
        self._box = nacl.secret.SecretBox(key)

    def seal(self, secrets: dict[str, Any]) -> str:
        """'' for no secrets; else the sealed JSON, base64 (a fresh nonce each time)."""
        if not secrets:
            return ""
        data = json.dumps(secrets, separators=(",", ":"), sort_keys=True).encode()
        return base64.b64encode(self._box.encrypt(data)).decode()

    def open(self, sealed: str) -> dict[str, Any]:
        if not sealed:
            return {}
        try:
            data = self._box.decrypt(base64.b64decode(sealed))
        except (nacl.exceptions.CryptoError, ValueError) as exc:
            raise SealError(
                "the job's secrets do not open with this manager's key "
                "(auth.jwt_key differs between managers, or was changed)"
            ) from exc
        value = json.loads(data)
        if not isinstance(value, dict):
            raise SealError("the job's secrets are not a JSON object")
        return value
