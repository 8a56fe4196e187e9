"""TracingConfig, configure_tracing, build_propagator and ServerSpans."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry import baggage, trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.propagators.b3 import B3MultiFormat, B3SingleFormat
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased, TraceIdRatioBased
from opentelemetry.trace import StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

import meshware.telemetry.tracing as tracing
from meshware.exceptions import ConfigurationError
from meshware.identity.identity import Identity
from meshware.identity.spiffe import SpiffeId
from meshware.inbound.record import RequestRecord
from meshware.telemetry.tracing import (
    ServerSpans,
    TracingConfig,
    build_propagator,
    configure_tracing,
    format_trace_id,
)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"


class DictGetter:
    def get(self, carrier: dict[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        return None if value is None else [value]

    def keys(self, carrier: dict[str, str]) -> list[str]:
        return list(carrier)


GETTER: Any = DictGetter()


def remote(context: Any) -> trace.SpanContext:
    return trace.get_current_span(context).get_span_context()


# -- TracingConfig ----------------------------------------------------------------------------


def test_config_defaults() -> None:
    config = TracingConfig(service_name="orders")

    assert config.sampler_ratio == 0.01
    assert config.exporter == "none"
    assert config.otlp_endpoint is None
    assert config.propagators == ("tracecontext", "baggage", "b3")
    assert config.traces_endpoint is None


def test_config_stores_propagators_as_a_tuple() -> None:
    config = TracingConfig(service_name="orders", propagators=["b3multi"])  # type: ignore[arg-type]

    assert config.propagators == ("b3multi",)


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("http://collector:4318", "http://collector:4318/v1/traces"),
        ("https://collector:4318/", "https://collector:4318/v1/traces"),
        ("http://collector:4318/custom/traces", "http://collector:4318/custom/traces"),
    ],
)
def test_traces_endpoint(endpoint: str, expected: str) -> None:
    config = TracingConfig(service_name="orders", exporter="otlp", otlp_endpoint=endpoint)

    assert config.traces_endpoint == expected


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"service_name": " "}, "tracing.service_name", "expected a non-empty service name"),
        ({"sampler_ratio": 1.5}, "tracing.sampler_ratio", "expected a number from 0 to 1"),
        ({"sampler_ratio": -0.1}, "tracing.sampler_ratio", "expected a number from 0 to 1"),
        ({"sampler_ratio": float("nan")}, "tracing.sampler_ratio", "expected a number from 0 to 1"),
        ({"sampler_ratio": True}, "tracing.sampler_ratio", "expected a number from 0 to 1"),
        ({"exporter": "jaeger"}, "tracing.exporter", 'expected "none", "console" or "otlp"'),
        ({"otlp_endpoint": "http://c:4318"}, "tracing.otlp_endpoint", 'is only used with exporter="otlp"'),
        ({"exporter": "otlp", "otlp_endpoint": "collector:4318"}, "tracing.otlp_endpoint", "expected an http:// or https:// URL"),
        ({"exporter": "otlp", "otlp_endpoint": "http://[::1"}, "tracing.otlp_endpoint", "expected an http:// or https:// URL"),
        ({"propagators": "b3"}, "tracing.propagators", "expected a sequence of propagator names"),
        ({"propagators": ("jaeger",)}, "tracing.propagators", "unknown propagator 'jaeger' (expected some of b3, b3multi, baggage, tracecontext)"),
        ({"propagators": ("b3", "b3")}, "tracing.propagators", "a propagator is listed twice"),
    ],
)  # fmt: skip
def test_config_validation(fields: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        TracingConfig(**{"service_name": "orders", **fields})

    assert caught.value.field == field
    assert str(caught.value) == f"{field}: {message}"


@given(
    ratio=st.floats(allow_nan=True, allow_infinity=True) | st.integers() | st.booleans(),
    exporter=st.sampled_from(["none", "console", "otlp", "zipkin", ""]),
    endpoint=st.none() | st.text(max_size=40),
    propagators=st.lists(st.sampled_from(["tracecontext", "baggage", "b3", "b3multi", "x"])),
)
def test_config_accepts_or_raises_configuration_error(
    ratio: Any, exporter: str, endpoint: str | None, propagators: list[str]
) -> None:
    try:
        config = TracingConfig(
            service_name="orders",
            sampler_ratio=ratio,
            exporter=exporter,  # type: ignore[arg-type]
            otlp_endpoint=endpoint,
            propagators=tuple(propagators),
        )
    except ConfigurationError as exc:
        assert exc.field is not None and exc.field.startswith("tracing.")
    else:
        assert 0 <= config.sampler_ratio <= 1


# -- configure_tracing ------------------------------------------------------------------------


def test_configure_tracing_builds_a_parent_based_ratio_sampler() -> None:
    provider = configure_tracing(TracingConfig(service_name="orders", sampler_ratio=0.25))

    sampler = provider.sampler
    assert isinstance(sampler, ParentBased)
    root = sampler._root
    assert isinstance(root, TraceIdRatioBased)
    assert root.rate == 0.25
    assert provider.resource.attributes["service.name"] == "orders"
    assert provider._active_span_processor._span_processors == ()
    provider.shutdown()


@pytest.mark.parametrize(
    ("fields", "exporter_type"),
    [
        ({"exporter": "console"}, ConsoleSpanExporter),
        ({"exporter": "otlp", "otlp_endpoint": "http://collector:4318"}, OTLPSpanExporter),
    ],
)
def test_configure_tracing_exports_through_a_batch_processor(
    fields: dict[str, Any], exporter_type: type
) -> None:
    provider = configure_tracing(TracingConfig(service_name="orders", **fields))

    [processor] = provider._active_span_processor._span_processors
    assert isinstance(processor, BatchSpanProcessor)
    exporter = processor._batch_processor._exporter
    assert isinstance(exporter, exporter_type)
    if isinstance(exporter, OTLPSpanExporter):
        assert exporter._endpoint == "http://collector:4318/v1/traces"
    provider.shutdown()


def test_configure_tracing_leaves_globals_alone_unless_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    installed: list[Any] = []
    monkeypatch.setattr(trace, "set_tracer_provider", installed.append)
    monkeypatch.setattr("opentelemetry.propagate.set_global_textmap", installed.append)

    provider = configure_tracing(TracingConfig(service_name="orders"))
    assert installed == []

    global_provider = configure_tracing(TracingConfig(service_name="orders"), set_global=True)
    assert installed[0] is global_provider
    assert isinstance(installed[1], tracing.CompositePropagator)
    provider.shutdown()
    global_provider.shutdown()


def test_configure_tracing_rejects_other_objects() -> None:
    with pytest.raises(ConfigurationError, match="tracing: expected a TracingConfig"):
        configure_tracing({"service_name": "orders"})  # type: ignore[arg-type]


# -- propagation ------------------------------------------------------------------------------


def test_propagator_members_follow_the_names() -> None:
    propagator = build_propagator(("tracecontext", "b3", "b3multi"))

    members = propagator._propagators  # type: ignore[attr-defined]
    assert [type(m) for m in members] == [
        TraceContextTextMapPropagator,
        B3SingleFormat,
        B3MultiFormat,
    ]


@pytest.mark.parametrize(
    ("names", "headers", "sampled"),
    [
        (("tracecontext",), {"traceparent": f"00-{TRACE_ID}-{SPAN_ID}-01"}, True),
        (("tracecontext",), {"traceparent": f"00-{TRACE_ID}-{SPAN_ID}-00"}, False),
        (("b3",), {"b3": f"{TRACE_ID}-{SPAN_ID}-1"}, True),
        (("b3",), {"x-b3-traceid": TRACE_ID, "x-b3-spanid": SPAN_ID, "x-b3-sampled": "0"}, False),
        (("b3multi",), {"b3": f"{TRACE_ID}-{SPAN_ID}-d"}, True),
        (("b3multi",), {"x-b3-traceid": TRACE_ID, "x-b3-spanid": SPAN_ID, "x-b3-flags": "1"}, True),
    ],
)
def test_extraction(names: tuple[str, ...], headers: dict[str, str], sampled: bool) -> None:
    context = build_propagator(names).extract(headers, getter=GETTER)

    span_context = remote(context)
    assert format_trace_id(span_context.trace_id) == TRACE_ID
    assert f"{span_context.span_id:016x}" == SPAN_ID
    assert span_context.is_remote
    assert span_context.trace_flags.sampled is sampled


@pytest.mark.parametrize(
    ("names", "winner"),
    [(("tracecontext", "baggage", "b3"), TRACE_ID), (("b3", "tracecontext"), "1" * 32)],
)
def test_the_first_listed_format_wins(names: tuple[str, ...], winner: str) -> None:
    headers = {"traceparent": f"00-{TRACE_ID}-{SPAN_ID}-01", "b3": f"{'1' * 32}-{SPAN_ID}-1"}

    context = build_propagator(names).extract(headers, getter=GETTER)

    assert format_trace_id(remote(context).trace_id) == winner


def test_baggage_survives_the_precedence_rule() -> None:
    headers = {"traceparent": f"00-{TRACE_ID}-{SPAN_ID}-01", "baggage": "k=v", "b3": "0"}

    context = build_propagator().extract(headers, getter=GETTER)

    assert format_trace_id(remote(context).trace_id) == TRACE_ID
    assert baggage.get_baggage("k", context) == "v"


def test_baggage_is_extracted() -> None:
    context = build_propagator().extract({"baggage": "tenant=acme"}, getter=GETTER)

    assert baggage.get_baggage("tenant", context) == "acme"


def test_propagator_round_trip_through_injection() -> None:
    provider = TracerProvider(sampler=ALWAYS_ON)
    span = provider.get_tracer("t").start_span("s")
    carrier: dict[str, str] = {}

    build_propagator(("tracecontext", "b3multi")).inject(
        carrier, context=trace.set_span_in_context(span)
    )

    ids = (f"{span.get_span_context().trace_id:032x}", f"{span.get_span_context().span_id:016x}")
    version, trace_id, span_id, flags = carrier["traceparent"].split("-")
    assert (version, trace_id, span_id) == ("00", *ids)
    assert int(flags, 16) & 0x01  # sampled
    assert (carrier["x-b3-traceid"], carrier["x-b3-spanid"], carrier["x-b3-sampled"]) == (
        *ids,
        "1",
    )
    span.end()


@given(
    st.dictionaries(
        st.sampled_from(
            ["traceparent", "tracestate", "baggage", "b3", "x-b3-traceid", "x-b3-spanid",
             "x-b3-sampled", "x-b3-flags"]
        ),
        st.text(max_size=80),
    )
)  # fmt: skip
def test_extraction_never_raises(headers: dict[str, str]) -> None:
    context = build_propagator().extract(headers, getter=GETTER)

    span_context = remote(context)
    assert span_context.trace_id == 0 or span_context.is_remote


def test_b3_without_the_package_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "opentelemetry.propagators.b3", None)

    with pytest.raises(ConfigurationError) as caught:
        build_propagator(("b3",))

    assert str(caught.value) == (
        "tracing.propagators: B3 propagation needs the opentelemetry-propagator-b3 package"
    )


# -- ServerSpans ------------------------------------------------------------------------------


@pytest.fixture
def recorded() -> tuple[ServerSpans, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_ON)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return ServerSpans(provider, build_propagator()), exporter


def test_server_span_continues_the_caller(recorded: tuple[ServerSpans, Any]) -> None:
    spans, exporter = recorded
    record = RequestRecord(
        request_id="r-1",
        identity=Identity(SpiffeId.parse("spiffe://cluster.local/ns/a/sa/b"), "xfcc"),
        request_principal="iss/sub",
        authz_decision="deny",
        authz_policy="p",
        ratelimit="allowed",
    )

    span, context = spans.start("POST", {"traceparent": f"00-{TRACE_ID}-{SPAN_ID}-01"}, GETTER)
    assert trace.get_current_span(context) is span
    assert ServerSpans.trace_id(span, context) == TRACE_ID
    ServerSpans.finish(span, method="POST", route="/orders", status=403, record=record)

    [finished] = exporter.get_finished_spans()
    assert finished.name == "POST /orders"
    assert finished.parent is not None and f"{finished.parent.span_id:016x}" == SPAN_ID
    assert dict(finished.attributes or {}) == {
        "http.route": "/orders",
        "http.response.status_code": 403,
        "meshware.source.principal": "cluster.local/ns/a/sa/b",
        "meshware.request.principal": "iss/sub",
        "meshware.authz.decision": "deny",
        "meshware.authz.policy": "p",
        "meshware.ratelimit": "allowed",
        "meshware.request_id": "r-1",
    }
    assert finished.status.status_code is StatusCode.UNSET


def test_server_span_of_a_5xx_is_an_error(recorded: tuple[ServerSpans, Any]) -> None:
    spans, exporter = recorded

    span, _ = spans.start("BREW", {}, GETTER)
    ServerSpans.finish(span, method="BREW", route=None, status=503, record=None)

    [finished] = exporter.get_finished_spans()
    assert finished.name == "HTTP"
    assert finished.parent is None
    assert finished.status.status_code is StatusCode.ERROR
    assert dict(finished.attributes or {}) == {
        "http.response.status_code": 503,
        "error.type": "503",
    }


def test_no_op_tracer_still_reports_the_callers_trace_id() -> None:
    spans = ServerSpans(trace.NoOpTracerProvider(), build_propagator())

    span, context = spans.start("GET", {"b3": f"{TRACE_ID}-{SPAN_ID}"}, GETTER)

    assert not span.is_recording()
    assert ServerSpans.trace_id(span, context) == TRACE_ID
    assert ServerSpans.trace_id(*spans.start("GET", {}, GETTER)) is None


def test_global_propagator_is_used_when_none_is_given() -> None:
    spans = ServerSpans(TracerProvider(sampler=ALWAYS_ON))

    span, context = spans.start("GET", {"traceparent": f"00-{TRACE_ID}-{SPAN_ID}-01"}, GETTER)

    assert ServerSpans.trace_id(span, context) == TRACE_ID  # the default global is W3C
    span.end()


def test_format_trace_id() -> None:
    assert format_trace_id(0) is None
    assert format_trace_id(1) == "00000000000000000000000000000001"
