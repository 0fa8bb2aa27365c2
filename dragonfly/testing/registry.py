"""Start and stop Debian's docker-registry (distribution 2.8) on loopback.

Each Registry has its own config file, storage directory and log under its work
directory, listens on a free 127.0.0.1 port (never the packaged /etc/docker/registry
config, which listens on :5000 with auth on), and is stopped by PID. Optionally:
htpasswd (bcrypt) auth, and proxy mode (a pull-through cache of another registry).

The registry logs every request as one JSON line ("response completed", with
http.request.method, http.request.uri, http.response.status, http.response.written):
served_blob_bytes() sums what it sent per blob digest, so a test can check that the
registry served each blob once in total.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dragonfly.testing.nginx import free_port
from dragonfly.testing.process import spawn_logged, stop_process_group

_BLOB_URI = re.compile(r"^/v2/(?P<name>.+)/blobs/(?P<digest>sha256:[0-9a-f]{64})(?:\?.*)?$")


def registry_binary() -> str | None:
    return shutil.which("docker-registry") or next(
        (p for p in ("/usr/bin/docker-registry", "/usr/local/bin/registry") if os.path.exists(p)),
        None,
    )


def htpasswd_line(user: str, password: str) -> str:
    """One bcrypt htpasswd entry, made by apache2-utils' htpasswd (distribution only
    accepts bcrypt)."""
    run = subprocess.run(
        ["htpasswd", "-Bbn", user, password], capture_output=True, text=True, check=True
    )
    return run.stdout.strip()


@dataclass
class LogEntry:
    method: str
    uri: str
    status: int
    written: int
    user: str = ""  # the authenticated user (distribution logs it on errors only)
    agent: str = ""  # User-Agent: tells a client that went around a mirror from a peer


@dataclass
class Registry:
    """A docker-registry serving http://127.0.0.1:port, storage under workdir."""

    workdir: Path
    auth: tuple[str, str] | None = None  # (user, password): htpasswd bcrypt auth
    token_auth: dict[str, Any] | None = None  # an `auth` section: Bearer tokens (token_server)
    proxy_remote: str | None = None  # e.g. "http://127.0.0.1:PORT": a pull-through cache
    proxy_auth: tuple[str, str] | None = None  # credentials for the remote in proxy mode
    host: str = "127.0.0.1"
    port: int = 0
    # e.g. `ip netns exec NS`: the registry in a network namespace of its own, whose
    # fixed port nothing else can take (ip execs the registry: the PID is its own)
    command_prefix: list[str] = field(default_factory=list)
    preexec_fn: Callable[[], None] | None = field(default=None, repr=False)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        """HOST:PORT, as image references and containerd's ?ns= name it."""
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "registry.log"

    def mirror_options(self) -> list[str]:
        """--set options for peers that mirror this registry: the default upstream, and
        plain http for it when containerd names it with ?ns=."""
        return [
            "--set",
            f"registry_mirror.upstream={self.url}",
            "--set",
            f'registry_mirror.insecure=["{self.address}"]',
        ]

    @property
    def creds(self) -> str | None:
        """USER:PASSWORD for skopeo's --src-creds/--dest-creds, None without auth."""
        return f"{self.auth[0]}:{self.auth[1]}" if self.auth else None

    def _config(self) -> str:
        # JSON is YAML: no YAML writer needed.
        conf: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "formatter": "json", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.workdir / "storage")},
                "delete": {"enabled": True},
                # no blob descriptor cache: every request goes to storage, as logged
            },
            "http": {
                "addr": f"{self.host}:{self.port}",
                "secret": "dragonfly-test",  # else a warning and a random one per start
                "headers": {"X-Content-Type-Options": ["nosniff"]},
            },
        }
        if self.token_auth:
            conf["auth"] = self.token_auth
        elif self.auth:
            path = self.workdir / "htpasswd"
            path.write_text(htpasswd_line(*self.auth) + "\n")
            conf["auth"] = {"htpasswd": {"realm": "dragonfly-test", "path": str(path)}}
        if self.proxy_remote:
            proxy: dict[str, str] = {"remoteurl": self.proxy_remote}
            if self.proxy_auth:
                proxy["username"], proxy["password"] = self.proxy_auth
            conf["proxy"] = proxy
        return json.dumps(conf, indent=1)

    def start(self, timeout: float = 20.0) -> Registry:
        binary = registry_binary()
        if binary is None:
            raise RuntimeError("docker-registry is not installed (apt-get install docker-registry)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "storage").mkdir(exist_ok=True)
        for attempt in range(1 if self.command_prefix else 5):
            # a free port can be taken before the registry binds it: try another
            self.port = free_port(self.host) if attempt or not self.port else self.port
            conf = self.workdir / "config.yml"
            conf.write_text(self._config())
            # (REGISTRY_* variables would override the file: none of the caller's leak in)
            env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_")}
            self.process = spawn_logged(
                [*self.command_prefix, binary, "serve", str(conf)],
                self.log_path,
                env=env,
                preexec_fn=self.preexec_fn,
            )
            try:
                self._wait_ready(timeout)
                return self
            except (TimeoutError, RuntimeError):
                self.stop()
        tail = self.log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"docker-registry did not start; {self.log_path}:\n{tail}")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError("docker-registry exited")
            try:
                # 200 without auth, 401 with: either way the registry answers /v2/.
                with urllib.request.urlopen(f"{self.url}/v2/", timeout=1):
                    return
            except urllib.error.HTTPError as e:
                if e.code == 401:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.url}/v2/ did not answer within {timeout}s")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM by PID (its own session), SIGKILL if it lingers."""
        if self.process is None:
            return
        stop_process_group(self.process)
        self.process = None

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- what it served ---------------------------------------------------------

    def log_entries(self) -> list[LogEntry]:
        """Every request the registry logged as completed, in order."""
        if not self.log_path.exists():
            return []
        entries = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if "http.request.uri" not in rec:
                continue
            status = rec.get("http.response.status")
            # A request refused by auth gets no "response completed" line, only this one.
            if status is None and str(rec.get("msg", "")).startswith("error authorizing"):
                status = 401
            if status is None:
                continue
            entries.append(
                LogEntry(
                    rec.get("http.request.method", ""),
                    rec["http.request.uri"],
                    int(status),
                    int(rec.get("http.response.written", 0)),
                    rec.get("auth.user.name", ""),
                    rec.get("http.request.useragent", ""),
                )
            )
        return entries

    def served_blob_bytes(self) -> Counter[str]:
        """Body bytes sent per blob digest for GET .../blobs/sha256:X (HEADs send none)."""
        served: Counter[str] = Counter()
        for e in self.log_entries():
            m = _BLOB_URI.match(e.uri)
            if m and e.method == "GET":
                served[m.group("digest")] += e.written
        return served

    def blob_requests(self, method: str = "GET") -> Counter[str]:
        """How many METHOD requests each blob digest got (any status)."""
        got: Counter[str] = Counter()
        for e in self.log_entries():
            m = _BLOB_URI.match(e.uri)
            if m and e.method == method:
                got[m.group("digest")] += 1
        return got

    def total_blob_bytes(self) -> int:
        return sum(self.served_blob_bytes().values())

    def blob_report(self) -> str:
        """Every blob GET as "status written agent uri" lines: for assertion messages."""
        return "\n".join(
            f"{e.status} {e.written:>10} {e.agent[:40]:<40} {e.uri[:110]}"
            for e in self.log_entries()
            if e.method == "GET" and _BLOB_URI.match(e.uri)
        )

    def stored(self, digest: str) -> bool:
        """Whether the blob is in this registry's own storage (a pull-through cache
        stores a missed blob in the background, after the client has it)."""
        algo, hexd = digest.split(":", 1)
        root = self.workdir / "storage" / "docker" / "registry" / "v2" / "blobs"
        return (root / algo / hexd[:2] / hexd / "data").exists()

    def get(self, path: str, *, auth: bool = True, method: str = "GET") -> tuple[int, bytes]:
        """A request straight to the registry (status, body); 4xx/5xx are returned."""
        req = urllib.request.Request(f"{self.url}{path}", method=method)
        if auth and self.auth:
            token = base64.b64encode(f"{self.auth[0]}:{self.auth[1]}".encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
