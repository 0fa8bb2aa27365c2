"""Shared fixtures: a real nginx origin serving generated files; logging put back after
each test."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import structlog
from hypothesis import settings

from dragonfly.testing.nginx import Nginx, nginx_binary

# No per-example deadline: these machines are shared and noisy, and how long an example
# takes is not what a property test checks (speed is measured by benchmarks/).
settings.register_profile("dragonfly", deadline=None)
settings.load_profile("dragonfly")


@pytest.fixture(autouse=True)
def _logging_restored() -> Iterator[None]:
    """A test that runs the CLI configures structlog to print to the stderr pytest
    captured for that test, which is closed afterwards: put the configuration back, so
    a later test's daemon does not log into a closed file."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@dataclass
class Origin:
    nginx: Nginx
    root: Path
    files: dict[str, bytes]

    def url(self, name: str) -> str:
        return f"{self.nginx.url}/{name}"

    def sha256(self, name: str) -> str:
        return hashlib.sha256(self.files[name]).hexdigest()


def _make_files(root: Path) -> dict[str, bytes]:
    rnd = os.urandom
    files = {
        "small.bin": rnd(1000),
        "medium.bin": rnd(3 * 1024 * 1024 + 17),
        "large.bin": rnd(24 * 1024 * 1024 + 5),
        "empty.bin": b"",
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    return files


@pytest.fixture(scope="session")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Origin]:
    """nginx on a free loopback port serving a few random files; stopped by PID."""
    if nginx_binary() is None:
        pytest.fail("nginx is not installed: run `make test`, which installs it")
    base = tmp_path_factory.mktemp("origin")
    root = base / "www"
    root.mkdir()
    files = _make_files(root)
    extra = f"""
        location = /redirect {{ return 302 /medium.bin; }}
        location = /redirect-abs {{ return 301 $scheme://$http_host/small.bin; }}
        location = /loop {{ return 302 /loop; }}
        location = /error500 {{ return 500; }}
        location /slow/ {{ alias {root}/; limit_rate 2m; }}
    """
    nginx = Nginx(root=root, workdir=base / "nginx", extra_server_conf=extra).start()
    try:
        yield Origin(nginx, root, files)
    finally:
        nginx.stop()


@pytest.fixture
def www(tmp_path: Path) -> Path:
    """An empty document root for a test's own nginx."""
    root = tmp_path / "www"
    root.mkdir()
    return root


@pytest.fixture
def nginx(tmp_path: Path, www: Path) -> Iterator[Nginx]:
    """nginx serving `www` for one test."""
    with Nginx(root=www, workdir=tmp_path / "nginx") as n:
        yield n
