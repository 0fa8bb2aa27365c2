"""Tickets in a running cluster (scheduler, seed peer and peer in-process): a child
whose tickets are about to expire asks the scheduler again (Reschedule) and goes on
with fresh ones, so no parent ever refuses it; every byte is the origin's."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

from dragonfly import trust
from dragonfly.sched import answers as scheduler_answers
from dragonfly.sched.scheduler import Send
from dragonfly.testing.nginx import Nginx
from dragonfly.wire.codec import Message
from dragonfly.wire.messages import Reschedule
from tests.integration.test_config_effects import roles
from tests.p2p_support import MiB, random_file, sha256_file

pytestmark = [pytest.mark.nginx, pytest.mark.slow]


async def test_a_child_renews_its_tickets_before_they_expire(
    tmp_path: Path, www: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tickets last 120 s (rounded up to the second) and a child renews them 118 s early:
    # they are stale 1 to 2 s after the scheduler made them, while the seed peer takes
    # about 6 s to fetch the file (12 MiB from an origin sending 512 KiB/s a connection,
    # with 4 connections), so the child must renew them to get the later pieces.
    monkeypatch.setattr(trust, "TICKET_REFRESH_MARGIN", 118)
    monkeypatch.setattr(scheduler_answers, "TICKET_STEP", 1)
    size = 12 * MiB + 5
    want = random_file(www / "f.bin", size)
    reschedules = 0
    with Nginx(root=www, workdir=tmp_path / "nginx", limit_rate="512k") as nginx:
        async with roles(tmp_path) as r:
            scheduler = await r.scheduler("trust.ticket_ttl=120s")
            handle_batch = scheduler.core.handle_batch

            def counting(host_id: str, batch: Sequence[Message], now: float) -> list[Send]:
                nonlocal reschedules
                reschedules += sum(isinstance(msg, Reschedule) for msg in batch)
                return handle_batch(host_id, batch, now)

            # (the shell calls it with every receive's messages)
            scheduler.core.handle_batch = counting  # type: ignore[method-assign]
            seed = await r.peer("seed-1", role="seed-peer")
            peer = await r.peer("peer-1")
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
    assert result.returncode == 0, result.stderr
    assert sha256_file(tmp_path / "out") == want
    assert reschedules >= 1, "the tickets never went stale: the test proves nothing"
    refused = seed.metrics.errors.labels("ticket")._value.get()
    p2p = peer.metrics.download_bytes.labels("p2p")._value.get()
    assert refused == 0 and p2p == size
