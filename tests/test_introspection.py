"""/meshz: the document gathered from registered objects, and its ASGI and WSGI responders."""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

import httpx
import pytest

from meshware.config.reload import ConfigWatcher
from meshware.exceptions import ConfigurationError
from meshware.identity.ca import ServicePaths
from meshware.introspection import (
    Introspection,
    MeshzApp,
    MeshzWsgiApp,
    default_introspection,
    outbound_state_of,
)
from meshware.outbound.breaker import BreakerPolicy
from meshware.outbound.client import OutboundConfig, mesh_client, mesh_sync_client
from meshware.outbound.destination import DestinationRule, TrafficPolicy
from meshware.outbound.discovery import StaticRegistry
from meshware.outbound.endpoints import Endpoint
from meshware.outbound.outlier import OutlierDetection
from meshware.outbound.routing import RouteTable
from meshware.outbound.transports import OutboundState
from meshware.policy.facts import RequestFacts
from meshware.policy.ratelimit import RateLimiter, RateLimitPolicy, RateLimitRule
from meshware.server.tls import MtlsMode, ReloadingServerTLS
from tests.servers import issue_pki

WALL = 1_700_000_000.0

MESH = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-users}
spec:
  selector:
    matchLabels: {app: catalog}
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/default/sa/users"]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: payments}
spec:
  host: payments
  subsets:
  - {name: v1, labels: {version: v1}}
"""


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


A = Endpoint("10.0.0.1", 8080, labels={"version": "v1"})
B = Endpoint("10.0.0.2", 8080, labels={"version": "v2"})


def outbound_state(clock: FakeClock) -> OutboundState:
    rule = DestinationRule(
        host="payments",
        traffic_policy=TrafficPolicy(
            outlier_detection=OutlierDetection(
                consecutive_5xx_errors=1, base_ejection_time=30.0, max_ejection_percent=100
            )
        ),
    )
    return OutboundState(
        rules=[rule], breaker=BreakerPolicy(failure_threshold=1), clock=clock, tls_mode="DISABLE"
    )


def test_outbound_section_shows_endpoints_health_breaker_and_budget() -> None:
    clock = FakeClock(500.0)
    state = outbound_state(clock)
    cluster = state.cluster("payments")
    cluster.select((A, B))
    assert cluster.detector is not None and cluster.breaker is not None
    cluster.detector.on_result(B, status=503)
    cluster.breaker.on_failure()
    meshz = Introspection(service="catalog", wall_clock=FakeClock(WALL))
    meshz.add_outbound(state, name="main", resolver=StaticRegistry({"payments": [A, B]}))
    clock.now = 510.0
    [section] = meshz.snapshot()["outbound"]
    assert section["name"] == "main"
    assert section["retry_budgets"] == {"payments": 10 * 10}
    [shown] = section["clusters"]
    assert shown["destination"] == "payments"
    assert shown["subset"] is None
    assert shown["breaker"] == "open"
    assert shown["outlier_detection"] is True
    until = datetime.datetime.fromtimestamp(WALL + 20.0, datetime.timezone.utc).isoformat()
    assert shown["endpoints"] == [
        {
            "address": "10.0.0.1:8080",
            "labels": {"version": "v1"},
            "healthy": True,
            "ejected_until": None,
            "ejected_seconds_left": None,
        },
        {
            "address": "10.0.0.2:8080",
            "labels": {"version": "v2"},
            "healthy": False,
            "ejected_until": until,
            "ejected_seconds_left": 20.0,
        },
    ]
    clock.now = 531.0  # the ejection is over
    [cluster_now] = meshz.snapshot()["outbound"][0]["clusters"]
    assert [e["healthy"] for e in cluster_now["endpoints"]] == [True, True]


def test_without_a_resolver_the_endpoints_seen_last_are_shown() -> None:
    clock = FakeClock(0.0)
    state = outbound_state(clock)
    state.cluster("payments").select((A,))
    meshz = Introspection()
    meshz.add_outbound(state)
    [shown] = meshz.snapshot()["outbound"][0]["clusters"]
    assert [e["address"] for e in shown["endpoints"]] == ["10.0.0.1:8080"]


def test_outbound_state_of_a_mesh_client() -> None:
    client = mesh_client(OutboundConfig(service="catalog"))
    state = outbound_state_of(client)
    assert isinstance(state, OutboundState)
    assert outbound_state_of(object()) is None
    routed = mesh_sync_client(OutboundConfig(service="catalog", routes=RouteTable()))
    assert isinstance(outbound_state_of(routed), OutboundState)


def test_ratelimit_section_counts_memory_buckets() -> None:
    limiter = RateLimiter(
        RateLimitPolicy(rules=(RateLimitRule(name="per-caller", rate="5/minute"),)),
        clock=FakeClock(0.0),
    )
    facts = RequestFacts(method="GET", path="/", source_principal="a")
    limiter.decide(facts)
    limiter.decide(RequestFacts(method="GET", path="/", source_principal="b"))
    meshz = Introspection()
    meshz.add_rate_limiter(limiter)
    meshz.add_rate_limiter(lambda: None)  # a stack without a limiter is left out
    assert meshz.snapshot()["ratelimit"] == [
        {
            "backend": "memory://",
            "failure_mode": "open",
            "rules": [
                {"name": "per-caller", "rate": "5/minute", "key": "principal", "shadow": False}
            ],
            "buckets": 2,
            "backend_errors": 0,
        }
    ]


def test_config_section(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(MESH)
    watcher = ConfigWatcher(path, service="catalog", wall_clock=FakeClock(WALL))
    meshz = Introspection(watcher=watcher, wall_clock=FakeClock(WALL + 60))
    document = meshz.snapshot()
    assert document["service"] == "catalog"
    assert document["pid"] == os.getpid()
    config = document["config"]
    assert config["generation"] == 1
    assert config["digest"] == watcher.config.source.digest
    assert config["loaded_at"] == "2023-11-14T22:13:20+00:00"
    assert config["files"] == [
        {"path": str(path), "sha256": watcher.config.source.files[0].sha256, "size": len(MESH)}
    ]
    assert config["summary"] == {
        "mtls_mode": None,
        "authorization_policies": [{"name": "allow-users", "action": "ALLOW", "dry_run": False}],
        "jwt_issuers": [],
        "rate_limit_rules": [],
        "virtual_services": [],
        "destination_rules": [{"host": "payments", "subsets": ["v1"]}],
        "registry_services": [],
        "warnings": 0,
    }
    assert config["last_reload"] == {"outcome": None, "error": None, "problems": [], "at": None}
    path.write_text(MESH.replace("principals:", "principalz:"))
    assert watcher.reload() == "error"
    last = meshz.snapshot()["config"]["last_reload"]
    assert last["outcome"] == "error"
    [problem] = last["problems"]
    assert "source.principalz: unknown field" in problem
    assert last["error"] == problem
    assert meshz.snapshot()["config"]["reloads"] == {"ok": 0, "error": 1}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return issue_pki(tmp_path_factory.mktemp("pki"), "catalog")


def test_tls_section(pki: Path) -> None:
    paths = ServicePaths.under(pki, "catalog", "default")
    tls = ReloadingServerTLS(
        cert_file=paths.cert, key_file=paths.key, bundle_file=paths.bundle, mode=MtlsMode.STRICT
    )
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(paths.cert.read_bytes())
    now = cert.not_valid_after_utc.timestamp() - 3600.5
    meshz = Introspection(wall_clock=FakeClock(now))
    meshz.add_tls(tls)
    [shown] = meshz.snapshot()["tls"]
    assert shown["spiffe_id"] == "spiffe://cluster.local/ns/default/sa/catalog"
    assert shown["subject"] == cert.subject.rfc4514_string()
    assert shown["not_after"] == cert.not_valid_after_utc.isoformat()
    assert shown["seconds_left"] == 3600
    assert shown["mode"] == "strict"
    assert shown["serial"] == format(cert.serial_number, "x")


def test_registration_refuses_the_wrong_types() -> None:
    meshz = Introspection()
    with pytest.raises(ConfigurationError, match="state: expected an OutboundState"):
        meshz.add_outbound(object())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="limiter: expected a RateLimiter"):
        meshz.add_rate_limiter(42)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="tls: expected a ReloadingServerTLS"):
        meshz.add_tls(object())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="watcher: expected a ConfigWatcher"):
        Introspection(watcher=object())  # type: ignore[arg-type]


def test_default_introspection_is_one_per_process() -> None:
    assert default_introspection() is default_introspection()


@pytest.fixture(params=["asgi", "wsgi"])
def responder(request: pytest.FixtureRequest) -> Any:
    meshz = Introspection(service="catalog", wall_clock=FakeClock(WALL))

    def make(client: str = "127.0.0.1", **kwargs: Any) -> Any:
        if request.param == "asgi":
            return httpx.AsyncClient(
                transport=httpx.ASGITransport(MeshzApp(meshz, **kwargs), client=(client, 5000)),
                base_url="http://admin",
            )
        return httpx.AsyncClient(
            transport=_AsyncWsgi(MeshzWsgiApp(meshz, **kwargs), client), base_url="http://admin"
        )

    return make


class _AsyncWsgi(httpx.AsyncBaseTransport):
    def __init__(self, app: Any, client: str) -> None:
        self._inner = httpx.WSGITransport(app=app, remote_addr=client)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        request.read()
        response = self._inner.handle_request(request)
        return httpx.Response(
            response.status_code, headers=response.headers, content=response.read()
        )


async def test_get_meshz_returns_the_document(responder: Any) -> None:
    async with responder() as client:
        response = await client.get("/meshz")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    document = json.loads(response.content)
    assert document["service"] == "catalog"
    assert document["time"] == "2023-11-14T22:13:20+00:00"
    assert document["outbound"] == [] and document["ratelimit"] == [] and document["tls"] == []


@pytest.mark.parametrize("client_ip", ["10.1.2.3", "192.168.0.1"])
async def test_remote_callers_are_refused(responder: Any, client_ip: str) -> None:
    async with responder(client_ip) as client:
        response = await client.get("/meshz")
    assert response.status_code == 403
    assert response.json() == {
        "status": 403,
        "error": "forbidden",
        "detail": "/meshz answers loopback callers only",
    }
    async with responder(client_ip, allow_remote=True) as client:
        assert (await client.get("/meshz")).status_code == 200


async def test_other_paths_and_methods(responder: Any) -> None:
    async with responder("::1") as client:
        other = await client.get("/livez")
        post = await client.post("/meshz")
        head = await client.head("/meshz")
    assert other.status_code == 404
    assert other.json()["detail"] == "only /meshz is served here"
    assert post.status_code == 405
    assert head.status_code == 200 and head.content == b""


def test_bad_responder_arguments() -> None:
    with pytest.raises(ConfigurationError, match="introspection: expected an Introspection"):
        MeshzApp(object())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match='path: expected a path starting with "/"'):
        MeshzWsgiApp(Introspection(), path="meshz")
