"""The three example services under ``meshware serve`` with STRICT mTLS, on real servers.

``orders`` (FastAPI) runs on uvicorn, ``payments`` (Flask) and ``inventory`` (Django's WSGI
application) on gunicorn. Each is checked with the same list: the caller's identity reaches
the handler, a per-route policy allows the frontend and denies another service (403), a route
limit answers 429 with its headers, /livez /readyz /metrics answer, and a call from a handler
to another ``meshware serve`` instance presents the caller's certificate and carries the
trace context (the callee echoes the principal it verified and the traceparent it got).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.plugins import FRONTEND, TRACE_ID, TRACEPARENT, Pki, make_pki
from tests.servers import ROOT, meshware_serve

pytestmark = pytest.mark.integration

EXAMPLES = ROOT / "docs" / "examples"
DENIED = {"status": 403, "error": "forbidden", "detail": "RBAC: access denied"}


@dataclass(frozen=True)
class Example:
    app: str
    service: str
    server: str


EXAMPLES_BY_FRAMEWORK = {
    "fastapi": Example("fastapi_app.main:app", "orders", "uvicorn"),
    "flask": Example("flask_app.main:app", "payments", "gunicorn"),
    "django": Example("django_app.wsgi:application", "inventory", "gunicorn"),
}
# Each example calls the next one: the mesh spans all three frameworks.
CALLEE = {"fastapi": "flask", "flask": "django", "django": "fastapi"}


@pytest.fixture(scope="module")
def mesh_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("mesh-pki"))


def caller(pki: Pki, service: str) -> httpx.Client:
    context = ssl.create_default_context(cafile=str(pki.bundle))
    paths = pki.paths(service)
    context.load_cert_chain(paths.cert, paths.key)
    return httpx.Client(verify=context, timeout=15)


def serve(stack: ExitStack, pki: Pki, example: Example, tmp: Path, **env: str) -> int:
    return stack.enter_context(
        meshware_serve(
            example.app,
            service=example.service,
            cert_dir=pki.root,
            args=["--app-dir", str(EXAMPLES)],
            log=tmp / f"{example.service}.log",
            env={
                "MESHWARE_CERT_DIR": str(pki.root),
                "DJANGO_SETTINGS_MODULE": "django_app.settings",
                **env,
            },
        )
    )


@pytest.fixture(params=sorted(EXAMPLES_BY_FRAMEWORK))
def running(
    request: pytest.FixtureRequest, mesh_pki: Pki, tmp_path: Path
) -> Iterator[tuple[Example, Example, int]]:
    example = EXAMPLES_BY_FRAMEWORK[request.param]
    callee = EXAMPLES_BY_FRAMEWORK[CALLEE[request.param]]
    with ExitStack() as stack:
        callee_port = serve(stack, mesh_pki, callee, tmp_path)
        endpoint = {f"MESHWARE_SERVICE_{callee.service.upper()}": f"127.0.0.1:{callee_port}"}
        port = serve(stack, mesh_pki, example, tmp_path, **endpoint)
        yield example, callee, port


def test_an_example_service_under_meshware_serve(
    running: tuple[Example, Example, int], mesh_pki: Pki
) -> None:
    example, callee, port = running
    base = f"https://127.0.0.1:{port}"
    with caller(mesh_pki, "frontend") as frontend, caller(mesh_pki, "intruder") as intruder:
        whoami = frontend.get(f"{base}/api/whoami")
        allowed = frontend.get(f"{base}/api/orders/7")
        denied = intruder.get(f"{base}/api/orders/7")
        admin = frontend.get(f"{base}/admin/users")
        posts = [frontend.post(f"{base}/api/orders") for _ in range(3)]
        live = frontend.get(f"{base}/livez")
        ready = frontend.get(f"{base}/readyz")
        call = frontend.get(
            f"{base}/api/call/{callee.service}",
            headers={"traceparent": TRACEPARENT, "x-request-id": "it-1"},
        )
        scrape = frontend.get(f"{base}/metrics")
        with pytest.raises(httpx.TransportError):  # STRICT: no certificate, no connection
            httpx.get(f"{base}/livez", verify=False, timeout=5)

    assert whoami.json() == {"service": example.service, "caller": FRONTEND}

    assert allowed.status_code == 200
    assert allowed.json()["order"] == 7
    assert denied.status_code == 403
    assert denied.json() == DENIED
    assert admin.status_code == 403  # the service-wide DENY from the settings

    assert [r.status_code for r in posts] == [200, 200, 429]
    assert posts[0].json()["by"] == FRONTEND
    assert posts[0].headers["ratelimit-policy"] == '"create-order";q=2;w=60'
    assert posts[2].headers["ratelimit"].startswith('"create-order";r=0;t=')
    assert 1 <= int(posts[2].headers["retry-after"]) <= 30

    assert live.status_code == 200
    assert ready.status_code == 200
    assert ready.json()["status"] == "pass"

    assert call.status_code == 200
    assert call.json()["status"] == 200
    echoed = call.json()["callee"]
    assert echoed["service"] == callee.service
    # The callee verified this service's own certificate, not the frontend's.
    assert echoed["caller"] == f"cluster.local/ns/default/sa/{example.service}"
    assert echoed["traceparent"].split("-")[1] == TRACE_ID
    assert echoed["x-request-id"] == "it-1"

    families = {f.name: f for f in text_string_to_metric_families(scrape.text)}
    inbound = [
        s
        for s in families["istio_requests"].samples
        if s.name == "istio_requests_total"
        and s.labels["reporter"] == "destination"
        and s.labels["source_principal"] == f"spiffe://{FRONTEND}"
    ]
    assert {s.labels["response_code"] for s in inbound} >= {"200", "403", "429"}
    outbound = [
        s
        for s in families["istio_requests"].samples
        if s.name == "istio_requests_total" and s.labels["reporter"] == "source"
    ]
    assert [s.labels["destination_service_name"] for s in outbound] == [callee.service]


def test_django_stock_application_behind_the_servers_own_stack(
    mesh_pki: Pki, tmp_path: Path
) -> None:
    """Django's own WSGI handler (``application.app``, inside the helper's stack) served bare:
    ``meshware serve`` builds the server-level stack from its options, and the middleware,
    finding that stack's record, only applies the views' policies and limits."""
    stock = Example("django_app.wsgi:application.app", "inventory", "gunicorn")
    callee = EXAMPLES_BY_FRAMEWORK["fastapi"]
    with ExitStack() as stack:
        callee_port = serve(stack, mesh_pki, callee, tmp_path)
        port = serve(
            stack, mesh_pki, stock, tmp_path, MESHWARE_SERVICE_ORDERS=f"127.0.0.1:{callee_port}"
        )
        base = f"https://127.0.0.1:{port}"
        with caller(mesh_pki, "frontend") as frontend, caller(mesh_pki, "intruder") as intruder:
            whoami = frontend.get(f"{base}/api/whoami")
            allowed = frontend.get(f"{base}/api/orders/7")
            denied = intruder.get(f"{base}/api/orders/7")
            posts = [frontend.post(f"{base}/api/orders") for _ in range(3)]
            ready = frontend.get(f"{base}/readyz")
            call = frontend.get(f"{base}/api/call/orders", headers={"traceparent": TRACEPARENT})
            scrape = frontend.get(f"{base}/metrics")
    assert whoami.json() == {"service": "inventory", "caller": FRONTEND}
    assert (allowed.status_code, denied.status_code) == (200, 403)
    assert [r.status_code for r in posts] == [200, 200, 429]
    assert posts[2].headers["ratelimit"].startswith('"create-order";r=0;t=')
    assert ready.json()["status"] == "pass"
    echoed = call.json()["callee"]
    assert echoed["caller"] == "cluster.local/ns/default/sa/inventory"
    assert echoed["traceparent"].split("-")[1] == TRACE_ID
    families = {f.name: f for f in text_string_to_metric_families(scrape.text)}
    codes = {
        s.labels["response_code"]
        for s in families["istio_requests"].samples
        if s.name == "istio_requests_total" and s.labels["reporter"] == "destination"
    }
    assert codes >= {"200", "403", "429"}
