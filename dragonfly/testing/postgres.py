"""A real PostgreSQL in a temporary directory, for tests of several managers.

initdb and the server run as the `postgres` user when this runs as root (PostgreSQL
refuses root), in a directory of its own under the system's temporary directory
(a test's tmp_path is not reachable for another user) that the `postgres` user
owns, on a free loopback port, with the unix socket in the same directory; the
server runs in the foreground (its PID is the one stopped) and trusts local
connections: a test database, never a real one. The directory is removed on stop.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dragonfly.testing.nginx import free_port
from dragonfly.testing.process import spawn_logged, stop_process_group


def postgres_bindir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: p.split("/")[4])
    return Path(found[-1]).parent if found else None


def _as_postgres() -> tuple[Callable[[], None] | None, int, int]:
    """preexec_fn dropping root to the postgres user, and its uid/gid (or ours)."""
    if os.geteuid() != 0:
        return None, os.getuid(), os.getgid()
    user = pwd.getpwnam("postgres")

    def drop() -> None:
        os.setgroups([])
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)

    return drop, user.pw_uid, user.pw_gid


@dataclass
class Postgres:
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="dragonfly-pg-")))
    port: int = 0
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def dsn(self, database: str = "dragonfly") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> Postgres:
        bindir = postgres_bindir()
        if bindir is None:
            raise RuntimeError("PostgreSQL is not installed (apt-get install postgresql)")
        drop, uid, gid = _as_postgres()
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chown(self.workdir, uid, gid)
        data = self.workdir / "data"
        log = self.workdir / "postgres.log"
        log.touch()
        os.chown(log, uid, gid)
        subprocess.run(
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=drop,
            cwd=self.workdir,
        )
        for _ in range(5):
            self.port = free_port()
            self.process = spawn_logged(
                [
                    str(bindir / "postgres"),
                    "-D",
                    str(data),
                    "-p",
                    str(self.port),
                    "-k",
                    str(self.workdir),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                ],
                log,
                preexec_fn=drop,
            )
            if self._wait_ready():
                self._create_database("dragonfly")
                return self
            self.stop()
        raise RuntimeError(f"PostgreSQL did not start; see {log}")

    def _wait_ready(self, timeout: float = 30.0) -> bool:
        import psycopg

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                return False
            try:
                psycopg.connect(self.dsn("postgres"), connect_timeout=1).close()
                return True
            except psycopg.OperationalError:
                time.sleep(0.1)
        return False

    def _create_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')

    def stop(self) -> None:
        """Fast shutdown (SIGINT) by PID, SIGKILL if it lingers; then the files go."""
        if self.process is not None:
            stop_process_group(self.process, signal.SIGINT, grace=10)
            self.process = None
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Postgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
