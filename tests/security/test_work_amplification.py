"""Issue #11 item 5: work amplification. A member (a valid credential) cannot make the
cluster cut a task in 1-byte pieces, by naming the piece length or by reporting it,
and cannot register more downloads than its bound: the scheduler refuses them."""

from __future__ import annotations

from pathlib import Path

import trio

from dragonfly.config import SchedulerConfig, load_config
from dragonfly.nursery.scheduler import SchedulerServer
from dragonfly.testing.probe import metric
from dragonfly.testing.trust import LocalIssuer
from dragonfly.wire.messages import (
    Error,
    NeedBackToSource,
    RegisterPeer,
    TaskFailed,
    TaskMetadata,
    TaskSpec,
)
from tests.security.support import as_member, host_info

ORIGIN = "http://origin.invalid"


async def test_item5_piece_length_and_registrations_are_bounded(tmp_path: Path) -> None:
    issuer = LocalIssuer(tmp_path / "trust")
    cfg = load_config(
        "scheduler",
        env={},
        overrides=["server.port=0", "limits.peers_per_host=5", *issuer.scheduler_overrides()],
    )
    assert isinstance(cfg, SchedulerConfig)
    server = SchedulerServer(cfg)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.run)
        url = f"ws://127.0.0.1:{port}/v1/scheduler"
        member = issuer.credential("member-1", "peer")
        host = host_info("member-1")

        # A task cut in 1-byte pieces, named in the registration: refused on decode.
        one_byte = TaskSpec(url=f"{ORIGIN}/a", piece_length=1)
        got = await as_member(
            url,
            member,
            host,
            [RegisterPeer(peer_id="member-1-a", task_id="a" * 64, task=one_byte)],
            listen=2,
        )
        (error,) = [m for m in got if isinstance(m, Error)]
        assert error.code == "protocol" and "piece_length" in error.message

        # ... or reported as the origin's layout by a member sent to the origin.
        spec = TaskSpec(url=f"{ORIGIN}/b")
        register = RegisterPeer(peer_id="member-1-b", task_id=spec.task_id, task=spec)
        metadata = TaskMetadata(
            peer_id="member-1-b",
            task_id=spec.task_id,
            content_length=1 << 30,
            piece_length=1,
            piece_count=1 << 30,
        )
        got = await as_member(url, member, host, [register, metadata], listen=2)
        assert any(isinstance(m, NeedBackToSource) for m in got)
        errors = [m for m in got if isinstance(m, Error)]
        assert len(errors) == 1 and "piece length 1 is not the task's" in errors[0].message, got
        task = server.core.tasks[spec.task_id]
        assert not task.metadata_known and task.piece_count == -1

        # Ten downloads at once from one host: five are registered, five refused.
        specs = [TaskSpec(url=f"{ORIGIN}/f{i}") for i in range(10)]
        registrations = [
            RegisterPeer(peer_id=f"member-1-f{i}", task_id=s.task_id, task=s)
            for i, s in enumerate(specs)
        ]
        got = await as_member(url, member, host, registrations, listen=3)
        refused = [m for m in got if isinstance(m, TaskFailed)]
        answered = [m for m in got if isinstance(m, NeedBackToSource)]
        assert len(answered) == 5 and len(refused) == 5, got
        assert all(m.http_status == 503 and "registration refused" in m.reason for m in refused)
        assert len(server.core.tasks) <= 5 + 1  # (the refused never became tasks)
        sched = f"http://127.0.0.1:{port}/metrics"
        refusals = await trio.to_thread.run_sync(
            metric, sched, "dragonfly_scheduler_refusals_total", 'reason="bounds"'
        )
        assert refusals == 5
        nursery.cancel_scope.cancel()
