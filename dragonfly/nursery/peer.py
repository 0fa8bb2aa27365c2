"""`--role peer` and `--role seed-peer`: the peer daemon's nursery tree."""

from __future__ import annotations

import trio

from dragonfly.config import PeerConfig
from dragonfly.nursery.signals import run_until_signal
from dragonfly.peer.daemon import PeerDaemon


def run_peer(cfg: PeerConfig) -> int:
    async def main(nursery: trio.Nursery) -> None:
        await nursery.start(PeerDaemon(cfg).run)

    trio.run(run_until_signal, main)
    return 0
