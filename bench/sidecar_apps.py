"""The services of the sidecar comparison: a client service A (``orders``) that answers
``GET /call`` by making one call to a server service B (``catalog``), which answers
``GET /data`` with a small JSON body.

Each setup of :mod:`bench.sidecar` serves one server and one client from here:

==========  ===============================  ==============================================
setup       B (the server)                   A's call to B
==========  ===============================  ==============================================
plain       ``server_bare`` on uvicorn        ``client_plain``: httpx, plaintext to B
meshware    ``server_meshware`` under         ``client_meshware``: meshware's mesh client
            ``meshware serve`` (STRICT mTLS)  (mTLS with A's certificate, retries, metrics,
                                              tracing)
haproxy     ``server_bare`` on uvicorn,       ``client_plain`` to A's HAProxy, which
            behind its HAProxy (mTLS)         originates mTLS to B's HAProxy
peer        ``server_peer`` on uvicorn with   ``client_peer``: httpx over mTLS, OpenTelemetry
            uvicorn's own mTLS options        httpx instrumentation, tenacity retries, a
                                              purgatory circuit breaker, prometheus-client
==========  ===============================  ==============================================

The processes are configured by environment variables, read when an app is first built:
``BENCH_CERT_DIR`` (the LocalCA directory holding ``orders``' and ``catalog``'s certificates),
``BENCH_UPSTREAM`` (the URL the plain and peer clients call) and, for the mesh client,
``MESHWARE_SERVICE_CATALOG`` (``host:port`` of B, read by meshware's ``EnvResolver``).

Every client keeps one connection pool for the life of the process (httpx's defaults: at most
100 connections, 20 kept alive), so calls reuse kept-alive connections in every setup.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

CLIENT = "orders"
SERVER = "catalog"
CLIENT_PRINCIPAL = f"cluster.local/ns/default/sa/{CLIENT}"
DATA = {"id": 1, "name": "widget", "stock": 3}
TRACE_RATIO = 0.01
RETRY_ATTEMPTS = 2  # retries after the first try: Istio's default
TIMEOUT = 10.0

Caller = Callable[[], Awaitable[httpx.Response]]


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise RuntimeError(f"{name} is not set (bench.sidecar sets it for each process)")
    return value


def _service_files(service: str) -> tuple[str, str, str]:
    from meshware.identity.ca import ServicePaths

    paths = ServicePaths.under(_env("BENCH_CERT_DIR"), service, "default")
    return str(paths.cert), str(paths.key), str(paths.bundle)


# --- B, the server --------------------------------------------------------------------------


async def data(request: Request) -> JSONResponse:
    """B's endpoint: ``GET /data``, a small JSON body."""
    return JSONResponse(DATA)


def _server_app() -> Starlette:
    return Starlette(routes=[Route("/data", data)])


def _server_bare() -> Starlette:
    return _server_app()


def _server_meshware() -> Any:
    """B's mesh stack as ``meshware serve`` serves it: identity from the mTLS peer certificate,
    an authorization policy allowing A, Istio metrics, 1% tracing and the access log."""
    from meshware.inbound.asgi.stack import build_asgi_stack
    from meshware.inbound.routes import StarletteRoutes
    from meshware.inbound.stack import InboundConfig
    from meshware.policy.authz import AuthorizationPolicy, Operation, Rule, Source
    from meshware.telemetry.access_log import AccessLog
    from meshware.telemetry.tracing import TracingConfig

    app = _server_app()
    allow = AuthorizationPolicy(
        name="catalog-callers",
        action="ALLOW",
        rules=[
            Rule(
                from_=[Source(principals=[CLIENT_PRINCIPAL])],
                to=[Operation(methods=["GET"], paths=["/data", "/metrics"])],
            )
        ],
    )
    config = InboundConfig(
        service=SERVER,
        bundle=_service_files(SERVER)[2],
        policies=[allow],
        tracing=TracingConfig(service_name=SERVER, sampler_ratio=TRACE_RATIO, exporter="none"),
        # Istio's default: accessLogFile /dev/stdout, buffered.
        access_log=AccessLog(file="/dev/stdout"),
        routes=StarletteRoutes(app),
    )
    return build_asgi_stack(app, config)


def _server_peer() -> Any:
    """B with the usual hand-assembled peer stack: OpenTelemetry's ASGI middleware (1%),
    prometheus-fastapi-instrumentator and slowapi (a limit that never triggers)."""
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    from prometheus_fastapi_instrumentator import Instrumentator
    from slowapi import Limiter
    from slowapi.middleware import SlowAPIMiddleware
    from slowapi.util import get_remote_address

    app = _server_app()
    app.state.limiter = Limiter(key_func=get_remote_address, default_limits=["1000000/second"])
    app.add_middleware(SlowAPIMiddleware)
    Instrumentator().instrument(app).expose(app)
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(TRACE_RATIO)))
    return OpenTelemetryMiddleware(app, tracer_provider=provider)


# --- A, the client ----------------------------------------------------------------------------


async def call(request: Request) -> Response:
    """A's endpoint: ``GET /call`` calls B once and answers with B's answer (``502`` with the
    error when the call failed)."""
    caller: Caller = request.app.state.caller
    try:
        upstream = await caller()
    except httpx.HTTPError as exc:
        body = {"error": type(exc).__name__, "detail": str(exc)}
        return JSONResponse(body, status_code=502)
    return Response(upstream.content, upstream.status_code, media_type="application/json")


async def stats(request: Request) -> Response:
    """A's ``GET /stats``: the client-side metrics of its calls, in Prometheus' text format."""
    render: Callable[[], bytes] = request.app.state.stats
    return Response(render(), media_type="text/plain; version=0.0.4")


def _client_app(make: Callable[[], tuple[Caller, Callable[[], Awaitable[None]]]]) -> Starlette:
    """A's app: ``GET /call`` calls B once through the caller ``make`` builds at start-up (in
    the server's event loop); ``GET /stats`` renders the client's own metrics, if any."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        caller, close = make()
        app.state.caller = caller
        try:
            yield
        finally:
            await close()

    app = Starlette(routes=[Route("/call", call), Route("/stats", stats)], lifespan=lifespan)
    app.state.stats = lambda: b""
    return app


def _client_plain() -> Starlette:
    """A calling ``BENCH_UPSTREAM`` with a plain ``httpx.AsyncClient``: B itself in the plain
    setup, A's outbound HAProxy in the HAProxy setup."""
    url = _env("BENCH_UPSTREAM")

    def make() -> tuple[Caller, Callable[[], Awaitable[None]]]:
        client = httpx.AsyncClient(timeout=TIMEOUT)

        async def caller() -> httpx.Response:
            return await client.get(url)

        return caller, client.aclose

    return _client_app(make)


def _client_meshware() -> Starlette:
    """A calling ``http://catalog/data`` through meshware's mesh client: mTLS with A's own
    certificate (B's SPIFFE id checked), retries, the circuit breaker, Istio client metrics
    and 1% tracing."""
    from meshware.outbound.client import OutboundConfig, mesh_client
    from meshware.outbound.retry import RetryPolicy
    from meshware.telemetry.metrics import MeshMetrics
    from meshware.telemetry.tracing import TracingConfig, configure_tracing

    metrics = MeshMetrics()
    config = OutboundConfig(
        service=CLIENT,
        cert_dir=_env("BENCH_CERT_DIR"),
        retry=RetryPolicy(attempts=RETRY_ATTEMPTS),
        metrics=metrics,
        tracer_provider=configure_tracing(
            TracingConfig(service_name=CLIENT, sampler_ratio=TRACE_RATIO, exporter="none")
        ),
        timeout=TIMEOUT,
    )
    url = f"http://{SERVER}/data"

    def make() -> tuple[Caller, Callable[[], Awaitable[None]]]:
        client = mesh_client(config)

        async def caller() -> httpx.Response:
            return await client.get(url)

        return caller, client.aclose

    app = _client_app(make)
    app.state.stats = lambda: metrics.exposition()[0]
    return app


class _Retryable(Exception):
    """A ``503`` answer, raised so that tenacity retries it and the breaker counts it."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"{response.status_code} from {response.request.url}")
        self.response = response


def _client_peer() -> Starlette:
    """A calling ``BENCH_UPSTREAM`` (https) as a team would hand-assemble it from peer
    libraries: httpx over mTLS with A's certificate, OpenTelemetry's httpx instrumentation
    (1%), tenacity retries (2 after the first try, jittered exponential backoff), a purgatory
    circuit breaker (5 failures, 30 s) and prometheus-client metrics of each call."""
    import ssl
    import time

    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
    from purgatory import AsyncCircuitBreakerFactory
    from tenacity import (
        retry,
        retry_if_exception_type,
        stop_after_attempt,
        wait_exponential_jitter,
    )

    url = _env("BENCH_UPSTREAM")
    cert, key, bundle = _service_files(CLIENT)
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(TRACE_RATIO)))
    registry = CollectorRegistry()
    requests = Counter(
        "client_requests", "Calls to other services.", ["destination", "code"], registry=registry
    )
    duration = Histogram(
        "client_request_duration_seconds",
        "Duration of calls to other services.",
        ["destination"],
        registry=registry,
    )

    def make() -> tuple[Caller, Callable[[], Awaitable[None]]]:
        context = ssl.create_default_context(cafile=bundle)
        context.load_cert_chain(cert, key)
        client = httpx.AsyncClient(verify=context, timeout=TIMEOUT)
        HTTPXClientInstrumentor.instrument_client(client, tracer_provider=provider)
        breakers = AsyncCircuitBreakerFactory(default_threshold=5, default_ttl=30)

        @retry(
            stop=stop_after_attempt(RETRY_ATTEMPTS + 1),
            wait=wait_exponential_jitter(initial=0.025, max=0.25),
            retry=retry_if_exception_type((httpx.TransportError, _Retryable)),
            reraise=True,
        )
        async def attempt() -> httpx.Response:
            async with await breakers.get_breaker(SERVER):
                response = await client.get(url)
                if response.status_code == 503:
                    raise _Retryable(response)
                return response

        async def caller() -> httpx.Response:
            start = time.perf_counter()
            try:
                response = await attempt()
            except _Retryable as exc:
                response = exc.response
            duration.labels(SERVER).observe(time.perf_counter() - start)
            requests.labels(SERVER, str(response.status_code)).inc()
            return response

        return caller, client.aclose

    app = _client_app(make)
    app.state.stats = lambda: generate_latest(registry)
    return app


_BUILDERS: dict[str, Callable[[], Any]] = {
    "server_bare": _server_bare,
    "server_meshware": _server_meshware,
    "server_peer": _server_peer,
    "client_plain": _client_plain,
    "client_meshware": _client_meshware,
    "client_peer": _client_peer,
}


def __getattr__(name: str) -> Any:
    # Built on first access, so that each server process builds (and imports) only its own.
    if name in _BUILDERS:
        value = _BUILDERS[name]()
        globals()[name] = value
        return value
    raise AttributeError(name)


def cert_dir_files(cert_dir: Path, service: str) -> tuple[Path, Path, Path]:
    """The certificate, key and bundle of ``service`` under ``cert_dir`` (for the harness)."""
    from meshware.identity.ca import ServicePaths

    paths = ServicePaths.under(cert_dir, service, "default")
    return paths.cert, paths.key, paths.bundle
