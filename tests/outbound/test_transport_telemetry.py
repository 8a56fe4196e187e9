"""The telemetry layer: client spans, trace and request-id propagation, reporter="source"
metrics and response flags, sync and async alike."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from meshware.exceptions import ConfigurationError
from meshware.inbound.asgi.telemetry import TelemetryMiddleware as AsgiTelemetry
from meshware.inbound.wsgi.telemetry import TelemetryMiddleware as WsgiTelemetry
from meshware.outbound.call import CallPlan, plan_of
from meshware.outbound.discovery import StaticRegistry
from meshware.outbound.endpoints import Endpoint
from meshware.outbound.errors import (
    CircuitOpen,
    DeadlineExceeded,
    NoHealthyEndpoint,
    PoolOverloaded,
)
from meshware.outbound.retry import RetryPolicy
from meshware.outbound.transport_balancing import AsyncBalancingTransport, BalancingTransport
from meshware.outbound.transport_retry import RetryTransport
from meshware.outbound.transport_telemetry import (
    AsyncTelemetryTransport,
    TelemetryTransport,
    failure_flags,
)
from meshware.outbound.transports import SERVER_IDENTITY_KEY, OutboundState
from meshware.telemetry.context import current_request_id, request_id_scope
from meshware.telemetry.metrics import MeshMetrics, WorkloadInfo
from meshware.types import Receive, Scope, Send

URL = "http://payments/api/charge"
ORDERS = WorkloadInfo(service="orders", namespace="shop", version="v1")
V2 = Endpoint("10.0.0.2", 8080, labels={"version": "v2"})


class Tracing:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("tests")

    def spans(self, name: str | None = None) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if name is None or s.name == name]


@pytest.fixture
def tracing() -> Iterator[Tracing]:
    t = Tracing()
    yield t
    t.provider.shutdown()


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Upstream:
    def __init__(self, outcome: int | Exception | httpx.Response = 200) -> None:
        self.outcome = outcome
        self.headers: list[httpx.Headers] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.headers.append(httpx.Headers(request.headers))
        if isinstance(self.outcome, Exception):
            raise self.outcome
        if isinstance(self.outcome, httpx.Response):
            return self.outcome
        return httpx.Response(self.outcome, content=b"charged!")


def samples(metrics: MeshMetrics, name: str, **labels: str) -> list[float]:
    found = []
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                found.append(sample.value)
    return found


def one(metrics: MeshMetrics, name: str, **labels: str) -> float:
    values = samples(metrics, name, **labels)
    assert len(values) == 1, values
    return values[0]


def labels_of(metrics: MeshMetrics, name: str) -> list[dict[str, str]]:
    return [s.labels for f in metrics.registry.collect() for s in f.samples if s.name == name]


def stack(
    kind: str,
    upstream: Callable[[httpx.Request], httpx.Response],
    *,
    metrics: MeshMetrics | None = None,
    tracing: Tracing | None = None,
    endpoints: tuple[Endpoint, ...] = (V2,),
    **telemetry_args: Any,
) -> httpx.Client | httpx.AsyncClient:
    state = OutboundState(tls_mode="DISABLE", breaker=None, rng=random.Random(1))
    registry = StaticRegistry({"payments": endpoints})
    recorder = None if metrics is None else metrics.outbound(ORDERS)
    provider = None if tracing is None else tracing.provider
    mock = httpx.MockTransport(upstream)
    if kind == "sync":
        return httpx.Client(
            transport=TelemetryTransport(
                BalancingTransport(mock, resolver=registry, state=state),
                recorder=recorder,
                tracer_provider=provider,
                **telemetry_args,
            )
        )
    return httpx.AsyncClient(
        transport=AsyncTelemetryTransport(
            AsyncBalancingTransport(mock, resolver=registry, state=state),
            recorder=recorder,
            tracer_provider=provider,
            **telemetry_args,
        )
    )


async def get(
    client: httpx.Client | httpx.AsyncClient, url: str = URL, **kw: Any
) -> httpx.Response:
    if isinstance(client, httpx.Client):
        return client.get(url, **kw)
    return await client.get(url, **kw)


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# --- spans and propagation -----------------------------------------------------------------


async def test_client_span_continues_the_current_trace_and_is_propagated(
    kind: str, tracing: Tracing
) -> None:
    upstream = Upstream()
    client = stack(kind, upstream, tracing=tracing)
    with tracing.tracer.start_as_current_span("GET /checkout") as parent:
        await get(client)
    (span,) = tracing.spans("GET payments")
    assert span.kind is SpanKind.CLIENT
    assert span.parent is not None
    assert span.parent.span_id == parent.get_span_context().span_id
    context = span.get_span_context()
    assert context is not None
    trace_id, span_id = f"{context.trace_id:032x}", f"{context.span_id:016x}"
    headers = upstream.headers[0]
    assert headers["traceparent"] == f"00-{trace_id}-{span_id}-{context.trace_flags:02x}"
    assert headers["b3"] == f"{trace_id}-{span_id}-1"
    assert span.attributes is not None
    assert dict(span.attributes) == {
        "http.request.method": "GET",
        "server.address": "payments",
        "server.port": 80,
        "url.full": "http://payments/api/charge",
        "http.response.status_code": 200,
        "meshware.destination": "payments",
        "meshware.retries": 0,
        "network.peer.address": "10.0.0.2",
        "network.peer.port": 8080,
    }


async def test_a_new_trace_starts_without_a_current_span(kind: str, tracing: Tracing) -> None:
    upstream = Upstream()
    client = stack(kind, upstream, tracing=tracing)
    await get(client, "https://api.example.com/v1/rates?key=secret")
    (span,) = tracing.spans()
    assert span.name == "GET api.example.com"
    assert span.parent is None
    assert span.attributes is not None
    assert span.attributes["url.full"] == "https://api.example.com/v1/rates"
    assert upstream.headers[0]["traceparent"].split("-")[1] == f"{span.context.trace_id:032x}"


async def test_failed_calls_end_their_span_with_an_error(kind: str, tracing: Tracing) -> None:
    client = stack(kind, Upstream(httpx.ConnectError("refused")), tracing=tracing)
    with pytest.raises(httpx.ConnectError):
        await get(client)
    (span,) = tracing.spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None
    assert span.attributes["error.type"] == "ConnectError"
    assert span.attributes["meshware.response_flags"] == "UF"
    assert [e.name for e in span.events] == ["exception"]

    client = stack(kind, Upstream(503), tracing=tracing)
    await get(client)
    span = tracing.spans()[-1]
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None and span.attributes["error.type"] == "503"


async def test_request_id_of_the_inbound_request_is_propagated(kind: str) -> None:
    upstream = Upstream()
    client = stack(kind, upstream)
    with request_id_scope("req-7f3a"):
        await get(client)
        await get(client, headers={"x-request-id": "callers-own"})
    await get(client)
    assert [h.get("x-request-id") for h in upstream.headers] == [
        "req-7f3a",
        "callers-own",
        None,
    ]


async def test_request_id_header_name_is_configurable(kind: str) -> None:
    upstream = Upstream()
    client = stack(kind, upstream, request_id_header="X-Correlation-Id")
    with request_id_scope("abc"):
        await get(client)
    assert upstream.headers[0]["x-correlation-id"] == "abc"
    assert "x-request-id" not in upstream.headers[0]


async def test_the_asgi_shell_makes_its_request_id_current_for_outbound_calls() -> None:
    upstream = Upstream()
    outbound = stack("async", upstream)
    assert isinstance(outbound, httpx.AsyncClient)
    seen: list[str | None] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(current_request_id())
        await outbound.get(URL)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    inbound = AsgiTelemetry(app, workload=ORDERS, metrics=None, access_log=False)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=inbound), base_url="http://orders"
    ) as client:
        await client.get("/checkout", headers={"x-request-id": "inbound-1"})
        await client.get("/checkout")
    assert seen[0] == "inbound-1"
    assert seen[1] is not None and len(seen[1]) == 32
    assert [h["x-request-id"] for h in upstream.headers] == seen
    assert current_request_id() is None


def test_the_wsgi_shell_makes_its_request_id_current_for_outbound_calls() -> None:
    upstream = Upstream()
    outbound = stack("sync", upstream)
    assert isinstance(outbound, httpx.Client)

    def app(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        outbound.get(URL)
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"first"
        outbound.get(URL)  # a streaming body's later calls carry the id too
        yield b"second"

    inbound = WsgiTelemetry(app, workload=ORDERS, metrics=None, access_log=False)
    with httpx.Client(transport=httpx.WSGITransport(app=inbound), base_url="http://orders") as c:
        assert c.get("/", headers={"x-request-id": "wsgi-9"}).text == "firstsecond"
    assert [h["x-request-id"] for h in upstream.headers] == ["wsgi-9", "wsgi-9"]
    assert current_request_id() is None


# --- reporter="source" metrics -------------------------------------------------------------


async def test_source_metrics_carry_this_workload_and_the_destination(kind: str) -> None:
    metrics = MeshMetrics()
    identity = "spiffe://cluster.local/ns/shop/sa/payments"
    upstream = Upstream(
        httpx.Response(201, content=b"charged!", extensions={SERVER_IDENTITY_KEY: identity})
    )
    client = stack(kind, upstream, metrics=metrics)
    await get(client, headers={"content-length": "0"})
    (labels,) = labels_of(metrics, "istio_requests_total")
    assert labels == {
        "reporter": "source",
        "source_workload": "orders",
        "source_canonical_service": "orders",
        "source_canonical_revision": "v1",
        "source_workload_namespace": "shop",
        "source_principal": "spiffe://cluster.local/ns/shop/sa/orders",
        "source_app": "orders",
        "source_version": "v1",
        "source_cluster": "unknown",
        "destination_workload": "payments",
        "destination_workload_namespace": "shop",
        "destination_principal": identity,
        "destination_app": "payments",
        "destination_version": "v2",
        "destination_service": "payments.shop.svc.cluster.local",
        "destination_canonical_service": "payments",
        "destination_canonical_revision": "v2",
        "destination_service_name": "payments",
        "destination_service_namespace": "shop",
        "destination_cluster": "unknown",
        "request_protocol": "http",
        "response_code": "201",
        "grpc_response_status": "",
        "response_flags": "-",
        "connection_security_policy": "unknown",
    }
    assert one(metrics, "istio_request_duration_milliseconds_count", reporter="source") == 1
    assert one(metrics, "istio_response_bytes_sum", reporter="source") == len(b"charged!")


async def test_calls_to_other_hosts_are_passthrough(kind: str) -> None:
    metrics = MeshMetrics()
    client = stack(kind, Upstream(), metrics=metrics)
    await get(client, "https://api.example.com/v1")
    (labels,) = labels_of(metrics, "istio_requests_total")
    assert labels["destination_service_name"] == "PassthroughCluster"
    assert labels["destination_service"] == "api.example.com"
    assert labels["destination_workload"] == "unknown"


class Raising(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """Stands in for the inner layers: names the destination, then fails."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        plan_of(request).destination = "payments"
        raise self.error

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return self.handle_request(request)


@pytest.mark.parametrize(
    ("error", "code", "flags"),
    [
        (CircuitOpen("circuit breaker is open", destination="payments"), "503", "UO"),
        (PoolOverloaded("connection pool is full", destination="payments"), "503", "UO"),
        (NoHealthyEndpoint("all ejected", destination="payments"), "503", "UH"),
        (DeadlineExceeded("deadline exceeded", destination="payments"), "504", "DE"),
        (httpx.ConnectError("refused"), "503", "UF"),
        (httpx.ConnectTimeout("connect timed out"), "503", "UF"),
        (httpx.ReadTimeout("read timed out"), "504", "UT"),
        (httpx.ReadError("connection reset"), "503", "UC"),
        (httpx.RemoteProtocolError("server disconnected"), "503", "UC"),
        (httpx.UnsupportedProtocol("ftp"), "0", "-"),
    ],
)
async def test_errors_are_reported_with_envoys_flags(
    kind: str, error: Exception, code: str, flags: str
) -> None:
    metrics = MeshMetrics()
    recorder = metrics.outbound(ORDERS)
    if kind == "sync":
        client: httpx.Client | httpx.AsyncClient = httpx.Client(
            transport=TelemetryTransport(Raising(error), recorder=recorder)
        )
    else:
        client = httpx.AsyncClient(
            transport=AsyncTelemetryTransport(Raising(error), recorder=recorder)
        )
    with pytest.raises(type(error)):
        await get(client)
    (labels,) = labels_of(metrics, "istio_requests_total")
    assert (labels["response_code"], labels["response_flags"]) == (code, flags)
    assert labels["destination_service"] == "payments.shop.svc.cluster.local"


def test_retries_that_ran_out_are_flagged_urx() -> None:
    metrics = MeshMetrics()
    recorder = metrics.outbound(ORDERS)
    state = OutboundState(tls_mode="DISABLE", breaker=None, recorder=recorder)
    registry = StaticRegistry({"payments": [V2]})
    client = httpx.Client(
        transport=TelemetryTransport(
            RetryTransport(
                BalancingTransport(
                    httpx.MockTransport(Upstream(503)), resolver=registry, state=state
                ),
                policy=RetryPolicy(attempts=1),
                resolver=registry,
                state=state,
                sleep=lambda _: None,
            ),
            recorder=recorder,
        )
    )
    assert client.get(URL).status_code == 503
    (labels,) = labels_of(metrics, "istio_requests_total")
    assert (labels["response_code"], labels["response_flags"]) == ("503", "URX")
    assert one(metrics, "meshware_outbound_retries_total", condition="503") == 1.0


async def test_a_streamed_response_is_recorded_when_it_is_closed(kind: str) -> None:
    metrics = MeshMetrics()
    body = httpx.ByteStream(b"x" * 1000)
    client = stack(kind, Upstream(httpx.Response(200, stream=body)), metrics=metrics)
    if isinstance(client, httpx.Client):
        with client.stream("GET", URL) as response:
            assert labels_of(metrics, "istio_requests_total") == []
            response.read()
    else:
        async with client.stream("GET", URL) as response:
            assert labels_of(metrics, "istio_requests_total") == []
            await response.aread()
    assert one(metrics, "istio_requests_total", reporter="source") == 1.0
    assert one(metrics, "istio_response_bytes_sum", reporter="source") == 1000.0


async def test_otel_naming(kind: str) -> None:
    metrics = MeshMetrics(naming="otel")
    client = stack(kind, Upstream(502), metrics=metrics)
    await get(client)
    assert (
        one(
            metrics,
            "http_client_request_duration_seconds_count",
            http_request_method="GET",
            http_response_status_code="502",
            server_address="payments.shop.svc.cluster.local",
            url_scheme="http",
            error_type="502",
        )
        == 1.0
    )


def test_failure_flags() -> None:
    assert failure_flags(CircuitOpen("x", destination="a")) == ("UO", 503)
    assert failure_flags(DeadlineExceeded("x", destination="a")) == ("DE", 504)
    assert failure_flags(KeyboardInterrupt()) == ("DC", 0)
    assert failure_flags(ValueError("bug")) == ("-", 0)


def test_telemetry_never_breaks_a_call(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def observe(self, **kwargs: Any) -> None:
            raise RuntimeError("registry is gone")

    transport = TelemetryTransport(httpx.MockTransport(Upstream()))
    transport._core.recorder = Broken()  # type: ignore[assignment]
    client = httpx.Client(transport=transport)
    assert client.get(URL).status_code == 200
    assert client.get(URL).status_code == 200
    assert [r.message for r in caplog.records] == ["could not record an outbound call"]


def test_constructor_validation() -> None:
    mock = httpx.MockTransport(Upstream())
    with pytest.raises(ConfigurationError) as info:
        TelemetryTransport(mock, recorder=MeshMetrics())  # type: ignore[arg-type]
    assert info.value.field == "recorder"
    with pytest.raises(ConfigurationError) as info:
        AsyncTelemetryTransport(mock, request_id_header="x request id")
    assert info.value.field == "request_id_header"
    with pytest.raises(ConfigurationError) as info:
        TelemetryTransport(mock, propagator="b3")  # type: ignore[arg-type]
    assert info.value.field == "propagator"


def test_the_plan_is_created_by_the_outermost_layer() -> None:
    captured: list[CallPlan] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        captured.append(plan_of(request))
        return httpx.Response(200)

    client = httpx.Client(transport=TelemetryTransport(httpx.MockTransport(upstream)))
    response = client.get(URL)
    assert captured[0] is response.request.extensions["meshware.call"]
    assert trace.get_current_span().get_span_context().is_valid is False
