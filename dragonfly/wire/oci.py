"""The OCI distribution API as a mirror sees it (sans-I/O).

Parses `/v2/...` request paths into routes, picks the upstream registry a request
is for (an `X-Dragonfly-Registry: SCHEME://HOST[:PORT]` header, as Dragonfly's
containerd setup sends it; else containerd's `?ns=HOST[:PORT]`; else the configured
default), and builds the error bodies registries answer with. No sockets, no clock: the caller passes
`now` where time matters.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from urllib.parse import parse_qsl, urlsplit

from dragonfly.identity import is_sha256_digest

# The repository name grammar of the distribution spec: path components of lowercase
# alphanumerics joined by separators, components joined by "/".
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME = rf"{_COMPONENT}(?:/{_COMPONENT})*"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}"
_DIGEST = r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[A-Za-z0-9=_-]+"
_MANIFEST = re.compile(rf"^/v2/(?P<name>{_NAME})/manifests/(?P<ref>{_TAG}|{_DIGEST})$")
_BLOB = re.compile(rf"^/v2/(?P<name>{_NAME})/blobs/(?P<ref>{_DIGEST})$")
_TAGS = re.compile(rf"^/v2/(?P<name>{_NAME})/tags/list$")
# A blob or manifest path whose name or reference is malformed (uploads end elsewhere).
_LOOKS_LIKE_CONTENT = re.compile(r"^/v2/.+/(?:blobs|manifests)/[^/]+$")
# A host[:port] as containerd writes it in ?ns= (a DNS name, IPv4, or [IPv6]).
_NS = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252})|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")

# containerd names Docker Hub "docker.io"; its API lives elsewhere.
DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
DOCKER_HUB_API = "https://registry-1.docker.io"

# The upstream registry with its scheme, chosen by the client (a hosts.toml header).
H_REGISTRY = "x-dragonfly-registry"
_REGISTRY_URL_MAX = 300


class RouteKind(Enum):
    BASE = "base"  # /v2/: "is this a registry, and may I?"
    MANIFEST = "manifest"
    BLOB = "blob"
    TAGS = "tags"
    OTHER = "other"  # catalog, uploads, referrers...: passed through as they are


@dataclass(frozen=True, slots=True)
class Route:
    kind: RouteKind
    path: str  # the origin-form path, unchanged
    name: str = ""  # repository
    reference: str = ""  # tag or digest

    @property
    def sha256_blob(self) -> bool:
        """A blob named by a sha256 digest: the only kind fetched through P2P, since its
        bytes can be checked against its name."""
        return self.kind is RouteKind.BLOB and is_sha256_digest(self.reference)


class MirrorError(ValueError):
    """A request the mirror cannot serve; `code` is the distribution spec error code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def is_registry_path(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


def parse_route(path: str) -> Route:
    """The route of an origin-form `/v2` path (without the query)."""
    if path in ("/v2", "/v2/"):
        return Route(RouteKind.BASE, path)
    for kind, pattern in (
        (RouteKind.BLOB, _BLOB),
        (RouteKind.MANIFEST, _MANIFEST),
        (RouteKind.TAGS, _TAGS),
    ):
        m = pattern.match(path)
        if m is not None:
            return Route(kind, path, m.group("name"), m.groupdict().get("ref") or "")
    if _LOOKS_LIKE_CONTENT.match(path):
        raise MirrorError(
            400, "NAME_INVALID", f"not a valid repository name or reference: {path!r}"
        )
    return Route(RouteKind.OTHER, path)


def registry_blob(url: str) -> tuple[Route, str, str] | None:
    """(route, registry base URL, the URL) if an absolute URL names a sha256 blob of a
    registry (`scheme://host/v2/NAME/blobs/sha256:HEX`), else None."""
    if "/blobs/" not in url:  # (asked of every proxy request: most are not blobs)
        return None
    try:
        parts = urlsplit(url)
        route = parse_route(parts.path)
    except (ValueError, MirrorError):
        return None
    if not route.sha256_blob or parts.scheme not in ("http", "https"):
        return None
    return route, f"{parts.scheme}://{parts.netloc}", url


@dataclass(frozen=True, slots=True)
class Upstreams:
    """Which registry a request goes to."""

    default: str  # "scheme://host[:port]" or "" (none configured)
    insecure: frozenset[str]  # host[:port] reached over plain http when named by ns

    @classmethod
    def from_config(cls, upstream: str, insecure: list[str]) -> Upstreams:
        return cls(upstream.rstrip("/"), frozenset(h.strip().lower() for h in insecure))

    def base_url(self, ns: str | None, named: Sequence[str] = ()) -> str:
        """The upstream's base URL for a request: the one its X-Dragonfly-Registry header
        names (`named`: the header's values), else the one `?ns=` names (None: no ns),
        else the configured one."""
        if named:
            return registry_header_url(named)
        if ns is None or ns == "":
            if not self.default:
                raise MirrorError(
                    404,
                    "NAME_UNKNOWN",
                    "no upstream registry: set registry_mirror.upstream in the peer's "
                    "configuration, or name one with ?ns=HOST (as containerd does)",
                )
            return self.default
        if not _NS.match(ns):
            raise MirrorError(
                400, "NAME_INVALID", f"bad ns parameter {ns[:200]!r}: expected HOST[:PORT]"
            )
        host = ns.lower()
        if host in DOCKER_HUB_ALIASES:
            return DOCKER_HUB_API
        if self.default and urlsplit(self.default).netloc.lower() == host:
            return self.default  # the configured upstream: its scheme is known
        scheme = "http" if host in self.insecure else "https"
        return f"{scheme}://{host}"


def registry_header_url(values: Sequence[str]) -> str:
    """The base URL an X-Dragonfly-Registry header names: `http(s)://HOST[:PORT]`, with
    Docker Hub's names meaning its API host. Anything else (a path, credentials, a query,
    another scheme, two registries) is a 400 naming the header.

    The client picks the registry, and plain http, for its own requests only: the
    registry is asked with that client's credentials and must show a blob's bytes before
    the peer serves it the blob from P2P, as for `?ns=`."""
    distinct = sorted({v.strip() for v in values})
    if len(distinct) != 1:
        raise MirrorError(
            400, "NAME_INVALID", f"X-Dragonfly-Registry: one registry, not {len(distinct)}"
        )
    value = distinct[0]
    problem = f"bad X-Dragonfly-Registry {value[:200]!r}: expected http(s)://HOST[:PORT]"
    try:
        parts = urlsplit(value)
        port = parts.port  # a ValueError when out of range
    except ValueError:
        raise MirrorError(400, "NAME_INVALID", problem) from None
    scheme, host = parts.scheme.lower(), parts.netloc.lower()
    if (
        len(value) > _REGISTRY_URL_MAX
        or scheme not in ("http", "https")
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or not _NS.match(host)  # no user:password@, nothing but HOST[:PORT]
        or port == 0
    ):
        raise MirrorError(400, "NAME_INVALID", problem)
    if scheme == "https" and host in DOCKER_HUB_ALIASES:
        return DOCKER_HUB_API
    return f"{scheme}://{host}"


def split_query(query: str) -> tuple[str | None, str]:
    """(ns, the rest of the query string) of a request to the mirror: ns is the mirror's
    own parameter and never goes upstream."""
    ns: str | None = None
    rest = []
    for segment in query.split("&") if query else []:
        if segment.partition("=")[0] == "ns":
            pairs = parse_qsl(segment, keep_blank_values=True)
            ns = pairs[0][1] if pairs else ""
        else:
            rest.append(segment)
    return ns, "&".join(rest)


def go_arch() -> str:
    """This machine's architecture as OCI (Go) names it (podman refuses a wrong one; a
    preheat picks this platform from an index unless told another)."""
    machine = platform.machine().lower()
    return {
        "x86_64": "amd64",
        "amd64": "amd64",
        "aarch64": "arm64",
        "arm64": "arm64",
        "armv7l": "arm",
        "ppc64le": "ppc64le",
        "s390x": "s390x",
        "riscv64": "riscv64",
    }.get(machine, machine)


def error_body(code: str, message: str) -> bytes:
    """The distribution spec's error document."""
    return json.dumps({"errors": [{"code": code, "message": message}]}).encode()


def credential_key(authorization: str, cookie: str = "") -> str:
    """A credential's name in caches: a hash, so tokens are not kept in memory as keys;
    "" for a client without credentials."""
    if not authorization and not cookie:
        return ""
    return hashlib.sha256(f"{authorization}\0{cookie}".encode()).hexdigest()[:32]


class ReadGrants:
    """Which credential was recently allowed to read which blob of which repository of
    which upstream.

    A blob is served from P2P only to a client the registry would serve: the mirror
    asks the registry (a HEAD with the client's credentials) and remembers a yes for
    `ttl` seconds. A no is never remembered: the client gets the registry's answer
    itself, every time. The blob is part of the key, not only the repository: a
    registry answers 404 for a digest that is not in the repository named, so a yes
    for one repository must not let its reader fetch another repository's private
    layer by naming its digest there.
    """

    def __init__(self, ttl: float, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._granted: dict[tuple[str, str, str, str], float] = {}

    def allowed(self, upstream: str, name: str, blob: str, credential: str, now: float) -> bool:
        key = (upstream, name, blob, credential)
        until = self._granted.get(key)
        if until is None:
            return False
        if now >= until:
            del self._granted[key]
            return False
        return True

    def grant(self, upstream: str, name: str, blob: str, credential: str, now: float) -> None:
        if self.ttl <= 0:
            return
        if len(self._granted) >= self.max_entries:
            self._expire(now)
            while len(self._granted) >= self.max_entries:
                # Oldest grant first: dicts keep insertion order.
                del self._granted[next(iter(self._granted))]
        key = (upstream, name, blob, credential)
        self._granted.pop(key, None)
        self._granted[key] = now + self.ttl

    def _expire(self, now: float) -> None:
        for key in [k for k, until in self._granted.items() if now >= until]:
            del self._granted[key]

    def __len__(self) -> int:
        return len(self._granted)
