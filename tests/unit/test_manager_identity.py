"""The manager's identity and feed parts on a real SQLite file, no sockets: the migration
of the peers table, a cluster's settings as its hosts get them (and their revision),
the peers table from schedulers' reports, the cleanup of expired credentials, host IDs
the manager makes."""

from __future__ import annotations

import re
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from dragonfly.config import ManagerConfig, load_config
from dragonfly.manager import member_feed, peer_table
from dragonfly.manager.bootstrap import _seed
from dragonfly.manager.context import Context
from dragonfly.manager.gc import collect
from dragonfly.manager.issuer import new_host_id
from dragonfly.manager.store import Tx, open_database, rows
from dragonfly.manager.store.migrations import DIALECTS, MIGRATIONS, migrate
from dragonfly.metrics import ManagerMetrics
from dragonfly.trust import check_name
from dragonfly.wire.messages import HostInfo

OLD_PEER = {
    "created_at": 1.0,
    "updated_at": 1.0,
    "host_name": "n1",
    "type": "normal",
    "ip": "10.0.0.3",
    "port": 65000,
    "download_port": 65002,
    "proxy_port": 65001,
    "scheduler_cluster_id": 1,
}


def host(host_id: str, hostname: str = "vm", seed: bool = False) -> HostInfo:
    return HostInfo(
        host_id=host_id,
        hostname=hostname,
        ip="127.0.0.1",
        upload_port=4000,
        proxy_port=4001,
        seed=seed,
        version="9.9",
    )


async def test_the_peers_table_migrates_with_its_rows(tmp_path: Path) -> None:
    db = open_database("sqlite", path=tmp_path / "m.db", dsn="")
    try:

        def first_schema(tx: Tx) -> None:
            tx.execute("CREATE TABLE schema_migrations (name TEXT PRIMARY KEY, applied_at REAL)")
            for statement in MIGRATIONS[0][1]:
                tx.execute(statement.format(**DIALECTS["sqlite"]))
            tx.execute("INSERT INTO schema_migrations VALUES ('0001_initial', 0)")
            _seed(tx, 0.0)
            tx.insert("peers", OLD_PEER)

        await db.run(first_schema)
        assert await db.run(lambda tx: migrate(tx, 2.0)) == [
            "0002_jobs_and_download_records",
            "0003_identity_and_peers",
        ]
        (kept,) = await db.run(lambda tx: tx.query("SELECT * FROM peers"))
        assert {k: kept[k] for k in OLD_PEER} == OLD_PEER and kept["host_id"] is None
        # two daemons on one host (one name, one address) are two rows now
        await db.run(lambda tx: peer_table.record(tx, [host("a"), host("b")], 1, 5.0))
        assert await db.run(lambda tx: tx.one("SELECT COUNT(*) AS n FROM peers")) == {"n": 3}
    finally:
        await db.aclose()


async def test_a_clusters_settings_and_their_revision(tmp_path: Path) -> None:
    db = open_database("sqlite", path=tmp_path / "m.db", dsn="")
    try:
        await db.run(lambda tx: (migrate(tx, 0.0), _seed(tx, 0.0)))
        first = await db.run(lambda tx: member_feed.cluster_config(tx, 1))
        assert first is not None
        assert (first.candidate_parent_limit, first.filter_parent_limit) == (3, 15)
        assert (first.peer_load_limit, first.seed_peer_load_limit) == (200, 2000)
        assert await db.run(lambda tx: member_feed.cluster_config(tx, 2)) is None
        block = {"task": {"download": {"tags": ["nightly"], "priorities": [2]}}}

        def change(tx: Tx) -> None:
            client = {"load_limit": 20, "block_list": block}
            rows.update(tx, "scheduler_clusters", 1, {"client_config": rows.dumps(client)}, 1.0)

        await db.run(change)
        second = await db.run(lambda tx: member_feed.cluster_config(tx, 1))
        assert second is not None and second.revision != first.revision
        assert second.peer_load_limit == 20
        assert (second.peer_block.tags, second.peer_block.priorities) == (["nightly"], [2])
        assert second.seed_peer_block.tags == []
        await db.run(
            lambda tx: rows.update(
                tx, "seed_peer_clusters", 1, {"config": rows.dumps({"load_limit": 9})}, 2.0
            )
        )
        third = await db.run(lambda tx: member_feed.cluster_config(tx, 1))
        assert third is not None and third.seed_peer_load_limit == 9
        assert third.revision not in (first.revision, second.revision)
        unchanged = await db.run(lambda tx: member_feed.cluster_config(tx, 1))
        assert unchanged == third
    finally:
        await db.aclose()


async def test_reported_peers_age_out_and_expired_credentials_go(tmp_path: Path) -> None:
    cfg = load_config(
        "manager",
        env={},
        overrides=["peers.report_interval=1s", "peers.timeout=10s", "peers.remove_after=60s"],
    )
    assert isinstance(cfg, ManagerConfig)
    db = open_database("sqlite", path=tmp_path / "m.db", dsn="")
    ctx = Context(cfg, db, "k" * 40, ManagerMetrics(), "a")
    try:
        await db.run(lambda tx: (migrate(tx, 0.0), _seed(tx, 0.0)))
        await db.run(lambda tx: tx.insert("peers", OLD_PEER))  # made through the API
        await db.run(lambda tx: peer_table.record(tx, [host("a"), host("s", seed=True)], 1, 100.0))
        await db.run(lambda tx: peer_table.record(tx, [host("a", hostname="renamed")], 1, 105.0))
        found = await db.run(lambda tx: tx.query("SELECT * FROM peers ORDER BY id"))
        by_id = {r["host_id"]: r for r in found}
        assert by_id["a"]["host_name"] == "renamed" and by_id["a"]["created_at"] == 100.0
        assert (by_id["s"]["type"], by_id["a"]["type"]) == ("super", "normal")
        assert by_id["a"]["git_version"] == "9.9" and by_id["a"]["proxy_port"] == 4001
        counts = await db.run(lambda tx: collect(tx, ctx, 112.0))
        assert counts is not None and counts["peer_inactive"] == 1  # s: not seen for 12 s
        states = await db.run(lambda tx: tx.query("SELECT host_id, state FROM peers ORDER BY id"))
        assert [(r["host_id"], r["state"]) for r in states] == [
            (None, "inactive"),
            ("a", "active"),
            ("s", "inactive"),
        ]
        counts = await db.run(lambda tx: collect(tx, ctx, 200.0))
        assert counts is not None  # s: inactive for 88 s, removed; a: inactive from now
        assert (counts["peer_removed"], counts["peer_inactive"]) == (1, 1)
        counts = await db.run(lambda tx: collect(tx, ctx, 261.0))
        assert counts is not None and counts["peer_removed"] == 1
        left = await db.run(lambda tx: tx.query("SELECT host_id FROM peers"))
        assert [r["host_id"] for r in left] == [None]  # made through the API: left alone

        def credentials(tx: Tx) -> None:
            for host_id, expires in (("old", 150.0), ("new", 9e9)):
                tx.insert(
                    "host_credentials",
                    {
                        "created_at": 1.0,
                        "updated_at": 1.0,
                        "host_id": host_id,
                        "role": "peer",
                        "key_id": "k",
                        "expires_at": expires,
                    },
                )
                tx.insert("revocations", {"created_at": 2.0, "updated_at": 2.0, "host_id": host_id})
            tx.insert("revocations", {"created_at": 2.0, "updated_at": 2.0, "host_id": "offline"})

        await db.run(credentials)
        counts = await db.run(lambda tx: collect(tx, ctx, 300.0))
        assert counts is not None
        assert (counts["host_credentials_removed"], counts["host_revocations_removed"]) == (1, 1)
        revoked = await db.run(lambda tx: member_feed.revoked_hosts(tx))
        assert sorted(r.host_id for r in revoked) == ["new", "offline"]  # (offline: kept)
    finally:
        await db.aclose()


@given(st.text(max_size=300), st.sampled_from(["peer", "seed-peer", "scheduler"]))
def test_host_ids_the_manager_makes_are_valid_and_fresh(hostname: str, role: str) -> None:
    made = {new_host_id(role, hostname) for _ in range(3)}
    assert len(made) == 3
    for host_id in made:
        assert check_name("host ID", host_id) == host_id
        assert re.fullmatch(r".+-[0-9a-f]{8}", host_id)
