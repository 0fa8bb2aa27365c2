"""podman and skopeo against loopback registries, with every file of theirs in one place.

`registries.conf` names a plain-http registry and, optionally, a mirror in front of it
(a peer's proxy): podman and skopeo try the mirror first and fall back to the registry.
Podman runs as root with its own --root/--runroot/--tmpdir, the vfs storage driver (no
overlay mounts to clean up), its own storage.conf and auth file, and no events log: it
never touches /var/lib/containers or the caller's logins.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def write_registries_conf(path: Path, registry: str, mirror: str | None = None) -> Path:
    """A registries.conf (v2) for REGISTRY (HOST:PORT, plain http) with an optional mirror
    (HOST:PORT, plain http), and no unqualified-search registries."""
    text = f'unqualified-search-registries = []\n\n[[registry]]\nlocation = "{registry}"\ninsecure = true\n'
    if mirror:
        text += f'\n[[registry.mirror]]\nlocation = "{mirror}"\ninsecure = true\n'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_auth_json(path: Path, logins: dict[str, tuple[str, str]]) -> Path:
    """A containers auth.json (what `podman login HOST` writes): HOST:PORT -> (user,
    password). skopeo and podman send a mirror only the credentials filed under the
    mirror's own HOST:PORT, never those given for the registry with --creds."""
    auths = {
        host: {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}
        for host, (user, password) in logins.items()
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"auths": auths}, indent=1) + "\n")
    return path


def host_port(url: str) -> str:
    """http://127.0.0.1:8080 -> 127.0.0.1:8080: registries.conf wants no scheme."""
    return url.split("://", 1)[-1].rstrip("/")


@dataclass
class Podman:
    """podman with private storage under `workdir`, configured by `registries_conf`."""

    workdir: Path
    registries_conf: Path
    _short: Path | None = field(default=None, repr=False)

    @property
    def runroot(self) -> Path:
        """WORKDIR/runroot, or a short directory in /tmp: podman refuses a runroot longer
        than 50 characters (its sockets live there), and pytest's tmp paths are longer."""
        path = self.workdir / "runroot"
        if len(str(path)) <= 50:
            return path
        if self._short is None:
            self._short = Path(tempfile.mkdtemp(prefix="podman-", dir="/tmp"))
        return self._short / "runroot"

    def _env(self) -> dict[str, str]:
        w = self.workdir
        w.mkdir(parents=True, exist_ok=True)
        storage = w / "storage.conf"
        if not storage.exists():
            storage.write_text(
                f'[storage]\ndriver = "vfs"\ngraphroot = "{w / "root"}"\nrunroot = "{self.runroot}"\n'
            )
        auth = w / "auth.json"
        if not auth.exists():
            auth.write_text('{"auths": {}}\n')  # podman wants the file to exist
        return {
            **os.environ,
            "CONTAINERS_REGISTRIES_CONF": str(self.registries_conf),
            "CONTAINERS_STORAGE_CONF": str(storage),
            "REGISTRY_AUTH_FILE": str(auth),
        }

    def run(
        self, *args: str, timeout: float = 300, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        w = self.workdir
        cmd = [
            "podman",
            "--root",
            str(w / "root"),
            "--runroot",
            str(self.runroot),
            "--tmpdir",
            str(w / "tmp"),
            "--storage-driver",
            "vfs",
            "--events-backend",
            "none",
            "--cgroup-manager",
            "cgroupfs",
            *args,
        ]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self._env())
        if check and run.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({run.returncode}):\n{run.stderr}")
        return run

    def pull(
        self,
        ref: str,
        *,
        creds: str | None = None,
        authfile: Path | None = None,
        timeout: float = 300,
    ) -> str:
        """`podman pull REF` (tls-verify off: plain-http registries); the image ID.

        `creds` reach the registry only; a mirror gets what `authfile` files under its
        HOST:PORT (see write_auth_json)."""
        args = ["pull", "--tls-verify=false"]  # (podman 4.3 has no --retry)
        if creds:
            args += ["--creds", creds]
        if authfile is not None:
            args += ["--authfile", str(authfile)]
        return self.run(*args, ref, timeout=timeout).stdout.strip()

    def inspect(self, ref: str) -> dict[str, Any]:
        data: list[dict[str, Any]] = json.loads(self.run("image", "inspect", ref).stdout)
        return data[0]

    def layer_digests(self, ref: str) -> list[str]:
        """The image's rootfs diff IDs, as podman recorded them after unpacking every layer
        (for uncompressed layers, the layer digests themselves)."""
        return list(self.inspect(ref)["RootFS"]["Layers"])

    def remove_storage(self) -> None:
        """Drop the image store (vfs: plain directories, nothing mounted) and the short
        runroot directory if there is one."""
        for sub in ("root", "runroot", "tmp"):
            shutil.rmtree(self.workdir / sub, ignore_errors=True)
        if self._short is not None:
            shutil.rmtree(self._short, ignore_errors=True)
            self._short = None

    def __enter__(self) -> Podman:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove_storage()
