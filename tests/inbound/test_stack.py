"""The composed inbound stack: InboundConfig, build_asgi_stack and build_wsgi_stack.

The same service runs on Starlette (ASGI) and on Flask (WSGI); a small wrapper plays the TLS
server and hands over the caller's certificate from a LocalCA in a temporary directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from flask import Flask, jsonify
from jwt.algorithms import ECAlgorithm
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from meshware.exceptions import ConfigurationError
from meshware.identity.bundle import TrustBundles
from meshware.identity.ca import LocalCA
from meshware.inbound.asgi import MeshStack as AsgiMeshStack
from meshware.inbound.asgi import build_asgi_stack
from meshware.inbound.health import HealthChecks
from meshware.inbound.routes import FlaskRoutes, StarletteRoutes
from meshware.inbound.stack import LAYERS, InboundConfig
from meshware.inbound.wsgi import MeshStack as WsgiMeshStack
from meshware.inbound.wsgi import build_wsgi_stack
from meshware.outbound.deadline import current_deadline
from meshware.policy.authz import AuthorizationPolicy, Operation, Rule, Source, authorize
from meshware.policy.jwt import JwtRule
from meshware.policy.ratelimit import RateLimitPolicy, RateLimitRule
from meshware.telemetry.access_log import AccessLog
from meshware.telemetry.metrics import MeshMetrics
from meshware.telemetry.tracing import TracingConfig

ORDERS = "cluster.local/ns/default/sa/orders"
BILLING = "cluster.local/ns/default/sa/billing"
JWKS = json.dumps(
    {
        "keys": [
            {
                **ECAlgorithm.to_jwk(
                    ec.generate_private_key(ec.SECP256R1()).public_key(), as_dict=True
                ),
                "kid": "k1",
            }
        ]
    }
)

POLICIES = [
    AuthorizationPolicy(
        name="orders-reads",
        rules=[Rule(from_=[Source(principals=[ORDERS])], to=[Operation(methods=["GET"])])],
    ),
    AuthorizationPolicy(
        name="no-admin", action="DENY", rules=[Rule(to=[Operation(paths=["/admin*"])])]
    ),
]
PER_CALLER = RateLimitPolicy(rules=[RateLimitRule(name="per-caller", rate="2/minute")])


# -- the service on both frameworks ---------------------------------------------------------------


def remaining() -> float | None:
    deadline = current_deadline()
    return None if deadline is None else deadline.remaining()


@authorize(principals=[BILLING], name="billing-invoices")
async def starlette_invoice(request: Request) -> JSONResponse:
    return JSONResponse({"invoice": request.path_params["invoice_id"]})


async def starlette_items(request: Request) -> JSONResponse:
    return JSONResponse({"item": request.path_params["item_id"], "deadline": remaining()})


def starlette_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/api/items/{item_id}", starlette_items),
            Route("/invoices/{invoice_id}", starlette_invoice),
            Route("/{rest:path}", starlette_items_fallback),
        ]
    )


async def starlette_items_fallback(request: Request) -> JSONResponse:
    return JSONResponse({"path": request.url.path})


def flask_app() -> Flask:
    app = Flask(__name__)

    @app.get("/api/items/<item_id>")
    def items(item_id: str) -> Any:
        return jsonify(item=item_id, deadline=remaining())

    @app.get("/invoices/<invoice_id>")
    @authorize(principals=[BILLING], name="billing-invoices")
    def invoice(invoice_id: str) -> Any:
        return jsonify(invoice=invoice_id)

    @app.get("/<path:rest>")
    def fallback(rest: str) -> Any:
        return jsonify(path="/" + rest)

    return app


# -- certificates -----------------------------------------------------------------------------------


class Peers:
    def __init__(self, directory: Path) -> None:
        self.ca = LocalCA.init(directory)
        self.bundle_file = directory / "bundle.pem"
        self._pems: dict[str, str] = {}

    def pem(self, principal: str) -> str:
        if principal not in self._pems:
            parts = principal.split("/")
            self._pems[principal] = self.ca.issue(parts[4], namespace=parts[2]).cert.read_text()
        return self._pems[principal]


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Peers:
    return Peers(tmp_path_factory.mktemp("stack-ca"))


# -- the harness ------------------------------------------------------------------------------------


class Service:
    """One service built with the stack of one kind, behind a server that does mTLS."""

    def __init__(self, kind: str, peers: Peers) -> None:
        self.kind = kind
        self.peers = peers
        self.stack: Any = None

    def build(self, **overrides: Any) -> Service:
        options: dict[str, Any] = {
            "service": "orders",
            "version": "v1",
            "bundle": str(self.peers.bundle_file),
            "policies": POLICIES,
            "rate_limit": PER_CALLER,
            "access_log": AccessLog(handler=None),
        }
        if self.kind == "asgi":
            app: Any = starlette_app()
            resolver: Any = StarletteRoutes(app)
        else:
            flask = flask_app()
            app = flask.wsgi_app
            resolver = FlaskRoutes(flask)
        if overrides.pop("routes", False):
            options["routes"] = resolver
        options.update(overrides)
        config = InboundConfig(**options)
        builder = build_asgi_stack if self.kind == "asgi" else build_wsgi_stack
        self.stack = builder(app, config)
        return self

    def server(self, peer: str | None) -> Any:
        stack = self.stack
        pem = None if peer is None else self.peers.pem(peer)
        if self.kind == "asgi":

            async def asgi_server(scope: dict[str, Any], receive: Any, send: Any) -> None:
                if pem is not None:
                    scope["extensions"] = {"tls": {"client_cert_chain": [pem]}}
                await stack(scope, receive, send)

            return asgi_server

        def wsgi_server(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
            if pem is not None:
                environ["SSL_CLIENT_CERT"] = pem
            return stack(environ, start_response)  # type: ignore[no-any-return]

        return wsgi_server

    async def request(
        self, method: str, url: str, *, peer: str | None = None, **kwargs: Any
    ) -> httpx.Response:
        app = self.server(peer)
        if self.kind == "asgi":
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://orders") as client:
                return await client.request(method, url, **kwargs)
        with httpx.Client(
            transport=httpx.WSGITransport(app=app), base_url="http://orders"
        ) as sync_client:
            return sync_client.request(method, url, **kwargs)

    def samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        body, _ = self.stack.metrics.exposition()
        return [
            (sample.labels, sample.value)
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples
            if sample.name == name
        ]

    def requests_by_code(self) -> dict[str, float]:
        counts: dict[str, float] = {}
        for labels, value in self.samples("istio_requests_total"):
            key = f"{labels['response_code']}:{labels['response_flags']}"
            counts[key] = counts.get(key, 0.0) + value
        return counts


@pytest.fixture(params=["asgi", "wsgi"])
def service(request: pytest.FixtureRequest, peers: Peers) -> Service:
    return Service(request.param, peers)


@pytest.fixture
def access_lines(caplog: pytest.LogCaptureFixture) -> Callable[[], list[dict[str, Any]]]:
    caplog.set_level(logging.INFO, logger="meshware.access")

    def lines() -> list[dict[str, Any]]:
        return [json.loads(r.getMessage()) for r in caplog.records if r.name == "meshware.access"]

    return lines


# -- the stack in order -----------------------------------------------------------------------------


async def test_layers_in_the_documented_order(service: Service) -> None:
    service.build(jwt_rules=[JwtRule(issuer="https://auth.example.com", jwks=JWKS)])

    names = [type(layer).__name__ for layer in service.stack.layers]

    assert names == [
        "TelemetryMiddleware",
        "HealthMiddleware",
        "DeadlineMiddleware",
        "IdentityMiddleware",
        "JwtAuthenticationMiddleware",
        "AuthorizationMiddleware",
        "RateLimitMiddleware",
    ]
    module = "meshware.inbound.asgi" if service.kind == "asgi" else "meshware.inbound.wsgi"
    assert all(type(layer).__module__.startswith(module) for layer in service.stack.layers)


async def test_empty_layers_are_left_out(service: Service) -> None:
    service.build(bundle=None, policies=[], rate_limit=None, metrics=None, access_log=False)

    assert [type(layer).__name__ for layer in service.stack.layers] == [
        "HealthMiddleware",
        "DeadlineMiddleware",
    ]
    assert service.stack.layers[-1].app is service.stack.app
    response = await service.request("GET", "/api/items/1")
    assert response.json() == {"item": "1", "deadline": None}


async def test_the_stack_exposes_its_parts(service: Service) -> None:
    health = HealthChecks()
    metrics = MeshMetrics()
    service.build(health=health, metrics=metrics, routes=True)
    stack = service.stack

    assert stack.__meshware_stack__ is True
    assert isinstance(stack, AsgiMeshStack if service.kind == "asgi" else WsgiMeshStack)
    assert (stack.health, stack.metrics) == (health, metrics)
    assert stack.authorizer.policies == tuple(POLICIES)
    assert stack.limiter.policy is PER_CALLER
    assert stack.resolver is not None
    assert stack.resolver.verifier.bundles.trust_domains == frozenset({"cluster.local"})
    assert stack.routes is stack.config.routes
    assert stack.authenticator is None
    assert stack.layers[-1].app is stack.app
    assert repr(stack).startswith("<MeshStack orders: TelemetryMiddleware -> HealthMiddleware")


# -- requests through the whole stack ---------------------------------------------------------------


async def test_an_allowed_caller(
    service: Service, access_lines: Callable[[], list[dict[str, Any]]]
) -> None:
    service.build()

    response = await service.request("GET", "/api/items/7", peer=ORDERS)

    assert (response.status_code, response.json()["item"]) == (200, "7")
    assert response.headers["ratelimit"] == '"per-caller";r=1;t=30'
    assert len(response.headers["x-request-id"]) == 32
    [line] = access_lines()
    assert (line["status"], line["source_principal"], line["authz"], line["authz_policy"]) == (
        200,
        ORDERS,
        "allow",
        "orders-reads",
    )
    assert line["ratelimit"] == "allowed"


async def test_a_denied_request_is_counted_and_logged_with_the_deciding_rule(
    service: Service, access_lines: Callable[[], list[dict[str, Any]]]
) -> None:
    service.build()

    other = await service.request("GET", "/api/items/7", peer=BILLING)
    admin = await service.request("GET", "/admin/users", peer=ORDERS)

    assert (
        other.json()
        == admin.json()
        == {
            "status": 403,
            "error": "forbidden",
            "detail": "RBAC: access denied",
        }
    )
    assert service.requests_by_code() == {"403:-": 2.0}
    decisions = {
        (labels["decision"], labels["policy"]): value
        for labels, value in service.samples("meshware_authz_decisions_total")
    }
    assert decisions == {("deny", "none"): 1.0, ("deny", "no-admin"): 1.0}
    first, second = access_lines()
    assert (first["authz"], first["authz_policy"], first["authz_reason"]) == (
        "deny",
        None,
        "no ALLOW policy matched",
    )
    assert (second["authz"], second["authz_policy"], second["authz_reason"]) == (
        "deny",
        "no-admin",
        'denied by DENY policy "no-admin" rule 0',
    )
    # Denied requests never reach the rate limiter: they use no budget.
    assert first["ratelimit"] is None


async def test_a_limited_request_is_flagged(
    service: Service, access_lines: Callable[[], list[dict[str, Any]]]
) -> None:
    service.build()

    codes = [
        (await service.request("GET", "/api/items/1", peer=ORDERS)).status_code for _ in range(3)
    ]

    assert codes == [200, 200, 429]
    assert service.requests_by_code() == {"200:-": 2.0, "429:RL": 1.0}
    assert access_lines()[-1]["ratelimit"] == "limited"


async def test_health_bypasses_identity_authz_and_rate_limits(
    service: Service, access_lines: Callable[[], list[dict[str, Any]]]
) -> None:
    service.build(require_identity=True)

    probes = [await service.request("GET", path) for path in ("/livez", "/readyz") * 3]
    anonymous = await service.request("GET", "/api/items/1")

    assert [probe.status_code for probe in probes] == [200] * 6
    assert probes[0].json() == {"status": "pass", "serviceId": "orders", "version": "v1"}
    assert anonymous.json() == {
        "status": 403,
        "error": "forbidden",
        "detail": "a verified peer identity (mTLS) is required",
    }
    # Probes are neither measured nor logged; the refused request is.
    assert service.requests_by_code() == {"403:-": 1.0}
    assert [line["path"] for line in access_lines()] == ["/api/items/1"]


async def test_metrics_are_served(service: Service) -> None:
    service.build()
    await service.request("GET", "/api/items/1", peer=ORDERS)

    response = await service.request("GET", "/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert 'istio_requests_total{connection_security_policy="mutual_tls"' in response.text


async def test_the_app_runs_inside_the_callers_deadline(service: Service) -> None:
    service.build()

    timed = await service.request(
        "GET", "/api/items/1", peer=ORDERS, headers={"x-meshware-timeout": "1500m"}
    )
    malformed = await service.request(
        "GET", "/api/items/1", peer=ORDERS, headers={"x-meshware-timeout": "later"}
    )

    left = timed.json()["deadline"]
    assert left is not None
    assert left <= 1.5
    assert (malformed.status_code, malformed.json()["reason"]) == (400, "bad-unit")


async def test_an_invalid_token_is_refused_and_counted(service: Service) -> None:
    service.build(jwt_rules=[JwtRule(issuer="https://auth.example.com", jwks=JWKS)])

    response = await service.request(
        "GET", "/api/items/1", peer=ORDERS, headers={"authorization": "Bearer x.y.z"}
    )

    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith('Bearer error="invalid_token"')
    assert service.requests_by_code() == {"401:-": 1.0}


async def test_route_policies_and_templates(
    service: Service, access_lines: Callable[[], list[dict[str, Any]]]
) -> None:
    service.build(policies=[], rate_limit=None, routes=True)

    billing = await service.request("GET", "/invoices/9", peer=BILLING)
    orders = await service.request("GET", "/invoices/9", peer=ORDERS)

    assert (billing.status_code, orders.status_code) == (200, 403)
    template = "/invoices/{invoice_id}" if service.kind == "asgi" else "/invoices/<invoice_id>"
    assert [(line["route"], line["authz_policy"]) for line in access_lines()] == [
        (template, "billing-invoices"),
        (template, None),
    ]


async def test_the_path_is_logged_as_received(
    service: Service, access_lines: Callable[[], list[dict[str, Any]]]
) -> None:
    service.build()

    response = await service.request("GET", "/api//items/%37", peer=ORDERS)

    assert response.json()["item"] == "7"
    assert access_lines()[0]["path"] == (
        "/api//items/%37" if service.kind == "asgi" else "/api//items/7"
    )


# -- bundles ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["path", "Path", "bundles", "callable"])
async def test_bundle_sources(service: Service, peers: Peers, source: str) -> None:
    bundles = TrustBundles.from_file(peers.bundle_file)
    calls: list[int] = []

    def current() -> TrustBundles:
        calls.append(1)
        return bundles

    bundle: Any = {
        "path": str(peers.bundle_file),
        "Path": peers.bundle_file,
        "bundles": bundles,
        "callable": current,
    }[source]
    service.build(bundle=bundle)

    response = await service.request("GET", "/api/items/1", peer=ORDERS)

    assert response.status_code == 200
    assert bool(calls) is (source == "callable")


async def test_a_missing_bundle_file_fails_at_build(service: Service, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as caught:
        service.build(bundle=str(tmp_path / "missing.pem"))

    assert caught.value.field == "bundle"
    assert "cannot read trust bundle" in str(caught.value)


async def test_tracing_provider_is_built_and_released(service: Service) -> None:
    service.build(tracing=TracingConfig(service_name="orders", sampler_ratio=1.0))

    response = await service.request("GET", "/api/items/1", peer=ORDERS)

    assert response.status_code == 200
    assert service.stack.tracer_provider is not None
    if service.kind == "asgi":
        await service.stack.aclose()
    else:
        service.stack.close()


# -- InboundConfig ----------------------------------------------------------------------------------


def test_config_defaults() -> None:
    config = InboundConfig(service="orders")

    assert isinstance(config.health, HealthChecks)
    assert isinstance(config.metrics, MeshMetrics)
    assert config.layers() == ("telemetry", "health", "deadline")
    assert InboundConfig(service="orders").metrics is not config.metrics
    assert dataclasses.replace(config, version="v2").metrics is config.metrics


def test_config_layers() -> None:
    everything = InboundConfig(
        service="orders",
        bundle="bundle.pem",
        jwt_rules=[JwtRule(issuer="https://auth.example.com", jwks=JWKS)],
        policies=POLICIES,
        rate_limit=PER_CALLER,
    )
    nothing = InboundConfig(
        service="orders", health=None, metrics=None, access_log=False, deadlines=False
    )
    routes_only = InboundConfig(service="orders", routes=StarletteRoutes(starlette_app()))

    assert everything.layers() == LAYERS
    assert nothing.layers() == ()
    assert routes_only.layers() == ("telemetry", "health", "deadline", "authz", "ratelimit")


def test_config_is_frozen_and_normalizes_lists() -> None:
    config = InboundConfig(service="orders", policies=list(POLICIES), trusted_proxies=[])

    assert config.policies == tuple(POLICIES)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.service = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("options", "field", "message"),
    [
        ({"service": ""}, "service", "expected 1-253 characters"),
        ({"namespace": "a b"}, "namespace", "expected 1-253 characters"),
        ({"trust_domain": "UPPER"}, "trust_domain", "expected a trust domain"),
        ({"bundle": b"pem"}, "bundle", "expected a bundle file path"),
        ({"trusted_proxies": "10.0.0.0/8"}, "trusted_proxies", "expected a list"),
        ({"bundle": "b.pem", "trusted_proxies": ["nope"]}, "trusted_proxies[0]", "expected an IP"),
        ({"trusted_proxies": ["10.0.0.0/8"]}, "trusted_proxies", "needs a trust bundle"),
        ({"require_identity": True}, "require_identity", "needs a trust bundle"),
        ({"require_identity": 1}, "require_identity", "expected True or False"),
        ({"jwt_rules": [object()]}, "jwt_rules[0]", "expected a JwtRule"),
        (
            {
                "jwt_rules": [
                    JwtRule(issuer="https://a", jwks=JWKS),
                    JwtRule(issuer="https://a", jwks=JWKS),
                ]
            },
            "jwt_rules[1].issuer",
            "duplicate issuer",
        ),
        ({"policies": POLICIES[0]}, "policies", "expected a list of AuthorizationPolicy"),
        ({"policies": [POLICIES[0], POLICIES[0]]}, "policies[1].name", "duplicate policy name"),
        (
            {
                "policies": [
                    AuthorizationPolicy(name="p", rules=[Rule(to=[Operation(paths=["/a//b"])])])
                ]
            },
            "policies[0].rules[0].to[0].paths[0]",
            "path can never match",
        ),
        ({"path_normalization": "strict"}, "path_normalization", "expected a PathNormalization"),
        ({"explain_denials": "no"}, "explain_denials", "expected True or False"),
        ({"rate_limit": [PER_CALLER]}, "rate_limit", "expected a RateLimitPolicy"),
        ({"routes": object()}, "routes", "expected a RouteResolver"),
        ({"health": "on"}, "health", "expected a HealthChecks"),
        ({"metrics": True}, "metrics", "expected a MeshMetrics"),
        ({"metrics_path": "metrics"}, "metrics_path", 'expected a path starting with "/"'),
        ({"metrics_path": "/livez"}, "metrics_path", "collides with a health path"),
        ({"tracing": {"exporter": "otlp"}}, "tracing", "expected a TracingConfig"),
        ({"access_log": "json"}, "access_log", "expected True, False or an AccessLog"),
        ({"deadlines": None}, "deadlines", "expected True or False"),
        ({"default_timeout": -1}, "default_timeout", "expected a positive, finite number"),
        ({"max_timeout": "5s"}, "max_timeout", "expected a positive, finite number"),
        (
            {"default_timeout": 10, "max_timeout": 5},
            "default_timeout",
            "expected at most max_timeout (5 s)",
        ),
        ({"deadlines": False, "max_timeout": 5}, "deadlines", "timeouts need the deadline layer"),
    ],
)
def test_config_validation(options: dict[str, Any], field: str, message: str) -> None:
    options.setdefault("service", "orders")

    with pytest.raises(ConfigurationError) as caught:
        InboundConfig(**options)

    assert caught.value.field == field
    assert message in str(caught.value)


@pytest.mark.parametrize("builder", [build_asgi_stack, build_wsgi_stack])
def test_builders_want_a_config(builder: Any) -> None:
    with pytest.raises(ConfigurationError) as caught:
        builder(starlette_app(), {"service": "orders"})

    assert caught.value.field == "config"
    assert "expected an InboundConfig, got dict" in str(caught.value)
