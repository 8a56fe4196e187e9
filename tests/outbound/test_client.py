"""The mesh client factory: ``OutboundConfig`` and the clients and stacks built from it.

The stacks run whole, in plaintext (no ``cert_dir``), over an ``httpx.MockTransport`` given as
``passthrough``: every mesh call reaches it with the endpoint's address in the URL, as it
would reach the network. Behaviours are checked through both the async and the sync client.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import random
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from meshware.exceptions import ConfigurationError
from meshware.identity.ca import LocalCA
from meshware.outbound.balancing import LoadBalancerSettings
from meshware.outbound.breaker import BreakerPolicy
from meshware.outbound.call import HASH_KEY, RETRY_KEY, RETRYABLE_KEY, TIMEOUT_KEY
from meshware.outbound.client import (
    OutboundConfig,
    mesh_client,
    mesh_sync_client,
    mesh_sync_transport,
    mesh_transport,
)
from meshware.outbound.deadline import Deadline, deadline_scope
from meshware.outbound.destination import DestinationRule
from meshware.outbound.discovery import StaticRegistry
from meshware.outbound.endpoints import Endpoint
from meshware.outbound.errors import (
    CircuitOpen,
    DeadlineExceeded,
    NoHealthyEndpoint,
    PoolOverloaded,
)
from meshware.outbound.mirror import MirrorObserver
from meshware.outbound.outlier import OutlierDetection
from meshware.outbound.pool_limits import ConnectionPoolLimits
from meshware.outbound.retry import RetryPolicy
from meshware.outbound.routing import RouteTable
from meshware.outbound.transport_telemetry import AsyncTelemetryTransport, TelemetryTransport
from meshware.telemetry.context import request_id_scope
from meshware.telemetry.metrics import MeshMetrics, WorkloadInfo

V1 = Endpoint("10.0.0.1", 8080, labels={"version": "v1"})
V2 = Endpoint("10.0.0.2", 8080, labels={"version": "v2"})
REGISTRY = StaticRegistry({"payments": [V1, V2], "empty": []})
NO_WAIT = RetryPolicy(backoff_base=0.0, backoff_cap=0.0)
SUBSETS = DestinationRule.from_mapping(
    {
        "host": "payments",
        "subsets": [
            {"name": "v1", "labels": {"version": "v1"}},
            {"name": "v2", "labels": {"version": "v2"}},
        ],
    }
)


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Upstream:
    """The network: records what each request looked like when it was sent, and answers with
    the next status of ``statuses`` (then 200) and the endpoint it reached."""

    def __init__(self, *statuses: int, by_endpoint: dict[str, int] | None = None) -> None:
        self.statuses = list(statuses)
        self.by_endpoint = by_endpoint or {}
        self.sent: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        netloc = request.url.netloc.decode("ascii")
        self.sent.append(
            {
                "method": request.method,
                "url": str(request.url),
                "netloc": netloc,
                "headers": httpx.Headers(request.headers),
                "timeout": request.extensions.get("timeout"),
            }
        )
        status = self.by_endpoint.get(netloc) or (self.statuses.pop(0) if self.statuses else 200)
        return httpx.Response(status, json={"endpoint": netloc})

    @property
    def netlocs(self) -> list[str]:
        return [sent["netloc"] for sent in self.sent]


Send = Callable[..., Awaitable[httpx.Response]]


@pytest.fixture(params=["async", "sync"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@contextlib.asynccontextmanager
async def opened(
    kind: str, config: OutboundConfig, upstream: Upstream, **kwargs: Any
) -> AsyncIterator[Send]:
    """The async or sync mesh client of ``config`` over ``upstream``, as one ``send``."""
    mock = httpx.MockTransport(upstream)
    if kind == "async":
        async with mesh_client(config, passthrough=mock, **kwargs) as client:
            yield client.request
    else:
        with mesh_sync_client(config, passthrough=mock, **kwargs) as sync:

            async def send(*args: Any, **options: Any) -> httpx.Response:
                return sync.request(*args, **options)

            yield send


def orders(**overrides: Any) -> OutboundConfig:
    settings: dict[str, Any] = {"service": "orders", "resolver": REGISTRY, "retry": NO_WAIT}
    return OutboundConfig(**{**settings, **overrides})


# --- OutboundConfig ----------------------------------------------------------------------------


def test_config_defaults() -> None:
    config = OutboundConfig(service="orders")
    assert config.namespace == "default"
    assert config.trust_domain == "cluster.local"
    assert config.cert_dir is None
    assert config.retry == RetryPolicy()
    assert config.breaker == BreakerPolicy()
    assert config.outlier_detection is None
    assert config.destinations == ()
    assert config.retry_budget_ratio == 0.2
    assert config.timeout == 10.0
    assert config.workload() == WorkloadInfo(service="orders")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.timeout = 1.0  # type: ignore[misc]


def test_config_workload_carries_the_identity() -> None:
    config = OutboundConfig(service="orders", namespace="shop", version="v3", trust_domain="acme")
    assert config.workload() == WorkloadInfo(
        service="orders", namespace="shop", version="v3", trust_domain="acme"
    )


NAME_RULE = "expected 1-253 characters from A-Z a-z 0-9 . _ -"


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"service": ""}, "service", "service: must name this service"),
        ({"service": "my orders"}, "service", f"service: {NAME_RULE}"),
        ({"namespace": ""}, "namespace", f"namespace: {NAME_RULE}"),
        ({"version": "v 2"}, "version", f"version: {NAME_RULE} (or None)"),
        ({"retry": {"attempts": 3}}, "retry", "retry: expected a RetryPolicy"),
        ({"timeout": 0}, "timeout", "timeout: expected a positive, finite number of seconds"),
        ({"timeout": -1.0}, "timeout", "timeout: expected a positive, finite number of seconds"),
        ({"timeout": math.nan}, "timeout", "timeout: expected a positive, finite number of seconds"),
        ({"timeout": math.inf}, "timeout", "timeout: expected a positive, finite number of seconds"),
        ({"timeout": True}, "timeout", "timeout: expected a positive, finite number of seconds"),
        ({"timeout": "5"}, "timeout", "timeout: expected a positive, finite number of seconds"),
        ({"destinations": "payments"}, "destinations", "destinations: expected a list of DestinationRule"),
        ({"limits": 100}, "limits", "limits: expected an httpx.Limits or None"),
    ],
)  # fmt: skip
def test_config_validation(overrides: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        OutboundConfig(**{"service": "orders", **overrides})
    assert info.value.field == field
    assert str(info.value) == message


async def test_connection_limits_reach_the_pools() -> None:
    limits = httpx.Limits(max_connections=7, max_keepalive_connections=7)
    async with mesh_client(orders(limits=limits)) as client:
        connection = client._transport
        while hasattr(connection, "_transport") or hasattr(connection, "_inner"):
            connection = getattr(connection, "_transport", None) or connection._inner
        passthrough = connection._passthrough  # the pool of plaintext and non-mesh calls
        assert passthrough._pool._max_connections == 7
        assert passthrough._pool._max_keepalive_connections == 7


def test_config_keeps_destinations_as_a_tuple() -> None:
    config = OutboundConfig(service="orders", destinations=[SUBSETS])
    assert config.destinations == (SUBSETS,)
    hash(config.destinations)


def test_bad_settings_of_the_parts_fail_when_the_stack_is_built(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as info:
        mesh_transport(orders(server_ids={"payments": "payments"}))
    assert info.value.field == "server_ids.payments[0]"
    with pytest.raises(ConfigurationError) as info:
        mesh_sync_transport(orders(cert_dir=tmp_path / "missing"))
    assert info.value.field == "paths"
    with pytest.raises(ConfigurationError) as info:
        mesh_transport(orders(retry_budget_ratio=-1.0))
    assert info.value.field == "ratio"


# --- the factories -----------------------------------------------------------------------------


async def test_mesh_client_is_a_plain_async_client() -> None:
    config = orders(timeout=3.0)
    async with mesh_client(config, headers={"user-agent": "orders/1"}) as client:
        assert isinstance(client, httpx.AsyncClient)
        assert client.timeout == httpx.Timeout(3.0)
        assert client.headers["user-agent"] == "orders/1"
        assert isinstance(client._transport, AsyncTelemetryTransport)
    async with mesh_client(config, timeout=1.5) as client:
        assert client.timeout == httpx.Timeout(1.5)


def test_mesh_sync_client_is_a_plain_client() -> None:
    with mesh_sync_client(orders(), base_url="http://payments") as client:
        assert isinstance(client, httpx.Client)
        assert client.timeout == httpx.Timeout(10.0)
        assert client.base_url == httpx.URL("http://payments")
        assert isinstance(client._transport, TelemetryTransport)


def test_the_transport_cannot_be_replaced() -> None:
    for factory in (mesh_client, mesh_sync_client):
        with pytest.raises(ConfigurationError) as info:
            factory(orders(), transport=httpx.MockTransport(Upstream()))
        assert info.value.field == "transport"
        assert "passthrough=" in str(info.value)


# --- where calls go ----------------------------------------------------------------------------


async def test_a_mesh_call_goes_to_each_endpoint_in_turn(kind: str) -> None:
    upstream = Upstream()
    async with opened(kind, orders(), upstream) as send:
        first = await send("GET", "http://payments/api/charge?id=7")
        second = await send("GET", "http://payments/api/charge?id=8")
    assert (first.status_code, second.status_code) == (200, 200)
    assert str(first.request.url) == "http://payments/api/charge?id=7"
    assert sorted(upstream.netlocs) == ["10.0.0.1:8080", "10.0.0.2:8080"]
    assert {sent["url"].split("/", 3)[3] for sent in upstream.sent} == {
        "api/charge?id=7",
        "api/charge?id=8",
    }
    assert [sent["headers"]["host"] for sent in upstream.sent] == ["payments", "payments"]


async def test_other_hosts_pass_through_untouched(kind: str) -> None:
    upstream = Upstream(503)
    clock = FakeClock()
    async with opened(kind, orders(), upstream, clock=clock) as send:
        with request_id_scope("req-42"):
            response = await send(
                "GET", "https://api.example.com/v1/rates", extensions={TIMEOUT_KEY: 2.0}
            )
    assert response.status_code == 503  # not a mesh service: not retried
    (sent,) = upstream.sent
    assert sent["url"] == "https://api.example.com/v1/rates"
    assert sent["headers"]["x-request-id"] == "req-42"
    assert "x-meshware-timeout" not in sent["headers"]
    assert sent["timeout"] == dict.fromkeys(("connect", "read", "write", "pool"), 2.0)


async def test_an_unknown_or_empty_service_fails(kind: str) -> None:
    upstream = Upstream()
    async with opened(kind, orders(), upstream) as send:
        with pytest.raises(NoHealthyEndpoint) as info:
            await send("GET", "http://empty/")
    assert info.value.destination == "empty"
    assert str(info.value) == "empty: no endpoint for empty: discovery found no endpoints"
    assert upstream.sent == []


async def test_the_default_resolver_reads_the_environment(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MESHWARE_SERVICE_LEDGER", "10.9.9.9:7000")
    upstream = Upstream()
    async with opened(kind, OutboundConfig(service="orders"), upstream) as send:
        await send("GET", "http://ledger/entries")
    assert upstream.netlocs == ["10.9.9.9:7000"]


async def test_cert_dir_with_a_plaintext_destination_rule(kind: str, tmp_path: Path) -> None:
    LocalCA.init(tmp_path).issue("orders")
    plaintext = DestinationRule.from_mapping({"host": "payments", "trafficPolicy": {"tls": {}}})
    upstream = Upstream()
    config = orders(cert_dir=tmp_path, destinations=(plaintext,))
    async with opened(kind, config, upstream) as send:
        response = await send("GET", "http://payments/")
    assert response.status_code == 200
    assert upstream.sent[0]["url"].startswith("http://10.0.0.")


# --- deadlines ---------------------------------------------------------------------------------


async def test_a_plaintext_mesh_call_carries_its_deadline(kind: str) -> None:
    upstream = Upstream()
    clock = FakeClock()
    async with opened(kind, orders(), upstream, clock=clock) as send:
        await send("GET", "http://payments/", extensions={TIMEOUT_KEY: 2.0})
        with deadline_scope(Deadline(at=clock.now + 1.5, clock=clock)):
            await send("GET", "http://payments/")
            await send("GET", "http://payments/", extensions={TIMEOUT_KEY: 3.0})
    assert [sent["headers"]["x-meshware-timeout"] for sent in upstream.sent] == [
        "2S",
        "1500m",
        "1500m",
    ]
    assert [sent["timeout"]["read"] for sent in upstream.sent] == [2.0, 1.5, 1.5]


async def test_a_route_timeout_bounds_the_call(kind: str) -> None:
    routes = RouteTable.from_yaml(
        "hosts: [payments]\nhttp:\n- route: [{destination: {host: payments}}]\n  timeout: 250ms"
    )
    upstream = Upstream()
    clock = FakeClock()
    async with opened(kind, orders(routes=routes), upstream, clock=clock) as send:
        await send("GET", "http://payments/")
    assert upstream.sent[0]["headers"]["x-meshware-timeout"] == "250m"


async def test_a_spent_deadline_fails_before_anything_is_sent(kind: str) -> None:
    upstream = Upstream()
    clock = FakeClock()
    async with opened(kind, orders(), upstream, clock=clock) as send:
        spent = Deadline(at=clock.now - 0.5, clock=clock)
        with deadline_scope(spent), pytest.raises(DeadlineExceeded) as info:
            await send("GET", "http://payments/")
    assert info.value.destination == "payments"
    assert upstream.sent == []


# --- retries -----------------------------------------------------------------------------------


async def test_a_get_is_retried_on_another_endpoint(kind: str) -> None:
    upstream = Upstream(503)
    async with opened(kind, orders(), upstream) as send:
        response = await send("GET", "http://payments/")
    assert response.status_code == 200
    assert sorted(upstream.netlocs) == ["10.0.0.1:8080", "10.0.0.2:8080"]


@pytest.mark.parametrize(
    ("headers", "extensions", "tries", "status"),
    [
        ({}, {}, 1, 503),  # a POST may have been executed: not repeated after a 503
        ({}, {RETRYABLE_KEY: True}, 2, 200),  # the caller says it is safe
        ({"idempotency-key": "order-7"}, {}, 2, 200),  # the server deduplicates
    ],
)
async def test_a_post_is_retried_only_when_safe(
    kind: str, headers: dict[str, str], extensions: dict[str, Any], tries: int, status: int
) -> None:
    upstream = Upstream(503)
    async with opened(kind, orders(), upstream) as send:
        response = await send(
            "POST", "http://payments/", json={"a": 1}, headers=headers, extensions=extensions
        )
    assert response.status_code == status
    assert len(upstream.sent) == tries
    assert {sent["method"] for sent in upstream.sent} == {"POST"}


async def test_per_call_retry_override(kind: str) -> None:
    upstream = Upstream(503, 503, 503, 503)
    async with opened(kind, orders(), upstream) as send:
        once = await send("GET", "http://payments/", extensions={RETRY_KEY: None})
        three = RetryPolicy(attempts=3, backoff_base=0.0, backoff_cap=0.0)
        fourth = await send("GET", "http://payments/", extensions={RETRY_KEY: three})
    assert once.status_code == 503
    assert fourth.status_code == 200
    assert len(upstream.sent) == 1 + 4


# --- routing, balancing, destination rules -----------------------------------------------------

CANARY = RouteTable.from_yaml(
    """
hosts: [payments]
http:
- name: testers
  match: [{headers: {x-tester: {exact: "yes"}}}]
  route: [{destination: {host: payments, subset: v2}}]
- name: canary
  route:
  - {destination: {host: payments, subset: v1}, weight: 70}
  - {destination: {host: payments, subset: v2}, weight: 30}
"""
)


async def test_routes_pick_subsets_reproducibly_with_a_seed(kind: str) -> None:
    runs = []
    for _ in range(2):
        upstream = Upstream()
        config = orders(routes=CANARY, destinations=(SUBSETS,))
        async with opened(kind, config, upstream, rng=random.Random(3)) as send:
            for _ in range(40):
                await send("GET", "http://payments/")
            for _ in range(5):
                await send("GET", "http://payments/", headers={"x-tester": "yes"})
        runs.append(upstream.netlocs)
    assert runs[0] == runs[1]
    assert set(runs[0][:40]) == {"10.0.0.1:8080", "10.0.0.2:8080"}
    assert runs[0][40:] == ["10.0.0.2:8080"] * 5


async def test_hash_key_keeps_a_caller_on_one_endpoint(kind: str) -> None:
    ring = DestinationRule.from_mapping(
        {
            "host": "payments",
            "trafficPolicy": {"loadBalancer": {"consistentHash": {"httpHeaderName": "x-user"}}},
        }
    )
    upstream = Upstream()
    async with opened(kind, orders(destinations=(ring,)), upstream) as send:
        for _ in range(6):
            await send("GET", "http://payments/", headers={"x-user": "ada"})
        for _ in range(6):
            await send("GET", "http://payments/", extensions={HASH_KEY: "grace"})
    assert len(set(upstream.netlocs[:6])) == 1
    assert len(set(upstream.netlocs[6:])) == 1


async def test_the_default_load_balancer_applies(kind: str) -> None:
    # LEAST_REQUEST over idle endpoints picks among them at random; ROUND_ROBIN alternates.
    upstream = Upstream()
    config = orders(load_balancer=LoadBalancerSettings(simple="ROUND_ROBIN"))
    async with opened(kind, config, upstream) as send:
        for _ in range(6):
            await send("GET", "http://payments/")
    assert upstream.netlocs[0::2] == [upstream.netlocs[0]] * 3
    assert upstream.netlocs[1::2] == [upstream.netlocs[1]] * 3
    assert upstream.netlocs[0] != upstream.netlocs[1]


async def test_outlier_detection_from_the_config_ejects(kind: str) -> None:
    upstream = Upstream(by_endpoint={"10.0.0.1:8080": 503})
    config = orders(
        retry=RetryPolicy(attempts=0),
        outlier_detection=OutlierDetection(consecutive_5xx_errors=1, max_ejection_percent=100),
    )
    async with opened(kind, config, upstream, clock=FakeClock()) as send:
        statuses = [(await send("GET", "http://payments/")).status_code for _ in range(6)]
    assert upstream.netlocs.count("10.0.0.1:8080") == 1
    assert statuses.count(503) == 1


async def test_the_breaker_opens_after_failures(kind: str) -> None:
    upstream = Upstream(by_endpoint={"10.0.0.1:8080": 500, "10.0.0.2:8080": 500})
    config = orders(retry=RetryPolicy(attempts=0), breaker=BreakerPolicy(failure_threshold=2))
    async with opened(kind, config, upstream, clock=FakeClock()) as send:
        assert (await send("GET", "http://payments/")).status_code == 500
        assert (await send("GET", "http://payments/")).status_code == 500
        with pytest.raises(CircuitOpen) as info:
            await send("GET", "http://payments/")
    assert info.value.destination == "payments"
    assert len(upstream.sent) == 2


async def test_no_breaker(kind: str) -> None:
    upstream = Upstream(by_endpoint={"10.0.0.1:8080": 500, "10.0.0.2:8080": 500})
    config = orders(retry=RetryPolicy(attempts=0), breaker=None)
    async with opened(kind, config, upstream) as send:
        statuses = [(await send("GET", "http://payments/")).status_code for _ in range(8)]
    assert statuses == [500] * 8


async def test_pool_limits_shed_calls_beyond_them() -> None:
    release = asyncio.Event()
    arrived = asyncio.Event()

    async def slow(request: httpx.Request) -> httpx.Response:
        arrived.set()
        await release.wait()
        return httpx.Response(200)

    config = orders(connection_pool=ConnectionPoolLimits(max_connections=1, max_pending_requests=0))
    async with mesh_client(config, passthrough=httpx.MockTransport(slow)) as client:
        first = asyncio.ensure_future(client.get("http://payments/"))
        await arrived.wait()
        with pytest.raises(PoolOverloaded) as info:
            await client.get("http://payments/")
        release.set()
        assert (await first).status_code == 200
    assert info.value.destination == "payments"


# --- metrics and mirroring ---------------------------------------------------------------------


def samples(metrics: MeshMetrics, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (dict(sample.labels), sample.value)
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name == name
    ]


async def test_calls_are_counted_as_istio_source_metrics(kind: str) -> None:
    metrics = MeshMetrics()
    upstream = Upstream(503)
    config = orders(metrics=metrics, version="v7")
    async with opened(kind, config, upstream) as send:
        response = await send("GET", "http://payments/")
        await response.aread()
    ((labels, value),) = samples(metrics, "istio_requests_total")
    assert value == 1.0
    assert labels["reporter"] == "source"
    assert labels["source_workload"] == "orders"
    assert labels["source_version"] == "v7"
    assert labels["destination_service_name"] == "payments"
    assert labels["response_code"] == "200"
    # The call is reported once, with the endpoint that answered (the retry's).
    versions = {"10.0.0.1:8080": "v1", "10.0.0.2:8080": "v2"}
    assert labels["destination_version"] == versions[upstream.netlocs[1]]
    retries = samples(metrics, "meshware_outbound_retries_total")
    assert [(labels["condition"], value) for labels, value in retries] == [("503", 1.0)]


async def test_the_configured_mirror_observer_sees_the_copies() -> None:
    routes = RouteTable.from_yaml(
        """
hosts: [payments]
http:
- route: [{destination: {host: payments, subset: v1}}]
  mirror: {host: payments, subset: v2}
"""
    )
    observer = MirrorObserver()
    upstream = Upstream()
    config = orders(routes=routes, destinations=(SUBSETS,), mirror_observer=observer)
    async with mesh_client(config, passthrough=httpx.MockTransport(upstream)) as client:
        response = await client.post("http://payments/charge", json={"amount": 5})
        for _ in range(1000):  # the copy runs in a task of its own; closing would cancel it
            if observer.responses:
                break
            await asyncio.sleep(0)
    assert response.json() == {"endpoint": "10.0.0.1:8080"}
    assert observer.mirrored == 1
    assert observer.mirror_statuses == {200: 1}
    shadow = [sent for sent in upstream.sent if sent["netloc"] == "10.0.0.2:8080"]
    assert [sent["headers"]["host"] for sent in shadow] == ["payments-shadow"]


# --- the hard time limit of each try (async) -------------------------------------------------


def hanging(arrived: asyncio.Event) -> httpx.MockTransport:
    never = asyncio.Event()

    async def upstream(request: httpx.Request) -> httpx.Response:
        arrived.set()
        await never.wait()  # a server that never answers
        return httpx.Response(200)

    return httpx.MockTransport(upstream)


async def test_a_try_past_its_limit_is_cut_off_and_the_task_stays_usable() -> None:
    config = orders(retry=RetryPolicy(attempts=0, per_try_timeout=0.02))
    async with mesh_client(config, passthrough=hanging(asyncio.Event())) as client:
        with pytest.raises(httpx.ReadTimeout) as info:
            await client.get("http://payments/")
    assert str(info.value) == "per-try time limit of 0.020s exceeded"
    task = asyncio.current_task()
    assert task is not None
    if sys.version_info >= (3, 11):
        assert task.cancelling() == 0  # the limit's own cancellation was taken back
    await asyncio.sleep(0)  # and no cancellation is left pending for the caller


async def test_a_cancelled_caller_is_cancelled_not_timed_out() -> None:
    arrived = asyncio.Event()
    config = orders(retry=RetryPolicy(attempts=0, per_try_timeout=30.0))
    async with mesh_client(config, passthrough=hanging(arrived)) as client:
        call = asyncio.ensure_future(client.get("http://payments/"))
        await arrived.wait()
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
