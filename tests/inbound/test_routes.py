"""Route resolvers: Starlette/FastAPI and Flask routes found before the application runs."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Host, Mount, Route, Router, WebSocketRoute

from meshware.exceptions import ConfigurationError
from meshware.inbound.record import RequestRecord
from meshware.inbound.routes import (
    ROUTE_KEY,
    FlaskRoutes,
    RouteMatch,
    RouteResolver,
    StarletteRoutes,
    route_of_environ,
    route_of_scope,
)


async def users(request: Any) -> PlainTextResponse:
    return PlainTextResponse("users")


async def user(request: Any) -> PlainTextResponse:
    return PlainTextResponse("user")


async def item(request: Any) -> PlainTextResponse:
    return PlainTextResponse("item")


async def admin(request: Any) -> PlainTextResponse:
    return PlainTextResponse("admin")


async def socket(websocket: Any) -> None:
    await websocket.close()


async def static_files(scope: Any, receive: Any, send: Any) -> None:
    await PlainTextResponse("static")(scope, receive, send)


def starlette_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/users", users, methods=["GET"]),
            Route("/users/{id:int}", user, methods=["GET", "DELETE"]),
            Mount(
                "/api",
                routes=[
                    Mount("/v1", routes=[Route("/items/{name}", item, methods=["POST"])]),
                ],
            ),
            Mount("/static", app=static_files),
            Host("admin.example.com", app=Router(routes=[Route("/panel", admin)])),
            WebSocketRoute("/ws", socket),
        ]
    )


def http(path: str, method: str = "GET", **extra: Any) -> dict[str, Any]:
    scope: dict[str, Any] = {
        "type": "http",
        "method": method,
        "path": path,
        "root_path": "",
        "headers": [(b"host", b"orders")],
    }
    scope.update(extra)
    return scope


# -- Starlette -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "template", "handler"),
    [
        ("GET", "/users", "/users", users),
        ("GET", "/users/7", "/users/{id:int}", user),
        ("DELETE", "/users/7", "/users/{id:int}", user),
        ("POST", "/api/v1/items/book", "/api/v1/items/{name}", item),
        ("GET", "/static/css/site.css", "/static", static_files),
    ],
)
def test_starlette_routes(method: str, path: str, template: str, handler: object) -> None:
    resolver = StarletteRoutes(starlette_app())

    assert resolver.resolve_scope(http(path, method)) == RouteMatch(template, handler)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/nowhere"),
        ("GET", "/users/x"),  # the convertor does not match
        ("PUT", "/users/7"),  # Starlette answers 405: no handler runs
        ("GET", "/api/v1/items/book"),
        ("GET", "/api/v2/items/book"),  # the mount matches, nothing inside it does
        ("GET", "/panel"),  # a Host route for another host
    ],
)
def test_starlette_paths_no_handler_serves(method: str, path: str) -> None:
    assert StarletteRoutes(starlette_app()).resolve_scope(http(path, method)) is None


def test_starlette_host_routes_match_the_host_header() -> None:
    resolver = StarletteRoutes(starlette_app())
    scope = http("/panel", headers=[(b"host", b"admin.example.com")])

    assert resolver.resolve_scope(scope) == RouteMatch("/panel", admin)
    # The host is part of the cache key when the application has Host routes.
    assert resolver.resolve_scope(http("/panel")) is None


def test_starlette_websocket_route() -> None:
    scope = {"type": "websocket", "path": "/ws", "root_path": "", "headers": []}

    assert StarletteRoutes(starlette_app()).resolve_scope(scope) == RouteMatch("/ws", socket)


def test_starlette_root_path_is_honoured() -> None:
    # Servers that include root_path in path: Starlette routes on what follows it.
    scope = http("/orders/users/7", root_path="/orders")

    assert StarletteRoutes(starlette_app()).resolve_scope(scope) == RouteMatch(
        "/users/{id:int}", user
    )


def test_starlette_resolution_does_not_touch_the_scope() -> None:
    scope = http("/users/7")
    before = dict(scope)

    StarletteRoutes(starlette_app()).resolve_scope(scope)

    assert scope == before


def test_starlette_cache_is_bounded() -> None:
    resolver = StarletteRoutes(starlette_app(), cache_size=2)
    for n in range(50):
        resolver.resolve_scope(http(f"/users/{n}"))

    assert repr(resolver).endswith("cached=2)")
    assert resolver.resolve_scope(http("/users/3")) == RouteMatch("/users/{id:int}", user)


def test_starlette_cached_answers_are_the_same() -> None:
    resolver = StarletteRoutes(starlette_app())
    first = resolver.resolve_scope(http("/users/7"))

    assert resolver.resolve_scope(http("/users/7")) is first
    assert resolver.resolve_scope(http("/nowhere")) is None
    assert resolver.resolve_scope(http("/nowhere")) is None


def test_a_router_works_as_well() -> None:
    router = Router(routes=[Route("/a/{b}", users)])

    assert StarletteRoutes(router).resolve_scope(http("/a/1")) == RouteMatch("/a/{b}", users)


def test_starlette_resolver_answers_nothing_for_wsgi() -> None:
    assert StarletteRoutes(starlette_app()).resolve_environ({"PATH_INFO": "/users"}) is None


def test_fastapi_routes() -> None:
    fastapi = pytest.importorskip("fastapi")
    api = fastapi.FastAPI()

    @api.get("/orders/{order_id}")
    async def get_order(order_id: int) -> dict[str, int]:
        return {"id": order_id}

    sub = fastapi.APIRouter()

    @sub.post("/refunds")
    async def refund() -> None:
        return None

    deeper = fastapi.APIRouter()

    @deeper.get("/{refund_id}/status")
    async def refund_status(refund_id: str) -> None:
        return None

    sub.include_router(deeper, prefix="/refunds")
    api.include_router(sub, prefix="/payments")
    resolver = StarletteRoutes(api)

    assert resolver.resolve_scope(http("/orders/3")) == RouteMatch("/orders/{order_id}", get_order)
    assert resolver.resolve_scope(http("/payments/refunds", "POST")) == RouteMatch(
        "/payments/refunds", refund
    )
    assert resolver.resolve_scope(http("/payments/refunds/r-9/status")) == RouteMatch(
        "/payments/refunds/{refund_id}/status", refund_status
    )
    assert resolver.resolve_scope(http("/payments/refunds", "GET")) is None


@pytest.mark.parametrize("bad", [object(), Flask(__name__)])
def test_starlette_resolver_needs_routes(bad: object) -> None:
    with pytest.raises(ConfigurationError) as caught:
        StarletteRoutes(bad)

    assert caught.value.field == "routes"
    assert "an object with a list of routes" in str(caught.value)


def test_cache_size_must_be_positive() -> None:
    with pytest.raises(ConfigurationError) as caught:
        StarletteRoutes(starlette_app(), cache_size=0)

    assert (caught.value.field, caught.value.value) == ("cache_size", 0)


# -- Flask -----------------------------------------------------------------------------------


def flask_app(**options: Any) -> Flask:
    app = Flask(__name__, **options)

    @app.get("/users/<int:user_id>")
    def get_user(user_id: int) -> str:
        return "user"

    @app.route("/files/<path:name>", methods=["GET", "PUT"])
    def files(name: str) -> str:
        return "file"

    @app.get("/dir/")
    def directory() -> str:
        return "dir"

    return app


def wsgi(path: str, method: str = "GET", **extra: Any) -> dict[str, Any]:
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "SERVER_NAME": "orders",
        "SERVER_PORT": "80",
        "HTTP_HOST": "orders",
        "wsgi.url_scheme": "http",
    }
    environ.update(extra)
    return environ


def test_flask_routes() -> None:
    app = flask_app()
    resolver = FlaskRoutes(app)

    assert resolver.resolve_environ(wsgi("/users/7")) == RouteMatch(
        "/users/<int:user_id>", app.view_functions["get_user"]
    )
    assert resolver.resolve_environ(wsgi("/files/a/b.txt", "PUT")) == RouteMatch(
        "/files/<path:name>", app.view_functions["files"]
    )
    assert resolver.resolve_environ(wsgi("/app/users/7", SCRIPT_NAME="/app")) is None
    assert resolver.resolve_environ(wsgi("/users/7", SCRIPT_NAME="/app")) is not None


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/nowhere"),  # 404
        ("DELETE", "/users/7"),  # 405
        ("GET", "/users/x"),  # the convertor does not match
        ("GET", "/dir"),  # Flask redirects to /dir/
    ],
)
def test_flask_paths_no_handler_serves(method: str, path: str) -> None:
    assert FlaskRoutes(flask_app()).resolve_environ(wsgi(path, method)) is None


def test_flask_host_matching() -> None:
    app = Flask(__name__, host_matching=True, static_host="static.example.com")

    @app.get("/panel", host="admin.example.com")
    def panel() -> str:
        return "panel"

    resolver = FlaskRoutes(app)

    assert resolver.resolve_environ(wsgi("/panel", HTTP_HOST="admin.example.com")) == RouteMatch(
        "/panel", panel
    )
    assert resolver.resolve_environ(wsgi("/panel", HTTP_HOST="orders")) is None


def test_flask_cache_is_bounded() -> None:
    resolver = FlaskRoutes(flask_app(), cache_size=3)
    for n in range(20):
        assert resolver.resolve_environ(wsgi(f"/users/{n}")) is not None

    assert repr(resolver).endswith("cached=3)")


def test_flask_resolver_answers_nothing_for_asgi() -> None:
    assert FlaskRoutes(flask_app()).resolve_scope(http("/users/7")) is None


def test_flask_resolver_needs_a_flask_app() -> None:
    with pytest.raises(ConfigurationError) as caught:
        FlaskRoutes(starlette_app())

    assert caught.value.field == "routes"
    assert "expected a Flask application" in str(caught.value)


# -- shared per request -------------------------------------------------------------------------


def test_resolvers_satisfy_the_protocol() -> None:
    assert isinstance(StarletteRoutes(starlette_app()), RouteResolver)
    assert isinstance(FlaskRoutes(flask_app()), RouteResolver)


class CountingResolver:
    def __init__(self, match: RouteMatch | None) -> None:
        self.match = match
        self.calls = 0

    def resolve_scope(self, scope: Any) -> RouteMatch | None:
        self.calls += 1
        return self.match

    def resolve_environ(self, environ: Any) -> RouteMatch | None:
        self.calls += 1
        return self.match


def test_route_of_scope_resolves_once_and_notes_the_template() -> None:
    resolver = CountingResolver(RouteMatch("/users/{id}", user))
    scope = http("/users/1")
    record = RequestRecord()

    assert route_of_scope(scope, resolver, record) == RouteMatch("/users/{id}", user)
    assert route_of_scope(scope, resolver, record) == RouteMatch("/users/{id}", user)
    assert (resolver.calls, record.route, scope[ROUTE_KEY].template) == (
        1,
        "/users/{id}",
        "/users/{id}",
    )


def test_route_of_environ_remembers_a_miss_too() -> None:
    resolver = CountingResolver(None)
    environ = wsgi("/nowhere")
    record = RequestRecord()

    assert route_of_environ(environ, resolver, record) is None
    assert route_of_environ(environ, resolver, record) is None
    assert (resolver.calls, record.route) == (1, None)
