"""The outermost outbound layer: a client span, trace propagation and Istio's source metrics.

Per call:

- a client span named ``"<METHOD> <destination>"`` (the request's host until a lower layer
  names the mesh destination), a child of the span current when the call is made;
- the span's trace context is injected into the request headers with
  :func:`meshware.telemetry.tracing.build_propagator` (W3C ``traceparent`` and ``baggage``
  and the B3 single header, by default), so the callee's server span continues the trace;
- the ``x-request-id`` of the inbound request being served
  (:func:`meshware.telemetry.context.current_request_id`) is copied to the call, unless the
  caller set one;
- when the response body is closed (or the call fails), Istio's standard metrics are
  recorded with ``reporter="source"``: ``source_*`` labels from this workload,
  ``destination_*`` from the service called, the response code and Envoy's response flags.

Response flags and codes of calls that got no response (the code is what a sidecar would
have answered, so error-rate queries on ``response_code`` count them):

=================================  =====  ====  ============================================
error                              flag   code  meaning
=================================  =====  ====  ============================================
``CircuitOpen``                    UO     503   the circuit breaker is open (overflow)
``PoolOverloaded``                 UO     503   the connection pool shed the call (overflow)
``NoHealthyEndpoint``              UH     503   no healthy upstream endpoint
``DeadlineExceeded``               DE     504   the caller's deadline ran out (meshware's
                                                own flag: Envoy has no deadline)
``httpx.ConnectError`` (and
``WrongServerIdentity``),
``httpx.ConnectTimeout``           UF     503   upstream connection failure
other ``httpx.TimeoutException``   UT     504   upstream request timeout
``RemoteProtocolError``,
``ReadError``, ``WriteError``,
``CloseError``                     UC     503   upstream connection terminated
cancellation                       DC     0     the call was abandoned by the caller
anything else                      ``-``  0
=================================  =====  ====  ============================================

``URX`` is added (``"UF,URX"``, or alone on a response) when the retry layer gave up on a
retryable outcome because the attempts or the retry budget were used up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Final

import httpx
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagators.textmap import Setter, TextMapPropagator
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from meshware.__about__ import __version__
from meshware.exceptions import ConfigurationError
from meshware.outbound.call import CallPlan, plan_of
from meshware.outbound.errors import (
    CircuitOpen,
    DeadlineExceeded,
    NoHealthyEndpoint,
    PoolOverloaded,
)
from meshware.outbound.transports import (
    RETRIES_EXHAUSTED_KEY,
    SERVER_IDENTITY_KEY,
    observe_async_response,
    observe_response,
)
from meshware.telemetry.context import current_request_id
from meshware.telemetry.metrics import OutboundRecorder
from meshware.telemetry.tracing import build_propagator

__all__ = ["AsyncTelemetryTransport", "TelemetryTransport", "failure_flags"]

_log = logging.getLogger("meshware.telemetry")
_HTTP_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
_FAILURES: Final[
    tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], str, int], ...]
] = (
    (DeadlineExceeded, "DE", 504),
    ((CircuitOpen, PoolOverloaded), "UO", 503),
    (NoHealthyEndpoint, "UH", 503),
    ((httpx.ConnectError, httpx.ConnectTimeout), "UF", 503),
    (httpx.TimeoutException, "UT", 504),
    ((httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError, httpx.CloseError), "UC", 503),
)


def failure_flags(exc: BaseException) -> tuple[str, int]:
    """The Envoy response flag and the reported response code of a call that raised
    ``exc`` (see the module docs' table)."""
    for kinds, flag, code in _FAILURES:
        if isinstance(exc, kinds):
            return flag, code
    if not isinstance(exc, Exception):
        return "DC", 0
    return "-", 0


class _HeaderSetter(Setter[httpx.Headers]):
    __slots__ = ()

    def set(self, carrier: httpx.Headers, key: str, value: str) -> None:
        carrier[key] = value


_SETTER: Final = _HeaderSetter()


class _ClientCall:
    """One call's span and timing, finished once (by the response's close or the error)."""

    __slots__ = ("context", "core", "finished", "plan", "request", "span", "start")

    def __init__(
        self,
        core: _TelemetryCore,
        request: httpx.Request,
        plan: CallPlan,
        span: Span,
        context: otel_context.Context,
        start: float,
    ) -> None:
        self.core = core
        self.request = request
        self.plan = plan
        self.span = span
        self.context = context
        self.start = start
        self.finished = False

    def failed(self, exc: BaseException) -> None:
        flag, code = failure_flags(exc)
        self.finish(status=code, flag=flag, response=None, response_bytes=0, error=exc)

    def responded(self, response: httpx.Response, *, is_async: bool) -> None:
        def on_close(count: int, error: BaseException | None) -> None:
            self.finish(
                status=response.status_code,
                flag="-",
                response=response,
                response_bytes=count,
                error=error,
            )

        if is_async:
            observe_async_response(response, on_close)
        else:
            observe_response(response, on_close)

    def finish(
        self,
        *,
        status: int,
        flag: str,
        response: httpx.Response | None,
        response_bytes: int,
        error: BaseException | None,
    ) -> None:
        if self.finished:
            return
        self.finished = True
        try:
            self.core.record(self, status, flag, response, response_bytes, error)
        except Exception:
            self.core.warn_once("could not record an outbound call")


class _TelemetryCore:
    __slots__ = ("_warned", "clock", "propagator", "recorder", "request_id_header", "tracer")

    def __init__(
        self,
        recorder: OutboundRecorder | None,
        tracer_provider: trace.TracerProvider | None,
        propagator: TextMapPropagator | None,
        request_id_header: str,
        clock: Callable[[], float],
    ) -> None:
        if recorder is not None and not isinstance(recorder, OutboundRecorder):
            raise ConfigurationError(
                "expected an OutboundRecorder (MeshMetrics.outbound(workload)) or None",
                field="recorder",
                value=recorder,
            )
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
        if (
            not isinstance(request_id_header, str)
            or not request_id_header
            or not request_id_header.isascii()
            or any(c in request_id_header for c in " \t:")
        ):
            raise ConfigurationError(
                "expected an HTTP header name", field="request_id_header", value=request_id_header
            )
        if not callable(clock):
            raise ConfigurationError("expected a callable returning seconds", field="clock")
        self.recorder = recorder
        self.tracer = trace.get_tracer("meshware", __version__, tracer_provider)
        self.propagator = propagator if propagator is not None else build_propagator()
        self.request_id_header = request_id_header.lower()
        self.clock = clock
        self._warned: set[str] = set()

    def start(self, request: httpx.Request) -> _ClientCall:
        plan = plan_of(request)
        url = request.url
        method = request.method
        span = self.tracer.start_span(
            f"{method if method in _HTTP_METHODS else 'HTTP'} {url.host}", kind=SpanKind.CLIENT
        )
        if span.is_recording():
            span.set_attributes(
                {
                    "http.request.method": method,
                    "server.address": url.host,
                    "server.port": url.port or (443 if url.scheme == "https" else 80),
                    "url.full": f"{url.scheme}://{url.netloc.decode('ascii')}{url.path}",
                }
            )
        context = trace.set_span_in_context(span)
        headers = request.headers
        self.propagator.inject(headers, context=context, setter=_SETTER)
        request_id = current_request_id()
        if request_id is not None and self.request_id_header not in headers:
            headers[self.request_id_header] = request_id
        return _ClientCall(self, request, plan, span, context, self.clock())

    def record(
        self,
        call: _ClientCall,
        status: int,
        flag: str,
        response: httpx.Response | None,
        response_bytes: int,
        error: BaseException | None,
    ) -> None:
        request = call.request
        plan = call.plan
        if request.extensions.get(RETRIES_EXHAUSTED_KEY):
            flag = "URX" if flag == "-" else f"{flag},URX"
        duration = self.clock() - call.start
        endpoint = plan.endpoint
        principal = None if response is None else response.extensions.get(SERVER_IDENTITY_KEY)
        http_version = "1.1"
        if response is not None:
            raw = response.extensions.get("http_version")
            if isinstance(raw, bytes) and raw.startswith(b"HTTP/"):
                http_version = raw[5:].decode("ascii", "replace")
        recorder = self.recorder
        if recorder is not None:
            length = request.headers.get("content-length")
            recorder.observe(
                destination=plan.destination,
                host=request.url.host,
                method=request.method,
                status=status,
                duration_s=duration,
                request_bytes=(
                    int(length)
                    if length is not None and length.isascii() and length.isdigit()
                    else 0
                ),
                response_bytes=response_bytes,
                response_flags=flag,
                destination_version=None if endpoint is None else endpoint.labels.get("version"),
                destination_principal=principal if isinstance(principal, str) else None,
                scheme=request.url.scheme,
                http_version=http_version,
                error_type=None if error is None else type(error).__qualname__,
            )
        span = call.span
        if span.is_recording():
            method = request.method
            if plan.destination is not None:
                span.update_name(
                    f"{method if method in _HTTP_METHODS else 'HTTP'} {plan.destination}"
                )
            attributes: dict[str, Any] = {"meshware.retries": plan.attempt}
            if response is not None:
                attributes["http.response.status_code"] = status
            if plan.destination is not None:
                attributes["meshware.destination"] = plan.destination
            if plan.subset is not None:
                attributes["meshware.subset"] = plan.subset
            if plan.route is not None:
                attributes["meshware.route"] = plan.route
            if endpoint is not None:
                attributes["network.peer.address"] = endpoint.address
                attributes["network.peer.port"] = endpoint.port
            if flag != "-":
                attributes["meshware.response_flags"] = flag
            if error is not None:
                attributes["error.type"] = type(error).__qualname__
                span.record_exception(error)
                span.set_status(Status(StatusCode.ERROR, type(error).__qualname__))
            elif status >= 400:
                attributes["error.type"] = str(status)
                span.set_status(Status(StatusCode.ERROR))
            span.set_attributes(attributes)
        span.end()

    def warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            _log.warning(message, exc_info=True)


class TelemetryTransport(httpx.BaseTransport):
    """Traces, propagates and measures every outbound call (see the module docs).

    Place it outermost, so that it sees every call, the time of every retry, and the
    refusals of the inner layers.

    Args:
        transport: the next transport.
        recorder: where the calls are counted, from
            :meth:`MeshMetrics.outbound(workload) <meshware.telemetry.metrics.MeshMetrics.outbound>`;
            ``None`` records no metrics.
        tracer_provider: the OpenTelemetry tracer provider; ``None`` uses the global one.
        propagator: the formats the trace context is written in; ``None`` for
            :func:`~meshware.telemetry.tracing.build_propagator`'s default (W3C
            ``traceparent`` and ``baggage``, and B3).
        request_id_header: the header that carries the request id.
        clock: the monotonic clock durations are measured with (seconds).

    Raises:
        ConfigurationError: an argument has the wrong type.
    """

    __slots__ = ("_core", "_transport")

    def __init__(
        self,
        transport: httpx.BaseTransport,
        *,
        recorder: OutboundRecorder | None = None,
        tracer_provider: trace.TracerProvider | None = None,
        propagator: TextMapPropagator | None = None,
        request_id_header: str = "x-request-id",
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._transport = transport
        self._core = _TelemetryCore(recorder, tracer_provider, propagator, request_id_header, clock)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` through the next transport inside a client span."""
        call = self._core.start(request)
        token = otel_context.attach(call.context)
        try:
            response = self._transport.handle_request(request)
        except BaseException as exc:
            call.failed(exc)
            raise
        finally:
            otel_context.detach(token)
        call.responded(response, is_async=False)
        return response

    def close(self) -> None:
        """Close the next transport."""
        self._transport.close()


class AsyncTelemetryTransport(httpx.AsyncBaseTransport):
    """The async twin of :class:`TelemetryTransport`, with the same arguments."""

    __slots__ = ("_core", "_transport")

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport,
        *,
        recorder: OutboundRecorder | None = None,
        tracer_provider: trace.TracerProvider | None = None,
        propagator: TextMapPropagator | None = None,
        request_id_header: str = "x-request-id",
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._transport = transport
        self._core = _TelemetryCore(recorder, tracer_provider, propagator, request_id_header, clock)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` through the next transport inside a client span."""
        call = self._core.start(request)
        token = otel_context.attach(call.context)
        try:
            response = await self._transport.handle_async_request(request)
        except BaseException as exc:
            call.failed(exc)
            raise
        finally:
            otel_context.detach(token)
        call.responded(response, is_async=True)
        return response

    async def aclose(self) -> None:
        """Close the next transport."""
        await self._transport.aclose()
