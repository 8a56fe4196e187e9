"""The fused path of the ASGI stack (``meshware.inbound.asgi.fused``): the same answers, records,
log lines and metrics as the nested layers, with what the layers decided kept per request shape
and dropped when it may no longer hold."""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

import meshware.inbound.asgi.fused as fused_module
from meshware.identity.bundle import TrustBundles
from meshware.identity.ca import LocalCA
from meshware.inbound.asgi.fused import FusedLayers
from meshware.inbound.asgi.identity import IdentityMiddleware
from meshware.policy.authz import AuthorizationPolicy, Condition, Operation, Rule, Source
from meshware.policy.jwt import JwtRule
from meshware.policy.ratelimit import RateLimitPolicy, RateLimitRule
from tests.inbound.test_stack import BILLING, JWKS, ORDERS, POLICIES, Peers, Service

# Each (method, url, peer, headers) is sent twice in a row: once to work out the plan, once to
# replay it.
REQUESTS: list[tuple[str, str, str | None, dict[str, str]]] = [
    ("GET", "/api/items/1", ORDERS, {}),
    ("GET", "/api/items/1?color=red", ORDERS, {}),
    ("GET", "/api/./items//2", ORDERS, {}),
    ("POST", "/api/items/1", ORDERS, {}),
    ("GET", "/admin/users", ORDERS, {}),
    ("GET", "/api/items%2F1", ORDERS, {}),
    ("GET", "/invoices/7", ORDERS, {}),
    ("GET", "/invoices/7", BILLING, {}),
    ("GET", "/api/items/3", None, {}),
    ("GET", "/api/items/4", ORDERS, {"x-meshware-timeout": "soon"}),
    ("GET", "/api/items/4", ORDERS, {"x-meshware-timeout": "2S"}),
    ("GET", "/api/items/5", BILLING, {"host": "orders.example.com:8443"}),
]
ITEMS = Operation(paths=["/api/items/*"])
# Fields that differ between any two requests.
VARYING = {"time", "duration_ms", "request_id", "trace_id"}


@pytest.fixture
def peers(tmp_path_factory: pytest.TempPathFactory) -> Peers:
    return Peers(tmp_path_factory.mktemp("fused-ca"))


def build(peers: Peers, *, nested: bool = False, **overrides: Any) -> Service:
    service = Service("asgi", peers).build(routes=True, **overrides)
    telemetry = service.stack.layers[0]
    if nested:
        telemetry.handler = telemetry.app
    return service


async def started(peers: Peers, *, nested: bool = False, **overrides: Any) -> Service:
    """A service that has served its first request (a probe, which marks it ready): until
    then, requests go through the nested layers whatever the stack's handler."""
    service = build(peers, nested=nested, **overrides)
    assert (await service.request("GET", "/livez")).status_code == 200
    return service


def fused_of(service: Service) -> FusedLayers:
    handler = service.stack.layers[0].handler
    assert isinstance(handler, FusedLayers)
    return handler


async def replay(service: Service, caplog: pytest.LogCaptureFixture) -> list[tuple[Any, ...]]:
    """Send every request of REQUESTS twice; what came back and what was logged."""
    seen = []
    for method, url, peer, headers in REQUESTS:
        for _ in range(2):
            caplog.clear()
            response = await service.request(method, url, peer=peer, headers=headers)
            (line,) = [
                json.loads(r.getMessage()) for r in caplog.records if r.name == "meshware.access"
            ]
            for name in VARYING:
                line.pop(name, None)
            answer_headers = {
                name: value
                for name, value in response.headers.items()
                if name not in ("x-request-id", "ratelimit")
            }
            seen.append((url, response.status_code, response.content, answer_headers, line))
    return seen


# Besides the stack tests' two policies: an AUDIT policy and a dry-run DENY, whose outcomes
# go to the record (and the log) on every request too.
WATCHED = [
    *POLICIES,
    AuthorizationPolicy(name="watch-items", action="AUDIT", rules=[Rule(to=[ITEMS])]),
    AuthorizationPolicy(
        name="try-deny-items", action="DENY", dry_run=True, rules=[Rule(to=[ITEMS])]
    ),
]


@pytest.mark.parametrize("policies", [POLICIES, WATCHED], ids=["policies", "audit-and-dry-run"])
async def test_the_fused_path_answers_logs_and_counts_as_the_nested_layers(
    peers: Peers, caplog: pytest.LogCaptureFixture, policies: list[AuthorizationPolicy]
) -> None:
    caplog.set_level(logging.INFO, logger="meshware.access")
    nested = await started(peers, nested=True, policies=policies)
    fused = await started(peers, policies=policies)
    assert isinstance(fused.stack.layers[0].handler, FusedLayers)

    expected = await replay(nested, caplog)
    got = await replay(fused, caplog)

    assert got == expected
    statuses = {(url, status) for url, status, *_ in got}
    # The sequence covers allowed, denied, rate-limited, refused and rewritten requests.
    assert {200, 400, 403, 429} <= {status for _, status in statuses}
    assert fused.requests_by_code() == nested.requests_by_code()
    assert fused.samples("istio_requests_total") == nested.samples("istio_requests_total")


async def test_a_plan_is_kept_per_request_shape(peers: Peers) -> None:
    service = await started(peers, rate_limit=None)
    fused = fused_of(service)
    calls = 0
    admit = IdentityMiddleware.admit

    def counting(self: IdentityMiddleware, scope: Any, record: Any) -> Any:
        nonlocal calls
        calls += 1
        return admit(self, scope, record)

    IdentityMiddleware.admit = counting  # type: ignore[method-assign]
    try:
        for _ in range(3):
            response = await service.request("GET", "/api/items/1", peer=ORDERS)
            assert response.json() == {"item": "1", "deadline": None}
        response = await service.request("GET", "/api/items/1?page=2", peer=ORDERS)
        assert response.status_code == 200
        for _ in range(2):
            assert (await service.request("POST", "/api/items/1", peer=ORDERS)).status_code == 403
    finally:
        IdentityMiddleware.admit = admit  # type: ignore[method-assign]

    # GET (any query) and POST: two shapes, each worked out once.
    assert calls == 2
    assert len(fused) == 2


async def test_the_query_of_each_request_reaches_the_facts(peers: Peers) -> None:
    service = await started(peers, rate_limit=None)
    queries = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        queries.append(scope["meshware.record"].facts.query)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    fused_of(service)._app = app
    for url in ("/api/items/1?a=1", "/api/items/1", "/api/items/1?b=2"):
        assert (await service.request("GET", url, peer=ORDERS)).status_code == 204

    assert queries == ["a=1", "", "b=2"]
    assert len(fused_of(service)) == 1


async def test_nothing_is_kept_when_a_policy_reads_headers(peers: Peers) -> None:
    canary_only = AuthorizationPolicy(
        name="canary",
        rules=[
            Rule(
                from_=[Source(principals=[ORDERS])],
                when=[Condition(key="request.headers[x-canary]", values=["yes"])],
            )
        ],
    )
    service = await started(peers, policies=[canary_only], rate_limit=None)

    for header, status in (("yes", 200), ("no", 403), ("yes", 200), ("no", 403)):
        response = await service.request(
            "GET", "/api/items/1", peer=ORDERS, headers={"x-canary": header}
        )
        assert response.status_code == status
    assert len(fused_of(service)) == 0


async def test_nothing_is_kept_for_a_refused_identity(peers: Peers, tmp_path: Path) -> None:
    stranger = LocalCA.init(tmp_path / "other", trust_domain="elsewhere.local")
    pem = stranger.issue("intruder").cert.read_text()
    service = await started(peers, rate_limit=None)
    stack = service.stack

    async def server(scope: Any, receive: Any, send: Any) -> None:
        scope["extensions"] = {"tls": {"client_cert_chain": [pem]}}
        await stack(scope, receive, send)

    transport = httpx.ASGITransport(app=server)
    async with httpx.AsyncClient(transport=transport, base_url="http://orders") as client:
        for _ in range(2):
            assert (await client.get("/api/items/1")).status_code == 403
    assert len(fused_of(service)) == 0
    # Counted on each request, as the nested layers count it.
    assert sum(stack.resolver.failures.values()) == 2


async def test_a_plan_is_dropped_when_the_trust_bundles_change(
    peers: Peers, tmp_path: Path
) -> None:
    current = [TrustBundles.from_file(peers.bundle_file)]
    service = await started(peers, bundle=lambda: current[0], rate_limit=None)

    assert (await service.request("GET", "/api/items/1", peer=ORDERS)).status_code == 200
    assert len(fused_of(service)) == 1
    # The mesh now trusts another CA only: the same caller is no longer verified.
    other = LocalCA.init(tmp_path / "rotated")
    current[0] = TrustBundles.from_file(tmp_path / "rotated" / "bundle.pem")
    del other

    response = await service.request("GET", "/api/items/1", peer=ORDERS)

    assert response.status_code == 403


async def test_a_plan_is_not_replayed_past_the_callers_certificate(
    peers: Peers, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = await started(peers, rate_limit=None)
    assert (await service.request("GET", "/api/items/1", peer=ORDERS)).status_code == 200
    (plan,) = fused_of(service)._plans.values()
    assert plan.identity is not None and isinstance(plan.identity.not_after, datetime)
    expiry = plan.identity.not_after.timestamp()
    monkeypatch.setattr(fused_module, "_time", lambda: expiry + 1)
    calls: list[str] = []
    admit = IdentityMiddleware.admit

    def counting(self: IdentityMiddleware, scope: Any, record: Any) -> Any:
        calls.append(scope["path"])
        return admit(self, scope, record)

    monkeypatch.setattr(IdentityMiddleware, "admit", counting)

    for _ in range(2):
        assert (await service.request("GET", "/api/items/1", peer=ORDERS)).status_code == 200

    assert len(calls) == 2  # resolved again on each request once the plan has expired


async def test_the_plans_kept_are_bounded(peers: Peers) -> None:
    service = await started(peers, rate_limit=None)
    fused = fused_of(service)
    fused._size = 3
    for item in range(10):
        response = await service.request("GET", f"/api/items/{item}", peer=ORDERS)
        assert response.status_code == 200
    assert len(fused) == 3


async def test_rate_limits_are_charged_on_every_replayed_request(peers: Peers) -> None:
    two = RateLimitPolicy(rules=(RateLimitRule(name="per-caller", rate="2/minute"),))
    service = await started(peers, rate_limit=two)

    statuses = [
        (await service.request("GET", "/api/items/1", peer=ORDERS)).status_code for _ in range(4)
    ]

    assert statuses == [200, 200, 429, 429]
    response = await service.request("GET", "/api/items/1", peer=BILLING)
    assert response.status_code == 403  # denied before any bucket is charged


def test_a_stack_with_jwt_rules_keeps_the_nested_layers(peers: Peers) -> None:
    service = build(peers, jwt_rules=[JwtRule(issuer="https://auth.example.com", jwks=JWKS)])
    telemetry = service.stack.layers[0]
    assert telemetry.handler is telemetry.app


def test_a_stack_without_telemetry_has_no_fused_path(peers: Peers) -> None:
    service = build(peers, metrics=None, access_log=False)
    assert not any(
        isinstance(getattr(layer, "handler", None), FusedLayers) for layer in service.stack.layers
    )


async def test_rate_limit_fields_reach_a_response_that_names_its_own_request_id(
    peers: Peers,
) -> None:
    service = await started(peers)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        headers = [(b"x-request-id", b"chosen-by-the-app"), (b"content-length", b"0")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    fused_of(service)._app = app
    response = await service.request("GET", "/api/items/1", peer=ORDERS)

    assert response.headers.get_list("x-request-id") == ["chosen-by-the-app"]
    assert response.headers["ratelimit-policy"] == '"per-caller";q=2;w=60'
    assert response.headers["ratelimit"].startswith('"per-caller";r=1;')


async def test_a_failing_key_function_leaves_the_path_as_received(
    peers: Peers, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="meshware.access")

    def broken(facts: Any) -> str:
        raise RuntimeError("no key")

    policy = RateLimitPolicy(rules=(RateLimitRule(name="broken", rate="5/second", key=broken),))
    logged = []
    for nested in (True, False):
        service = await started(peers, nested=nested, rate_limit=policy)
        caplog.clear()
        with pytest.raises(RuntimeError, match="no key"):
            await service.request("GET", "/api/items//1", peer=ORDERS)
        (line,) = [
            json.loads(r.getMessage()) for r in caplog.records if r.name == "meshware.access"
        ]
        logged.append((line["path"], line["status"]))

    assert logged == [("/api/items//1", 500)] * 2
