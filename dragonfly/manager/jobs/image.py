"""An image as a preheat sees it, without I/O: the manifest URL, the registry's auth
challenge, an index's platforms, a manifest's blobs.

An index (OCI image index or Docker manifest list) is followed to the manifest of the
platform asked for, `os/arch[/variant]` (default: this manager's, linux/ARCH); the
config and every layer of that manifest are the blobs, each preheated under the task
the registry mirror uses for it (its digest), at the URL a pull would fetch it from.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from dragonfly.identity import is_sha256_digest
from dragonfly.wire.messages import TaskSpec
from dragonfly.wire.oci import go_arch, parse_route

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
ACCEPT = ", ".join((OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST))
MAX_MANIFEST = 4 << 20
MAX_LAYERS = 1000

_PARAM = re.compile(r'\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^,\s]*))\s*,?')


class ImageError(Exception):
    """The image cannot be preheated; the message says why (the registry's words where
    it gave some)."""


@dataclass(frozen=True)
class ManifestUrl:
    base: str  # scheme://host[:port]
    name: str  # repository
    reference: str  # tag or digest

    def manifest(self, reference: str | None = None) -> str:
        return f"{self.base}/v2/{self.name}/manifests/{reference or self.reference}"

    def blob(self, digest: str) -> str:
        return f"{self.base}/v2/{self.name}/blobs/{digest}"


def parse_manifest_url(url: str) -> ManifestUrl:
    parts = urlsplit(url)
    route = parse_route(parts.path)
    if parts.scheme not in ("http", "https") or route.kind.value != "manifest":
        raise ImageError(f"not a manifest URL: {url[:200]!r}")
    return ManifestUrl(f"{parts.scheme}://{parts.netloc}", route.name, route.reference)


@dataclass(frozen=True)
class Challenge:
    scheme: str  # "bearer" or "basic"
    params: dict[str, str]


def parse_challenge(header: str) -> Challenge | None:
    """A WWW-Authenticate header's first challenge (Bearer realm/service/scope, Basic)."""
    scheme, _, rest = header.strip().partition(" ")
    if not scheme:
        return None
    params = {
        m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
        for m in _PARAM.finditer(rest)
    }
    return Challenge(scheme.lower(), params)


def default_platform() -> str:
    return f"linux/{go_arch()}"


def parse_platform(text: str) -> tuple[str, str, str]:
    parts = (text or default_platform()).split("/")
    if not 2 <= len(parts) <= 3 or not all(parts):
        raise ImageError(f"platform {text[:64]!r}: expected os/arch[/variant], e.g. linux/amd64")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else ""


def decode_document(body: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except ValueError:
        raise ImageError(f"{what}: not JSON") from None
    if not isinstance(doc, dict):
        raise ImageError(f"{what}: not a JSON object")
    return doc


def media_type(doc: dict[str, Any], content_type: str) -> str:
    declared = doc.get("mediaType")
    if isinstance(declared, str) and declared:
        return declared
    ct = content_type.split(";")[0].strip()
    if ct in (*INDEX_TYPES, *MANIFEST_TYPES):
        return ct
    return OCI_INDEX if "manifests" in doc else OCI_MANIFEST


def pick_platform(index: dict[str, Any], platform: str) -> str:
    """The digest of the index's manifest for `platform` (os/arch[/variant]); an
    ImageError naming the platforms there are when it has none."""
    want_os, want_arch, want_variant = parse_platform(platform)
    offered = []
    for entry in index.get("manifests") or []:
        if not isinstance(entry, dict):
            continue
        p = entry.get("platform") or {}
        os_, arch, variant = (
            str(p.get("os", "")),
            str(p.get("architecture", "")),
            str(p.get("variant", "")),
        )
        offered.append("/".join(x for x in (os_, arch, variant) if x))
        digest = entry.get("digest")
        if (
            os_ == want_os
            and arch == want_arch
            and (not want_variant or variant == want_variant)
            and isinstance(digest, str)
            and is_sha256_digest(digest)
        ):
            return digest
    wanted = "/".join(x for x in (want_os, want_arch, want_variant) if x)
    raise ImageError(
        f"the index has no manifest for {wanted} (it has: {', '.join(offered) or 'none'})"
    )


@dataclass(frozen=True)
class BlobRef:
    digest: str
    size: int
    media_type: str


def blobs_of(manifest: dict[str, Any]) -> list[BlobRef]:
    """The config and the layers of an image manifest, in that order."""
    found = []
    entries = [manifest.get("config"), *(manifest.get("layers") or [])]
    if len(entries) > MAX_LAYERS + 1:
        raise ImageError(f"the manifest has over {MAX_LAYERS} layers")
    for entry in entries:
        if not isinstance(entry, dict):
            raise ImageError("the manifest has no config, or a layer that is not an object")
        digest = entry.get("digest")
        if not isinstance(digest, str) or not is_sha256_digest(digest):
            raise ImageError(
                f"the manifest names a blob without a sha256 digest: {str(digest)[:80]!r}"
            )
        size = entry.get("size")
        found.append(
            BlobRef(digest, size if isinstance(size, int) else -1, str(entry.get("mediaType", "")))
        )
    return list({b.digest: b for b in found}.values())


def blob_spec(image: ManifestUrl, blob: BlobRef) -> TaskSpec:
    """The task the registry mirror makes for this blob (dragonfly/peer/registry.py):
    its ID is the digest, so the pull that follows finds it."""
    return TaskSpec(url=image.blob(blob.digest), digest=blob.digest)


def registry_reason(status: int, body: bytes) -> str:
    """A registry's refusal in its own words: `CODE: message` from its error document."""
    try:
        doc = json.loads(body)
        first = doc["errors"][0]
        text = f"{first.get('code', '')}: {first.get('message', '')}".strip(": ")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        text = body[:200].decode("utf-8", "replace").strip()
    return f"HTTP {status}" + (f" {text}" if text else "")
