"""The OCI registry mirror on the proxy listener: containerd, podman and skopeo pull
through the peer.

Blobs named by a sha256 digest go through P2P with the digest as the task ID (one
layer from two registries or two repositories is one task) and the whole blob is
checked against its digest before a client gets its last bytes. Everything else
(`/v2/`, manifests, tags, HEADs) goes to the upstream registry and comes back
unchanged: tags are mutable, and a 401 with its WWW-Authenticate must reach the
client so it authenticates as it would with the registry itself.

Before a blob is served from P2P the registry is asked whether this client may
read it: a HEAD of the blob with the client's own credentials (or none), a yes
remembered briefly per credential, repository and blob. A client the registry refuses
gets the registry's own answer, even when every byte of the blob is on this peer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from dragonfly.identity import blob_task_id
from dragonfly.log import get_logger
from dragonfly.peer.download import DownloadFailed, DownloadRequest
from dragonfly.peer.proxy import origin_headers, relay, relayed_headers, stream_download
from dragonfly.wire.http_client import HTTPClientError
from dragonfly.wire.http_common import Headers
from dragonfly.wire.http_server import Request, Responder
from dragonfly.wire.oci import (
    MirrorError,
    ReadGrants,
    Route,
    Upstreams,
    credential_key,
    error_body,
    parse_route,
    split_query,
)

if TYPE_CHECKING:
    from dragonfly.peer.daemon import PeerDaemon

log = get_logger("dragonfly.peer.registry")

_CONTENT_TYPE_JSON = b"application/json; charset=utf-8"


class RegistryMirror:
    """Serves origin-form `/v2/...` requests as a mirror of one or more registries."""

    def __init__(self, daemon: PeerDaemon) -> None:
        self.daemon = daemon
        cfg = daemon.config.registry_mirror
        self.upstreams = Upstreams.from_config(cfg.upstream, cfg.insecure)
        self.grants = ReadGrants(cfg.auth_cache_ttl)

    async def __call__(self, request: Request, responder: Responder) -> None:
        path, _, query = request.target.partition("?")
        try:
            route = parse_route(path)
            ns, rest = split_query(query)
            base = self.upstreams.base_url(ns)
        except MirrorError as exc:
            await send_registry_error(responder, exc.status, exc.code, str(exc))
            return
        url = base + path + (f"?{rest}" if rest else "")
        metrics = self.daemon.metrics
        if route.sha256_blob and request.method == "GET":
            metrics.proxy_requests.labels("registry_blob").inc()
            await self.blob(request, responder, route, base, url)
            return
        metrics.proxy_requests.labels("registry_upstream").inc()
        await relay(self.daemon, request, url, responder, on_error=_upstream_error(responder))

    async def blob(
        self, request: Request, responder: Responder, route: Route, base: str, url: str
    ) -> None:
        """A GET of a sha256 blob: from P2P once the registry agreed this client may."""
        credential = credential_key(request.headers.get("authorization") or "")
        digest = route.reference
        if not self.grants.allowed(base, route.name, digest, credential, trio.current_time()):
            allowed = await self._registry_allows(request, url)
            if allowed is None:
                await send_registry_error(
                    responder, 502, "UNKNOWN", f"upstream registry {base} did not answer"
                )
                return
            if not allowed:
                # The registry's own answer (401 + WWW-Authenticate, 403, 404...).
                await relay(
                    self.daemon, request, url, responder, on_error=_upstream_error(responder)
                )
                return
            self.grants.grant(base, route.name, digest, credential, trio.current_time())
        download_request = DownloadRequest(
            task_id=blob_task_id(digest),
            url=url,
            headers=origin_headers(request.headers),
            digest=digest,
        )
        download = self.daemon.tasks.open(download_request)
        with download.attached():
            try:
                await download.wait_metadata()
            except DownloadFailed as exc:
                status = exc.client_status
                code = "BLOB_UNKNOWN" if status == 404 else "UNKNOWN"
                await send_registry_error(responder, status, code, f"dragonfly: {exc.reason}")
                return
            extra = Headers([(b"docker-content-digest", digest.encode())])
            await stream_download(self.daemon, download, request, responder, extra)

    async def _registry_allows(self, request: Request, url: str) -> bool | None:
        """Whether the registry would serve this blob to this client: a HEAD with the
        client's headers (its credentials among them). None: no answer at all."""
        headers = relayed_headers(request.headers)
        for name in (b"range", b"if-range", b"if-none-match", b"if-modified-since"):
            headers.remove(name)
        try:
            async with self.daemon.origin_client.request(
                "HEAD", url, headers, follow_redirects=False
            ) as response:
                # A redirect is the registry handing out the blob (a signed storage URL).
                return response.status < 400
        except HTTPClientError as exc:
            log.warning("registry HEAD failed", url=url, error=str(exc))
            return None


def _upstream_error(responder: Responder) -> Callable[[int, str], Awaitable[None]]:
    async def send(status: int, message: str) -> None:
        await send_registry_error(responder, status, "UNKNOWN", message)

    return send


async def send_registry_error(responder: Responder, status: int, code: str, message: str) -> None:
    """An error as a registry words it, so runtimes show the message."""
    await responder.send(status, error_body(code, message), content_type=_CONTENT_TYPE_JSON)
