"""Issue #11 item 4: private files. A presigned URL's task (its signature is left out of
the ID) reaches only clients whose own request the origin accepts; the same for a
header named in proxy.credential_headers; and no upload port serves a piece or its
announcements to anyone without a ticket for that task."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio_websocket

from dragonfly.cluster import Cluster
from dragonfly.config import PeerConfig, load_config
from dragonfly.nursery.peer import PeerDaemon
from dragonfly.testing.nginx import Nginx
from dragonfly.trust import Ticket
from dragonfly.wire.codec import decode, encode
from dragonfly.wire.messages import (
    AnnounceDone,
    Error,
    PieceAnnounce,
    Subscribe,
)
from tests.p2p_support import MiB, curl_response, random_file, sha256_file
from tests.security.support import hello

pytestmark = [pytest.mark.nginx, pytest.mark.slow]

# The origin: /private/ answers only a request signed "good" (as S3 checks a presigned
# URL's signature), /keyed/ only X-Api-Key: k1.
ORIGIN_CONF = """
    location /private/ { if ($arg_Signature != "good") { return 403; } }
    location /keyed/ { if ($http_x_api_key != "k1") { return 403; } }
"""


@pytest.fixture
def origin(tmp_path: Path, www: Path) -> Iterator[tuple[Nginx, dict[str, str]]]:
    (www / "private").mkdir()
    (www / "keyed").mkdir()
    files = {
        "private/p.bin": random_file(www / "private" / "p.bin", 9 * MiB),
        "keyed/k.bin": random_file(www / "keyed" / "k.bin", 3 * MiB),
    }
    with Nginx(root=www, workdir=tmp_path / "nginx", extra_server_conf=ORIGIN_CONF) as nginx:
        yield nginx, files


def _get(proxy: str, url: str, out: Path, *headers: str) -> tuple[int, dict[str, str]]:
    args = ["-x", proxy, "-o", str(out)]
    for h in headers:
        args += ["-H", h]
    status, hdrs, _ = curl_response(url, *args)
    return status, hdrs


def test_item4_a_presigned_urls_task_reaches_only_clients_the_origin_accepts(
    tmp_path: Path, origin: tuple[Nginx, dict[str, str]]
) -> None:
    nginx, files = origin
    signed = f"{nginx.url}/private/p.bin?Expires=1&Signature=good"
    extra = ["--set", "proxy.credential_headers=['X-Api-Key']"]
    with Cluster(tmp_path / "c", schedulers=1, seed_peers=1, peers=2, extra=extra) as cluster:
        first, second = (cluster.node(f"peer-{i}").info["proxy"] for i in range(2))
        status, headers = _get(first, signed, tmp_path / "ok")
        assert status == 200 and sha256_file(tmp_path / "ok") == files["private/p.bin"]
        task = headers["x-dragonfly-task-id"]
        # Unsigned, or wrongly signed, through the other peer and through the one that
        # holds every byte: the origin's 403, never the file.
        for proxy in (second, first):
            for url in (
                f"{nginx.url}/private/p.bin",
                f"{nginx.url}/private/p.bin?Expires=1&Signature=bad",
            ):
                status, _ = _get(proxy, url, tmp_path / "refused")
                assert status == 403, (proxy, url)
                assert (
                    not (tmp_path / "refused").exists()
                    or (tmp_path / "refused").stat().st_size < 1024
                )
        # A rightly signed request through the second peer gets it, peer-to-peer.
        status, headers = _get(second, signed, tmp_path / "ok2")
        assert status == 200 and headers["x-dragonfly-task-id"] == task
        assert sha256_file(tmp_path / "ok2") == files["private/p.bin"]

        # A header the configuration names as a credential makes a task private too.
        keyed = f"{nginx.url}/keyed/k.bin"
        status, _ = _get(first, keyed, tmp_path / "k-ok", "X-Api-Key: k1")
        assert status == 200 and sha256_file(tmp_path / "k-ok") == files["keyed/k.bin"]
        for proxy in (second, first):
            for wrong in ("X-Api-Key: k2", "X-Other: 1"):
                assert _get(proxy, keyed, tmp_path / "k-no", wrong)[0] == 403, (proxy, wrong)


async def test_item4_upload_ports_serve_nothing_without_a_ticket(
    tmp_path: Path, origin: tuple[Nginx, dict[str, str]]
) -> None:
    """A piece GET and a Subscribe without a ticket, with another task's or another
    host's ticket, or an expired one, are refused; the scheduler's kind is served."""
    nginx, _ = origin
    signed = f"{nginx.url}/private/p.bin?Expires=1&Signature=good"
    cluster = await trio.to_thread.run_sync(
        Cluster(tmp_path / "c", schedulers=1, seed_peers=1, peers=1).start
    )
    try:
        peer = cluster.node("peer-0")
        status, headers = await trio.to_thread.run_sync(
            lambda: _get(peer.info["proxy"], signed, tmp_path / "ok")
        )
        assert status == 200
        task = headers["x-dragonfly-task-id"]
        good = cluster.ticket_header(task, "peer-0")
        expired = cluster.ticket_header(task, "peer-0", ttl=-5)
        wrong_task = cluster.ticket_header("0" * 64, "peer-0")
        wrong_host = cluster.ticket_header(task, "seed-peer-0")  # made for another parent
        piece = f"{peer.info['upload']}/pieces/{task}/0"

        async def code(*headers: str) -> int:
            args = ["curl", "-s", "-o", str(tmp_path / "piece"), "-w", "%{http_code}"]
            for h in headers:
                args += ["-H", h]
            out = await trio.run_process([*args, piece], capture_stdout=True)
            return int(out.stdout)

        assert await code() == 403
        for bad in (expired, wrong_task, wrong_host, "1 AAAA x", f"{good[:-1]}Z"):
            assert await code(f"x-dragonfly-ticket: {bad}") == 403, bad
        assert await code(f"x-dragonfly-ticket: {good}") == 200  # (the control)
        assert (tmp_path / "piece").stat().st_size == 4 * MiB

        announce = peer.info["upload"].replace("http://", "ws://") + "/v1/announce"

        async def subscribe(ticket: str | None) -> list[object]:
            t = Ticket.from_header(ticket) if ticket else None
            msg = Subscribe(
                task_id=task,
                peer_id="x-1",
                host_id=t.child_host_id if t else "",
                ticket=t.mac if t else b"",
                expires_at=t.expires_at if t else 0,
            )
            got: list[object] = []
            with trio.move_on_after(10):
                async with trio_websocket.open_websocket_url(announce) as ws:
                    await ws.send_message(encode(hello(None)))
                    await ws.send_message(encode(msg))
                    try:
                        while True:
                            m = decode(await ws.get_message())
                            got.append(m)
                            if isinstance(m, (AnnounceDone, Error)):
                                break
                    except trio_websocket.ConnectionClosed:
                        pass
            return got

        for bad in (None, expired, wrong_task, wrong_host):
            answers = await subscribe(bad)
            assert not any(isinstance(m, PieceAnnounce) for m in answers), bad
            errors = [m for m in answers if isinstance(m, Error)]
            assert errors and errors[0].code == "forbidden", (bad, answers)
        answers = await subscribe(good)
        assert any(isinstance(m, PieceAnnounce) for m in answers), answers
    finally:
        await trio.to_thread.run_sync(cluster.stop)


async def test_the_origins_yes_is_remembered_private_check_ttl(
    tmp_path: Path, origin: tuple[Nginx, dict[str, str]]
) -> None:
    """A client's yes from the origin is reused for proxy.private_check_ttl (per URL and
    credential), never longer: with 0 every request asks again."""
    nginx, files = origin
    signed = f"{nginx.url}/private/p.bin?Expires=1&Signature=good"

    def heads() -> int:
        return sum(
            1 for line in nginx.access_log.read_text().splitlines() if '"HEAD /private/' in line
        )

    for ttl, asked in (("1h", 1), ("0s", 2)):
        cfg = load_config(
            "peer",
            env={},
            overrides=[
                "scheduler.addresses=[]",
                "proxy.port=0",
                "upload.port=0",
                f"storage.data_dir={tmp_path / ttl}",
                f"proxy.private_check_ttl={ttl}",
            ],
        )
        assert isinstance(cfg, PeerConfig)
        async with trio.open_nursery() as nursery:
            daemon = await nursery.start(PeerDaemon(cfg).run)
            proxy = f"http://127.0.0.1:{daemon.proxy_port}"
            before = heads()
            for i in range(2):
                out = tmp_path / f"{ttl}-{i}"
                status, _ = await trio.to_thread.run_sync(_get, proxy, signed, out)
                assert status == 200 and sha256_file(out) == files["private/p.bin"]
            assert heads() - before == asked, ttl
            nursery.cancel_scope.cancel()
