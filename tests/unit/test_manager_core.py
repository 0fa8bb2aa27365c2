"""The manager's decisions without I/O: discovery ranking, sessions, access tokens,
roles, the Link header, leases, migrations and a background-work round (on a real SQLite
file)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dragonfly.config import ManagerConfig, load_config
from dragonfly.manager import auth
from dragonfly.manager.context import Context
from dragonfly.manager.discovery import (
    ClusterCandidate,
    HostQuery,
    location_score,
    rank,
    score,
)
from dragonfly.manager.gc import collect
from dragonfly.manager.http import link_header
from dragonfly.manager.store import Conflict, open_database
from dragonfly.manager.store.leases import acquire, release
from dragonfly.manager.store.migrations import MIGRATIONS, migrate
from dragonfly.metrics import ManagerMetrics

words = st.text(alphabet="abcxyz", min_size=1, max_size=4)
ips = st.ip_addresses(v=4).map(str)


def test_weights_are_dragonflys() -> None:
    host = HostQuery(ip="10.1.2.3", hostname="node-7.hz", idc="hz-1", location="cn|zj|hz")
    everything = ClusterCandidate(
        1,
        idc="sh|hz-1",
        location="cn|zj|hz",
        cidrs=("10.0.0.0/8",),
        hostnames=(r"^node-\d+",),
        is_default=True,
    )
    assert score(host, everything) == pytest.approx(1.0)
    assert score(host, ClusterCandidate(2, cidrs=("10.1.0.0/16",))) == pytest.approx(0.30)
    assert score(host, ClusterCandidate(3, hostnames=(r"\.hz$",))) == pytest.approx(0.30)
    assert score(host, ClusterCandidate(4, idc="HZ-1")) == pytest.approx(0.25)
    assert score(host, ClusterCandidate(5, location="cn|zj|nb")) == pytest.approx(0.14 * 2 / 5)
    assert score(host, ClusterCandidate(6, is_default=True)) == pytest.approx(0.01)
    # bad entries (stored before validation existed) count for nothing, never raise
    assert score(host, ClusterCandidate(7, cidrs=("nope",), hostnames=("(",))) == 0


@given(host_ip=ips, other=ips, idc=words, location=st.lists(words, min_size=1, max_size=7))
def test_rank_prefers_cidr_then_idc_then_location_then_default(
    host_ip: str, other: str, idc: str, location: list[str]
) -> None:
    host = HostQuery(ip=host_ip, idc=idc, location="|".join(location))
    net = str(ipaddress.ip_network(f"{host_ip}/32"))
    by_cidr = ClusterCandidate(4, cidrs=(net,))
    by_idc = ClusterCandidate(3, idc=f"zz|{idc}")
    by_location = ClusterCandidate(2, location="|".join(location))
    default = ClusterCandidate(1, is_default=True)
    assert [c.cluster_id for c in rank(host, [default, by_location, by_idc, by_cidr])] == [
        4,
        3,
        2,
        1,
    ]
    # a CIDR that does not hold the address scores nothing
    if other != host_ip:
        assert score(host, ClusterCandidate(9, cidrs=(f"{other}/32",))) == 0


@given(a=st.lists(words, max_size=8), b=st.lists(words, max_size=8))
def test_location_score_bounds(a: list[str], b: list[str]) -> None:
    value = location_score("|".join(a), "|".join(b))
    assert 0 <= value <= 1
    if a and a == b:
        assert value == 1


@given(clusters=st.lists(st.booleans(), min_size=1, max_size=6))
def test_ties_go_to_the_lower_id(clusters: list[bool]) -> None:
    candidates = [ClusterCandidate(i + 1, is_default=d) for i, d in enumerate(clusters)]
    ranked = rank(HostQuery(ip="1.2.3.4"), reversed(candidates))
    expected = sorted(candidates, key=lambda c: (not c.is_default, c.cluster_id))
    assert ranked == expected


def test_sessions() -> None:
    key = "k" * 40
    token, session = auth.issue_session(key, 7, 3, now=1000.0, ttl=60)
    read = auth.read_session(key, token, 1030.0)
    assert (read.user_id, read.generation, read.jti) == (7, 3, session.jti)
    with pytest.raises(auth.BadToken):
        auth.read_session(key, token, 1060.0)  # expired
    assert auth.read_session(key, token, 1500.0, refresh_window=600).user_id == 7
    with pytest.raises(auth.BadToken):
        auth.read_session(key, token, 1700.0, refresh_window=600)
    with pytest.raises(auth.BadToken):
        auth.read_session("x" * 40, token, 1030.0)


def test_access_tokens_and_roles() -> None:
    token, digest = auth.new_access_token()
    assert token.startswith(auth.PAT_PREFIX) and auth.token_hash(token) == digest != token
    assert auth.check_access_token("active", 100, ["cluster"], "cluster", 50) is None
    assert (
        auth.check_access_token("inactive", 100, ["cluster"], "cluster", 50) == "Token is inactive"
    )
    assert (
        auth.check_access_token("active", 100, ["cluster"], "cluster", 101) == "Token has expired"
    )
    assert "Required permission: job" in str(
        auth.check_access_token("active", 100, ["cluster"], "job", 5)
    )
    guest = set(auth.default_permissions(auth.GUEST))
    assert auth.allowed(guest, "clusters", auth.READ) and not auth.allowed(
        guest, "clusters", auth.ALL
    )
    assert auth.allowed(set(auth.default_permissions(auth.ROOT)), "users", auth.READ)
    assert auth.api_group("/api/v1/seed-peer-clusters/3") == "seed-peer-clusters"
    assert auth.api_group("/oapi/v1/clusters") == "clusters"
    assert auth.api_group("/other") is None
    assert auth.verify_password(auth.hash_password("secret-1"), "secret-1")
    assert not auth.verify_password("not-a-hash", "secret-1")


def test_link_header() -> None:
    assert link_header("/api/v1/jobs", [("type", "preheat"), ("page", "2")], 2, 10, 45) == (
        "</api/v1/jobs?page=1&per_page=10&type=preheat>;rel=prev,"
        "</api/v1/jobs?page=3&per_page=10&type=preheat>;rel=next,"
        "</api/v1/jobs?page=1&per_page=10&type=preheat>;rel=first,"
        "</api/v1/jobs?page=5&per_page=10&type=preheat>;rel=last"
    )
    # empty: Dragonfly's quirk (next = 2, last = 0) kept
    assert link_header("/x", [], 1, 10, 0).endswith("</x?page=0&per_page=10>;rel=last")


async def test_sqlite_migrations_and_leases(tmp_path: Path) -> None:
    db = open_database("sqlite", path=tmp_path / "m.db", dsn="")
    try:
        assert await db.run(lambda tx: migrate(tx, 1.0)) == [name for name, _ in MIGRATIONS]
        assert await db.run(lambda tx: migrate(tx, 2.0)) == []  # applied once
        assert await db.run(lambda tx: acquire(tx, "gc", "a", 10.0, 5.0))
        assert not await db.run(lambda tx: acquire(tx, "gc", "b", 12.0, 5.0))  # a holds it
        assert await db.run(lambda tx: acquire(tx, "gc", "a", 14.0, 5.0))  # renewed to 19
        assert not await db.run(lambda tx: acquire(tx, "gc", "b", 18.0, 5.0))
        assert await db.run(lambda tx: acquire(tx, "gc", "b", 19.5, 5.0))  # expired: b's
        await db.run(lambda tx: release(tx, "gc", "b"))
        assert await db.run(lambda tx: acquire(tx, "gc", "a", 20.0, 5.0))
        await db.run(lambda tx: tx.execute("INSERT INTO roles (name) VALUES ('r')"))
        with pytest.raises(Conflict):
            await db.run(lambda tx: tx.execute("INSERT INTO roles (name) VALUES ('r')"))
    finally:
        await db.aclose()
    assert (tmp_path / "m.db").stat().st_mode & 0o777 == 0o600


async def test_gc_lease_ttl_and_audit_ttl(tmp_path: Path) -> None:
    """A background-work round drops audit rows older than gc.audit_ttl, and the lease it
    takes keeps another manager out for gc.lease_ttl (not longer)."""
    cfg = load_config(
        "manager",
        env={},
        overrides=["keepalive.interval=1s", "gc.lease_ttl=2s", "gc.audit_ttl=60s"],
    )
    assert isinstance(cfg, ManagerConfig)
    db = open_database("sqlite", path=tmp_path / "m.db", dsn="")
    try:
        await db.run(lambda tx: migrate(tx, 0.0))
        for age in (30.0, 90.0):
            audit = {
                "created_at": 1000.0 - age,
                "updated_at": 1000.0 - age,
                "actor_type": "USER",
                "actor_name": "root",
                "event_type": "API",
                "operation": "POST",
                "operated_at": 1000.0 - age,
                "state": "SUCCESS",
                "path": "/api/v1/configs",
                "status_code": 200,
            }
            await db.run(lambda tx, row=audit: tx.insert("audits", row))
        a, b = (Context(cfg, db, "k" * 40, ManagerMetrics(), holder) for holder in "ab")
        counts = await db.run(lambda tx: collect(tx, a, 1000.0))
        assert counts is not None and counts["audits_removed"] == 1
        left = await db.run(lambda tx: tx.query("SELECT created_at FROM audits"))
        assert [row["created_at"] for row in left] == [970.0]
        assert await db.run(lambda tx: collect(tx, b, 1001.5)) is None  # a holds it
        assert await db.run(lambda tx: collect(tx, b, 1002.5)) is not None  # a's ran out
    finally:
        await db.aclose()


def test_manager_configuration_errors_name_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dragonfly.cli import main
    from dragonfly.config import ConfigError, load_config

    with pytest.raises(ConfigError) as info:
        load_config("manager", env={}, overrides=["keepalive.timeout=5s"])
    assert info.value.key == "keepalive.timeout"
    with pytest.raises(ConfigError) as info:
        load_config("manager", env={}, overrides=["database.driver=postgres"])
    assert info.value.key == "database.dsn"
    with pytest.raises(ConfigError) as info:
        load_config("manager", env={}, overrides=["auth.jwt_key=short"])
    assert info.value.key == "auth.jwt_key"
    with pytest.raises(ConfigError) as info:
        load_config("scheduler", env={}, overrides=["manager.address=ftp://m"])
    assert info.value.key == "manager.address"
    sets = ["database.driver=postgres", "database.dsn=postgresql://x/y", f"data.dir={tmp_path}"]
    argv = ["--role", "manager"] + [a for s in sets for a in ("--set", s)]
    assert main(argv) == 2
    assert "auth.jwt_key: required with database.driver = postgres" in capsys.readouterr().err


def test_initial_root_password_from_the_environment() -> None:
    from dragonfly.config import ConfigError
    from dragonfly.manager.bootstrap import initial_root_password

    assert initial_root_password({"DRAGONFLY_INITIAL_ROOT_PASSWORD": "long-enough"}) == (
        "long-enough",
        False,
    )
    generated, was_generated = initial_root_password({})
    assert was_generated and len(generated) >= 20 and generated != initial_root_password({})[0]
    with pytest.raises(ConfigError):
        initial_root_password({"DRAGONFLY_INITIAL_ROOT_PASSWORD": "short"})


async def test_a_send_that_meets_the_connections_eof_closes_it_not_the_server() -> None:
    """hypercorn sends a connection's EOF without its send lock: a send meeting it raises
    BusyResourceError, which stopped the whole manager. With the manager's server module
    loaded, that connection is closed instead (dragonfly/manager/server.py)."""
    import trio
    from hypercorn.events import Closed, RawData
    from hypercorn.trio.tcp_server import TCPServer

    import dragonfly.manager.server  # noqa: F401  (hardens TCPServer.protocol_send)

    class EOFInProgress:
        async def send_all(self, data: bytes) -> None:
            raise trio.BusyResourceError("another task is currently sending data")

    handled: list[object] = []

    class Protocol:
        async def handle(self, event: object) -> None:
            handled.append(event)

    server = TCPServer.__new__(TCPServer)
    server.send_lock = trio.Lock()
    server.stream = EOFInProgress()  # type: ignore[assignment]
    server.protocol = Protocol()  # type: ignore[assignment]
    await server.protocol_send(RawData(data=b"\x88\x00"))  # a close frame's answer
    assert len(handled) == 1 and isinstance(handled[0], Closed)


def test_a_scheduler_that_announced_tls_is_reached_over_wss() -> None:
    from dragonfly.peer.discovery import scheduler_address
    from dragonfly.wire.messages import SchedulerEntry

    def entry(ip: str, features: list[str]) -> SchedulerEntry:
        return SchedulerEntry(id=1, hostname="s", ip=ip, port=8002, features=features)

    assert scheduler_address(entry("10.0.0.1", ["schedule"])) == "ws://10.0.0.1:8002"
    assert scheduler_address(entry("10.0.0.1", ["schedule", "tls"])) == "wss://10.0.0.1:8002"
    assert scheduler_address(entry("fd00::1", ["tls"])) == "wss://[fd00::1]:8002"
