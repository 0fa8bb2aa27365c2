"""Issue 11, item 10: the CA that signs the proxy's leaf certificates.

A CA made with `ca init --permit DOMAIN` vouches for that domain only: a leaf the
proxy (or a thief of the key) makes for any other site is refused by every client
that trusts the CA. A key others can read is refused at start. A client naming ever
new hosts gets a bounded number of leaf certificates minted, not one per name.
"""

from __future__ import annotations

import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from dragonfly.config import PeerConfig, load_config
from dragonfly.net.tls import CAFiles, make_leaf
from dragonfly.nursery.peer import PeerDaemon
from tests.p2p_support import connect_through
from tests.security.edge_support import run_expecting_refusal

LEAF_RATE = 5


def _ca_init(directory: Path, *permit: str) -> CAFiles:
    args = [arg for name in permit for arg in ("--permit", name)]
    r = subprocess.run(
        [sys.executable, "-m", "dragonfly", "ca", "init", str(directory), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "may vouch for these names only" in r.stdout
    return CAFiles(directory / "ca.pem", directory / "ca.key")


def _verify(ca: CAFiles, leaf: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca.cert), str(leaf)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_a_constrained_ca_cannot_vouch_for_other_sites(tmp_path: Path):
    ca = _ca_init(tmp_path / "ca", "files.example")
    for host, good in [
        ("files.example", True),
        ("cdn.files.example", True),
        ("bank.example", False),
        ("files.example.evil", False),
        ("127.0.0.1", False),  # no IP network permitted: every address is excluded
    ]:
        cert, key = tmp_path / f"{host}.pem", tmp_path / f"{host}.key"
        make_leaf(ca, [host], cert, key)  # what anyone holding the key could make
        result = _verify(ca, cert)
        assert (result.returncode == 0) == good, (host, result.stdout, result.stderr)
        if not good:
            assert "subtree violation" in result.stdout + result.stderr


def test_a_ca_key_readable_by_others_is_refused_at_start(tmp_path: Path):
    ca = _ca_init(tmp_path / "ca", "files.example")
    assert ca.key.stat().st_mode & 0o777 == 0o600
    ca.key.chmod(0o644)
    r = run_expecting_refusal(
        ["--role", "peer", "--set", "scheduler.addresses=[]",
         "--set", f"storage.data_dir={tmp_path / 'data'}",
         "--set", "proxy.port=0", "--set", "upload.port=0",
         "--set", f"proxy.hijack_https.ca_cert={ca.cert}",
         "--set", f"proxy.hijack_https.ca_key={ca.key}",
         "--set", 'proxy.hijack_https.hosts=["^files\\\\.example:443$"]']
    )  # fmt: skip
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "proxy.hijack_https.ca_key" in r.stderr and f"chmod 600 {ca.key}" in r.stderr


@pytest.fixture
async def hijacking_peer(tmp_path: Path) -> AsyncIterator[tuple[PeerDaemon, CAFiles]]:
    """A peer that intercepts every CONNECT to port 443, with a constrained CA."""
    ca = _ca_init(tmp_path / "ca", "files.example")
    cfg = load_config(
        "peer",
        env={},
        overrides=[
            "scheduler.addresses=[]",
            f"storage.data_dir={tmp_path / 'data'}",
            "proxy.port=0",
            "upload.port=0",
            f"proxy.hijack_https.ca_cert={ca.cert}",
            f"proxy.hijack_https.ca_key={ca.key}",
            'proxy.hijack_https.hosts=[":443$"]',
            f"proxy.hijack_https.leaf_rate={LEAF_RATE}",
        ],
    )
    assert isinstance(cfg, PeerConfig)
    async with trio.open_nursery() as nursery:
        daemon = await nursery.start(PeerDaemon(cfg).run)
        yield daemon, ca
        nursery.cancel_scope.cancel()


async def _connect(daemon: PeerDaemon, host: str) -> tuple[trio.SocketStream, bytes]:
    return await connect_through(daemon.proxy_port, f"{host}:443")


async def test_leaf_certificates_are_bounded_and_constrained(
    hijacking_peer: tuple[PeerDaemon, CAFiles],
):
    daemon, ca = hijacking_peer
    client = ssl.create_default_context(cafile=str(ca.cert))
    answers = []
    for i in range(3 * LEAF_RATE):  # ever new names, as fast as the client can
        stream, head = await _connect(daemon, f"n{i}.files.example")
        answers.append(head.split(b" ", 2)[1])
        await stream.aclose()
    assert answers == [b"200"] * LEAF_RATE + [b"503"] * (2 * LEAF_RATE)
    assert daemon.hijacker.leaves is not None and daemon.hijacker.leaves.made == LEAF_RATE
    refused = daemon.metrics.render().decode()
    assert f'dragonfly_proxy_refusals_total{{reason="leaf_rate"}} {2 * LEAF_RATE}.0' in refused

    # a name it already has a certificate for costs nothing, and the client accepts it
    stream, head = await _connect(daemon, "n0.files.example")
    assert head.startswith(b"HTTP/1.1 200 ")
    tls = trio.SSLStream(stream, client, server_hostname="n0.files.example")
    with trio.fail_after(30):
        await tls.do_handshake()
    await tls.aclose()
    assert daemon.hijacker.leaves.made == LEAF_RATE


async def test_a_leaf_for_a_site_outside_the_ca_is_refused_by_clients(
    hijacking_peer: tuple[PeerDaemon, CAFiles],
):
    daemon, ca = hijacking_peer
    client = ssl.create_default_context(cafile=str(ca.cert))
    stream, head = await _connect(daemon, "bank.example")
    assert head.startswith(b"HTTP/1.1 200 ")  # the proxy intercepts it (hosts match)...
    tls = trio.SSLStream(stream, client, server_hostname="bank.example")
    with pytest.raises(trio.BrokenResourceError) as err, trio.fail_after(30):
        await tls.do_handshake()
    # ... but the client, trusting the constrained CA, does not accept the certificate
    assert isinstance(err.value.__cause__, ssl.SSLCertVerificationError)
    assert "subtree violation" in str(err.value.__cause__)
    await trio.aclose_forcefully(stream)
