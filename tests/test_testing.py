"""meshware.testing and its pytest plugin: the helpers users test their services with."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshware.config import load_config
from meshware.exceptions import CertificateRejected, ConfigurationError
from meshware.identity.bundle import PeerVerifier
from meshware.identity.spiffe import SpiffeId
from meshware.inbound.asgi.stack import build_asgi_stack
from meshware.inbound.record import IDENTITY_KEY, RECORD_KEY
from meshware.inbound.stack import InboundConfig
from meshware.inbound.wsgi.stack import build_wsgi_stack
from meshware.outbound.discovery import StaticRegistry
from meshware.outbound.endpoints import Endpoint
from meshware.outbound.transport_retry import RetryTransport
from meshware.policy.authz import AuthorizationPolicy, Authorizer, Operation, Rule, Source
from meshware.policy.jwt import InvalidToken, JwtAuthenticator
from meshware.testing import (
    CLAIMS_EXTENSION,
    DEFAULT_ISSUER,
    PEER_EXTENSION,
    FakeClock,
    JwtIssuer,
    MeshPeer,
    MeshTestCA,
    MeshTestTransport,
    MeshTestWSGITransport,
    MockUpstream,
    as_peer,
    assert_allowed,
    assert_denied,
    default_ca,
    default_issuer,
    fault_injecting_transport,
    jwt_rule,
    jwt_token,
    request_facts,
)

ROOT = Path(__file__).resolve().parent.parent
ORDERS = "cluster.local/ns/default/sa/orders"


# -- FakeClock ---------------------------------------------------------------------------------


async def test_fake_clock_moves_only_when_told() -> None:
    clock = FakeClock(100.0)

    assert (clock(), clock.now) == (100.0, 100.0)
    assert clock.advance(2.5) == 102.5
    clock.sleep(0.5)
    await clock.async_sleep(1)
    assert clock() == 104.0
    assert repr(clock) == "FakeClock(now=104.0)"
    assert FakeClock()() == 0.0


@pytest.mark.parametrize("seconds", [-1.0, float("inf"), float("nan"), True])
def test_fake_clock_never_goes_back(seconds: float) -> None:
    clock = FakeClock()

    with pytest.raises(ConfigurationError) as caught:
        clock.advance(seconds)
    assert caught.value.field == "seconds"
    assert str(caught.value).startswith("seconds: expected a finite number of seconds >= 0")
    assert clock() == 0.0


# -- peers -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "options", "uri"),
    [
        ("orders", {}, "spiffe://cluster.local/ns/default/sa/orders"),
        (
            "orders",
            {"namespace": "shop", "trust_domain": "example.org"},
            "spiffe://example.org/ns/shop/sa/orders",
        ),
        (
            "cluster.local/ns/shop/sa/cart",
            {"namespace": "ignored"},
            "spiffe://cluster.local/ns/shop/sa/cart",
        ),
        ("spiffe://td.test/ns/a/sa/b", {}, "spiffe://td.test/ns/a/sa/b"),
        (SpiffeId.parse("spiffe://td.test/ns/a/sa/c"), {}, "spiffe://td.test/ns/a/sa/c"),
    ],
    ids=["service", "service-elsewhere", "principal", "spiffe-uri", "spiffe-id"],
)
def test_as_peer(who: str | SpiffeId, options: dict[str, str], uri: str) -> None:
    peer = as_peer(who, **options)

    assert str(peer) == uri
    assert peer.principal == uri.removeprefix("spiffe://")
    assert as_peer(peer) is peer
    assert (peer.namespace, peer.service_account) == tuple(uri.split("/")[4::2])


@pytest.mark.parametrize(
    ("who", "message"),
    [
        ("", "peer: expected a service name, a principal or a SPIFFE id"),
        (42, "peer: expected a service name, a principal or a SPIFFE id"),
        (
            "spiffe://cluster.local",
            "peer: expected a workload identity: <trust-domain>/ns/<namespace>/sa/<account>",
        ),
        (
            "cluster.local/team/x",
            "peer: expected a workload identity: <trust-domain>/ns/<namespace>/sa/<account>",
        ),
        (
            "Bad Name",
            "peer: expected a service name, a principal or a SPIFFE id: invalid SPIFFE id",
        ),
    ],
    ids=["empty", "not-a-string", "trust-domain-only", "not-a-workload", "invalid"],
)
def test_bad_peers(who: Any, message: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        as_peer(who)

    assert str(caught.value).startswith(message)
    assert (caught.value.field, caught.value.value) == ("peer", who)


@given(st.text(max_size=60))
def test_any_text_is_a_peer_or_a_configuration_error(who: str) -> None:
    try:
        peer = as_peer(who)
    except ConfigurationError as exc:
        assert exc.field == "peer"
    else:
        assert isinstance(peer, MeshPeer)
        assert peer.principal.count("/") == 4


# -- the test CA -------------------------------------------------------------------------------


def test_the_ca_issues_verifiable_certificates_per_peer(tmp_path: Path) -> None:
    with MeshTestCA(tmp_path / "ca", trust_domain="cluster.local") as ca:
        verifier = PeerVerifier(ca.trust_bundles())
        pem = ca.certificate_pem("orders")

        assert ca.certificate_pem(as_peer("orders")) is pem
        assert (
            verifier.verify_pem(pem).spiffe_id.uri == "spiffe://cluster.local/ns/default/sa/orders"
        )
        assert ca.bundle_path == tmp_path / "ca" / "bundle.pem"
        with pytest.raises(CertificateRejected) as caught:
            verifier.verify_pem(ca.certificate_pem("spiffe://evil.example/ns/default/sa/orders"))
        assert caught.value.reason == "unknown-trust-domain"
    assert (tmp_path / "ca").exists()  # a directory it was given is not removed


def test_a_temporary_ca_removes_its_directory() -> None:
    ca = MeshTestCA()
    directory = ca.directory

    assert ca.bundle_path.is_file()
    ca.close()
    assert not directory.exists()
    assert repr(default_ca()).startswith("MeshTestCA(trust_domain='cluster.local', directory=")
    assert default_ca() is default_ca()


# -- JWTs --------------------------------------------------------------------------------------


def authenticate(rule_issuer: JwtIssuer, token: str, **options: Any) -> Any:
    return JwtAuthenticator([rule_issuer.rule], **options).authenticate(
        {"authorization": f"Bearer {token}"}
    )


def test_tokens_verify_with_the_issuers_rule() -> None:
    issuer = JwtIssuer("https://idp.test", audiences=["shop"], clock=lambda: 1_000_000.0)

    result = authenticate(
        issuer, issuer.token({"scope": "read"}, subject="alice"), clock=lambda: 1_000_100.0
    )

    assert result.principal == "https://idp.test/alice"
    assert dict(result.claims) == {
        "iss": "https://idp.test",
        "sub": "alice",
        "iat": 1_000_000,
        "exp": 1_003_600,
        "aud": "shop",
        "scope": "read",
    }
    assert issuer.principal({"sub": "bob"}) == "https://idp.test/bob"
    assert issuer.rule.audiences == ("shop",)


def test_expired_and_foreign_tokens_are_refused() -> None:
    issuer, other = JwtIssuer("https://a.test"), JwtIssuer("https://b.test")

    with pytest.raises(InvalidToken) as expired:
        authenticate(issuer, issuer.token(expires_in=-120))
    with pytest.raises(InvalidToken) as foreign:
        authenticate(issuer, other.token())
    assert (expired.value.reason, foreign.value.reason) == ("expired", "unknown-issuer")


def test_the_default_issuer_and_its_rule_match() -> None:
    assert jwt_rule() is default_issuer().rule
    assert jwt_rule().issuer == DEFAULT_ISSUER
    result = JwtAuthenticator([jwt_rule("https://other.test")]).authenticate(
        {"authorization": "Bearer " + jwt_token({"sub": "carol"}, issuer="https://other.test")}
    )
    assert result is not None and result.principal == "https://other.test/carol"
    with pytest.raises(ConfigurationError, match="issuer: expected a non-empty issuer"):
        JwtIssuer("")


# -- authorization checks ----------------------------------------------------------------------

POLICIES = [
    AuthorizationPolicy(
        name="block-admin", action="DENY", rules=[Rule(to=[Operation(paths=["/admin*"])])]
    ),
    AuthorizationPolicy(
        name="readers",
        rules=[
            Rule(from_=[Source(principals=[ORDERS])], to=[Operation(methods=["GET"])]),
            Rule(from_=[Source(request_principals=["https://idp.test/*"])]),
        ],
    ),
]


def test_request_facts() -> None:
    facts = request_facts(
        "post",
        "/api/charge?amount=3",
        from_="orders",
        namespace="shop",
        claims={"iss": "https://idp.test", "sub": "alice", "scope": "pay"},
        headers={"X-Env": "prod"},
        ip="10.0.0.9",
        port=8443,
        host="Payments",
    )

    assert (facts.method, facts.path, facts.query, facts.host, facts.port) == (
        "POST",
        "/api/charge",
        "amount=3",
        "payments",
        8443,
    )
    assert (facts.source_principal, facts.source_namespace, facts.source_ip) == (
        "cluster.local/ns/shop/sa/orders",
        "shop",
        "10.0.0.9",
    )
    assert (facts.request_principal, dict(facts.headers)) == (
        "https://idp.test/alice",
        {"x-env": "prod"},
    )
    assert request_facts("GET", "/").source_principal is None


@pytest.mark.parametrize(
    "target",
    [POLICIES, Authorizer(POLICIES), tuple(POLICIES)],
    ids=["list", "authorizer", "tuple"],
)
def test_assertions_pass_and_return_the_decision(target: Any) -> None:
    allowed = assert_allowed(target, "GET", "/items", from_="orders", by_policy="readers", rule=0)
    by_jwt = assert_allowed(
        target, "POST", "/items", claims={"iss": "https://idp.test", "sub": "x"}
    )
    denied = assert_denied(target, "GET", "/admin/x", from_="orders", by_policy="block-admin")
    unmatched = assert_denied(target, "POST", "/items", status=403)

    assert (allowed.rule, by_jwt.rule, denied.code, unmatched.code) == (
        0,
        1,
        "denied-by-policy",
        "no-allow-match",
    )
    assert assert_denied(target, "GET", "/a%2fb", status=400).code == "invalid-path"


def test_a_mesh_config_or_one_policy_is_a_target() -> None:
    config = load_config(
        text="apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: none}\nspec: {}\n"
    )

    assert assert_denied(config, "GET", "/").code == "no-allow-match"
    assert_allowed(POLICIES[1], "GET", "/", from_="orders")
    with pytest.raises(ConfigurationError) as caught:
        assert_allowed("readers", "GET", "/")  # type: ignore[arg-type]
    assert str(caught.value) == (
        "target: expected an Authorizer, a MeshConfig, an AuthorizationPolicy or a list of them, "
        "got str"
    )


@pytest.mark.parametrize(
    ("check", "message"),
    [
        (
            lambda: assert_allowed(POLICIES, "DELETE", "/items", from_="orders"),
            "expected DELETE /items from cluster.local/ns/default/sa/orders to be allowed, but it "
            "was denied (403 no-allow-match): no ALLOW policy matched",
        ),
        (
            lambda: assert_allowed(
                POLICIES, "GET", "/", from_="orders", by_policy="readers", rule=1
            ),
            "expected GET / from cluster.local/ns/default/sa/orders to be allowed by policy "
            '"readers" rule 1, but it was allowed (200 allowed-by-policy): allowed by ALLOW policy '
            '"readers" rule 0',
        ),
        (
            lambda: assert_denied(POLICIES, "GET", "/x?y=1", from_="orders"),
            "expected GET /x?y=1 from cluster.local/ns/default/sa/orders to be denied, but it was "
            'allowed (200 allowed-by-policy): allowed by ALLOW policy "readers" rule 0',
        ),
        (
            lambda: assert_denied(
                POLICIES,
                "PUT",
                "/x",
                request_principal="https://evil.test/x",
                by_policy="block-admin",
            ),
            "expected PUT /x from a caller without an mTLS identity with JWT https://evil.test/x to "
            'be denied by policy "block-admin", but it was denied (403 no-allow-match): no ALLOW '
            "policy matched",
        ),
        (
            lambda: assert_denied(POLICIES, "PUT", "/x", status=400),
            "expected PUT /x from a caller without an mTLS identity to be denied with status 400, "
            "but it was denied (403 no-allow-match): no ALLOW policy matched",
        ),
    ],
    ids=["denied", "other-rule", "allowed", "other-reason", "other-status"],
)
def test_assertion_failures_say_what_was_decided(check: Any, message: str) -> None:
    with pytest.raises(AssertionError) as caught:
        check()

    assert str(caught.value) == message


def test_assertion_failures_mention_dry_run_outcomes() -> None:
    trial = AuthorizationPolicy(
        name="trial", action="DENY", dry_run=True, rules=[Rule(to=[Operation(methods=["GET"])])]
    )

    with pytest.raises(AssertionError) as caught:
        assert_denied([trial], "GET", "/")

    assert str(caught.value) == (
        "expected GET / from a caller without an mTLS identity to be denied, but it was allowed "
        '(200 no-allow-policies): no policies: allowed; dry-run: "trial" would deny'
    )


# -- the test transports through a real inbound stack ------------------------------------------

STACK_POLICIES = [
    AuthorizationPolicy(
        name="callers",
        rules=[
            Rule(from_=[Source(principals=["*"])], to=[Operation(paths=["/whoami"])]),
            Rule(
                from_=[Source(request_principals=[f"{DEFAULT_ISSUER}/alice"])],
                to=[Operation(paths=["/jwt"])],
            ),
            Rule(to=[Operation(paths=["/open"])]),
        ],
    )
]


def echo(mapping: Any) -> bytes:
    identity = mapping.get(IDENTITY_KEY)
    record = mapping.get(RECORD_KEY)
    return json.dumps(
        {
            "principal": identity.principal if identity is not None else None,
            "source": identity.source if identity is not None else None,
            "jwt": record.request_principal if record is not None else None,
        }
    ).encode()


async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": echo(scope)})


def wsgi_app(environ: Any, start_response: Any) -> Iterable[bytes]:
    start_response("200 OK", [("content-type", "application/json")])
    return [echo(environ)]


def inbound(ca: MeshTestCA | None = None) -> InboundConfig:
    return InboundConfig(
        service="payments",
        bundle=(ca or default_ca()).bundle_path,
        jwt_rules=[jwt_rule()],
        policies=STACK_POLICIES,
        metrics=None,
        access_log=False,
    )


class Caller:
    """Sends one request through the ASGI or the WSGI test transport."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    async def __call__(
        self, path: str, *, config: InboundConfig | None = None, **options: Any
    ) -> httpx.Response:
        request: dict[str, Any] = {
            key: options.pop(key) for key in ("headers", "extensions") if key in options
        }
        config = config or inbound()
        if self.kind == "asgi":
            transport = MeshTestTransport(build_asgi_stack(asgi_app, config), **options)
            async with httpx.AsyncClient(transport=transport, base_url="https://payments") as c:
                return await c.get(path, **request)
        wsgi = MeshTestWSGITransport(build_wsgi_stack(wsgi_app, config), **options)
        with httpx.Client(transport=wsgi, base_url="https://payments") as client:
            return client.get(path, **request)

    @property
    def source(self) -> str:
        return "tls" if self.kind == "asgi" else "ssl-client-cert"


@pytest.fixture(params=["asgi", "wsgi"])
def call(request: pytest.FixtureRequest) -> Caller:
    return Caller(request.param)


async def test_the_peer_arrives_as_a_verified_identity(call: Caller) -> None:
    response = await call("/whoami", peer="orders")

    assert response.status_code == 200
    assert response.json() == {"principal": ORDERS, "source": call.source, "jwt": None}


async def test_without_a_peer_there_is_no_identity(call: Caller) -> None:
    assert (await call("/whoami")).status_code == 403
    assert (await call("/open")).json() == {"principal": None, "source": None, "jwt": None}


async def test_a_peer_the_service_does_not_trust_is_refused_by_the_identity_layer(
    call: Caller,
) -> None:
    response = await call("/open", peer="spiffe://evil.example/ns/default/sa/orders")

    assert response.status_code == 403
    assert response.json()["reason"] == "unknown-trust-domain"


async def test_one_request_may_change_the_peer(call: Caller) -> None:
    other = await call("/whoami", peer="orders", extensions={PEER_EXTENSION: "cart"})
    anonymous = await call("/open", peer="orders", extensions={PEER_EXTENSION: None})

    assert other.json()["principal"] == "cluster.local/ns/default/sa/cart"
    assert anonymous.json()["principal"] is None


async def test_jwt_claims_become_a_verified_token(call: Caller) -> None:
    alice = await call("/jwt", jwt_claims={"sub": "alice"})
    bob = await call("/jwt", jwt_claims={"sub": "bob"})
    dropped = await call("/jwt", jwt_claims={"sub": "alice"}, extensions={CLAIMS_EXTENSION: None})
    added = await call("/jwt", extensions={CLAIMS_EXTENSION: {"sub": "alice"}})
    kept = await call(
        "/jwt", jwt_claims={"sub": "alice"}, headers={"authorization": "Bearer not-a-jwt"}
    )

    assert alice.json() == {"principal": None, "source": None, "jwt": f"{DEFAULT_ISSUER}/alice"}
    assert [r.status_code for r in (bob, dropped, added, kept)] == [403, 403, 200, 401]


async def test_a_ca_of_ones_own(call: Caller, tmp_path: Path) -> None:
    with MeshTestCA(tmp_path, trust_domain="example.org") as ca:
        own = await call(
            "/whoami", config=inbound(ca), peer=as_peer("orders", trust_domain="example.org"), ca=ca
        )
        default = await call("/whoami", config=inbound(ca), peer="orders")

    assert own.json()["principal"] == "example.org/ns/default/sa/orders"
    assert default.status_code == 403  # the default CA's certificate does not verify here


# -- MockUpstream ------------------------------------------------------------------------------


def test_mock_upstream_answers_by_host_and_path() -> None:
    upstream = (
        MockUpstream()
        .add("payments", "/api/*", text="api", headers={"x-from": "mock"})
        .add("payments", "/api/charge", method="POST", json={"ok": True})
        .add("payments", "/api/special", status=201)
    )

    with httpx.Client(transport=upstream.transport()) as client:
        charge = client.post("http://payments/api/charge")
        listed = client.get("http://payments/api/charge")
        special = client.get("http://payments/api/special")
        missing = client.get("http://payments/other")
        with pytest.raises(httpx.ConnectError, match="MockUpstream has no host 'ledger'"):
            client.get("http://ledger/")

    assert (charge.status_code, charge.json()) == (200, {"ok": True})
    assert (listed.text, listed.headers["x-from"]) == ("api", "mock")
    assert special.status_code == 201
    assert (missing.status_code, missing.text) == (404, "no MockUpstream route")
    assert [r.url.path for r in upstream.calls("payments")] == [
        "/api/charge",
        "/api/charge",
        "/api/special",
        "/other",
    ]
    assert [r.method for r in upstream.calls(path="/api/charge")] == ["POST", "GET"]
    assert len(upstream.requests) == 5


async def test_mock_upstream_sequences_and_handlers() -> None:
    upstream = MockUpstream().add(
        "ledger", sequence=[503, httpx.ConnectError, httpx.Response(202), 200]
    )
    upstream.add("echo", handler=lambda request: httpx.Response(200, content=request.content))

    async with httpx.AsyncClient(transport=upstream.transport()) as client:
        first = await client.get("http://ledger/")
        with pytest.raises(httpx.ConnectError, match="injected by MockUpstream"):
            await client.get("http://ledger/")
        third = await client.get("http://ledger/")
        rest = [(await client.get("http://ledger/")).status_code for _ in range(3)]
        echoed = await client.post("http://echo/", content=b"ping")

    assert (first.status_code, third.status_code, rest, echoed.content) == (
        503,
        202,
        [200, 200, 200],
        b"ping",
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"sequence": [200], "status": 500},
            "sequence: give a fixed answer, a sequence or a handler",
        ),
        (
            {"sequence": [200], "handler": lambda r: r},
            "handler: give a sequence or a handler, not both",
        ),
        ({"sequence": []}, "sequence: expected at least one answer"),
    ],
    ids=["sequence-and-status", "sequence-and-handler", "empty-sequence"],
)
def test_mock_upstream_refuses_ambiguous_answers(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        MockUpstream().add("x", **options)

    assert str(caught.value).startswith(message)


# -- fault injection ---------------------------------------------------------------------------


def test_abort_answers_as_a_virtual_service_fault_would() -> None:
    upstream = MockUpstream().add("payments", json={"ok": True})
    transport = fault_injecting_transport(upstream, abort=503)

    with httpx.Client(transport=transport) as client:
        response = client.get("http://payments/api")

    assert (response.status_code, response.text, response.headers["x-meshware-fault"]) == (
        503,
        "fault filter abort",
        "abort",
    )
    assert upstream.requests == []
    assert (transport.calls, transport.aborted, transport.delayed, transport.failed) == (1, 1, 0, 0)


def test_a_share_of_calls_is_aborted_by_seeded_draws() -> None:
    upstream = MockUpstream().add("payments", text="ok")
    transport = fault_injecting_transport(
        upstream, abort=500, abort_percent=30, rng=random.Random(7)
    )
    draws = random.Random(7)
    expected = [500 if draws.random() * 100 < 30 else 200 for _ in range(40)]

    with httpx.Client(transport=transport) as client:
        statuses = [client.get("http://payments/").status_code for _ in range(40)]

    assert statuses == expected
    assert transport.aborted == expected.count(500)
    assert len(upstream.requests) == expected.count(200)
    assert 0 < transport.aborted < 40


async def test_delays_advance_a_fake_clock() -> None:
    clock = FakeClock()
    upstream = MockUpstream().add("payments", text="slow")
    transport = fault_injecting_transport(
        upstream, fault={"delay": {"fixedDelay": "2.5s"}}, clock=clock
    )

    async with httpx.AsyncClient(transport=transport) as client:
        responses = [await client.get("http://payments/") for _ in range(2)]
    with httpx.Client(transport=transport) as client:
        responses.append(client.get("http://payments/"))

    assert [r.text for r in responses] == ["slow"] * 3
    assert (clock(), transport.delayed) == (7.5, 3)


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        ("connect-failure", httpx.ConnectError),
        ("reset", httpx.ReadError),
        ("timeout", httpx.ReadTimeout),
    ],
)
async def test_connection_errors(error: Any, kind: type[Exception]) -> None:
    upstream = MockUpstream().add("payments", text="ok")
    transport = fault_injecting_transport(upstream, error=error, hosts=["Payments"])

    async with httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(kind) as caught:
            await client.get("http://payments/")
        with pytest.raises(httpx.ConnectError):  # no such host in the upstream: untouched
            await client.get("http://ledger/")

    assert type(caught.value) is kind
    assert str(caught.value) == f"{error} injected by fault_injecting_transport"
    assert (transport.calls, transport.failed) == (2, 1)


class Scripted(random.Random):
    """A random source that draws the given values, in order."""

    def __init__(self, *values: float) -> None:
        super().__init__(0)
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)


@pytest.mark.parametrize(
    "options",
    [{"error": "connect-failure", "error_percent": 50}, {"abort": 503, "abort_percent": 50}],
    ids=["connect-failure", "503"],
)
def test_meshware_retries_recover_from_injected_faults(options: dict[str, Any]) -> None:
    clock = FakeClock()
    upstream = MockUpstream().add("payments", json={"charged": True})
    faults = fault_injecting_transport(upstream, rng=Scripted(0.1, 0.9), **options)
    registry = StaticRegistry({"payments": [Endpoint("10.0.0.1", 8443)]})
    retrying = RetryTransport(faults, resolver=registry, sleep=clock.sleep, rng=random.Random(1))

    with httpx.Client(transport=retrying) as client:
        response = client.get("http://payments/api/charge")

    assert (response.status_code, response.json()) == (200, {"charged": True})
    assert (faults.calls, len(upstream.requests)) == (2, 1)
    assert faults.failed + faults.aborted == 1
    assert clock() > 0.0  # the retry waited out its backoff on the fake clock


@pytest.mark.parametrize(
    ("options", "field", "message"),
    [
        ({}, "fault", "nothing to inject; give abort, delay, error or fault"),
        (
            {"abort": 503, "fault": {"abort": {"httpStatus": 500}}},
            "fault",
            "give fault, or abort and delay, not both",
        ),
        ({"error": "refused"}, "error", "expected one of connect-failure, reset, timeout"),
        (
            {"error": "reset", "error_percent": 150},
            "error_percent",
            "expected a percentage from 0 to 100",
        ),
        ({"abort": 700}, "fault.abort.httpStatus", "expected an HTTP status from 200 to 599"),
        (
            {"fault": {"abort": {"httpStatus": 503, "grpcStatus": "x"}}},
            "fault.abort.grpcStatus",
            "is not supported: meshware's outbound calls are HTTP; abort with httpStatus",
        ),
    ],
    ids=["nothing", "both", "unknown-error", "percent", "status", "istio-field"],
)
def test_fault_injection_refuses_bad_settings(
    options: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        fault_injecting_transport(MockUpstream(), **options)

    assert caught.value.field == field
    assert str(caught.value) == f"{field}: {message}"


async def test_a_sync_only_inner_transport_cannot_serve_async_clients() -> None:
    transport = fault_injecting_transport(httpx.HTTPTransport(), error="reset", error_percent=0)

    async with httpx.AsyncClient(transport=transport) as client:
        with pytest.raises(TypeError, match="the inner transport is sync-only"):
            await client.get("http://payments/")


# -- the pytest plugin -------------------------------------------------------------------------


def test_the_plugin_is_registered_as_an_entry_point() -> None:
    project = (ROOT / "pyproject.toml").read_text()
    section = project.split("[project.entry-points.pytest11]\n", 1)[1].split("\n\n", 1)[0]

    assert section == '"meshware.pytest_plugin" = "meshware.pytest_plugin"'


def test_the_plugin_fixtures_in_a_pytest_run(tmp_path: Path) -> None:
    (tmp_path / "test_with_mesh.py").write_text(
        textwrap.dedent(
            """\
            from meshware.testing import FakeClock, JwtIssuer, MeshPeer, MeshTestCA, default_ca


            def test_fixtures(mesh_ca, mesh_peer, mesh_jwt, mesh_clock):
                assert isinstance(mesh_ca, MeshTestCA) and mesh_ca is default_ca()
                assert mesh_ca.bundle_path.is_file()
                peer = mesh_peer("orders", namespace="shop")
                assert isinstance(peer, MeshPeer)
                assert peer.principal == "cluster.local/ns/shop/sa/orders"
                assert isinstance(mesh_jwt, JwtIssuer)
                assert mesh_jwt.rule.issuer == "https://issuer.meshware.test"
                assert isinstance(mesh_clock, FakeClock) and mesh_clock() == 0.0
                mesh_clock.advance(5)
                assert mesh_clock() == 5.0


            def test_each_test_gets_a_fresh_clock(mesh_clock):
                assert mesh_clock() == 0.0
            """
        )
    )

    done = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-p", "meshware.pytest_plugin"),
            *["-p", "no:cacheprovider", "-o", "asyncio_default_fixture_loop_scope=function"],
            *["-W", "error", "-q", "test_with_mesh.py"],
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout


@pytest.mark.parametrize("extra", [[], ["-p", "meshware.pytest_plugin"]], ids=["auto", "and-p"])
def test_the_entry_point_loads_the_plugin_once(tmp_path: Path, extra: list[str]) -> None:
    # An installed distribution with the same pytest11 entry point as pyproject.toml declares.
    info = tmp_path / "site" / "meshware_probe-0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: meshware-probe\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text(
        "[pytest11]\nmeshware.pytest_plugin = meshware.pytest_plugin\n"
    )
    (tmp_path / "test_probe.py").write_text(
        "def test_probe(mesh_clock):\n    assert mesh_clock() == 0.0\n"
    )

    done = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", *extra),
            *["-p", "no:cacheprovider", "-o", "asyncio_default_fixture_loop_scope=function"],
            *["-q", "test_probe.py"],
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
        capture_output=True,
        text=True,
        check=False,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout


def test_the_full_example_of_the_testing_page_passes(tmp_path: Path) -> None:
    page = (ROOT / "docs" / "testing-policies.md").read_text()
    example = page.split("## A full example", 1)[1].split("```python\n", 1)[1].split("```")[0]
    (tmp_path / "test_payments.py").write_text(example)

    done = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-p", "meshware.pytest_plugin"),
            *["-p", "no:cacheprovider", "-o", "asyncio_mode=auto"],
            *["-o", "asyncio_default_fixture_loop_scope=function", "-W", "error", "-q"],
            "test_payments.py",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    assert "8 passed" in done.stdout
