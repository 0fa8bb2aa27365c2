"""Secrets out of what is kept: URLs and log events with credentials replaced (sans-I/O).

A signed URL carries its credential in the query (S3's X-Amz-Signature and
X-Amz-Security-Token, GCS's X-Goog-Signature, `token=`, `access_token=`...) or in its
userinfo (`https://user:password@host/`). Logs and the tasks table keep such URLs
with those values replaced by REDACTED: the query parameters left out of task IDs
(dragonfly.identity's signed-URL defaults, plus proxy.filtered_query_params), any
parameter whose name looks like a credential, and the whole userinfo. Everything
else stays byte for byte, so a redacted URL still says which file it was.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any
from urllib.parse import unquote_plus

from dragonfly.identity import DEFAULT_FILTERED_QUERY_PARAMS, QueryFilter

REDACTED = "REDACTED"

# Parameter names that carry a credential wherever they appear (matched case-insensitively
# against the decoded name).
_CREDENTIAL_NAME = re.compile(
    r"token|secret|passw|pwd|signature|credential|auth|session|api[-_]?key|access[-_]?key"
    r"|private[-_]?key|(^|[-_.])(key|sig|sign|code)$",
    re.IGNORECASE,
)
# Keys of log events (and of header maps inside them) whose whole value is a credential.
_SECRET_KEYS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie", "password", "token"}
)
# A URL inside free text: scheme://, then everything up to white space or a quote.
_URL_IN_TEXT = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]{0,15}://[^\s\"'<>`\\]+")
_URL_PARTS = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/?#]*)(.*)$", re.DOTALL)
_MAX_DEPTH = 4

_filter = QueryFilter.from_patterns(DEFAULT_FILTERED_QUERY_PARAMS)


def redact_params(extra: Iterable[str]) -> None:
    """Also redact these query parameters (proxy.filtered_query_params), process-wide."""
    global _filter
    _filter = QueryFilter.from_patterns([*DEFAULT_FILTERED_QUERY_PARAMS, *extra])


def _sensitive(name: str) -> bool:
    decoded = unquote_plus(name)
    return _filter.drops(decoded) or _CREDENTIAL_NAME.search(decoded) is not None


def _redact_pairs(text: str) -> str:
    """`a=1&b=2` with the values of sensitive names replaced; everything else unchanged."""
    out = []
    for segment in text.split("&"):
        name, sep, value = segment.partition("=")
        if sep and value and value != REDACTED and _sensitive(name):
            segment = f"{name}={REDACTED}"
        out.append(segment)
    return "&".join(out)


def redact_url(url: str) -> str:
    """The URL with its userinfo and credential-carrying parameters replaced by REDACTED.

    Works on the text alone (no parsing that could refuse a malformed URL): anything that
    is not scheme://authority... is returned unchanged."""
    m = _URL_PARTS.match(url)
    if m is None:
        return url
    scheme, authority, rest = m.groups()
    if "@" in authority:
        authority = f"{REDACTED}@{authority.rpartition('@')[2]}"
    rest, hash_sign, fragment = rest.partition("#")
    path, question, query = rest.partition("?")
    if query:
        query = _redact_pairs(query)
    if fragment:
        fragment = _redact_pairs(fragment)
    return f"{scheme}{authority}{path}{question}{query}{hash_sign}{fragment}"


def redact_text(text: str) -> str:
    """Every URL inside `text` redacted (error messages and tracebacks name URLs)."""
    if "://" not in text:
        return text
    return _URL_IN_TEXT.sub(_redact_match, text)


def _redact_match(m: re.Match[str]) -> str:
    # Punctuation that ends a sentence or a message ("...: cannot connect") is not the URL's.
    found = m.group(0)
    url = found.rstrip(".,;:!?)]}")
    return redact_url(url) + found[len(url) :]


def redact_value(value: Any, depth: int = 0) -> Any:
    """Strings redacted; dicts, lists and tuples walked (a few levels deep)."""
    if isinstance(value, str):
        return redact_text(value)
    if depth >= _MAX_DEPTH:
        return value
    if isinstance(value, Mapping):
        return {
            k: REDACTED
            if isinstance(k, str) and k.lower() in _SECRET_KEYS
            else redact_value(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact_value(v, depth + 1) for v in value]
    if isinstance(value, tuple):
        return tuple(redact_value(v, depth + 1) for v in value)
    return value


def redact_event(logger: Any, method: str, event: MutableMapping[str, Any]) -> Mapping[str, Any]:
    """structlog processor: every value of the event redacted."""
    redacted: Mapping[str, Any] = redact_value(event)
    return redacted
