"""The web console in a real browser: Debian's chromium driven by Playwright, against a
manager, a cluster of real processes and an htpasswd docker-registry, all started here.

Sign in; create a cluster; start a scheduler and a seed peer in it and see the
scheduler turn active on the cluster's page; create an image preheat in the form and
watch its page reach SUCCESS; find a layer on the tasks page and delete it everywhere;
create a personal access token, shown once. A screenshot of each page is taken; with
DRAGONFLY_SCREENSHOTS=DIR they are kept there (docs/console holds the README's).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from dragonfly.cluster import Cluster
from dragonfly.identity import blob_task_id
from dragonfly.storage.taskfile import task_path
from dragonfly.testing.oci_image import push_all, write_multi_platform_layout
from dragonfly.testing.process import stop_process_group
from dragonfly.testing.registry import Registry
from dragonfly.testing.trust import LocalIssuer
from tests.manager_support import spawn_manager
from tests.p2p_support import MiB

pytestmark = [pytest.mark.registry, pytest.mark.slow, pytest.mark.timeout(600)]

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
PASSWORD = "console-root-pw"
WAIT = 90_000  # ms: the longest any page waits for what it shows


def shot(page: Any, directory: Path, name: str) -> None:
    """A screenshot, palette-quantized (a small PNG for the docs)."""
    from PIL import Image

    path = directory / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=96, method=Image.Quantize.MEDIANCUT)
        small.save(path, optimize=True)


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian's chromium is not installed")
def test_console_in_a_browser(tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    shots = tmp_path / "shots"
    shots.mkdir()
    image = write_multi_platform_layout(tmp_path / "image", total_size=8 * MiB, seed=31)
    registry = Registry(tmp_path / "registry", auth=("alice", "s3cret-pass")).start()
    # The cluster below has no manager of its own: this one holds its secret.
    issuer = LocalIssuer(tmp_path / "cluster" / "trust")
    manager, url = spawn_manager(
        tmp_path / "manager",
        "keepalive.interval=0.5s",
        f"trust.secret_file={issuer.secret_file}",
        env={"DRAGONFLY_INITIAL_ROOT_PASSWORD": PASSWORD},
    )
    cluster: Cluster | None = None
    try:
        push_all(image, registry.address, "console/app", creds=registry.creds)
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1200, "height": 760})
            page.set_default_timeout(WAIT)
            for _ in range(300):  # the manager starts
                try:
                    page.goto(url + "/")
                    break
                except sync_api.Error:
                    page.wait_for_timeout(100)

            # sign in (the console sends a stranger to its sign-in page)
            assert "/signin" in page.url
            shot(page, shots, "signin")
            page.fill("input[name=name]", "root")
            page.fill("input[name=password]", PASSWORD)
            page.click("button.primary")
            page.wait_for_url(url + "/")
            assert page.inner_text("h1") == "Overview"

            # create a cluster
            page.goto(url + "/clusters/new")
            page.fill("input[name=name]", "edge")
            page.fill("input[name=bio]", "the edge data centre")
            page.fill("input[name=idc]", "edge-1")
            page.fill("textarea[name=cidrs]", "10.20.0.0/16")
            page.fill("textarea[name='peer_cluster_config.applications']", "blocked-app")
            shot(page, shots, "cluster-new")
            page.click("button.primary")
            page.wait_for_url(re.compile(r"/clusters/\d+(\?|$)"))
            cluster_id = int(re.search(r"/clusters/(\d+)", page.url).group(1))  # type: ignore[union-attr]
            assert "edge" in page.inner_text("h1")
            seed_cluster = int(
                re.search(r"seed\.cluster_id=(\d+)", page.inner_text("main")).group(1)  # type: ignore[union-attr]
            )

            # a scheduler and a seed peer join it: the scheduler turns active on its page
            cluster = Cluster(
                tmp_path / "cluster",
                schedulers=1,
                seed_peers=1,
                peers=1,
                extra=registry.mirror_options(),
                manager=False,
                overrides=[
                    f"scheduler:manager.address={url}",
                    f"scheduler:manager.cluster_id={cluster_id}",
                    f"seed-peer:scheduler.manager={url}",
                    f"seed-peer:seed.cluster_id={seed_cluster}",
                ],
            ).start()
            for _ in range(120):
                page.goto(f"{url}/clusters/{cluster_id}")
                if page.locator("#schedulers .badge.active").count():
                    break
                page.wait_for_timeout(250)
            assert page.locator("#schedulers .badge.active").count() == 1
            shot(page, shots, "cluster")
            page.goto(url + "/clusters")
            shot(page, shots, "clusters")

            # an image preheat, made in the form; its page refreshes itself until SUCCESS
            manifest = f"{registry.url}/v2/console/app/manifests/latest"
            page.goto(url + "/jobs/new")
            page.check("input[name=type][value=image]")
            page.fill("textarea[name=urls]", manifest)
            page.fill("input[name=username]", "alice")
            page.fill("input[name=password]", "s3cret-pass")
            page.check(f"input[name=clusters][value='{cluster_id}']")
            shot(page, shots, "preheat-new")
            page.click("button.primary")
            page.wait_for_url(re.compile(r"/jobs/\d+"))
            page.wait_for_selector("#job-state .badge.success")
            here = next(iter(image.images.values()))
            assert page.locator("#hosts .badge.success").count() == len(here.blobs)
            shot(page, shots, "preheat")
            page.goto(url + "/jobs")
            shot(page, shots, "jobs")

            # find a layer on the tasks page, then delete it everywhere
            from dragonfly.wire.oci import go_arch

            wanted = image.images[f"linux/{go_arch()}"]
            layer = wanted.layers[0]
            seed_dir = cluster.node("seed-peer-0").info["data_dir"]
            assert task_path(seed_dir, blob_task_id(layer.digest)).exists()
            page.goto(url + "/tasks")
            page.fill("input[name=q]", layer.digest)
            page.click("button.primary")
            page.wait_for_selector("#holders")
            assert "super" in page.inner_text("#holders").lower()
            shot(page, shots, "tasks")
            page.click("button.danger")
            page.wait_for_url(re.compile(r"/jobs/\d+"))
            page.wait_for_selector("#job-state .badge:not(.pending)")
            assert page.locator("#job-state .badge.success").count(), page.inner_text("main")
            assert not task_path(seed_dir, blob_task_id(layer.digest)).exists()

            # a personal access token: shown once, then only its name
            page.goto(url + "/tokens")
            page.fill("input[name=name]", "ci")
            page.click("form[action='/tokens'] button.primary")
            token = page.inner_text("#new-token").strip()
            assert token.startswith("dfpat_")
            shot(page, shots, "tokens")
            page.goto(url + "/tokens")
            assert token not in page.content()

            # traffic (the preheat's downloads), users, the audit log
            page.goto(url + "/traffic")
            page.wait_for_selector("svg.chart")
            shot(page, shots, "traffic")
            page.goto(url + "/users")
            shot(page, shots, "users")
            page.goto(url + "/audits")
            assert "/tokens" in page.inner_text("main")
            shot(page, shots, "audits")
            page.goto(url + "/")
            shot(page, shots, "overview")
            browser.close()
    finally:
        if cluster is not None:
            cluster.stop()
        stop_process_group(manager)
        registry.stop()
    keep = os.environ.get("DRAGONFLY_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        for png in shots.glob("*.png"):
            shutil.copy(png, Path(keep) / png.name)
