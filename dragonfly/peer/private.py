"""Private tasks: their bytes reach a client of the proxy only once the origin said yes.

A task is private when a request that made it carried credentials (Authorization,
Cookie, a signature left out of the task ID, a header in `proxy.credential_headers`):
its ID is shared with requests that carry other credentials or none, so the origin,
not the swarm, decides who reads it. Before such a client gets a byte, the origin
is asked with that client's own URL and headers: a HEAD, and where HEAD gets no yes
(presigned URLs are signed for GET), one byte with a Range GET. A yes is remembered
for `proxy.private_check_ttl` per origin, URL, task and credential (the mirror's
`ReadGrants`); a no never is, and the client gets the origin's status and headers.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import trio

from dragonfly.log import get_logger
from dragonfly.net.http_client import HTTPClientError
from dragonfly.net.http_server import Request, Responder
from dragonfly.peer.services import PeerServices
from dragonfly.peer.serving import origin_headers
from dragonfly.peer.source import origin_request_headers
from dragonfly.wire.http_common import Headers
from dragonfly.wire.oci import ReadGrants, credential_key

log = get_logger("dragonfly.peer.private")

# What counts as the origin's yes: it would send the bytes (or send the client to
# storage with a 307/308). A 301/302/303 is often a login page: not a yes.
_YES = frozenset({200, 204, 206, 307, 308})


class PrivateAccess:
    """The origin's answers to clients of private tasks, briefly remembered."""

    def __init__(self, daemon: PeerServices) -> None:
        self.daemon = daemon
        cfg = daemon.config.proxy
        self.grants = ReadGrants(cfg.private_check_ttl)
        self.credential_headers = tuple(h.strip().lower() for h in cfg.credential_headers)

    def _credential(self, request: Request) -> str:
        headers = request.headers
        extra = "\0".join(headers.get(name) or "" for name in self.credential_headers)
        return credential_key(
            headers.get("authorization") or "", (headers.get("cookie") or "") + "\0" + extra
        )

    async def allowed(self, request: Request, responder: Responder, task_id: str) -> bool:
        """Whether the origin lets this client read its URL; if not, the client has been
        answered with the origin's status (a 502 when the origin could not be asked)."""
        url = request.target
        parts = urlsplit(url)
        key = (f"{parts.scheme}://{parts.netloc}", url, task_id, self._credential(request))
        if self.grants.allowed(*key, trio.current_time()):
            return True
        headers = origin_request_headers(origin_headers(request.headers))
        client = self.daemon.origin_client
        try:
            async with client.request("HEAD", url, headers, follow_redirects=False) as r:
                status, answer = r.status, r.headers
            if status not in _YES:
                headers.set("range", "bytes=0-0")
                async with client.request("GET", url, headers, follow_redirects=False) as r:
                    status, answer = r.status, r.headers
        except HTTPClientError as exc:
            await responder.send_error(502, f"origin: {exc}")
            return False
        if status in _YES:
            self.grants.grant(*key, trio.current_time())
            return True
        log.info("origin refused a client of a private task", task_id=task_id, status=status)
        refusal = Headers(
            (k, v) for k, v in answer.without_hop_by_hop() if k not in (b"content-length",)
        )
        refusal.set(b"content-length", b"0")
        await responder.start(status, refusal)
        await responder.finish()
        return False
