"""The registry mirror's sans-I/O core: routes, upstream choice, read grants."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dragonfly.wire.oci import (
    DOCKER_HUB_API,
    MirrorError,
    ReadGrants,
    RouteKind,
    Upstreams,
    credential_key,
    error_body,
    is_registry_path,
    parse_route,
    registry_blob,
    split_query,
)

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("path", "kind", "name", "reference"),
    [
        ("/v2/", RouteKind.BASE, "", ""),
        ("/v2", RouteKind.BASE, "", ""),
        (f"/v2/library/alpine/blobs/{DIGEST}", RouteKind.BLOB, "library/alpine", DIGEST),
        ("/v2/a/b/c/manifests/latest", RouteKind.MANIFEST, "a/b/c", "latest"),
        (f"/v2/my-org/app.x/manifests/{DIGEST}", RouteKind.MANIFEST, "my-org/app.x", DIGEST),
        ("/v2/a__b/tags/list", RouteKind.TAGS, "a__b", ""),
        ("/v2/_catalog", RouteKind.OTHER, "", ""),
        ("/v2/a/blobs/uploads/", RouteKind.OTHER, "", ""),
    ],
)
def test_routes(path: str, kind: RouteKind, name: str, reference: str) -> None:
    route = parse_route(path)
    assert (route.kind, route.name, route.reference) == (kind, name, reference)


def test_only_sha256_blobs_go_p2p() -> None:
    assert parse_route(f"/v2/x/blobs/{DIGEST}").sha256_blob
    assert not parse_route("/v2/x/blobs/sha512:" + "ab" * 64).sha256_blob
    assert not parse_route("/v2/x/blobs/sha256:ABCD").sha256_blob  # not 64 lowercase hex
    assert not parse_route(f"/v2/x/manifests/{DIGEST}").sha256_blob


@pytest.mark.parametrize(
    "path",
    ["/v2/UPPER/blobs/" + DIGEST, "/v2/a//b/manifests/x", "/v2/a/manifests/-bad", "/v2/../blobs/x"],
)
def test_bad_names_are_named(path: str) -> None:
    with pytest.raises(MirrorError) as info:
        parse_route(path)
    assert info.value.status == 400 and info.value.code == "NAME_INVALID"
    assert path in str(info.value)


def test_is_registry_path() -> None:
    assert is_registry_path("/v2") and is_registry_path("/v2/x")
    assert not is_registry_path("/v20") and not is_registry_path("/metrics")


def test_split_query_takes_ns_out() -> None:
    assert split_query("ns=127.0.0.1%3A5000") == ("127.0.0.1:5000", "")
    assert split_query("n=1&ns=docker.io&last=x") == ("docker.io", "n=1&last=x")
    assert split_query("") == (None, "")
    assert split_query("n=5") == (None, "n=5")


def test_upstream_choice() -> None:
    up = Upstreams.from_config("http://127.0.0.1:5000/", ["Reg.Local:8080"])
    assert up.base_url(None) == "http://127.0.0.1:5000"
    assert up.base_url("127.0.0.1:5000") == "http://127.0.0.1:5000"  # the configured one
    assert up.base_url("reg.local:8080") == "http://reg.local:8080"  # insecure list
    assert up.base_url("quay.io") == "https://quay.io"
    assert up.base_url("docker.io") == DOCKER_HUB_API
    assert up.base_url("[::1]:5000") == "https://[::1]:5000"


@pytest.mark.parametrize("ns", ["a b", "host/path", "x:y:z", "h?q", "-x"])
def test_bad_ns_is_refused(ns: str) -> None:
    with pytest.raises(MirrorError) as info:
        Upstreams.from_config("", []).base_url(ns)
    assert info.value.status == 400 and "ns" in str(info.value)


def test_no_upstream_says_how_to_set_one() -> None:
    with pytest.raises(MirrorError) as info:
        Upstreams.from_config("", []).base_url(None)
    assert "registry_mirror.upstream" in str(info.value)


def test_error_body_is_the_spec_document() -> None:
    doc = json.loads(error_body("BLOB_UNKNOWN", "no such blob"))
    assert doc == {"errors": [{"code": "BLOB_UNKNOWN", "message": "no such blob"}]}


def test_credential_key_hides_the_secret() -> None:
    key = credential_key("Basic dXNlcjpwYXNz")
    assert "dXNlcjpwYXNz" not in key and key == credential_key("Basic dXNlcjpwYXNz")
    assert credential_key("") == "" and key != credential_key("Basic other")
    assert credential_key("", "session=1") not in ("", credential_key(""))


def test_grants_expire_and_are_scoped() -> None:
    grants = ReadGrants(ttl=10)
    grants.grant("http://r", "a", DIGEST, "cred", now=0)
    assert grants.allowed("http://r", "a", DIGEST, "cred", now=9.9)
    assert not grants.allowed("http://r", "a", DIGEST, "cred", now=10)
    assert not grants.allowed("http://r", "a", DIGEST, "other", now=1)
    assert not grants.allowed("http://r", "b", DIGEST, "cred", now=1)
    assert not grants.allowed("http://s", "a", DIGEST, "cred", now=1)
    # A yes for one blob of a repository is not a yes for another digest named there.
    assert not grants.allowed("http://r", "a", "sha256:" + "cd" * 32, "cred", now=1)


def test_zero_ttl_remembers_nothing() -> None:
    grants = ReadGrants(ttl=0)
    grants.grant("u", "n", DIGEST, "c", now=0)
    assert not grants.allowed("u", "n", DIGEST, "c", now=0) and len(grants) == 0


@given(
    st.lists(
        st.tuples(st.sampled_from("abcd"), st.sampled_from("xyz"), st.floats(0, 100)),
        max_size=60,
    )
)
def test_grants_stay_bounded_and_never_outlive_ttl(
    events: list[tuple[str, str, float]],
) -> None:
    grants = ReadGrants(ttl=5, max_entries=4)
    granted_at: dict[tuple[str, str], float] = {}
    now = 0.0
    for name, cred, dt in events:
        now += dt / 10
        grants.grant("u", name, DIGEST, cred, now)
        granted_at[(name, cred)] = now
        assert len(grants) <= 4
        for (n, c), at in granted_at.items():
            if grants.allowed("u", n, DIGEST, c, now):
                assert now - at < 5


def test_registry_blob_urls() -> None:
    url = f"https://reg.example:5000/v2/team/app/blobs/{DIGEST}"
    found = registry_blob(url)
    assert found is not None
    route, base, same = found
    assert (route.name, route.reference, base, same) == (
        "team/app",
        DIGEST,
        "https://reg.example:5000",
        url,
    )
    assert registry_blob(f"https://reg/v2/app/manifests/{DIGEST}") is None
    assert registry_blob("https://reg/files/app.tar") is None
    assert registry_blob("https://reg/v2/UPPER/blobs/" + DIGEST) is None
    assert registry_blob("http://[bad/v2/x/blobs/" + DIGEST) is None
