"""Root server spans: the ones the sampler drops are made without the SDK, exactly as it would."""

from __future__ import annotations

import random
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from meshware.telemetry.tracing import (
    ServerSpans,
    TracingConfig,
    build_propagator,
    configure_tracing,
    propagator_reads,
)

ROOT = Context()


def provider(ratio: float) -> tuple[TracerProvider, InMemorySpanExporter]:
    built = configure_tracing(TracingConfig(service_name="orders", sampler_ratio=ratio))
    exporter = InMemorySpanExporter()
    built.add_span_processor(SimpleSpanProcessor(exporter))
    return built, exporter


def context_of(span: Any) -> tuple[Any, ...]:
    c = span.get_span_context()
    return (c.trace_id, c.span_id, c.is_remote, c.trace_flags, c.trace_state, c.is_valid)


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5])
def test_root_spans_are_the_ones_the_sdk_makes(ratio: float) -> None:
    built, _ = provider(ratio)
    spans = ServerSpans(built, build_propagator())
    tracer = built.get_tracer("reference")
    assert spans._fast is not None
    for seed in range(60):
        random.seed(seed)
        span, context = spans.start_root("GET")
        random.seed(seed)
        reference = tracer.start_span("GET", context=ROOT, kind=SpanKind.SERVER)

        assert context_of(span) == context_of(reference)
        assert span.is_recording() == reference.is_recording()
        assert trace.get_current_span(context) is span
        if not span.is_recording():
            assert type(span) is NonRecordingSpan
        span.end()
        reference.end()


def test_sampled_roots_are_started_by_the_sdk_with_the_decided_trace_id() -> None:
    built, exporter = provider(0.5)
    spans = ServerSpans(built, build_propagator())
    bound = TraceIdRatioBased.get_bound_for_rate(0.5)
    recorded = []
    for _ in range(200):
        span, _ = spans.start_root("POST")
        assert span.get_span_context().is_valid
        sampled = span.get_span_context().trace_id & TraceIdRatioBased.TRACE_ID_LIMIT < bound
        assert span.is_recording() == sampled
        if sampled:
            recorded.append(span.get_span_context().trace_id)
        span.end()

    assert 50 < len(recorded) < 150
    assert [s.context.trace_id for s in exporter.get_finished_spans()] == recorded
    assert all(
        s.name == "POST" and s.kind is SpanKind.SERVER for s in exporter.get_finished_spans()
    )
    assert not built.id_generator._chosen.__dict__  # type: ignore[attr-defined]


def test_every_root_is_sampled_at_ratio_one() -> None:
    built, exporter = provider(1.0)
    spans = ServerSpans(built, build_propagator())

    for _ in range(5):
        span, _ = spans.start_root("GET")
        span.end()

    assert spans._fast is None
    assert len(exporter.get_finished_spans()) == 5


def test_providers_not_built_here_use_the_sdk() -> None:
    other = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.01)))
    spans = ServerSpans(other, build_propagator())

    span, context = spans.start_root("GET")

    assert spans._fast is None
    assert span.get_span_context().is_valid
    assert trace.get_current_span(context) is span


def test_a_disabled_sdk_gets_no_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    built, _ = provider(0.01)
    spans = ServerSpans(built, build_propagator())

    span, _ = spans.start_root("GET")

    assert spans._fast is None
    assert not span.get_span_context().is_valid
    assert not built.id_generator._chosen.__dict__  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("names", "reads"),
    [
        (("tracecontext",), {"traceparent", "tracestate"}),
        (("baggage",), {"baggage"}),
        (("b3",), {"b3", "x-b3-traceid", "x-b3-spanid", "x-b3-sampled", "x-b3-flags"}),
        (
            ("tracecontext", "baggage", "b3multi"),
            {
                "traceparent",
                "tracestate",
                "baggage",
                "b3",
                "x-b3-traceid",
                "x-b3-spanid",
                "x-b3-sampled",
                "x-b3-flags",
            },
        ),
        ((), set()),
    ],
)
def test_propagator_reads(names: tuple[str, ...], reads: set[str]) -> None:
    assert propagator_reads(build_propagator(names)) == frozenset(reads)


def test_other_propagators_read_unknown_headers() -> None:
    assert propagator_reads(TraceContextTextMapPropagator()) is None
    assert propagator_reads(CompositePropagator([TraceContextTextMapPropagator()])) is None
    assert ServerSpans(None, TraceContextTextMapPropagator()).reads is None


def test_start_without_a_trace_context_is_a_root(monkeypatch: pytest.MonkeyPatch) -> None:
    built, _ = provider(0.0)
    spans = ServerSpans(built, build_propagator())
    roots: list[str] = []
    original = ServerSpans.start_root

    def spy(self: ServerSpans, method: str) -> Any:
        roots.append(method)
        return original(self, method)

    monkeypatch.setattr(ServerSpans, "start_root", spy)

    span, _ = spans.start("GET", {"user-agent": "curl"}, _DictGetter())
    child, _ = spans.start(
        "GET",
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
        _DictGetter(),
    )

    assert roots == ["GET"]
    assert span.get_span_context().is_valid
    assert child.get_span_context().trace_id == 0x0AF7651916CD43DD8448EB211C80319C


class _DictGetter:
    def get(self, carrier: dict[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        return None if value is None else [value]

    def keys(self, carrier: dict[str, str]) -> list[str]:
        return list(carrier)
