"""The manager's job pieces without a network: job arguments (Harbor's body and bad
ones), an image's manifests and auth challenges, sealed secrets, claims of job parts
by two managers, collection (jobs.ttl, records.max_rows, records.traffic_ttl), the
traffic chart, and the console's CSRF tokens."""

from __future__ import annotations

import json
import re
from pathlib import Path

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dragonfly.config import ManagerConfig, load_config
from dragonfly.manager.console import csrf
from dragonfly.manager.console.chart import Hour, traffic_svg
from dragonfly.manager.context import Context
from dragonfly.manager.jobs import store
from dragonfly.manager.jobs.args import NS, ArgsError, parse_args
from dragonfly.manager.jobs.image import (
    ImageError,
    blobs_of,
    parse_challenge,
    parse_manifest_url,
    pick_platform,
    registry_reason,
)
from dragonfly.manager.jobs.runner import collect
from dragonfly.manager.jobs.secrets import Sealer, SealError
from dragonfly.manager.store import open_database
from dragonfly.manager.store.migrations import migrate
from dragonfly.metrics import ManagerMetrics
from dragonfly.wire.messages import DownloadRecord

HARBOR = {
    "type": "image",
    "url": "https://harbor.example/v2/library/app/manifests/v1",
    "tag": "",
    "filtered_query_params": "",
    "headers": {"Authorization": "Bearer pull-token"},
    "scope": "",
    "concurrent_count": 0,
    "timeout": 0,
}


def test_harbors_body_takes_the_defaults_and_keeps_the_token_out_of_sight() -> None:
    plan = parse_args("preheat", json.dumps(HARBOR).encode())
    assert plan.kind == "preheat" and plan.timeout == 3600
    assert plan.shown["scope"] == "single_seed_peer"
    assert plan.shown["concurrent_task_count"] == 8 and plan.shown["concurrent_peer_count"] == 500
    assert plan.shown["timeout"] == 3600 * NS
    assert plan.shown["headers"] == {"Authorization": "REDACTED"}
    assert plan.secrets == {"headers": {"Authorization": "Bearer pull-token"}}
    assert "concurrent_count" not in plan.shown  # unknown keys are ignored


@pytest.mark.parametrize(
    ("job_type", "args", "message"),
    [
        ("gc", {}, "unknown job type 'gc'"),
        ("preheat", {"type": "video"}, "args: Invalid enum value 'video' - at `$.type`"),
        ("preheat", {"type": "file"}, "a file preheat needs at least one URL"),
        ("preheat", {"type": "file", "urls": ["ftp://x/y"]}, "not an http(s) URL"),
        ("preheat", {"type": "file", "url": "http://o/a", "scope": "everyone"}, "args.scope"),
        ("preheat", {"type": "file", "url": "http://o/a", "piece_length": 3}, "power of two"),
        ("preheat", {"type": "file", "url": "http://o/a", "ips": ["nope"]}, "not an IP"),
        ("preheat", {"type": "file", "url": "http://o/a", "count": 201}, "args: Expected"),
        ("preheat", {"type": "image", "url": "http://r/v2/app/blobs/x"}, "a manifest URL"),
        ("get_task", {}, "task_id or url is required"),
        ("get_image_distribution", {}, "Object missing required field `url`"),
    ],
)
def test_bad_arguments_are_named(job_type: str, args: dict[str, object], message: str) -> None:
    with pytest.raises(ArgsError, match=re.escape(message)):
        parse_args(job_type, json.dumps(args).encode())


def test_manifest_urls_challenges_platforms_and_blobs() -> None:
    image = parse_manifest_url("http://127.0.0.1:5000/v2/team/app/manifests/latest")
    assert image.blob("sha256:" + "a" * 64) == (
        "http://127.0.0.1:5000/v2/team/app/blobs/sha256:" + "a" * 64
    )
    with pytest.raises(ImageError):
        parse_manifest_url("http://registry/v2/team/app/tags/list")
    bearer = parse_challenge(
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:team/app:pull"'
    )
    assert bearer is not None and bearer.scheme == "bearer"
    assert bearer.params == {
        "realm": "https://auth.example/token",
        "service": "registry.example",
        "scope": "repository:team/app:pull",
    }
    basic = parse_challenge('Basic realm="dragonfly-test"')
    assert basic is not None and basic.scheme == "basic"
    index = {
        "manifests": [
            {"digest": "sha256:" + "1" * 64, "platform": {"os": "linux", "architecture": "amd64"}},
            {
                "digest": "sha256:" + "2" * 64,
                "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"},
            },
        ]
    }
    assert pick_platform(index, "linux/arm64") == "sha256:" + "2" * 64
    assert pick_platform(index, "linux/arm64/v8") == "sha256:" + "2" * 64
    with pytest.raises(
        ImageError, match=r"no manifest for linux/s390x \(it has: linux/amd64, linux/arm64/v8\)"
    ):
        pick_platform(index, "linux/s390x")
    with pytest.raises(ImageError, match="expected os/arch"):
        pick_platform(index, "linux")
    manifest = {
        "config": {"digest": "sha256:" + "c" * 64, "size": 10},
        "layers": [{"digest": "sha256:" + "d" * 64, "size": 5}, {"digest": "sha256:" + "d" * 64}],
    }
    assert [b.digest[-1] for b in blobs_of(manifest)] == ["c", "d"]  # (a layer once)
    with pytest.raises(ImageError, match="without a sha256 digest"):
        blobs_of({"config": {"digest": "md5:x"}, "layers": []})
    body = b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}'
    assert registry_reason(404, body) == "HTTP 404 MANIFEST_UNKNOWN: manifest unknown"
    assert registry_reason(502, b"bad gateway") == "HTTP 502 bad gateway"


@given(st.dictionaries(st.text(max_size=20), st.text(max_size=50), max_size=5))
def test_sealed_secrets_open_with_the_same_key_only(secrets: dict[str, str]) -> None:
    sealer = Sealer("k" * 40)
    sealed = sealer.seal(secrets)
    assert sealer.open(sealed) == secrets
    for value in secrets.values():
        if len(value) > 3:
            assert value not in sealed
    if secrets:
        with pytest.raises(SealError):
            Sealer("other-key" * 5).open(sealed)


def _config(*overrides: str) -> ManagerConfig:
    cfg = load_config("manager", env={}, overrides=list(overrides))
    assert isinstance(cfg, ManagerConfig)
    return cfg


async def test_a_part_is_claimed_by_one_manager_and_expires_when_nobody_can_run_it(
    tmp_path: Path,
) -> None:
    db = open_database("sqlite", path=tmp_path / "m.db", dsn="")
    try:
        await db.run(lambda tx: migrate(tx, 0.0))
        await db.run(
            lambda tx: tx.execute(
                "INSERT INTO scheduler_clusters (created_at, updated_at, name, config, "
                "client_config, seed_client_config, scopes) VALUES (0, 0, 'c', '{}', '{}', '{}', '{}')"
            )
        )
        plan = parse_args("get_task", b'{"task_id": "t"}')
        job_id = await db.run(lambda tx: store.create_job(tx, plan, "", [1], 1, "", 100.0))
        (part_id,) = await db.run(lambda tx: store.claimable(tx, [1], 100.0))
        a = await db.run(lambda tx: store.claim(tx, part_id, "a", 100.0, 10.0))
        b = await db.run(lambda tx: store.claim(tx, part_id, "b", 100.0, 10.0))
        assert a is not None and b is None
        assert await db.run(lambda tx: store.claimable(tx, [1], 105.0)) == []
        # a stops renewing: its claim lapses, b takes the part over
        assert await db.run(lambda tx: store.claim(tx, part_id, "b", 111.0, 10.0)) is not None
        assert not await db.run(
            lambda tx: store.finish_part(
                tx,
                part_id,
                "a",
                state="SUCCESS",
                error="",
                results=[],
                details={},
                scheduler_id=1,
                now=112.0,
            )
        )  # (a no longer holds it)
        # nobody runs it for dispatch_timeout after b's claim lapsed: it fails, saying why
        assert await db.run(lambda tx: store.expire_unclaimed(tx, 125.0, 10.0)) == 0
        assert await db.run(lambda tx: store.expire_unclaimed(tx, 131.5, 10.0)) == 1
        job, parts = await db.run(lambda tx: store.load_job(tx, job_id))
        assert (
            job["state"] == "FAILURE" and "manager that ran this part stopped" in parts[0]["error"]
        )
    finally:
        await db.aclose()


async def test_jobs_ttl_records_max_rows_and_traffic_ttl(tmp_path: Path) -> None:
    cfg = _config("jobs.ttl=10m", "records.max_rows=100", "records.traffic_ttl=2h")
    db = open_database("sqlite", path=tmp_path / "m.db", dsn="")
    now = 100_000.0
    try:
        await db.run(lambda tx: migrate(tx, 0.0))
        plan = parse_args("sync_peers", b"{}")
        await db.run(
            lambda tx: tx.execute(
                "INSERT INTO scheduler_clusters (created_at, updated_at, name, config, "
                "client_config, seed_client_config, scopes) VALUES (0, 0, 'c', '{}', '{}', '{}', '{}')"
            )
        )
        for age in (11 * 60, 9 * 60):
            await db.run(lambda tx, t=now - age: store.create_job(tx, plan, "", [1], 1, "", t))
        records = [
            DownloadRecord(task_id=f"t{i}", bytes_p2p=1, finished_at=int(now)) for i in range(150)
        ]
        await db.run(lambda tx: store.add_records(tx, 1, 1, records, now))
        for hours in (3, 1):
            await db.run(
                lambda tx, h=hours: tx.execute(
                    "INSERT INTO traffic_hourly (scheduler_cluster_id, hour, bytes_p2p) VALUES (1, ?, 5)",
                    [now - h * 3600 - now % 3600],
                )
            )
        a, b = (Context(cfg, db, "k" * 40, ManagerMetrics(), holder) for holder in "ab")
        counts = await db.run(lambda tx: collect(tx, a, now))
        assert counts == {"jobs_removed": 1, "records_removed": 50, "traffic_removed": 1}
        assert await db.run(lambda tx: collect(tx, b, now)) is None  # a holds the lease
        left = await db.run(lambda tx: tx.one("SELECT COUNT(*) AS n FROM download_records"))
        assert left == {"n": 100}
    finally:
        await db.aclose()


def test_traffic_chart_stacks_the_sources() -> None:
    svg = traffic_svg([Hour("10:00", 3 << 20, 1 << 20, 0), Hour("11:00", 0, 0, 0)])
    assert svg.startswith("<svg") and svg.count('class="p2p"') == 1 and 'class="local"' not in svg
    assert "10:00: p2p 3 MiB, source 1 MiB" in svg
    assert "<script" not in traffic_svg([Hour("<script>", 1, 1, 1)])


def test_csrf_tokens_are_bound_to_their_session() -> None:
    key = "k" * 40
    assert csrf.valid(csrf.form_token(key, "jti-1"), csrf.form_token(key, "jti-1"))
    assert not csrf.valid(csrf.form_token(key, "jti-1"), csrf.form_token(key, "jti-2"))
    assert not csrf.valid(csrf.form_token(key, "jti-1"), csrf.form_token("x" * 40, "jti-1"))
    assert not csrf.valid(csrf.signin_token(key, "c"), "")
    assert not csrf.valid(csrf.signin_token(key, "c"), csrf.form_token(key, "c"))


def test_the_job_request_struct_accepts_null_clusters() -> None:
    from dragonfly.manager.jobs.args import CreateJob

    body = msgspec.json.decode(
        json.dumps({"type": "preheat", "args": HARBOR, "scheduler_cluster_ids": None}),
        type=CreateJob,
    )
    assert body.scheduler_cluster_ids is None and json.loads(bytes(body.args)) == HARBOR


def test_the_sign_in_page_sends_back_to_this_console_only() -> None:
    from dragonfly.manager.console.pages_main import _safe_next

    assert _safe_next("/jobs/3?x=1") == "/jobs/3?x=1"
    for target in (
        "//evil.example/",
        "/\\evil.example",
        "https://evil.example/",
        "jobs",
        "/a\r\nb",
    ):
        assert _safe_next(target) == "/", target
