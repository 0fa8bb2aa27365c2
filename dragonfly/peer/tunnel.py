"""CONNECT on the peer's proxy: blind tunnels, and HTTPS interception for chosen hosts.

`https_proxy=http://PEER` makes curl, pip and huggingface_hub send
`CONNECT HOST:PORT`, which may name a port of `proxy.connect_ports` only (443 by
default). By default the proxy answers 200 and copies bytes both ways untouched
(it never sees inside the TLS), connecting to the address the resolver checked
for this client (dragonfly/peer/exposure.py). For hosts that match
`proxy.hijack_https.hosts` it terminates the TLS itself with a certificate for
that host signed by the configured CA, reads the HTTP/1.1 requests inside with
the same server code as plain HTTP, and hands each to the proxy as an absolute
`https://` URL: proxy rules, P2P and the origin's certificate check then apply
exactly as for any other request.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from dragonfly.config import HijackHTTPSSection
from dragonfly.log import get_logger
from dragonfly.metrics import PeerMetrics
from dragonfly.net.http_client import HTTPClientError, Resolver
from dragonfly.net.http_server import Request, Responder, serve_connection
from dragonfly.net.tls import LeafBudgetSpent, LeafCache, TLSError, hijack_ca, is_dns_name
from dragonfly.peer.exposure import DestinationRefused

# The proxy's path for one request (absolute URL): what an intercepted request goes to.
Forward = Callable[[Request, Responder], Awaitable[None]]

log = get_logger("dragonfly.peer.tunnel")

# A tunnel that moves no byte either way for this long is closed.
TUNNEL_IDLE_TIMEOUT = 300.0
HANDSHAKE_TIMEOUT = 30.0
# Idle time between requests inside an intercepted tunnel.
HIJACK_IDLE_TIMEOUT = 120.0
COPY_SIZE = 64 * 1024

_AUTHORITY = re.compile(
    r"^(?:\[(?P<ip6>[0-9A-Fa-f:.]+)\]|(?P<host>[^\[\]:/@\s]+)):(?P<port>[0-9]+)$"
)


class BadTarget(ValueError):
    """A CONNECT target that is not HOST:PORT; the message says what is wrong."""


@dataclass(frozen=True)
class Authority:
    """HOST:PORT of a CONNECT: host lowercased, an IPv6 address without brackets."""

    host: str
    port: int

    @property
    def is_ipv6(self) -> bool:
        return ":" in self.host

    @property
    def bracketed_host(self) -> str:
        """The host as a URL or request line writes it (IPv6 in brackets)."""
        return f"[{self.host}]" if self.is_ipv6 else self.host

    def __str__(self) -> str:
        """HOST:PORT as a request names it: what hijack regexes see."""
        return f"{self.bracketed_host}:{self.port}"

    def url_prefix(self) -> str:
        """https://HOST[:PORT] (the port left out when it is 443)."""
        host = self.bracketed_host
        return f"https://{host}" if self.port == 443 else f"https://{host}:{self.port}"


def parse_authority(target: str) -> Authority:
    """The HOST:PORT of a CONNECT request; BadTarget naming the problem."""
    shown = repr(target[:200])
    m = _AUTHORITY.match(target)
    if m is None:
        if target and ":" not in target:
            raise BadTarget(f"CONNECT target {shown} has no port: expected HOST:PORT")
        raise BadTarget(f"CONNECT target {shown} is not HOST:PORT")
    port_text = m.group("port")
    port = int(port_text) if len(port_text) <= 5 else 0
    if not 1 <= port <= 65535:
        raise BadTarget(f"CONNECT target {shown}: port must be 1-65535")
    if m.group("ip6") is not None:
        try:
            address = ipaddress.IPv6Address(m.group("ip6"))
        except ValueError:
            raise BadTarget(f"CONNECT target {shown}: not an IPv6 address in brackets") from None
        return Authority(str(address), port)
    host = m.group("host").lower()
    if not is_dns_name(host):
        raise BadTarget(f"CONNECT target {shown}: {host!r} is not a host name or address")
    return Authority(host, port)


class Hijacker:
    """Which CONNECTs are intercepted, and the certificates to present for them."""

    def __init__(self, section: HijackHTTPSSection) -> None:
        ca = hijack_ca(section)  # ConfigError naming the key: refuses to start
        self.enabled = ca is not None and bool(section.hosts)
        self.hosts = [re.compile(h) for h in section.hosts]
        self.leaves = (
            LeafCache(ca, max_entries=section.leaf_cache_size, per_minute=section.leaf_rate)
            if ca is not None
            else None
        )

    def matches(self, authority: Authority) -> bool:
        if not self.enabled:
            return False
        name = str(authority)
        return any(r.search(name) for r in self.hosts)

    async def context(self, authority: Authority) -> ssl.SSLContext:
        assert self.leaves is not None
        return await self.leaves.context(authority.host)


async def handle_connect(
    request: Request,
    responder: Responder,
    *,
    hijacker: Hijacker,
    forward: Forward,
    metrics: PeerMetrics,
    connect_timeout: float,
    connect_ports: frozenset[int],
    resolve: Resolver,
) -> None:
    """Answer one CONNECT: 400 for a bad target, 403 for a port outside `connect_ports`,
    else intercept it (the requests inside go to `forward`) or tunnel it to the
    addresses `resolve` gives."""
    try:
        authority = parse_authority(request.target)
    except BadTarget as exc:
        await responder.send_error(400, str(exc))
        return
    if authority.port not in connect_ports:
        metrics.proxy_refusals.labels("connect_port").inc()
        await responder.send_error(
            403, f"CONNECT to port {authority.port} is not allowed (proxy.connect_ports)"
        )
        return
    if request.headers.get("content-length") not in (None, "0") or request.headers.get(
        "transfer-encoding"
    ):
        await responder.send_error(400, "a CONNECT request has no body")
        return
    if hijacker.matches(authority):
        metrics.proxy_requests.labels("hijack").inc()
        await _hijack(forward, hijacker, authority, request, responder, metrics)
        return
    metrics.proxy_requests.labels("tunnel").inc()
    try:
        hosts = await resolve(authority.host, authority.port)
    except DestinationRefused as exc:
        metrics.proxy_refusals.labels("destination").inc()
        await responder.send_error(403, str(exc))
        return
    except HTTPClientError as exc:
        await responder.send_error(502, str(exc))
        return
    await tunnel(request, responder, authority, hosts, connect_timeout=connect_timeout)


# ---------------------------------------------------------------- blind tunnels


async def tunnel(
    request: Request,
    responder: Responder,
    authority: Authority,
    hosts: list[str],
    *,
    connect_timeout: float = 10.0,
    idle_timeout: float = TUNNEL_IDLE_TIMEOUT,
) -> None:
    """Connect to the first of `hosts` (HOST:PORT's checked addresses) that answers (502 if
    none does), answer 200, copy bytes until both ends end."""
    try:
        with trio.fail_after(connect_timeout):
            upstream = await _open_first(hosts, authority.port)
    except trio.TooSlowError:
        await responder.send_error(
            502, f"cannot connect to {authority}: no answer within {connect_timeout}s"
        )
        return
    except OSError as exc:
        await responder.send_error(502, f"cannot connect to {authority}: {_os_reason(exc)}")
        return
    async with upstream:
        client = await responder.accept_connect()
        up, down = await splice_streams(client, upstream, idle_timeout=idle_timeout)
        log.debug(
            "tunnel closed",
            client=request.client,
            target=str(authority),
            sent=up,
            received=down,
        )


async def _open_first(hosts: list[str], port: int) -> trio.SocketStream:
    failure: OSError | None = None
    for host in hosts:
        try:
            return await trio.open_tcp_stream(host, port)
        except OSError as exc:
            failure = exc
    raise failure or OSError("no address to connect to")


def _os_reason(exc: OSError) -> str:
    """Why a connect failed. trio's "all attempts to connect failed" keeps the reasons
    (refused, unreachable...) in its cause: name them."""
    reasons: list[str] = []
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        for sub in cause.exceptions:
            text = (sub.strerror if isinstance(sub, OSError) else None) or str(sub)
            if text not in reasons:
                reasons.append(text)
    return "; ".join(reasons) if reasons else exc.strerror or str(exc) or type(exc).__name__


async def splice_streams(
    a: trio.abc.HalfCloseableStream,
    b: trio.abc.HalfCloseableStream,
    *,
    idle_timeout: float = math.inf,
) -> tuple[int, int]:
    """Copy a→b and b→a until both directions reached EOF; (bytes a→b, bytes b→a).

    An EOF on one side is passed on as a half-close, so a client that finished
    sending still gets the whole answer. Ends early (closing both) when either
    side breaks, or when no byte moved either way for `idle_timeout` seconds.
    """
    counts = [0, 0]
    # One deadline for both directions, pushed on by every chunk: a long download with
    # nothing sent upstream is not idle.
    idle = trio.CancelScope(deadline=trio.current_time() + idle_timeout)

    async def copy(src: trio.abc.Stream, dst: trio.abc.HalfCloseableStream, slot: int) -> None:
        while True:
            data = await src.receive_some(COPY_SIZE)
            if not data:
                break
            await dst.send_all(data)
            counts[slot] += len(data)
            idle.deadline = trio.current_time() + idle_timeout
        with contextlib.suppress(trio.ClosedResourceError):
            await dst.send_eof()

    with idle:
        async with trio.open_nursery() as nursery:

            async def run(
                src: trio.abc.Stream, dst: trio.abc.HalfCloseableStream, slot: int
            ) -> None:
                try:
                    await copy(src, dst, slot)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    nursery.cancel_scope.cancel()  # one side broke: the tunnel is over

            nursery.start_soon(run, a, b, 0)
            nursery.start_soon(run, b, a, 1)
    return counts[0], counts[1]


# ---------------------------------------------------------------- interception


async def _hijack(
    forward: Forward,
    hijacker: Hijacker,
    authority: Authority,
    request: Request,
    responder: Responder,
    metrics: PeerMetrics,
) -> None:
    """Terminate the client's TLS with our certificate for the host and serve the
    requests inside through the proxy's usual path."""
    try:
        ctx = await hijacker.context(authority)
    except LeafBudgetSpent as exc:
        metrics.proxy_refusals.labels("leaf_rate").inc()
        await responder.send(
            503, f"{exc}\n".encode(), [(b"retry-after", b"60"), (b"connection", b"close")]
        )
        return
    except TLSError as exc:
        log.warning("no certificate for hijacked host", target=str(authority), error=str(exc))
        await responder.send_error(502, f"cannot make a certificate for {authority}: {exc}")
        return
    raw = await responder.accept_connect()
    # Not https_compatible: closing sends close_notify, so even a strict client sees a
    # clean end. (A client that just drops the connection ends it as a broken one:
    # the server loop takes that as the client gone, which it is.)
    tls = trio.SSLStream(raw, ctx, server_side=True)
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            await tls.do_handshake()
    except (trio.BrokenResourceError, trio.TooSlowError) as exc:
        # Most often a client that does not trust our CA: it aborts the handshake.
        reason = exc.__cause__ if exc.__cause__ is not None else exc
        log.info(
            "TLS handshake with client failed",
            client=request.client,
            target=str(authority),
            error=str(reason) or type(reason).__name__,
        )
        return

    async def inner(inner_request: Request, inner_responder: Responder) -> None:
        await _serve_inner(forward, authority, inner_request, inner_responder)

    await serve_connection(tls, inner, idle_timeout=HIJACK_IDLE_TIMEOUT, peer=request.client)


async def _serve_inner(
    forward: Forward, authority: Authority, request: Request, responder: Responder
) -> None:
    """One request inside an intercepted tunnel: made absolute, then proxied."""
    target = request.target
    if request.method == "CONNECT":
        await responder.send_error(405, "CONNECT inside a tunnel is not supported")
        return
    if target.startswith("/"):
        # The URL names the host the client opened the tunnel (and checked our
        # certificate) for; a Host header naming another would reach a host that was
        # never matched against proxy.hijack_https.hosts.
        host = request.headers.get("host")
        if host is not None and not _same_authority(host, authority):
            await responder.send_error(
                421, f"Host {host[:200]!r} is not the tunnel's host {authority}"
            )
            return
        request.target = authority.url_prefix() + target
    elif not _absolute_on(target, authority):
        await responder.send_error(421, f"{target[:200]!r} is not on the tunnel's host {authority}")
        return
    await forward(request, responder)


def _same_authority(host_header: str, authority: Authority) -> bool:
    """Whether a Host header names the tunnel's host (443 may be left out)."""
    try:
        named = parse_authority(host_header.strip())
    except BadTarget:
        try:
            named = parse_authority(host_header.strip() + ":443")
        except BadTarget:
            return False
    return named == authority


def _absolute_on(target: str, authority: Authority) -> bool:
    """An absolute-form target inside the tunnel must be https on the tunnel's host."""
    prefix = authority.url_prefix()
    if not target.lower().startswith(prefix.lower()):
        return False
    rest = target[len(prefix) :]
    return rest == "" or rest[0] in "/?"
