"""The manager as issuer: join tokens (one per role, rotated by root, listed without
their value), credentials issued against them (valid under the manager's secret for
trust.credential_ttl, for a host ID the manager makes), and the daemons that join:
a wrong, rotated or other role's token is refused, and a daemon started with one
stops at once naming trust.join_token_file."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import trio

from dragonfly.credentials import read_secret_file, write_private_text
from dragonfly.net.join import JoinRefused, join_once
from dragonfly.trust import Verifier
from tests.manager_support import issuer_of, start_manager

ROOT = Path(__file__).resolve().parents[2]


async def test_join_tokens_wrong_rotated_and_wrong_role(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        m = await start_manager(nursery, tmp_path / "m", "trust.credential_ttl=2h")
        api, root = m.api, await m.root()
        assert (await api.call("GET", "/api/v1/join-tokens", token=root)).body == []
        made = await api.call("POST", "/api/v1/join-tokens/peer", token=root)
        assert made.status == 200 and made.body["token"].startswith("dfjoin_")
        peer_token = made.body["token"]
        listed = (await api.call("GET", "/api/v1/join-tokens", token=root)).body
        assert [row["role"] for row in listed] == ["peer"] and "token" not in listed[0]
        one = (await api.call("GET", "/api/v1/join-tokens/peer", token=root)).body
        assert one["role"] == "peer" and "token" not in one
        assert (await api.call("POST", "/api/v1/join-tokens/manager", token=root)).status == 404

        # a join: a credential for a new host ID, under the manager's secret, for the ttl
        ring = issuer_of(m).ring
        first = await join_once(m.url, peer_token, "peer", "node-a.example", timeout=10)
        again = await join_once(m.url, peer_token, "peer", "node-a.example", timeout=10)
        claims = first.credential.claims
        assert claims.host_id.startswith("node-a.example-") and claims.role == "peer"
        assert claims.host_id != again.credential.claims.host_id  # nobody picks an ID
        assert claims.expires_at - claims.issued_at == 7200
        assert Verifier(ring).host_key(claims, time.time()) == first.credential.host_key
        assert first.ring is None  # the secret goes to schedulers only
        issued = (await api.call("GET", "/api/v1/host-credentials", token=root)).body
        assert [r["host_id"] for r in issued] == [claims.host_id, again.credential.claims.host_id]
        assert issued[0]["role"] == "peer" and "host_key" not in issued[0]

        # wrong, other role's, rotated, deleted
        with pytest.raises(JoinRefused, match="401 join token refused"):
            await join_once(m.url, "dfjoin_" + "x" * 43, "peer", "h", timeout=10)
        with pytest.raises(JoinRefused, match="403 this join token is for a peer, not a"):
            await join_once(m.url, peer_token, "scheduler", "h", timeout=10)
        rotated = (await api.call("POST", "/api/v1/join-tokens/peer", token=root)).body["token"]
        with pytest.raises(JoinRefused, match="401"):
            await join_once(m.url, peer_token, "peer", "h", timeout=10)
        assert (await join_once(m.url, rotated, "peer", "h", timeout=10)).credential
        assert (await api.call("DELETE", "/api/v1/join-tokens/peer", token=root)).status == 200
        with pytest.raises(JoinRefused, match="401"):
            await join_once(m.url, rotated, "peer", "h", timeout=10)
        assert (await api.call("DELETE", "/api/v1/join-tokens/peer", token=root)).status == 404

        # a scheduler's join brings the cluster secret
        scheduler_token = (
            await api.call("POST", "/api/v1/join-tokens/scheduler", token=root)
        ).body["token"]
        joined = await join_once(m.url, scheduler_token, "scheduler", "s", timeout=10)
        assert joined.ring == ring and joined.credential.claims.role == "scheduler"
        refused = (await api.call("GET", "/api/v1/audits?actor_type=HOST", token=root)).body
        assert {r["status_code"] for r in refused} == {200, 401, 403}

        # daemons started with a refused token stop at once, naming the key
        bad = tmp_path / "bad.token"
        write_private_text(bad, peer_token + "\n", replace=False)  # rotated away
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for role, sets in (
            ("peer", [f"scheduler.manager={m.url}", f"storage.data_dir={tmp_path / 'p'}"]),
            ("scheduler", [f"manager.address={m.url}", "server.port=0"]),
        ):
            argv = [sys.executable, "-m", "dragonfly", "--role", role]
            for item in (*sets, f"trust.join_token_file={bad}", "proxy.port=0", "upload.port=0"):
                if role == "scheduler" and item.startswith(("proxy.", "upload.")):
                    continue
                argv += ["--set", item]
            with trio.fail_after(60):
                done = await trio.run_process(argv, capture_stderr=True, check=False, env=env)
            assert done.returncode == 2, (role, done.stderr)
            assert b"trust.join_token_file: the manager at" in done.stderr, done.stderr
            assert b"401 join token refused" in done.stderr
        m.stop()


async def test_the_secret_is_the_configured_file_or_made_in_the_data_dir(tmp_path: Path) -> None:
    """trust.secret_file names the secret the manager issues under; without it, one is
    made at first start in DATA_DIR/cluster-secret.json (0600) and kept."""
    async with trio.open_nursery() as nursery:
        given = await start_manager(nursery, tmp_path / "given")  # (secret in tmp/trust)
        assert given.config.trust.secret_file
        assert not (tmp_path / "given" / "cluster-secret.json").exists()
        made = await start_manager(nursery, tmp_path / "made", "trust.secret_file=")
        secret = tmp_path / "made" / "cluster-secret.json"
        assert secret.stat().st_mode & 0o777 == 0o600
        for m, ring in (
            (given, read_secret_file(given.config.trust.secret_file)),
            (made, read_secret_file(secret)),
        ):
            root = await m.root()
            token = (await m.api.call("POST", "/api/v1/join-tokens/peer", token=root)).body
            joined = await join_once(m.url, token["token"], "peer", "h", timeout=10)
            claims = joined.credential.claims
            assert Verifier(ring).host_key(claims, time.time()) == joined.credential.host_key
            m.stop()
        assert read_secret_file(secret).keys  # still there after the stop
