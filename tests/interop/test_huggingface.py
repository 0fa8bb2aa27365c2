"""A real huggingface_hub client downloading a model through the peer's proxy.

The Hub is emulated by a TLS nginx on loopback (nginx config only): the file-resolve
endpoint `{HF_ENDPOINT}/{repo_id}/resolve/{revision}/{filename}` answers as the Hub
does. A regular file (config.json) is served right there, with the git blob id as
its ETag and `X-Repo-Commit`. A large file (model.safetensors) is answered with a
302 to a CDN URL signed per request (`X-Amz-Signature`), carrying `X-Repo-Commit`,
`X-Linked-Etag` (its sha256) and `X-Linked-Size`; the "CDN" is the same nginx under
the name `localhost`, another origin for the client, as cdn-lfs/cas-bridge are.

huggingface_hub sends a HEAD to the resolve URL for the metadata (HEAD always goes
straight to the origin through the proxy), then a GET of the URL the HEAD named.
With `proxy.hijack_https` on for both names the GETs go peer-to-peer, and the
second peer gets the model from the first instead of the origin, although its
signed URL differs (X-Amz-* is left out of task IDs).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dragonfly.cluster import Cluster
from dragonfly.net.tls import make_ca
from dragonfly.testing.certs import ca_bundle, hijack_options, make_pki
from dragonfly.testing.nginx import Nginx
from tests.p2p_support import MiB, metric, random_file

pytestmark = [pytest.mark.nginx, pytest.mark.slow]

REPO = "dragonfly-test/tiny-model"
COMMIT = "4f7c0ba9e3d1c2b5a6978877665544332211aabb"  # what X-Repo-Commit says
SIZE = 12 * MiB + 7  # several pieces
CONFIG = b'{"architectures": ["TinyModel"], "hidden_size": 8}\n'

# Run by each peer's client: the paths hf_hub_download returns, as JSON.
DOWNLOAD = """
import json, sys
from huggingface_hub import hf_hub_download
repo, revision, *files = sys.argv[1:]
print(json.dumps({f: hf_hub_download(repo, f, revision=revision) for f in files}))
"""


def git_blob_id(data: bytes) -> str:
    """The id git gives a file's content: the Hub's ETag for a non-LFS file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def hub_conf(model_sha: str, config_etag: str) -> str:
    """nginx server config answering the Hub's resolve endpoint for REPO (any revision
    name the Hub would resolve to COMMIT: main or the commit itself)."""
    resolve = f"^/{REPO}/resolve/(main|{COMMIT})"
    return f"""
        # a regular file: served by the resolve endpoint itself
        location ~ {resolve}/config\\.json$ {{
            etag off;
            add_header ETag '"{config_etag}"' always;
            add_header X-Repo-Commit {COMMIT} always;
            default_type application/json;
            try_files /repo/config.json =404;
        }}
        # an LFS file: a redirect to the CDN, signed per request, with the metadata
        location ~ {resolve}/model\\.safetensors$ {{
            add_header X-Repo-Commit {COMMIT} always;
            add_header X-Linked-Etag '"{model_sha}"' always;
            add_header X-Linked-Size {SIZE} always;
            return 302 "https://localhost:$server_port/cdn/{model_sha}?X-Amz-Expires=3600&X-Amz-Signature=$request_id";
        }}
        location /cdn/ {{ }}
        location / {{ return 404; }}
    """


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Nginx, Path, str]]:
    """The emulated Hub: (nginx, its test CA certificate, the model's sha256)."""
    base = tmp_path_factory.mktemp("hub")
    pki = make_pki(base / "pki")  # the certificate names 127.0.0.1 and localhost
    root = base / "www"
    (root / "cdn").mkdir(parents=True)
    (root / "repo").mkdir()
    model_sha = random_file(root / "cdn" / "model", SIZE)
    (root / "cdn" / "model").rename(root / "cdn" / model_sha)
    (root / "repo" / "config.json").write_bytes(CONFIG)
    nginx = Nginx(
        root=root,
        workdir=base / "nginx",
        tls=(pki.server_cert, pki.server_key),
        extra_server_conf=hub_conf(model_sha, git_blob_id(CONFIG)),
    )
    nginx.start()
    try:
        yield nginx, pki.ca_cert, model_sha
    finally:
        nginx.stop()


def client_env(tmp_path: Path, proxy: str, endpoint: str, bundle: Path) -> dict[str, str]:
    """A huggingface_hub client's environment: the Hub, the proxy, the CA bundle, its
    own cache; nothing inherited that could steer it elsewhere."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.lower().endswith("_proxy")
        and not k.startswith(("HF_", "HUGGINGFACE_"))
        and k not in ("SSL_CERT_DIR", "CURL_CA_BUNDLE", "REQUESTS_CA_BUNDLE")
    }
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HOME=str(tmp_path / "hf-home"),
        HF_HUB_OFFLINE="0",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        # hf-xet comes with huggingface_hub; the Hub here never offers Xet (no X-Xet-Hash),
        # and the download must be plain HTTPS through the proxy in any case
        HF_HUB_DISABLE_XET="1",
        HTTPS_PROXY=proxy,
        https_proxy=proxy,
        # httpx2 (huggingface_hub 2.x) reads SSL_CERT_FILE; REQUESTS_CA_BUNDLE for the
        # requests-based versions
        SSL_CERT_FILE=str(bundle),
        REQUESTS_CA_BUNDLE=str(bundle),
    )
    return env


def test_hf_hub_download_through_the_proxy_goes_peer_to_peer(
    tmp_path: Path, hub: tuple[Nginx, Path, str]
):
    nginx, origin_ca, model_sha = hub
    port = nginx.port
    project_ca = make_ca(tmp_path / "project-ca")  # as `python -m dragonfly ca init` makes it
    bundle = ca_bundle(tmp_path / "bundle.pem", project_ca.cert)
    names = f"(127\\\\.0\\\\.0\\\\.1|localhost):{port}"
    extra = hijack_options(
        project_ca, f'["^{names}$"]', f'[{{regex = "^https://{names}/"}}]', origin_ca, [port]
    )
    endpoint = f"https://127.0.0.1:{port}"
    files = ["config.json", "model.safetensors"]
    cluster = Cluster(tmp_path / "cluster", schedulers=1, seed_peers=1, peers=2, extra=extra)
    with cluster:
        peers = [cluster.node("peer-0"), cluster.node("peer-1")]
        for i, peer in enumerate(peers):
            r = subprocess.run(
                [sys.executable, "-c", DOWNLOAD, REPO, "main", *files],
                env=client_env(tmp_path / f"client-{i}", peer.info["proxy"], endpoint, bundle),
                capture_output=True,
                text=True,
                timeout=240,
            )
            log = nginx.access_log.read_text() if nginx.access_log.exists() else ""
            assert r.returncode == 0, f"{r.stderr}\nnginx:\n{log}"
            paths = {f: Path(p) for f, p in json.loads(r.stdout.strip().splitlines()[-1]).items()}
            # the cache layout shows the metadata was read: snapshot named by X-Repo-Commit,
            # blob by X-Linked-Etag (the model) or ETag (the config)
            model, config = paths["model.safetensors"], paths["config.json"]
            assert model.parent.name == COMMIT, model
            assert model.resolve().name == model_sha
            assert hashlib.sha256(model.read_bytes()).hexdigest() == model_sha
            assert config.resolve().name == git_blob_id(CONFIG)
            assert config.read_bytes() == CONFIG

        served = nginx.served_bytes("/cdn/")
        assert served <= 1.05 * SIZE, f"the CDN served {served / SIZE:.2f}x the model"
        for peer in peers:
            m = peer.info["metrics"]
            # every request went through an intercepted tunnel: one per host at least
            assert metric(m, "dragonfly_proxy_requests_total", 'mode="hijack"') >= 2
            assert metric(m, "dragonfly_proxy_requests_total", 'mode="tunnel"') == 0
            # the two HEADs straight to the origin, the two GETs through P2P
            assert metric(m, "dragonfly_proxy_requests_total", 'mode="direct"') == 2
            assert metric(m, "dragonfly_proxy_requests_total", 'mode="p2p"') == 2
        p2p = metric(peers[1].info["metrics"], "dragonfly_download_bytes_total", 'source="p2p"')
        assert p2p >= 0.95 * SIZE, f"the second peer got only {p2p / SIZE:.0%} peer-to-peer"
