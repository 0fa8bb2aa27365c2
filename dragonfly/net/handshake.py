"""The host's side of the cluster-credential handshake, after the Hellos (the scheduler
websocket and the manager's use the same; dragonfly/trust.py has the proofs).

The host proves it holds the key of its claims; the other side answers with a proof
made with that key, which only a holder of the cluster secret can compute. Nothing
else goes to a side that cannot prove it.
"""

from __future__ import annotations

import trio

from dragonfly.net.channel import HANDSHAKE_TIMEOUT, Channel
from dragonfly.trust import Credential, TrustError, check_proof, peer_proof, scheduler_proof
from dragonfly.wire.messages import Error, Proof


async def authenticate(
    channel: Channel,
    credential: Credential,
    nonce: bytes,
    *,
    timeout: float = HANDSHAKE_TIMEOUT,
    who: str = "scheduler",
) -> None:
    """Prove this host's credential, then check the proof of `who` on the other end.
    TrustError if it refuses this host or cannot prove itself."""
    theirs = channel.peer_hello
    assert theirs is not None
    key = credential.host_key
    await channel.send(Proof(proof=peer_proof(key, nonce, theirs.nonce, credential.claims)))
    with trio.fail_after(timeout):
        answer = await channel.receive()
    if isinstance(answer, Error):
        raise TrustError("refused", f"the {who} refused this host: {answer.message}")
    if not isinstance(answer, Proof):
        raise TrustError("proof", f"expected the {who}'s proof, got {answer.TAG}")
    check_proof(scheduler_proof(key, nonce, theirs.nonce), answer.proof, who)
