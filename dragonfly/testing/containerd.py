"""Start and stop a private containerd for tests, and pull with `ctr` through it.

Its own root, state, opt path and sockets under a work directory (never the system's
/var/lib/containerd or /run/containerd/containerd.sock), stopped by PID. Plugins that
need a Kubernetes or a special filesystem (cri, aufs, btrfs, zfs, devmapper) are
disabled: the tests only fetch content, which needs the content store and nothing
else.

`ctr content fetch --hosts-dir DIR HOST:PORT/NAME:TAG` resolves and fetches every blob
of the image into the content store; DIR/HOST:PORT/hosts.toml names mirrors the way
/etc/containerd/certs.d does (containerd then adds `?ns=HOST:PORT` to every request
it sends a mirror).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from dragonfly.testing.process import spawn_logged, stop_process_group

# Plugins that fail or warn on a machine without their filesystem or a kubelet; the
# content store, metadata, leases and the image/content services are all that fetch uses.
DISABLED_PLUGINS = (
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
)

_SUN_PATH_MAX = 100  # AF_UNIX paths are limited to 108 bytes; containerd adds ".ttrpc"


def containerd_binary() -> str | None:
    return shutil.which("containerd")


def write_hosts_toml(
    hosts_dir: Path, registry: str, mirror: str | None, *, headers: dict[str, str] | None = None
) -> Path:
    """DIR/REGISTRY/hosts.toml: the registry at plain http, and `mirror` (a peer's proxy,
    http://127.0.0.1:PORT) tried first for pull and resolve when given, with `headers`
    sent to it (Dragonfly's form: `[host."MIRROR".header]`, X-Dragonfly-Registry = [...]).

    Without a mirror the registry itself is the one [host] entry: containerd 1.6 rejects
    a hosts.toml without any ("failed to decode hosts.toml: invalid `host` tree") and
    quietly falls back to its defaults."""
    d = hosts_dir / registry
    d.mkdir(parents=True, exist_ok=True)
    host = mirror or f"http://{registry}"
    text = (
        f'server = "http://{registry}"\n\n[host."{host}"]\n  capabilities = ["pull", "resolve"]\n'
    )
    if headers:
        text += f'  [host."{host}".header]\n'
        text += "".join(f'    {name} = ["{value}"]\n' for name, value in headers.items())
    path = d / "hosts.toml"
    path.write_text(text)
    return path


@dataclass
class Containerd:
    """A containerd listening on its own unix socket."""

    workdir: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    socket_dir: Path | None = None

    @property
    def address(self) -> str:
        assert self.socket_dir is not None, "not started"
        return str(self.socket_dir / "containerd.sock")

    @property
    def log_path(self) -> Path:
        return self.workdir / "containerd.log"

    def _config(self) -> str:
        w = self.workdir
        disabled = ", ".join(f'"{p}"' for p in DISABLED_PLUGINS)
        return f"""version = 2
root = "{w / "root"}"
state = "{w / "state"}"
disabled_plugins = [{disabled}]

[grpc]
  address = "{self.address}"

[ttrpc]
  address = "{self.address}.ttrpc"

[debug]
  address = "{self.socket_dir}/debug.sock"
  level = "info"

[metrics]
  address = ""

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{w / "opt"}"
"""

    def start(self, timeout: float = 30.0) -> Containerd:
        binary = containerd_binary()
        if binary is None:
            raise RuntimeError("containerd is not installed (apt-get install containerd)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        for sub in ("root", "state", "opt"):
            (self.workdir / sub).mkdir(exist_ok=True)
        # pytest's tmp paths can be too long for a unix socket: fall back to a short dir.
        if len(str(self.workdir / "containerd.sock.ttrpc")) < _SUN_PATH_MAX:
            self.socket_dir = self.workdir
        else:
            self.socket_dir = Path(tempfile.mkdtemp(prefix="ctrd-", dir="/tmp"))
        conf = self.workdir / "config.toml"
        conf.write_text(self._config())
        self.process = spawn_logged([binary, "--config", str(conf)], self.log_path)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"containerd exited with {self.process.returncode}:\n{tail}")
            if os.path.exists(self.address):
                run = self.ctr("version", check=False, timeout=5)
                if run.returncode == 0:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"containerd did not answer on {self.address} in {timeout}s")
            time.sleep(0.1)

    def ctr(
        self, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """`ctr --address SOCK ARGS` (namespace "dragonfly-test"); raises on failure."""
        cmd = ["ctr", "--address", self.address, "--namespace", "dragonfly-test", *args]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and run.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({run.returncode}):\n{run.stderr}")
        return run

    def fetch(
        self, ref: str, hosts_dir: Path, *, user: str | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """`ctr content fetch --hosts-dir DIR REF` (REF = HOST:PORT/NAME:TAG): every blob of
        the image for this platform into the content store."""
        # --plain-http: the registry itself (and so hosts.toml's server) speaks http.
        args = ["content", "fetch", "--hosts-dir", str(hosts_dir), "--plain-http"]
        if user:
            args += ["--user", user]
        return self.ctr(*args, ref, timeout=timeout)

    def content_digests(self) -> set[str]:
        """The digest of every blob in the content store (`ctr content ls --quiet`)."""
        return set(self.ctr("content", "ls", "--quiet").stdout.split())

    def blob_path(self, digest: str) -> Path:
        """Where the content store keeps a blob (to hash a large one without ctr)."""
        algo, hexd = digest.split(":", 1)
        return self.workdir / "root" / "io.containerd.content.v1.content" / "blobs" / algo / hexd

    def stop(self) -> None:
        """SIGTERM by PID, SIGKILL if it lingers; a fallback socket dir is removed."""
        if self.process is not None:
            stop_process_group(self.process)
        self.process = None
        if self.socket_dir is not None and self.socket_dir != self.workdir:
            shutil.rmtree(self.socket_dir, ignore_errors=True)

    def __enter__(self) -> Containerd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
