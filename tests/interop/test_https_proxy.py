"""HTTPS through the peer's proxy with real curl and a TLS nginx on loopback.

Blind CONNECT tunnels by default; with `proxy.hijack_https` the proxy terminates
the client's TLS with a certificate from the project's CA, checks the origin's
certificate itself, and the requests inside go through P2P like plain http.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dragonfly.cluster import Cluster
from dragonfly.net.tls import CAFiles, make_ca
from dragonfly.testing.certs import TestPKI, ca_bundle, hijack_options, make_pki
from dragonfly.testing.nginx import Nginx
from tests.p2p_support import MiB, metric, random_file, sha256_file

pytestmark = [pytest.mark.nginx, pytest.mark.slow]

SIZE = 20 * MiB + 13  # several pieces (4 MiB each at this size)


@dataclass
class Site:
    """A TLS nginx and the CA its certificate comes from."""

    nginx: Nginx
    pki: TestPKI
    root: Path

    @property
    def authority(self) -> str:
        return f"127.0.0.1:{self.nginx.port}"


@pytest.fixture(scope="module")
def project_ca(tmp_path_factory: pytest.TempPathFactory) -> CAFiles:
    """The CA `python -m dragonfly ca init` would make: signs the proxy's leaves."""
    return make_ca(tmp_path_factory.mktemp("project-ca"))


def _site(base: Path) -> Iterator[Site]:
    pki = make_pki(base / "pki")
    root = base / "www"
    root.mkdir()
    nginx = Nginx(
        root=root,
        workdir=base / "nginx",
        tls=(pki.server_cert, pki.server_key),
        # a PEP 503 index for pip: its pages must be text/html
        extra_server_conf="location /simple/ { default_type text/html; }",
    )
    nginx.start()
    try:
        yield Site(nginx, pki, root)
    finally:
        nginx.stop()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """An https origin whose test CA the peers are told to trust (origin_ca_file)."""
    yield from _site(tmp_path_factory.mktemp("site"))


@pytest.fixture(scope="module")
def rogue(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """An https origin whose CA nobody trusts."""
    yield from _site(tmp_path_factory.mktemp("rogue"))


def _wheel(root: Path) -> str:
    """A tiny wheel and a PEP 503 simple index naming it; returns the wheel's sha256."""
    name = "demo_pkg-1.0-py3-none-any.whl"
    files = {
        "demo_pkg/__init__.py": b"VALUE = 1\n",
        "demo_pkg-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: demo-pkg\nVersion: 1.0\n",
        "demo_pkg-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\n"
        b"Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{path},,\n" for path in files) + "demo_pkg-1.0.dist-info/RECORD,,\n"
    (root / "files").mkdir(exist_ok=True)
    with zipfile.ZipFile(root / "files" / name, "w") as wheel:
        for path, data in files.items():
            wheel.writestr(path, data)
        wheel.writestr("demo_pkg-1.0.dist-info/RECORD", record)
    digest = sha256_file(root / "files" / name)
    index = root / "simple" / "demo-pkg"
    index.mkdir(parents=True)
    (index / "index.html").write_text(
        f'<html><body><a href="../../files/{name}#sha256={digest}">{name}</a></body></html>\n'
    )
    return digest


def curl(proxy: str, url: str, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """curl with https_proxy set (as pip or huggingface_hub would be), -w the status."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("https_proxy", "no_proxy")}
    env["https_proxy"] = proxy
    return subprocess.run(
        ["curl", "-sS", "-o", str(out), "-w", "%{http_code}", *extra, url],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_blind_tunnel_passes_the_origin_tls_through(tmp_path: Path, site: Site):
    want = random_file(site.root / "blind.bin", 3 * MiB + 1)
    ports = ["--set", f"proxy.connect_ports=[{site.nginx.port}]"]
    cluster = Cluster(tmp_path / "cluster", schedulers=1, seed_peers=0, peers=1, extra=ports)
    with cluster:
        peer = cluster.node("peer-0")
        out = tmp_path / "blind.bin"
        r = curl(
            peer.info["proxy"],
            f"{site.nginx.url}/blind.bin",
            out,
            "--cacert",
            str(site.pki.ca_cert),
            "-v",
        )
        assert r.returncode == 0 and r.stdout == "200", r.stderr
        assert sha256_file(out) == want
        # the certificate curl checked is nginx's own: nothing was intercepted
        assert "issuer: CN=dragonfly test CA" in r.stderr
        m = peer.info["metrics"]
        assert metric(m, "dragonfly_proxy_requests_total", 'mode="tunnel"') == 1
        assert metric(m, "dragonfly_proxy_requests_total", 'mode="hijack"') == 0
        assert site.nginx.served_bytes("/blind.bin") == 3 * MiB + 1


def test_hijacked_https_goes_peer_to_peer(
    tmp_path: Path, site: Site, rogue: Site, project_ca: CAFiles
):
    want = random_file(site.root / "model.bin", SIZE)
    random_file(rogue.root / "model.bin", 1000)
    hosts = f'["^127\\\\.0\\\\.0\\\\.1:({site.nginx.port}|{rogue.nginx.port})$"]'
    ports = [site.nginx.port, rogue.nginx.port]
    extra = hijack_options(project_ca, hosts, '[{regex = "^https?://"}]', site.pki.ca_cert, ports)
    trust_project = ("--cacert", str(project_ca.cert))
    cluster = Cluster(tmp_path / "cluster", schedulers=1, seed_peers=1, peers=2, extra=extra)
    with cluster:
        first, second = cluster.node("peer-0"), cluster.node("peer-1")
        url = f"{site.nginx.url}/model.bin"
        for i, peer in enumerate((first, second)):
            out = tmp_path / f"model-{i}.bin"
            r = curl(peer.info["proxy"], url, out, *trust_project)
            assert r.returncode == 0 and r.stdout == "200", r.stderr
            assert sha256_file(out) == want
        served = site.nginx.served_bytes("/model.bin")
        assert served <= 1.05 * SIZE, f"origin served {served / SIZE:.2f}x the file"
        for peer in (first, second):
            m = peer.info["metrics"]
            assert metric(m, "dragonfly_proxy_requests_total", 'mode="hijack"') == 1
            assert metric(m, "dragonfly_proxy_requests_total", 'mode="p2p"') == 1
        p2p = metric(second.info["metrics"], "dragonfly_download_bytes_total", 'source="p2p"')
        assert p2p >= 0.95 * SIZE, f"the second peer got only {p2p / SIZE:.0%} peer-to-peer"

        # a client that does not trust the project's CA refuses the proxy's certificate
        r = curl(first.info["proxy"], url, tmp_path / "x", "--cacert", str(site.pki.ca_cert))
        assert r.returncode == 60, (r.returncode, r.stderr)

        # an origin whose certificate the peer does not trust: 502 naming the problem,
        # through P2P (the seed cannot fetch it) and straight to the origin alike
        for header in ((), ("-H", "X-Dragonfly-Use-P2P: false")):
            body = tmp_path / "rogue.txt"
            r = curl(
                first.info["proxy"], f"{rogue.nginx.url}/model.bin", body, *trust_project, *header
            )
            assert r.returncode == 0 and r.stdout == "502", (header, r.stdout, r.stderr)
            assert "CERTIFICATE_VERIFY_FAILED" in body.read_text(), (header, body.read_text())
        assert rogue.nginx.served_bytes("/model.bin") == 0

        # pip (its vendored requests/urllib3) through https_proxy, trusting the project CA
        # the way `ca init` says: a bundle of the system's CAs and ours in REQUESTS_CA_BUNDLE
        # and SSL_CERT_FILE (requests lets REQUESTS_CA_BUNDLE override pip's --cert)
        wheel_sha = _wheel(site.root)
        bundle = ca_bundle(tmp_path / "bundle.pem", project_ca.cert)
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.lower().endswith("_proxy")
            and not k.startswith("PIP_")
            and k not in ("CURL_CA_BUNDLE", "SSL_CERT_DIR")
        }
        env.update(
            https_proxy=second.info["proxy"],
            PIP_CONFIG_FILE=os.devnull,
            REQUESTS_CA_BUNDLE=str(bundle),
            SSL_CERT_FILE=str(bundle),
        )
        r = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
             "--disable-pip-version-check", "--index-url", f"{site.nginx.url}/simple/",
             "--dest", str(tmp_path / "pip"), "demo-pkg==1.0"],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        assert sha256_file(tmp_path / "pip" / "demo_pkg-1.0-py3-none-any.whl") == wheel_sha
        m = second.info["metrics"]
        assert metric(m, "dragonfly_proxy_requests_total", 'mode="hijack"') >= 2
