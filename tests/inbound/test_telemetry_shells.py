"""The telemetry middleware, through both shells: ASGI (httpx.ASGITransport) and WSGI."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from meshware.exceptions import ConfigurationError
from meshware.identity.identity import Identity
from meshware.identity.spiffe import SpiffeId
from meshware.inbound.asgi.telemetry import TelemetryMiddleware as AsgiTelemetry
from meshware.inbound.asgi.telemetry import host_name, valid_request_id
from meshware.inbound.record import RequestRecord, record_of
from meshware.inbound.wsgi.telemetry import TelemetryMiddleware as WsgiTelemetry
from meshware.telemetry.access_log import AccessLog
from meshware.telemetry.metrics import ISTIO_LABELS, MeshMetrics, WorkloadInfo
from meshware.telemetry.tracing import TracingConfig, build_propagator, configure_tracing

WORKLOAD = WorkloadInfo(service="orders", namespace="shop", version="v2", cluster="Kubernetes")
CALLER = Identity(SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/checkout"), "tls")
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# -- one application, two shells --------------------------------------------------------------


def handle(
    record: RequestRecord, clock: FakeClock, method: str, path: str, headers: dict[str, str],
    body: bytes,
) -> tuple[int, list[tuple[str, str]], Iterable[bytes]]:  # fmt: skip
    """The app's behaviour, shared by the ASGI and WSGI adapters below."""
    if path == "/boom":
        raise RuntimeError("boom")
    if path.startswith("/users/"):
        record.route = "/users/{id}"
        clock.advance(0.25)
        return 200, [("content-type", "text/plain")], [b"hello"]
    if path == "/echo":
        return 200, [], [body]
    if path == "/rid":
        return 200, [], [headers.get("x-request-id", "").encode()]
    if path == "/own-rid":
        return 200, [("X-Request-Id", "app-chosen")], [b""]
    if path == "/trace":
        ctx = trace.get_current_span().get_span_context()
        return 200, [], [f"{ctx.trace_id:032x}/{ctx.span_id:016x}".encode()]
    if path == "/grpc":
        return 200, [("content-type", "application/grpc"), ("grpc-status", "7")], [b""]
    if path == "/broken-stream":

        def broken() -> Iterator[bytes]:
            yield b"partial"
            raise RuntimeError("mid-stream")

        return 200, [], broken()
    if path == "/stream":

        def chunks() -> Iterator[bytes]:
            for size in (10, 20, 30):
                clock.advance(0.1)
                yield b"x" * size

        return 200, [], chunks()
    return 404, [], [b"not found"]


def asgi_app(fields: dict[str, Any], clock: FakeClock) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        record = record_of(scope)
        for name, value in fields.items():
            setattr(record, name, value)
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        status, response_headers, chunks = handle(
            record, clock, scope["method"], scope["path"], headers, body
        )
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(k.lower().encode(), v.encode()) for k, v in response_headers],
            }
        )
        for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return app


def wsgi_app(fields: dict[str, Any], clock: FakeClock) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        record = record_of(environ)
        for name, value in fields.items():
            setattr(record, name, value)
        body = environ["wsgi.input"].read()
        headers = {
            k[5:].lower().replace("_", "-"): v for k, v in environ.items() if k.startswith("HTTP_")
        }
        status, response_headers, chunks = handle(
            record, clock, environ["REQUEST_METHOD"], environ["PATH_INFO"], headers, body
        )
        start_response(f"{status} X", response_headers)
        return chunks

    return app


class Shell:
    """Builds the middleware of one kind around the shared app and sends requests to it."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.clock = FakeClock()
        self.metrics = MeshMetrics()
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider(sampler=ALWAYS_ON)
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.fields: dict[str, Any] = {}
        self.wall = 1714564800.5

    def build(self, **options: Any) -> Any:
        options.setdefault("workload", WORKLOAD)
        options.setdefault("metrics", self.metrics)
        options.setdefault("tracer_provider", self.provider)
        options.setdefault("propagator", build_propagator())
        options.setdefault("access_log", AccessLog(handler=None, wall_clock=lambda: self.wall))
        options.setdefault("clock", self.clock)
        if self.kind == "asgi":
            return AsgiTelemetry(asgi_app(self.fields, self.clock), **options)
        return WsgiTelemetry(wsgi_app(self.fields, self.clock), **options)

    async def request(
        self, method: str, url: str, *, app: Any = None, **kwargs: Any
    ) -> httpx.Response:
        app = app if app is not None else self.build()
        if self.kind == "asgi":
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://orders") as client:
                return await client.request(method, url, **kwargs)
        with httpx.Client(
            transport=httpx.WSGITransport(app=app), base_url="http://orders"
        ) as sync_client:
            return sync_client.request(method, url, **kwargs)

    def samples(self, name: str, metrics: MeshMetrics | None = None) -> list[Sample]:
        body, _ = (metrics or self.metrics).exposition()
        return [
            sample
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples
            if sample.name == name
        ]

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())


@pytest.fixture(params=["asgi", "wsgi"])
def shell(request: pytest.FixtureRequest) -> Shell:
    return Shell(request.param)


@pytest.fixture
def access_lines(caplog: pytest.LogCaptureFixture) -> Callable[[], list[dict[str, Any]]]:
    caplog.set_level(logging.INFO, logger="meshware.access")

    def lines() -> list[dict[str, Any]]:
        return [json.loads(r.getMessage()) for r in caplog.records if r.name == "meshware.access"]

    return lines


def expected_istio_labels(**overrides: str) -> dict[str, str]:
    labels = {
        "reporter": "destination",
        "source_workload": "checkout",
        "source_canonical_service": "checkout",
        "source_canonical_revision": "latest",
        "source_workload_namespace": "shop",
        "source_principal": "spiffe://cluster.local/ns/shop/sa/checkout",
        "source_app": "checkout",
        "source_version": "unknown",
        "source_cluster": "unknown",
        "destination_workload": "orders",
        "destination_workload_namespace": "shop",
        "destination_principal": "spiffe://cluster.local/ns/shop/sa/orders",
        "destination_app": "orders",
        "destination_version": "v2",
        "destination_service": "orders.shop.svc.cluster.local",
        "destination_canonical_service": "orders",
        "destination_canonical_revision": "v2",
        "destination_service_name": "orders",
        "destination_service_namespace": "shop",
        "destination_cluster": "Kubernetes",
        "request_protocol": "http",
        "response_code": "200",
        "grpc_response_status": "",
        "response_flags": "-",
        "connection_security_policy": "mutual_tls",
    }
    labels.update(overrides)
    assert set(labels) == set(ISTIO_LABELS)
    return labels


# -- metrics ------------------------------------------------------------------------------------


async def test_istio_metrics_carry_the_callers_identity(shell: Shell) -> None:
    shell.fields["identity"] = CALLER

    response = await shell.request("GET", "/users/7")

    assert response.status_code == 200
    [total] = shell.samples("istio_requests_total")
    assert total.labels == expected_istio_labels()
    assert total.value == 1.0
    [count] = shell.samples("istio_request_duration_milliseconds_count")
    assert count.value == 1.0
    [duration] = shell.samples("istio_request_duration_milliseconds_sum")
    assert duration.value == pytest.approx(250.0)
    le_250 = [
        s for s in shell.samples("istio_request_duration_milliseconds_bucket")
        if s.labels["le"] == "250.0"
    ]  # fmt: skip
    assert le_250[0].value == 1.0
    [response_bytes] = shell.samples("istio_response_bytes_sum")
    assert response_bytes.value == 5.0
    [request_bytes] = shell.samples("istio_request_bytes_sum")
    assert request_bytes.value == 0.0


async def test_unauthenticated_callers_are_unknown(shell: Shell) -> None:
    await shell.request("GET", "/nowhere")

    [total] = shell.samples("istio_requests_total")
    assert total.labels == expected_istio_labels(
        source_workload="unknown",
        source_canonical_service="unknown",
        source_workload_namespace="unknown",
        source_principal="unknown",
        source_app="unknown",
        response_code="404",
        connection_security_policy="none",
    )


async def test_distinct_paths_share_one_label_child(shell: Shell) -> None:
    app = shell.build()
    for i in range(100):
        await shell.request("GET", f"/users/{i}", app=app)
        await shell.request("GET", f"/random/{i}?q={i}", app=app)

    totals = shell.samples("istio_requests_total")
    assert sorted((s.labels["response_code"], s.value) for s in totals) == [
        ("200", 100.0),
        ("404", 100.0),
    ]
    body, _ = shell.metrics.exposition()
    assert b"/users/" not in body
    assert b"/random/" not in body


async def test_request_bytes_from_content_length_and_from_chunked_bodies(shell: Shell) -> None:
    app = shell.build()
    await shell.request("POST", "/echo", app=app, content=b"x" * 123)

    def chunked() -> Iterator[bytes]:
        yield b"a" * 40
        yield b"b" * 60

    if shell.kind == "asgi":

        async def achunked() -> Any:
            for chunk in chunked():
                yield chunk

        await shell.request("POST", "/echo", app=app, content=achunked())
    else:
        await shell.request("POST", "/echo", app=app, content=chunked())

    [request_bytes] = shell.samples("istio_request_bytes_sum")
    assert request_bytes.value == 223.0
    [response_bytes] = shell.samples("istio_response_bytes_sum")
    assert response_bytes.value == 223.0


async def test_streaming_response_is_counted_and_timed_to_its_end(
    shell: Shell, access_lines: Callable[[], list[dict[str, Any]]]
) -> None:
    response = await shell.request("GET", "/stream")

    assert response.content == b"x" * 60
    [response_bytes] = shell.samples("istio_response_bytes_sum")
    assert response_bytes.value == 60.0
    [line] = access_lines()
    assert line["duration_ms"] == pytest.approx(300.0)
    assert line["bytes_out"] == 60


async def test_outcomes_of_inner_layers_are_counted(shell: Shell) -> None:
    shell.fields.update(
        authz_decision="allow",
        authz_policy="orders-read",
        authz_dry_run="deny",
        ratelimit="limited",
        identity_error="expired",
        ratelimit_rule="per-caller",
        authz_dry_run_policy="orders-read",
    )

    await shell.request("GET", "/users/1")

    authz = {
        (s.labels["decision"], s.labels["policy"], s.labels["dry_run"]): s.value
        for s in shell.samples("meshware_authz_decisions_total")
    }
    assert authz == {("allow", "orders-read", "false"): 1.0, ("deny", "orders-read", "true"): 1.0}
    [ratelimit] = shell.samples("meshware_ratelimit_decisions_total")
    assert ratelimit.labels == {"rule": "per-caller", "outcome": "limited"}
    [failure] = shell.samples("meshware_identity_failures_total")
    assert failure.labels == {"reason": "expired"}
    [total] = shell.samples("istio_requests_total")
    assert total.labels["response_flags"] == "RL"


async def test_grpc_requests_report_protocol_and_status(shell: Shell) -> None:
    await shell.request("POST", "/grpc", headers={"content-type": "application/grpc"})

    [total] = shell.samples("istio_requests_total")
    assert total.labels["request_protocol"] == "grpc"
    assert total.labels["grpc_response_status"] == "7"


async def test_otel_naming(shell: Shell) -> None:
    metrics = MeshMetrics(naming="otel")
    app = shell.build(metrics=metrics)
    for i in range(3):
        await shell.request("GET", f"/users/{i}", app=app)
    await shell.request("GET", "/missing", app=app)

    counts = {
        s.labels["http_route"]: (s.labels, s.value)
        for s in shell.samples("http_server_request_duration_seconds_count", metrics)
    }
    assert counts["/users/{id}"] == (
        {
            "http_request_method": "GET",
            "http_response_status_code": "200",
            "http_route": "/users/{id}",
            "url_scheme": "http",
            "network_protocol_name": "http",
            "network_protocol_version": "1.1",
            "error_type": "",
        },
        3.0,
    )
    assert counts["unknown"][0]["http_response_status_code"] == "404"
    assert counts["unknown"][1] == 1.0
    [duration] = [
        s for s in shell.samples("http_server_request_duration_seconds_sum", metrics)
        if s.labels["http_route"] == "/users/{id}"
    ]  # fmt: skip
    assert duration.value == pytest.approx(0.75)
    assert shell.samples("istio_requests_total", metrics) == []


async def test_app_exception_is_counted_as_500_and_reraised(
    shell: Shell, access_lines: Callable[[], list[dict[str, Any]]]
) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        await shell.request("GET", "/boom")

    [total] = shell.samples("istio_requests_total")
    assert total.labels["response_code"] == "500"
    assert total.value == 1.0
    [line] = access_lines()
    assert line["status"] == 500
    [span] = shell.spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None
    assert span.attributes["error.type"] == "RuntimeError"
    assert [event.name for event in span.events] == ["exception"]


async def test_exception_after_the_response_started_keeps_the_sent_status(
    shell: Shell, access_lines: Callable[[], list[dict[str, Any]]]
) -> None:
    with pytest.raises(RuntimeError, match="mid-stream"):
        await shell.request("GET", "/broken-stream")

    [total] = shell.samples("istio_requests_total")
    assert total.labels["response_code"] == "200"
    [line] = access_lines()
    assert (line["status"], line["bytes_out"]) == (200, 7)
    [span] = shell.spans()
    assert span.status.status_code is StatusCode.ERROR


async def test_asgi_cancellation_is_a_downstream_disconnect() -> None:
    import asyncio

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        raise asyncio.CancelledError

    metrics = MeshMetrics()
    middleware = AsgiTelemetry(app, workload=WORKLOAD, metrics=metrics, access_log=False)
    scope = {"type": "http", "method": "GET", "path": "/x", "headers": [], "scheme": "http"}

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        pass

    with pytest.raises(asyncio.CancelledError):
        await middleware(scope, receive, send)

    body, _ = metrics.exposition()
    [total] = [
        s for f in text_string_to_metric_families(body.decode()) for s in f.samples
        if s.name == "istio_requests_total"
    ]  # fmt: skip
    assert (total.labels["response_code"], total.labels["response_flags"]) == ("0", "DC")


# -- the metrics endpoint ---------------------------------------------------------------------


async def test_metrics_endpoint_serves_the_exposition(shell: Shell) -> None:
    app = shell.build()
    await shell.request("GET", "/users/1", app=app)

    response = await shell.request("GET", "/metrics", app=app)

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    families = {f.name for f in text_string_to_metric_families(response.text)}
    assert {"istio_requests", "istio_request_duration_milliseconds"} <= families
    assert "x-request-id" not in response.headers
    [total] = shell.samples("istio_requests_total")
    assert total.value == 1.0  # the scrape itself is not counted


async def test_metrics_endpoint_negotiates_openmetrics(shell: Shell) -> None:
    response = await shell.request(
        "GET", "/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"}
    )

    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")


async def test_metrics_endpoint_answers_head(shell: Shell) -> None:
    response = await shell.request("HEAD", "/metrics")

    assert response.status_code == 200
    assert response.content == b""
    assert int(response.headers["content-length"]) > 0


async def test_metrics_endpoint_rejects_other_methods(shell: Shell) -> None:
    response = await shell.request("POST", "/metrics")

    assert response.status_code == 405
    assert response.headers["allow"] == "GET, HEAD"


async def test_metrics_path_can_be_disabled(shell: Shell) -> None:
    response = await shell.request("GET", "/metrics", app=shell.build(metrics_path=None))

    assert response.status_code == 404


@pytest.mark.parametrize(
    ("naming", "lint"),
    [
        # Istio's fixed name breaks Prometheus' base-unit convention; that lint (exit status
        # 3) is the only finding allowed. A parse error would exit with 1.
        ("istio", ['istio_request_duration_milliseconds use base unit "seconds" instead of '
                   '"milliseconds"']),
        ("otel", []),
    ],
)  # fmt: skip
async def test_exposition_passes_promtool(shell: Shell, naming: str, lint: list[str]) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (scripts/system-deps.sh installs it)")
    shell.fields.update(identity=CALLER, authz_decision="deny", ratelimit="allowed")
    app = shell.build(metrics=MeshMetrics(naming=naming))  # type: ignore[arg-type]
    await shell.request("GET", "/users/1", app=app)
    await shell.request("GET", "/missing", app=app)

    response = await shell.request("GET", "/metrics", app=app)

    result = subprocess.run(
        [promtool, "check", "metrics"], input=response.content, capture_output=True, check=False
    )
    assert result.returncode == (3 if lint else 0), result.stderr
    assert result.stderr.decode().splitlines() == lint


# -- request ids ------------------------------------------------------------------------------


async def test_request_id_is_generated_echoed_and_seen_by_the_app(
    shell: Shell, access_lines: Callable[[], list[dict[str, Any]]]
) -> None:
    response = await shell.request("GET", "/rid")

    request_id = response.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    assert response.text == request_id
    assert access_lines()[0]["request_id"] == request_id


async def test_request_id_of_the_caller_is_kept(shell: Shell) -> None:
    response = await shell.request("GET", "/rid", headers={"x-request-id": "req-42"})

    assert response.headers.get_list("x-request-id") == ["req-42"]
    assert response.text == "req-42"


async def test_unacceptable_request_id_is_replaced(shell: Shell) -> None:
    response = await shell.request("GET", "/rid", headers={"x-request-id": "a" * 129})

    request_id = response.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", request_id)
    assert response.text == request_id


async def test_request_id_set_by_the_app_is_not_duplicated(shell: Shell) -> None:
    response = await shell.request("GET", "/own-rid")

    assert response.headers.get_list("x-request-id") == ["app-chosen"]


async def test_request_id_header_is_configurable(shell: Shell) -> None:
    app = shell.build(request_id_header="X-Correlation-Id")
    response = await shell.request(
        "GET", "/users/1", app=app, headers={"x-correlation-id": "corr-1"}
    )

    assert response.headers["x-correlation-id"] == "corr-1"
    assert "x-request-id" not in response.headers


# -- the access log ---------------------------------------------------------------------------


async def test_access_log_line(
    shell: Shell, access_lines: Callable[[], list[dict[str, Any]]]
) -> None:
    shell.fields.update(
        identity=CALLER,
        request_principal="https://issuer.example/alice",
        authz_decision="allow",
        authz_policy="orders-read",
        authz_reason="matched rule 0 of orders-read",
        ratelimit="allowed",
        extra={"tenant": "acme"},
    )

    await shell.request(
        "GET",
        "/users/a%20b?secret=1",
        headers={
            "x-request-id": "req-1",
            "user-agent": "probe/1.0",
            "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01",
        },
    )

    assert access_lines() == [
        {
            "time": "2024-05-01T12:00:00.500Z",
            "method": "GET",
            "route": "/users/{id}",
            "path": "/users/a%20b",
            "status": 200,
            "duration_ms": 250.0,
            "bytes_in": 0,
            "bytes_out": 5,
            "source_principal": "cluster.local/ns/shop/sa/checkout",
            "request_principal": "https://issuer.example/alice",
            "request_id": "req-1",
            "trace_id": TRACE_ID,
            "authz": "allow",
            "authz_policy": "orders-read",
            "authz_reason": "matched rule 0 of orders-read",
            "authz_dry_run": None,
            "ratelimit": "allowed",
            "identity_error": None,
            "user_agent": "probe/1.0",
            "tenant": "acme",
        }
    ]


async def test_access_log_can_be_disabled(
    shell: Shell, access_lines: Callable[[], list[dict[str, Any]]]
) -> None:
    await shell.request("GET", "/users/1", app=shell.build(access_log=False))

    assert access_lines() == []


# -- tracing ----------------------------------------------------------------------------------


async def test_traceparent_is_continued(shell: Shell) -> None:
    shell.fields.update(identity=CALLER, authz_decision="allow", authz_policy="orders-read")

    response = await shell.request(
        "GET",
        "/users/9",
        headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "x-request-id": "req-9"},
    )

    [span] = shell.spans()
    assert span.name == "GET /users/{id}"
    assert span.kind is SpanKind.SERVER
    assert f"{span.context.trace_id:032x}" == TRACE_ID
    assert span.parent is not None
    assert f"{span.parent.span_id:016x}" == PARENT_ID
    assert span.parent.is_remote
    assert span.attributes is not None
    attributes = dict(span.attributes)
    assert attributes["meshware.source.principal"] == "cluster.local/ns/shop/sa/checkout"
    assert attributes["meshware.authz.decision"] == "allow"
    assert attributes["meshware.authz.policy"] == "orders-read"
    assert attributes["meshware.request_id"] == "req-9"
    assert attributes["http.route"] == "/users/{id}"
    assert attributes["http.response.status_code"] == 200
    assert attributes["http.request.method"] == "GET"
    assert attributes["url.path"] == "/users/9"
    assert response.status_code == 200


@pytest.mark.parametrize(
    "headers",
    [
        {"b3": f"{TRACE_ID}-{PARENT_ID}-1"},
        {"x-b3-traceid": TRACE_ID, "x-b3-spanid": PARENT_ID, "x-b3-sampled": "1"},
    ],
    ids=["b3-single", "b3-multi"],
)
async def test_b3_is_continued(shell: Shell, headers: dict[str, str]) -> None:
    await shell.request("GET", "/users/1", headers=headers)

    [span] = shell.spans()
    assert f"{span.context.trace_id:032x}" == TRACE_ID
    assert span.parent is not None
    assert f"{span.parent.span_id:016x}" == PARENT_ID


async def test_app_runs_inside_the_server_span(shell: Shell) -> None:
    response = await shell.request("GET", "/trace")

    [span] = shell.spans()
    assert response.text == f"{span.context.trace_id:032x}/{span.context.span_id:016x}"
    assert span.name == "GET"  # no route template: the method alone, never the raw path


async def test_sampler_ratio_zero_records_no_spans_but_keeps_the_trace_id(
    shell: Shell, access_lines: Callable[[], list[dict[str, Any]]]
) -> None:
    provider = configure_tracing(TracingConfig(service_name="orders", sampler_ratio=0.0))
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = shell.build(tracer_provider=provider)

    await shell.request("GET", "/users/1", app=app)
    await shell.request(
        "GET", "/users/2", app=app, headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-00"}
    )

    assert exporter.get_finished_spans() == ()
    first, second = access_lines()
    assert re.fullmatch(r"[0-9a-f]{32}", first["trace_id"])
    assert second["trace_id"] == TRACE_ID
    # Parent based: a caller that sampled its trace is followed even at ratio 0.
    await shell.request(
        "GET", "/users/3", app=app, headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
    )
    [span] = exporter.get_finished_spans()
    assert f"{span.context.trace_id:032x}" == TRACE_ID
    provider.shutdown()


# -- what is left alone -----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/livez", "/readyz"])
async def test_skip_paths_get_no_telemetry(
    shell: Shell, path: str, access_lines: Callable[[], list[dict[str, Any]]]
) -> None:
    response = await shell.request("GET", path)

    assert response.status_code == 404  # answered by the app, untouched
    assert "x-request-id" not in response.headers
    assert shell.samples("istio_requests_total") == []
    assert shell.spans() == []
    assert access_lines() == []


async def test_asgi_lifespan_and_websocket_pass_through() -> None:
    seen: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope)

    metrics = MeshMetrics()
    middleware = AsgiTelemetry(app, workload=WORKLOAD, metrics=metrics, access_log=False)

    async def receive() -> dict[str, Any]:
        return {"type": "lifespan.startup"}

    async def send(message: Any) -> None:
        pass

    for kind in ("lifespan", "websocket"):
        scope = {"type": kind, "path": "/ws", "headers": []}
        await middleware(scope, receive, send)
        assert seen[-1] is scope
        assert "meshware.record" not in scope
    body, _ = metrics.exposition()
    assert b"istio_requests_total{" not in body


async def test_starlette_route_template_is_used() -> None:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def item(request: Request) -> PlainTextResponse:
        return PlainTextResponse(request.path_params["item_id"])

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    metrics = MeshMetrics(naming="otel")
    app = AsgiTelemetry(
        Starlette(routes=[Route("/items/{item_id}", item)]),
        workload=WORKLOAD,
        metrics=metrics,
        tracer_provider=provider,
        access_log=False,
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://orders"
    ) as client:
        response = await client.get("/items/42")

    assert response.text == "42"
    [span] = exporter.get_finished_spans()
    assert span.name == "GET /items/{item_id}"
    body, _ = metrics.exposition()
    assert b'http_route="/items/{item_id}"' in body


@pytest.mark.parametrize(
    ("options", "field", "message"),
    [
        ({"workload": "orders"}, "workload", "expected a WorkloadInfo"),
        ({"metrics": object()}, "metrics", "expected a MeshMetrics or None"),
        ({"metrics_path": "metrics"}, "metrics_path", 'expected a path starting with "/"'),
        ({"skip_paths": "/livez"}, "skip_paths", "expected a collection of paths"),
        (
            {"skip_paths": ["livez"]},
            "skip_paths",
            "expected paths starting with \"/\", got 'livez'",
        ),
        ({"access_log": "yes"}, "access_log", "expected True, False or an AccessLog"),
        ({"request_id_header": "x request"}, "request_id_header", "expected an HTTP header name"),
        (
            {"tracer_provider": "otel"},
            "tracer_provider",
            "expected an opentelemetry TracerProvider",
        ),
        ({"propagator": "b3"}, "propagator", "expected an opentelemetry TextMapPropagator"),
        ({"clock": 3.0}, "clock", "expected a callable returning seconds"),
    ],
)
@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_invalid_arguments_are_rejected(
    kind: str, options: dict[str, Any], field: str, message: str
) -> None:
    shell = Shell(kind)

    with pytest.raises(ConfigurationError) as caught:
        shell.build(**options)

    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: {message}")


# -- small parsers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "name"),
    [("orders:8000", "orders"), ("orders", "orders"), ("[::1]:8000", "[::1]"), ("[::1]", "[::1]"),
     ("", None), ("[::1", None), (":80", None)],
)  # fmt: skip
def test_host_name(host: str, name: str | None) -> None:
    assert host_name(host) == name


@given(st.text(max_size=300))
def test_request_id_validation_is_total(value: str) -> None:
    accepted = valid_request_id(value)

    assert accepted == (0 < len(value) <= 128 and all("!" <= c <= "~" for c in value))


@given(st.text(max_size=300))
def test_host_name_never_raises(host: str) -> None:
    name = host_name(host)

    assert name is None or (name and host.startswith(name))


async def test_a_failing_metrics_backend_never_fails_requests(
    shell: Shell, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        def observe(self, **kwargs: Any) -> None:
            raise RuntimeError("backend down")

    app = shell.build()
    core = app._core
    core.recorder = Broken()

    with caplog.at_level(logging.WARNING, logger="meshware.telemetry"):
        first = await shell.request("GET", "/users/1", app=app)
        second = await shell.request("GET", "/users/2", app=app)

    assert (first.status_code, second.status_code) == (200, 200)
    warnings = [r.getMessage() for r in caplog.records if r.name == "meshware.telemetry"]
    assert warnings == ["could not record request metrics"]
    assert len(shell.spans()) == 2


class _Collected(AccessLog):
    """An access log that keeps each request's fields in a list."""

    def __init__(self, lines: list[dict[str, Any]]) -> None:
        super().__init__(handler=None)
        self.lines = lines

    def emit(self, **fields: Any) -> None:
        self.lines.append(fields)


async def test_a_content_length_that_is_not_ascii_digits_is_not_trusted() -> None:
    # "\xb2" is "²" in latin-1, a digit to str.isdigit() but not a number to int().
    lines: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    layer = AsgiTelemetry(
        app,
        workload=WorkloadInfo(service="orders"),
        metrics=MeshMetrics(),
        access_log=_Collected(lines),
    )
    scope = {
        "type": "http", "method": "POST", "path": "/", "raw_path": b"/", "query_string": b"",
        "headers": [(b"content-length", b"\xb2")], "http_version": "1.1", "scheme": "http",
    }  # fmt: skip
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    await layer(scope, receive, send)

    assert sent[0]["status"] == 200
    assert lines[0]["status"] == 200


def test_a_wsgi_content_length_that_is_not_ascii_digits_is_not_trusted() -> None:
    lines: list[dict[str, Any]] = []

    def app(environ: Any, start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [])
        return [b"ok"]

    layer = WsgiTelemetry(
        app,
        workload=WorkloadInfo(service="orders"),
        metrics=MeshMetrics(),
        access_log=_Collected(lines),
    )
    environ = {
        "REQUEST_METHOD": "POST", "PATH_INFO": "/", "SERVER_NAME": "orders",
        "SERVER_PORT": "\u00b2", "CONTENT_LENGTH": "\u00b2", "wsgi.url_scheme": "http",
    }  # fmt: skip

    result = layer(environ, lambda status, headers, exc_info=None: None)
    body = b"".join(result)
    getattr(result, "close", lambda: None)()  # the server's close() ends the request

    assert body == b"ok"
    assert lines[0]["status"] == 200
