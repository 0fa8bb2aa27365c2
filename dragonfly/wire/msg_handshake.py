"""The handshake and either-direction messages: Hello (with ``check_version``, which
negotiates the protocol version), Proof, Error, Ping and Pong."""

from dataclasses import dataclass

from dragonfly.wire.codec import (
    MIN_PROTOCOL_VERSION,
    PROTOCOL_VERSION,
    Message,
    ProtocolError,
    limits,
    message,
)
from dragonfly.wire.records import (
    NONCE_MAX,
    PROOF_LEN,
    REASON_MAX,
    ROLES,
    Claims,
    HostInfo,
)

# ---------------------------------------------------------------------------
# Handshake and either-direction messages
# ---------------------------------------------------------------------------


@message("hello")
@dataclass(frozen=True, slots=True)
class Hello(Message):
    """First message on every websocket, both directions: versions spoken, role, host.

    A peer's Hello to the scheduler carries its HostInfo and the claims of its credential
    (never its key); the scheduler's and a parent's carry none. ``nonce`` is fresh for
    each connection: the Proofs that follow are made over both sides' nonces.
    """

    version: int = limits(min=1, max=2**16)  # highest version spoken
    min_version: int = limits(min=1, max=2**16)  # lowest version spoken
    role: str = limits(choices=ROLES)
    host: HostInfo | None = None
    nonce: bytes = limits(default=b"", max_len=NONCE_MAX)
    claims: Claims | None = None


def check_version(
    hello: Hello, *, local_min: int = MIN_PROTOCOL_VERSION, local_max: int = PROTOCOL_VERSION
) -> int:
    """Return the version both sides speak (the lower maximum) or say why there is none."""
    if hello.min_version > hello.version:
        raise ProtocolError(
            f"peer sent an empty version range {hello.min_version}..{hello.version}",
            ref=Hello.TAG,
        )
    if hello.min_version > local_max or hello.version < local_min:
        raise ProtocolError(
            f"peer speaks protocol {hello.min_version}..{hello.version}, "
            f"this side {local_min}..{local_max}",
            ref=Hello.TAG,
        )
    return min(hello.version, local_max)


@message("proof")
@dataclass(frozen=True, slots=True)
class Proof(Message):
    """After the Hellos, on the scheduler websocket: the peer proves it holds the host key
    of its claims, then the scheduler proves it could compute that key (trust.py)."""

    proof: bytes = limits(len=PROOF_LEN)


@message("error")
@dataclass(frozen=True, slots=True)
class Error(Message):
    """Either direction: the receiver could not accept a message; the connection goes on
    (unless the code is "version"). ``ref`` is the offending message type, if known."""

    code: str = limits(min_len=1, max_len=64)
    message: str = limits(default="", max_len=REASON_MAX)
    ref: str = limits(default="", max_len=64)


@message("ping")
@dataclass(frozen=True, slots=True)
class Ping(Message):
    """Either direction: application keepalive; answered by a Pong with the same nonce."""

    nonce: int = limits(min=0, max=2**64 - 1)


@message("pong")
@dataclass(frozen=True, slots=True)
class Pong(Message):
    """Answer to Ping."""

    nonce: int = limits(min=0, max=2**64 - 1)
