"""Settings shown by what they change. Daemons of this process (a scheduler, seed peers,
peers: the real roles, in one trio run) against a real nginx origin, each given a setting
away from its default; tests/unit/test_config_keys.py lists which test shows which key.

Where a setting is a time limit, the test's own bound is far below the default the key
replaces: with the key ignored, that test would fail by running into its bound. Where
it is a rate, the transfer must take at least the time the rate allows (a slower machine
only takes longer)."""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from dragonfly.config import PeerConfig, SchedulerConfig, load_config
from dragonfly.nursery.peer import PeerDaemon
from dragonfly.nursery.scheduler import SchedulerServer
from dragonfly.storage.taskfile import task_path
from dragonfly.testing.nginx import Nginx, free_port
from dragonfly.testing.trust import LocalIssuer
from tests.p2p_support import MiB, curl_response, metric, random_file

pytestmark = [pytest.mark.nginx, pytest.mark.slow]

BOUND = 20.0  # seconds a test waits for an effect; every default it stands against is longer


class Roles:
    """Starts roles in one nursery; `scheduler` is the websocket URL once one runs."""

    def __init__(self, nursery: trio.Nursery, tmp_path: Path) -> None:
        self.nursery = nursery
        self.tmp_path = tmp_path
        self.schedulers: list[str] = []
        self.issuer = LocalIssuer(tmp_path / "trust")  # a cluster secret, a credential each

    async def scheduler(self, *overrides: str) -> SchedulerServer:
        cfg = load_config(
            "scheduler",
            env={},
            overrides=["server.port=0", *self.issuer.scheduler_overrides(), *overrides],
        )
        assert isinstance(cfg, SchedulerConfig)
        server = SchedulerServer(cfg)
        port = await self.nursery.start(server.run)
        scheme = "wss" if cfg.server.tls_cert else "ws"
        self.schedulers.append(f"{scheme}://{cfg.server.listen}:{port}")
        return server

    async def peer(self, name: str, *overrides: str, role: str = "peer") -> PeerDaemon:
        """A peer (or seed peer) using the schedulers started so far (none: no scheduler)."""
        data = self.tmp_path / name
        seed = role == "seed-peer" or "seed.enabled=true" in overrides
        cfg = load_config(
            role,
            env={},
            overrides=[
                "proxy.port=0",
                "upload.port=0",
                f"storage.data_dir={data}",
                f"scheduler.addresses={json.dumps(self.schedulers)}",
                *self.issuer.peer_overrides(name, "seed-peer" if seed else "peer"),
                *overrides,
            ],
        )
        assert isinstance(cfg, PeerConfig)
        daemon: PeerDaemon = await self.nursery.start(PeerDaemon(cfg).run)
        return daemon


@asynccontextmanager
async def roles(tmp_path: Path) -> AsyncIterator[Roles]:
    async with trio.open_nursery() as nursery:
        yield Roles(nursery, tmp_path)
        nursery.cancel_scope.cancel()


def proxy(daemon: PeerDaemon) -> str:
    return f"http://127.0.0.1:{daemon.proxy_port}"


async def fetch(daemon: PeerDaemon, url: str, *args: str) -> tuple[int, dict[str, str], bytes]:
    """curl through the daemon's proxy: (status, headers, body); status 0 if it failed."""
    return await trio.to_thread.run_sync(
        functools.partial(curl_response, url, "-x", proxy(daemon), *args)
    )


async def sample(daemon: PeerDaemon, name: str, labels: str = "") -> float:
    url = f"http://127.0.0.1:{daemon.upload_port}/metrics"
    return await trio.to_thread.run_sync(metric, url, name, labels)


async def until(check: Callable[[], object], what: str) -> None:
    """Poll `check` (a function, or an async one) until true, for at most BOUND seconds."""
    deadline = trio.current_time() + BOUND
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if trio.current_time() > deadline:
            raise AssertionError(f"not within {BOUND}s: {what}")
        await trio.sleep(0.1)


# -- where a role listens, and what a peer tells the scheduler about its host ------------


async def test_listeners_and_the_host_section_reach_where_they_are_used(tmp_path: Path):
    """Every listener on the address and port its keys name (127.0.0.2, not the default
    127.0.0.1); the scheduler knows the host by what the peer's keys say."""
    ports = {key: free_port("127.0.0.2") for key in ("server", "proxy", "upload")}
    async with roles(tmp_path) as r:
        server = await r.scheduler("server.listen=127.0.0.2", f"server.port={ports['server']}")
        daemon = await r.peer(
            "p",
            "host.hostname=cfg-host",
            "host.ip=127.0.0.2",
            "host.idc=idc-7",
            "host.location=cn|sh|z1",
            "upload.children_limit=3",
            "seed.enabled=true",
            f"scheduler.addresses=['ws://127.0.0.2:{ports['server']}']",
            "proxy.listen=127.0.0.2",
            f"proxy.port={ports['proxy']}",
            "upload.listen=127.0.0.2",
            f"upload.port={ports['upload']}",
        )
        await until(lambda: bool(server.core.hosts), "the scheduler knows the peer's host")
        (host,) = server.core.hosts.values()
        info = host.info
        assert (info.hostname, info.ip, info.idc, info.location) == (
            "cfg-host",
            "127.0.0.2",
            "idc-7",
            "cn|sh|z1",
        )
        assert (info.upload_limit, info.seed) == (3, True)
        assert (info.upload_port, info.proxy_port) == (ports["upload"], ports["proxy"])
        assert (daemon.upload_port, daemon.proxy_port) == (ports["upload"], ports["proxy"])
        for port in ports.values():
            socket.create_connection(("127.0.0.2", port), timeout=5).close()
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=5)


async def test_components_get_their_timeouts_and_fsync(tmp_path: Path):
    """Keys passed to a component whose own tests show the behaviour (the HTTP client's
    timeouts, the store's fdatasync and its delay): the daemon's component has the
    configured value."""
    async with roles(tmp_path) as r:
        daemon = await r.peer(
            "p",
            "download.connect_timeout=2.5s",
            "download.read_timeout=3.5s",
            "storage.fsync=false",
            "storage.sync_delay=2s",
        )
        client = daemon.origin_client
        assert (client.connect_timeout, client.read_timeout) == (2.5, 3.5)
        assert daemon.store.fsync is False and daemon.store.sync_delay == 2.0


async def test_a_silent_scheduler_is_waited_for_connect_timeout(
    tmp_path: Path, www: Path, nginx: Nginx
):
    """The scheduler's address accepts connections and never answers: a download waits
    scheduler.connect_timeout for it, then goes to the origin. 6.5 s, past the default 5 s:
    the wait must be longer than 6 s."""
    random_file(www / "f.bin", 1000)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"ws://127.0.0.1:{silent.getsockname()[1]}"
        async with roles(tmp_path) as r:
            r.schedulers.append(address)
            daemon = await r.peer("p", "scheduler.connect_timeout=6.5s")
            started = time.monotonic()
            status, _, body = await fetch(daemon, f"{nginx.url}/f.bin")
            elapsed = time.monotonic() - started
            fallbacks = await sample(daemon, "dragonfly_back_to_source_fallbacks_total")
    assert status == 200 and len(body) == 1000 and fallbacks == 1
    assert elapsed > 6.0, f"gave the scheduler up after {elapsed:.2f}s"


# -- going to the origin ------------------------------------------------------------------


async def test_back_to_source_off_fails_rather_than_ask_the_origin(
    tmp_path: Path, www: Path, nginx: Nginx
):
    random_file(www / "f.bin", 1000)
    async with roles(tmp_path) as r:
        off = await r.peer("off", "download.back_to_source=false")
        on = await r.peer("on")
        status, _, body = await fetch(off, f"{nginx.url}/f.bin")
        assert status == 0 or status >= 500, status
        assert nginx.served_bytes("/f.bin") == 0
        status, _, body = await fetch(on, f"{nginx.url}/f.bin")
        assert status == 200 and len(body) == 1000


async def test_back_to_source_rate_limit(tmp_path: Path, www: Path, nginx: Nginx):
    rate, size = 4_000_000, 8 * MiB
    want = random_file(www / "f.bin", size)
    async with roles(tmp_path) as r:
        daemon = await r.peer("p", f"download.back_to_source_rate_limit={rate}")
        started = time.monotonic()
        status, _, body = await fetch(daemon, f"{nginx.url}/f.bin")
        elapsed = time.monotonic() - started
    assert status == 200 and hashlib.sha256(body).hexdigest() == want
    # a quarter second of burst, then the rate: at least (size - burst) / rate
    assert elapsed >= 0.9 * (size - rate / 4) / rate, f"{size} bytes in {elapsed:.2f}s"


async def test_origin_concurrency_one_fetches_one_range_at_a_time(tmp_path: Path, www: Path):
    """nginx limits each response's rate: 16 MiB in four Range requests took 2.1 s here
    one after the other, 0.6 s four at once (the default). One at a time must take more
    than 1.3 s."""
    size = 16 * MiB
    want = random_file(www / "f.bin", size)
    async with roles(tmp_path) as r:
        with Nginx(root=www, workdir=tmp_path / "nginx", limit_rate="4m") as slow:
            daemon = await r.peer("p", "download.origin_concurrency=1")
            started = time.monotonic()
            status, _, body = await fetch(daemon, f"{slow.url}/f.bin")
            elapsed = time.monotonic() - started
    assert status == 200 and hashlib.sha256(body).hexdigest() == want
    assert elapsed > 1.3, f"{size} bytes in {elapsed:.2f}s"


def _ranges(nginx: Nginx) -> list[tuple[int, int]]:
    """The byte ranges the origin served for /f.bin, the 1-byte probe left out."""
    found = []
    for line in nginx.access_log.read_text().splitlines():
        if "/f.bin" in line and '"bytes=' in line and '"bytes=0-0"' not in line:
            first, last = line.rsplit('"bytes=', 1)[1].rstrip('"').split("-")
            found.append((int(first), int(last)))
    return sorted(found)


async def test_a_slow_origin_sends_each_piece_in_slices(tmp_path: Path, www: Path):
    """512 KB/s per connection (nginx lets the first second's worth go at once): a 4 MiB
    piece takes about a second over the default four requests, so every piece comes
    alone, in four 1 MiB slices; the last piece (1 MiB) in one request. Every byte asked
    for once."""
    size = 17 * MiB
    want = random_file(www / "f.bin", size)
    async with roles(tmp_path) as r:
        with Nginx(root=www, workdir=tmp_path / "nginx", limit_rate="512k") as slow:
            daemon = await r.peer("p")
            status, _, body = await fetch(daemon, f"{slow.url}/f.bin")
            ranges = _ranges(slow)
    assert status == 200 and hashlib.sha256(body).hexdigest() == want
    quarters = [(start, start + MiB - 1) for start in range(0, 16 * MiB, MiB)]
    assert ranges == [*quarters, (16 * MiB, size - 1)]


async def test_a_fast_origin_sends_pieces_side_by_side(tmp_path: Path, www: Path, nginx: Nginx):
    """The first piece comes in slices (the origin's rate is not known yet); a local
    nginx is fast, so the rest come whole, side by side. Every byte asked for once."""
    size = 24 * MiB
    want = random_file(www / "f.bin", size)
    async with roles(tmp_path) as r:
        daemon = await r.peer("p")
        status, _, body = await fetch(daemon, f"{nginx.url}/f.bin")
    assert status == 200 and hashlib.sha256(body).hexdigest() == want
    ranges = _ranges(nginx)
    assert ranges[:4] == [(start, start + MiB - 1) for start in range(0, 4 * MiB, MiB)]
    assert all(last - first + 1 in (MiB, 4 * MiB) for first, last in ranges)
    assert sum(last - first + 1 for first, last in ranges) == size
    assert any(last - first + 1 == 4 * MiB for first, last in ranges)


# -- peer to peer -------------------------------------------------------------------------


async def test_download_rate_limit_holds_peer_to_peer(tmp_path: Path, www: Path, nginx: Nginx):
    rate, size = 4_000_000, 8 * MiB
    want = random_file(www / "f.bin", size)
    async with roles(tmp_path) as r:
        await r.scheduler()
        await r.peer("seed", role="seed-peer")
        daemon = await r.peer("p", f"download.rate_limit={rate}")
        started = time.monotonic()
        status, _, body = await fetch(daemon, f"{nginx.url}/f.bin")
        elapsed = time.monotonic() - started
        p2p = await sample(daemon, "dragonfly_download_bytes_total", 'source="p2p"')
    assert status == 200 and hashlib.sha256(body).hexdigest() == want
    assert p2p == size
    assert elapsed >= 0.9 * (size - rate / 4) / rate, f"{size} bytes in {elapsed:.2f}s"


async def test_concurrent_piece_count_one_asks_one_piece_at_a_time(
    tmp_path: Path, www: Path, nginx: Nginx
):
    """Every peer here sends one piece at a time and refuses a second request at once
    (503) when another child holds one. A peer with concurrent_piece_count = 1 never
    meets a refusal; then two with the default count ask their parents for several
    pieces at once, side by side, and do."""
    random_file(www / "f.bin", 12 * MiB)  # three pieces
    url = f"{nginx.url}/f.bin"
    refusals = "dragonfly_upload_busy_refusals_total"
    one_at_a_time = ["upload.concurrent_limit=1", "upload.queue_limit=0", "upload.rate_limit=8MB/s"]
    async with roles(tmp_path) as r:
        await r.scheduler()
        seed = await r.peer("seed", *one_at_a_time, role="seed-peer")
        assert (await fetch(seed, url))[0] == 200  # the seed holds the file
        one = await r.peer("one", "download.concurrent_piece_count=1", *one_at_a_time)
        assert (await fetch(one, url))[0] == 200
        assert await sample(one, "dragonfly_download_bytes_total", 'source="p2p"') == 12 * MiB
        assert await sample(seed, refusals) == 0
        a = await r.peer("a", *one_at_a_time)
        b = await r.peer("b", *one_at_a_time)
        statuses: list[int] = []

        async def fetched(daemon: PeerDaemon) -> None:
            statuses.append((await fetch(daemon, url))[0])

        async with trio.open_nursery() as clients:
            for daemon in (a, b):
                clients.start_soon(fetched, daemon)
        assert statuses == [200, 200]
        met = await sample(seed, refusals) + await sample(one, refusals)
        assert met >= 1, "two children never asked one parent at once: the test shows nothing"


async def test_a_parent_with_one_child_queues_its_requests(
    tmp_path: Path, www: Path, nginx: Nginx
):
    """The limits follow demand (dragonfly/engine/admission.py): a child with one parent
    asks it for all three pieces at once (its share of concurrent_piece_count: up to
    twice per_parent_limit), and the parent, whose only child it is, queues the third
    behind its two slots instead of answering "busy" as it would with no queue and
    another child asking."""
    random_file(www / "f.bin", 12 * MiB)  # three pieces
    url = f"{nginx.url}/f.bin"
    no_queue = ["upload.concurrent_limit=2", "upload.queue_limit=0", "upload.rate_limit=8MB/s"]
    async with roles(tmp_path) as r:
        await r.scheduler()
        seed = await r.peer("seed", *no_queue, role="seed-peer")
        assert (await fetch(seed, url))[0] == 200
        child = await r.peer("child")
        assert (await fetch(child, url))[0] == 200
        assert await sample(child, "dragonfly_download_bytes_total", 'source="p2p"') == 12 * MiB
        assert await sample(seed, "dragonfly_upload_busy_refusals_total") == 0


async def test_a_piece_slower_than_piece_timeout_is_given_up(
    tmp_path: Path, www: Path, nginx: Nginx
):
    """The seed sends at 64 kB/s, so one 4 MiB piece would take a minute: the peer gives
    the piece up after download.piece_timeout (1 s; the default 30 s is past BOUND)."""
    random_file(www / "f.bin", 8 * MiB)
    async with roles(tmp_path) as r:
        await r.scheduler()
        await r.peer("seed", "upload.rate_limit=64kB/s", role="seed-peer")
        daemon = await r.peer("p", "download.piece_timeout=1s")
        async with trio.open_nursery() as clients:
            clients.start_soon(fetch, daemon, f"{nginx.url}/f.bin")
            failures = "dragonfly_piece_failures_total"
            await until(lambda: sample(daemon, failures, 'reason="timeout"'), "a piece timed out")
            clients.cancel_scope.cancel()


# -- the proxy ----------------------------------------------------------------------------


async def test_allow_credentials_lets_a_request_with_credentials_use_p2p(
    tmp_path: Path, www: Path, nginx: Nginx
):
    random_file(www / "f.bin", 1000)
    rule = "proxy.rules=[{regex = '^http://', allow_credentials = true}]"
    async with roles(tmp_path) as r:
        allowed = await r.peer("allowed", rule)
        default = await r.peer("default")
        for daemon, p2p in ((allowed, True), (default, False)):
            status, head, _ = await fetch(daemon, f"{nginx.url}/f.bin", "-u", "a:b")
            assert status == 200
            assert ("x-dragonfly-task-id" in head) is p2p


async def test_prefetch_fetches_the_whole_file_for_a_range(tmp_path: Path, www: Path, nginx: Nginx):
    size = 12 * MiB
    random_file(www / "f.bin", size)
    origin = 'source="back_to_source"'
    async with roles(tmp_path) as r:
        whole = await r.peer("whole", "proxy.prefetch=true")
        part = await r.peer("part")
        for daemon in (whole, part):
            status, _, body = await fetch(daemon, f"{nginx.url}/f.bin", "-r", "0-9")
            assert status == 206 and len(body) == 10

        async def whole_file_fetched() -> bool:
            return await sample(whole, "dragonfly_download_bytes_total", origin) == size

        await until(whole_file_fetched, "the rest of the file was fetched")
        # without prefetch, just the piece the range lies in
        assert await sample(part, "dragonfly_download_bytes_total", origin) == 4 * MiB


# -- the store ----------------------------------------------------------------------------


async def test_task_ttl_and_gc_interval_remove_unused_tasks(
    tmp_path: Path, www: Path, nginx: Nginx
):
    random_file(www / "f.bin", 1000)
    async with roles(tmp_path) as r:
        daemon = await r.peer("p", "storage.task_ttl=1s", "storage.gc_interval=200ms")
        status, head, _ = await fetch(daemon, f"{nginx.url}/f.bin")
        assert status == 200
        path = task_path(daemon.data_dir, head["x-dragonfly-task-id"])
        assert path.exists()
        await until(lambda: not path.exists(), "the unused task is removed")


async def test_disk_quota_and_watermarks_evict_the_least_recently_used(
    tmp_path: Path, www: Path, nginx: Nginx
):
    """Quota 8 MiB, high 0.6 (4.8 MiB), low 0.4 (3.2 MiB): two 3 MiB tasks cross the high
    watermark, and the older one goes."""
    for name in ("a.bin", "b.bin"):
        random_file(www / name, 3 * MiB)
    async with roles(tmp_path) as r:
        daemon = await r.peer(
            "p",
            "storage.disk_quota=8MiB",
            "storage.high_watermark=0.6",
            "storage.low_watermark=0.4",
            "storage.gc_interval=200ms",
        )
        paths = []
        for name in ("a.bin", "b.bin"):
            status, head, _ = await fetch(daemon, f"{nginx.url}/{name}")
            assert status == 200
            paths.append(task_path(daemon.data_dir, head["x-dragonfly-task-id"]))
        older, newer = paths
        await until(lambda: not older.exists(), "the older task is evicted")
        assert newer.exists()


# -- the registry mirror ------------------------------------------------------------------


async def test_auth_cache_ttl_is_how_long_a_registrys_yes_is_reused(tmp_path: Path, www: Path):
    """Each peer pulls a blob twice. With auth_cache_ttl = 0 the registry is asked (HEAD)
    both times; with the default, once."""
    data = os.urandom(1000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blob = www / "v2" / "team" / "app" / "blobs" / digest
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    with Nginx(root=www, workdir=tmp_path / "registry") as registry:
        upstream = f"registry_mirror.upstream={registry.url}"

        def heads() -> int:
            log = registry.access_log.read_text() if registry.access_log.exists() else ""
            return sum(f'"HEAD /v2/team/app/blobs/{digest}' in line for line in log.splitlines())

        async with roles(tmp_path) as r:
            asked = []
            for name, extra in (("zero", ["registry_mirror.auth_cache_ttl=0"]), ("default", [])):
                daemon = await r.peer(name, upstream, *extra)
                before = heads()
                for _ in range(2):
                    status, _, body = await trio.to_thread.run_sync(
                        curl_response, f"{proxy(daemon)}/v2/team/app/blobs/{digest}"
                    )
                    assert status == 200 and body == data
                asked.append(heads() - before)
    assert asked == [2, 1]
