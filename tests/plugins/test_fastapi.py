"""meshware_fastapi through FastAPI's own TestClient.

The identity is handed over the way a server would: the ASGI TLS extension (a pretend server
puts the client certificate where ``meshware serve`` puts it on uvicorn) or an
``x-forwarded-client-cert`` header from a trusted proxy's address.
"""

from __future__ import annotations

import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import httpx
import meshware_fastapi
import pytest
from fastapi import Depends, FastAPI
from meshware_fastapi import RequiredPeer, authorize, mesh_client, peer, rate_limit
from prometheus_client.parser import text_string_to_metric_families

from meshware.exceptions import ConfigurationError
from meshware.identity.identity import Identity
from meshware.inbound.health import HealthState
from meshware.settings import InvalidSetting
from tests.plugins import (
    FRONTEND,
    INTRUDER,
    PROXY_IP,
    TRACE_ID,
    TRACEPARENT,
    Pki,
    TlsServer,
    echo_port,
    lower_headers,
    pki,
)

with warnings.catch_warnings():
    # Starlette asks for its httpx fork; the TestClient works the same with httpx itself.
    warnings.filterwarnings("ignore", message="Using `httpx` with `starlette.testclient`")
    from fastapi.testclient import TestClient

__all__ = ["echo_port", "pki"]

DENIED = {"status": 403, "error": "forbidden", "detail": "RBAC: access denied"}


def build_app(pki: Pki, echo: int, **settings: Any) -> tuple[FastAPI, list[HealthState]]:
    """The test service: its lifespan notes the readiness state it sees."""
    seen: list[HealthState] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        health = app.state.meshware.health
        seen.append(health.state)  # during the application's own startup
        yield
        seen.append(health.state)  # during its own shutdown

    app = FastAPI(lifespan=lifespan)

    @app.get("/whoami")
    async def whoami(caller: Annotated[Identity | None, Depends(peer)]) -> dict[str, Any]:
        if caller is None:
            return {"caller": None}
        return {"caller": caller.principal, "source": caller.source}

    @app.get("/strict")
    async def strict(caller: RequiredPeer) -> dict[str, str]:
        return {"caller": caller.principal}

    @app.get("/orders/{order_id}")
    @authorize(principals=[FRONTEND], methods=["GET"], name="frontend-reads")
    async def get_order(order_id: int) -> dict[str, int]:
        return {"order": order_id}

    @app.post("/orders")
    @rate_limit("2/minute", name="create-order")
    async def create_order() -> dict[str, str]:
        return {"created": "yes"}

    @app.get("/call")
    async def call(client: Annotated[httpx.AsyncClient, Depends(mesh_client)]) -> Any:
        response = await client.get("http://echo/headers")
        return response.json()

    options: dict[str, Any] = {
        "bundle": str(pki.bundle),
        "trusted_proxies": [PROXY_IP],
        "services": {"echo": [f"127.0.0.1:{echo}"]},
        "access_log": False,
        **settings,
    }
    meshware_fastapi.install(app, service="orders", environ={}, **options)
    return app, seen


@pytest.fixture
def app(pki: Pki, echo_port: int) -> tuple[FastAPI, list[HealthState]]:
    return build_app(pki, echo_port)


def test_identity_from_the_tls_extension_reaches_the_handler(
    app: tuple[FastAPI, list[HealthState]], pki: Pki
) -> None:
    server = TlsServer(app[0])
    with TestClient(server) as client:
        server.peer = pki.pem("frontend")
        mtls = client.get("/whoami")
        server.peer = None
        anonymous = client.get("/whoami")
    assert mtls.json() == {"caller": FRONTEND, "source": "tls"}
    assert anonymous.json() == {"caller": None}


def test_identity_from_a_trusted_proxy_xfcc_reaches_the_handler(
    app: tuple[FastAPI, list[HealthState]], pki: Pki
) -> None:
    with TestClient(app[0], client=(PROXY_IP, 40000)) as client:
        response = client.get("/whoami", headers={"x-forwarded-client-cert": pki.xfcc("frontend")})
    assert response.json() == {"caller": FRONTEND, "source": "xfcc"}


def test_require_peer_refuses_with_401_or_403(
    app: tuple[FastAPI, list[HealthState]], pki: Pki
) -> None:
    server = TlsServer(app[0])
    with TestClient(server) as client:
        nobody = client.get("/strict")
        untrusted = client.get("/strict", headers={"x-forwarded-client-cert": pki.xfcc("frontend")})
        server.peer = pki.pem("frontend")
        verified = client.get("/strict")
    assert nobody.status_code == 401
    assert nobody.json() == {"detail": "a verified peer identity (mTLS) is required"}
    # An XFCC from an address that is not a trusted proxy is ignored, and said so.
    assert untrusted.status_code == 403
    assert untrusted.json() == {"detail": "peer identity not accepted: untrusted-xfcc"}
    assert verified.json() == {"caller": FRONTEND}


def test_per_route_authorization_allows_one_service_and_denies_another(
    app: tuple[FastAPI, list[HealthState]], pki: Pki
) -> None:
    server = TlsServer(app[0])
    with TestClient(server) as client:
        server.peer = pki.pem("frontend")
        allowed = client.get("/orders/7")
        server.peer = pki.pem("intruder")
        denied = client.get("/orders/7")
        unrelated = client.get("/whoami")
    assert allowed.status_code == 200
    assert allowed.json() == {"order": 7}
    assert denied.status_code == 403
    assert denied.json() == DENIED
    assert unrelated.json() == {"caller": INTRUDER, "source": "tls"}


def test_a_route_rate_limit_answers_429_with_headers(
    app: tuple[FastAPI, list[HealthState]], pki: Pki
) -> None:
    server = TlsServer(app[0])
    server.peer = pki.pem("frontend")
    with TestClient(server) as client:
        responses = [client.post("/orders") for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 429]
    assert responses[0].headers["ratelimit-policy"] == '"create-order";q=2;w=60'
    assert responses[0].headers["ratelimit"] == '"create-order";r=1;t=30'
    limited = responses[2]
    assert limited.json() == {
        "status": 429,
        "error": "too_many_requests",
        "detail": "rate limit exceeded",
    }
    assert limited.headers["ratelimit"].startswith('"create-order";r=0;t=')
    assert 1 <= int(limited.headers["retry-after"]) <= 30


def test_health_and_metrics_endpoints(app: tuple[FastAPI, list[HealthState]], pki: Pki) -> None:
    server = TlsServer(app[0])
    server.peer = pki.pem("frontend")
    with TestClient(server) as client:
        client.get("/orders/1")
        live = client.get("/livez")
        ready = client.get("/readyz")
        scrape = client.get("/metrics")
    assert live.status_code == 200
    assert live.headers["content-type"] == "application/health+json"
    assert ready.status_code == 200
    assert ready.json() == {"status": "pass", "serviceId": "orders"}
    families = {f.name: f for f in text_string_to_metric_families(scrape.text)}
    [sample] = [
        s
        for s in families["istio_requests"].samples
        if s.name == "istio_requests_total" and s.labels["response_code"] == "200"
    ]
    assert sample.value == 1
    assert sample.labels["destination_service_name"] == "orders"
    assert sample.labels["source_principal"] == f"spiffe://{FRONTEND}"


def test_readiness_follows_the_applications_own_lifespan(
    app: tuple[FastAPI, list[HealthState]],
) -> None:
    fastapi_app, seen = app
    health = fastapi_app.state.meshware.health
    with TestClient(fastapi_app) as client:
        during = client.get("/readyz")
        assert health.state is HealthState.READY
    # Not ready while the application's startup ran; draining while its shutdown ran.
    assert seen == [HealthState.STARTING, HealthState.DRAINING]
    assert during.status_code == 200
    assert health.state is HealthState.DRAINING


def test_outbound_call_carries_trace_context_and_request_id(
    app: tuple[FastAPI, list[HealthState]],
) -> None:
    fastapi_app, _ = app
    with TestClient(fastapi_app) as client:
        response = client.get(
            "/call", headers={"traceparent": TRACEPARENT, "x-request-id": "req-42"}
        )
        mesh = fastapi_app.state.meshware.client
        assert not mesh.is_closed
    echoed = lower_headers(response.json())
    assert echoed["x-request-id"] == "req-42"
    version, trace_id, parent_id, flags = echoed["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", TRACE_ID, "01")
    assert parent_id != "b7ad6b7169203331"  # a child span of this service, not the caller's
    assert response.headers["x-request-id"] == "req-42"
    assert mesh.is_closed  # closed with the application


def test_the_mesh_client_is_the_states_client(app: tuple[FastAPI, list[HealthState]]) -> None:
    fastapi_app, _ = app
    state = meshware_fastapi.state_of(fastapi_app)
    with TestClient(fastapi_app):
        assert isinstance(state.client, httpx.AsyncClient)
        assert state.client is fastapi_app.state.meshware.client
        assert state.stack is not None
        assert [type(layer).__name__ for layer in state.stack.layers] == [
            "TelemetryMiddleware",
            "HealthMiddleware",
            "DeadlineMiddleware",
            "IdentityMiddleware",
            "AuthorizationMiddleware",
            "RateLimitMiddleware",
        ]


def test_service_wide_policies_and_rate_limit_from_settings(pki: Pki, echo_port: int) -> None:
    fastapi_app, _ = build_app(
        pki,
        echo_port,
        policies=[
            {
                "name": "no-strict",
                "action": "DENY",
                "rules": [{"to": [{"operation": {"paths": ["/strict"]}}]}],
            }
        ],
        rate_limit={"rate": "1/minute", "key": "client_ip", "name": "per-ip"},
    )
    with TestClient(fastapi_app) as client:
        denied = client.get("/strict")
        first = client.get("/whoami")
        second = client.get("/whoami")
    assert denied.status_code == 403
    assert denied.json() == DENIED
    assert "ratelimit" not in denied.headers  # a denied request spends no rate budget
    assert first.status_code == 200
    assert first.headers["ratelimit-policy"] == '"per-ip";q=1;w=60'
    assert second.status_code == 429
    assert second.headers["retry-after"] == "60"


def test_settings_come_from_the_environment_below_code_arguments() -> None:
    app = FastAPI()
    state = meshware_fastapi.install(
        app,
        environ={"MESHWARE_SERVICE": "billing", "MESHWARE_NAMESPACE": "shop"},
        namespace="payments",
    )
    assert state.settings.service == "billing"
    assert state.settings.namespace == "payments"
    assert state.settings.sources["service"] == "environment"
    assert state.settings.sources["namespace"] == "code"
    assert app.__meshware_stack__ is True


def test_install_refuses_unknown_settings_and_a_second_install() -> None:
    with pytest.raises(InvalidSetting) as caught:
        meshware_fastapi.install(FastAPI(), service="orders", environ={}, rate_limits="5/minute")
    assert str(caught.value) == (
        "rate_limits: unknown setting; did you mean rate_limit? (from code)"
    )
    app = FastAPI()
    meshware_fastapi.install(app, service="orders", environ={})
    with pytest.raises(ConfigurationError, match="already installed"):
        meshware_fastapi.install(app, service="orders", environ={})
    with pytest.raises(ConfigurationError, match="not installed"):
        meshware_fastapi.state_of(FastAPI())
