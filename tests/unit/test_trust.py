"""Cluster identity (dragonfly/trust.py): the canonical encoding of claims, host keys,
the handshake's proofs and tickets. Whatever changes (a claim, a byte of a key, a
nonce, a ticket field), verification fails."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dragonfly.trust import (
    TICKET_LEN,
    ClusterKey,
    SecretRing,
    Ticket,
    TicketKey,
    TrustError,
    Verifier,
    canonical,
    check_proof,
    derive_host_key,
    issue,
    peer_proof,
    scheduler_proof,
)
from dragonfly.wire.codec import decode, encode
from dragonfly.wire.messages import Claims, Hello, Proof

NOW = 1_800_000_000.0
RING = SecretRing("test-cluster", (ClusterKey("k1", b"\x01" * 32), ClusterKey("k0", b"\x02" * 32)))

names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,20}", fullmatch=True)
times = st.integers(min_value=0, max_value=2**40)
claims_st = st.builds(
    Claims,
    cluster=names,
    host_id=names,
    role=st.sampled_from(["peer", "seed-peer"]),
    issued_at=times,
    expires_at=times,
    key_id=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,10}", fullmatch=True),
)


def _changed(claims: Claims, field: str, value: object) -> Claims:
    return dataclasses.replace(claims, **{field: value})


@given(claims_st, claims_st)
def test_canonical_encoding_is_one_to_one(a: Claims, b: Claims) -> None:
    assert (canonical(a) == canonical(b)) == (a == b)


@given(claims_st, st.data())
def test_any_change_of_a_claim_changes_the_host_key(claims: Claims, data: st.DataObject) -> None:
    field = data.draw(st.sampled_from([f.name for f in dataclasses.fields(Claims)]))
    old = getattr(claims, field)
    new = data.draw(
        (times if isinstance(old, int) else names).filter(lambda v: v != old)
        if field != "role"
        else st.just("seed-peer" if old == "peer" else "peer")
    )
    secret = b"s" * 32
    assert derive_host_key(secret, _changed(claims, field, new)) != derive_host_key(secret, claims)


def test_a_verifier_recomputes_the_issued_key_and_refuses_what_it_cannot() -> None:
    credential = issue(RING, host_id="peer-1", role="peer", now=NOW, ttl=3600)
    verifier = Verifier(RING)
    assert verifier.host_key(credential.claims, NOW + 10) == credential.host_key
    # A key made under the previous secret still verifies after a rotation.
    old = issue(
        SecretRing("test-cluster", RING.keys[1:]), host_id="p", role="peer", now=NOW, ttl=60
    )
    assert verifier.host_key(old.claims, NOW) == old.host_key
    cases = {
        "expired": credential.claims,
        "cluster": _changed(credential.claims, "cluster", "other"),
        "unknown_key": _changed(credential.claims, "key_id", "k9"),
        "not_yet_valid": _changed(credential.claims, "issued_at", int(NOW) + 3600),
        "malformed": _changed(credential.claims, "host_id", "bad host"),
    }
    for reason, claims in cases.items():
        with pytest.raises(TrustError) as info:
            verifier.host_key(claims, NOW + 3600 if reason == "expired" else NOW)
        assert info.value.reason == reason, (reason, str(info.value))


def test_a_revoked_hosts_credentials_issued_until_then_are_refused() -> None:
    verifier = Verifier(RING)
    before = issue(RING, host_id="peer-1", role="peer", now=NOW, ttl=3600)
    later = issue(RING, host_id="peer-1", role="peer", now=NOW + 60, ttl=3600)
    other = issue(RING, host_id="peer-2", role="peer", now=NOW, ttl=3600)
    assert verifier.host_key(before.claims, NOW + 61) == before.host_key  # cached now
    verifier.revoked = {"peer-1": int(NOW)}
    with pytest.raises(TrustError) as info:
        verifier.host_key(before.claims, NOW + 61)
    assert info.value.reason == "revoked" and "peer-1" in str(info.value)
    assert verifier.host_key(later.claims, NOW + 61) == later.host_key  # issued after
    assert verifier.host_key(other.claims, NOW + 61) == other.host_key
    scheduler = issue(RING, host_id="sched-1", role="scheduler", now=NOW, ttl=60)
    assert verifier.host_key(scheduler.claims, NOW) == scheduler.host_key


def test_issue_refuses_bad_input_and_rotation_keeps_older_keys() -> None:
    with pytest.raises(TrustError, match="host ID"):
        issue(RING, host_id="a b", role="peer", now=NOW, ttl=60)
    with pytest.raises(TrustError, match="role"):
        issue(RING, host_id="a", role="manager", now=NOW, ttl=60)
    with pytest.raises(TrustError, match="positive"):
        issue(RING, host_id="a", role="peer", now=NOW, ttl=0)
    rotated = RING.rotated(keep=1)
    assert rotated.keys[1:] == RING.keys[:1] and rotated.current.key_id not in ("k0", "k1")
    assert len(RING.rotated(keep=5).keys) == 3
    with pytest.raises(TrustError):
        SecretRing("c", (ClusterKey("a", b"x" * 32), ClusterKey("a", b"y" * 32)))
    with pytest.raises(TrustError):
        ClusterKey("a", b"short")
    assert repr(RING.current) == "ClusterKey(key_id='k1')"  # no secret in logs
    credential = issue(RING, host_id="a", role="peer", now=NOW, ttl=60)
    assert credential.host_key.hex() not in repr(credential)


nonces = st.binary(min_size=0, max_size=64)


@given(nonces, nonces, st.data())
def test_proofs_bind_key_nonces_claims_and_direction(
    peer_nonce: bytes, sched_nonce: bytes, data: st.DataObject
) -> None:
    credential = issue(RING, host_id="h", role="peer", now=NOW, ttl=60)
    key, claims = credential.host_key, credential.claims
    good = peer_proof(key, peer_nonce, sched_nonce, claims)
    check_proof(peer_proof(key, peer_nonce, sched_nonce, claims), good, "peer")
    other_nonce = data.draw(nonces.filter(lambda n: n != peer_nonce))
    other_key = bytes([key[0] ^ 1]) + key[1:]
    for wrong in (
        peer_proof(other_key, peer_nonce, sched_nonce, claims),
        peer_proof(key, other_nonce, sched_nonce, claims),
        peer_proof(key, sched_nonce, peer_nonce, claims) if peer_nonce != sched_nonce else b"",
        peer_proof(key, peer_nonce, sched_nonce, _changed(claims, "role", "seed-peer")),
        scheduler_proof(key, peer_nonce, sched_nonce),  # a scheduler's is no peer's
    ):
        with pytest.raises(TrustError) as info:
            check_proof(good, wrong, "peer")
        assert info.value.reason == "proof"


@given(
    st.text(min_size=1, max_size=64),
    names,
    names,
    st.integers(min_value=1, max_value=2**40),
    st.data(),
)
def test_tickets_verify_only_as_minted(
    task: str, child: str, parent: str, expires: int, data: st.DataObject
) -> None:
    key = TicketKey(b"k" * 32)
    mac = key.mint(task, child, parent, expires)
    assert len(mac) == TICKET_LEN
    ticket = Ticket(child, expires, mac)
    key.verify(ticket, task, parent, expires - 1)
    assert Ticket.from_header(ticket.header()) == ticket
    with pytest.raises(TrustError) as info:
        key.verify(ticket, task, parent, expires)
    assert info.value.reason == "ticket_expired"
    flip = data.draw(st.integers(min_value=0, max_value=TICKET_LEN * 8 - 1))
    tampered = bytearray(mac)
    tampered[flip // 8] ^= 1 << (flip % 8)
    wrong = [
        (Ticket(child, expires, bytes(tampered)), task, parent),
        (Ticket(child, expires + 1, mac), task, parent),
        (Ticket(child + "x", expires, mac), task, parent),
        (ticket, task + "x", parent),
        (ticket, task, parent + "x"),
    ]
    for candidate, t, p in wrong:
        with pytest.raises(TrustError) as info:
            key.verify(candidate, t, p, 0)
        assert info.value.reason == "ticket"
    with pytest.raises(TrustError):
        TicketKey(b"j" * 32).verify(ticket, task, parent, 0)


@pytest.mark.parametrize(
    "header",
    ["", "x y z", "123", "123 AAAA h", "-5 " + "A" * 22 + " h", "1 " + "A" * 22 + " bad host!"],
)
def test_malformed_ticket_headers_are_refused(header: str) -> None:
    with pytest.raises(TrustError, match="malformed ticket"):
        Ticket.from_header(header)


def test_hello_claims_and_proof_round_trip_on_the_wire() -> None:
    credential = issue(RING, host_id="h", role="seed-peer", now=NOW, ttl=60)
    hello = Hello(
        version=3, min_version=3, role="seed-peer", nonce=b"n" * 32, claims=credential.claims
    )
    assert decode(encode(hello)) == hello
    assert decode(encode(Proof(proof=b"p" * 32))) == Proof(proof=b"p" * 32)
    assert credential.host_key.hex() not in encode(hello).hex()  # the key never travels
