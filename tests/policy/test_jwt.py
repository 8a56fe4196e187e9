"""JwtRule validation and mapping, and JwtAuthenticator decisions, attacks and key rotation."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from meshware.exceptions import ConfigurationError, IdentityError
from meshware.policy.jwt import (
    DEFAULT_ALGORITHMS,
    REASONS,
    InvalidToken,
    JwtAuthenticator,
    JwtResult,
    JwtRule,
)

if TYPE_CHECKING:
    from tests.policy.conftest import JwksKeyring, JwksServer

ISS = "https://auth.example.com"
NOW = 1_700_000_000.0


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"iss": ISS, "sub": "alice", "aud": "orders", "exp": NOW + 300}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(value: Any) -> str:
    return b64(json.dumps(value).encode())


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def run(
    authn: JwtAuthenticator, mode: str, headers: dict[str, str], query: str = ""
) -> JwtResult | None:
    """Call the sync or the async entry point, so every behaviour is tested through both."""
    if mode == "sync":
        return authn.authenticate(headers, query)
    return await authn.authenticate_async(headers, query)


async def rejected(
    authn: JwtAuthenticator, mode: str, headers: dict[str, str], query: str = ""
) -> InvalidToken:
    with pytest.raises(InvalidToken) as info:
        await run(authn, mode, headers, query)
    return info.value


@pytest.fixture
def authn(jwks_keyring: JwksKeyring) -> JwtAuthenticator:
    rule = JwtRule(
        issuer=ISS,
        audiences=("orders", "payments"),
        jwks=jwks_keyring.jwks("rsa-1", "ec-1", "ed-1"),
    )
    return JwtAuthenticator([rule], clock=lambda: NOW)


# -- JwtRule ---------------------------------------------------------------------------------


def test_rule_defaults() -> None:
    rule = JwtRule(issuer=ISS, jwks_uri="https://auth.example.com/jwks")
    assert rule.audiences == ()
    assert rule.from_headers == () and rule.from_params == ()
    assert rule.header_locations == (("authorization", "Bearer "),)
    assert rule.param_locations == ("access_token",)
    assert rule.forward_original_token is False
    assert rule.output_payload_to_header is None
    assert rule.clock_skew_seconds == 60.0
    assert rule.algorithms == DEFAULT_ALGORITHMS == (
        "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
    )  # fmt: skip
    assert rule.jwks_refresh_seconds == 1200.0
    assert rule.max_token_bytes == 8192


def test_rule_normalizes_locations() -> None:
    rule = JwtRule(
        issuer=ISS,
        jwks="{}",
        from_headers=[["X-JWT-Assertion", ""]],  # type: ignore[list-item,arg-type]
        output_payload_to_header="X-Jwt-Payload",
        audiences=["a", "b"],  # type: ignore[arg-type]
    )
    assert rule.from_headers == (("x-jwt-assertion", ""),)
    assert rule.output_payload_to_header == "x-jwt-payload"
    assert rule.audiences == ("a", "b")
    # Explicit locations replace both defaults, as in Istio.
    assert rule.header_locations == (("x-jwt-assertion", ""),)
    assert rule.param_locations == ()
    params_only = JwtRule(issuer=ISS, jwks="{}", from_params=("token",))
    assert params_only.header_locations == ()
    assert params_only.param_locations == ("token",)


@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        ({"issuer": ""}, "issuer", "expected a non-empty issuer string"),
        ({"jwks_uri": None}, "jwks_uri", "exactly one key source is required: jwks_uri, jwks "
         "or jwks_file (got none)"),
        ({"jwks": "{}"}, "jwks", "exactly one key source is required: jwks_uri, jwks or "
         "jwks_file (got jwks_uri, jwks)"),
        ({"jwks_uri": "file:///etc/jwks"}, "jwks_uri", "expected an http:// or https:// URL "
         "with a host"),
        ({"audiences": "orders"}, "audiences", "expected a list of audiences"),
        ({"audiences": ("",)}, "audiences[0]", "expected a non-empty string (audiences)"),
        ({"from_headers": (("bad header", ""),)}, "from_headers[0]",
         "expected an HTTP header name"),
        ({"from_headers": (("x", "\n"),)}, "from_headers[0]",
         "expected a printable ASCII prefix (may be empty)"),
        ({"from_headers": ("authorization",)}, "from_headers[0]",
         "expected a (name, prefix) pair"),
        ({"from_params": ("",)}, "from_params[0]",
         "expected a non-empty string (query parameter names)"),
        ({"forward_original_token": "yes"}, "forward_original_token", "expected true or false"),
        ({"output_payload_to_header": "x y"}, "output_payload_to_header",
         "expected an HTTP header name"),
        ({"clock_skew_seconds": -1}, "clock_skew_seconds",
         "expected a finite number of seconds >= 0"),
        ({"jwks_refresh_seconds": 0}, "jwks_refresh_seconds",
         "expected a finite number of seconds > 0"),
        ({"max_token_bytes": 8}, "max_token_bytes", "expected an integer number of bytes >= 16"),
        ({"algorithms": ()}, "algorithms", "expected at least one algorithm"),
        ({"algorithms": ("RS256", "none")}, "algorithms[1]",
         "unsigned tokens (alg 'none') are never accepted"),
        ({"algorithms": ("RS1",)}, "algorithms[0]", "unsupported algorithm; expected one of "
         "ES256, ES256K, ES384, ES512, EdDSA, HS256, HS384, HS512, PS256, PS384, PS512, RS256, "
         "RS384, RS512"),
        ({"algorithms": ("HS256",)}, "algorithms[0]", "HS256 needs a static shared secret (an "
         "'oct' key in jwks or jwks_file); it is never accepted with jwks_uri"),
    ],
)  # fmt: skip
def test_rule_validation(kwargs: dict[str, Any], field: str, message: str) -> None:
    args: dict[str, Any] = {"issuer": ISS, "jwks_uri": "https://auth.example.com/jwks"}
    args.update(kwargs)
    with pytest.raises(ConfigurationError) as info:
        JwtRule(**args)
    assert info.value.field == field
    assert str(info.value) == f"{field}: {message}"


def test_rule_is_frozen() -> None:
    rule = JwtRule(issuer=ISS, jwks="{}")
    with pytest.raises(AttributeError):
        rule.issuer = "other"  # type: ignore[misc]


def test_from_mapping_istio_spec(tmp_path: Path) -> None:
    spec = {
        "issuer": ISS,
        "audiences": ["orders"],
        "jwksUri": "https://auth.example.com/.well-known/jwks.json",
        "fromHeaders": [{"name": "X-Jwt-Assertion", "prefix": "Bearer "}, {"name": "x-token"}],
        "fromParams": ["token"],
        "forwardOriginalToken": True,
        "outputPayloadToHeader": "x-jwt-payload",
        "clockSkew": "30s",
        "algorithms": ["RS256", "ES256"],
        "jwksRefreshInterval": "5m",
        "maxTokenBytes": 4096,
    }
    assert JwtRule.from_mapping(spec) == JwtRule(
        issuer=ISS,
        audiences=("orders",),
        jwks_uri="https://auth.example.com/.well-known/jwks.json",
        from_headers=(("x-jwt-assertion", "Bearer "), ("x-token", "")),
        from_params=("token",),
        forward_original_token=True,
        output_payload_to_header="x-jwt-payload",
        clock_skew_seconds=30.0,
        algorithms=("RS256", "ES256"),
        jwks_refresh_seconds=300.0,
        max_token_bytes=4096,
    )
    path = str(tmp_path / "jwks.json")
    rule = JwtRule.from_mapping({"issuer": ISS, "jwksFile": path, "clockSkew": 5})
    assert (rule.jwks_file, rule.clock_skew_seconds) == (path, 5.0)
    assert JwtRule.from_mapping({"issuer": ISS, "jwks": "{}", "clockSkew": "1500ms"}).clock_skew_seconds == 1.5  # fmt: skip


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        ({"jwks": "{}"}, "jwtRules[2].issuer", "is required"),
        ({"issuer": ISS, "jwks": "{}", "jwksURI": "x"}, "jwtRules[2].jwksURI",
         "unknown field; expected one of issuer, audiences, jwksUri, jwks, jwksFile, "
         "fromHeaders, fromParams, forwardOriginalToken, outputPayloadToHeader, clockSkew, "
         "algorithms, jwksRefreshInterval, maxTokenBytes"),
        ({"issuer": ISS, "jwks": "{}", "outputClaimToHeaders": []},
         "jwtRules[2].outputClaimToHeaders", "is not supported by meshware"),
        ({"issuer": ISS, "jwks": "{}", "fromHeaders": [{"name": "x", "prefx": "B"}]},
         "jwtRules[2].fromHeaders[0].prefx", "unknown field; expected name or prefix"),
        ({"issuer": ISS, "jwks": "{}", "fromHeaders": [{"prefix": "B"}]},
         "jwtRules[2].fromHeaders[0].name", "expected an HTTP header name"),
        ({"issuer": ISS, "jwks": "{}", "fromHeaders": "authorization"},
         "jwtRules[2].fromHeaders", "expected a list of {name, prefix}"),
        ({"issuer": ISS, "jwks": "{}", "fromHeaders": ["authorization"]},
         "jwtRules[2].fromHeaders[0]", "expected a mapping with 'name' and optional 'prefix'"),
        ({"issuer": ISS, "jwks": "{}", "clockSkew": "1 minute"}, "jwtRules[2].clockSkew",
         'expected a duration such as "60s", "500ms", "20m" or a number of seconds'),
        ({"issuer": ISS, "jwks": "{}", "forwardOriginalToken": "true"},
         "jwtRules[2].forwardOriginalToken", "expected true or false"),
        ({"issuer": ISS, "jwksUri": "https://a/j", "jwks": "{}"}, "jwtRules[2].jwks",
         "exactly one key source is required: jwksUri, jwks or jwksFile (got jwksUri, jwks)"),
        ({"issuer": ISS}, "jwtRules[2].jwksUri",
         "exactly one key source is required: jwksUri, jwks or jwksFile (got none)"),
        ({"issuer": ISS, "jwks": "{}", "audiences": ["a", 3]}, "jwtRules[2].audiences[1]",
         "expected a non-empty string (audiences)"),
        ({"issuer": ISS, "jwks": "{}", "algorithms": ["none"]}, "jwtRules[2].algorithms[0]",
         "unsigned tokens (alg 'none') are never accepted"),
    ],
)  # fmt: skip
def test_from_mapping_errors_carry_the_full_path(
    spec: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        JwtRule.from_mapping(spec, path="jwtRules[2]")
    assert info.value.field == field
    assert str(info.value) == f"{field}: {message}"


def test_from_mapping_rejects_non_mappings() -> None:
    with pytest.raises(ConfigurationError) as info:
        JwtRule.from_mapping(["issuer"])  # type: ignore[arg-type]
    assert str(info.value) == "jwtRules[0]: expected a mapping"


# -- JwtAuthenticator construction ------------------------------------------------------------


def test_authenticator_validation(jwks_keyring: JwksKeyring) -> None:
    with pytest.raises(ConfigurationError) as info:
        JwtAuthenticator([])
    assert str(info.value) == "rules: expected at least one JwtRule"
    good = JwtRule(issuer=ISS, jwks=jwks_keyring.jwks("ec-1"))
    with pytest.raises(ConfigurationError) as info:
        JwtAuthenticator([good, JwtRule(issuer=ISS, jwks=jwks_keyring.jwks("ed-1"))])
    assert (
        str(info.value) == "rules[1].issuer: duplicate issuer; each issuer needs exactly one rule"
    )
    with pytest.raises(ConfigurationError) as info:
        JwtAuthenticator([good, JwtRule(issuer="other", jwks="{broken")])
    assert info.value.field == "rules[1].jwks"
    assert str(info.value).startswith("rules[1].jwks: invalid JWKS: not valid JSON: ")
    with pytest.raises(ConfigurationError) as info:
        JwtAuthenticator([good, {"issuer": "x"}])  # type: ignore[list-item]
    assert str(info.value) == "rules[1]: expected a JwtRule"
    authn = JwtAuthenticator([good])
    assert authn.rules == (good,)
    assert list(authn.caches) == [ISS]
    assert repr(authn) == f"JwtAuthenticator(issuers=['{ISS}'])"


# -- valid tokens ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kid", "alg"),
    [("rsa-1", "RS256"), ("rsa-1", "PS384"), ("rsa-1", "RS512"), ("ec-1", "ES256"),
     ("ed-1", "EdDSA")],
)  # fmt: skip
async def test_valid_tokens(
    authn: JwtAuthenticator, jwks_keyring: JwksKeyring, mode: str, kid: str, alg: str
) -> None:
    token = jwks_keyring.sign(kid, claims(scope="read", groups=["a"]), alg=alg)
    result = await run(authn, mode, bearer(token))
    assert result == JwtResult(
        issuer=ISS,
        subject="alice",
        principal=f"{ISS}/alice",
        audiences=("orders",),
        claims={"iss": ISS, "sub": "alice", "aud": "orders", "exp": NOW + 300, "scope": "read",
                "groups": ["a"]},
        token_source="authorization",
        header_to_strip="authorization",
        output_header=None,
    )  # fmt: skip


async def test_token_without_kid_tries_keys_of_its_algorithm(
    authn: JwtAuthenticator, jwks_keyring: JwksKeyring, mode: str
) -> None:
    token = jwks_keyring.sign("ec-1", claims(), with_kid=False)
    result = await run(authn, mode, bearer(token))
    assert result is not None and result.principal == f"{ISS}/alice"


async def test_claims_are_read_only(
    authn: JwtAuthenticator, jwks_keyring: JwksKeyring, mode: str
) -> None:
    result = await run(authn, mode, bearer(jwks_keyring.sign("ec-1", claims())))
    assert result is not None
    with pytest.raises(TypeError):
        result.claims["sub"] = "mallory"  # type: ignore[index]


async def test_audiences(jwks_keyring: JwksKeyring, mode: str) -> None:
    strict = JwtAuthenticator(
        [JwtRule(issuer=ISS, audiences=("orders",), jwks=jwks_keyring.jwks("ec-1"))],
        clock=lambda: NOW,
    )
    listed = jwks_keyring.sign("ec-1", claims(aud=["web", "orders"]))
    result = await run(strict, mode, bearer(listed))
    assert result is not None and result.audiences == ("web", "orders")
    any_aud = JwtAuthenticator(
        [JwtRule(issuer=ISS, jwks=jwks_keyring.jwks("ec-1"))], clock=lambda: NOW
    )
    for aud in ("anything", ["x", "y"], None):
        token = jwks_keyring.sign("ec-1", claims(aud=aud))
        result = await run(any_aud, mode, bearer(token))
        assert result is not None
        assert result.audiences == (() if aud is None else (aud,) if isinstance(aud, str) else tuple(aud))  # fmt: skip


async def test_missing_subject_gives_issuer_slash(
    authn: JwtAuthenticator, jwks_keyring: JwksKeyring, mode: str
) -> None:
    result = await run(authn, mode, bearer(jwks_keyring.sign("ec-1", claims(sub=None))))
    assert result is not None
    assert (result.subject, result.principal) == ("", f"{ISS}/")


@pytest.mark.parametrize(
    ("offset", "claim"),
    [(-59, "exp"), (59, "nbf"), (59, "iat")],
)
async def test_times_within_clock_skew_are_accepted(
    authn: JwtAuthenticator, jwks_keyring: JwksKeyring, mode: str, offset: int, claim: str
) -> None:
    token = jwks_keyring.sign("ec-1", claims(**{claim: NOW + offset}))
    assert await run(authn, mode, bearer(token)) is not None


# -- token locations ------------------------------------------------------------------------


async def test_no_token_is_unauthenticated_not_rejected(authn: JwtAuthenticator, mode: str) -> None:
    assert await run(authn, mode, {}) is None
    assert await run(authn, mode, {"authorization": "Basic dXNlcjpwYXNz"}) is None
    assert await run(authn, mode, {"authorization": "Bearer "}) is None
    assert await run(authn, mode, {"authorization": "Bearer    "}) is None
    assert await run(authn, mode, {}, "q=1&access_token=") is None
    assert await run(authn, mode, {"x-other": "Bearer abc"}, "token=abc") is None


async def test_bearer_prefix_is_case_insensitive(
    authn: JwtAuthenticator, jwks_keyring: JwksKeyring, mode: str
) -> None:
    token = jwks_keyring.sign("ec-1", claims())
    for value in (f"bearer {token}", f"BEARER {token}", f"Bearer   {token}  "):
        result = await run(authn, mode, {"authorization": value})
        assert result is not None and result.subject == "alice"
    # Without the space the prefix does not match: no token at that location.
    assert await run(authn, mode, {"authorization": f"Bearer{token}"}) is None


async def test_default_query_parameter(
    authn: JwtAuthenticator, jwks_keyring: JwksKeyring, mode: str
) -> None:
    token = jwks_keyring.sign("ec-1", claims())
    result = await run(authn, mode, {}, f"page=2&access_token={token}")
    assert result is not None
    assert (result.token_source, result.header_to_strip) == ("access_token", None)


async def test_custom_header_and_params(jwks_keyring: JwksKeyring, mode: str) -> None:
    rule = JwtRule(
        issuer=ISS,
        jwks=jwks_keyring.jwks("ec-1"),
        from_headers=(("x-jwt-assertion", ""), ("x-auth", "Token ")),
        from_params=("jwt", "tok en"),
    )
    authn = JwtAuthenticator([rule], clock=lambda: NOW)
    token = jwks_keyring.sign("ec-1", claims())
    result = await run(authn, mode, {"x-jwt-assertion": token})
    assert result is not None and result.header_to_strip == "x-jwt-assertion"
    result = await run(authn, mode, {"x-auth": f"token {token}"})
    assert result is not None and result.token_source == "x-auth"
    result = await run(authn, mode, {}, f"tok+en={token}")
    assert result is not None and result.token_source == "tok en"
    result = await run(authn, mode, {}, f"jwt={token}")
    assert result is not None and result.token_source == "jwt"
    # The defaults are replaced, not added to.
    assert await run(authn, mode, bearer(token)) is None
    assert await run(authn, mode, {}, f"access_token={token}") is None


async def test_first_location_found_wins(
    authn: JwtAuthenticator, jwks_keyring: JwksKeyring, mode: str
) -> None:
    good = jwks_keyring.sign("ec-1", claims(sub="header-user"))
    other = jwks_keyring.sign("ec-1", claims(sub="param-user"))
    result = await run(authn, mode, bearer(good), f"access_token={other}")
    assert result is not None and result.subject == "header-user"
    # The other token is not looked at, even when it is garbage.
    result = await run(authn, mode, bearer(good), "access_token=garbage")
    assert result is not None and result.subject == "header-user"
    # First occurrence of a repeated parameter.
    result = await run(authn, mode, {}, f"access_token={other}&access_token=garbage")
    assert result is not None and result.subject == "param-user"


async def test_issuer_must_accept_the_location(jwks_keyring: JwksKeyring, mode: str) -> None:
    rules = [
        JwtRule(issuer=ISS, jwks=jwks_keyring.jwks("ec-1")),
        JwtRule(issuer="https://partner", jwks=jwks_keyring.jwks("ed-1"),
                from_headers=(("x-partner-jwt", ""),)),
    ]  # fmt: skip
    authn = JwtAuthenticator(rules, clock=lambda: NOW)
    partner = jwks_keyring.sign("ed-1", claims(iss="https://partner"))
    result = await run(authn, mode, {"x-partner-jwt": partner})
    assert result is not None and result.principal == "https://partner/alice"
    error = await rejected(authn, mode, bearer(partner))
    assert error.reason == "unknown-issuer"
    assert (
        str(error) == "issuer 'https://partner' does not accept tokens from header 'authorization'"
    )


async def test_forward_and_output_payload(jwks_keyring: JwksKeyring, mode: str) -> None:
    rule = JwtRule(
        issuer=ISS,
        jwks=jwks_keyring.jwks("ec-1"),
        forward_original_token=True,
        output_payload_to_header="x-jwt-payload",
    )
    authn = JwtAuthenticator([rule], clock=lambda: NOW)
    token = jwks_keyring.sign("ec-1", claims())
    result = await run(authn, mode, bearer(token))
    assert result is not None
    assert result.header_to_strip is None
    assert result.output_header == ("x-jwt-payload", token.split(".")[1])
    _name, value = result.output_header
    assert json.loads(base64.urlsafe_b64decode(value + "==")) == claims()


# -- invalid tokens and attacks --------------------------------------------------------------


def _alg_none_token(payload: dict[str, Any]) -> str:
    return f"{b64json({'alg': 'none', 'typ': 'JWT'})}.{b64json(payload)}."


async def test_alg_none_is_rejected(authn: JwtAuthenticator, mode: str) -> None:
    error = await rejected(authn, mode, bearer(_alg_none_token(claims())))
    assert error.reason == "alg-not-allowed"
    assert str(error) == (
        f"algorithm 'none' is not allowed for issuer '{ISS}'; allowed: RS256, RS384, RS512, "
        "PS256, PS384, PS512, ES256, ES384, ES512, EdDSA"
    )
    assert error.issuer == ISS and error.token_source == "authorization"
    for alg in ("None", "NONE", "nOnE"):
        token = f"{b64json({'alg': alg})}.{b64json(claims())}."
        assert (await rejected(authn, mode, bearer(token))).reason == "alg-not-allowed"


def _hs256_signed_with(secret: bytes, payload: dict[str, Any], kid: str | None) -> str:
    header: dict[str, Any] = {"alg": "HS256", "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    signing_input = f"{b64json(header)}.{b64json(payload)}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def _rsa_public_pem(jwks_keyring: JwksKeyring) -> bytes:
    public = jwks_keyring.private["rsa-1"].public_key()
    pem: bytes = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem


async def test_hs256_key_confusion_is_rejected_by_default(
    authn: JwtAuthenticator, jwks_keyring: JwksKeyring, mode: str
) -> None:
    # The classic attack: sign HS256 with the issuer's public RSA key as the HMAC secret.
    forged = _hs256_signed_with(_rsa_public_pem(jwks_keyring), claims(), kid="rsa-1")
    error = await rejected(authn, mode, bearer(forged))
    assert error.reason == "alg-not-allowed"


async def test_hs256_key_confusion_fails_even_when_hs256_is_allowed(
    jwks_keyring: JwksKeyring, mode: str
) -> None:
    rule = JwtRule(
        issuer=ISS,
        jwks=jwks_keyring.jwks("rsa-1", "hs-1"),
        algorithms=("RS256", "HS256"),
    )
    authn = JwtAuthenticator([rule], clock=lambda: NOW)
    genuine = jwks_keyring.sign("hs-1", claims())
    result = await run(authn, mode, bearer(genuine))
    assert result is not None and result.principal == f"{ISS}/alice"
    pem = _rsa_public_pem(jwks_keyring)
    error = await rejected(authn, mode, bearer(_hs256_signed_with(pem, claims(), kid="rsa-1")))
    assert error.reason == "alg-not-allowed"
    assert str(error) == "key 'rsa-1' (RSA) cannot verify HS256 tokens"
    error = await rejected(authn, mode, bearer(_hs256_signed_with(pem, claims(), kid=None)))
    assert error.reason == "bad-signature"


async def test_expired(authn: JwtAuthenticator, jwks_keyring: JwksKeyring, mode: str) -> None:
    token = jwks_keyring.sign("ec-1", claims(exp=NOW - 60))
    error = await rejected(authn, mode, bearer(token))
    assert error.reason == "expired"
    assert str(error) == "the token expired at 1699999940 (now 1700000000, skew 60s)"
    assert error.www_authenticate == (
        'Bearer error="invalid_token", error_description="the token is expired"'
    )


async def test_not_yet_valid(authn: JwtAuthenticator, jwks_keyring: JwksKeyring, mode: str) -> None:
    error = await rejected(authn, mode, bearer(jwks_keyring.sign("ec-1", claims(nbf=NOW + 61))))
    assert error.reason == "not-yet-valid"
    assert str(error) == "the token is not valid before 1700000061 (now 1700000000, skew 60s)"
    error = await rejected(authn, mode, bearer(jwks_keyring.sign("ec-1", claims(iat=NOW + 120))))
    assert error.reason == "not-yet-valid"
    assert str(error) == (
        "the token is issued in the future at 1700000120 (now 1700000000, skew 60s)"
    )


async def test_clock_skew_is_per_rule(jwks_keyring: JwksKeyring, mode: str) -> None:
    rule = JwtRule(issuer=ISS, jwks=jwks_keyring.jwks("ec-1"), clock_skew_seconds=0)
    clock = FakeClock(NOW)
    authn = JwtAuthenticator([rule], clock=clock)
    token = jwks_keyring.sign("ec-1", claims(exp=NOW + 10))
    clock.now = NOW + 9.5
    assert await run(authn, mode, bearer(token)) is not None
    clock.now = NOW + 10
    assert (await rejected(authn, mode, bearer(token))).reason == "expired"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"exp": None}, "the token has no 'exp' claim; an expiry is required"),
        ({"exp": "tomorrow"}, "the 'exp' claim must be a number of seconds since the epoch"),
        ({"nbf": True}, "the 'nbf' claim must be a number of seconds since the epoch"),
        ({"aud": 7}, "the 'aud' claim must be a string or a list of strings"),
        ({"aud": ["orders", 7]}, "the 'aud' claim must be a string or a list of strings"),
        ({"sub": 42}, "the 'sub' claim is not a string"),
    ],
)
async def test_malformed_claims(
    authn: JwtAuthenticator,
    jwks_keyring: JwksKeyring,
    mode: str,
    overrides: dict[str, Any],
    message: str,
) -> None:
    error = await rejected(authn, mode, bearer(jwks_keyring.sign("ec-1", claims(**overrides))))
    assert (error.reason, str(error)) == ("malformed", message)


async def test_wrong_audience(
    authn: JwtAuthenticator, jwks_keyring: JwksKeyring, mode: str
) -> None:
    error = await rejected(authn, mode, bearer(jwks_keyring.sign("ec-1", claims(aud="billing"))))
    assert error.reason == "bad-audience"
    assert str(error) == "audience ['billing'] is not among ['orders', 'payments']"
    error = await rejected(authn, mode, bearer(jwks_keyring.sign("ec-1", claims(aud=None))))
    assert error.reason == "bad-audience"


async def test_wrong_or_missing_issuer(
    authn: JwtAuthenticator, jwks_keyring: JwksKeyring, mode: str
) -> None:
    error = await rejected(
        authn, mode, bearer(jwks_keyring.sign("ec-1", claims(iss="https://evil")))
    )
    assert (error.reason, str(error)) == ("unknown-issuer", "issuer 'https://evil' is not accepted")
    assert error.issuer is None
    error = await rejected(authn, mode, bearer(jwks_keyring.sign("ec-1", claims(iss=None))))
    assert (error.reason, str(error)) == ("unknown-issuer", "the token has no 'iss' claim")
    token = f"{b64json({'alg': 'ES256'})}.{b64json({'iss': ['x']})}.{b64(b'sig')}"
    error = await rejected(authn, mode, bearer(token))
    assert (error.reason, str(error)) == ("malformed", "the 'iss' claim is not a string")


async def test_unknown_kid(authn: JwtAuthenticator, jwks_keyring: JwksKeyring, mode: str) -> None:
    token = jwks_keyring.sign("rsa-2", claims())  # kid rsa-2 is not in the inline set
    error = await rejected(authn, mode, bearer(token))
    assert error.reason == "unknown-kid"
    assert str(error) == f"key id 'rsa-2' is not among the keys of issuer '{ISS}'"


async def test_no_key_for_the_algorithm(jwks_keyring: JwksKeyring, mode: str) -> None:
    rule = JwtRule(issuer=ISS, jwks=jwks_keyring.jwks("rsa-1"))
    authn = JwtAuthenticator([rule], clock=lambda: NOW)
    token = jwks_keyring.sign("ec-1", claims(), with_kid=False)
    error = await rejected(authn, mode, bearer(token))
    assert (error.reason, str(error)) == (
        "no-keys",
        f"issuer '{ISS}' has no key that can verify ES256 tokens",
    )


async def test_bad_signatures(
    authn: JwtAuthenticator, jwks_keyring: JwksKeyring, mode: str
) -> None:
    token = jwks_keyring.sign("ec-1", claims())
    header, payload, signature = token.split(".")
    tampered = f"{header}.{b64json(claims(sub='admin'))}.{signature}"
    error = await rejected(authn, mode, bearer(tampered))
    assert (error.reason, str(error)) == (
        "bad-signature",
        f"signature verification failed for issuer '{ISS}'",
    )
    # Signed by a key the issuer does not have, under a kid it does have.
    impostor = jwks_keyring.sign("rsa-2", claims(), headers={"kid": "rsa-1"})
    assert (await rejected(authn, mode, bearer(impostor))).reason == "bad-signature"
    # An empty signature.
    assert (await rejected(authn, mode, bearer(f"{header}.{payload}."))).reason == "bad-signature"


async def test_oversized_token_is_rejected_before_parsing(
    authn: JwtAuthenticator, mode: str
) -> None:
    error = await rejected(authn, mode, bearer("A" * 8193))
    assert (error.reason, str(error)) == (
        "too-large",
        "token of 8193 bytes exceeds the limit of 8192",
    )


async def test_per_rule_size_limit(jwks_keyring: JwksKeyring, mode: str) -> None:
    rules = [
        JwtRule(issuer=ISS, jwks=jwks_keyring.jwks("ec-1"), max_token_bytes=200),
        JwtRule(issuer="https://big", jwks=jwks_keyring.jwks("ed-1")),
    ]
    authn = JwtAuthenticator(rules, clock=lambda: NOW)
    token = jwks_keyring.sign("ec-1", claims(pad="x" * 200))
    error = await rejected(authn, mode, bearer(token))
    assert error.reason == "too-large"
    assert str(error) == f"token of {len(token)} bytes exceeds the limit of 200"


@pytest.mark.parametrize(
    ("token", "message"),
    [
        ("garbage", "the token is not a compact JWS: expected 3 dot-separated parts, got 1"),
        ("a.b", "the token is not a compact JWS: expected 3 dot-separated parts, got 2"),
        ("a.b.c.d.e", "the token is not a compact JWS: encrypted tokens (JWE) are not supported"),
        ("!!!.???.***", "the token header is not base64url"),
        ("eyI.eyI.sig", "the token header is not valid JSON"),
        ("e30.***.abc", "the token payload is not base64url"),
        ("e30====.e30.abc", "the token header is not base64url"),
        ("e31.e30.abc", "the token header is not canonical base64url"),
        (f"{b64json([1])}.e30.abc", "the token header is not a JSON object"),
        (f"e30.{b64json('iss')}.abc", "the token payload is not a JSON object"),
        ("e30." + b64(b'{"exp": Infinity}') + ".abc", "the token payload is not valid JSON"),
        ("e30." + b64(b"\xff\xfe") + ".abc", "the token payload is not valid JSON"),
        (f"e30.{b64(b'[' * 5000)}.abc", "the token payload is not valid JSON"),
        ("e30.e30.a+b", "the token signature is not base64url"),
        ("\u00e9\u00e9.e30.abc", "the token header is not base64url"),
    ],
)
async def test_malformed_tokens(
    authn: JwtAuthenticator, mode: str, token: str, message: str
) -> None:
    error = await rejected(authn, mode, bearer(token))
    assert (error.reason, str(error)) == ("malformed", message)
    assert error.token_source == "authorization"


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ({"typ": "JWT"}, "the token header has no 'alg' string"),
        ({"alg": "ES256", "kid": 1}, "the token header 'kid' is not a string"),
        ({"alg": "ES256", "crit": ["exp"], "exp": 1},
         "the token header has critical extensions ('crit'), none are supported"),
        ({"alg": "ES256", "b64": False, "crit": ["b64"]},
         "the token header has critical extensions ('crit'), none are supported"),
    ],
)  # fmt: skip
async def test_malformed_headers(
    authn: JwtAuthenticator, mode: str, header: dict[str, Any], message: str
) -> None:
    token = f"{b64json(header)}.{b64json(claims())}.{b64(b'sig')}"
    error = await rejected(authn, mode, bearer(token))
    assert (error.reason, str(error)) == ("malformed", message)


def test_invalid_token_is_an_identity_error() -> None:
    error = InvalidToken("boom", reason="expired", issuer=ISS, token_source="authorization")
    assert isinstance(error, IdentityError)
    assert (error.reason, error.issuer, error.token_source, str(error)) == (
        "expired",
        ISS,
        "authorization",
        "boom",
    )
    assert {
        "malformed", "too-large", "unknown-issuer", "bad-signature", "alg-not-allowed",
        "expired", "not-yet-valid", "bad-audience", "unknown-kid", "no-keys",
    } == REASONS  # fmt: skip
    assert InvalidToken("x", reason="no-keys").www_authenticate == (
        'Bearer error="invalid_token", error_description="no key is available to verify the token"'
    )
    prefix = 'Bearer error="invalid_token", error_description="'
    for reason in REASONS:
        error = InvalidToken('detail with "quotes" and \r\n', reason=reason)
        value = error.www_authenticate
        assert value == f'{prefix}{error.description}"'
        # RFC 6750 section 3: error_description is %x20-21 / %x23-5B / %x5D-7E only.
        assert all(0x20 <= ord(c) <= 0x7E and c not in '"\\' for c in error.description)


# -- JWKS over HTTP: rotation, rate limit, failures ------------------------------------------


def _remote(server: JwksServer, **kwargs: Any) -> tuple[JwtAuthenticator, FakeClock]:
    clock = FakeClock(0.0)
    rule = JwtRule(issuer=ISS, jwks_uri=server.url)
    return JwtAuthenticator([rule], clock=lambda: NOW, refresh_clock=clock, **kwargs), clock


async def test_remote_keys_are_fetched_on_first_use(
    jwks_server: JwksServer, jwks_keyring: JwksKeyring, mode: str
) -> None:
    jwks_server.serve(jwks_keyring.jwks("rsa-1"))
    authn, clock = _remote(jwks_server)
    assert jwks_server.hits == 0
    token = jwks_keyring.sign("rsa-1", claims())
    for _ in range(3):
        result = await run(authn, mode, bearer(token))
        assert result is not None and result.principal == f"{ISS}/alice"
    assert jwks_server.hits == 1
    # Stale after jwks_refresh_seconds: the next request refetches.
    clock.now = 1200.0
    assert await run(authn, mode, bearer(token)) is not None
    assert jwks_server.hits == 2


async def test_key_rotation_is_picked_up_on_unknown_kid(
    jwks_server: JwksServer, jwks_keyring: JwksKeyring, mode: str
) -> None:
    jwks_server.serve(jwks_keyring.jwks("rsa-1"))
    authn, clock = _remote(jwks_server)
    assert await run(authn, mode, bearer(jwks_keyring.sign("rsa-1", claims()))) is not None
    # The issuer rotates: rsa-2 appears at the URL.
    jwks_server.serve(jwks_keyring.jwks("rsa-1", "rsa-2"))
    clock.now = 30.0
    result = await run(authn, mode, bearer(jwks_keyring.sign("rsa-2", claims(sub="bob"))))
    assert result is not None and result.subject == "bob"
    assert jwks_server.hits == 2


async def test_unknown_kid_refetch_is_rate_limited(
    jwks_server: JwksServer, jwks_keyring: JwksKeyring, mode: str
) -> None:
    jwks_server.serve(jwks_keyring.jwks("rsa-1"))
    authn, clock = _remote(jwks_server, min_refetch_seconds=30.0)
    await run(authn, mode, bearer(jwks_keyring.sign("rsa-1", claims())))
    assert jwks_server.hits == 1
    forged = jwks_keyring.sign("rsa-2", claims(), headers={"kid": "made-up"})
    # A flood of made-up kids within the window costs no fetch at all...
    for now in (1.0, 5.0, 29.9):
        clock.now = now
        assert (await rejected(authn, mode, bearer(forged))).reason == "unknown-kid"
    assert jwks_server.hits == 1
    # ...and at most one per window afterwards.
    for now in (30.0, 31.0, 59.0):
        clock.now = now
        assert (await rejected(authn, mode, bearer(forged))).reason == "unknown-kid"
    assert jwks_server.hits == 2
    clock.now = 60.0
    await rejected(authn, mode, bearer(forged))
    assert jwks_server.hits == 3


async def test_fetch_failure_keeps_serving_old_keys(
    jwks_server: JwksServer, jwks_keyring: JwksKeyring, mode: str
) -> None:
    errors: list[str] = []
    jwks_server.serve(jwks_keyring.jwks("rsa-1"))
    authn, clock = _remote(jwks_server, on_jwks_error=lambda uri, exc: errors.append(str(exc)))
    token = jwks_keyring.sign("rsa-1", claims())
    assert await run(authn, mode, bearer(token)) is not None
    jwks_server.serve("down", status=502)
    clock.now = 5000.0  # well past the refresh interval
    assert await run(authn, mode, bearer(token)) is not None
    assert errors == ["HTTP status 502, expected 200"]
    cache = authn.caches[ISS]
    assert (cache.fetch_count, cache.fetch_failures) == (1, 1)
    assert jwks_server.hits == 2


async def test_no_keys_when_the_issuer_was_never_reachable(
    jwks_server: JwksServer, jwks_keyring: JwksKeyring, mode: str
) -> None:
    jwks_server.serve("", status=500)
    authn, clock = _remote(jwks_server)
    token = jwks_keyring.sign("rsa-1", claims())
    error = await rejected(authn, mode, bearer(token))
    assert error.reason == "no-keys"
    assert str(error) == (
        f"no verification keys for issuer '{ISS}' are available; "
        "last fetch error: ValueError: HTTP status 500, expected 200"
    )
    assert jwks_server.hits == 1
    # Recovery after the rate-limit window.
    jwks_server.serve(jwks_keyring.jwks("rsa-1"))
    clock.now = 30.0
    assert await run(authn, mode, bearer(token)) is not None


async def test_explicit_refresh(jwks_server: JwksServer, jwks_keyring: JwksKeyring) -> None:
    jwks_server.serve(jwks_keyring.jwks("ec-1"))
    authn, _ = _remote(jwks_server)
    authn.refresh()
    await authn.refresh_async()
    assert jwks_server.hits == 2
    assert authn.caches[ISS].key_set.key_ids == frozenset({"ec-1"})


# -- properties -----------------------------------------------------------------------------


@cache
def _fuzz_authenticator(keyring: JwksKeyring) -> JwtAuthenticator:
    rules = [
        JwtRule(issuer=ISS, jwks=keyring.jwks("rsa-1", "ec-1", "ed-1"), audiences=("orders",)),
        JwtRule(issuer="iss2", jwks=keyring.jwks("rsa-2"), from_headers=(("x-jwt", ""),),
                from_params=("t",)),
    ]  # fmt: skip
    return JwtAuthenticator(rules, clock=lambda: NOW)


def _outcome(keyring: JwksKeyring, headers: dict[str, str], query: str = "") -> None:
    try:
        result = _fuzz_authenticator(keyring).authenticate(headers, query)
    except InvalidToken as exc:
        assert exc.reason in REASONS
    else:
        assert result is None  # nothing here is signed by a configured key


# jwks_keyring is session-scoped, so sharing it across examples is safe.
@settings(max_examples=300, deadline=None)
@given(value=st.text(max_size=300), query=st.text(max_size=100))
def test_arbitrary_header_values_only_raise_invalid_token(
    jwks_keyring: JwksKeyring, value: str, query: str
) -> None:
    _outcome(jwks_keyring, {"authorization": value, "x-jwt": value}, query)
    _outcome(jwks_keyring, {"authorization": "Bearer " + value})
    _outcome(jwks_keyring, {"x-jwt": value})
    _outcome(jwks_keyring, {}, "t=" + value)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    header=st.dictionaries(
        st.sampled_from(["alg", "kid", "typ", "crit", "b64", "x"]), _json, max_size=4
    )
    | _json,
    payload=st.dictionaries(
        st.sampled_from(["iss", "sub", "aud", "exp", "nbf", "iat", "x"]), _json, max_size=6
    ).map(lambda d: {**d, "iss": ISS} if "iss" not in d else d)
    | _json,
    signature=st.binary(max_size=80),
)
def test_structured_forgeries_only_raise_invalid_token(
    jwks_keyring: JwksKeyring, header: Any, payload: Any, signature: bytes
) -> None:
    token = f"{b64json(header)}.{b64json(payload)}.{b64(signature)}"
    with pytest.raises(InvalidToken) as info:
        _fuzz_authenticator(jwks_keyring).authenticate(bearer(token))
    assert info.value.reason in REASONS


# -- concurrency ----------------------------------------------------------------------------


def test_threads_share_one_fetch_for_a_new_kid(
    jwks_server: JwksServer, jwks_keyring: JwksKeyring
) -> None:
    jwks_server.serve(jwks_keyring.jwks("rsa-1"))
    authn, clock = _remote(jwks_server)
    authn.refresh()
    jwks_server.serve(jwks_keyring.jwks("rsa-1", "rsa-2"))
    clock.now = 100.0
    token = jwks_keyring.sign("rsa-2", claims())
    results: list[object] = []

    def call() -> None:
        try:
            results.append(authn.authenticate(bearer(token)))
        except InvalidToken as exc:  # pragma: no cover - reported by the assertion below
            results.append(exc)

    jwks_server.arrived.clear()
    jwks_server.release.clear()  # hold the refetch in flight
    first = threading.Thread(target=call)
    first.start()
    assert jwks_server.arrived.wait(timeout=10)
    second = threading.Thread(target=call)
    second.start()
    jwks_server.release.set()
    first.join(timeout=10)
    second.join(timeout=10)
    assert [getattr(r, "principal", r) for r in results] == [f"{ISS}/alice"] * 2
    assert jwks_server.hits == 2


async def test_async_requests_share_one_fetch_for_a_new_kid(
    jwks_server: JwksServer, jwks_keyring: JwksKeyring
) -> None:
    jwks_server.serve(jwks_keyring.jwks("rsa-1"))
    authn, clock = _remote(jwks_server)
    await authn.refresh_async()
    jwks_server.serve(jwks_keyring.jwks("rsa-2"))
    clock.now = 100.0
    token = jwks_keyring.sign("rsa-2", claims())
    results = await asyncio.gather(*(authn.authenticate_async(bearer(token)) for _ in range(5)))
    assert [r.principal if r else None for r in results] == [f"{ISS}/alice"] * 5
    assert jwks_server.hits == 2


async def test_a_cancelled_request_does_not_cancel_the_shared_fetch(
    jwks_keyring: JwksKeyring,
) -> None:
    gate = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        await gate.wait()
        return httpx.Response(200, text=jwks_keyring.jwks("ec-1"))

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        rule = JwtRule(issuer=ISS, jwks_uri="https://auth.example.com/jwks")
        authn = JwtAuthenticator([rule], clock=lambda: NOW, async_http_client=client)
        token = jwks_keyring.sign("ec-1", claims())
        first = asyncio.create_task(authn.authenticate_async(bearer(token)))
        await asyncio.sleep(0)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        gate.set()
        result = await authn.authenticate_async(bearer(token))
        assert result is not None and result.subject == "alice"
        assert authn.caches[ISS].fetch_count == 1
