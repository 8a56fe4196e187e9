"""JWT request authentication through both shells, alone and in front of authorization."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from meshware.exceptions import ConfigurationError
from meshware.inbound import asgi, wsgi
from meshware.inbound.record import RequestRecord, record_of
from meshware.policy.authz import AuthorizationPolicy, Condition, Rule, Source
from meshware.policy.jwt import JwtAuthenticator, JwtRule

ISS = "https://auth.example.com"
NOW = 1_700_000_000.0
KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_KEY = ec.generate_private_key(ec.SECP256R1())
JWKS = json.dumps({"keys": [{**ECAlgorithm.to_jwk(KEY.public_key(), as_dict=True), "kid": "k1"}]})


def token(key: Any = KEY, **claims: Any) -> str:
    payload = {"iss": ISS, "sub": "alice", "exp": NOW + 600, **claims}
    return jwt.encode(payload, key, algorithm="ES256", headers={"kid": "k1"})


def rule(**options: Any) -> JwtRule:
    return JwtRule(issuer=ISS, jwks=JWKS, **options)


def b64url(data: dict[str, Any]) -> str:
    raw = json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


# -- one application, two shells ------------------------------------------------------------------


def seen_by_app(headers: dict[str, str], query: str) -> dict[str, Any]:
    return {
        "authorization": headers.get("authorization"),
        "x-jwt-payload": headers.get("x-jwt-payload"),
        "query": query,
    }


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    headers = {k.decode(): v.decode() for k, v in scope["headers"]}
    body = json.dumps(seen_by_app(headers, scope["query_string"].decode())).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def wsgi_app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    headers = {
        k[5:].lower().replace("_", "-"): v for k, v in environ.items() if k.startswith("HTTP_")
    }
    start_response("200 OK", [])
    return [json.dumps(seen_by_app(headers, environ["QUERY_STRING"])).encode()]


class Shell:
    """``server -> JwtAuthenticationMiddleware [-> AuthorizationMiddleware] -> app``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.module: Any = asgi if kind == "asgi" else wsgi
        self.records: list[RequestRecord] = []
        self.app: Any = None

    def build(self, *rules: JwtRule, policies: list[AuthorizationPolicy] | None = None) -> Shell:
        app: Any = asgi_app if self.kind == "asgi" else wsgi_app
        if policies is not None:
            app = self.module.AuthorizationMiddleware(app, policies=policies)
        authenticator = JwtAuthenticator(rules or [rule()], clock=lambda: NOW)
        self.app = self.module.JwtAuthenticationMiddleware(app, authenticator=authenticator)
        return self

    def server(self) -> Any:
        inner = self.app
        if self.kind == "asgi":

            async def asgi_server(scope: dict[str, Any], receive: Any, send: Any) -> None:
                self.records.append(record_of(scope))
                await inner(scope, receive, send)

            return asgi_server

        def wsgi_server(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
            self.records.append(record_of(environ))
            return inner(environ, start_response)  # type: ignore[no-any-return]

        return wsgi_server

    async def request(self, url: str, **kwargs: Any) -> httpx.Response:
        if self.kind == "asgi":
            transport = httpx.ASGITransport(app=self.server())
            async with httpx.AsyncClient(transport=transport, base_url="http://orders") as client:
                return await client.get(url, **kwargs)
        with httpx.Client(
            transport=httpx.WSGITransport(app=self.server()), base_url="http://orders"
        ) as sync_client:
            return sync_client.get(url, **kwargs)

    @property
    def record(self) -> RequestRecord:
        return self.records[-1]


@pytest.fixture(params=["asgi", "wsgi"])
def shell(request: pytest.FixtureRequest) -> Shell:
    return Shell(request.param)


def bearer(value: str) -> dict[str, str]:
    return {"authorization": f"Bearer {value}"}


# -- authentication -------------------------------------------------------------------------------


async def test_no_token_passes_unauthenticated(shell: Shell) -> None:
    shell.build()

    response = await shell.request("/")

    assert response.status_code == 200
    assert (shell.record.request_principal, shell.record.claims) == (None, None)


async def test_a_valid_token_sets_the_principal_and_is_removed(shell: Shell) -> None:
    shell.build()

    response = await shell.request("/", headers=bearer(token(scope="orders:read")))

    assert response.status_code == 200
    assert response.json()["authorization"] is None  # the app never sees the credential
    assert shell.record.request_principal == f"{ISS}/alice"
    assert shell.record.claims == {
        "iss": ISS,
        "sub": "alice",
        "exp": NOW + 600,
        "scope": "orders:read",
    }
    assert shell.record.facts is not None
    assert shell.record.facts.request_principal == f"{ISS}/alice"
    assert "authorization" not in shell.record.facts.headers


async def test_forward_original_token_keeps_the_header(shell: Shell) -> None:
    shell.build(rule(forward_original_token=True))
    value = token()

    response = await shell.request("/", headers=bearer(value))

    assert response.json()["authorization"] == f"Bearer {value}"


async def test_the_payload_is_output_and_cannot_be_forged(shell: Shell) -> None:
    shell.build(rule(output_payload_to_header="x-jwt-payload"))
    value = token(role="admin")
    forged = b64url({"iss": ISS, "sub": "mallory"})

    with_token = await shell.request("/", headers={**bearer(value), "x-jwt-payload": forged})
    without_token = await shell.request("/", headers={"x-jwt-payload": forged})

    assert with_token.json()["x-jwt-payload"] == value.split(".")[1]
    assert without_token.json()["x-jwt-payload"] is None
    assert shell.records[0].facts is not None
    assert shell.records[0].facts.headers["x-jwt-payload"] == value.split(".")[1]


async def test_a_token_in_the_query_is_accepted_and_left_in_place(shell: Shell) -> None:
    shell.build()
    value = token()

    response = await shell.request("/", params={"access_token": value})

    assert response.status_code == 200
    assert response.json()["query"] == f"access_token={value}"
    assert shell.record.request_principal == f"{ISS}/alice"


@pytest.mark.parametrize(
    ("value", "reason", "description"),
    [
        (token(exp=NOW - 3600), "expired", "the token is expired"),
        (token(OTHER_KEY), "bad-signature", "the token signature is invalid"),
        (token(iss="https://elsewhere"), "unknown-issuer", "the token issuer is not accepted"),
        ("not-a-jwt", "malformed", "the token is malformed"),
    ],
)
async def test_an_invalid_token_gets_401(
    shell: Shell, value: str, reason: str, description: str
) -> None:
    shell.build()

    response = await shell.request("/", headers=bearer(value))

    assert response.status_code == 401
    assert response.json() == {
        "status": 401,
        "error": "unauthorized",
        "detail": description,
        "reason": reason,
    }
    assert response.headers["www-authenticate"] == (
        f'Bearer error="invalid_token", error_description="{description}"'
    )
    assert shell.record.extra == {"jwt_error": reason}
    assert shell.record.request_principal is None


# -- with authorization -----------------------------------------------------------------------------


async def test_the_principal_feeds_request_principals_rules(shell: Shell) -> None:
    alice_only = AuthorizationPolicy(
        name="alice-only", rules=[Rule(from_=[Source(request_principals=[f"{ISS}/alice"])])]
    )
    shell.build(policies=[alice_only])

    alice = await shell.request("/", headers=bearer(token()))
    bob = await shell.request("/", headers=bearer(token(sub="bob")))
    anonymous = await shell.request("/")

    assert (alice.status_code, bob.status_code, anonymous.status_code) == (200, 403, 403)
    assert shell.records[0].authz_policy == "alice-only"
    assert shell.records[1].authz_reason == "no ALLOW policy matched"


async def test_claims_feed_when_conditions(shell: Shell) -> None:
    readers = AuthorizationPolicy(
        name="readers",
        rules=[Rule(when=[Condition(key="request.auth.claims[scope]", values=["orders:read"])])],
    )
    shell.build(policies=[readers])

    listed = await shell.request("/", headers=bearer(token(scope=["orders:write", "orders:read"])))
    other = await shell.request("/", headers=bearer(token(scope="orders:write")))

    assert (listed.status_code, other.status_code) == (200, 403)


async def test_nested_claims(shell: Shell) -> None:
    admins = AuthorizationPolicy(
        name="admins",
        rules=[Rule(when=[Condition(key="request.auth.claims[realm][role]", values=["admin"])])],
    )
    shell.build(policies=[admins])

    admin = await shell.request("/", headers=bearer(token(realm={"role": "admin"})))
    user = await shell.request("/", headers=bearer(token(realm={"role": "user"})))

    assert (admin.status_code, user.status_code) == (200, 403)


# -- arguments and ASGI specifics ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "expected at least one JwtRule, or an authenticator"),
        (
            {"rules": [rule()], "authenticator": JwtAuthenticator([rule()])},
            "expected either rules or an authenticator, not both",
        ),
    ],
)
def test_bad_arguments(kind: str, options: dict[str, Any], message: str) -> None:
    module: Any = asgi if kind == "asgi" else wsgi

    with pytest.raises(ConfigurationError) as caught:
        module.JwtAuthenticationMiddleware(asgi_app, **options)

    assert caught.value.field == "rules"
    assert message in str(caught.value)


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_rules_build_an_authenticator(kind: str) -> None:
    module: Any = asgi if kind == "asgi" else wsgi

    middleware = module.JwtAuthenticationMiddleware(asgi_app, rules=[rule()])

    assert middleware.authenticator.rules == (rule(),)


async def test_an_invalid_token_closes_a_websocket() -> None:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    middleware = asgi.JwtAuthenticationMiddleware(
        asgi_app, authenticator=JwtAuthenticator([rule()], clock=lambda: NOW)
    )
    scope = {
        "type": "websocket",
        "path": "/ws",
        "headers": [(b"authorization", b"Bearer nope")],
        "query_string": b"",
    }

    await middleware(scope, None, send)  # type: ignore[arg-type]

    assert sent == [{"type": "websocket.close", "code": 1008}]


async def test_lifespan_passes_through() -> None:
    seen: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    await asgi.JwtAuthenticationMiddleware(app, rules=[rule()])(
        {"type": "lifespan"},
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
    )

    assert seen == ["lifespan"]
