"""X-Dragonfly-Registry: the upstream registry a client names, with its scheme, ahead of
`?ns=` and `registry_mirror.upstream`."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dragonfly.wire.oci import DOCKER_HUB_API, MirrorError, Upstreams

UP = Upstreams.from_config("https://configured.example", ["insecure.example:5000"])


@pytest.mark.parametrize(
    ("value", "base"),
    [
        ("http://registry.internal:5000", "http://registry.internal:5000"),
        ("http://registry.internal:5000/", "http://registry.internal:5000"),
        ("  HTTPS://Quay.IO  ", "https://quay.io"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("http://[::1]:5000", "http://[::1]:5000"),
        ("https://index.docker.io", DOCKER_HUB_API),  # as Dragonfly's docs write it
        ("https://docker.io", DOCKER_HUB_API),
        ("http://docker.io", "http://docker.io"),  # what the client asked for
    ],
)
def test_the_header_names_the_registry_with_its_scheme(value: str, base: str) -> None:
    assert UP.base_url(None, [value]) == base
    # ahead of ?ns= (even one the configuration says is plain http) and the default
    assert UP.base_url("insecure.example:5000", [value]) == base
    assert UP.base_url("quay.io", [value, value]) == base  # the same value twice is one


def test_without_the_header_ns_and_the_default_decide_as_before() -> None:
    assert UP.base_url(None, []) == "https://configured.example"
    assert UP.base_url("insecure.example:5000", []) == "http://insecure.example:5000"
    assert UP.base_url("quay.io") == "https://quay.io"


@pytest.mark.parametrize(
    "value",
    [
        "registry.internal:5000",  # no scheme
        "ftp://registry.internal",
        "file:///etc/passwd",
        "http://user:secret@registry.internal",
        "http://registry.internal/v2/",
        "http://registry.internal/prefix",
        "http://registry.internal?x=1",
        "http://registry.internal#frag",
        "http://registry.internal:99999",
        "http://registry.internal:0",
        "http://registry.internal:port",
        "http://",
        "http://bad host",
        "http://" + "a" * 300,
        "",
    ],
)
def test_anything_but_a_registrys_base_url_is_a_400_naming_the_header(value: str) -> None:
    with pytest.raises(MirrorError) as info:
        UP.base_url("quay.io", [value])
    assert info.value.status == 400 and "X-Dragonfly-Registry" in str(info.value)


def test_two_registries_in_one_request_are_refused() -> None:
    with pytest.raises(MirrorError) as info:
        UP.base_url(None, ["http://a:1", "http://b:2"])
    assert info.value.status == 400 and "one registry" in str(info.value)


URLISH = st.builds(
    "{}://{}".format,
    st.sampled_from(["http", "https", "HTTP", "ftp", ""]),
    st.text(st.characters(codec="latin-1"), max_size=60),
)


@given(st.one_of(st.text(max_size=400), URLISH))
def test_any_header_value_is_a_base_url_or_a_400(value: str) -> None:
    try:
        base = UP.base_url(None, [value])
    except MirrorError as exc:
        assert exc.status == 400
        return
    scheme, _, host = base.partition("://")
    assert scheme in ("http", "https") and host and not set(host) & set("/?#@ \r\n\t")
