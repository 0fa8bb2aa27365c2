"""Failures and bad input with real processes: killed parents and schedulers, corrupt
pieces, lying peers, a changing origin, rate limits, bad frames on the scheduler socket."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import trio
import trio_websocket

from dragonfly.cluster import Cluster, Node
from dragonfly.identity import task_id
from dragonfly.net.channel import connect
from dragonfly.peer.scheduler_client import authenticate, ring_order, scheduler_hello
from dragonfly.testing.nginx import Nginx
from dragonfly.trust import new_nonce
from dragonfly.wire.codec import decode, encode
from dragonfly.wire.messages import Error, HostInfo
from tests.faults.liar import Liar
from tests.p2p_support import MiB, curl, finish, metric, random_file, sha256_file, task_files

pytestmark = [pytest.mark.nginx, pytest.mark.slow]


def wait_for_bytes(node: Node, source: str, at_least: float, timeout: float = 30.0) -> None:
    """Until a node's download counter for `source` reaches `at_least` bytes."""
    deadline = time.monotonic() + timeout
    url = node.info["metrics"]
    while metric(url, "dragonfly_download_bytes_total", f'source="{source}"') < at_least:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{node.name}: fewer than {at_least} {source} bytes after {timeout}s"
            )
        time.sleep(0.05)


def test_parent_killed_mid_transfer(tmp_path: Path, www: Path):
    size = 64 * MiB
    want = random_file(www / "f.bin", size)
    with (
        Nginx(root=www, workdir=tmp_path / "nginx", limit_rate="2m") as slow,
        Cluster(tmp_path / "c", schedulers=1, seed_peers=1, peers=3) as cluster,
    ):
        url = f"{slow.url}/f.bin"
        victim = cluster.node("peer-0")
        procs = [
            curl(cluster.node(f"peer-{i}").info["proxy"], url, tmp_path / f"o{i}") for i in range(3)
        ]
        # once the victim is serving the others (it sent them a whole piece), kill it
        deadline = time.monotonic() + 120
        while (served := metric(victim.info["metrics"], "dragonfly_upload_bytes_total")) < 4 * MiB:
            assert time.monotonic() < deadline, "the victim never served a piece"
            time.sleep(0.05)
        others = [cluster.node(f"peer-{i}") for i in (1, 2)]
        had = sum(
            metric(n.info["metrics"], "dragonfly_download_bytes_total", 'source="p2p"')
            for n in others
        )
        assert victim.process is not None
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait()
        finish(procs[0])
        for i in (1, 2):
            code, err = finish(procs[i])
            assert code == 0, err
            assert sha256_file(tmp_path / f"o{i}") == want
        # The others had not got everything yet when their parent died: they finished
        # from the seed and from each other (the origin served the file about once).
        assert had < 2 * size, "the others had every byte before the kill: nothing to prove"
        assert served >= 4 * MiB
        got = [
            metric(n.info["metrics"], "dragonfly_download_bytes_total", 'source="p2p"')
            + metric(n.info["metrics"], "dragonfly_download_bytes_total", 'source="back_to_source"')
            for n in others
        ]
        assert all(g >= size for g in got)
        assert slow.served_bytes("/f.bin") <= 1.2 * size


def test_corrupt_piece_on_a_parents_disk(tmp_path: Path, www: Path, nginx: Nginx):
    size = 24 * MiB
    want = random_file(www / "f.bin", size)
    url = f"{nginx.url}/f.bin"
    with Cluster(tmp_path / "c", schedulers=1, seed_peers=1, peers=2) as cluster:
        p0, p1 = cluster.node("peer-0"), cluster.node("peer-1")
        code, err = finish(curl(p0.info["proxy"], url, tmp_path / "o0"))
        assert code == 0, err
        # The client has its bytes before peer-0's reports reach the scheduler: wait for
        # them (the seed's 6 pieces and peer-0's), or the seed's death leaves the scheduler
        # no known holder and peer-1 is sent to the origin.
        sched = cluster.node("scheduler-0").info["metrics"]
        deadline = time.monotonic() + 30
        while metric(sched, "dragonfly_scheduler_piece_reports_total") < 12:
            assert time.monotonic() < deadline, "peer-0's pieces never reached the scheduler"
            time.sleep(0.05)
        # The seed goes away, so peer-0 is the only parent left; then one of its pieces rots.
        seed = cluster.node("seed-peer-0")
        assert seed.process is not None
        seed.process.send_signal(signal.SIGKILL)
        seed.process.wait()
        (task,) = task_files(p0.info["data_dir"])
        with open(task, "r+b") as f:
            f.seek(5 * MiB)
            f.write(b"\xff" * 4096)
        code, err = finish(curl(p1.info["proxy"], url, tmp_path / "o1"))
        assert code == 0, err
        assert sha256_file(tmp_path / "o1") == want
        m = p1.info["metrics"]
        assert metric(m, "dragonfly_piece_failures_total", 'reason="digest"') >= 1
        assert metric(m, "dragonfly_download_bytes_total", 'source="back_to_source"') > 0


async def test_a_lying_parent_is_caught_and_blocked(tmp_path: Path, www: Path, nginx: Nginx):
    size = 32 * MiB
    want = random_file(www / "f.bin", size)
    url = f"{nginx.url}/f.bin"
    cluster = await trio.to_thread.run_sync(
        Cluster(tmp_path / "c", schedulers=1, seed_peers=1, peers=1).start
    )
    try:
        scheduler = cluster.node("scheduler-0").info["url"]
        liar = Liar(scheduler, task_id(url), url, cluster.issuer.credential("liar", "peer"))
        async with trio.open_nursery() as nursery:
            with trio.fail_after(60):
                await nursery.start(liar.run)
            peer = cluster.node("peer-0")
            result = await trio.run_process(
                ["curl", "-sS", "-f", "-x", peer.info["proxy"], "-o", str(tmp_path / "o"), url],
                check=False,
                capture_stderr=True,
            )
            nursery.cancel_scope.cancel()
        assert result.returncode == 0, result.stderr
        assert sha256_file(tmp_path / "o") == want
        m = peer.info["metrics"]
        assert liar.served >= 1, "the liar was never asked: the test proves nothing"
        assert metric(m, "dragonfly_piece_failures_total", 'reason="digest"') >= 1
        # blocked after the first bad piece: only the requests already in flight reached it
        assert liar.served <= 4
    finally:
        await trio.to_thread.run_sync(cluster.stop)


def test_two_schedulers_one_killed(tmp_path: Path, www: Path):
    size = 48 * MiB
    want = random_file(www / "f.bin", size)
    with (
        Nginx(root=www, workdir=tmp_path / "nginx", limit_rate="2m") as slow,
        Cluster(tmp_path / "c", schedulers=2, seed_peers=1, peers=2) as cluster,
    ):
        url = f"{slow.url}/f.bin"
        schedulers = {n.info["url"]: n for n in cluster.nodes if n.role == "scheduler"}
        owner = schedulers[ring_order(task_id(url), list(schedulers))[0]]
        procs = [
            curl(cluster.node(f"peer-{i}").info["proxy"], url, tmp_path / f"o{i}") for i in range(2)
        ]
        seed = cluster.node("seed-peer-0")
        wait_for_bytes(seed, "back_to_source", 1)
        assert owner.process is not None
        owner.process.send_signal(signal.SIGKILL)
        for i, proc in enumerate(procs):
            code, err = finish(proc)
            assert code == 0, err
            assert sha256_file(tmp_path / f"o{i}") == want


def test_all_schedulers_down_back_to_source(tmp_path: Path, www: Path, nginx: Nginx):
    want = random_file(www / "f.bin", 12 * MiB)
    with Cluster(
        tmp_path / "c",
        schedulers=1,
        seed_peers=0,
        peers=1,
        extra=["--set", "scheduler.connect_timeout=1s"],
    ) as cluster:
        sched = cluster.node("scheduler-0")
        assert sched.process is not None
        sched.process.send_signal(signal.SIGKILL)
        sched.process.wait()
        peer = cluster.node("peer-0")
        code, err = finish(curl(peer.info["proxy"], f"{nginx.url}/f.bin", tmp_path / "o"))
        assert code == 0, err
        assert sha256_file(tmp_path / "o") == want
        assert metric(peer.info["metrics"], "dragonfly_back_to_source_fallbacks_total") == 1


def test_origin_replaced_mid_task_fails_clearly_then_starts_afresh(tmp_path: Path, www: Path):
    size = 32 * MiB
    random_file(www / "f.bin", size)
    # Two origin connections at 2 MB/s: a piece lands every second (in two slices), so
    # most range requests are sent after the file changed.
    with (
        Nginx(root=www, workdir=tmp_path / "nginx", limit_rate="2m") as slow,
        Cluster(
            tmp_path / "c",
            schedulers=1,
            seed_peers=1,
            peers=1,
            extra=["--set", "download.origin_concurrency=2"],
        ) as cluster,
    ):
        url = f"{slow.url}/f.bin"
        peer = cluster.node("peer-0")
        seed = cluster.node("seed-peer-0")
        proc = curl(peer.info["proxy"], url, tmp_path / "o")
        wait_for_bytes(seed, "back_to_source", 1)
        # a new version of the file: same size, other bytes, new ETag
        new = random_file(www / "f.new", size)
        os.utime(www / "f.new", (time.time() + 10, time.time() + 10))
        os.replace(www / "f.new", www / "f.bin")
        code, err = finish(proc)
        # the client's connection is cut: never a file that looks complete
        assert code != 0, "a client got a whole file although the origin changed under the task"
        assert (tmp_path / "o").stat().st_size < size
        log = (cluster.workdir / "logs" / "seed-peer-0.log").read_text()
        assert "origin content changed" in log
        assert "internal error" not in log  # the machine failed it, with its status
        # the next request starts afresh and gets the new version, whole
        code, err = finish(curl(peer.info["proxy"], url, tmp_path / "o2"), timeout=120)
        assert code == 0, err
        assert sha256_file(tmp_path / "o2") == new


def test_upload_rate_limit(tmp_path: Path, www: Path, nginx: Nginx):
    rate = 4_000_000
    want = random_file(www / "f.bin", 24 * MiB)
    with Cluster(
        tmp_path / "c",
        schedulers=1,
        seed_peers=1,
        peers=1,
        extra=["--set", f"upload.rate_limit={rate}"],
    ) as cluster:
        seed = cluster.node("seed-peer-0")
        peer = cluster.node("peer-0")
        proc = curl(peer.info["proxy"], f"{nginx.url}/f.bin", tmp_path / "o")
        samples: list[tuple[float, float]] = []
        while proc.poll() is None:
            samples.append(
                (time.monotonic(), metric(seed.info["metrics"], "dragonfly_upload_bytes_total"))
            )
            time.sleep(0.25)
        code, err = finish(proc)
        assert code == 0, err
        assert sha256_file(tmp_path / "o") == want
        # over any 2-second window the seed served at most about the limit
        worst = 0.0
        for i, (t0, b0) in enumerate(samples):
            for t1, b1 in samples[i + 1 :]:
                if t1 - t0 >= 2.0:
                    worst = max(worst, (b1 - b0) / (t1 - t0))
                    break
        assert worst <= 1.5 * rate, f"served {worst / 1e6:.1f} MB/s under a {rate / 1e6} MB/s limit"
        assert worst > 0


def test_a_busy_parent_answers_503_and_children_still_get_every_byte(
    tmp_path: Path, www: Path, nginx: Nginx
):
    """One upload slot and no queue: a second child's piece request is refused at once
    with 503 and Retry-After (not queued, not failed), while the same child's second
    request waits for the slot (the limits follow demand: dragonfly/engine/admission.py);
    and children whose parents keep refusing them still download the whole file, right."""
    want = random_file(www / "f.bin", 20 * MiB + 5)  # 5 pieces
    extra = [
        "--set", "upload.concurrent_limit=1", "--set", "upload.queue_limit=0",
        "--set", "upload.rate_limit=4MB/s",
    ]  # fmt: skip
    with Cluster(tmp_path / "c", schedulers=1, seed_peers=1, peers=3, extra=extra) as cluster:
        first = cluster.node("peer-0")
        out = subprocess.run(
            ["curl", "-sSf", "-D", "/dev/stderr", "-o", str(tmp_path / "a"), "-x",
             first.info["proxy"], f"{nginx.url}/f.bin"],
            capture_output=True, timeout=120,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        assert sha256_file(tmp_path / "a") == want
        task = re.search(rb"x-dragonfly-task-id: (\w+)", out.stderr).group(1).decode()
        # Two requests at once to peer-0's upload server, with the tickets a scheduler
        # would give: each is served (about 1 s at 4 MB/s) when one child asks both;
        # when two children ask, one is refused at once.
        piece = f"{first.info['upload']}/pieces/{task}/0"
        command = ["curl", "-s", "-o", "/dev/null", "-D", "-", "-w", "%{http_code}\n"]

        def both(*children: str) -> list[str]:
            procs = []
            for child in children:
                ticket = f"x-dragonfly-ticket: {cluster.ticket_header(task, 'peer-0', child)}"
                procs.append(
                    subprocess.Popen([*command, "-H", ticket, piece], stdout=subprocess.PIPE)
                )
                time.sleep(0.2)  # the first holds the slot when the second asks
            return [p.communicate(timeout=60)[0].decode() for p in procs]

        answers = both("child-a", "child-a")
        assert [a.strip().splitlines()[-1] for a in answers] == ["200", "200"], answers
        assert metric(first.info["metrics"], "dragonfly_upload_busy_refusals_total") == 0
        answers = both("child-a", "child-b")
        assert [a.strip().splitlines()[-1] for a in answers] == ["200", "503"], answers
        assert "retry-after: 1" in answers[1].lower()
        assert metric(first.info["metrics"], "dragonfly_upload_busy_refusals_total") == 1
        # peer-1 and peer-2 at once ask their parents for several pieces each; every
        # parent takes one at a time and refuses the other child meanwhile.
        procs = [
            curl(cluster.node(name).info["proxy"], f"{nginx.url}/f.bin", tmp_path / name)
            for name in ("peer-1", "peer-2")
        ]
        for name, proc in zip(("peer-1", "peer-2"), procs, strict=True):
            code, err = finish(proc)
            assert code == 0, err
            assert sha256_file(tmp_path / name) == want
        refusals = sum(
            metric(cluster.node(n).info["metrics"], "dragonfly_upload_busy_refusals_total")
            for n in ("peer-0", "peer-1", "peer-2", "seed-peer-0")
        )
        assert refusals >= 3, "the children never met a busy parent: the test tests nothing"


async def test_bad_frames_on_the_scheduler_socket(tmp_path: Path):
    cluster = await trio.to_thread.run_sync(
        Cluster(tmp_path / "c", schedulers=1, seed_peers=0, peers=0).start
    )
    try:
        url = cluster.node("scheduler-0").info["url"] + "/v1/scheduler"
        host = HostInfo(host_id="test-host", hostname="t", ip="127.0.0.1", upload_port=9)
        credential = cluster.issuer.credential("test-host", "peer")
        nonce = new_nonce()
        hello = scheduler_hello(host, "peer", credential, nonce)
        async with connect(url, hello) as channel:
            await authenticate(channel, credential, nonce)
            ws = channel.ws
            for bad in (b"\xff\x00garbage", encode(hello) + b"trailing", b"\xa1\x61t\x63zzz"):
                await ws.send_message(bad)
                reply = decode(await ws.get_message())
                assert isinstance(reply, Error) and reply.code == "protocol", reply
            # the connection survived all that; an oversize frame ends it
            with pytest.raises(trio_websocket.ConnectionClosed), trio.fail_after(10):
                await ws.send_message(b"\x00" * (2 << 20))
                while True:
                    await ws.get_message()
        # ... and only it: the scheduler still serves others
        nonce = new_nonce()
        async with connect(url, scheduler_hello(host, "peer", credential, nonce)) as channel:
            await authenticate(channel, credential, nonce)
    finally:
        await trio.to_thread.run_sync(cluster.stop)
