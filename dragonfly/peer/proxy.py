"""The peer's HTTP proxy: `curl -x`, `http_proxy=` for wget and friends.

A GET whose URL matches a P2P rule is downloaded through the swarm and streamed
to the client in order as pieces land (a local hit is answered with sendfile
from the task file); everything else is passed straight to the origin. A request
with credentials goes through P2P only where its rule allows it, and only after
the origin accepted those credentials.

Every request first passes the gate (dragonfly/peer/exposure.py): a client not on
loopback must be in proxy.allowed_clients or authenticate, and may not reach
loopback, link-local or the daemon's own ports. Origin-form requests reach the
daemon itself: /healthy, /metrics and the registry mirror. (The local API of
`dragonfly get` is a unix socket in the data directory: dragonfly/peer/local_api.py.)

The checks and their order are `ProxyFront`'s; what follows them is `ProxyHandler`'s in
the daemon, and `HeldOnlyProxy`'s in a proxy worker (dragonfly/peer/proxy_worker.py),
which serves local hits and hands every other request to the daemon.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol

from dragonfly.blocklist import PRIORITY_HEADER, BlockList, refused
from dragonfly.config import PeerConfig, ProxyRule
from dragonfly.engine.access import client_ip
from dragonfly.identity import IdentityError
from dragonfly.log import get_logger
from dragonfly.metrics import PeerMetrics
from dragonfly.net.http_client import HTTPClientError
from dragonfly.net.http_origin import split_url
from dragonfly.net.http_server import Request, Responder
from dragonfly.peer.exposure import (
    CLIENT,
    ClientScope,
    DestinationRefused,
    ProxyGate,
    checked_addresses,
)
from dragonfly.peer.private import PrivateAccess
from dragonfly.peer.registry import RegistryMirror
from dragonfly.peer.request import DownloadFailed, DownloadRequest
from dragonfly.peer.services import PeerServices
from dragonfly.peer.serving import origin_headers, relay, serve_common, serve_held, stream_download
from dragonfly.peer.tunnel import handle_connect
from dragonfly.wire.oci import Route, is_registry_path, registry_blob

log = get_logger("dragonfly.peer.proxy")

H_TAG = "x-dragonfly-tag"
H_APPLICATION = "x-dragonfly-application"
H_FILTERED = "x-dragonfly-filtered-query-params"
H_USE_P2P = "x-dragonfly-use-p2p"


@dataclass(frozen=True)
class CompiledRule:
    regex: re.Pattern[str]
    rule: ProxyRule


def filtered_params(header: str | None) -> list[str]:
    if not header:
        return []
    return [p.strip() for p in re.split(r"[&,]", header) if p.strip()]


class ProxyBasics(Protocol):
    """What the proxy's checks use: the daemon, or a worker's copy of it."""

    config: PeerConfig
    metrics: PeerMetrics
    proxy_gate: ProxyGate
    block_list: BlockList  # the cluster's, as the manager last said


class ProxyFront:
    """The proxy's checks in their order (gate, destination, rules, credentials, block
    list); what to do with a request that passed them is a subclass's."""

    def __init__(self, basics: ProxyBasics) -> None:
        self.basics = basics
        self.rules = [CompiledRule(re.compile(r.regex), r) for r in basics.config.proxy.rules]
        self._counters = {
            mode: basics.metrics.proxy_requests.labels(mode)
            for mode in ("p2p", "direct", "registry_blob")
        }

    @property
    def gate(self) -> ProxyGate:
        return self.basics.proxy_gate

    # What follows the checks.
    async def _origin_form(self, request: Request, responder: Responder) -> None:
        raise NotImplementedError

    async def _connect(self, request: Request, responder: Responder) -> None:
        raise NotImplementedError

    async def _registry_blob(
        self, request: Request, responder: Responder, blob: tuple[Route, str, str]
    ) -> None:
        raise NotImplementedError

    async def _direct(self, request: Request, responder: Responder) -> None:
        raise NotImplementedError

    async def _p2p_admitted(
        self, request: Request, responder: Responder, req: DownloadRequest
    ) -> None:
        """A P2P request that passed every check, the block list included."""
        raise NotImplementedError

    def _count(self, mode: str) -> None:
        """Count a proxy request by how it is served (dragonfly_proxy_requests)."""
        self._counters[mode].inc()

    async def __call__(self, request: Request, responder: Responder) -> None:
        client = client_ip(request.client)
        refusal = await self.gate.admit(client, request.headers.get("proxy-authorization"))
        if refusal is not None:
            await self._refuse_client(refusal, request, responder)
            return
        # Every connection made for this request (and for a download it starts) is
        # checked against what this client may reach: see dragonfly/peer/exposure.py.
        scope = CLIENT.set(ClientScope(self.gate.policy, client))
        try:
            await self._route(request, responder)
        finally:
            CLIENT.reset(scope)

    async def _route(self, request: Request, responder: Responder) -> None:
        if request.target.startswith("/"):
            await self._origin_form(request, responder)
            return
        if request.method == "CONNECT":
            await self._connect(request, responder)
            return
        await self.forward(request, responder)

    async def _refuse_client(self, reason: str, request: Request, responder: Responder) -> None:
        self.basics.metrics.proxy_refusals.labels(reason).inc()
        if reason == "auth":
            await responder.send(
                407,
                b"proxy authentication required\n",
                [(b"proxy-authenticate", b'Basic realm="dragonfly"'), (b"connection", b"close")],
            )
            return
        await responder.send_error(
            403, f"this proxy does not serve {request.client} (see proxy.allowed_clients)"
        )

    async def _destination_refused(self, target: str, responder: Responder) -> bool:
        """Answer 403 (True) if the current client may not reach the URL's host, 502 if it
        does not resolve. Checked before P2P too: a local hit or another host's fetch
        would otherwise serve what this client may not reach."""
        scope = CLIENT.get()
        if scope is None or scope.policy.on_loopback(scope.client):
            return False
        try:
            origin, _ = split_url(target)
            await checked_addresses(origin.host, origin.port)
        except DestinationRefused as exc:
            self.basics.metrics.proxy_refusals.labels("destination").inc()
            await responder.send_error(403, str(exc))
            return True
        except HTTPClientError as exc:
            await responder.send_error(502, str(exc))
            return True
        return False

    async def forward(self, request: Request, responder: Responder) -> None:
        """A request for an absolute http(s) URL: through P2P under a rule, else direct."""
        target = request.target
        if not target.lower().startswith(("http://", "https://")):
            await responder.send_error(400, f"bad request target {target[:200]!r}")
            return
        if await self._destination_refused(target, responder):
            return
        rule = self._matching_rule(request)
        if rule is not None and not self._credentials_allowed(request, rule):
            rule = None
        blob = registry_blob(target) if rule is not None else None
        if blob is not None:
            # A registry blob by URL (a runtime behind https_proxy, say): the same task,
            # checks and read permission as through the mirror.
            await self._registry_blob(request, responder, blob)
            return
        if rule is None:
            await self._direct(request, responder)
            return
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

    def _download_request(self, request: Request, *, shared_credentials: bool) -> DownloadRequest:
        cfg = self.basics.config.proxy
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
        self._count("p2p")
        try:
            req = self._download_request(request, shared_credentials=rule.allow_credentials)
        except IdentityError as exc:
            await responder.send_error(400, str(exc))
            return
        # The cluster's block list (from the manager), before anything starts.
        refusal = refused(self.basics.block_list, req.spec, request.headers.get(PRIORITY_HEADER))
        if refusal is not None:
            self.basics.metrics.proxy_refusals.labels("blocked").inc()
            await responder.send_error(*refusal)
            return
        await self._p2p_admitted(request, responder, req)


class ProxyHandler(ProxyFront):
    """Routes of the daemon's proxy listener."""

    def __init__(self, daemon: PeerServices) -> None:
        super().__init__(daemon)
        self.daemon = daemon
        self.registry = RegistryMirror(daemon)
        self.private = PrivateAccess(daemon)

    async def _origin_form(self, request: Request, responder: Responder) -> None:
        """Requests to the daemon itself: health, metrics, the registry mirror
        (`/v2/...`)."""
        path = request.target.split("?", 1)[0]
        if is_registry_path(path):
            await self.registry(request, responder)
            return
        if await serve_common(self.daemon, path, responder):
            return
        await responder.send(404, b"not found: this is a forward proxy (absolute URLs)\n")

    async def _connect(self, request: Request, responder: Responder) -> None:
        await handle_connect(
            request,
            responder,
            hijacker=self.daemon.hijacker,
            forward=self.forward,
            metrics=self.daemon.metrics,
            connect_timeout=self.daemon.config.download.connect_timeout,
            connect_ports=self.gate.policy.connect_ports,
            resolve=checked_addresses,
        )

    async def _registry_blob(
        self, request: Request, responder: Responder, blob: tuple[Route, str, str]
    ) -> None:
        self._count("registry_blob")
        await self.registry.blob(request, responder, *blob)

    async def _direct(self, request: Request, responder: Responder) -> None:
        self._count("direct")
        await relay(self.daemon, request, request.target, responder)

    async def _serve_if_held(
        self, request: Request, responder: Responder, req: DownloadRequest
    ) -> bool:
        """A local hit of a task whose file is open: served from it at once, with no
        download started (the common case of many clients of one file). False: the
        usual path (not held, not loaded, in progress, or private to others)."""
        store = self.daemon.store
        handle = store.handle(req.task_id)
        if (
            handle is None
            or not handle.complete
            or handle.detached
            or req.spec.digest  # (a digest request may need the whole file hashed first)
            or (handle.record.private and not req.private)
            or self.daemon.tasks.active(req.task_id) is not None
        ):
            return False
        with store.holding(handle) as held:
            await serve_held(self.daemon.metrics, held.record, held.file.fd, request, responder)
        return True

    async def _p2p_admitted(
        self, request: Request, responder: Responder, req: DownloadRequest
    ) -> None:
        # A request with credentials: the origin says yes to them before anything starts
        # on its behalf (dragonfly/peer/private.py).
        if req.private and not await self.private.allowed(request, responder, req.task_id):
            return
        if await self._serve_if_held(request, responder, req):
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
