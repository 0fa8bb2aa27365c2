"""A manifest URL to the blobs to preheat, asking the registry as a client would.

Auth: the request's own headers first (Harbor sends `Authorization: Bearer TOKEN`);
on a 401, the registry's `WWW-Authenticate` says how — Bearer: a token from its
`realm` for its `service` and `scope` (the repository's pull scope when it names
none), asked with the job's username and password when there are some; Basic: the
username and password. The header that worked is the one the seed peers fetch the
blobs with.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit

from dragonfly.manager.jobs.image import (
    ACCEPT,
    INDEX_TYPES,
    MAX_MANIFEST,
    BlobRef,
    ImageError,
    ManifestUrl,
    blobs_of,
    decode_document,
    media_type,
    parse_challenge,
    parse_manifest_url,
    pick_platform,
    registry_reason,
)
from dragonfly.net.http_client import HTTPClient, HTTPClientError


@dataclass
class ResolvedImage:
    image: ManifestUrl
    blobs: list[BlobRef]
    headers: dict[str, str]  # what fetches the blobs (the registry's auth among them)
    platform_digest: str = ""  # the manifest picked from an index


@dataclass
class RegistryAuth:
    client: HTTPClient
    image: ManifestUrl
    username: str = ""
    password: str = ""
    headers: dict[str, str] = field(default_factory=dict)

    def _basic(self) -> str:
        pair = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(pair).decode()

    async def get(self, url: str, accept: str) -> tuple[int, bytes, str, str]:
        """(status, body, content type, WWW-Authenticate) of a GET with the current auth."""
        hdrs = [("accept", accept), *self.headers.items()]
        try:
            async with self.client.request("GET", url, hdrs) as response:
                body = await response.read(limit=MAX_MANIFEST)
                return (
                    response.status,
                    body,
                    response.headers.get("content-type") or "",
                    response.headers.get("www-authenticate") or "",
                )
        except HTTPClientError as exc:
            raise ImageError(f"{url}: {exc}") from None

    async def get_document(self, url: str) -> tuple[dict[str, Any], str]:
        status, body, ctype, challenge = await self.get(url, ACCEPT)
        if status == 401 and await self._authenticate(challenge):
            status, body, ctype, _ = await self.get(url, ACCEPT)
        if status != 200:
            raise ImageError(f"{url}: the registry answered {registry_reason(status, body)}")
        return decode_document(body, url), ctype

    async def _authenticate(self, header: str) -> bool:
        """Set the Authorization a 401's challenge asks for; False if there is none to try."""
        challenge = parse_challenge(header)
        if challenge is None:
            return False
        if challenge.scheme == "basic":
            if not self.username:
                return False
            self.headers = {**self._drop_auth(), "Authorization": self._basic()}
            return True
        if challenge.scheme != "bearer":
            return False
        realm = challenge.params.get("realm", "")
        if urlsplit(realm).scheme not in ("http", "https"):
            raise ImageError(f"the registry's token realm is not an http(s) URL: {realm[:200]!r}")
        query = {
            "service": challenge.params.get("service", ""),
            "scope": challenge.params.get("scope") or f"repository:{self.image.name}:pull",
        }
        url = (
            realm
            + ("&" if "?" in realm else "?")
            + urlencode({k: v for k, v in query.items() if v})
        )
        hdrs = [("authorization", self._basic())] if self.username else []
        try:
            async with self.client.request("GET", url, hdrs) as response:
                body = await response.read(limit=1 << 20)
                status = response.status
        except HTTPClientError as exc:
            raise ImageError(f"token {realm}: {exc}") from None
        if status != 200:
            raise ImageError(f"token {realm}: answered {registry_reason(status, body)}")
        try:
            doc = json.loads(body)
            token = doc.get("token") or doc.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise ImageError(f"token {realm}: no token in its answer")
        self.headers = {**self._drop_auth(), "Authorization": f"Bearer {token}"}
        return True

    def _drop_auth(self) -> dict[str, str]:
        return {k: v for k, v in self.headers.items() if k.lower() != "authorization"}


async def resolve_image(
    client: HTTPClient,
    url: str,
    *,
    platform: str,
    headers: dict[str, str] | None = None,
    username: str = "",
    password: str = "",
) -> ResolvedImage:
    """The blobs of the image `url` names, for `platform`; ImageError saying why not."""
    image = parse_manifest_url(url)
    auth = RegistryAuth(client, image, username, password, dict(headers or {}))
    doc, ctype = await auth.get_document(image.manifest())
    picked = ""
    if media_type(doc, ctype) in INDEX_TYPES:
        picked = pick_platform(doc, platform)
        doc, ctype = await auth.get_document(image.manifest(picked))
        if media_type(doc, ctype) in INDEX_TYPES:
            raise ImageError(f"{image.manifest(picked)}: an index inside an index")
    return ResolvedImage(image, blobs_of(doc), dict(auth.headers), picked)
