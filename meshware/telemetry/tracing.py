"""OpenTelemetry tracing: configuration, propagation, and the inbound server span.

``configure_tracing(TracingConfig(...))`` builds a ``TracerProvider`` (parent-based ratio
sampling, a batch span processor for the chosen exporter) and returns it without touching
OpenTelemetry's globals unless asked to. ``build_propagator()`` makes the composite propagator
that continues a caller's trace from W3C ``traceparent`` or B3 (single ``b3`` header or the
``x-b3-*`` headers). ``ServerSpans`` is the sans-I/O core the inbound telemetry shells use to
start and finish the server span of each request.
"""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagate import get_global_textmap
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import Getter, TextMapPropagator, default_getter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode

from meshware.__about__ import __version__
from meshware.exceptions import ConfigurationError

if TYPE_CHECKING:
    from meshware.inbound.record import RequestRecord

__all__ = [
    "ATTR_AUTHZ_DECISION",
    "ATTR_AUTHZ_POLICY",
    "ATTR_RATELIMIT",
    "ATTR_REQUEST_ID",
    "ATTR_REQUEST_PRINCIPAL",
    "ATTR_SOURCE_PRINCIPAL",
    "PROPAGATOR_NAMES",
    "ExporterName",
    "ServerSpans",
    "TracingConfig",
    "build_propagator",
    "configure_tracing",
    "format_trace_id",
    "propagator_reads",
]

ExporterName = Literal["none", "console", "otlp"]
"""Where finished spans go: nowhere, stdout, or an OTLP/HTTP collector."""

PROPAGATOR_NAMES: Final = frozenset({"tracecontext", "baggage", "b3", "b3multi"})
"""Propagator names, as in ``OTEL_PROPAGATORS``: ``b3`` injects the single ``b3`` header,
``b3multi`` the ``x-b3-*`` headers; both extract either form."""

ATTR_SOURCE_PRINCIPAL: Final = "meshware.source.principal"
ATTR_REQUEST_PRINCIPAL: Final = "meshware.request.principal"
ATTR_AUTHZ_DECISION: Final = "meshware.authz.decision"
ATTR_AUTHZ_POLICY: Final = "meshware.authz.policy"
ATTR_RATELIMIT: Final = "meshware.ratelimit"
ATTR_REQUEST_ID: Final = "meshware.request_id"

_EXPORTERS: Final = ("none", "console", "otlp")
_HTTP_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
_ROOT: Final = Context()
_INVALID_TRACE_ID: Final = trace.INVALID_TRACE_ID

CarrierT = TypeVar("CarrierT")


@dataclass(frozen=True, slots=True, kw_only=True)
class TracingConfig:
    """How a service traces its requests.

    Attributes:
        service_name: the ``service.name`` resource attribute of every span.
        sampler_ratio: the share of new traces to record, from 0 to 1. Sampling is parent
            based: a request whose caller sampled (or did not sample) its trace follows the
            caller's choice; only traces that start here are sampled at this ratio.
        exporter: ``"none"`` (spans are created for propagation but not exported),
            ``"console"`` (printed to stdout) or ``"otlp"`` (OTLP over HTTP/protobuf).
        otlp_endpoint: the collector's URL for ``exporter="otlp"``, e.g.
            ``"http://otel-collector:4318"``; ``/v1/traces`` is appended when the URL has no
            path. ``None`` leaves it to ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` /
            ``OTEL_EXPORTER_OTLP_ENDPOINT`` (default ``http://localhost:4318/v1/traces``).
        propagators: the trace-context formats to read from requests and write to outbound
            calls, from :data:`PROPAGATOR_NAMES`; a list is accepted and stored as a tuple.

    Raises:
        ConfigurationError: a field is out of range or not one of the listed names.
    """

    service_name: str
    sampler_ratio: float = 0.01
    exporter: ExporterName = "none"
    otlp_endpoint: str | None = None
    propagators: tuple[str, ...] = ("tracecontext", "baggage", "b3")

    def __post_init__(self) -> None:
        if not isinstance(self.service_name, str) or not self.service_name.strip():
            raise ConfigurationError(
                "expected a non-empty service name",
                field="tracing.service_name",
                value=self.service_name,
            )
        ratio = self.sampler_ratio
        if (
            isinstance(ratio, bool)
            or not isinstance(ratio, (int, float))
            or not math.isfinite(ratio)
            or not 0.0 <= ratio <= 1.0
        ):
            raise ConfigurationError(
                "expected a number from 0 to 1", field="tracing.sampler_ratio", value=ratio
            )
        if self.exporter not in _EXPORTERS:
            raise ConfigurationError(
                'expected "none", "console" or "otlp"',
                field="tracing.exporter",
                value=self.exporter,
            )
        if self.otlp_endpoint is not None:
            if self.exporter != "otlp":
                raise ConfigurationError(
                    'is only used with exporter="otlp"',
                    field="tracing.otlp_endpoint",
                    value=self.otlp_endpoint,
                )
            try:
                parts = (
                    urlsplit(self.otlp_endpoint) if isinstance(self.otlp_endpoint, str) else None
                )
            except ValueError:
                parts = None
            if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
                raise ConfigurationError(
                    "expected an http:// or https:// URL",
                    field="tracing.otlp_endpoint",
                    value=self.otlp_endpoint,
                )
        names = self.propagators
        if isinstance(names, str) or not isinstance(names, Sequence):
            raise ConfigurationError(
                "expected a sequence of propagator names",
                field="tracing.propagators",
                value=names,
            )
        for name in names:
            if name not in PROPAGATOR_NAMES:
                raise ConfigurationError(
                    f"unknown propagator {name!r} (expected some of "
                    f"{', '.join(sorted(PROPAGATOR_NAMES))})",
                    field="tracing.propagators",
                    value=names,
                )
        if len(set(names)) != len(names):
            raise ConfigurationError(
                "a propagator is listed twice", field="tracing.propagators", value=names
            )
        if not isinstance(names, tuple):
            object.__setattr__(self, "propagators", tuple(names))

    @property
    def traces_endpoint(self) -> str | None:
        """The OTLP traces URL the exporter posts to, or ``None`` to use the environment."""
        if self.otlp_endpoint is None:
            return None
        if urlsplit(self.otlp_endpoint).path in ("", "/"):
            return self.otlp_endpoint.rstrip("/") + "/v1/traces"
        return self.otlp_endpoint


# The headers each propagator build_propagator() makes reads when extracting: a request with
# none of them carries no trace context, and extraction can be skipped.
_TRACECONTEXT_HEADERS: Final = frozenset({"traceparent", "tracestate"})
_BAGGAGE_HEADERS: Final = frozenset({"baggage"})
_B3_HEADERS: Final = frozenset({"b3", "x-b3-traceid", "x-b3-spanid", "x-b3-sampled", "x-b3-flags"})


class _MeshPropagator(CompositePropagator):
    """A composite propagator whose first format with a valid trace context wins.

    OpenTelemetry's ``CompositePropagator`` lets the last member overwrite the trace context;
    here the order of the names is their precedence, so ``("tracecontext", "baggage", "b3")``
    prefers ``traceparent`` when a request carries both.
    """

    def __init__(
        self, propagators: Sequence[TextMapPropagator], reads: frozenset[str] | None = None
    ) -> None:
        super().__init__(propagators)
        self._members = tuple(propagators)
        self.reads = reads
        """The header names extraction reads, or ``None`` when not known."""

    def extract(
        self,
        carrier: CarrierT,
        context: Context | None = None,
        getter: Getter[CarrierT] = default_getter,
    ) -> Context:
        first: trace.Span | None = None
        for propagator in self._members:
            context = propagator.extract(carrier, context, getter)
            if first is None:
                span = trace.get_current_span(context)
                if span.get_span_context().is_valid:
                    first = span
        if first is not None and context is not None:
            context = trace.set_span_in_context(first, context)
        return context if context is not None else Context()


def build_propagator(names: Sequence[str] = ("tracecontext", "baggage", "b3")) -> TextMapPropagator:
    """Build the composite propagator of the named formats (see :data:`PROPAGATOR_NAMES`).

    Extraction reads every format; when several carry a trace context, the first in ``names``
    wins. The B3 formats read both the single ``b3`` header and the ``x-b3-*`` headers.
    Injection writes every format.

    Raises:
        ConfigurationError: a name is unknown, or B3 is asked for and the
            ``opentelemetry-propagator-b3`` package is not installed.
    """
    members: list[TextMapPropagator] = []
    reads: set[str] = set()
    for name in names:
        if name == "tracecontext":
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )

            members.append(TraceContextTextMapPropagator())
            reads |= _TRACECONTEXT_HEADERS
        elif name == "baggage":
            from opentelemetry.baggage.propagation import W3CBaggagePropagator

            members.append(W3CBaggagePropagator())
            reads |= _BAGGAGE_HEADERS
        elif name in ("b3", "b3multi"):
            try:
                from opentelemetry.propagators.b3 import B3MultiFormat, B3SingleFormat
            except ImportError as exc:
                raise ConfigurationError(
                    "B3 propagation needs the opentelemetry-propagator-b3 package",
                    field="tracing.propagators",
                    value=tuple(names),
                ) from exc
            members.append(B3SingleFormat() if name == "b3" else B3MultiFormat())
            reads |= _B3_HEADERS
        else:
            raise ConfigurationError(
                f"unknown propagator {name!r}", field="tracing.propagators", value=tuple(names)
            )
    return _MeshPropagator(members, frozenset(reads))


def propagator_reads(propagator: TextMapPropagator) -> frozenset[str] | None:
    """The header names (lower-case) ``propagator`` reads when extracting a trace context, or
    ``None`` when they are not known (a propagator not built by :func:`build_propagator`).

    A request that carries none of these headers carries no trace context for it, so the
    inbound shells skip extraction for such requests.
    """
    reads = getattr(propagator, "reads", None) if isinstance(propagator, _MeshPropagator) else None
    return reads if isinstance(reads, frozenset) else None


class _MeshIdGenerator(RandomIdGenerator):
    """OpenTelemetry's random ids, except that :class:`ServerSpans` may choose the trace id of
    the next root span the calling thread starts (see ``ServerSpans.start_root``)."""

    def __init__(self, sampler: ParentBased, root: TraceIdRatioBased) -> None:
        self.sampler = sampler
        self.bound = root.bound
        self._chosen = threading.local()

    def choose(self, trace_id: int) -> None:
        self._chosen.trace_id = trace_id

    def forget(self) -> None:
        self._chosen.__dict__.pop("trace_id", None)

    def generate_trace_id(self) -> int:
        chosen = self._chosen.__dict__.pop("trace_id", None)
        if chosen is not None:
            return int(chosen)
        return super().generate_trace_id()


def configure_tracing(config: TracingConfig, *, set_global: bool = False) -> TracerProvider:
    """Build the ``TracerProvider`` that ``config`` describes.

    The provider samples with ``ParentBased(TraceIdRatioBased(config.sampler_ratio))`` and,
    unless the exporter is ``"none"``, exports through a ``BatchSpanProcessor``. Pass it to the
    telemetry middleware's ``tracer_provider`` argument; call ``provider.shutdown()`` at exit
    to flush the last spans.

    Args:
        config: the tracing configuration.
        set_global: also install the provider and the configured propagator as
            OpenTelemetry's global ones (so other instrumentation and outbound calls use them).
            Nothing global changes otherwise.

    Raises:
        ConfigurationError: ``config`` is not a :class:`TracingConfig`, or its propagators
            cannot be built.
    """
    if not isinstance(config, TracingConfig):
        raise ConfigurationError("expected a TracingConfig", field="tracing", value=config)
    propagator = build_propagator(config.propagators)
    root = TraceIdRatioBased(config.sampler_ratio)
    sampler = ParentBased(root)
    provider = TracerProvider(
        sampler=sampler,
        resource=Resource.create({"service.name": config.service_name}),
        id_generator=_MeshIdGenerator(sampler, root),
    )
    if config.exporter != "none":
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

        exporter: SpanExporter
        if config.exporter == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporter = ConsoleSpanExporter(service_name=config.service_name)
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=config.traces_endpoint)
        provider.add_span_processor(BatchSpanProcessor(exporter))
    if set_global:
        from opentelemetry.propagate import set_global_textmap

        trace.set_tracer_provider(provider)
        set_global_textmap(propagator)
    return provider


def format_trace_id(trace_id: int) -> str | None:
    """A trace id as 32 lower-case hex digits, or ``None`` for the invalid id 0."""
    return None if trace_id == _INVALID_TRACE_ID else f"{trace_id:032x}"


_TRACE_ID_LIMIT: Final = TraceIdRatioBased.TRACE_ID_LIMIT
_getrandbits: Final = random.getrandbits

_FastRoots = tuple[_MeshIdGenerator, int, trace.TraceFlags, trace.TraceState]


def _unsampled_roots(tracer: trace.Tracer) -> _FastRoots | None:
    """What ``ServerSpans.start_root`` needs to make the root spans the sampler drops itself,
    or ``None`` when the tracer is not an SDK tracer of a provider from configure_tracing."""
    if not isinstance(tracer, SdkTracer):
        return None
    ids = tracer.id_generator
    if (
        not isinstance(ids, _MeshIdGenerator)
        or tracer.sampler is not ids.sampler
        or type(ids).generate_span_id is not RandomIdGenerator.generate_span_id
    ):
        return None
    if ids.bound > _TRACE_ID_LIMIT:
        return None  # every trace is sampled
    # A trace id the ratio sampler always drops shows what the SDK makes of a dropped root
    # span (its flags and state differ between SDK versions); the fast path copies them.
    ids.choose(_TRACE_ID_LIMIT)
    try:
        probe = tracer.start_span("probe", context=_ROOT, kind=SpanKind.SERVER)
    finally:
        ids.forget()  # unused when the tracer is disabled
    probe_context = probe.get_span_context()
    if probe.is_recording() or probe_context.trace_id != _TRACE_ID_LIMIT:
        probe.end()
        return None
    return ids, ids.bound, probe_context.trace_flags, probe_context.trace_state


class ServerSpans:
    """Starts and finishes the server span of each inbound request (the shells' core).

    The span continues the caller's trace when the request carries a trace context the
    propagator understands, and is otherwise the root of a new trace. Its name is
    ``"<METHOD> <route template>"`` (just ``"<METHOD>"`` while the route is unknown, as the
    HTTP semantic conventions ask: never the raw path).

    Args:
        tracer_provider: the provider to create spans with; ``None`` uses OpenTelemetry's
            global provider (a no-op one until something installs a real provider).
        propagator: the propagator that reads the caller's trace context; ``None`` uses
            OpenTelemetry's global propagator at each request.
    """

    __slots__ = ("_fast", "_propagator", "_reads", "_tracer")

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        propagator: TextMapPropagator | None = None,
    ) -> None:
        if tracer_provider is not None and not isinstance(tracer_provider, trace.TracerProvider):
            raise ConfigurationError(
                "expected an opentelemetry TracerProvider or None",
                field="tracer_provider",
                value=tracer_provider,
            )
        if propagator is not None and not isinstance(propagator, TextMapPropagator):
            raise ConfigurationError(
                "expected an opentelemetry TextMapPropagator or None",
                field="propagator",
                value=propagator,
            )
        self._tracer = trace.get_tracer("meshware", __version__, tracer_provider)
        self._propagator = propagator
        self._reads = None if propagator is None else propagator_reads(propagator)
        self._fast = _unsampled_roots(self._tracer)

    @property
    def reads(self) -> frozenset[str] | None:
        """The header names (lower-case) the propagator reads, or ``None`` when not known.

        A request carrying none of them has no trace context: start its span with
        :meth:`start_root`, which skips extraction.
        """
        if self._propagator is None:
            return propagator_reads(get_global_textmap())
        return self._reads

    def start(
        self, method: str, carrier: CarrierT, getter: Getter[CarrierT]
    ) -> tuple[Span, Context]:
        """Start the server span of a request.

        Args:
            method: the request method.
            carrier: the request's headers in whatever form ``getter`` reads.
            getter: reads header values (lower-case names) from ``carrier``.

        Returns:
            The span (recording or not, per the sampler) and the context to make current
            while the application handles the request.
        """
        propagator = self._propagator or get_global_textmap()
        parent = propagator.extract(carrier, context=_ROOT, getter=getter)
        if parent is _ROOT:  # nothing extracted: the root of a new trace
            return self.start_root(method)
        span = self._tracer.start_span(
            method if method in _HTTP_METHODS else "HTTP", context=parent, kind=SpanKind.SERVER
        )
        return span, trace.set_span_in_context(span, parent)

    def start_root(self, method: str) -> tuple[Span, Context]:
        """Start the server span of a request that carries no trace context: the root span
        of a new trace. Returns what :meth:`start` returns.

        With a provider from :func:`configure_tracing`, a trace its sampler would drop gets a
        non-recording span made here, with the trace id, span id, flags and state the SDK
        would have given it, without the SDK's per-span work; sampled traces are started by
        the SDK, with the trace id the sampling decision was made on.
        """
        fast = self._fast
        if fast is not None:
            ids, bound, flags, state = fast
            # The ids RandomIdGenerator makes, from the same generator, without its calls.
            trace_id = _getrandbits(128)
            while not trace_id:
                trace_id = _getrandbits(128)
            if trace_id & _TRACE_ID_LIMIT >= bound:
                span_id = _getrandbits(64)
                while not span_id:
                    span_id = _getrandbits(64)
                span: Span = NonRecordingSpan(SpanContext(trace_id, span_id, False, flags, state))
                return span, trace.set_span_in_context(span, _ROOT)
            ids.choose(trace_id)
            try:
                span = self._tracer.start_span(
                    method if method in _HTTP_METHODS else "HTTP",
                    context=_ROOT,
                    kind=SpanKind.SERVER,
                )
            finally:
                ids.forget()
            return span, trace.set_span_in_context(span, _ROOT)
        span = self._tracer.start_span(
            method if method in _HTTP_METHODS else "HTTP", context=_ROOT, kind=SpanKind.SERVER
        )
        return span, trace.set_span_in_context(span, _ROOT)

    @staticmethod
    def trace_id(span: Span, context: Context) -> str | None:
        """The request's trace id as hex: the span's, or the caller's when spans are no-ops."""
        trace_id = span.get_span_context().trace_id
        if trace_id == _INVALID_TRACE_ID:
            trace_id = trace.get_current_span(context).get_span_context().trace_id
        return format_trace_id(trace_id)

    @staticmethod
    def set_request_attributes(span: Span, attributes: Mapping[str, Any]) -> None:
        """Set request attributes on a recording span (callers check ``is_recording()``)."""
        span.set_attributes({k: v for k, v in attributes.items() if v is not None})

    @staticmethod
    def finish(
        span: Span,
        *,
        method: str,
        route: str | None,
        status: int,
        record: RequestRecord | None,
        error: BaseException | None = None,
    ) -> None:
        """Name, annotate and end the span once the response is complete.

        Args:
            span: the span from :meth:`start`.
            method: the request method.
            route: the route template, or ``None`` when unknown.
            status: the response status code (``0`` when no response was sent).
            record: the request's record, for the caller's principal, the authorization
                decision and policy, the rate-limit verdict and the request id.
            error: the exception the application raised, if any.
        """
        if span.is_recording():
            name = method if method in _HTTP_METHODS else "HTTP"
            attributes: dict[str, Any] = {}
            if route is not None:
                name = f"{name} {route}"
                attributes["http.route"] = route
            span.update_name(name)
            if status:
                attributes["http.response.status_code"] = status
            if record is not None:
                if record.identity is not None:
                    attributes[ATTR_SOURCE_PRINCIPAL] = record.identity.principal
                if record.request_principal is not None:
                    attributes[ATTR_REQUEST_PRINCIPAL] = record.request_principal
                if record.authz_decision is not None:
                    attributes[ATTR_AUTHZ_DECISION] = record.authz_decision
                if record.authz_policy is not None:
                    attributes[ATTR_AUTHZ_POLICY] = record.authz_policy
                if record.ratelimit is not None:
                    attributes[ATTR_RATELIMIT] = record.ratelimit
                if record.request_id is not None:
                    attributes[ATTR_REQUEST_ID] = record.request_id
            if error is not None:
                attributes["error.type"] = type(error).__qualname__
                span.record_exception(error)
                span.set_status(Status(StatusCode.ERROR, type(error).__qualname__))
            elif status >= 500:
                attributes["error.type"] = str(status)
                span.set_status(Status(StatusCode.ERROR))
            span.set_attributes(attributes)
        span.end()
