"""What no schedule can beat: the fluid lower bound on the time to serve a swarm.

Kumar & Ross ("Peer-assisted file distribution", 2006): N peers want a file of F bytes
from a server of upload U_o; the peers upload at U_p each (here M seed peers upload too
and want nothing); every peer downloads at most D.  The last peer cannot finish before

    T_min = max(F / U_o,  F / D,  N·F / (U_o + (N + M)·U_p))

(the server must send every byte once; one peer must receive every byte; N copies must
cross the uplinks).  The bound is fluid: bytes move in arbitrarily small bits.  With k
pieces of equal size and N peers of equal upload, a piece cannot reach N peers in fewer
than log2(N) piece-times, so no piece-based schedule beats ``(1 + log2(N)/k) · T_min``
(``piece_factor``); an efficiency close to 1/piece_factor is as good as it gets.
"""

from __future__ import annotations

import math

__all__ = ["fluid_bound", "piece_factor"]


def fluid_bound(
    peers: int,
    size: int,
    origin_up: float,
    peer_up: float,
    peer_down: float | None = None,
    seed_peers: int = 0,
) -> float:
    """T_min in seconds for ``peers`` downloaders of ``size`` bytes (rates in bytes/s)."""
    if peers < 1:
        raise ValueError(f"peers must be >= 1, got {peers}")
    if seed_peers < 0:
        raise ValueError(f"seed_peers must be >= 0, got {seed_peers}")
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    if origin_up <= 0 or peer_up < 0 or (peer_down is not None and peer_down <= 0):
        raise ValueError("origin_up and peer_down must be positive, peer_up non-negative")
    bound = max(size / origin_up, peers * size / (origin_up + (peers + seed_peers) * peer_up))
    if peer_down is not None:
        bound = max(bound, size / peer_down)
    return bound


def piece_factor(peers: int, pieces: int) -> float:
    """``1 + log2(N)/k``: how far above T_min even a perfect piece schedule ends."""
    if peers < 1 or pieces < 1:
        raise ValueError("peers and pieces must be >= 1")
    return 1.0 + math.log2(peers) / pieces
