"""Issue #11 items 1-3 against a default `python -m dragonfly cluster`: an outsider who
knows the ports but holds no credential (and a member with the wrong one) can neither
register a task, nor pose as a seed peer, nor speak as another host; and a peer tells
nothing to a scheduler that cannot prove it holds the cluster secret."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio

from dragonfly.cluster import Cluster
from dragonfly.config import PeerConfig, load_config
from dragonfly.identity import task_id
from dragonfly.net.channel import ChannelClosed, ServerChannel, accept_websocket
from dragonfly.net.http_server import Request, Responder, bound_port, serve
from dragonfly.nursery.peer import PeerDaemon
from dragonfly.testing.nginx import Nginx
from dragonfly.testing.trust import LocalIssuer
from dragonfly.trust import Credential, SecretRing, issue, peer_proof
from dragonfly.wire.codec import MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, Message
from dragonfly.wire.messages import (
    Error,
    Hello,
    Proof,
    RegisterPeer,
    TaskSpec,
    TriggerDownload,
)
from tests.p2p_support import (
    MiB,
    curl,
    curl_response,
    finish,
    metric,
    random_file,
    sha256_file,
)
from tests.security.support import (
    access_log_paths,
    hello,
    host_info,
    log_events,
    scheduler_url,
    speak,
)

pytestmark = [pytest.mark.nginx, pytest.mark.slow]


def _refused(received: list[Message], closed: bool) -> Error:
    """The scheduler's one answer to someone who did not prove a credential."""
    errors = [m for m in received if isinstance(m, Error)]
    assert closed and errors, (closed, received)
    assert errors[-1].code == "forbidden", errors
    assert not any(isinstance(m, (TriggerDownload,)) for m in received)
    return errors[-1]


async def test_item1_an_outsider_cannot_put_other_bytes_under_a_tasks_id(
    tmp_path: Path, www: Path, nginx: Nginx
) -> None:
    """Poisoning: a RegisterPeer with URL A's task ID and URL B (or B's own ID) from a
    client without a credential is never acted on; the victim gets A's bytes and the
    origin never saw a fetch of B."""
    want = random_file(www / "a.bin", 5 * MiB)
    random_file(www / "b.bin", 5 * MiB)
    cluster = await trio.to_thread.run_sync(Cluster(tmp_path / "c", 1, 1, 1).start)
    try:
        a, b = f"{nginx.url}/a.bin", f"{nginx.url}/b.bin"
        forged = [
            RegisterPeer(peer_id="x-1", task_id=task_id(a), task=TaskSpec(url=b)),
            RegisterPeer(peer_id="x-2", task_id=task_id(b), task=TaskSpec(url=b)),
        ]
        received, closed = await speak(scheduler_url(cluster), hello(host_info("x")), forged)
        error = _refused(received, closed)
        assert "credential" in error.message
        proxy = cluster.node("peer-0").info["proxy"]
        code, err = await trio.to_thread.run_sync(lambda: finish(curl(proxy, a, tmp_path / "a")))
        assert code == 0, err
        assert sha256_file(tmp_path / "a") == want
        assert "/b.bin" not in access_log_paths(nginx.access_log)
        sched = cluster.node("scheduler-0").info["metrics"]
        assert metric(sched, "dragonfly_scheduler_refusals_total", 'reason="no_credential"') >= 1
        assert metric(sched, "dragonfly_scheduler_registrations_total") == 2  # seed and peer
    finally:
        await trio.to_thread.run_sync(cluster.stop)


async def test_item2_an_outsider_cannot_make_the_seed_fetch_or_serve_a_url(
    tmp_path: Path, www: Path, nginx: Nginx
) -> None:
    """Request forgery: a registration naming a loopback service's URL makes no fetch,
    and the seed's upload port serves nothing without a ticket."""
    (www / "internal").mkdir()
    (www / "internal" / "secret.txt").write_text("the metadata service's credentials\n")
    secret_url = f"{nginx.url}/internal/secret.txt"
    cluster = await trio.to_thread.run_sync(Cluster(tmp_path / "c", 1, 1, 0).start)
    try:
        tid = task_id(secret_url)
        register = RegisterPeer(
            peer_id="x-1", task_id=tid, task=TaskSpec(url=secret_url), need_back_to_source=True
        )
        received, closed = await speak(scheduler_url(cluster), hello(host_info("x")), [register])
        _refused(received, closed)
        await trio.sleep(1.0)  # (a seed, had it been triggered, fetches within milliseconds)
        assert not any(p.startswith("/internal/") for p in access_log_paths(nginx.access_log))
        seed = cluster.node("seed-peer-0").info["upload"]
        out = await trio.run_process(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{seed}/pieces/{tid}/0"],
            capture_stdout=True,
        )
        assert out.stdout == b"403"
    finally:
        await trio.to_thread.run_sync(cluster.stop)


async def test_item3_nobody_poses_as_a_seed_or_as_another_host(
    tmp_path: Path, www: Path, nginx: Nginx
) -> None:
    """A self-declared seed peer gets no trigger and no client's header; a member with a
    peer credential that says seed-peer is refused; a Hello with another host's ID does
    not disconnect that host."""
    files = {f"f{i}.bin": random_file(www / f"f{i}.bin", 100_000 + i) for i in range(8)}
    cluster = await trio.to_thread.run_sync(Cluster(tmp_path / "c", 1, 1, 1).start)
    try:
        url = scheduler_url(cluster)
        sched_log = cluster.node("scheduler-0").log_path
        proxy = cluster.node("peer-0").info["proxy"]
        # The victim's host ID (the manager issued it; it travels in ParentInfo).
        victim = cluster.node("peer-0").info["host_id"]
        assert victim in [e["host_id"] for e in log_events(sched_log, "host connected")]
        connected = trio.Event()
        received: list[Message] = []
        outcome: list[bool] = []

        async def fake_seed() -> None:
            seed_hello = hello(host_info("evil-seed", seed=True), role="seed-peer")
            _, closed = await speak(
                url, seed_hello, listen=60, connected=connected, received=received
            )
            outcome.append(closed)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fake_seed)
            await connected.wait()

            def fetch_all() -> list[str]:
                results = []
                for name in files:
                    out = tmp_path / name
                    header = "X-Team-Token: team-secret-4711"
                    code, err = finish(curl(proxy, f"{nginx.url}/{name}", out, "-H", header))
                    assert code == 0, err
                    results.append(sha256_file(out))
                return results

            assert await trio.to_thread.run_sync(fetch_all) == list(files.values())
            nursery.cancel_scope.cancel()
        assert not [m for m in received if isinstance(m, TriggerDownload)], received
        assert "team-secret-4711" not in repr(received)
        _refused(received, outcome == [True])

        # A member with a peer's credential saying it is a seed peer.
        member = cluster.issuer.credential("member-1", "peer")
        lie = Hello(
            version=PROTOCOL_VERSION,
            min_version=MIN_PROTOCOL_VERSION,
            role="seed-peer",
            host=host_info("member-1", seed=True),
            nonce=b"n" * 32,
            claims=member.claims,
        )
        received, closed = await speak(url, lie)
        assert "credential peer" in _refused(received, closed).message

        # Someone speaking as the victim host, with and without the victim's claims.
        victim_claims = issue(
            SecretRing.new("elsewhere"), host_id=victim, role="peer", now=time.time(), ttl=60
        ).claims
        for claims in (None, victim_claims):
            impostor = Hello(
                version=PROTOCOL_VERSION,
                min_version=MIN_PROTOCOL_VERSION,
                role="peer",
                host=host_info(victim),
                nonce=b"n" * 32,
                claims=claims,
            )
            received, closed = await speak(url, impostor, [Proof(proof=b"p" * 32)])
            _refused(received, closed)
        await trio.sleep(0.5)
        gone = [e for e in log_events(sched_log, "host disconnected") if e["host_id"] == victim]
        assert gone == [], "a Hello with the victim's ID disconnected the victim"
        sched = cluster.node("scheduler-0").info["metrics"]
        assert metric(sched, "dragonfly_scheduler_connected_hosts") == 2
        for reason in ("no_credential", "role_mismatch", "cluster"):
            labels = f'reason="{reason}"'
            assert metric(sched, "dragonfly_scheduler_refusals_total", labels) >= 1, reason
        # The victim still downloads through the scheduler.
        code, err = await trio.to_thread.run_sync(
            lambda: finish(curl(proxy, f"{nginx.url}/f0.bin", tmp_path / "again"))
        )
        assert code == 0, err
    finally:
        await trio.to_thread.run_sync(cluster.stop)


async def test_wrong_credentials_are_refused_each_with_its_reason(tmp_path: Path) -> None:
    """Expired, another cluster's, a key that is not the claims' (a proof that fails),
    and an unknown key id: an Error naming the reason, the connection closed, a count."""
    cluster = await trio.to_thread.run_sync(Cluster(tmp_path / "c", 1, 0, 0).start)
    try:
        url = scheduler_url(cluster)
        ring = cluster.issuer.ring
        now = time.time()
        real = issue(ring, host_id="m", role="peer", now=now, ttl=3600)
        cases = {
            "expired": issue(ring, host_id="m", role="peer", now=now - 7200, ttl=3600),
            "cluster": issue(SecretRing.new("other"), host_id="m", role="peer", now=now, ttl=60),
            "proof": Credential(real.claims, b"\x00" * 32),  # the claims without their key
            "unknown_key": issue(
                SecretRing(ring.cluster, SecretRing.new(ring.cluster).keys),
                host_id="m",
                role="peer",
                now=now,
                ttl=60,
            ),
        }
        for reason, credential in cases.items():
            msg = Hello(
                version=PROTOCOL_VERSION,
                min_version=MIN_PROTOCOL_VERSION,
                role="peer",
                host=host_info("m"),
                nonce=b"n" * 32,
                claims=credential.claims,
            )
            # (the proof can only be made over the scheduler's nonce: a wrong one is as good)
            proof = Proof(proof=peer_proof(credential.host_key, b"n" * 32, b"", credential.claims))
            received, closed = await speak(url, msg, [proof])
            _refused(received, closed)
            sched = cluster.node("scheduler-0").info["metrics"]
            labels = f'reason="{reason}"'
            assert metric(sched, "dragonfly_scheduler_refusals_total", labels) >= 1, reason
        refusals = log_events(cluster.node("scheduler-0").log_path, "host refused")
        assert {e["reason"] for e in refusals} >= set(cases)
    finally:
        await trio.to_thread.run_sync(cluster.stop)


async def test_a_peer_tells_nothing_to_a_scheduler_that_cannot_prove_itself(
    tmp_path: Path, www: Path, nginx: Nginx
) -> None:
    """A fake scheduler (no cluster secret) answers the Hello and sends a made-up proof:
    the peer never sends it a registration or a client's header (one that is no
    credential, so the request goes through P2P), and serves its client from the origin
    instead."""
    want = random_file(www / "f.bin", 2 * MiB)
    seen: list[Message] = []

    async def fake(channel: ServerChannel) -> None:
        scheduler_hello = Hello(
            version=PROTOCOL_VERSION,
            min_version=MIN_PROTOCOL_VERSION,
            role="scheduler",
            nonce=b"s" * 32,
        )
        seen.append(await channel.handshake(scheduler_hello))
        channel.queue(Proof(proof=b"\x01" * 32))
        with trio.move_on_after(30):
            try:
                while True:
                    seen.extend(await channel.receive_batch())
            except ChannelClosed:
                return

    async def handler(request: Request, responder: Responder) -> None:
        await accept_websocket(request, responder, fake)

    issuer = LocalIssuer(tmp_path / "trust")
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(serve, handler, "127.0.0.1", 0)
        cfg = load_config(
            "peer",
            env={},
            overrides=[
                f"scheduler.addresses=['ws://127.0.0.1:{bound_port(listeners)}']",
                "scheduler.connect_timeout=2s",
                f"storage.data_dir={tmp_path / 'data'}",
                *issuer.peer_overrides("p-1"),
            ],
        )
        assert isinstance(cfg, PeerConfig)
        daemon = await nursery.start(PeerDaemon(cfg).run)
        proxy = f"http://127.0.0.1:{daemon.proxy_port}"
        result = await trio.run_process(
            ["curl", "-sSf", "-x", proxy, "-H", "X-Team-Token: s3cr3t", "-o",
             str(tmp_path / "out"), f"{nginx.url}/f.bin"],
            check=False, capture_stderr=True,
        )  # fmt: skip
        nursery.cancel_scope.cancel()
    assert result.returncode == 0, result.stderr
    assert sha256_file(tmp_path / "out") == want
    assert seen and isinstance(seen[0], Hello), "the peer never came: the test proves nothing"
    assert not any(isinstance(m, RegisterPeer) for m in seen), seen
    assert "s3cr3t" not in repr(seen)
    assert any(isinstance(m, Proof) for m in seen)  # it proved itself, and waited for ours


async def test_an_insecure_cluster(tmp_path: Path, www: Path, nginx: Nginx) -> None:
    """trust.insecure on every role turns identity off, loudly: the scheduler takes a
    Hello at its word, an upload port serves a piece without a ticket, and each daemon
    says so in its log at start."""
    want = random_file(www / "f.bin", 5 * MiB)
    cluster = await trio.to_thread.run_sync(
        Cluster(tmp_path / "c", 1, 1, 1, overrides=["trust.insecure=true"]).start
    )
    try:
        proxy = cluster.node("peer-0").info["proxy"]
        out = tmp_path / "out"
        status, headers, _ = await trio.to_thread.run_sync(
            lambda: curl_response(f"{nginx.url}/f.bin", "-x", proxy, "-o", str(out))
        )
        assert status == 200 and sha256_file(out) == want
        task = headers["x-dragonfly-task-id"]
        received, closed = await speak(scheduler_url(cluster), hello(host_info("x")), listen=2)
        assert not closed and not [m for m in received if isinstance(m, Error)]
        upload = cluster.node("peer-0").info["upload"]
        piece = await trio.run_process(
            ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{upload}/pieces/{task}/0"],
            capture_stdout=True,
        )
        assert piece.stdout == b"200"
        for node in cluster.nodes:
            if node.role == "manager":  # (it checks no host: it issues credentials)
                continue
            events = log_events(node.log_path, None)
            assert any(str(e["event"]).startswith("INSECURE") for e in events), node.name
    finally:
        await trio.to_thread.run_sync(cluster.stop)
