"""The three apps the inbound benchmark compares: the same Starlette endpoint, bare, under the
full meshware inbound stack, and under the usual hand-assembled peer stack."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

CALLER = "cluster.local/ns/default/sa/orders"
XFCC = f"x-forwarded-client-cert: URI=spiffe://{CALLER}"


async def item(request: Request) -> JSONResponse:
    return JSONResponse({"id": request.path_params["item_id"], "name": "widget", "stock": 3})


def _starlette() -> Starlette:
    return Starlette(routes=[Route("/api/items/{item_id}", item)])


bare = _starlette()


def _bundle() -> str:
    from meshware.identity.ca import LocalCA

    directory = os.environ.get("BENCH_CERT_DIR")
    if directory is None:
        directory = tempfile.mkdtemp(prefix="meshware-bench-")
        atexit.register(shutil.rmtree, directory, True)
    if not os.path.exists(os.path.join(directory, "bundle.pem")):
        LocalCA.init(directory)
    return os.path.join(directory, "bundle.pem")


def _meshware() -> Any:
    """As in production: XFCC identity from a trusted proxy, ten authz rules (the last one
    matches), a rate limit that never triggers, Istio metrics, 1% parent-based tracing, and the
    access log written to a file as Istio writes it (buffered, flushed every second)."""
    from meshware.inbound.asgi.stack import build_asgi_stack
    from meshware.inbound.routes import StarletteRoutes
    from meshware.inbound.stack import InboundConfig
    from meshware.policy.authz import AuthorizationPolicy, Operation, Rule, Source
    from meshware.policy.ratelimit import RateLimitPolicy, RateLimitRule
    from meshware.telemetry.access_log import AccessLog
    from meshware.telemetry.tracing import TracingConfig

    rules = [
        Rule(
            from_=[Source(principals=[f"cluster.local/ns/default/sa/svc{i}"])],
            to=[Operation(methods=["GET"], paths=[f"/api/other{i}/*"])],
        )
        for i in range(9)
    ]
    rules.append(
        Rule(from_=[Source(principals=[CALLER])], to=[Operation(methods=["GET"], paths=["/api/*"])])
    )
    app = _starlette()
    config = InboundConfig(
        service="catalog",
        bundle=_bundle(),
        trusted_proxies=("127.0.0.1/32",),
        policies=(AuthorizationPolicy(name="catalog-readers", action="ALLOW", rules=rules),),
        rate_limit=RateLimitPolicy(
            rules=(RateLimitRule(name="per-caller", rate="1000000/second", key="principal"),)
        ),
        tracing=TracingConfig(service_name="catalog", sampler_ratio=0.01, exporter="none"),
        # As Istio's accessLogFile: buffered lines straight to a file (here, nowhere).
        access_log=AccessLog(file=os.devnull),
        routes=StarletteRoutes(app),
    )
    return build_asgi_stack(app, config)


def _peer() -> Any:
    """OpenTelemetry ASGI instrumentation + prometheus-fastapi-instrumentator + slowapi."""
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    from prometheus_fastapi_instrumentator import Instrumentator
    from slowapi import Limiter
    from slowapi.middleware import SlowAPIMiddleware
    from slowapi.util import get_remote_address

    app = _starlette()
    app.state.limiter = Limiter(key_func=get_remote_address, default_limits=["1000000/second"])
    app.add_middleware(SlowAPIMiddleware)
    Instrumentator().instrument(app).expose(app)
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(0.01)))
    return OpenTelemetryMiddleware(app, tracer_provider=provider)


def _floor() -> Any:
    """The lower bound of any in-process stack: see ``bench.inbound_floor``."""
    from bench.inbound_floor import app

    return app


def __getattr__(name: str) -> Any:
    # Built on first access so that each server process builds only its own variant.
    builders = {"meshware": _meshware, "peer": _peer, "floor": _floor}
    if name in builders:
        value = builders[name]()
        globals()[name] = value
        return value
    raise AttributeError(name)
