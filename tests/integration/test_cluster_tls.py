"""TLS on the scheduler and upload ports over real sockets: a whole cluster of processes
(`cluster --tls`) moving a file peer-to-peer with every piece over TLS, and the wss://
channels a peer opens to its scheduler and parents."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import trio

from dragonfly.cluster import Cluster
from dragonfly.cluster_tls import listener_tls
from dragonfly.net.channel import Channel, ChannelClosed, connect
from dragonfly.net.http_server import Request, Responder, bound_port, serve
from dragonfly.testing.cluster_tls import LocalTLS
from dragonfly.testing.nginx import Nginx
from dragonfly.trust import TrustError
from dragonfly.wire.codec import MIN_PROTOCOL_VERSION, PROTOCOL_VERSION
from dragonfly.wire.messages import Hello
from tests.p2p_support import MiB, curl, finish, metric, random_file, sha256_file

pytestmark = [pytest.mark.nginx, pytest.mark.slow]

HELLO = Hello(version=PROTOCOL_VERSION, min_version=MIN_PROTOCOL_VERSION, role="peer")


def _curl(url: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-sS", "-o", "/dev/null", "--max-time", "20", *args, url],
                          capture_output=True, timeout=60)  # fmt: skip


def test_a_tls_cluster_moves_every_piece_over_tls(tmp_path: Path, www: Path, nginx: Nginx):
    size = 24 * MiB + 3
    want = random_file(www / "f.bin", size)
    with Cluster(tmp_path / "c", schedulers=1, seed_peers=1, peers=2, tls=True) as cluster:
        ca = cluster.ca_file
        assert ca is not None
        described = json.loads((tmp_path / "c" / "cluster.json").read_text())
        assert described["ca_file"] == ca
        assert described["schedulers"][0]["url"].startswith("wss://")
        # each node runs with its own certificate: upload.tls_cert, upload.tls_key,
        # trust.ca_file on peers; server.tls_cert and server.tls_key on the scheduler
        conf = (tmp_path / "c" / "conf" / "peer-0.toml").read_text()
        assert "tls_cert = " in conf and f"ca_file = '{ca}'" in conf
        for name in ("peer-0", "peer-1"):
            code, err = finish(curl(cluster.node(name).info["proxy"], f"{nginx.url}/f.bin",
                                    tmp_path / name))  # fmt: skip
            assert code == 0, err
            assert sha256_file(tmp_path / name) == want
        assert nginx.served_bytes("/f.bin") <= 1.05 * size
        for name in ("peer-0", "peer-1"):
            url = cluster.node(name).info["metrics"]
            assert url.startswith("https://")
            got = metric(url, "dragonfly_download_bytes_total", 'source="p2p"', ca_file=ca)
            assert got == size, f"{name}: {got} of {size} bytes peer-to-peer"
        uploaded = sum(
            metric(n.info["metrics"], "dragonfly_upload_bytes_total", ca_file=ca)
            for n in cluster.nodes
            if n.role != "scheduler"
        )
        assert uploaded >= 2 * size  # and every one of them went out over TLS:
        # the peers found their schedulers through the manager, which the schedulers
        # told they speak TLS: wss:// ("tls" among their features)
        for name in ("peer-0", "peer-1"):
            log = (tmp_path / "c" / "logs" / f"{name}.log").read_text()
            assert "schedulers from the manager" in log and "wss://" in log, name
        for node in cluster.nodes:
            if node.role == "manager":
                continue  # (its port is plain HTTP: TLS is on the scheduler and upload ports)
            https = node.info["metrics"]
            plain = https.replace("https://", "http://")
            assert _curl(plain).returncode != 0, f"{node.name} answered plain HTTP"
            refused = _curl(https)  # a client that does not trust the CA
            assert refused.returncode == 60, refused.stderr  # (the certificate is unverified)
            assert _curl(https, "--cacert", ca, "-f").returncode == 0


async def test_wss_channels_verify_the_ca_and_keep_their_exceptions(tmp_path: Path):
    """A wss:// channel is verified against the given CA only; a certificate of another CA
    fails at once with ChannelClosed naming the reason (not as a timeout); what the body
    raises leaves the channel as itself, as over ws://."""
    pki, other = LocalTLS(tmp_path / "tls"), LocalTLS(tmp_path / "other")
    cert, key = pki.host("server")

    async def handler(request: Request, responder: Responder) -> None:
        async def run(ws: object) -> None:
            channel = Channel(ws)  # type: ignore[arg-type]
            await channel.handshake(HELLO)
            async for msg in channel:
                await channel.send(msg)

        await responder.websocket(run)

    server_ctx = listener_tls(str(cert), str(key), "server")
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            lambda task_status: serve(
                handler, "127.0.0.1", 0, ssl_context=server_ctx, task_status=task_status
            )
        )
        url = f"wss://127.0.0.1:{bound_port(listeners)}/echo"
        trusting = pki.client_context()
        async with connect(url, HELLO, ssl_context=trusting) as channel:
            await channel.send(HELLO)
            assert await channel.receive() == HELLO
        with pytest.raises(TrustError, match="from the body"):
            async with connect(url, HELLO, ssl_context=trusting):
                raise TrustError("proof", "from the body")
        with pytest.raises(ChannelClosed, match="CERTIFICATE_VERIFY_FAILED"):
            async with connect(url, HELLO, ssl_context=other.client_context(), connect_timeout=60):
                pass
        with pytest.raises(ChannelClosed, match=r"trust\.ca_file"):  # never the system's CAs
            async with connect(url, HELLO):
                pass
        nursery.cancel_scope.cancel()
