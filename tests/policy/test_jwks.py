"""JwksCache: static key sets, fetching over HTTP, caching, rate-limited refetch, failures."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshware.exceptions import ConfigurationError
from meshware.policy.jwks import (
    ASYMMETRIC_ALGORITHMS,
    SUPPORTED_ALGORITHMS,
    JwksCache,
    KeySet,
    parse_jwks,
)
from meshware.policy.jwt import JwtRule

if TYPE_CHECKING:
    from tests.policy.conftest import JwksKeyring, JwksServer


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _problem(**kwargs: Any) -> ConfigurationError:
    with pytest.raises(ConfigurationError) as info:
        JwksCache(name="rules[3]", **kwargs)
    return info.value


# -- static sources ------------------------------------------------------------------------


def test_inline_jwks_keys_and_algorithms(jwks_keyring: JwksKeyring) -> None:
    cache = JwksCache(jwks=jwks_keyring.jwks("rsa-1", "ec-1", "ed-1"))
    assert cache.is_static
    assert [key.kid for key in cache.key_set.keys] == ["rsa-1", "ec-1", "ed-1"]
    by_kid = {key.kid: key for key in cache.key_set.keys}
    assert by_kid["rsa-1"].algorithms == frozenset(
        {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
    )
    assert by_kid["ec-1"].algorithms == frozenset({"ES256"})
    assert by_kid["ed-1"].algorithms == frozenset({"EdDSA"})
    assert [k.key_id for k in cache.keys] == ["rsa-1", "ec-1", "ed-1"]
    assert cache.key_set.key_ids == frozenset({"rsa-1", "ec-1", "ed-1"})
    # Static sources never fetch.
    assert cache.should_refresh() is False
    assert cache.should_refresh(key_missing=True) is False
    assert cache.refresh() is False


def test_jwk_alg_narrows_the_key_and_allowlist_filters(jwks_keyring: JwksKeyring) -> None:
    doc = json.dumps({"keys": [jwks_keyring.jwk("rsa-1", alg="PS384")]})
    cache = JwksCache(jwks=doc)
    assert cache.key_set.keys[0].algorithms == frozenset({"PS384"})
    cache = JwksCache(jwks=jwks_keyring.jwks("rsa-1", "ec-1"), algorithms=("ES256",))
    assert [key.kid for key in cache.key_set.keys] == ["ec-1"]


def test_keys_for_other_uses_are_skipped(jwks_keyring: JwksKeyring) -> None:
    doc = json.dumps(
        {
            "keys": [
                jwks_keyring.jwk("rsa-1", use="enc"),
                jwks_keyring.jwk("rsa-2", key_ops=["encrypt"]),
                jwks_keyring.jwk("ec-1", use="sig"),
            ]
        }
    )
    assert [key.kid for key in JwksCache(jwks=doc).key_set.keys] == ["ec-1"]


def test_key_set_lookups(jwks_keyring: JwksKeyring) -> None:
    kidless = jwks_keyring.jwk("ec-1")
    del kidless["kid"]
    key_set, problems = parse_jwks(
        json.dumps({"keys": [jwks_keyring.jwk("rsa-1"), kidless]}),
        ASYMMETRIC_ALGORITHMS,
        static=True,
    )
    assert problems == []
    rsa_key, ec_key = key_set.keys
    # A key without kid may verify a token with any kid, as in Envoy.
    assert key_set.with_kid("rsa-1") == (rsa_key, ec_key)
    assert key_set.with_kid("other") == (ec_key,)
    assert key_set.for_algorithm("ES256") == (ec_key,)
    assert key_set.for_algorithm("PS512") == (rsa_key,)
    assert key_set.for_algorithm("HS256") == ()
    only_kids = KeySet([rsa_key])
    assert only_kids.with_kid("other") is None
    assert len(KeySet()) == 0


def test_jwks_file(tmp_path: Path, jwks_keyring: JwksKeyring) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(jwks_keyring.jwks("ed-1"))
    assert [key.kid for key in JwksCache(jwks_file=path).key_set.keys] == ["ed-1"]
    assert [key.kid for key in JwksCache(jwks_file=str(path)).key_set.keys] == ["ed-1"]


def test_jwks_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    error = _problem(jwks_file=missing)
    assert error.field == "rules[3].jwks_file"
    assert error.value == missing
    assert str(error).startswith("rules[3].jwks_file: cannot read the JWKS file: ")
    big = tmp_path / "big.json"
    big.write_text(" " * 100)
    error = _problem(jwks_file=big, max_bytes=50)
    assert str(error) == "rules[3].jwks_file: JWKS file is larger than 50 bytes"
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    error = _problem(jwks_file=bad)
    assert error.field == "rules[3].jwks_file"
    assert "invalid JWKS: not valid JSON" in str(error)


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ("{not json", "rules[3].jwks: invalid JWKS: not valid JSON: "),
        ("[]", 'rules[3].jwks: invalid JWKS: expected a JWKS object {"keys": [...]}'),
        ('{"keys": {}}', 'rules[3].jwks: invalid JWKS: expected a JWKS object {"keys": [...]}'),
        (
            '{"keys": []}',
            "rules[3].jwks: invalid JWKS: no usable signing key for algorithms "
            "ES256, ES384, ES512, EdDSA, PS256, PS384, PS512, RS256, RS384, RS512",
        ),
        ('{"keys": [1]}', "rules[3].jwks: invalid JWKS: key #0: expected a JSON object, got int"),
        (
            '{"keys": [{"kty": "XYZ", "kid": "a"}]}',
            "rules[3].jwks: invalid JWKS: key #0 (kid 'a'): unsupported key type 'kty' 'XYZ'; "
            "expected RSA, EC, OKP or oct",
        ),
        (
            '{"keys": [{"kty": "RSA", "kid": 5}]}',
            "rules[3].jwks: invalid JWKS: key #0: 'kid' must be a string",
        ),
        (
            '{"keys": [{"kty": "EC", "crv": "Ed25519", "x": "AA"}]}',
            "rules[3].jwks: invalid JWKS: key #0: unsupported or missing curve 'crv' 'Ed25519' "
            "for a EC key; expected one of P-256, P-384, P-521, secp256k1",
        ),
        (
            '{"keys": [{"kty": "RSA", "kid": "r", "alg": "ES256", "n": "AQAB", "e": "AQAB"}]}',
            "rules[3].jwks: invalid JWKS: key #0 (kid 'r'): 'alg' 'ES256' does not fit a RSA key",
        ),
    ],
)
def test_inline_jwks_errors_name_the_rule(document: str, expected: str) -> None:
    error = _problem(jwks=document)
    assert error.field == "rules[3].jwks"
    assert str(error).startswith(expected)


def test_bad_key_material_is_a_configuration_error(jwks_keyring: JwksKeyring) -> None:
    broken = jwks_keyring.jwk("rsa-1")
    del broken["n"]
    error = _problem(jwks=json.dumps({"keys": [broken]}))
    assert str(error).startswith("rules[3].jwks: invalid JWKS: key #0 (kid 'rsa-1'): ")


def test_private_key_material_is_refused(jwks_keyring: JwksKeyring) -> None:
    private = RSAAlgorithm_private_jwk(jwks_keyring)
    error = _problem(jwks=json.dumps({"keys": [private]}))
    assert str(error) == (
        "rules[3].jwks: invalid JWKS: key #0 (kid 'rsa-1'): contains private key material; "
        "publish only the public key"
    )


def RSAAlgorithm_private_jwk(jwks_keyring: JwksKeyring) -> dict[str, Any]:
    from jwt.algorithms import RSAAlgorithm

    data: dict[str, Any] = RSAAlgorithm.to_jwk(jwks_keyring.private["rsa-1"], as_dict=True)
    data["kid"] = "rsa-1"
    return data


def test_short_rsa_key_is_refused() -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa
    from jwt.algorithms import RSAAlgorithm

    small = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    data: dict[str, Any] = RSAAlgorithm.to_jwk(small, as_dict=True)
    error = _problem(jwks=json.dumps({"keys": [data]}))
    assert str(error) == (
        "rules[3].jwks: invalid JWKS: key #0: RSA key of 1024 bits; at least 2048 are required"
    )


def test_oct_keys_need_hmac_algorithms_and_length(jwks_keyring: JwksKeyring) -> None:
    doc = jwks_keyring.jwks("hs-1")
    error = _problem(jwks=doc)
    assert "no usable signing key" in str(error)
    cache = JwksCache(jwks=doc, algorithms=("HS256", "HS512"))
    # The secret is 62 bytes: enough for HS256, too short for HS512 (64).
    assert cache.key_set.keys[0].algorithms == frozenset({"HS256"})
    short = json.dumps({"keys": [{"kty": "oct", "k": "c2hvcnQ", "kid": "s"}]})
    error = _problem(jwks=short, algorithms=("HS256",))
    assert str(error) == (
        "rules[3].jwks: invalid JWKS: key #0 (kid 's'): shared secret of 5 bytes is too short; "
        "HS256 needs 32, HS384 48, HS512 64"
    )


@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        ({}, "rules[3].jwks_uri", "exactly one key source is required: jwks_uri, jwks or "
         "jwks_file (got none)"),
        ({"jwks": "{}", "jwks_file": "x"}, "rules[3].jwks_file", "exactly one key source is "
         "required: jwks_uri, jwks or jwks_file (got jwks, jwks_file)"),
        ({"jwks_uri": "ftp://issuer/jwks"}, "rules[3].jwks_uri",
         "expected an http:// or https:// URL with a host"),
        ({"jwks_uri": "https:///jwks"}, "rules[3].jwks_uri",
         "expected an http:// or https:// URL with a host"),
        ({"jwks_uri": "https://i/j", "refresh_seconds": 0}, "rules[3].refresh_seconds",
         "expected a finite number of seconds > 0"),
        ({"jwks_uri": "https://i/j", "min_refetch_seconds": -1}, "rules[3].min_refetch_seconds",
         "expected a finite number of seconds >= 0"),
        ({"jwks_uri": "https://i/j", "timeout_seconds": float("nan")}, "rules[3].timeout_seconds",
         "expected a finite number of seconds > 0"),
        ({"jwks_uri": "https://i/j", "max_bytes": 0}, "rules[3].max_bytes",
         "expected a positive integer"),
    ],
)  # fmt: skip
def test_constructor_validation(kwargs: dict[str, Any], field: str, message: str) -> None:
    error = _problem(**kwargs)
    assert error.field == field
    assert str(error) == f"{field}: {message}"


def test_from_rule_uses_the_rule_settings(jwks_keyring: JwksKeyring) -> None:
    rule = JwtRule(issuer="i", jwks_uri="https://issuer.example/jwks", jwks_refresh_seconds=60.0)
    cache = JwksCache.from_rule(rule, name="rules[1]", min_refetch_seconds=5.0)
    assert (cache.name, cache.jwks_uri, cache.refresh_seconds) == (
        "rules[1]",
        "https://issuer.example/jwks",
        60.0,
    )
    assert cache.min_refetch_seconds == 5.0
    assert cache.algorithms == frozenset(ASYMMETRIC_ALGORITHMS)
    assert len(cache.key_set) == 0


# -- fetching over HTTP (a real server on 127.0.0.1) -----------------------------------------


def test_sync_refresh_from_a_real_server(
    jwks_server: JwksServer, jwks_keyring: JwksKeyring
) -> None:
    jwks_server.serve(jwks_keyring.jwks("rsa-1", "ec-1"))
    clock = FakeClock()
    cache = JwksCache(jwks_uri=jwks_server.url, clock=clock)
    assert not cache.is_static
    assert cache.should_refresh() is True
    assert cache.refresh() is True
    assert jwks_server.hits == 1
    assert cache.key_set.key_ids == frozenset({"rsa-1", "ec-1"})
    assert (cache.fetch_count, cache.fetch_failures, cache.fetched_at) == (1, 0, 1000.0)


async def test_async_refresh_from_a_real_server(
    jwks_server: JwksServer, jwks_keyring: JwksKeyring
) -> None:
    jwks_server.serve(jwks_keyring.jwks("ed-1"))
    cache = JwksCache(jwks_uri=jwks_server.url, clock=FakeClock())
    assert await cache.refresh_async() is True
    assert cache.key_set.key_ids == frozenset({"ed-1"})
    assert jwks_server.hits == 1


async def test_concurrent_async_refreshes_share_one_fetch(
    jwks_server: JwksServer, jwks_keyring: JwksKeyring
) -> None:
    jwks_server.serve(jwks_keyring.jwks("ed-1"))
    cache = JwksCache(jwks_uri=jwks_server.url, clock=FakeClock())
    results = await asyncio.gather(*(cache.maybe_refresh_async() for _ in range(5)))
    assert results == [True] * 5
    assert jwks_server.hits == 1


def test_injected_clients_are_used(jwks_keyring: JwksKeyring) -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.method} {request.url} {request.headers['accept']}")
        return httpx.Response(200, text=jwks_keyring.jwks("ec-1"))

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        cache = JwksCache(jwks_uri="https://issuer.example/jwks", client=client)
        assert cache.refresh() is True
    assert seen == ["GET https://issuer.example/jwks application/jwk-set+json, application/json"]


async def test_injected_async_client_is_used(jwks_keyring: JwksKeyring) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text=jwks_keyring.jwks("ec-1"))

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        cache = JwksCache(jwks_uri="https://issuer.example/jwks", async_client=client)
        assert await cache.refresh_async() is True
    assert cache.key_set.key_ids == frozenset({"ec-1"})


# -- failures keep the last good keys -------------------------------------------------------


def test_fetch_failure_keeps_keys_counts_logs_and_reports(
    jwks_server: JwksServer, jwks_keyring: JwksKeyring, caplog: pytest.LogCaptureFixture
) -> None:
    reported: list[tuple[str, str]] = []
    jwks_server.serve(jwks_keyring.jwks("rsa-1"))
    cache = JwksCache(
        name="rules[0]",
        jwks_uri=jwks_server.url,
        clock=FakeClock(),
        on_fetch_error=lambda uri, exc: reported.append((uri, str(exc))),
    )
    assert cache.refresh() is True
    jwks_server.serve("oops", status=503)
    with caplog.at_level(logging.WARNING, logger="meshware.jwt"):
        assert cache.refresh() is False
    assert cache.key_set.key_ids == frozenset({"rsa-1"})
    assert (cache.fetch_count, cache.fetch_failures) == (1, 1)
    assert cache.last_error == "ValueError: HTTP status 503, expected 200"
    assert reported == [(jwks_server.url, "HTTP status 503, expected 200")]
    assert caplog.messages == [
        f"JWKS fetch from {jwks_server.url} (rules[0]) failed: "
        "ValueError: HTTP status 503, expected 200; keeping 1 cached key(s)"
    ]
    # The next success clears the error.
    jwks_server.serve(jwks_keyring.jwks("rsa-2"))
    assert cache.refresh() is True
    assert cache.last_error is None
    assert cache.key_set.key_ids == frozenset({"rsa-2"})


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("not json", "ValueError: not valid JSON: "),
        ('{"keys": "x"}', 'ValueError: expected a JWKS object {"keys": [...]}'),
        ('{"keys": [{"kty": "XYZ"}]}', "ValueError: no usable signing key for algorithms"),
    ],
)
def test_bad_documents_are_failures(
    jwks_server: JwksServer, jwks_keyring: JwksKeyring, body: str, error: str
) -> None:
    jwks_server.serve(jwks_keyring.jwks("ec-1"))
    cache = JwksCache(jwks_uri=jwks_server.url, clock=FakeClock())
    cache.refresh()
    jwks_server.serve(body)
    assert cache.refresh() is False
    assert cache.last_error is not None and cache.last_error.startswith(error)
    assert cache.key_set.key_ids == frozenset({"ec-1"})


def test_oversized_document_is_a_failure(jwks_server: JwksServer) -> None:
    jwks_server.serve('{"keys": []}' + " " * 5000)
    cache = JwksCache(jwks_uri=jwks_server.url, max_bytes=1000, clock=FakeClock())
    assert cache.refresh() is False
    assert cache.last_error == "ValueError: JWKS document larger than 1000 bytes"


def test_transport_error_is_a_failure() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    errors: list[Exception] = []
    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        cache = JwksCache(
            jwks_uri="https://issuer.example/jwks",
            client=client,
            on_fetch_error=lambda uri, exc: errors.append(exc),
        )
        assert cache.refresh() is False
    assert cache.last_error == "ConnectError: connection refused"
    assert [type(e) for e in errors] == [httpx.ConnectError]


async def test_async_failure_is_reported(jwks_server: JwksServer) -> None:
    jwks_server.serve("", status=500)
    cache = JwksCache(jwks_uri=jwks_server.url, clock=FakeClock())
    assert await cache.refresh_async() is False
    assert cache.fetch_failures == 1
    assert cache.last_error == "ValueError: HTTP status 500, expected 200"


def test_fetched_documents_skip_unusable_keys_with_a_log(
    jwks_server: JwksServer, jwks_keyring: JwksKeyring, caplog: pytest.LogCaptureFixture
) -> None:
    # A shared secret published at a URL is never used; the good key still is.
    jwks_server.serve(jwks_keyring.jwks("hs-1", "ec-1"))
    cache = JwksCache(
        name="rules[0]", jwks_uri=jwks_server.url, algorithms=("ES256",), clock=FakeClock()
    )
    with caplog.at_level(logging.WARNING, logger="meshware.jwt"):
        assert cache.refresh() is True
    assert cache.key_set.key_ids == frozenset({"ec-1"})
    assert caplog.messages == [
        f"JWKS from {jwks_server.url} (rules[0]): skipped key #0 (kid 'hs-1'): "
        "shared-secret ('oct') keys are not accepted from a URL"
    ]


# -- refresh timing (fake clock) ------------------------------------------------------------


def test_refresh_schedule_and_rate_limit(
    jwks_server: JwksServer, jwks_keyring: JwksKeyring
) -> None:
    jwks_server.serve(jwks_keyring.jwks("rsa-1"))
    clock = FakeClock(0.0)
    cache = JwksCache(
        jwks_uri=jwks_server.url, refresh_seconds=1200, min_refetch_seconds=30, clock=clock
    )
    assert cache.maybe_refresh() is True
    assert jwks_server.hits == 1
    # Fresh keys: nothing to do, and an unknown kid waits for the rate limit.
    clock.now = 29.9
    assert cache.should_refresh() is False
    assert cache.maybe_refresh(key_missing=True) is False
    assert jwks_server.hits == 1
    clock.now = 30.0
    assert cache.should_refresh() is False
    assert cache.maybe_refresh(key_missing=True) is True
    assert jwks_server.hits == 2
    # Stale after refresh_seconds since the last success.
    clock.now = 30.0 + 1199.0
    assert cache.should_refresh() is False
    clock.now = 30.0 + 1200.0
    assert cache.should_refresh() is True


def test_failed_fetch_is_retried_only_after_the_rate_limit(jwks_server: JwksServer) -> None:
    jwks_server.serve("", status=500)
    clock = FakeClock(0.0)
    cache = JwksCache(jwks_uri=jwks_server.url, min_refetch_seconds=30, clock=clock)
    assert cache.maybe_refresh() is False
    for now in (1.0, 10.0, 29.0):
        clock.now = now
        assert cache.maybe_refresh() is False
    assert jwks_server.hits == 1
    clock.now = 30.0
    cache.maybe_refresh()
    assert jwks_server.hits == 2
    assert cache.fetch_failures == 2


def test_repr(jwks_keyring: JwksKeyring) -> None:
    cache = JwksCache(name="rules[0]", jwks=jwks_keyring.jwks("ec-1"))
    assert repr(cache) == "JwksCache(name='rules[0]', source='static', keys=1)"
    assert repr(cache.key_set) == "KeySet([VerificationKey(kid='ec-1', kty='EC')])"


# -- properties -----------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)
_MEMBERS = ["kty", "crv", "alg", "kid", "use", "key_ops", "n", "e", "x", "y", "k", "d"]


@settings(max_examples=400, deadline=None)
@given(
    base=st.sampled_from(["rsa-1", "ec-1", "ed-1", "hs-1"]),
    changes=st.dictionaries(st.sampled_from(_MEMBERS), _json, max_size=4),
    static=st.booleans(),
    algorithms=st.sets(st.sampled_from(sorted(SUPPORTED_ALGORITHMS)), min_size=1),
)
def test_parse_jwks_only_raises_value_error(
    jwks_keyring: JwksKeyring,
    base: str,
    changes: dict[str, Any],
    static: bool,
    algorithms: set[str],
) -> None:
    jwk = {**jwks_keyring.jwk(base), **changes}
    try:
        key_set, problems = parse_jwks(json.dumps({"keys": [jwk]}), algorithms, static=static)
    except ValueError:
        return
    # Whatever was accepted can only verify algorithms the caller allowed.
    assert len(key_set) == 1 and problems == []
    assert key_set.keys[0].algorithms <= algorithms


@settings(max_examples=200, deadline=None)
@given(document=st.text(max_size=200) | _json.map(json.dumps))
def test_parse_jwks_arbitrary_documents(document: str) -> None:
    for static in (True, False):
        try:
            parse_jwks(document, ASYMMETRIC_ALGORITHMS, static=static)
        except ValueError as exc:
            assert str(exc)
