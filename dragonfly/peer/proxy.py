"""The peer's HTTP proxy: `curl -x`, `http_proxy=` for wget and friends.

A GET whose URL matches a P2P rule is downloaded through the swarm and streamed
to the client in order as pieces land (a local hit is answered with sendfile
from the task file); everything else is passed straight to the origin. A request
with credentials goes through P2P only where its rule allows it, and only after
the origin accepted those credentials.

Origin-form requests reach the daemon itself: /healthy, /metrics, and the local
API `POST /_dragonfly/tasks` used by `dragonfly get`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import trio

from dragonfly.config import ProxyRule
from dragonfly.identity import IdentityError
from dragonfly.log import get_logger
from dragonfly.net.http_server import Request, Responder
from dragonfly.peer.download import Download, DownloadFailed, DownloadRequest
from dragonfly.peer.private import PrivateAccess
from dragonfly.peer.registry import RegistryMirror
from dragonfly.peer.services import PeerServices
from dragonfly.peer.serving import origin_headers, relay, serve_common, stream_download
from dragonfly.peer.tunnel import handle_connect
from dragonfly.storage.taskfile import task_path
from dragonfly.wire.oci import is_registry_path, registry_blob

log = get_logger("dragonfly.peer.proxy")

H_TAG = "x-dragonfly-tag"
H_APPLICATION = "x-dragonfly-application"
H_FILTERED = "x-dragonfly-filtered-query-params"
H_USE_P2P = "x-dragonfly-use-p2p"
LOCAL_API = "/_dragonfly/tasks"


@dataclass(frozen=True)
class CompiledRule:
    regex: re.Pattern[str]
    rule: ProxyRule


def filtered_params(header: str | None) -> list[str]:
    if not header:
        return []
    return [p.strip() for p in re.split(r"[&,]", header) if p.strip()]


class ProxyHandler:
    """Routes of the proxy listener."""

    def __init__(self, daemon: PeerServices) -> None:
        self.daemon = daemon
        self.rules = [CompiledRule(re.compile(r.regex), r) for r in daemon.config.proxy.rules]
        self.registry = RegistryMirror(daemon)
        self.private = PrivateAccess(daemon)

    async def __call__(self, request: Request, responder: Responder) -> None:
        target = request.target
        if target.startswith("/"):
            await self._origin_form(request, responder)
            return
        if request.method == "CONNECT":
            await handle_connect(
                request,
                responder,
                hijacker=self.daemon.hijacker,
                forward=self.forward,
                metrics=self.daemon.metrics,
                connect_timeout=self.daemon.config.download.connect_timeout,
            )
            return
        await self.forward(request, responder)

    async def _origin_form(self, request: Request, responder: Responder) -> None:
        """Requests to the daemon itself: health, metrics, the local API, the registry
        mirror (`/v2/...`)."""
        path = request.target.split("?", 1)[0]
        if is_registry_path(path):
            await self.registry(request, responder)
            return
        if await serve_common(self.daemon, path, responder):
            return
        if path == LOCAL_API and request.method == "POST":
            await self._local_api(request, responder)
            return
        await responder.send(404, b"not found: this is a forward proxy (absolute URLs)\n")

    async def forward(self, request: Request, responder: Responder) -> None:
        """A request for an absolute http(s) URL: through P2P under a rule, else direct."""
        target = request.target
        metrics = self.daemon.metrics
        if not target.lower().startswith(("http://", "https://")):
            await responder.send_error(400, f"bad request target {target[:200]!r}")
            return
        rule = self._matching_rule(request)
        if rule is not None and not self._credentials_allowed(request, rule):
            rule = None
        blob = registry_blob(target) if rule is not None else None
        if blob is not None:
            # A registry blob by URL (a runtime behind https_proxy, say): the same task,
            # checks and read permission as through the mirror.
            metrics.proxy_requests.labels("registry_blob").inc()
            await self.registry.blob(request, responder, *blob)
            return
        if rule is None:
            metrics.proxy_requests.labels("direct").inc()
            await self._direct(request, responder)
            return
        metrics.proxy_requests.labels("p2p").inc()
        await self._p2p(request, responder, rule)

    def _matching_rule(self, request: Request) -> ProxyRule | None:
        """The rule under which this request may go through P2P, or None (direct).

        HEAD goes to the origin: it must not start a download of the whole file.
        """
        if request.method != "GET":
            return None
        if (request.headers.get(H_USE_P2P) or "").strip().lower() in ("false", "0", "no"):
            return None
        for compiled in self.rules:
            if compiled.regex.search(request.target):
                return None if compiled.rule.direct else compiled.rule
        return None

    @staticmethod
    def _credentials_allowed(request: Request, rule: ProxyRule) -> bool:
        """A request with someone's credentials shares P2P only where its rule says so."""
        has_credentials = "authorization" in request.headers or "cookie" in request.headers
        return rule.allow_credentials or not has_credentials

    # ---------------------------------------------------------------- direct

    async def _direct(self, request: Request, responder: Responder) -> None:
        await relay(self.daemon, request, request.target, responder)

    # ---------------------------------------------------------------- P2P

    def _download_request(self, request: Request, *, shared_credentials: bool) -> DownloadRequest:
        cfg = self.daemon.config.proxy
        return DownloadRequest.for_url(
            request.target,
            tag=request.headers.get(H_TAG) or "",
            application=request.headers.get(H_APPLICATION) or "",
            headers=origin_headers(request.headers),
            filtered_query_params=list(cfg.filtered_query_params)
            + filtered_params(request.headers.get(H_FILTERED)),
            shared_credentials=shared_credentials,
            credential_headers=cfg.credential_headers,
        )

    async def _p2p(self, request: Request, responder: Responder, rule: ProxyRule) -> None:
        try:
            req = self._download_request(request, shared_credentials=rule.allow_credentials)
        except IdentityError as exc:
            await responder.send_error(400, str(exc))
            return
        # A request with credentials: the origin says yes to them before anything starts
        # on its behalf (dragonfly/peer/private.py).
        if req.private and not await self.private.allowed(request, responder, req.task_id):
            return
        # A Range request fetches only the pieces it covers, unless prefetch is on.
        ranged = request.headers.get("range") is not None
        req.whole = not ranged or self.daemon.config.proxy.prefetch
        download = self.daemon.tasks.open(req)
        with download.attached():
            try:
                await download.wait_metadata()
            except DownloadFailed as exc:
                await responder.send_error(exc.client_status, f"dragonfly: {exc.reason}")
                return
            # Someone made the task with credentials: its bytes are not this client's
            # unless the origin says so.
            if (
                download.private
                and not req.private
                and not await self.private.allowed(request, responder, req.task_id)
            ):
                return
            await stream_download(self.daemon, download, request, responder)

    # ---------------------------------------------------------------- local API

    async def _local_api(self, request: Request, responder: Responder) -> None:
        """`dragonfly get`: download a URL and report progress as JSON lines; the last
        line names the finished task file, which the client copies out itself."""
        if not request.client.startswith(("127.", "[::1]", "::1")):
            await responder.send_error(403, "the local API is for this host only")
            return
        try:
            spec = json.loads(await request.read_body(limit=1 << 20))
            url = spec["url"]
            if not isinstance(url, str):
                raise TypeError("url must be a string")
            headers = spec.get("headers", {})
            req = DownloadRequest.for_url(
                url,
                tag=str(spec.get("tag", "")),
                application=str(spec.get("application", "")),
                headers={str(k).lower(): str(v) for k, v in headers.items()},
                filtered_query_params=list(self.daemon.config.proxy.filtered_query_params)
                + [str(p) for p in spec.get("filtered_query_params", [])],
                back_to_source=bool(spec.get("back_to_source", True)),
            )
        except (ValueError, KeyError, TypeError, AttributeError, IdentityError) as exc:
            await responder.send_error(400, f"bad download request: {exc}")
            return
        download = self.daemon.tasks.open(req)
        with download.attached():
            await self._report_progress(req, download, responder)

    async def _report_progress(
        self, req: DownloadRequest, download: Download, responder: Responder
    ) -> None:
        await responder.start(200, [(b"content-type", b"application/x-ndjson")])

        async def line(obj: dict[str, object]) -> None:
            await responder.write((json.dumps(obj) + "\n").encode())

        try:
            await download.wait_metadata()
            while not download.finished.is_set():
                await line(
                    {"completed": download.completed_bytes, "total": download.content_length}
                )
                with trio.move_on_after(0.2):
                    await download.wait_finished()
            path = str(task_path(self.daemon.data_dir, req.task_id))
            await line(
                {
                    "state": "succeeded",
                    "task_id": req.task_id,
                    "path": path,
                    "content_length": download.content_length,
                    "completed": download.content_length,
                    "total": download.content_length,
                }
            )
        except DownloadFailed as exc:
            await line({"state": "failed", "reason": exc.reason, "http_status": exc.http_status})
        await responder.finish()
