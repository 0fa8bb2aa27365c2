"""Redaction of URLs and log events (sans-I/O)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from dragonfly.log import configure, get_logger
from dragonfly.redact import REDACTED, redact_event, redact_params, redact_text, redact_url

SENSITIVE = [
    "X-Amz-Signature",
    "X-Amz-Security-Token",
    "X-Amz-Credential",
    "X-Goog-Signature",
    "Signature",
    "token",
    "access_token",
    "api_key",
    "apikey",
    "password",
    "sig",
    "q-signature",
    "SecurityToken",
]
# Neither a credential-like name nor a signed-URL parameter.
PLAIN_NAMES = st.sampled_from(["a", "part", "version", "id", "page", "name", "prefix", "limit"])
# Secrets are drawn from an alphabet nothing else uses, so "not in the output" means it.
SECRETS = st.text(alphabet="SECRT0123456789", min_size=6, max_size=20).map(lambda s: "Z" + s)
SAFE = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._~/", max_size=20)


@pytest.fixture(autouse=True)
def _default_params() -> Iterator[None]:
    yield
    redact_params([])


@st.composite
def signed_urls(draw: st.DrawFn) -> tuple[str, list[str], list[tuple[str, str]]]:
    """A URL with secrets in its userinfo and in credential parameters, mixed with plain
    parameters; returns it, the secrets and the plain parameters."""
    secrets: list[str] = []
    params: list[str] = []
    plain: list[tuple[str, str]] = []
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.booleans()):
            secret = draw(SECRETS)
            secrets.append(secret)
            params.append(f"{draw(st.sampled_from(SENSITIVE))}={secret}")
        else:
            pair = (draw(PLAIN_NAMES), draw(SAFE.filter(lambda v: "&" not in v)))
            plain.append(pair)
            params.append(f"{pair[0]}={pair[1]}")
    userinfo = ""
    if draw(st.booleans()):
        secret = draw(SECRETS)
        secrets.append(secret)
        userinfo = f"user:{secret}@"
    path = "/" + draw(SAFE)
    query = ("?" + "&".join(params)) if params else ""
    return f"https://{userinfo}files.example:8443{path}{query}", secrets, plain


@given(signed_urls())
def test_no_secret_survives_and_the_rest_does(case: tuple[str, list[str], list[tuple[str, str]]]):
    url, secrets, plain = case
    out = redact_url(url)
    for secret in secrets:
        assert secret not in out
    for name, value in plain:
        assert f"{name}={value}" in out  # plain parameters kept as they were, in order
    assert out.startswith("https://") and "files.example:8443/" in out
    assert redact_url(out) == out  # idempotent
    assert redact_text(f"GET {url} failed: timeout") == f"GET {out} failed: timeout"


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._~/=&", max_size=40))
def test_urls_without_credentials_are_unchanged(rest: str):
    url = f"http://origin.example/{rest.replace('=', '')}"
    assert redact_url(url) == url
    text = f"nothing to see at {url}, really"
    assert redact_text(text) == text


@given(st.text(max_size=200))
def test_arbitrary_text_never_breaks(text: str):
    out = redact_text(text)
    assert redact_text(out) == out


def test_examples():
    s3 = (
        "https://b.s3.amazonaws.com/m.bin?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Credential=AKIA%2F20260101&X-Amz-Signature=0f0f&X-Amz-Security-Token=FwoG&v=2"
    )
    assert redact_url(s3) == (
        f"https://b.s3.amazonaws.com/m.bin?X-Amz-Algorithm={REDACTED}"
        f"&X-Amz-Credential={REDACTED}&X-Amz-Signature={REDACTED}"
        f"&X-Amz-Security-Token={REDACTED}&v=2"
    )
    assert redact_url("http://u:p@h/x#access_token=abc&state=1") == (
        f"http://{REDACTED}@h/x#access_token={REDACTED}&state=1"
    )
    assert redact_text("see http://h/?sig=abc.") == f"see http://h/?sig={REDACTED}."
    # proxy.filtered_query_params are redacted too
    redact_params(["x-build-*"])
    assert (
        redact_url("http://h/?build=1&X-Build-Id=2") == f"http://h/?build=1&X-Build-Id={REDACTED}"
    )


def test_log_events_are_redacted(capsys: pytest.CaptureFixture[str]):
    saved = structlog.get_config()
    try:
        configure("info", "json", redacted_params=["mytoken"])
        get_logger("t").info(
            "fetch failed",
            url="https://h/f?X-Amz-Signature=SIGSIG&mytoken=TOKTOK&n=1",
            error="origin: https://u:PASSPASS@h/f: refused",
            headers={"Authorization": "Bearer BEARERX", "Accept": "*/*"},
        )
        line = capsys.readouterr().err.strip().splitlines()[-1]
    finally:
        structlog.configure(**saved)
    for secret in ("SIGSIG", "TOKTOK", "PASSPASS", "BEARERX"):
        assert secret not in line
    event = json.loads(line)
    assert event["url"] == f"https://h/f?X-Amz-Signature={REDACTED}&mytoken={REDACTED}&n=1"
    assert event["headers"] == {"Authorization": REDACTED, "Accept": "*/*"}
    assert redact_event(None, "info", {"event": "x", "n": 3}) == {"event": "x", "n": 3}
