"""Tickets in a running cluster (scheduler, seed peer and peer in-process): a child
whose tickets are about to expire asks the scheduler again (Reschedule) and goes on
with fresh ones, so no parent ever refuses it; every byte is the origin's."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import trio

from dragonfly import trust
from dragonfly.config import PeerConfig, SchedulerConfig, load_config
from dragonfly.nursery.peer import PeerDaemon
from dragonfly.nursery.scheduler import SchedulerServer
from dragonfly.sched import scheduler as scheduler_module
from dragonfly.sched.scheduler import Send
from dragonfly.testing.nginx import Nginx
from dragonfly.testing.trust import LocalIssuer
from dragonfly.wire.codec import Message
from dragonfly.wire.messages import Reschedule
from tests.p2p_support import MiB, random_file, sha256_file

pytestmark = [pytest.mark.nginx, pytest.mark.slow]


def _peer_config(
    tmp_path: Path, name: str, role: str, port: int, issuer: LocalIssuer
) -> PeerConfig:
    cfg = load_config(
        role,
        env={},
        overrides=[
            "proxy.port=0",
            "upload.port=0",
            f"storage.data_dir={tmp_path / name}",
            f"scheduler.addresses=['ws://127.0.0.1:{port}']",
            *issuer.peer_overrides(name, role),
        ],
    )
    assert isinstance(cfg, PeerConfig)
    return cfg


async def test_a_child_renews_its_tickets_before_they_expire(
    tmp_path: Path, www: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tickets last 120 s (rounded up to the second) and a child renews them 118 s early:
    # they are stale 1 to 2 s after the scheduler made them, while the seed peer takes
    # about 6 s to fetch the file (12 MiB from an origin sending 512 KiB/s a connection,
    # with 4 connections), so the child must renew them to get the later pieces.
    monkeypatch.setattr(trust, "TICKET_REFRESH_MARGIN", 118)
    monkeypatch.setattr(scheduler_module, "TICKET_STEP", 1)
    want = random_file(www / "f.bin", 12 * MiB + 5)
    issuer = LocalIssuer(tmp_path / "trust")
    sched_cfg = load_config(
        "scheduler",
        env={},
        overrides=["server.port=0", "trust.ticket_ttl=120s", *issuer.scheduler_overrides()],
    )
    assert isinstance(sched_cfg, SchedulerConfig)
    scheduler = SchedulerServer(sched_cfg)
    reschedules = 0
    handle = scheduler.core.handle

    def counting(host_id: str, msg: Message, now: float) -> list[Send]:
        nonlocal reschedules
        reschedules += isinstance(msg, Reschedule)
        return handle(host_id, msg, now)

    scheduler.core.handle = counting  # (the shell calls it for every message)
    nginx = Nginx(root=www, workdir=tmp_path / "nginx", limit_rate="512k")
    with nginx:
        result, seed, peer = await _fetch_through_a_child(tmp_path, scheduler, issuer, nginx)
    assert result.returncode == 0, result.stderr
    assert sha256_file(tmp_path / "out") == want
    assert reschedules >= 1, "the tickets never went stale: the test proves nothing"
    refused = seed.metrics.errors.labels("ticket")._value.get()
    p2p = peer.metrics.download_bytes.labels("p2p")._value.get()
    assert refused == 0 and p2p == 12 * MiB + 5


async def _fetch_through_a_child(
    tmp_path: Path, scheduler: SchedulerServer, issuer: LocalIssuer, nginx: Nginx
) -> tuple[subprocess.CompletedProcess[bytes], PeerDaemon, PeerDaemon]:
    """A seed peer and a peer on the scheduler; curl fetches the file through the peer."""
    async with trio.open_nursery() as nursery:
        port = await nursery.start(scheduler.run)
        seed = await nursery.start(
            PeerDaemon(_peer_config(tmp_path, "seed-1", "seed-peer", port, issuer)).run
        )
        peer = await nursery.start(
            PeerDaemon(_peer_config(tmp_path, "peer-1", "peer", port, issuer)).run
        )
        with trio.fail_after(60):  # both proved themselves to the scheduler
            for daemon in (seed, peer):
                for conn in daemon.schedulers.connections.values():
                    await conn.connected.wait()
        proxy = f"http://127.0.0.1:{peer.proxy_port}"
        result = await trio.run_process(
            ["curl", "-sSf", "-x", proxy, "-o", str(tmp_path / "out"), f"{nginx.url}/f.bin"],
            check=False,
            capture_stderr=True,
        )
        nursery.cancel_scope.cancel()
    return result, seed, peer
