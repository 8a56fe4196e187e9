"""meshware_flask through Flask's own test client.

The identity is handed over the way a WSGI server would: the ``SSL_CLIENT_CERT`` variable
(werkzeug, mod_wsgi) or an ``x-forwarded-client-cert`` header from a trusted proxy's address.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from flask import Flask, g, jsonify
from meshware_flask import Meshware, MeshwareState, authorize, client, current_identity, rate_limit
from prometheus_client.parser import text_string_to_metric_families

from meshware.exceptions import ConfigurationError
from meshware.inbound.health import HealthState
from meshware.settings import InvalidSetting
from tests.plugins import (
    FRONTEND,
    INTRUDER,
    PROXY_IP,
    TRACE_ID,
    TRACEPARENT,
    Pki,
    echo_port,
    lower_headers,
    pki,
)

__all__ = ["echo_port", "pki"]

DENIED = {"status": 403, "error": "forbidden", "detail": "RBAC: access denied"}


def build_app(pki: Pki, echo: int, **config: Any) -> Flask:
    app = Flask(__name__)
    app.config.update(
        MESHWARE_SERVICE="payments",
        MESHWARE_BUNDLE=str(pki.bundle),
        MESHWARE_TRUSTED_PROXIES=[PROXY_IP],
        MESHWARE_SERVICES={"echo": [f"127.0.0.1:{echo}"]},
        MESHWARE_ACCESS_LOG=False,
        **config,
    )

    @app.get("/whoami")
    def whoami() -> Any:
        identity = current_identity()
        if identity is None:
            return jsonify(caller=None, g=None)
        return jsonify(caller=identity.principal, source=identity.source, g=str(g.mesh_identity))

    @app.get("/charges/<int:charge_id>")
    @authorize(principals=[FRONTEND], methods=["GET"], name="frontend-reads")
    def get_charge(charge_id: int) -> Any:
        return jsonify(charge=charge_id)

    @app.post("/charges")
    @rate_limit("2/minute", name="create-charge")
    def create_charge() -> Any:
        return jsonify(created=True)

    @app.get("/call")
    def call() -> Any:
        return jsonify(client().get("http://echo/headers").json())

    return app


@pytest.fixture
def app(pki: Pki, echo_port: int) -> Flask:
    app = build_app(pki, echo_port)
    Meshware(app, environ={})
    return app


def test_identity_from_ssl_client_cert_reaches_the_view(app: Flask, pki: Pki) -> None:
    with app.test_client() as test:
        mtls = test.get("/whoami", environ_base={"SSL_CLIENT_CERT": pki.pem("frontend")})
        anonymous = test.get("/whoami")
    assert mtls.json == {
        "caller": FRONTEND,
        "source": "ssl-client-cert",
        "g": f"spiffe://{FRONTEND}",
    }
    assert anonymous.json == {"caller": None, "g": None}


def test_identity_from_a_trusted_proxy_xfcc_reaches_the_view(app: Flask, pki: Pki) -> None:
    with app.test_client() as test:
        proxied = test.get(
            "/whoami",
            headers={"x-forwarded-client-cert": pki.xfcc("frontend")},
            environ_base={"REMOTE_ADDR": PROXY_IP},
        )
        spoofed = test.get("/whoami", headers={"x-forwarded-client-cert": pki.xfcc("frontend")})
    assert proxied.json["caller"] == FRONTEND
    assert proxied.json["source"] == "xfcc"
    assert spoofed.json["caller"] is None  # not from a trusted proxy: ignored


def test_per_route_authorization_allows_one_service_and_denies_another(
    app: Flask, pki: Pki
) -> None:
    with app.test_client() as test:
        allowed = test.get("/charges/7", environ_base={"SSL_CLIENT_CERT": pki.pem("frontend")})
        denied = test.get("/charges/7", environ_base={"SSL_CLIENT_CERT": pki.pem("intruder")})
        other = test.get("/whoami", environ_base={"SSL_CLIENT_CERT": pki.pem("intruder")})
    assert allowed.status_code == 200
    assert allowed.json == {"charge": 7}
    assert denied.status_code == 403
    assert denied.json == DENIED
    assert other.json["caller"] == INTRUDER


def test_a_route_rate_limit_answers_429_with_headers(app: Flask, pki: Pki) -> None:
    cert = {"SSL_CLIENT_CERT": pki.pem("frontend")}
    with app.test_client() as test:
        responses = [test.post("/charges", environ_base=cert) for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 429]
    assert responses[1].headers["RateLimit-Policy"] == '"create-charge";q=2;w=60'
    assert responses[1].headers["RateLimit"] == '"create-charge";r=0;t=60'
    assert responses[2].json == {
        "status": 429,
        "error": "too_many_requests",
        "detail": "rate limit exceeded",
    }
    assert 1 <= int(responses[2].headers["Retry-After"]) <= 30


def test_health_and_metrics_endpoints(app: Flask, pki: Pki) -> None:
    with app.test_client() as test:
        # Metrics are recorded when the server closes the response, as a WSGI server does.
        test.get("/charges/1", environ_base={"SSL_CLIENT_CERT": pki.pem("frontend")}).close()
        live = test.get("/livez")
        ready = test.get("/readyz")
        scrape = test.get("/metrics")
    assert live.status_code == 200
    assert live.headers["Content-Type"] == "application/health+json"
    assert ready.json == {"status": "pass", "serviceId": "payments"}
    families = {f.name: f for f in text_string_to_metric_families(scrape.text)}
    [sample] = [
        s
        for s in families["istio_requests"].samples
        if s.name == "istio_requests_total" and s.labels["response_code"] == "200"
    ]
    assert sample.value == 1
    assert sample.labels["destination_service_name"] == "payments"
    assert sample.labels["source_principal"] == f"spiffe://{FRONTEND}"
    state = Meshware.state(app)
    assert state.health is not None and state.health.state is HealthState.READY


def test_outbound_call_carries_trace_context_and_request_id(app: Flask) -> None:
    with app.test_client() as test:
        response = test.get("/call", headers={"traceparent": TRACEPARENT, "x-request-id": "r-7"})
    echoed = lower_headers(response.json)
    assert echoed["x-request-id"] == "r-7"
    version, trace_id, parent_id, flags = echoed["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", TRACE_ID, "01")
    assert parent_id != "b7ad6b7169203331"
    state = app.extensions["meshware"]
    assert isinstance(state, MeshwareState)
    assert isinstance(state.client, httpx.Client)
    state.close()
    assert state.client is not None  # a closed client is replaced on next use


def test_init_app_with_an_application_factory(pki: Pki, echo_port: int) -> None:
    mesh = Meshware(environ={"MESHWARE_NAMESPACE": "shop"}, version="v2")
    first = build_app(pki, echo_port)
    second = build_app(pki, echo_port, MESHWARE_VERSION="v3")
    one = mesh.init_app(first)
    two = mesh.init_app(second, service="refunds")
    assert (one.settings.service, one.settings.namespace, one.settings.version) == (
        "payments",
        "shop",
        "v2",
    )
    # Arguments beat app.config, app.config beats the environment.
    assert two.settings.service == "refunds"
    assert two.settings.version == "v2"
    assert two.settings.sources["namespace"] == "environment"
    assert first.wsgi_app is one.stack
    with pytest.raises(ConfigurationError, match="already on"):
        mesh.init_app(first)


def test_app_config_keys_are_checked(pki: Pki, echo_port: int) -> None:
    app = build_app(pki, echo_port, MESHWARE_RATE_LIMT="5/minute")
    with pytest.raises(InvalidSetting) as caught:
        Meshware(app, environ={})
    assert str(caught.value) == (
        "MESHWARE_RATE_LIMT: unknown setting; did you mean MESHWARE_RATE_LIMIT? (from app.config)"
    )
    bad = build_app(pki, echo_port, MESHWARE_RATE_LIMIT="5 per minute")
    with pytest.raises(InvalidSetting) as invalid:
        Meshware(bad, environ={})
    assert invalid.value.field == "MESHWARE_RATE_LIMIT"
    assert invalid.value.source == "app.config"
    with pytest.raises(ConfigurationError, match="not on"):
        Meshware.state(Flask(__name__))
