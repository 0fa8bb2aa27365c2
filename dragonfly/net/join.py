"""Joining a cluster at its manager: present the role's join token, get a credential
(and, for a scheduler, the cluster secret). The manager side is
dragonfly/manager/routes/identity.py.

A refusal (a wrong, rotated or other role's token: 401, 403) is final and said as the
manager said it; a manager that does not answer is asked again, with backoff, until it
does.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

import trio

from dragonfly.credentials import CredentialFileError, credential_from_doc, ring_from_doc
from dragonfly.errors import find_exception
from dragonfly.log import get_logger
from dragonfly.net.http_client import HTTPClient, HTTPClientError
from dragonfly.trust import Credential, SecretRing

log = get_logger("dragonfly.join")
JOIN_PATH = "/v1/join"
RETRY_MIN, RETRY_MAX = 0.5, 10.0
MAX_ANSWER = 1 << 16


class JoinRefused(Exception):
    """The manager refused the join token (or answered nonsense): not worth retrying."""


@dataclass(frozen=True)
class Joined:
    credential: Credential
    ring: SecretRing | None  # the cluster secret (schedulers only)


def _parse(role: str, answer: Any, manager: str) -> Joined:
    source = f"the answer of {manager}"
    try:
        credential = credential_from_doc(answer["credential"], source)
        ring = ring_from_doc(answer["cluster_secret"], source) if role == "scheduler" else None
    except (CredentialFileError, KeyError, TypeError) as exc:
        raise JoinRefused(f"{source} to a join: {exc}") from None
    if credential.claims.role != role:
        raise JoinRefused(f"{source}: a credential for a {credential.claims.role}, not a {role}")
    return Joined(credential, ring)


async def join_once(
    manager: str, token: str, role: str, hostname: str, *, timeout: float
) -> Joined:
    """One join; JoinRefused when refused, OSError or HTTPClientError when unreachable."""
    url = manager.rstrip("/") + JOIN_PATH
    body = json.dumps({"role": role, "hostname": hostname[:255] or role}).encode()
    headers = [("authorization", f"Bearer {token}"), ("content-type", "application/json")]
    client = HTTPClient(connect_timeout=timeout, read_timeout=timeout)
    try:
        async with client.request("POST", url, headers, body, follow_redirects=False) as response:
            raw = await response.read(limit=MAX_ANSWER)
            status = response.status
    finally:
        await client.aclose()
    try:
        answer = json.loads(raw) if raw else None
    except ValueError:
        answer = None
    if status != 200:
        message = answer.get("message", "") if isinstance(answer, dict) else ""
        if status in (401, 403, 404, 422):
            raise JoinRefused(f"the manager at {manager} refused to join: {status} {message}")
        raise HTTPClientError(f"the manager at {manager} answered {status} {message}".strip())
    return _parse(role, answer, manager)


async def join(manager: str, token: str, role: str, hostname: str, *, timeout: float) -> Joined:
    """Join, asking again with backoff while the manager does not answer."""
    delay = RETRY_MIN
    attempt = 0
    while True:
        try:
            joined = await join_once(manager, token, role, hostname, timeout=timeout)
        except (OSError, HTTPClientError, trio.TooSlowError) as exc:
            attempt += 1
            if attempt in (1, 10) or attempt % 100 == 0:
                log.warning("manager unreachable, joining again", manager=manager, error=str(exc))
            await trio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)
            continue
        log.info(
            "joined the cluster",
            manager=manager,
            role=role,
            host_id=joined.credential.claims.host_id,
        )
        return joined


def report_refusal(exc: BaseException) -> int:
    """A daemon's exit status for a refused join (2, said on stderr); re-raises others."""
    refused = find_exception(exc, JoinRefused)
    if refused is None:
        raise exc
    print(f"dragonfly: configuration error: trust.join_token_file: {refused}", file=sys.stderr)
    return 2
