"""The manager's keys shown by what they change (the real server in-process, its API over
a real socket), each set away from its default: where it listens, where its files go,
how its sessions are signed, how long they last and how its cookie is marked.
tests/unit/test_config_keys.py lists which test shows which key."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import jwt
import pytest
import trio

from dragonfly.manager import auth
from dragonfly.testing.nginx import free_port
from tests.manager_support import Api, start_manager

SESSION_KEY = "a-configured-session-key-of-40-character"


async def test_server_listen_and_port_are_where_the_manager_answers(tmp_path: Path) -> None:
    """127.0.0.2 and a port of the test's choosing, not the default 127.0.0.1:8080."""
    port = free_port("127.0.0.2")
    async with trio.open_nursery() as nursery:
        m = await start_manager(
            nursery, tmp_path / "m", "server.listen=127.0.0.2", f"server.port={port}"
        )
        assert m.server.port == port
        api = Api(f"http://127.0.0.2:{port}")
        assert (await api.call("GET", "/healthy")).status == 200
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        await api.aclose()
        m.stop()


async def test_data_dir_and_database_path_are_where_the_files_go(tmp_path: Path) -> None:
    """A relative database.path is a file in data.dir, an absolute one is where it says;
    the session key and the first root password are in data.dir either way."""
    async with trio.open_nursery() as nursery:
        inside = await start_manager(nursery, tmp_path / "inside", "database.path=catalog.db")
        data = Path(inside.config.data.dir)
        assert data == tmp_path / "inside"
        assert {"catalog.db", "jwt.key", "root-password"} <= set(os.listdir(data))
        assert not (data / "manager.db").exists()
        await inside.root()  # the root user that catalog.db holds
        inside.stop()

        elsewhere = tmp_path / "elsewhere.db"
        outside = await start_manager(nursery, tmp_path / "outside", f"database.path={elsewhere}")
        data = Path(outside.config.data.dir)
        assert elsewhere.stat().st_mode & 0o777 == 0o600
        assert set(os.listdir(data)) == {"jwt.key", "root-password"}
        await outside.root()
        outside.stop()


async def test_sessions_follow_the_auth_keys(tmp_path: Path) -> None:
    """auth.jwt_key signs sessions (no key is made in data.dir), auth.session_ttl is
    their life and the cookie's Max-Age, auth.cookie_secure marks the cookie Secure,
    and an expired session is refreshed only within auth.refresh_ttl of its sign-in."""
    async with trio.open_nursery() as nursery:
        m = await start_manager(
            nursery,
            tmp_path / "m",
            f"auth.jwt_key={SESSION_KEY}",
            "auth.session_ttl=90s",
            "auth.refresh_ttl=300s",
            "auth.cookie_secure=true",
        )
        api = m.api
        reply = await api.call(
            "POST", "/api/v1/users/signin", {"name": "root", "password": m.root_password}
        )
        assert reply.status == 200
        claims = jwt.decode(reply.body["token"], SESSION_KEY, algorithms=["HS256"])
        assert not (Path(m.config.data.dir) / "jwt.key").exists()
        assert claims["exp"] - claims["iat"] == 90
        cookie = [part.strip() for part in reply.headers.get("set-cookie").split(";")]
        assert "Max-Age=90" in cookie and "Secure" in cookie

        # sessions of root signed in earlier (by this manager's key): both expired, one
        # signed in 200 s ago (within refresh_ttl), one 400 s ago (beyond it)
        now = time.time()
        recent, _ = auth.issue_session(SESSION_KEY, claims["id"], claims["gen"], now - 200, 90)
        old, _ = auth.issue_session(SESSION_KEY, claims["id"], claims["gen"], now - 400, 90)
        assert (await api.call("GET", "/api/v1/users", token=recent)).status == 401
        refreshed = await api.call("POST", "/api/v1/users/refresh_token", token=recent)
        assert refreshed.status == 200
        renewed = jwt.decode(refreshed.body["token"], SESSION_KEY, algorithms=["HS256"])
        assert renewed["orig_iat"] == int(now - 200) and renewed["exp"] - renewed["iat"] == 90
        assert (await api.call("GET", "/api/v1/users", token=refreshed.body["token"])).status == 200
        assert (await api.call("POST", "/api/v1/users/refresh_token", token=old)).status == 401
        m.stop()
