"""Digests only from those trusted for them: a member with a valid credential that
fetches a task from the origin first and reports made-up pieces (digests matching the
bytes it serves) cannot make another peer keep bytes that differ from the origin's.
Without seed peers its word is checked by a second origin fetch on another host, and
by a third when the two disagree; then the liar is never handed out as a parent."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from dragonfly.cluster import Cluster
from dragonfly.testing.nginx import Nginx
from tests.faults.liar import SourceLiar
from tests.p2p_support import MiB, curl, finish, metric, random_file, sha256_file

pytestmark = [pytest.mark.nginx, pytest.mark.slow]


async def test_a_lying_origin_fetcher_cannot_make_peers_keep_other_bytes(
    tmp_path: Path, www: Path, nginx: Nginx
) -> None:
    size = 12 * MiB + 3
    want = random_file(www / "f.bin", size)
    url = f"{nginx.url}/f.bin"
    cluster = await trio.to_thread.run_sync(
        Cluster(tmp_path / "c", schedulers=1, seed_peers=0, peers=3).start
    )
    try:
        scheduler = cluster.node("scheduler-0").info["url"]
        liar = SourceLiar(scheduler, url, size, cluster.issuer.credential("liar", "peer"))
        async with trio.open_nursery() as nursery:
            with trio.fail_after(30):
                await nursery.start(liar.run)
            assert liar.sent_to_origin, "the liar was not the first fetcher: it proves nothing"
            for i in range(3):
                peer = cluster.node(f"peer-{i}")
                out = tmp_path / f"out-{i}"
                code, err = await trio.to_thread.run_sync(
                    lambda p=peer, o=out: finish(curl(p.info["proxy"], url, o))
                )
                assert code == 0, err
                assert sha256_file(out) == want, f"{peer.name} kept bytes that are not the origin's"
            nursery.cancel_scope.cancel()
        assert liar.served == 0  # nobody was ever sent to it for a piece
        sources = [
            metric(cluster.node(f"peer-{i}").info["metrics"], "dragonfly_download_bytes_total",
                   'source="back_to_source"')
            for i in range(3)
        ]  # fmt: skip
        # Two witnesses went to the origin; the third peer got the file peer-to-peer.
        assert sources[0] == sources[1] == size and sources[2] == 0
        p2p = metric(
            cluster.node("peer-2").info["metrics"], "dragonfly_download_bytes_total", 'source="p2p"'
        )
        assert p2p == size
    finally:
        await trio.to_thread.run_sync(cluster.stop)
