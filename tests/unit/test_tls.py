"""CA and leaf certificates made with the openssl CLI, checked with the ssl module."""

from __future__ import annotations

import contextlib
import ssl
import stat
from pathlib import Path

import pytest
import trio

from dragonfly.ca import instructions
from dragonfly.cli import main
from dragonfly.config import ConfigError, DownloadSection, HijackHTTPSSection, load_config
from dragonfly.net.tls import (
    CAFiles,
    LeafBudgetSpent,
    LeafCache,
    TLSError,
    check_ca,
    hijack_ca,
    host_san,
    leaf_context,
    make_ca,
    make_leaf,
    name_constraints,
    origin_ssl_context,
)
from dragonfly.ratelimit import TokenBucket


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CAFiles:
    return make_ca(tmp_path_factory.mktemp("ca"))


def _sans(cert: Path) -> list[tuple[str, str]]:
    decoded = ssl._ssl._test_decode_cert(str(cert))  # type: ignore[attr-defined]
    return list(decoded["subjectAltName"])


async def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, name: str) -> str:
    """A TLS handshake over a memory stream pair; returns the negotiated ALPN protocol.
    A failed client handshake raises its trio.BrokenResourceError (the cause: why)."""
    left, right = trio.testing.memory_stream_pair()
    server = trio.SSLStream(left, server_ctx, server_side=True)
    client = trio.SSLStream(right, client_ctx, server_hostname=name)
    failure: trio.BrokenResourceError | None = None

    async def serve() -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            await server.do_handshake()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        try:
            await client.do_handshake()
        except trio.BrokenResourceError as exc:
            failure = exc
            await trio.aclose_forcefully(right)  # the server sees EOF and gives up
    if failure is not None:
        raise failure
    return client.selected_alpn_protocol() or ""


def test_make_ca_files_modes_and_refusal(tmp_path: Path):
    ca = make_ca(tmp_path / "ca")
    assert stat.S_IMODE(ca.key.stat().st_mode) == 0o600
    assert ca.cert.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    check_ca(ca)
    decoded = ssl._ssl._test_decode_cert(str(ca.cert))  # type: ignore[attr-defined]
    assert decoded["subject"] == decoded["issuer"]
    with pytest.raises(FileExistsError, match="--force"):
        make_ca(tmp_path / "ca")
    before = ca.cert.read_bytes()
    make_ca(tmp_path / "ca", force=True)
    assert ca.cert.read_bytes() != before
    # no temporary files left behind
    assert sorted(p.name for p in (tmp_path / "ca").iterdir()) == ["ca.key", "ca.pem"]


def test_leaf_names_the_host_and_chains_to_the_ca(ca: CAFiles, tmp_path: Path):
    make_leaf(ca, ["example.com"], tmp_path / "dns.pem", tmp_path / "dns.key")
    assert _sans(tmp_path / "dns.pem") == [("DNS", "example.com")]
    assert stat.S_IMODE((tmp_path / "dns.key").stat().st_mode) == 0o600
    make_leaf(ca, ["127.0.0.1", "::1", "localhost"], tmp_path / "ip.pem", tmp_path / "ip.key")
    assert _sans(tmp_path / "ip.pem") == [
        ("IP Address", "127.0.0.1"),
        ("IP Address", "0:0:0:0:0:0:0:1"),
        ("DNS", "localhost"),
    ]


def test_host_san():
    assert host_san("Example.COM") == "DNS:example.com"
    assert host_san("10.0.0.1") == "IP:10.0.0.1"
    assert host_san("[::1]") == "IP:::1"
    for bad in ("", "a b", "x/y", "a..b", "-x", "host:443"):
        with pytest.raises(TLSError):
            host_san(bad)


async def test_leaf_context_verifies_with_the_ssl_module(ca: CAFiles):
    trusting = ssl.create_default_context(cafile=str(ca.cert))
    trusting.set_alpn_protocols(["h2", "http/1.1"])
    # Python 3.13 makes VERIFY_X509_STRICT the default: the certificates must pass it.
    trusting.verify_flags |= ssl.VERIFY_X509_STRICT
    assert await _handshake(leaf_context(ca, "example.com"), trusting, "example.com") == "http/1.1"
    ip_ctx = leaf_context(ca, "127.0.0.1")
    await _handshake(ip_ctx, trusting, "127.0.0.1")
    # the certificate names its host only
    with pytest.raises(trio.BrokenResourceError) as info:
        await _handshake(leaf_context(ca, "example.com"), trusting, "other.example")
    assert "mismatch" in str(info.value.__cause__).lower()
    # a client that does not trust the CA refuses it
    with pytest.raises(trio.BrokenResourceError) as info:
        await _handshake(ip_ctx, ssl.create_default_context(), "127.0.0.1")
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value.__cause__)


async def test_leaf_cache_makes_each_host_once(ca: CAFiles):
    cache = LeafCache(ca, max_entries=2)  # proxy.hijack_https.leaf_cache_size
    # concurrent first requests share one openssl run
    results: list[ssl.SSLContext] = []

    async def get(host: str) -> None:
        results.append(await cache.context(host))

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(get, "a.example")
    assert cache.made == 1 and results[0] is results[1] is results[2]
    assert await cache.context("A.example") is results[0]  # names are case-insensitive
    await cache.context("b.example")
    await cache.context("c.example")  # evicts a.example (least recently used)
    assert cache.made == 3
    assert await cache.context("a.example") is not results[0]
    with pytest.raises(TLSError):
        await cache.context("not a host")


async def test_leaf_cache_mints_at_a_bounded_rate(ca: CAFiles):
    cache = LeafCache(ca, per_minute=2)
    first = await cache.context("a.example")
    await cache.context("b.example")
    with pytest.raises(LeafBudgetSpent, match="2 new certificates a minute"):
        await cache.context("c.example")
    assert await cache.context("a.example") is first  # a cached one costs nothing
    assert cache.made == 2


def test_token_bucket_try_take_never_goes_negative():
    bucket = TokenBucket(rate=1, burst=2, now=0)
    assert bucket.try_take(1, now=0) and bucket.try_take(1, now=0)
    assert not bucket.try_take(1, now=0.5)  # half a token: not enough, none taken
    assert bucket.try_take(1, now=1.0)
    assert TokenBucket(rate=0).try_take(10**9, now=0)  # unlimited


def test_name_constraints():
    assert name_constraints([]) == ""
    dns = name_constraints(["Files.Example", ".hf.co"])
    assert dns.startswith("critical,permitted;DNS:files.example,permitted;DNS:.hf.co,")
    assert "excluded;IP:0.0.0.0/0.0.0.0" in dns and "excluded;IP:::/::" in dns
    ip = name_constraints(["10.1.2.3/8", "example.com"])
    assert "permitted;IP:10.0.0.0/255.0.0.0" in ip and "excluded" not in ip
    with pytest.raises(TLSError, match="not a DNS name or an IP network"):
        name_constraints(["bad name"])


def test_a_ca_key_open_to_others_is_refused(ca: CAFiles, tmp_path: Path):
    key = tmp_path / "open.key"
    key.write_bytes(ca.key.read_bytes())
    for mode in (0o640, 0o604, 0o620):
        key.chmod(mode)
        with pytest.raises(ConfigError, match=f"chmod 600 {key}") as info:
            hijack_ca(HijackHTTPSSection(ca_cert=str(ca.cert), ca_key=str(key)))
        assert info.value.key == "proxy.hijack_https.ca_key"
    key.chmod(0o400)
    assert hijack_ca(HijackHTTPSSection(ca_cert=str(ca.cert), ca_key=str(key))) is not None


def test_config_checks_name_the_key(ca: CAFiles, tmp_path: Path):
    assert hijack_ca(HijackHTTPSSection()) is None
    assert hijack_ca(HijackHTTPSSection(ca_cert=str(ca.cert), ca_key=str(ca.key))) == ca
    other = make_ca(tmp_path / "other")
    leaf, leaf_key = tmp_path / "leaf.pem", tmp_path / "leaf.key"
    make_leaf(ca, ["example.com"], leaf, leaf_key)
    cases = [
        (HijackHTTPSSection(hosts=["x"]), "proxy.hijack_https.ca_cert", "no CA"),
        (HijackHTTPSSection(ca_cert=str(ca.cert)), "proxy.hijack_https.ca_key", "required"),
        (
            HijackHTTPSSection(ca_cert=str(tmp_path / "missing.pem"), ca_key=str(ca.key)),
            "proxy.hijack_https.ca_cert",
            "cannot read",
        ),
        (
            HijackHTTPSSection(ca_cert=str(ca.cert), ca_key=str(other.key)),
            "proxy.hijack_https.ca_key",
            "does not belong",
        ),
        (
            HijackHTTPSSection(ca_cert=str(leaf), ca_key=str(leaf_key)),
            "proxy.hijack_https.ca_cert",
            "not a CA",
        ),
    ]
    for section, key, problem in cases:
        with pytest.raises(ConfigError, match=problem) as info:
            hijack_ca(section)
        assert info.value.key == key
    origin_ssl_context(DownloadSection(origin_ca_file=str(ca.cert)))
    for bad in (str(tmp_path / "missing.pem"), str(ca.key)):
        with pytest.raises(ConfigError) as info:
            origin_ssl_context(DownloadSection(origin_ca_file=bad))
        assert info.value.key == "download.origin_ca_file"


def test_ca_init_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    directory = tmp_path / "my ca"
    assert main(["ca", "init", str(directory)]) == 0
    out = capsys.readouterr().out
    assert str(directory / "ca.pem") in out
    for hint in ("update-ca-certificates", "--cacert", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        assert hint in out
    assert stat.S_IMODE((directory / "ca.key").stat().st_mode) == 0o600
    assert main(["ca", "init", str(directory)]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(["ca", "init", "--force", str(directory)]) == 0
    # the TOML it prints is a valid peer configuration naming this CA
    text = instructions(directory / "ca.pem", directory / "ca.key")
    block = text.split("1. Peer configuration")[1].split("or on the command line")[0]
    toml = "\n".join(line[4:] for line in block.splitlines() if line.startswith("    "))
    (tmp_path / "peer.toml").write_text(toml)
    cfg = load_config("peer", tmp_path / "peer.toml", env={})
    assert cfg.proxy.hijack_https.ca_cert == str(directory / "ca.pem")
    assert hijack_ca(cfg.proxy.hijack_https) is not None
    assert any(r.regex == "^https?://" for r in cfg.proxy.rules)


def test_peer_start_refuses_bad_ca_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    code = main(
        [
            "--role",
            "peer",
            "--set",
            f"proxy.hijack_https.ca_cert={tmp_path / 'nope.pem'}",
            "--set",
            f"proxy.hijack_https.ca_key={tmp_path / 'nope.key'}",
        ]
    )
    assert code == 2
    assert "proxy.hijack_https.ca_cert" in capsys.readouterr().err
