"""Issue 11, item 6: an outsider who reaches a peer's proxy port.

The peer listens beyond loopback; the outsider connects from a non-loopback address
of this host. It tries what worked before: reading loopback-only services (the
scheduler's port, an origin on loopback, the daemon's own metrics) through the proxy,
the cloud metadata address, CONNECT to any port, and the local task API by sending
it through the proxy to itself. Each is refused and nothing reaches the target.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dragonfly.cluster import Cluster
from dragonfly.peer.exposure import write_user
from dragonfly.testing.nginx import Nginx
from tests.p2p_support import (
    curl_response,
    daemon_stopped,
    metric,
    random_file,
    sha256_file,
    wait_for,
    worker_pids,
)
from tests.security.edge_support import outside_address, raw_exchange, run_expecting_refusal

pytestmark = [pytest.mark.nginx, pytest.mark.slow]

SECRET = b"loopback-only secret\n"


@pytest.fixture
def outside() -> str:
    return outside_address()


@pytest.fixture
def public(tmp_path: Path, outside: str) -> Iterator[Nginx]:
    """An origin on this host's outside address: what an allowed client may fetch."""
    root = tmp_path / "public"
    root.mkdir()
    random_file(root / "pub.bin", 300_000)
    # Says in every answer whether a Proxy-Authorization header reached it.
    seen = 'add_header X-Seen-Proxy-Authorization "[$http_proxy_authorization]" always;'
    with Nginx(
        root=root, workdir=tmp_path / "nginx-public", host=outside, extra_server_conf=seen
    ) as nginx:
        yield nginx


@pytest.fixture
def private(tmp_path: Path) -> Iterator[Nginx]:
    """A service on loopback only: nobody beyond this host should read it."""
    root = tmp_path / "private"
    root.mkdir()
    (root / "secret.txt").write_bytes(SECRET)
    with Nginx(root=root, workdir=tmp_path / "nginx-private") as nginx:
        yield nginx


@contextlib.contextmanager
def _exposed_peer(tmp_path: Path, outside: str, *sets: str) -> Iterator[tuple[Cluster, int, str]]:
    """A cluster whose peer's proxy listens on every address, with `sets`; yields it,
    the proxy's port and the proxy's URL as the outsider reaches it."""
    extra = ["--set", "proxy.listen=0.0.0.0"]
    for item in sets:
        extra += ["--set", item]
    with Cluster(tmp_path / "c", schedulers=1, seed_peers=0, peers=1, extra=extra) as cluster:
        port = int(cluster.node("peer-0").info["proxy"].rsplit(":", 1)[1])
        yield cluster, port, f"http://{outside}:{port}"


def _connect(outside: str, proxy_port: int, target: str, auth: str = "") -> bytes:
    head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n".encode()
    return raw_exchange(outside, proxy_port, head, source=outside)


def test_beyond_loopback_without_allow_list_or_credentials_refuses_to_start(tmp_path: Path):
    r = run_expecting_refusal(
        ["--role", "peer", "--set", "proxy.listen=0.0.0.0", "--set", "proxy.port=0",
         "--set", "upload.port=0", "--set", "scheduler.addresses=[]",
         "--set", f"storage.data_dir={tmp_path / 'data'}"]
    )  # fmt: skip
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    for key in ("proxy.listen", "proxy.allowed_clients", "proxy.auth_file"):
        assert key in r.stderr


def test_an_allowed_outsider_reaches_the_origin_and_nothing_else(
    tmp_path: Path, outside: str, public: Nginx, private: Nginx
):
    with _exposed_peer(
        tmp_path,
        outside,
        f'proxy.allowed_clients=["{outside}/32"]',
        f"proxy.connect_ports=[443, {public.port}, {private.port}]",
    ) as (cluster, port, proxy):
        peer = cluster.node("peer-0")
        metrics_url = peer.info["metrics"]

        def through(url: str, *args: str) -> tuple[int, bytes]:
            status, _, body = curl_response(url, "-x", proxy, *args)
            return status, body

        # what the proxy is for still works for the allowed client
        status, body = through(f"{public.url}/pub.bin")
        assert status == 200 and len(body) == 300_000

        # loopback-only services: an origin, the scheduler, the peer's own listeners
        scheduler_metrics = cluster.node("scheduler-0").info["metrics"]
        for url in (
            f"{private.url}/secret.txt",
            f"http://localhost:{private.port}/secret.txt",  # a name that resolves to loopback
            f"http://[::ffff:127.0.0.1]:{private.port}/secret.txt",
            scheduler_metrics,
            metrics_url,
            f"http://{outside}:{port}/metrics",  # the proxy's own port on the outside address
            "http://169.254.169.254/latest/meta-data/",  # cloud metadata: link-local
        ):
            status, body = through(url)
            assert status == 403, (url, status, body)
            assert b"dragonfly_" not in body and SECRET not in body
        # through P2P's path too (a GET the rules send to the swarm) and straight through
        status, _ = through(f"{private.url}/secret.txt", "-H", "X-Dragonfly-Use-P2P: false")
        assert status == 403

        # the local task API, reached by sending it through the proxy to itself
        spec = json.dumps({"url": f"{private.url}/secret.txt"})
        for api in (f"http://127.0.0.1:{port}", f"http://{outside}:{port}"):
            status, body = through(f"{api}/_dragonfly/tasks", "--data-binary", spec)
            assert status == 403, (api, status, body)
            assert b"succeeded" not in body
        # ... or asking the proxy port for it directly: not served there any more
        status, _, _ = curl_response(
            f"http://{outside}:{port}/_dragonfly/tasks", "--data-binary", spec
        )
        assert status == 404

        # CONNECT: only proxy.connect_ports, and never to loopback
        answer = _connect(outside, port, f"127.0.0.1:{private.port}")
        assert answer.startswith(b"HTTP/1.1 403 "), answer
        answer = _connect(outside, port, f"{outside}:22")
        assert answer.startswith(b"HTTP/1.1 403 ") and b"proxy.connect_ports" in answer
        tunnel = raw_exchange(
            outside,
            port,
            f"CONNECT {outside}:{public.port} HTTP/1.1\r\nHost: x\r\n\r\n"
            f"GET /pub.bin HTTP/1.1\r\nHost: {outside}\r\nConnection: close\r\n\r\n".encode(),
            source=outside,
        )
        assert tunnel.startswith(b"HTTP/1.1 200 Connection established")
        assert b"HTTP/1.1 200 OK" in tunnel

        # nothing reached the loopback origin; the refusals are counted
        assert private.served_bytes("/") == 0
        assert metric(metrics_url, "dragonfly_proxy_refusals_total", 'reason="destination"') >= 10
        assert metric(metrics_url, "dragonfly_proxy_refusals_total", 'reason="connect_port"') == 1

        # this host itself (a client on loopback) is trusted as before
        status, _, body = curl_response(
            f"{private.url}/secret.txt", "-x", f"http://127.0.0.1:{port}"
        )
        assert status == 200 and body == SECRET


def test_an_outsider_must_authenticate(tmp_path: Path, outside: str, public: Nginx):
    users = tmp_path / "proxy-users"
    add = subprocess.run(
        [sys.executable, "-m", "dragonfly", "proxy-user", str(users), "alice"],
        input="correct horse\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert add.returncode == 0, add.stderr
    text = users.read_text()
    assert text.startswith("alice:$argon2") and "correct horse" not in text
    assert users.stat().st_mode & 0o777 == 0o600

    with _exposed_peer(
        tmp_path, outside, f"proxy.auth_file={users}", f"proxy.connect_ports=[{public.port}]"
    ) as (cluster, port, proxy):
        peer = cluster.node("peer-0")
        url = f"{public.url}/pub.bin"

        status, headers, _ = curl_response(url, "-x", proxy)
        assert status == 407 and headers.get("proxy-authenticate", "").startswith("Basic")
        status, _, _ = curl_response(url, "-x", proxy, "--proxy-user", "alice:wrong")
        assert status == 407
        status, _, _ = curl_response(url, "-x", proxy, "--proxy-user", "mallory:correct horse")
        assert status == 407
        assert _connect(outside, port, f"{outside}:{public.port}").startswith(b"HTTP/1.1 407 ")

        status, _, body = curl_response(url, "-x", proxy, "--proxy-user", "alice:correct horse")
        assert status == 200 and len(body) == 300_000
        out = tmp_path / "pub.bin"
        out.write_bytes(body)
        assert sha256_file(out) == sha256_file(public.root / "pub.bin")
        # the credential is the proxy's: the origin never sees it
        status, headers, _ = curl_response(
            url, "-x", proxy, "--proxy-user", "alice:correct horse", "-H", "X-Dragonfly-Use-P2P: 0"
        )
        assert status == 200 and headers["x-seen-proxy-authorization"] == "[]"
        refusals = metric(peer.info["metrics"], "dragonfly_proxy_refusals_total", 'reason="auth"')
        assert refusals == 4  # the three 407s and the CONNECT's


def test_a_proxy_worker_checks_an_outsider_as_the_daemon_does(
    tmp_path: Path, outside: str, public: Nginx, private: Nginx
):
    """proxy.workers: a worker answers on the same port, with the same gate. While the
    daemon is stopped only the worker accepts, so each answer here is the worker's."""
    users = tmp_path / "proxy-users"
    write_user(str(users), "alice", "correct horse")
    with _exposed_peer(tmp_path, outside, f"proxy.auth_file={users}", "proxy.workers=1") as (
        cluster,
        port,
        proxy,
    ):
        peer = cluster.node("peer-0")
        wait_for(lambda: worker_pids(peer), "a proxy worker")
        url = f"{public.url}/pub.bin"
        alice = ("--proxy-user", "alice:correct horse")
        status, _, body = curl_response(url, "-x", proxy, *alice)
        assert status == 200 and len(body) == 300_000  # the task is held now
        with daemon_stopped(peer):
            # (the worker asks the daemon about the task: answered once it runs again)
            warm = subprocess.Popen(
                ["curl", "-sSf", "-o", "/dev/null", "-x", proxy, "-U", alice[1], url]
            )
            time.sleep(1.0)
        assert warm.wait(timeout=60) == 0

        with daemon_stopped(peer):
            status, headers, body = curl_response(url, "-x", proxy, timeout=10)
            assert status == 407 and headers.get("proxy-authenticate", "").startswith("Basic")
            assert len(body) < 1000  # not the task's bytes
            status, _, _ = curl_response(
                url, "-x", proxy, "--proxy-user", "alice:wrong", timeout=10
            )
            assert status == 407
            assert _connect(outside, port, f"{outside}:{public.port}").startswith(b"HTTP/1.1 407 ")
            # authenticated, to what only this host may reach
            for target in (f"{private.url}/secret.txt", peer.info["metrics"]):
                status, _, body = curl_response(target, "-x", proxy, *alice, timeout=10)
                assert status == 403, (target, status, body)
                assert SECRET not in body and b"dragonfly_" not in body
            # and the local hit itself, for the client who may have it
            status, _, body = curl_response(url, "-x", proxy, *alice, timeout=10)
            assert status == 200 and body == (public.root / "pub.bin").read_bytes()

        assert private.served_bytes("/") == 0

        def counted() -> bool:
            metrics = peer.info["metrics"]
            auth = metric(metrics, "dragonfly_proxy_refusals_total", 'reason="auth"')
            dest = metric(metrics, "dragonfly_proxy_refusals_total", 'reason="destination"')
            return auth == 3 and dest == 2

        wait_for(counted, "the worker's refusals in the daemon's metrics", timeout=10)
