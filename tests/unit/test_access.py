"""The proxy's access rules (sans-I/O) and the configuration keys behind them."""

from __future__ import annotations

import base64
import ipaddress
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dragonfly.config import ConfigError, PeerConfig, ProxySection, load_config
from dragonfly.engine.access import (
    AccessPolicy,
    basic_credentials,
    client_ip,
    ip_of,
    networks,
    parse_users,
)
from dragonfly.peer.exposure import ProxyUsers, check_proxy_files, write_user

REMOTE = ipaddress.ip_address("192.0.2.7")
LOOPBACK = ipaddress.ip_address("127.0.0.1")


def policy(**kw: object) -> AccessPolicy:
    cfg = load_config("peer", env={}, overrides=[f"proxy.{k}={v}" for k, v in kw.items()])
    assert isinstance(cfg, PeerConfig)
    return AccessPolicy.from_config(cfg.proxy, own_ports=[65001, 65002])


def test_client_addresses_as_sockets_name_them():
    assert client_ip("127.0.0.1:5000") == LOOPBACK
    assert client_ip("::ffff:127.0.0.1:5000") == LOOPBACK  # a dual-stack listener's view
    assert client_ip("::1:5000") == ipaddress.ip_address("::1")
    assert client_ip("[2001:db8::1]:80") == ipaddress.ip_address("2001:db8::1")
    assert client_ip("?") is None and client_ip("local") is None and client_ip("") is None
    assert ip_of("fe80::1%eth0") == ipaddress.ip_address("fe80::1")
    assert ip_of("example.com") is None


def test_who_may_use_the_proxy():
    p = policy(allowed_clients='["10.0.0.0/8", "192.0.2.7"]')
    assert p.client_allowed(LOOPBACK) and p.client_allowed(ipaddress.ip_address("::1"))
    assert p.client_allowed(REMOTE) and p.client_allowed(ipaddress.ip_address("10.9.8.7"))
    assert not p.client_allowed(ipaddress.ip_address("192.0.2.8"))
    assert not p.client_allowed(None)  # unknown: not trusted
    assert not policy().client_allowed(REMOTE)  # by default: loopback only


@pytest.mark.parametrize(
    ("address", "port", "local", "why"),
    [
        ("127.0.0.1", 8002, False, "loopback"),
        ("127.8.9.10", 80, False, "loopback"),
        ("::1", 80, False, "loopback"),
        ("::ffff:127.0.0.1", 80, False, "loopback"),
        ("169.254.169.254", 80, False, "link-local"),
        ("fe80::1", 80, False, "link-local"),
        ("0.0.0.0", 80, False, "unspecified"),
        ("::", 80, False, "unspecified"),
        ("192.0.2.2", 65001, True, "own port"),
        ("192.0.2.2", 65002, True, "own port"),
    ],
)
def test_what_a_remote_client_may_not_reach(address: str, port: int, local: bool, why: str):
    p = policy()
    reason = p.destination_refusal(REMOTE, ipaddress.ip_address(address), port, local=local)
    assert reason is not None and why in reason
    # a client on loopback could connect there itself: nothing is refused to it
    assert p.destination_refusal(LOOPBACK, ipaddress.ip_address(address), port, local=local) is None


def test_what_a_remote_client_may_reach():
    p = policy()
    for address, port, local in [
        ("192.0.2.50", 80, False),
        ("10.1.2.3", 8002, False),
        ("192.0.2.2", 8080, True),  # this host, but not one of the daemon's ports
        ("192.0.2.50", 65001, False),  # another host's port 65001
    ]:
        assert (
            p.destination_refusal(REMOTE, ipaddress.ip_address(address), port, local=local) is None
        )
    assert p.needs_local_check(65001) and not p.needs_local_check(80)
    # allowed_destinations lifts the rule for the networks it names
    q = policy(allowed_destinations='["127.0.0.1/32", "169.254.0.0/16"]')
    assert q.destination_refusal(REMOTE, LOOPBACK, 8002, local=True) is None
    assert q.destination_refusal(REMOTE, ipaddress.ip_address("127.0.0.2"), 80, local=True)


def test_connect_ports():  # proxy.connect_ports
    assert policy().connect_port_allowed(443) and not policy().connect_port_allowed(22)
    p = policy(connect_ports="[443, 8443]")
    assert p.connect_port_allowed(8443) and not p.connect_port_allowed(80)


def test_basic_credentials():
    def header(text: str, scheme: str = "Basic") -> str:
        return f"{scheme} {base64.b64encode(text.encode()).decode()}"

    assert basic_credentials(header("alice:s3:cret")) == ("alice", "s3:cret")
    assert basic_credentials(header("alice:")) == ("alice", "")
    assert basic_credentials(header("alice:x", "basic")) == ("alice", "x")
    for bad in (None, "", "Basic", "Bearer abc", header("nocolon"), header(":x"), "Basic !!!"):
        assert basic_credentials(bad) is None


@given(st.binary(max_size=64))
def test_basic_credentials_never_raise(raw: bytes):
    basic_credentials("Basic " + base64.b64encode(raw).decode())
    basic_credentials(raw.decode("latin-1"))


def test_users_file():
    text = "# users\n\nalice:$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA\n"
    assert parse_users(text, "f") == {"alice": "$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA"}
    with pytest.raises(ValueError, match="line 1: the hash of 'bob' is not an argon2 hash"):
        parse_users("bob:cleartext\n", "f")
    with pytest.raises(ValueError, match="line 2: expected USER:HASH"):
        parse_users("# x\nno-colon\n", "f")


def test_exposure_keys_are_checked():
    # beyond loopback without an allow-list or credentials: refused, naming the keys
    for listen in ("0.0.0.0", "192.0.2.2", "::", "proxy.example"):
        with pytest.raises(ConfigError) as err:
            load_config("peer", env={}, overrides=[f"proxy.listen={listen}"])
        assert err.value.key == "proxy.listen"
        assert "proxy.allowed_clients" in str(err.value) and "proxy.auth_file" in str(err.value)
    for ok in (["proxy.listen=localhost"], ["proxy.listen=::1"]):
        load_config("peer", env={}, overrides=ok)
    load_config(
        "peer", env={}, overrides=["proxy.listen=0.0.0.0", 'proxy.allowed_clients=["10.0.0.0/8"]']
    )
    load_config("peer", env={}, overrides=["proxy.listen=0.0.0.0", "proxy.auth_file=/etc/x"])
    with pytest.raises(
        ConfigError, match=r"proxy.allowed_clients\[1\]: expected an address or network"
    ):
        load_config("peer", env={}, overrides=['proxy.allowed_clients=["10.0.0.0/8", "ten"]'])
    with pytest.raises(ConfigError, match=r"proxy.connect_ports\[0\]: must be at most 65535"):
        load_config("peer", env={}, overrides=["proxy.connect_ports=[70000]"])
    assert networks(["10.0.0.1/8"]) == (ipaddress.ip_network("10.0.0.0/8"),)


def test_auth_file_is_checked_at_start(tmp_path: Path):
    users = tmp_path / "users"
    write_user(str(users), "alice", "pw")
    assert users.stat().st_mode & 0o777 == 0o600
    check_proxy_files(ProxySection(auth_file=str(users)))
    write_user(str(users), "bob", "pw2")  # adds, keeps alice
    assert [line.split(":")[0] for line in users.read_text().splitlines()] == ["alice", "bob"]
    users.chmod(0o666)
    with pytest.raises(ConfigError, match="writable by group or others") as err:
        check_proxy_files(ProxySection(auth_file=str(users)))
    assert err.value.key == "proxy.auth_file"
    for text, problem in (("", "lists no user"), ("carol:plaintext\n", "not an argon2 hash")):
        users.write_text(text)
        users.chmod(0o600)
        with pytest.raises(ConfigError, match=problem):
            check_proxy_files(ProxySection(auth_file=str(users)))
    with pytest.raises(ConfigError, match="cannot read"):
        check_proxy_files(ProxySection(auth_file=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="no ':'"):
        write_user(str(users), "a:b", "pw")


async def test_credentials_are_verified_against_the_hashes(tmp_path: Path):
    users = tmp_path / "users"
    write_user(str(users), "alice", "s3cret")
    proxy_users = ProxyUsers.load(str(users))

    def basic(user: str, password: str) -> str:
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    assert await proxy_users.authenticate(basic("alice", "s3cret")) == "alice"
    assert await proxy_users.authenticate(basic("alice", "s3cret")) == "alice"  # remembered
    assert await proxy_users.authenticate(basic("alice", "wrong")) is None
    assert await proxy_users.authenticate(basic("mallory", "s3cret")) is None
    assert await proxy_users.authenticate(None) is None
