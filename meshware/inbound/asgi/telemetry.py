"""The outermost inbound layer: Istio-style metrics, a server span and an access log per request.

``TelemetryMiddleware`` creates the request's ``RequestRecord`` before calling the inner app and,
once the response is complete, reads what the inner layers wrote into it (caller identity,
authorization decision, rate-limit verdict, route template) for metric labels, span attributes
and the access log line. It also serves the Prometheus scrape endpoint (``/metrics``).

``InboundTelemetry`` is the framework-neutral part that this shell and the WSGI shell of the
same name (``meshware.inbound.wsgi.telemetry``) share.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from random import getrandbits as _getrandbits
from typing import TYPE_CHECKING, Final

from opentelemetry import context as otel_context
from opentelemetry.propagators.textmap import Getter

from meshware.exceptions import ConfigurationError
from meshware.inbound.record import RECORD_KEY, RequestRecord, record_of
from meshware.telemetry.access_log import AccessLog
from meshware.telemetry.context import _request_id
from meshware.telemetry.metrics import InboundRecorder, MeshMetrics, WorkloadInfo
from meshware.telemetry.tracing import ServerSpans

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.propagators.textmap import TextMapPropagator
    from opentelemetry.trace import Span, TracerProvider

    from meshware.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "DEFAULT_SKIP_PATHS",
    "InboundTelemetry",
    "TelemetryMiddleware",
    "host_name",
    "new_request_id",
    "valid_request_id",
]

DEFAULT_SKIP_PATHS: Final = frozenset({"/livez", "/readyz"})
"""Paths that get no metrics, spans or log lines: the health probes."""

_HEADER_NAME_RE: Final = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")
_internal_log = logging.getLogger("meshware.telemetry")
_attach = otel_context.attach
_detach = otel_context.detach
_EMIT: Final = AccessLog.emit
_set_request_id: Final = _request_id.set  # telemetry.context's variable, without a call
_reset_request_id: Final = _request_id.reset
_UUID_CLEAR: Final = ~((0xF << 76) | (0x3 << 62))  # the version and variant bits
_UUID4_BITS: Final = (0x4 << 76) | (0x2 << 62)


def valid_request_id(value: str) -> bool:
    """Whether a received request id may be kept: 1-128 visible ASCII characters."""
    return 0 < len(value) <= 128 and value.isascii() and value.isprintable() and " " not in value


def host_name(host: str) -> str | None:
    """The name part of a ``Host`` header (``"[::1]:8000"`` gives ``"[::1]"``), or ``None``."""
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end > 0 else None
    return host.partition(":")[0] or None


def new_request_id() -> str:
    """A fresh request id: a random (version 4) UUID as 32 hex digits."""
    # uuid.uuid4().hex from Python's fast generator: a request id correlates log lines and is
    # no secret (a caller chooses its own freely), so it needs no system randomness.
    return f"{_getrandbits(128) & _UUID_CLEAR | _UUID4_BITS:032x}"


class _DictGetter(Getter[Mapping[str, str]]):
    """Reads propagation headers from a dict of lower-case names to values."""

    __slots__ = ()

    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        return None if value is None else [value]

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier)


_DICT_GETTER: Final = _DictGetter()


class InboundTelemetry:
    """What both telemetry shells share: validated settings and the per-request finish step.

    The arguments are those of :class:`TelemetryMiddleware`; see there.

    Raises:
        ConfigurationError: an argument is invalid.
    """

    __slots__ = (
        "_warned",
        "access_log",
        "clock",
        "metrics",
        "metrics_path",
        "recorder",
        "request_id_header",
        "skip_paths",
        "spans",
        "workload",
    )

    def __init__(
        self,
        *,
        workload: WorkloadInfo,
        metrics: MeshMetrics | None,
        tracer_provider: TracerProvider | None = None,
        propagator: TextMapPropagator | None = None,
        access_log: bool | AccessLog = True,
        metrics_path: str | None = "/metrics",
        skip_paths: Iterable[str] = DEFAULT_SKIP_PATHS,
        request_id_header: str = "x-request-id",
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if not isinstance(workload, WorkloadInfo):
            raise ConfigurationError("expected a WorkloadInfo", field="workload", value=workload)
        if metrics is not None and not isinstance(metrics, MeshMetrics):
            raise ConfigurationError(
                "expected a MeshMetrics or None", field="metrics", value=metrics
            )
        if metrics_path is not None and (
            not isinstance(metrics_path, str) or not metrics_path.startswith("/")
        ):
            raise ConfigurationError(
                'expected a path starting with "/" or None',
                field="metrics_path",
                value=metrics_path,
            )
        if isinstance(skip_paths, str) or not isinstance(skip_paths, Iterable):
            raise ConfigurationError(
                "expected a collection of paths", field="skip_paths", value=skip_paths
            )
        paths = frozenset(skip_paths)
        for path in paths:
            if not isinstance(path, str) or not path.startswith("/"):
                raise ConfigurationError(
                    f'expected paths starting with "/", got {path!r}',
                    field="skip_paths",
                    value=skip_paths,
                )
        if not isinstance(request_id_header, str) or not _HEADER_NAME_RE.fullmatch(
            request_id_header.lower()
        ):
            raise ConfigurationError(
                "expected an HTTP header name",
                field="request_id_header",
                value=request_id_header,
            )
        if access_log is True:
            log: AccessLog | None = AccessLog()
        elif access_log is False:
            log = None
        elif isinstance(access_log, AccessLog):
            log = access_log
        else:
            raise ConfigurationError(
                "expected True, False or an AccessLog", field="access_log", value=access_log
            )
        self.workload = workload
        self.metrics = metrics
        self.recorder: InboundRecorder | None = (
            None if metrics is None else metrics.inbound(workload)
        )
        self.spans = ServerSpans(tracer_provider, propagator)
        self.access_log = log
        self.metrics_path = None if metrics is None else metrics_path
        self.skip_paths = paths
        self.request_id_header = request_id_header.lower()
        if not callable(clock):
            raise ConfigurationError(
                "expected a callable returning seconds", field="clock", value=clock
            )
        self.clock = clock
        self._warned: set[str] = set()

    def finish(
        self,
        *,
        record: RequestRecord,
        span: Span,
        context: Context,
        method: str,
        route: str | None,
        path: str,
        status: int,
        start: float,
        wall_start: float,
        bytes_in: int,
        bytes_out: int,
        scheme: str,
        http_version: str,
        grpc: bool,
        grpc_status: str | None,
        user_agent: str | None,
        error: BaseException | None,
        cancelled: bool,
    ) -> None:
        """Record a finished request in the metrics, the span and the access log.

        ``route`` is the framework's route template, used when no inner layer set
        ``record.route``. A request that raised before a response started counts as a 500.
        Never raises: a failure is reported (once per kind) on the ``meshware.telemetry``
        logger.
        """
        self.record(
            record,
            span,
            context,
            method,
            route,
            path,
            status,
            start,
            wall_start,
            bytes_in,
            bytes_out,
            scheme,
            http_version,
            grpc,
            grpc_status,
            user_agent,
            error,
            cancelled,
        )

    def record(
        self,
        record: RequestRecord,
        span: Span,
        context: Context,
        method: str,
        route: str | None,
        path: str,
        status: int,
        start: float,
        wall_start: float,
        bytes_in: int,
        bytes_out: int,
        scheme: str,
        http_version: str,
        grpc: bool,
        grpc_status: str | None,
        user_agent: str | None,
        error: BaseException | None,
        cancelled: bool,
    ) -> None:
        """:meth:`finish` with positional arguments, for the shells' per-request path."""
        duration = self.clock() - start
        if error is not None and status == 0:
            status = 500
        if record.route is not None:
            route = record.route
        recorder = self.recorder
        metrics = self.metrics
        if recorder is not None and metrics is not None:
            try:
                recorder.record(
                    record.identity,
                    method,
                    route,
                    status,
                    duration,
                    bytes_in,
                    bytes_out,
                    scheme,
                    http_version,
                    grpc,
                    grpc_status,
                    "RL" if record.ratelimit == "limited" else "DC" if cancelled else "-",
                    None if error is None else type(error).__qualname__,
                )
                metrics.record_outcomes(record)
            except Exception:
                self._warn_once("could not record request metrics")
        try:
            if span.is_recording():
                self.spans.finish(
                    span, method=method, route=route, status=status, record=record, error=error
                )
            else:
                span.end()
        except Exception:
            self._warn_once("could not finish the request span")
        log = self.access_log
        if log is not None:
            number = span.get_span_context().trace_id
            # ServerSpans.trace_id() for a span with a trace id of its own, written in place.
            trace_id = f"{number:032x}" if number else ServerSpans.trace_id(span, context)
            if type(log).emit is _EMIT:
                log.write(
                    wall_start,
                    method,
                    route,
                    path,
                    status,
                    duration * 1000.0,
                    bytes_in,
                    bytes_out,
                    record,
                    trace_id,
                    user_agent,
                )
            else:  # a subclass's own emit()
                log.emit(
                    start_time=wall_start,
                    method=method,
                    route=route,
                    path=path,
                    status=status,
                    duration_ms=duration * 1000.0,
                    bytes_in=bytes_in,
                    bytes_out=bytes_out,
                    record=record,
                    trace_id=trace_id,
                    user_agent=user_agent,
                )

    def _warn_once(self, message: str) -> None:
        # A failure that repeats on every request is reported once, not at request rate.
        if message not in self._warned:
            self._warned.add(message)
            _internal_log.warning(message, exc_info=True)


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


def _scope_route(scope: Scope) -> str | None:
    # Starlette and FastAPI leave the matched route in the scope.
    route = scope.get("route")
    if route is None:
        return None
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else None


def _raw_path(scope: Scope) -> str:
    raw = scope.get("raw_path")
    if isinstance(raw, bytes):
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            return raw.decode("utf-8", "backslashreplace")
    return str(scope.get("path", ""))


class TelemetryMiddleware:
    """Pure-ASGI telemetry: metrics, a server span and an access log line per HTTP request.

    Place it outermost (before health, identity, authorization and rate limiting) so that it
    sees every request and the decisions of every inner layer. Lifespan and websocket
    connections pass through untouched.

    Per request it takes the ``x-request-id`` (or generates one and adds it to the request
    headers the app sees), echoes it on the response, continues the caller's trace, and after
    the response records Istio's standard metrics, finishes the span and writes the log line.
    Request bytes come from ``Content-Length`` when present; otherwise (chunked or HTTP/2
    bodies) the body bytes the app reads are counted. An exception from the app is recorded as
    a 500 (when no response had started) and re-raised.

    Args:
        app: the ASGI application to wrap.
        workload: this service's identity and labels (the ``destination_*`` labels).
        metrics: the process's :class:`~meshware.telemetry.metrics.MeshMetrics`, or ``None``
            to record no metrics (and serve no metrics endpoint).
        tracer_provider: the OpenTelemetry tracer provider (see
            :func:`~meshware.telemetry.tracing.configure_tracing`); ``None`` uses the global
            one, which does nothing until a provider is installed.
        propagator: the propagator that reads the caller's trace context (see
            :func:`~meshware.telemetry.tracing.build_propagator`); ``None`` uses the global one.
        access_log: ``True`` for an :class:`~meshware.telemetry.access_log.AccessLog` with
            defaults, ``False`` for none, or a configured ``AccessLog``.
        metrics_path: the path that serves the Prometheus scrape (GET or HEAD), or ``None`` to
            serve none. It is answered here, before any inner layer, and is not itself
            recorded. Ignored when ``metrics`` is ``None``.
        skip_paths: exact paths that get no metrics, span or log line (health probes).
        request_id_header: the header carrying the request id.
        clock: the monotonic clock durations are measured with (seconds), for tests.

    Raises:
        ConfigurationError: an argument is invalid.

    Attributes:
        app: the application it wraps: it serves every request this layer passes on.
        handler: what serves the requests this layer measures; ``app`` unless a stack
            builder fused the inner layers into one call (see
            :mod:`meshware.inbound.asgi.fused`). Lifespan, websocket, skipped paths and the
            metrics path always go to ``app``.
    """

    __slots__ = ("_core", "_reads_bytes", "_reads_seen", "_rid_bytes", "app", "handler")

    def __init__(
        self,
        app: ASGIApp,
        *,
        workload: WorkloadInfo,
        metrics: MeshMetrics | None,
        tracer_provider: TracerProvider | None = None,
        propagator: TextMapPropagator | None = None,
        access_log: bool | AccessLog = True,
        metrics_path: str | None = "/metrics",
        skip_paths: Iterable[str] = DEFAULT_SKIP_PATHS,
        request_id_header: str = "x-request-id",
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.app = app
        self.handler: ASGIApp = app
        self._core = InboundTelemetry(
            workload=workload,
            metrics=metrics,
            tracer_provider=tracer_provider,
            propagator=propagator,
            access_log=access_log,
            metrics_path=metrics_path,
            skip_paths=skip_paths,
            request_id_header=request_id_header,
            clock=clock,
        )
        self._rid_bytes = self._core.request_id_header.encode("latin-1")
        self._reads_seen: frozenset[str] | None = None
        self._reads_bytes: frozenset[bytes] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        core = self._core
        path: str = scope["path"]
        if path in core.skip_paths:
            await self.app(scope, receive, send)
            return
        if path == core.metrics_path:
            await self._serve_metrics(scope, send)
            return

        start = core.clock()
        log = core.access_log
        wall_start = 0.0 if log is None else log.now()
        raw_headers = scope["headers"]
        # Names to values as the server gave them (a repeated name keeps its last value);
        # decoded only where a value is used.
        headers: dict[bytes, bytes] = dict(raw_headers)
        record = scope.get(RECORD_KEY) or record_of(scope)
        rid_name = self._rid_bytes
        received = headers.get(rid_name)
        request_id = None if received is None else received.decode("latin-1")
        if request_id is None or not valid_request_id(request_id):
            new_id = new_request_id()
            rid_pair = (rid_name, new_id.encode("latin-1"))
            # The app and its outbound calls see the id this layer logs.
            if request_id is None:
                scope["headers"] = [*raw_headers, rid_pair]
            else:
                scope["headers"] = [pair for pair in raw_headers if pair[0] != rid_name]
                scope["headers"].append(rid_pair)
            request_id = new_id
        else:
            rid_pair = (rid_name, request_id.encode("latin-1"))
        record.request_id = request_id

        method: str = scope["method"]
        spans = core.spans
        reads = self._reads(spans.reads)
        if reads is not None and reads.isdisjoint(headers):
            span, ctx = spans.start_root(method)  # no trace context to extract
        else:
            carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in raw_headers}
            span, ctx = spans.start(method, carrier, _DICT_GETTER)
        if span.is_recording():
            client = scope.get("client")
            core.spans.set_request_attributes(
                span,
                {
                    "http.request.method": method,
                    "url.scheme": scope.get("scheme", "http"),
                    "url.path": path,
                    "server.address": host_name(headers.get(b"host", b"").decode("latin-1")),
                    "user_agent.original": _text(headers.get(b"user-agent")),
                    "client.address": client[0] if client else None,
                    "network.protocol.version": scope.get("http_version"),
                },
            )

        grpc = headers.get(b"content-type", b"").startswith(b"application/grpc")
        status = 0
        bytes_out = 0
        grpc_status: str | None = None

        async def send_wrapper(message: Message) -> None:
            nonlocal status, bytes_out, grpc_status
            kind = message["type"]
            if kind == "http.response.body":
                bytes_out += len(message.get("body", b""))
            elif kind == "http.response.start":
                status = message["status"]
                response_headers = message.get("headers") or ()
                echoed = False
                for name, value in response_headers:
                    lowered = name.lower()
                    if lowered == rid_name:
                        echoed = True
                    elif grpc and lowered == b"grpc-status":
                        grpc_status = value.decode("latin-1")
                added = record.response_headers  # the fused path's rate-limit fields
                if not echoed:
                    message["headers"] = (
                        [*response_headers, *added, rid_pair]
                        if added
                        else [*response_headers, rid_pair]
                    )
                elif added:
                    message["headers"] = [*response_headers, *added]
            elif kind == "http.response.trailers" and grpc:
                for name, value in message.get("headers") or ():
                    if name.lower() == b"grpc-status":
                        grpc_status = value.decode("latin-1")
            await send(message)

        content_length = headers.get(b"content-length")
        counted = 0
        app_receive = receive
        if content_length is not None and content_length.isdigit():
            bytes_in = int(content_length)
        else:
            bytes_in = -1
            if b"transfer-encoding" in headers or scope.get("http_version", "1.1").startswith(
                ("2", "3")
            ):

                async def app_receive() -> Message:
                    nonlocal counted
                    message = await receive()
                    if message["type"] == "http.request":
                        counted += len(message.get("body", b""))
                    return message

        error: BaseException | None = None
        cancelled = False
        token = _attach(ctx)
        # Outbound calls made while serving the request propagate its id.
        rid_token = _set_request_id(request_id)
        try:
            await self.handler(scope, app_receive, send_wrapper)
        except Exception as exc:
            error = exc
            raise
        except BaseException:
            cancelled = True
            raise
        finally:
            _reset_request_id(rid_token)
            _detach(token)
            core.record(
                record,
                span,
                ctx,
                method,
                _scope_route(scope),
                _raw_path(scope),
                status,
                start,
                wall_start,
                counted if bytes_in < 0 else bytes_in,
                bytes_out,
                scope.get("scheme", "http"),
                scope.get("http_version", "1.1"),
                grpc,
                grpc_status,
                _text(headers.get(b"user-agent")),
                error,
                cancelled,
            )

    def _reads(self, reads: frozenset[str] | None) -> frozenset[bytes] | None:
        """The propagator's header names as ASGI spells them (kept for the set last seen)."""
        if reads is not self._reads_seen:
            self._reads_seen = reads
            self._reads_bytes = (
                None if reads is None else frozenset(name.encode("latin-1") for name in reads)
            )
        return self._reads_bytes

    async def _serve_metrics(self, scope: Scope, send: Send) -> None:
        method = scope["method"]
        if method not in ("GET", "HEAD"):
            await send(
                {
                    "type": "http.response.start",
                    "status": 405,
                    "headers": [(b"allow", b"GET, HEAD"), (b"content-length", b"0")],
                }
            )
            await send({"type": "http.response.body", "body": b""})
            return
        accept = None
        for name, value in scope["headers"]:
            if name == b"accept":
                accept = value.decode("latin-1")
                break
        metrics = self._core.metrics
        if metrics is None:  # metrics_path is None then; kept for the type checker
            return
        body, content_type = metrics.exposition(accept)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", content_type.encode("latin-1")),
                    (b"content-length", str(len(body)).encode("latin-1")),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body if method == "GET" else b""})
