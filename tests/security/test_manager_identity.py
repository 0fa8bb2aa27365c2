"""What an outsider, a guest or a revoked member tries against the manager as issuer:
joining without a real join token, registering without proving a credential (a forged
key, another cluster's, another role's), a manager that cannot prove itself feeding a
peer schedulers, and a host presenting a revoked credential to a scheduler and to the
manager. Each test does the attack and asserts what it got."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import jwt
import pytest
import trio
import trio_websocket

from dragonfly.net.channel import Channel, ChannelClosed, connect
from dragonfly.net.manager_client import ask_schedulers, websocket_url
from dragonfly.peer.discovery import Discovery
from dragonfly.peer.scheduler_client import SchedulerPool, scheduler_hello, scheduler_url
from dragonfly.trust import Credential, SecretRing, TrustError, issue, new_nonce, peer_proof
from dragonfly.wire.codec import MIN_PROTOCOL_VERSION, PROTOCOL_VERSION
from dragonfly.wire.messages import (
    AnnounceMember,
    Error,
    Hello,
    HostInfo,
    ListSchedulers,
    MemberRegistered,
    Proof,
    SchedulerEntry,
    SchedulerList,
)
from tests.manager_support import (
    issuer_of,
    join_token_file,
    member_channel,
    member_config,
    metric_value,
    start_manager,
    start_peer,
    start_scheduler,
    until,
)

FAST = ("keepalive.interval=0.2s", "keepalive.timeout=0.7s", "gc.lease_ttl=1s")


async def test_joining_takes_a_real_join_token_of_the_role(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        m = await start_manager(nursery, tmp_path / "m")
        api, root = m.api, await m.root()
        await api.add_user(root, "guest1", "guest-pass-1")
        guest = await api.signin("guest1", "guest-pass-1")
        pat = await api.add_token(root, ["job", "cluster"])
        peer_token = (await api.call("POST", "/api/v1/join-tokens/peer", token=root)).body
        forged_session = jwt.encode({"id": 1}, "not-the-key-" * 4, algorithm="HS256")
        attempts = {
            "none": (None, "peer", 401),
            "a guest's session": (guest, "peer", 401),
            "root's session": (root, "peer", 401),
            "a personal access token": (pat, "peer", 401),
            "a forged session": (forged_session, "peer", 401),
            "a guessed join token": ("dfjoin_" + "A" * 43, "peer", 401),
            "the peer token, as a scheduler": (peer_token["token"], "scheduler", 403),
            "the peer token, as a seed peer": (peer_token["token"], "seed-peer", 403),
        }
        for what, (token, role, status) in attempts.items():
            reply = await api.call(
                "POST", "/v1/join", {"role": role, "hostname": "evil"}, token=token
            )
            assert reply.status == status, (what, reply.raw)
            assert (
                "credential" not in (reply.body or {})
                and "cluster_secret" not in reply.raw.decode()
            )
        bad_body = await api.call("POST", "/v1/join", {"role": "root"}, token=peer_token["token"])
        assert bad_body.status == 422
        # nothing was issued, every refusal is counted and audited
        assert (await api.call("GET", "/api/v1/host-credentials", token=root)).body == []
        metrics = (await api.call("GET", "/metrics")).raw
        for role, refusals in (("peer", 5), ("scheduler", 1), ("seed-peer", 1)):
            labels = f'dragonfly_manager_joins_total{{outcome="refused",role="{role}"}}'
            assert metric_value(metrics, labels) == refusals, role
        audits = (
            await api.call("GET", "/api/v1/audits?actor_type=HOST&per_page=100", token=root)
        ).body
        assert len([a for a in audits if a["state"] == "FAILURE"]) == len(attempts) + 1
        # and a guest cannot make or see a token's value
        assert (await api.call("POST", "/api/v1/join-tokens/peer", token=guest)).status == 403
        listed = (await api.call("GET", "/api/v1/join-tokens", token=guest)).body
        assert listed and all("token" not in row for row in listed)
        m.stop()


async def test_only_a_proven_credential_registers_and_the_manager_proves_itself(
    tmp_path: Path,
) -> None:
    async with trio.open_nursery() as nursery:
        m = await start_manager(nursery, tmp_path / "m", *FAST)
        real = issuer_of(m).credential("sched-1", "scheduler")
        announce = AnnounceMember(hostname="evil", ip="10.6.6.6", port=6666, cluster_id=1)
        liars = {
            "forged key": Credential(real.claims, b"\x07" * 32),
            "another cluster": issue(
                SecretRing.new("other"),
                host_id="sched-1",
                role="scheduler",
                now=time.time(),
                ttl=60,
            ),
            "expired": issue(issuer_of(m).ring, host_id="s", role="scheduler", now=1000.0, ttl=60),
        }
        for what, credential in liars.items():
            with pytest.raises(TrustError, match="refused") as info:
                async with member_channel(m.url, "scheduler", credential) as channel:
                    await channel.send(announce)
            assert "refused this host" in str(info.value), what
        # a scheduler credential saying it is a seed peer
        nonce = new_nonce()
        lie = Hello(
            version=PROTOCOL_VERSION,
            min_version=MIN_PROTOCOL_VERSION,
            role="seed-peer",
            nonce=nonce,
            claims=real.claims,
        )
        async with connect(websocket_url(m.url), lie) as channel:
            answer = await _receive(channel)
            assert isinstance(answer, Error) and answer.code == "forbidden"
        root = await m.root()
        assert (await m.api.call("GET", "/api/v1/schedulers", token=root)).body == []
        assert (await m.api.call("GET", "/api/v1/seed-peers", token=root)).body == []
        metrics = (await m.api.call("GET", "/metrics")).raw
        for reason in ("proof", "cluster", "expired", "role_mismatch"):
            labels = f'dragonfly_manager_member_refusals_total{{reason="{reason}"}}'
            assert metric_value(metrics, labels) >= 1, reason

        # the real one registers, and the manager proved itself to it first
        async with member_channel(m.url, "scheduler", real) as channel:
            await channel.send(announce)
            assert isinstance(await _receive(channel), MemberRegistered)
        m.stop()


async def _receive(channel: Channel) -> object:
    with trio.fail_after(10):
        return await channel.receive()


async def test_a_manager_that_cannot_prove_itself_is_not_believed(tmp_path: Path) -> None:
    """An impostor on the manager's address (it holds no cluster secret) answers with its
    own scheduler: the peer refuses the answer and keeps its schedulers."""
    credential = issue(SecretRing.new("c"), host_id="p-1", role="peer", now=time.time(), ttl=600)
    evil = SchedulerEntry(id=1, hostname="evil", ip="127.0.0.1", port=9)
    asked: list[object] = []

    async def impostor(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        channel = Channel(ws, name="impostor")
        hello = Hello(
            version=PROTOCOL_VERSION, min_version=MIN_PROTOCOL_VERSION, role="manager",
            nonce=new_nonce(),
        )  # fmt: skip
        with contextlib.suppress(ChannelClosed):  # (the peer hangs up on it)
            await channel.handshake(hello)
            asked.append(await channel.receive())  # the peer's proof
            await channel.send(Proof(proof=b"\x00" * 32))  # it cannot make the real one
            await channel.send(SchedulerList(cluster_id=1, schedulers=[evil]))
            while True:
                asked.append(await channel.receive())

    async with trio.open_nursery() as nursery:
        server = await nursery.start(trio_websocket.serve_websocket, impostor, "127.0.0.1", 0, None)
        url = f"http://127.0.0.1:{server.port}"
        with pytest.raises(TrustError, match="wrong proof from the manager"):
            await ask_schedulers(url, "peer", credential, ListSchedulers(), timeout=5)
        host = HostInfo(host_id="p-1", hostname="p", ip="127.0.0.1", upload_port=1)
        pool = SchedulerPool(
            ["ws://127.0.0.1:1"], host, role="peer", on_trigger=_nothing, connect_timeout=1
        )
        discovery = Discovery(
            url, pool, role="peer", credential=credential, host=lambda: host,
            on_config=lambda c: asked.append(c), interval=60, timeout=5,
        )  # fmt: skip
        assert not await discovery.refresh()
        assert list(pool.connections) == ["ws://127.0.0.1:1"] and not discovery.found
        assert not [a for a in asked if isinstance(a, ListSchedulers)]  # it was told nothing
        nursery.cancel_scope.cancel()


async def _nothing(*_: object) -> None:
    return None


async def test_a_revoked_host_is_dropped_and_refused(tmp_path: Path) -> None:
    """Root revokes a peer: its scheduler drops it within a keepalive interval and refuses
    its handshakes (so does the manager); a guest cannot revoke; lifting it lets it back."""
    async with trio.open_nursery() as nursery:
        m = await start_manager(nursery, tmp_path / "m", *FAST)
        api, root = m.api, await m.root()
        tokens = {
            role: await join_token_file(m, root, role, tmp_path / "tokens")
            for role in ("scheduler", "peer")
        }
        scheduler, _ = await start_scheduler(
            nursery, member_config(m, "scheduler", tokens["scheduler"])
        )
        peer, _ = await start_peer(
            nursery, member_config(m, "peer", tokens["peer"], f"storage.data_dir={tmp_path / 'p'}")
        )
        victim = peer.host.host_id
        await until(lambda: victim in scheduler.hosts, "the peer connected")
        await api.add_user(root, "guest1", "guest-pass-1")
        guest = await api.signin("guest1", "guest-pass-1")
        assert (
            await api.call("POST", "/api/v1/revocations", {"host_id": victim}, token=guest)
        ).status == 403
        revoked = await api.call(
            "POST", "/api/v1/revocations", {"host_id": victim, "bio": "stolen"}, token=root
        )
        assert revoked.status == 200 and revoked.body["host_id"] == victim
        assert (
            await api.call("POST", "/api/v1/revocations", {"host_id": victim}, token=root)
        ).status == 409

        # dropped, and kept out
        await until(lambda: victim not in scheduler.hosts, "the revoked peer dropped", rounds=100)
        assert scheduler.metrics.refusals.labels("revoked")._value.get() >= 1
        port = scheduler.port
        nonce = new_nonce()
        hello = scheduler_hello(peer.host, "peer", peer.credential, nonce)
        async with connect(scheduler_url(f"ws://127.0.0.1:{port}"), hello) as channel:
            theirs = channel.peer_hello
            assert theirs is not None
            proof = peer_proof(
                peer.credential.host_key, nonce, theirs.nonce, peer.credential.claims
            )
            await channel.send(Proof(proof=proof))
            answer = await _receive(channel)
            assert isinstance(answer, Error) and answer.code == "forbidden"
            assert "revoked" in answer.message
        with pytest.raises(TrustError, match="revoked"):
            async with member_channel(m.url, "peer", peer.credential) as channel:
                pass
        await trio.sleep(1.0)  # the peer keeps trying: still out
        assert victim not in scheduler.hosts
        listed = (
            await api.call("GET", f"/api/v1/host-credentials?host_id={victim}", token=root)
        ).body
        assert listed[0]["revoked"] is True

        # lifted: it comes back by itself
        assert (
            await api.call("DELETE", f"/api/v1/revocations/{revoked.body['id']}", token=root)
        ).status == 200
        await until(lambda: victim in scheduler.hosts, "the peer back after the lift", rounds=200)
        m.stop()
        nursery.cancel_scope.cancel()
