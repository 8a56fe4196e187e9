"""The rate-limit middleware through both shells: Starlette on ASGI, Flask on WSGI."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import httpx
import pytest
from flask import Flask, Response
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from meshware.exceptions import ConfigurationError
from meshware.inbound import asgi, wsgi
from meshware.inbound.record import RequestRecord, record_of
from meshware.inbound.routes import FlaskRoutes, StarletteRoutes
from meshware.policy.ratelimit import (
    RateLimiter,
    RateLimitMatch,
    RateLimitPolicy,
    RateLimitRule,
    rate_limit,
)

LIMITED = {"status": 429, "error": "too_many_requests", "detail": "rate limit exceeded"}
METHODS = ["GET", "POST"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# -- the applications ------------------------------------------------------------------------------


@rate_limit("1/minute", key="client_ip", name="export")
async def starlette_export(request: Request) -> PlainTextResponse:
    return PlainTextResponse("export", headers={"x-app": "yes"})


async def starlette_echo(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok", headers={"x-app": "yes"})


def starlette_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/export/{fmt}", starlette_export),
            Route("/{rest:path}", starlette_echo, methods=METHODS),
        ]
    )


def flask_app() -> Flask:
    app = Flask(__name__)

    @app.get("/export/<fmt>")
    @rate_limit("1/minute", key="client_ip", name="export")
    def export(fmt: str) -> Response:
        return Response("export", headers={"x-app": "yes"})

    @app.route("/", defaults={"rest": ""}, methods=METHODS)
    @app.route("/<path:rest>", methods=METHODS)
    def echo(rest: str) -> Response:
        return Response("ok", headers={"x-app": "yes"})

    return app


class Shell:
    """``server -> RateLimitMiddleware -> app`` of one kind, with a fake clock."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.module: Any = asgi if kind == "asgi" else wsgi
        self.clock = FakeClock()
        self.records: list[RequestRecord] = []
        self.middleware: Any = None

    def build(self, policy: RateLimitPolicy | None = None, *, routes: bool = False) -> Shell:
        resolver: Any = None
        if self.kind == "asgi":
            app: Any = starlette_app()
            if routes:
                resolver = StarletteRoutes(app)
        else:
            flask = flask_app()
            app = flask.wsgi_app
            if routes:
                resolver = FlaskRoutes(flask)
        limiter = RateLimiter(policy or RateLimitPolicy(), clock=self.clock)
        self.middleware = self.module.RateLimitMiddleware(app, limiter=limiter, routes=resolver)
        return self

    def server(self) -> Any:
        inner = self.middleware
        if self.kind == "asgi":

            async def asgi_server(scope: dict[str, Any], receive: Any, send: Any) -> None:
                self.records.append(record_of(scope))
                await inner(scope, receive, send)

            return asgi_server

        def wsgi_server(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
            self.records.append(record_of(environ))
            return inner(environ, start_response)  # type: ignore[no-any-return]

        return wsgi_server

    async def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        if self.kind == "asgi":
            transport = httpx.ASGITransport(app=self.server())
            async with httpx.AsyncClient(transport=transport, base_url="http://orders") as client:
                return await client.request(method, url, **kwargs)
        with httpx.Client(
            transport=httpx.WSGITransport(app=self.server()), base_url="http://orders"
        ) as sync_client:
            return sync_client.request(method, url, **kwargs)

    async def close(self) -> None:
        if self.kind == "asgi":
            await self.middleware.limiter.aclose()
        else:
            self.middleware.limiter.close()

    @property
    def record(self) -> RequestRecord:
        return self.records[-1]


@pytest.fixture(params=["asgi", "wsgi"])
def shell(request: pytest.FixtureRequest) -> Shell:
    return Shell(request.param)


def fields(response: httpx.Response) -> dict[str, str | None]:
    return {
        name: response.headers.get(name)
        for name in ("ratelimit-policy", "ratelimit", "retry-after", "x-app")
    }


PER_IP = RateLimitRule(name="per-ip", rate="3/minute", key="client_ip")


# -- limits -----------------------------------------------------------------------------------------


async def test_a_burst_is_limited_with_exact_headers(shell: Shell) -> None:
    shell.build(RateLimitPolicy(rules=[PER_IP]))

    allowed = [await shell.request("GET", "/api") for _ in range(3)]
    limited = await shell.request("GET", "/api")

    assert [r.status_code for r in allowed] == [200, 200, 200]
    assert [fields(r) for r in allowed] == [
        {
            "ratelimit-policy": '"per-ip";q=3;w=60',
            "ratelimit": f'"per-ip";r={left};t={reset}',
            "retry-after": None,
            "x-app": "yes",
        }
        for left, reset in ((2, 20), (1, 40), (0, 60))
    ]
    assert limited.status_code == 429
    assert limited.json() == LIMITED
    assert fields(limited) == {
        "ratelimit-policy": '"per-ip";q=3;w=60',
        "ratelimit": '"per-ip";r=0;t=60',
        "retry-after": "20",
        "x-app": None,
    }
    assert (shell.records[0].ratelimit, shell.records[0].ratelimit_rule) == ("allowed", "per-ip")
    assert (shell.record.ratelimit, shell.record.ratelimit_rule) == ("limited", "per-ip")


async def test_the_bucket_refills_with_time(shell: Shell) -> None:
    shell.build(RateLimitPolicy(rules=[PER_IP]))
    for _ in range(3):
        await shell.request("GET", "/api")

    shell.clock.advance(19.0)
    early = await shell.request("GET", "/api")
    shell.clock.advance(1.0)
    on_time = await shell.request("GET", "/api")

    assert (early.status_code, early.headers["retry-after"]) == (429, "1")
    assert (on_time.status_code, on_time.headers["ratelimit"]) == (200, '"per-ip";r=0;t=60')


async def test_legacy_header_fields(shell: Shell) -> None:
    shell.build(RateLimitPolicy(rules=[PER_IP], headers="ietf+legacy"))

    response = await shell.request("GET", "/api")

    assert (
        response.headers["x-ratelimit-limit"],
        response.headers["x-ratelimit-remaining"],
        response.headers["x-ratelimit-reset"],
    ) == ("3", "2", "20")


async def test_buckets_per_header_value(shell: Shell) -> None:
    per_key = RateLimitRule(name="per-key", rate="1/minute", key="header:x-api-key")
    shell.build(RateLimitPolicy(rules=[per_key]))

    first = await shell.request("GET", "/", headers={"x-api-key": "a"})
    again = await shell.request("GET", "/", headers={"x-api-key": "a"})
    other = await shell.request("GET", "/", headers={"X-Api-Key": "b"})

    assert [first.status_code, again.status_code, other.status_code] == [200, 429, 200]


async def test_a_rule_that_does_not_apply_adds_nothing(shell: Shell) -> None:
    writes = RateLimitRule(
        name="writes", rate="1/minute", key="client_ip", match=RateLimitMatch(methods=["POST"])
    )
    shell.build(RateLimitPolicy(rules=[writes]))

    reads = [await shell.request("GET", "/api") for _ in range(3)]

    assert [r.status_code for r in reads] == [200, 200, 200]
    assert fields(reads[0])["ratelimit"] is None
    assert (shell.record.ratelimit, shell.record.ratelimit_rule) == (None, None)


async def test_shadow_rules_count_but_never_limit(shell: Shell) -> None:
    trial = RateLimitRule(name="trial", rate="1/minute", key="client_ip", shadow=True)
    shell.build(RateLimitPolicy(rules=[trial]))

    first = await shell.request("GET", "/api")
    second = await shell.request("GET", "/api")

    assert (first.status_code, second.status_code) == (200, 200)
    assert fields(second)["ratelimit"] is None  # shadow rules never show in headers
    assert (shell.records[0].ratelimit, shell.records[0].ratelimit_rule) == (None, None)
    assert (shell.record.ratelimit, shell.record.ratelimit_rule) == ("shadow-limited", "trial")


# -- backend failures ------------------------------------------------------------------------------


async def test_fail_closed_answers_503(shell: Shell, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="meshware.ratelimit")
    shell.build(
        RateLimitPolicy(
            rules=[PER_IP], backend="redis://127.0.0.1:1/0?timeout=0.5", failure_mode="closed"
        )
    )
    try:
        response = await shell.request("GET", "/api")
    finally:
        await shell.close()

    assert response.status_code == 503
    assert response.json() == {
        "status": 503,
        "error": "service_unavailable",
        "detail": "rate limit backend unavailable",
    }
    assert fields(response)["ratelimit"] is None
    assert (shell.record.ratelimit, shell.record.ratelimit_rule) == ("backend-error", None)
    assert "failing closed" in caplog.text


async def test_fail_open_lets_the_request_through(shell: Shell) -> None:
    shell.build(RateLimitPolicy(rules=[PER_IP], backend="redis://127.0.0.1:1/0?timeout=0.5"))
    try:
        response = await shell.request("GET", "/api")
    finally:
        await shell.close()

    assert (response.status_code, response.text) == (200, "ok")
    assert fields(response)["ratelimit"] is None
    assert shell.record.ratelimit == "backend-error"


# -- per-route limits -------------------------------------------------------------------------------


async def test_per_route_decorator_limits(shell: Shell) -> None:
    shell.build(routes=True)

    first = await shell.request("GET", "/export/csv")
    second = await shell.request("GET", "/export/pdf")
    elsewhere = await shell.request("GET", "/api")

    assert fields(first) == {
        "ratelimit-policy": '"export";q=1;w=60',
        "ratelimit": '"export";r=0;t=60',
        "retry-after": None,
        "x-app": "yes",
    }
    assert (second.status_code, second.headers["retry-after"]) == (429, "60")
    assert (elsewhere.status_code, fields(elsewhere)["ratelimit"]) == (200, None)
    template = "/export/{fmt}" if shell.kind == "asgi" else "/export/<fmt>"
    assert (shell.records[1].route, shell.records[1].ratelimit_rule) == (template, "export")
    assert shell.records[2].ratelimit is None


async def test_route_and_service_rules_are_all_charged(shell: Shell) -> None:
    shell.build(RateLimitPolicy(rules=[PER_IP]), routes=True)

    export = await shell.request("GET", "/export/csv")
    api = await shell.request("GET", "/api")

    # The most restrictive rule is reported: export has nothing left.
    assert export.headers["ratelimit"] == '"export";r=0;t=60'
    # The per-ip bucket was charged by the export request too.
    assert api.headers["ratelimit"] == '"per-ip";r=1;t=40'


# -- arguments and ASGI specifics ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
@pytest.mark.parametrize(
    ("options", "field", "message"),
    [
        ({}, "policy", "expected a RateLimitPolicy, or a limiter"),
        (
            {"policy": RateLimitPolicy(), "limiter": RateLimiter(RateLimitPolicy())},
            "policy",
            "expected either a policy or a limiter, not both",
        ),
        ({"limiter": RateLimitPolicy()}, "limiter", "expected a RateLimiter"),
        ({"policy": RateLimitPolicy(), "routes": "app"}, "routes", "expected a RouteResolver"),
    ],
)
def test_bad_arguments(kind: str, options: dict[str, Any], field: str, message: str) -> None:
    module: Any = asgi if kind == "asgi" else wsgi

    with pytest.raises(ConfigurationError) as caught:
        module.RateLimitMiddleware(starlette_app(), **options)

    assert caught.value.field == field
    assert message in str(caught.value)


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_a_policy_builds_a_limiter(kind: str) -> None:
    module: Any = asgi if kind == "asgi" else wsgi
    policy = RateLimitPolicy(rules=[PER_IP])

    middleware = module.RateLimitMiddleware(starlette_app(), policy=policy)

    assert middleware.limiter.policy is policy


async def test_a_limited_websocket_is_closed() -> None:
    sent: list[dict[str, Any]] = []
    called: list[bool] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        called.append(True)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    once = RateLimitRule(name="once", rate="1/minute", key="client_ip")
    middleware = asgi.RateLimitMiddleware(app, policy=RateLimitPolicy(rules=[once]))
    for _ in range(2):
        scope = {"type": "websocket", "path": "/ws", "headers": [], "client": ("10.0.0.1", 1)}
        await middleware(scope, None, send)  # type: ignore[arg-type]

    assert called == [True]
    assert sent == [{"type": "websocket.close", "code": 1013}]


async def test_lifespan_passes_through() -> None:
    seen: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    middleware = asgi.RateLimitMiddleware(app, policy=RateLimitPolicy(rules=[PER_IP]))
    await middleware({"type": "lifespan"}, None, None)  # type: ignore[arg-type]

    assert seen == ["lifespan"]
