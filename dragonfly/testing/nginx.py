"""Start and stop a real nginx serving a directory on loopback.

Used as the origin in tests, benchmarks and `make demo`. nginx runs in the
foreground (`daemon off`) with every path inside its own work directory, and
is stopped by PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from dragonfly.testing.process import spawn_logged, stop_process_group


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.path.exists(p)), None
    )


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s") from None
            time.sleep(0.02)


@dataclass
class Nginx:
    """An nginx process serving `root` at http://127.0.0.1:port/."""

    root: Path
    workdir: Path
    limit_rate: str = ""  # e.g. "10m": bytes/s per connection, nginx syntax
    extra_server_conf: str = ""
    tls: tuple[Path, Path] | None = None  # (certificate chain, key): serve https
    host: str = "127.0.0.1"
    port: int = 0
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def access_log(self) -> Path:
        return self.workdir / "access.log"

    def _config(self) -> str:
        user = "user root;" if os.geteuid() == 0 else ""
        limit = f"limit_rate {self.limit_rate};" if self.limit_rate else ""
        listen = f"listen {self.host}:{self.port}"
        if self.tls:
            cert, key = self.tls
            listen += f" ssl;\n        ssl_certificate {cert};\n        ssl_certificate_key {key}"
        w = self.workdir
        return f"""
{user}
daemon off;
worker_processes 1;
pid {w}/nginx.pid;
error_log {w}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    types {{ application/octet-stream bin; text/plain txt; }}
    default_type application/octet-stream;
    log_format bytes '$remote_addr "$request" $status $body_bytes_sent "$http_range"';
    access_log {w}/access.log bytes;
    client_body_temp_path {w}/client_body;
    proxy_temp_path {w}/proxy;
    fastcgi_temp_path {w}/fastcgi;
    uwsgi_temp_path {w}/uwsgi;
    scgi_temp_path {w}/scgi;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    server {{
        {listen};
        root {self.root};
        {limit}
        {self.extra_server_conf}
    }}
}}
"""

    def start(self) -> Nginx:
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("nginx is not installed (apt-get install nginx)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        for attempt in range(5):
            self.port = free_port(self.host) if attempt or not self.port else self.port
            w = self.workdir
            conf = w / "nginx.conf"
            conf.write_text(self._config())
            self.process = spawn_logged(
                [binary, "-c", str(conf), "-p", str(self.workdir), "-e", str(w / "error.log")],
                self.workdir / "stderr.log",
            )
            try:
                self._wait_ready()
                return self
            except (TimeoutError, RuntimeError):
                self.stop()
        raise RuntimeError(f"nginx did not start; see {self.workdir / 'error.log'}")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 10
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError("nginx exited")
            try:
                wait_for_port(self.host, self.port, timeout=0.2)
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise

    def stop(self) -> None:
        """Stop nginx by PID (its process group: master and worker)."""
        if self.process is None:
            return
        stop_process_group(self.process, signal.SIGQUIT, grace=5)  # SIGQUIT: graceful
        self.process = None

    def served_bytes(self, path_prefix: str = "/") -> int:
        """Body bytes nginx logged as sent for requests under `path_prefix`."""
        if not self.access_log.exists():
            return 0
        total = 0
        for line in self.access_log.read_text().splitlines():
            try:
                request = line.split('"')[1]
                tail = line.split('"')[2].split()
                path = request.split()[1]
                if path.startswith(path_prefix):
                    total += int(tail[1])
            except (IndexError, ValueError):
                continue
        return total

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
