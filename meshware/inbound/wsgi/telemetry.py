"""The outermost inbound layer for WSGI apps: the twin of ``meshware.inbound.asgi.telemetry``.

Same name, arguments and behaviour as the ASGI ``TelemetryMiddleware``. The response iterable is
wrapped so that its bytes are counted and the request is recorded when the server closes it:
a streaming response is timed to its last chunk.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote

from opentelemetry import context as otel_context
from opentelemetry.propagators.textmap import Getter

from meshware.inbound.asgi.telemetry import (
    DEFAULT_SKIP_PATHS,
    InboundTelemetry,
    host_name,
    new_request_id,
    valid_request_id,
)
from meshware.inbound.record import RequestRecord, record_of
from meshware.telemetry.context import reset_request_id, set_request_id

if TYPE_CHECKING:
    from types import TracebackType

    from opentelemetry.context import Context
    from opentelemetry.propagators.textmap import TextMapPropagator
    from opentelemetry.trace import Span, TracerProvider

    from meshware.telemetry.access_log import AccessLog
    from meshware.telemetry.metrics import MeshMetrics, WorkloadInfo
    from meshware.types import Environ, StartResponse, WSGIApp

__all__ = ["TelemetryMiddleware"]

ExcInfo = tuple[type[BaseException], BaseException, "TracebackType | None"]

_PATH_SAFE: Final = "/:@!$&'()*+,;=-._~"
_attach = otel_context.attach
_detach = otel_context.detach


def _environ_key(header: str) -> str:
    return "HTTP_" + header.upper().replace("-", "_")


class _EnvironGetter(Getter[Mapping[str, Any]]):
    """Reads propagation headers (lower-case names) from a WSGI environ."""

    __slots__ = ("_keys",)

    def __init__(self) -> None:
        self._keys: dict[str, str] = {}

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        env_key = self._keys.get(key)
        if env_key is None:
            env_key = self._keys[key] = _environ_key(key)
        value = carrier.get(env_key)
        return None if value is None else [value]

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return [k[5:].lower().replace("_", "-") for k in carrier if k.startswith("HTTP_")]


_ENVIRON_GETTER: Final = _EnvironGetter()


def _raw_path(environ: Environ) -> str:
    # gunicorn's RAW_URI / uWSGI's REQUEST_URI keep the path as received.
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if isinstance(raw, str) and raw:
        return str(raw.split("?", 1)[0])
    # Otherwise re-encode the decoded path (PEP 3333: bytes decoded as latin-1) the way a
    # client sends it, so both shells log "/a%20b" alike.
    path = str(environ.get("SCRIPT_NAME", "")) + str(environ.get("PATH_INFO", ""))
    try:
        return quote(path.encode("latin-1"), safe=_PATH_SAFE)
    except UnicodeEncodeError:
        return quote(path, safe=_PATH_SAFE)


class _CountingInput:
    """Wraps ``wsgi.input`` of a body without ``Content-Length`` to count what the app reads."""

    __slots__ = ("_stream", "count")

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data: bytes = self._stream.read(size) if size != -1 else self._stream.read()
        self.count += len(data)
        return data

    def readline(self, size: int = -1) -> bytes:
        data: bytes = self._stream.readline(size) if size != -1 else self._stream.readline()
        self.count += len(data)
        return data

    def readlines(self, hint: int = -1) -> list[bytes]:
        return list(iter(self.readline, b""))

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.readline, b"")


class _Exchange:
    """One request's mutable state, shared by start_response and the response iterable."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "context",
        "counting",
        "finished",
        "grpc",
        "grpc_status",
        "method",
        "record",
        "request_id",
        "span",
        "start",
        "status",
        "wall_start",
    )

    def __init__(
        self,
        record: RequestRecord,
        span: Span,
        context: Context,
        method: str,
        start: float,
        wall_start: float,
    ) -> None:
        self.record = record
        self.span = span
        self.context = context
        self.method = method
        self.start = start
        self.wall_start = wall_start
        self.status = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.counting: _CountingInput | None = None
        self.grpc = False
        self.grpc_status: str | None = None
        self.request_id = ""
        self.finished = False


class _ResponseBody:
    """The app's response iterable, counted, run in the request's trace context, and recorded
    when the server closes it."""

    __slots__ = ("_environ", "_exchange", "_inner", "_middleware")

    def __init__(
        self,
        inner: Iterable[bytes],
        exchange: _Exchange,
        middleware: TelemetryMiddleware,
        environ: Environ,
    ) -> None:
        self._inner = inner
        self._exchange = exchange
        self._middleware = middleware
        self._environ = environ

    def __iter__(self) -> Iterator[bytes]:
        exchange = self._exchange
        ctx = exchange.context
        iterator = iter(self._inner)
        while True:
            # Attach around each step only: a generator must not yield while attached.
            token = _attach(ctx)
            rid_token = set_request_id(exchange.request_id)
            try:
                chunk = next(iterator)
            except StopIteration:
                return
            except Exception as exc:
                self._middleware._finish(self._environ, exchange, exc, False)
                raise
            finally:
                reset_request_id(rid_token)
                _detach(token)
            exchange.bytes_out += len(chunk)
            yield chunk

    def close(self) -> None:
        try:
            close = getattr(self._inner, "close", None)
            if close is not None:
                close()
        finally:
            self._middleware._finish(self._environ, self._exchange, None, False)


class TelemetryMiddleware:
    """WSGI telemetry: metrics, a server span and an access log line per request.

    The WSGI twin of :class:`meshware.inbound.asgi.telemetry.TelemetryMiddleware`, with the
    same arguments and behaviour; see there. Request bytes come from ``CONTENT_LENGTH``; for a
    body without one (chunked), the bytes the app reads from ``wsgi.input`` are counted. The
    request is recorded when the server calls ``close()`` on the response, so a streaming
    response is timed to its end; an exception from the app is recorded as a 500 (when no
    response had started) and re-raised.

    Args:
        app: the WSGI application to wrap.
        workload: this service's identity and labels.
        metrics: the process's ``MeshMetrics``, or ``None`` for no metrics and no endpoint.
        tracer_provider: the OpenTelemetry tracer provider; ``None`` uses the global one.
        propagator: the propagator that reads the caller's trace context; ``None`` uses the
            global one.
        access_log: ``True``, ``False`` or a configured ``AccessLog``.
        metrics_path: the path that serves the Prometheus scrape, or ``None``.
        skip_paths: exact paths (``PATH_INFO``) that get no metrics, span or log line.
        request_id_header: the header carrying the request id.
        clock: the monotonic clock durations are measured with (seconds), for tests.

    Raises:
        ConfigurationError: an argument is invalid.
    """

    __slots__ = ("_core", "_rid_environ_key", "app")

    def __init__(
        self,
        app: WSGIApp,
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
        self._rid_environ_key = _environ_key(self._core.request_id_header)

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        core = self._core
        path: str = environ.get("PATH_INFO", "")
        if path in core.skip_paths:
            return self.app(environ, start_response)
        if path == core.metrics_path:
            return self._serve_metrics(environ, start_response)

        start = core.clock()
        log = core.access_log
        wall_start = 0.0 if log is None else log.now()
        record = record_of(environ)
        request_id = environ.get(self._rid_environ_key)
        if not isinstance(request_id, str) or not valid_request_id(request_id):
            request_id = new_request_id()
            environ[self._rid_environ_key] = request_id
        record.request_id = request_id

        method: str = environ.get("REQUEST_METHOD", "GET")
        span, ctx = core.spans.start(method, environ, _ENVIRON_GETTER)
        if span.is_recording():
            core.spans.set_request_attributes(
                span,
                {
                    "http.request.method": method,
                    "url.scheme": environ.get("wsgi.url_scheme", "http"),
                    "url.path": path,
                    "server.address": host_name(environ.get("HTTP_HOST", "")),
                    "user_agent.original": environ.get("HTTP_USER_AGENT"),
                    "client.address": environ.get("REMOTE_ADDR"),
                    "network.protocol.version": _http_version(environ),
                },
            )
        exchange = _Exchange(record, span, ctx, method, start, wall_start)
        exchange.request_id = request_id
        exchange.grpc = environ.get("CONTENT_TYPE", "").startswith("application/grpc")
        content_length = environ.get("CONTENT_LENGTH")
        # isascii() first: str.isdigit() also accepts digits int() refuses ("²").
        if content_length and content_length.isascii() and content_length.isdigit():
            exchange.bytes_in = int(content_length)
        elif "HTTP_TRANSFER_ENCODING" in environ or environ.get("wsgi.input_terminated"):
            stream = environ.get("wsgi.input")
            if stream is not None:
                exchange.counting = environ["wsgi.input"] = _CountingInput(stream)

        rid_name = core.request_id_header

        def wrapped_start_response(
            status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
        ) -> Callable[[bytes], object]:
            code = status[:3]
            exchange.status = int(code) if code.isascii() and code.isdigit() else 0
            echoed = False
            for name, value in headers:
                lowered = name.lower()
                if lowered == rid_name:
                    echoed = True
                elif exchange.grpc and lowered == "grpc-status":
                    exchange.grpc_status = value
            if not echoed:
                headers = [*headers, (rid_name, exchange.request_id)]
            write = (
                start_response(status, headers, exc_info)
                if exc_info
                else start_response(status, headers)
            )

            def counted_write(data: bytes) -> object:
                exchange.bytes_out += len(data)
                return write(data)

            return counted_write

        token = _attach(ctx)
        # Outbound calls made while serving the request propagate its id.
        rid_token = set_request_id(request_id)
        try:
            body = self.app(environ, wrapped_start_response)
        except Exception as exc:
            self._finish(environ, exchange, exc, False)
            raise
        except BaseException:
            self._finish(environ, exchange, None, True)
            raise
        finally:
            reset_request_id(rid_token)
            _detach(token)
        return _ResponseBody(body, exchange, self, environ)

    def _finish(
        self, environ: Environ, exchange: _Exchange, error: BaseException | None, cancelled: bool
    ) -> None:
        if exchange.finished:
            return
        exchange.finished = True
        counting = exchange.counting
        self._core.finish(
            record=exchange.record,
            span=exchange.span,
            context=exchange.context,
            method=exchange.method,
            route=None,
            path=_raw_path(environ),
            status=exchange.status,
            start=exchange.start,
            wall_start=exchange.wall_start,
            bytes_in=exchange.bytes_in if counting is None else counting.count,
            bytes_out=exchange.bytes_out,
            scheme=environ.get("wsgi.url_scheme", "http"),
            http_version=_http_version(environ),
            grpc=exchange.grpc,
            grpc_status=exchange.grpc_status,
            user_agent=environ.get("HTTP_USER_AGENT"),
            error=error,
            cancelled=cancelled,
        )

    def _serve_metrics(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            start_response(
                "405 Method Not Allowed", [("Allow", "GET, HEAD"), ("Content-Length", "0")]
            )
            return [b""]
        metrics = self._core.metrics
        if metrics is None:  # metrics_path is None then; kept for the type checker
            return []
        body, content_type = metrics.exposition(environ.get("HTTP_ACCEPT"))
        start_response(
            "200 OK", [("Content-Type", content_type), ("Content-Length", str(len(body)))]
        )
        return [body if method == "GET" else b""]


def _http_version(environ: Environ) -> str:
    protocol = environ.get("SERVER_PROTOCOL", "HTTP/1.1")
    return protocol[5:] if isinstance(protocol, str) and protocol.startswith("HTTP/") else "1.1"
