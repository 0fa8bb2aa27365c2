"""The OCI registry mirror on the proxy listener: containerd, podman and skopeo pull
through the peer.

The registry a request is for: the one its X-Dragonfly-Registry header names (with
its scheme), else containerd's `?ns=`, else `registry_mirror.upstream`. Blobs named
by a sha256 digest go through P2P with the digest as the task ID (one layer from two
registries or two repositories is one task) and the whole blob is checked against its
digest before a client gets its last bytes. Everything else
(`/v2/`, manifests, tags, HEADs) goes to the upstream registry and comes back
unchanged: tags are mutable, and a 401 with its WWW-Authenticate must reach the
client so it authenticates as it would with the registry itself.

Before a blob is served from P2P the registry is asked whether this client may
read it: a HEAD of the blob with the client's own credentials (or none), then a few
bytes at a random offset read from it, which must equal the blob's verified bytes
(a registry the client names itself cannot say yes to a layer it does not hold). A
yes is remembered briefly per registry, repository, blob and credential. A client
the registry refuses gets the registry's own answer, even when every byte of the
blob is on this peer.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Awaitable, Callable

import trio

from dragonfly.blocklist import PRIORITY_HEADER, refused
from dragonfly.log import get_logger
from dragonfly.net.http_client import HTTPClientError
from dragonfly.net.http_server import Request, Responder
from dragonfly.peer.download import Download
from dragonfly.peer.request import DownloadFailed, DownloadRequest
from dragonfly.peer.services import PeerServices
from dragonfly.peer.serving import origin_headers, relay, stream_download
from dragonfly.peer.source import origin_request_headers
from dragonfly.wire.http_common import Headers
from dragonfly.wire.messages import TaskSpec
from dragonfly.wire.oci import (
    H_REGISTRY,
    MirrorError,
    ReadGrants,
    Route,
    Upstreams,
    credential_key,
    error_body,
    parse_route,
    split_query,
)

log = get_logger("dragonfly.peer.registry")

_CONTENT_TYPE_JSON = b"application/json; charset=utf-8"
# The proof a registry holds a blob: this many bytes at a random offset in its first
# PROOF_WINDOW bytes (within the first piece, which a client streams first anyway).
PROOF_BYTES = 32
PROOF_WINDOW = 1 << 20


class RegistryMirror:
    """Serves origin-form `/v2/...` requests as a mirror of one or more registries."""

    def __init__(self, daemon: PeerServices) -> None:
        self.daemon = daemon
        cfg = daemon.config.registry_mirror
        self.upstreams = Upstreams.from_config(cfg.upstream, cfg.insecure)
        self.grants = ReadGrants(cfg.auth_cache_ttl)

    async def __call__(self, request: Request, responder: Responder) -> None:
        path, _, query = request.target.partition("?")
        try:
            route = parse_route(path)
            ns, rest = split_query(query)
            base = self.upstreams.base_url(ns, request.headers.get_all(H_REGISTRY))
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
        await self._registry_answer(request, responder, url)

    async def blob(
        self, request: Request, responder: Responder, route: Route, base: str, url: str
    ) -> None:
        """A GET of a sha256 blob: from P2P once the registry agreed this client may,
        and showed it holds this blob's bytes."""
        credential = credential_key(
            request.headers.get("authorization") or "", request.headers.get("cookie") or ""
        )
        digest = route.reference
        spec = TaskSpec(url=url, digest=digest)
        refusal = refused(self.daemon.block_list, spec, request.headers.get(PRIORITY_HEADER))
        if refusal is not None:
            self.daemon.metrics.proxy_refusals.labels("blocked").inc()
            await send_registry_error(responder, refusal[0], "DENIED", refusal[1])
            return
        key = (base, route.name, digest, credential)
        granted = self.grants.allowed(*key, trio.current_time())
        if not granted:
            allowed = await self._registry_allows(request, url)
            if allowed is None:
                await send_registry_error(
                    responder, 502, "UNKNOWN", f"upstream registry {base} did not answer"
                )
                return
            if not allowed:
                await self._registry_answer(request, responder, url)
                return
        download_request = DownloadRequest(
            spec,
            origin_headers(request.headers),
            private=bool(credential),  # (pulled with credentials: the task is private)
        )
        download = self.daemon.tasks.open(download_request)
        with download.attached():
            try:
                await download.wait_metadata()
                if not granted:
                    if not await self._registry_holds(request, url, download):
                        await self._registry_answer(request, responder, url)
                        return
                    self.grants.grant(*key, trio.current_time())
            except DownloadFailed as exc:
                status = exc.client_status
                code = "BLOB_UNKNOWN" if status == 404 else "UNKNOWN"
                await send_registry_error(responder, status, code, f"dragonfly: {exc.reason}")
                return
            extra = Headers([(b"docker-content-digest", digest.encode())])
            await stream_download(self.daemon, download, request, responder, extra)

    async def _registry_answer(self, request: Request, responder: Responder, url: str) -> None:
        """The registry's own answer to this client (401 + WWW-Authenticate, 404...)."""
        await relay(self.daemon, request, url, responder, on_error=_upstream_error(responder))

    async def _registry_allows(self, request: Request, url: str) -> bool | None:
        """Whether the registry would serve this blob to this client: a HEAD with the
        client's headers (its credentials among them). None: no answer at all.

        Only 200 or a 307/308 to storage is a yes: a 302 is what single-sign-on fronts
        answer an unauthenticated client with (a login page)."""
        headers = _ask_headers(request)
        try:
            async with self.daemon.origin_client.request(
                "HEAD", url, headers, follow_redirects=False
            ) as response:
                return response.status in (200, 307, 308)
        except HTTPClientError as exc:
            log.warning("registry HEAD failed", url=url, error=str(exc))
            return None

    async def _registry_holds(self, request: Request, url: str, download: Download) -> bool:
        """Proof that the registry this client named holds this very blob: a few bytes at
        a random offset, fetched from it with the client's credentials, equal the
        verified bytes in the swarm.

        The task is the digest alone, shared by every registry; without this, a client
        could name a registry of its own that says yes to anything (`?ns=`, or a URL
        through the forward proxy) and read a private layer that some other client
        pulled from the registry that guards it."""
        total = download.content_length
        if total <= 0:
            return True  # the empty blob: nothing to guard
        n = min(PROOF_BYTES, total)
        offset = secrets.randbelow(min(total, PROOF_WINDOW) - n + 1)
        headers = _ask_headers(request)
        headers.set("range", f"bytes={offset}-{offset + n - 1}")
        try:
            async with self.daemon.origin_client.request("GET", url, headers) as response:
                if response.status == 206:
                    got = await response.read(limit=n)
                elif response.status == 200:  # no ranges: the body's first bytes
                    buf = bytearray(offset + n)
                    await response.readinto_exactly(buf)
                    got = bytes(buf[offset:])
                else:
                    log.info("registry refused the proof read", url=url, status=response.status)
                    return False
        except HTTPClientError as exc:
            log.info("registry proof read failed", url=url, error=str(exc))
            return False
        piece_length = download.piece_length
        for number in range(offset // piece_length, (offset + n - 1) // piece_length + 1):
            await download.wait_piece(number)
        async with self.daemon.store.use(download.task_id) as handle:
            held = os.pread(handle.file.fd, n, offset)
        if got != held:
            log.warning("a registry did not show this blob's bytes", url=url)
            return False
        return True


def _ask_headers(request: Request) -> Headers:
    """The client's headers for asking its registry on its behalf: those a fetch from the
    origin carries (credentials among them; no range, conditionals or encodings)."""
    return origin_request_headers(origin_headers(request.headers))


def _upstream_error(responder: Responder) -> Callable[[int, str], Awaitable[None]]:
    async def send(status: int, message: str) -> None:
        await send_registry_error(responder, status, "UNKNOWN", message)

    return send


async def send_registry_error(responder: Responder, status: int, code: str, message: str) -> None:
    """An error as a registry words it, so runtimes show the message."""
    await responder.send(status, error_body(code, message), content_type=_CONTENT_TYPE_JSON)
