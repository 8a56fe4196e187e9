"""meshware_django through Django's own test Client, AsyncClient and RequestFactory.

Without a server-level stack around Django, the middleware runs it itself, so the test
clients see the whole mesh. The identity is handed over the way a server would: the
``SSL_CLIENT_CERT`` variable (sync requests) or an ``x-forwarded-client-cert`` header from a
trusted proxy's address (the async client's ``127.0.0.1``).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import django
import pytest
from django.conf import settings
from prometheus_client.parser import text_string_to_metric_families

from tests.plugins.django_project import settings as project_settings

if not settings.configured:
    settings.configure(**{k: v for k, v in vars(project_settings).items() if k.isupper()})
django.setup()

from django.core.management import call_command  # noqa: E402
from django.core.management.base import SystemCheckError  # noqa: E402
from django.http import HttpResponse  # noqa: E402
from django.test import AsyncClient, Client, RequestFactory, override_settings  # noqa: E402
from meshware_django.conf import declarations, mesh  # noqa: E402
from meshware_django.middleware import MeshwareMiddleware  # noqa: E402

from meshware.identity.identity import Identity  # noqa: E402
from meshware.identity.spiffe import SpiffeId  # noqa: E402
from meshware.inbound.health import HealthState  # noqa: E402
from meshware.inbound.record import IDENTITY_KEY, RECORD_KEY, RequestRecord  # noqa: E402
from tests.plugins import (  # noqa: E402
    FRONTEND,
    INTRUDER,
    TRACE_ID,
    TRACEPARENT,
    Pki,
    echo_port,
    lower_headers,
    pki,
)
from tests.plugins.django_project import views  # noqa: E402
from tests.servers import ROOT  # noqa: E402

__all__ = ["echo_port", "pki"]

DENIED = {"status": 403, "error": "forbidden", "detail": "RBAC: access denied"}
LIMITED = {"status": 429, "error": "too_many_requests", "detail": "rate limit exceeded"}
MIDDLEWARE = "meshware_django.middleware.MeshwareMiddleware"


def meshware_settings(pki: Pki, echo: int, **extra: Any) -> dict[str, Any]:
    return {
        "SERVICE": "inventory",
        "BUNDLE": str(pki.bundle),
        "TRUSTED_PROXIES": ["127.0.0.1"],
        "SERVICES": {"echo": [f"127.0.0.1:{echo}"]},
        "ACCESS_LOG": False,
        **extra,
    }


@pytest.fixture
def mesh_on(pki: Pki, echo_port: int) -> Iterator[None]:
    with override_settings(MESHWARE=meshware_settings(pki, echo_port)):
        yield
    mesh().close()


def cert(pki: Pki, service: str) -> dict[str, str]:
    return {"SSL_CLIENT_CERT": pki.pem(service)}


def xfcc(pki: Pki, service: str) -> dict[str, str]:
    return {"x-forwarded-client-cert": pki.xfcc(service)}


# -- identity ----------------------------------------------------------------------------------


@pytest.mark.usefixtures("mesh_on")
def test_identity_from_ssl_client_cert_reaches_a_sync_view(pki: Pki) -> None:
    client = Client()
    assert client.get("/whoami", **cert(pki, "frontend")).json() == {
        "caller": FRONTEND,
        "source": "ssl-client-cert",
    }
    assert client.get("/whoami").json() == {"caller": None}


@pytest.mark.usefixtures("mesh_on")
async def test_identity_from_a_trusted_proxy_reaches_an_async_view(pki: Pki) -> None:
    client = AsyncClient()
    response = await client.get("/awhoami", headers=xfcc(pki, "frontend"))
    assert response.json() == {"caller": FRONTEND, "source": "xfcc", "async": True}
    await mesh().aclose()


async def test_an_async_request_through_a_sync_middleware_chain(pki: Pki, echo_port: int) -> None:
    """A sync-only middleware after this one makes Django run the chain in sync mode under
    ASGI: the middleware then gets an ASGI request in a thread, and still runs the stack."""
    chain = [MIDDLEWARE, "tests.plugins.django_project.middleware.SyncOnlyMiddleware"]
    with override_settings(MESHWARE=meshware_settings(pki, echo_port), MIDDLEWARE=chain):
        client = AsyncClient()
        allowed = await client.get("/orders/7", headers=xfcc(pki, "frontend"))
        denied = await client.get("/orders/7", headers=xfcc(pki, "intruder"))
        ready = await client.get("/readyz")
    mesh().close()
    assert allowed.json() == {"order": 7}
    assert allowed["x-sync-only"] == "seen"
    assert "x-request-id" in allowed
    assert denied.status_code == 403
    assert ready.json() == {"status": "pass", "serviceId": "inventory"}


# -- authorization -----------------------------------------------------------------------------


@pytest.mark.usefixtures("mesh_on")
def test_function_view_policy_allows_one_service_and_denies_another(pki: Pki) -> None:
    client = Client()
    allowed = client.get("/orders/7", **cert(pki, "frontend"))
    denied = client.get("/orders/7", **cert(pki, "intruder"))
    assert allowed.status_code == 200
    assert allowed.json() == {"order": 7}
    assert denied.status_code == 403
    assert denied.json() == DENIED
    assert denied["Content-Type"] == "application/json"


@pytest.mark.usefixtures("mesh_on")
def test_class_based_view_policy_from_the_class(pki: Pki) -> None:
    client = Client()
    allowed = client.get("/inventory", **cert(pki, "frontend"))
    denied = client.get("/inventory", **cert(pki, "intruder"))
    assert allowed.json() == {
        "items": ["bolt", "nut"],
        "caller": FRONTEND,
        "source": "ssl-client-cert",
    }
    assert denied.status_code == 403


@pytest.mark.usefixtures("mesh_on")
async def test_async_class_based_view_policy_from_the_method(pki: Pki) -> None:
    client = AsyncClient()
    allowed = await client.get("/items/bolt", headers=xfcc(pki, "frontend"))
    denied = await client.get("/items/bolt", headers=xfcc(pki, "intruder"))
    assert allowed.json() == {"item": "bolt", "caller": FRONTEND, "source": "xfcc"}
    assert denied.status_code == 403
    assert denied.json() == DENIED
    await mesh().aclose()


def test_service_wide_policies_apply_to_paths_without_a_view(pki: Pki, echo_port: int) -> None:
    policy = {
        "name": "frontend-only",
        "rules": [{"from": [{"source": {"principals": [FRONTEND]}}]}],
    }
    with override_settings(MESHWARE=meshware_settings(pki, echo_port, POLICIES=[policy])):
        client = Client()
        unknown_path = client.get("/no/such/page", **cert(pki, "intruder"))
        missing = client.get("/no/such/page", **cert(pki, "frontend"))
        view = client.get("/whoami", **cert(pki, "intruder"))
    mesh().close()
    assert unknown_path.status_code == 403  # not a 404 that tells the path is free
    assert missing.status_code == 404
    assert view.status_code == 403


# -- rate limits -------------------------------------------------------------------------------


@pytest.mark.usefixtures("mesh_on")
def test_function_view_rate_limit_answers_429_with_headers(pki: Pki) -> None:
    client = Client()
    responses = [client.post("/orders", **cert(pki, "frontend")) for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 429]
    assert responses[0]["RateLimit-Policy"] == '"create-order";q=2;w=60'
    assert responses[0]["RateLimit"] == '"create-order";r=1;t=30'
    assert responses[2].json() == LIMITED
    assert responses[2]["RateLimit"].startswith('"create-order";r=0;t=')
    assert 1 <= int(responses[2]["Retry-After"]) <= 30


@pytest.mark.usefixtures("mesh_on")
def test_method_decorator_limit_is_named_after_the_method(pki: Pki) -> None:
    client = Client()
    first = client.post("/inventory", **cert(pki, "frontend"))
    second = client.post("/inventory", **cert(pki, "frontend"))
    name = "tests.plugins.django_project.views.InventoryView.post"
    assert first.status_code == 200
    assert first["RateLimit-Policy"] == f'"{name}";q=1;w=60'
    assert second.status_code == 429
    assert second["Retry-After"] == "60"


@pytest.mark.usefixtures("mesh_on")
async def test_async_requests_are_rate_limited_too(pki: Pki) -> None:
    client = AsyncClient()
    statuses = [
        (await client.put("/inventory", headers=xfcc(pki, "frontend"))).status_code
        for _ in range(4)
    ]
    assert statuses == [200, 200, 200, 429]
    await mesh().aclose()


@pytest.mark.usefixtures("mesh_on")
def test_several_method_decorator_declarations_on_one_method(pki: Pki) -> None:
    client = Client()
    frozen = client.delete("/inventory", headers={"x-freeze": "yes"}, **cert(pki, "frontend"))
    allowed = client.delete("/inventory", **cert(pki, "frontend"))
    denied = client.delete("/inventory", **cert(pki, "intruder"))
    assert frozen.status_code == 403  # the DENY given in a list with a limit
    assert allowed.status_code == 200
    # The more restrictive of the two limits given through two method_decorators is reported.
    name = "tests.plugins.django_project.views.InventoryView.delete"
    assert allowed["RateLimit-Policy"] == f'"{name}";q=5;w=60'
    assert denied.status_code == 403  # the class-level ALLOW still applies


def test_declarations_of_each_method_of_a_class_based_view() -> None:
    view = views.InventoryView.as_view()
    get_policies, get_rules = declarations(view, "GET")
    post_policies, post_rules = declarations(view, "POST")
    _, put_rules = declarations(view, "PUT")
    assert [p.name for p in get_policies] == ["inventory-readers"]
    assert get_rules == ()
    assert [p.name for p in post_policies] == ["inventory-readers"]
    assert [r.name for r in post_rules] == ["tests.plugins.django_project.views.InventoryView.post"]
    assert [r.name for r in put_rules] == ["replace-inventory"]
    delete_policies, delete_rules = declarations(view, "DELETE")
    delete = "tests.plugins.django_project.views.InventoryView.delete"
    assert sorted(p.name for p in delete_policies) == ["inventory-readers", delete]
    assert sorted(r.name for r in delete_rules) == ["deletes-hourly", delete]
    assert [p.name for p in declarations(views.order, "GET")[0]] == ["frontend-reads"]


# -- health, metrics, outbound -----------------------------------------------------------------


@pytest.mark.usefixtures("mesh_on")
def test_health_and_metrics_answer_through_the_test_client(pki: Pki) -> None:
    client = Client()
    client.get("/orders/1", **cert(pki, "frontend"))
    live = client.get("/livez")
    ready = client.get("/readyz")
    scrape = client.get("/metrics")
    assert live.status_code == 200
    assert live["Content-Type"] == "application/health+json"
    assert ready.json() == {"status": "pass", "serviceId": "inventory"}
    families = {f.name: f for f in text_string_to_metric_families(scrape.content.decode())}
    [sample] = [
        s
        for s in families["istio_requests"].samples
        if s.name == "istio_requests_total" and s.labels["response_code"] == "200"
    ]
    assert sample.labels["destination_service_name"] == "inventory"
    assert sample.labels["source_principal"] == f"spiffe://{FRONTEND}"
    assert mesh().health is not None and mesh().health.state is HealthState.READY


@pytest.mark.usefixtures("mesh_on")
def test_sync_outbound_call_carries_trace_context_and_request_id() -> None:
    response = Client().get("/call", headers={"traceparent": TRACEPARENT, "x-request-id": "d-1"})
    echoed = lower_headers(response.json())
    assert echoed["x-request-id"] == "d-1"
    assert echoed["traceparent"].split("-")[1] == TRACE_ID
    assert echoed["traceparent"].split("-")[2] != "b7ad6b7169203331"
    assert response["x-request-id"] == "d-1"


@pytest.mark.usefixtures("mesh_on")
async def test_async_outbound_call_carries_trace_context_and_request_id() -> None:
    response = await AsyncClient().get(
        "/acall", headers={"traceparent": TRACEPARENT, "x-request-id": "d-2"}
    )
    echoed = lower_headers(response.json())
    assert echoed["x-request-id"] == "d-2"
    assert echoed["traceparent"].split("-")[1] == TRACE_ID
    assert response["x-request-id"] == "d-2"
    await mesh().aclose()


# -- behind a server-level stack: RequestFactory -----------------------------------------------


@pytest.mark.usefixtures("mesh_on")
def test_behind_a_stack_the_middleware_reads_the_identity_it_left(pki: Pki) -> None:
    """As under ``meshware serve``: the stack left the identity and its record in the
    environ, and the middleware only applies the view's policies."""

    def leave(service: str, path: str) -> Any:
        identity = Identity(SpiffeId.parse(f"spiffe://{Pki.id(service)}"), "tls-socket")
        request = RequestFactory().get(path)
        request.META[IDENTITY_KEY] = identity
        request.META[RECORD_KEY] = RequestRecord(identity=identity)
        return request

    seen: list[Any] = []

    def get_response(request: Any) -> HttpResponse:
        seen.append(request.mesh_identity)
        return HttpResponse("ok")

    middleware = MeshwareMiddleware(get_response)
    frontend, intruder = leave("frontend", "/orders/7"), leave("intruder", "/orders/7")
    assert middleware.process_view(frontend, views.order, (), {"order_id": 7}) is None
    denied = middleware.process_view(intruder, views.order, (), {"order_id": 7})
    assert denied.status_code == 403
    assert intruder.META[RECORD_KEY].authz_policy is None
    assert intruder.META[RECORD_KEY].authz_decision == "deny"
    assert middleware(frontend).content == b"ok"
    assert [str(identity) for identity in seen] == [f"spiffe://{FRONTEND}"]
    assert "meshware.django.viewed" not in frontend.META  # per-request notes are cleaned up


@pytest.mark.usefixtures("mesh_on")
def test_request_factory_request_through_the_middleware(pki: Pki) -> None:
    middleware = MeshwareMiddleware(lambda request: HttpResponse(str(request.mesh_identity)))
    request = RequestFactory().get("/anything", **cert(pki, "intruder"))
    response = middleware(request)
    assert response.content.decode() == f"spiffe://{INTRUDER}"
    assert "x-request-id" in response


# -- system checks -----------------------------------------------------------------------------


def run_check() -> str:
    try:
        call_command("check", stdout=io.StringIO())
    except SystemCheckError as exc:
        return str(exc)
    return ""


@pytest.mark.parametrize(
    ("overrides", "check_id", "names"),
    [
        ({"MESHWARE": {"ACCESS_LOG": False}}, "meshware.E001", "service"),
        (
            {"MIDDLEWARE": ["django.middleware.common.CommonMiddleware"]},
            "meshware.E002",
            MIDDLEWARE,
        ),
        (
            {"MIDDLEWARE": ["django.middleware.common.CommonMiddleware", MIDDLEWARE]},
            "meshware.E003",
            "must be the first entry of MIDDLEWARE",
        ),
        (
            {"MESHWARE": {"SERVICE": "inventory", "POLICIES": [{"name": "x", "action": "ALOW"}]}},
            "meshware.E004",
            'MESHWARE["POLICIES"][0].action: expected one of ALLOW, DENY, AUDIT',
        ),
        (
            {"MESHWARE": {"SERVICE": "inventory", "RATE_LIMIT": "fast"}},
            "meshware.E005",
            'MESHWARE["RATE_LIMIT"]',
        ),
        (
            {"MESHWARE": {"SERVICE": "inventory", "RATE_LIMITS": "5/minute"}},
            "meshware.E006",
            'MESHWARE["RATE_LIMITS"]: unknown setting; did you mean MESHWARE["RATE_LIMIT"]?',
        ),
        (
            {"MESHWARE": {"SERVICE": "inventory", "CERT_DIR": "/no/such/dir"}},
            "meshware.E007",
            'MESHWARE["CERT_DIR"]: the certificate directory does not exist',
        ),
        (
            {"MESHWARE": {"SERVICE": "inventory", "TRACE_SAMPLE": 2}},
            "meshware.E008",
            'MESHWARE["TRACE_SAMPLE"]: expected a ratio from 0 to 1',
        ),
        ({"MESHWARE": "inventory"}, "meshware.E009", "MESHWARE must be a dict"),
        (
            {
                "MESHWARE": {
                    "SERVICE": "inventory",
                    "POLICIES": [{"name": "frontend-reads", "rules": [{}]}],
                }
            },
            "meshware.E010",
            "duplicate policy name 'frontend-reads'",
        ),
    ],
)
def test_manage_py_check_names_each_misconfiguration(
    overrides: dict[str, Any], check_id: str, names: str
) -> None:
    with override_settings(**overrides):
        report = run_check()
    assert f"({check_id})" in report
    assert names in report
    # Exactly one meshware problem is reported for each misconfiguration.
    assert report.count("(meshware.") == 1


def test_manage_py_check_passes_a_good_configuration(pki: Pki, echo_port: int) -> None:
    with override_settings(MESHWARE=meshware_settings(pki, echo_port)):
        assert run_check() == ""


def test_python_m_django_check_names_environment_settings(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.plugins.django_project.settings",
        "MESHWARE_RATE_LIMIT": "lots",
        "MESHWARE_SERVCE": "inventory",
    }
    result = subprocess.run(
        [sys.executable, "-m", "django", "check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "(meshware.E005) MESHWARE_RATE_LIMIT: invalid rate 'lots'" in result.stderr
    assert (
        "(meshware.E006) MESHWARE_SERVCE: unknown setting; did you mean MESHWARE_SERVICE? "
        "(from environment)"
    ) in result.stderr
