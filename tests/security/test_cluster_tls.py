"""TLS on the scheduler and upload ports (issue 11): what an observer of the network, a
peer that does not trust the cluster's CA, and a parent whose certificate is not the
cluster's can do. Real roles in this process (a scheduler, a seed peer, a peer) against
a real nginx origin; every certificate made with `tls new`'s code.

Without TLS a passive observer of an upload port reads every ticket and piece and can
replay a ticket until it expires; the first test shows both on a relay it controls (the
control), then the same capture with TLS on holds neither."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import trio
import trio_websocket
from structlog.testing import capture_logs

from dragonfly.net.channel import SCHEDULER_PATH, connect
from dragonfly.net.http_client import HTTPClient
from dragonfly.testing.cluster_tls import LocalTLS
from dragonfly.testing.nginx import Nginx, free_port
from tests.integration.test_config_effects import fetch, roles, until
from tests.p2p_support import MiB, random_file
from tests.security.support import hello

pytestmark = [pytest.mark.nginx, pytest.mark.slow]

SIZE = 12 * MiB + 5  # four pieces
# The seed's upload port listens on one loopback address and is reached at another,
# where the observer's relay listens (the address the seed gives as host.ip).
LISTEN, REACHED = "127.0.0.2", "127.0.0.3"
TICKET = re.compile(rb"x-dragonfly-ticket: ([^\r\n]+)\r\n", re.IGNORECASE)


class Capture:
    """A TCP relay REACHED:PORT → LISTEN:PORT that keeps every byte it carries."""

    def __init__(self) -> None:
        self.up = bytearray()  # child → parent
        self.down = bytearray()  # parent → child
        self.connections = 0

    async def run(self, port: int, *, task_status: trio.TaskStatus[None]) -> None:
        listeners = await trio.open_tcp_listeners(port, host=REACHED)
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._relay, listeners)
            task_status.started()

    async def _relay(self, child: trio.SocketStream) -> None:
        self.connections += 1
        parent = await trio.open_tcp_stream(LISTEN, child.socket.getsockname()[1])
        async with child, parent, trio.open_nursery() as nursery:
            nursery.start_soon(self._pump, child, parent, self.up, nursery.cancel_scope)
            nursery.start_soon(self._pump, parent, child, self.down, nursery.cancel_scope)

    @staticmethod
    async def _pump(
        src: trio.SocketStream, dst: trio.SocketStream, kept: bytearray, done: trio.CancelScope
    ) -> None:
        try:
            while data := await src.receive_some(1 << 16):
                kept += data
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        done.cancel()  # one side is gone: so is the connection


@pytest.mark.parametrize("tls", [False, True], ids=["plain (the control)", "tls"])
async def test_a_passive_observer_of_an_upload_port_reads_no_ticket_and_no_piece(
    tmp_path: Path, www: Path, nginx: Nginx, tls: bool
) -> None:
    want = random_file(www / "f.bin", SIZE)
    data = (www / "f.bin").read_bytes()
    pki = LocalTLS(tmp_path / "tls")
    port = free_port()
    seed_sets = [f"upload.listen={LISTEN}", f"upload.port={port}", f"host.ip={REACHED}"]
    if tls:  # the certificate names the address children reach the seed at
        seed_sets += pki.peer_overrides("seed-1", ips=(REACHED,))
    capture = Capture()
    async with roles(tmp_path) as r:
        await r.nursery.start(capture.run, port)
        # upload.tls_cert, upload.tls_key and trust.ca_file on the seed; the child needs
        # only the CA (its own upload port may stay plain).
        await r.scheduler(*(pki.scheduler_overrides("scheduler") if tls else []))
        seed = await r.peer("seed-1", *seed_sets, role="seed-peer")
        child = await r.peer("peer-1", *([f"trust.ca_file={pki.ca_file}"] if tls else []))
        assert seed.host.tls is tls
        status, _, body = await fetch(child, f"{nginx.url}/f.bin")
        assert status == 200 and len(body) == SIZE
        assert child.metrics.download_bytes.labels("p2p")._value.get() == SIZE
        assert capture.connections >= 2  # announcements and pieces, all through the relay
        assert len(capture.down) >= SIZE
        child_id = child.host.host_id.encode()
        windows = [data[off : off + 64] for off in range(0, SIZE - 64, SIZE // 16)]
        seen = TICKET.search(capture.up)
        if not tls:
            # The control: every ticket, the child's ID and the pieces are there to read,
            # and a stolen ticket fetches a piece from the parent for whoever sends it.
            assert seen is not None and child_id in capture.up
            assert all(w in capture.down for w in windows)
            path = re.search(rb"GET (/pieces/[0-9a-f]+/[0-9]+) HTTP", capture.up)
            assert path is not None
            stolen = await _get(f"http://{LISTEN}:{port}{path.group(1).decode()}", seen.group(1))
            assert stolen is not None and stolen in data
            return
        assert seen is None and child_id not in capture.up
        assert b"/pieces/" not in capture.up and b"/v1/announce" not in capture.up
        assert not any(w in capture.down for w in windows)
        # And the upload port speaks nothing but TLS: a plain request gets no answer.
        assert await _get(f"http://{LISTEN}:{port}/metrics", b"") is None
    assert want  # (the file was the origin's: checked through p2p bytes and the body)


async def _get(url: str, ticket: bytes) -> bytes | None:
    """An outsider's plain GET with a ticket header: the body on 200, else None."""
    client = HTTPClient(connect_timeout=5, read_timeout=5)
    try:
        headers = [("x-dragonfly-ticket", ticket.decode())] if ticket else []
        async with client.request("GET", url, headers) as response:
            if response.status != 200:
                return None
            return await response.read()
    except Exception:  # the connection broke: no answer at all
        return None
    finally:
        await client.aclose()


async def test_children_refuse_a_parent_whose_certificate_is_not_the_clusters(
    tmp_path: Path, www: Path, nginx: Nginx
) -> None:
    """A member (valid credential) whose upload port shows a certificate of another CA:
    children never finish a handshake with it, so no ticket and no request reaches it;
    they get every byte from the origin instead."""
    want = random_file(www / "f.bin", SIZE)
    pki, rogue = LocalTLS(tmp_path / "tls"), LocalTLS(tmp_path / "rogue")
    rogue_cert, rogue_key = rogue.host("seed-1")
    with capture_logs() as logs:
        async with roles(tmp_path) as r:
            await r.scheduler(*pki.scheduler_overrides("scheduler"))
            seed = await r.peer(
                "seed-1",
                f"upload.tls_cert={rogue_cert}",
                f"upload.tls_key={rogue_key}",
                f"trust.ca_file={pki.ca_file}",  # (it trusts the scheduler)
                role="seed-peer",
            )
            child = await r.peer(
                "peer-1", f"trust.ca_file={pki.ca_file}", "download.stall_timeout=2s"
            )
            status, _, body = await fetch(child, f"{nginx.url}/f.bin")
    assert status == 200 and hashlib.sha256(body).hexdigest() == want
    refused = [
        e
        for e in logs
        if e["event"] == "parent announcements failed"
        and "CERTIFICATE_VERIFY_FAILED" in str(e["error"])
    ]
    assert refused, "the child was never handed the rogue parent: the test proves nothing"
    assert seed.host.tls
    assert seed.metrics.upload_bytes._value.get() == 0
    assert seed.metrics.errors.labels("ticket")._value.get() == 0  # no request got through
    assert child.metrics.download_bytes.labels("p2p")._value.get() == 0
    assert child.metrics.download_bytes.labels("back_to_source")._value.get() == SIZE


async def test_a_peer_that_does_not_trust_the_ca_tells_the_scheduler_nothing(
    tmp_path: Path,
) -> None:
    """A peer given another CA than the one that signed the scheduler's certificate never
    completes a handshake: no Hello (with its claims) reaches the scheduler, which never
    sees the host. A plain websocket to the TLS port gets nowhere either."""
    pki, other = LocalTLS(tmp_path / "tls"), LocalTLS(tmp_path / "other")
    async with roles(tmp_path) as r:
        # server.tls_cert and server.tls_key: the scheduler speaks wss:// only
        scheduler = await r.scheduler(*pki.scheduler_overrides("scheduler"))
        url = r.schedulers[0]
        assert url.startswith("wss://")
        peer = await r.peer("peer-1", f"trust.ca_file={other.ca_file}")
        conn = next(iter(peer.schedulers.connections.values()))
        await until(lambda: conn.failures >= 3, "the peer tried the scheduler three times")
        assert not conn.up and not scheduler.hosts
        assert scheduler.metrics.refusals.labels("timeout")._value.get() == 0  # never spoke
        plain = url.replace("wss://", "ws://") + SCHEDULER_PATH
        with pytest.raises(trio_websocket.HandshakeError):  # (no answer it can read)
            async with connect(plain, hello(None), connect_timeout=3):
                pass
        trusted = await r.peer("peer-2", f"trust.ca_file={pki.ca_file}")  # (the control)
        await until(lambda: trusted.schedulers.all_connected, "the trusting peer connected")
        assert list(scheduler.hosts) == [trusted.host.host_id]
