"""Which route, and which handler, will serve a request: asked before the application runs.

Per-route declarations (:func:`~meshware.policy.authz.authorize`,
:func:`~meshware.policy.ratelimit.rate_limit`) ride on handler functions, so the inbound layers
must know the handler of a request before the framework calls it. A :class:`RouteResolver`
answers that with the framework's own matching rules; :class:`StarletteRoutes` (Starlette and
FastAPI) and :class:`FlaskRoutes` (Flask) are provided. The framework imports are lazy: each
resolver imports its framework when it is built.

The layer that resolves a request's route writes the template to ``RequestRecord.route``, so
that metrics and the access log are labelled with ``/users/{id}`` rather than ``/users/7``.
"""

from __future__ import annotations

import contextlib
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any, Final, Protocol, runtime_checkable

from meshware.exceptions import ConfigurationError
from meshware.inbound.record import RequestRecord

__all__ = [
    "DEFAULT_CACHE_SIZE",
    "ROUTE_KEY",
    "FlaskRoutes",
    "RouteMatch",
    "RouteResolver",
    "StarletteRoutes",
    "route_of_environ",
    "route_of_scope",
]

ROUTE_KEY: Final = "meshware.route"
"""Scope / environ key under which the first layer that resolved the route leaves the
:class:`RouteMatch` (or ``None``) for the layers after it."""

DEFAULT_CACHE_SIZE: Final = 4096
"""How many (method, path) resolutions a resolver remembers by default."""


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """The route that serves a request.

    Attributes:
        template: the route's path template as the framework spells it, with mount prefixes
            joined in: ``"/api/users/{id}"`` (Starlette), ``"/users/<int:id>"`` (Flask).
        handler: the endpoint the framework will call; per-route declarations are read from it.
    """

    template: str
    handler: object


@runtime_checkable
class RouteResolver(Protocol):
    """Finds the route of a request with the framework's own matching rules.

    Implementations must be cheap on repeated paths (cache) and safe to share between the
    layers of a stack and between threads. A resolver for an ASGI framework answers ``None``
    from :meth:`resolve_environ`, and the other way round.
    """

    def resolve_scope(self, scope: MutableMapping[str, Any]) -> RouteMatch | None:
        """The route of an ASGI request, or ``None`` when no route would handle it."""
        ...

    def resolve_environ(self, environ: MutableMapping[str, Any]) -> RouteMatch | None:
        """The route of a WSGI request, or ``None`` when no route would handle it."""
        ...


class _Cache:
    """A bounded dict: paths are chosen by clients, so the memory they may take is capped."""

    __slots__ = ("_size", "data")

    def __init__(self, size: int) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigurationError("expected a positive integer", field="cache_size", value=size)
        self._size = size
        self.data: dict[tuple[Any, ...], RouteMatch | None] = {}

    def put(self, key: tuple[Any, ...], value: RouteMatch | None) -> None:
        data = self.data
        if len(data) >= self._size:
            # Oldest first: dicts keep insertion order. Races between threads only cost a
            # second resolution, never a wrong answer.
            with contextlib.suppress(StopIteration, KeyError, RuntimeError):
                del data[next(iter(data))]
        data[key] = value

    def __len__(self) -> int:
        return len(self.data)


class StarletteRoutes:
    """Resolves routes of a Starlette or FastAPI application (or any Starlette ``Router``).

    Walks ``app.routes`` as Starlette's router does, with each route's own
    ``route.matches(scope)``: the first route that fully matches wins, and a ``Mount`` (or
    ``Host``) with routes of its own is searched recursively, its path prefix joined to the
    template; FastAPI's included routers are searched the same way. A mounted application
    without routes (a static-files app, a sub-app of another framework) is the handler
    itself, with the mount's path as the template. A request that matches only a route of
    another method (Starlette answers 405) resolves to ``None``.

    Results are cached per (scope type, method, root path, path), plus the ``Host`` header
    when the application has ``Host`` routes, in a cache of at most ``cache_size`` entries.
    Routes added to the application after the first request to a path may be missed for that
    path; build the resolver once the routes are declared.

    Args:
        app: the application or router: any object with a ``routes`` list.
        cache_size: the most resolutions remembered.

    Raises:
        ConfigurationError: ``app`` has no ``routes`` or ``cache_size`` is not positive.
    """

    __slots__ = ("_by_host", "_cache", "_full", "_host", "_mount", "app")

    def __init__(self, app: Any, *, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        from starlette.routing import Host, Match, Mount

        if not isinstance(getattr(app, "routes", None), list):
            raise ConfigurationError(
                "expected a Starlette or FastAPI application, or a Router: an object with a "
                "list of routes",
                field="routes",
                value=app,
            )
        self.app = app
        self._cache = _Cache(cache_size)
        self._full = Match.FULL
        self._mount = Mount
        self._host = Host
        self._by_host = self._has_host_routes(app.routes)

    def _has_host_routes(self, routes: list[Any]) -> bool:
        for route in routes:
            if isinstance(route, self._host):
                return True
            if isinstance(route, self._mount) and self._has_host_routes(route.routes):
                return True
        return False

    def resolve_scope(self, scope: MutableMapping[str, Any]) -> RouteMatch | None:
        """The route of an ASGI ``http`` or ``websocket`` request, or ``None``."""
        kind = scope["type"]
        method = scope.get("method", "GET")
        root_path = scope.get("root_path", "")
        path = scope["path"]
        host = None
        if self._by_host:
            for name, value in scope.get("headers") or ():
                if name == b"host":
                    host = value
                    break
        key = (kind, method, root_path, path, host)
        try:
            return self._cache.data[key]
        except KeyError:
            pass
        probe: dict[str, Any] = {
            "type": kind,
            "method": method,
            "root_path": root_path,
            "path": path,
            "headers": scope.get("headers") or [],
            "path_params": {},
        }
        match = self._search(self.app.routes, probe, "")
        self._cache.put(key, match)
        return match

    def resolve_environ(self, environ: MutableMapping[str, Any]) -> RouteMatch | None:
        """Always ``None``: Starlette applications are ASGI applications."""
        return None

    def _search(self, routes: list[Any], scope: dict[str, Any], prefix: str) -> RouteMatch | None:
        for route in routes:
            match, child = route.matches(scope)
            if match is not self._full:
                continue
            if isinstance(route, (self._mount, self._host)):
                mount_path = getattr(route, "path", "") if isinstance(route, self._mount) else ""
                inner = route.routes
                if not inner:
                    return RouteMatch(prefix + mount_path, route.app)
                return self._search(inner, {**scope, **child}, prefix + mount_path)
            candidates = getattr(route, "effective_candidates", None)
            if callable(candidates):
                return self._search_included(candidates(), {**scope, **child}, prefix)
            template = getattr(route, "path", None)
            if not isinstance(template, str):
                return None
            return RouteMatch(prefix + template, child.get("endpoint", route))
        return None

    def _search_included(
        self, candidates: list[Any], scope: dict[str, Any], prefix: str
    ) -> RouteMatch | None:
        # FastAPI keeps an included APIRouter as one route whose candidates carry the prefixed
        # paths: nested included routers, copies of Starlette routes, or API route contexts.
        for candidate in candidates:
            nested = getattr(candidate, "effective_candidates", None)
            copy = getattr(candidate, "starlette_route", None)
            if callable(nested):
                match, child = candidate.matches(scope)
                if match is self._full:
                    return self._search_included(nested(), {**scope, **child}, prefix)
            elif copy is not None:
                match, _ = copy.matches(scope)
                if match is self._full:
                    return self._search([copy], scope, prefix)
            else:
                match, child = candidate.matches(scope)
                if match is self._full:
                    path = getattr(candidate, "path", None)
                    endpoint = child.get("endpoint") or getattr(candidate, "endpoint", None)
                    if not isinstance(path, str) or endpoint is None:
                        return None
                    return RouteMatch(prefix + path, endpoint)
        return None

    def __repr__(self) -> str:
        return f"StarletteRoutes({self.app!r}, cached={len(self._cache)})"


class FlaskRoutes:
    """Resolves routes of a Flask application with werkzeug's URL map.

    Binds ``app.url_map`` to the environ as Flask does (``SERVER_NAME``, host and subdomain
    matching included) and matches it: the template is the rule (``"/users/<int:id>"``) and
    the handler ``app.view_functions[rule.endpoint]``. A request that Flask would answer
    with 404, 405 or a redirect resolves to ``None``.

    Results are cached per (method, script name, path), plus the host when the URL map
    matches hosts or subdomains, in a cache of at most ``cache_size`` entries.

    Args:
        app: the Flask application.
        cache_size: the most resolutions remembered.

    Raises:
        ConfigurationError: ``app`` is not a Flask application or ``cache_size`` is not
            positive.
    """

    __slots__ = ("_by_host", "_cache", "_errors", "app")

    def __init__(self, app: Any, *, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        from werkzeug.exceptions import HTTPException
        from werkzeug.routing import RoutingException

        if getattr(app, "url_map", None) is None or not isinstance(
            getattr(app, "view_functions", None), dict
        ):
            raise ConfigurationError(
                "expected a Flask application (with url_map and view_functions)",
                field="routes",
                value=app,
            )
        self.app = app
        self._cache = _Cache(cache_size)
        self._errors = (HTTPException, RoutingException)
        self._by_host = bool(app.url_map.host_matching or getattr(app, "subdomain_matching", False))

    def resolve_scope(self, scope: MutableMapping[str, Any]) -> RouteMatch | None:
        """Always ``None``: Flask applications are WSGI applications."""
        return None

    def resolve_environ(self, environ: MutableMapping[str, Any]) -> RouteMatch | None:
        """The route of a WSGI request, or ``None``."""
        key = (
            environ.get("REQUEST_METHOD", "GET"),
            environ.get("SCRIPT_NAME", ""),
            environ.get("PATH_INFO", ""),
            environ.get("HTTP_HOST") if self._by_host else None,
        )
        try:
            return self._cache.data[key]
        except KeyError:
            pass
        match = self._match(environ)
        self._cache.put(key, match)
        return match

    def _match(self, environ: MutableMapping[str, Any]) -> RouteMatch | None:
        app = self.app
        url_map = app.url_map
        server_name = app.config.get("SERVER_NAME")
        subdomain = None
        # The same binding as Flask.create_url_adapter.
        if url_map.host_matching:
            server_name = None
        elif not getattr(app, "subdomain_matching", False):
            subdomain = url_map.default_subdomain or ""
        try:
            adapter = url_map.bind_to_environ(environ, server_name=server_name, subdomain=subdomain)
            rule, _ = adapter.match(return_rule=True)
        except self._errors:
            return None
        handler = app.view_functions.get(rule.endpoint)
        if handler is None:
            return None
        return RouteMatch(rule.rule, handler)

    def __repr__(self) -> str:
        return f"FlaskRoutes({self.app!r}, cached={len(self._cache)})"


def route_of_scope(
    scope: MutableMapping[str, Any], resolver: RouteResolver, record: RequestRecord
) -> RouteMatch | None:
    """The route of an ASGI request, resolved once per request and shared by the layers.

    The first call resolves it with ``resolver``, leaves the answer in ``scope[ROUTE_KEY]``
    and writes the template to ``record.route``; later calls return the stored answer.
    """
    if ROUTE_KEY in scope:
        found: RouteMatch | None = scope[ROUTE_KEY]
        return found
    match = scope[ROUTE_KEY] = resolver.resolve_scope(scope)
    if match is not None:
        record.route = match.template
    return match


def route_of_environ(
    environ: MutableMapping[str, Any], resolver: RouteResolver, record: RequestRecord
) -> RouteMatch | None:
    """The WSGI twin of :func:`route_of_scope`."""
    if ROUTE_KEY in environ:
        found: RouteMatch | None = environ[ROUTE_KEY]
        return found
    match = environ[ROUTE_KEY] = resolver.resolve_environ(environ)
    if match is not None:
        record.route = match.template
    return match
