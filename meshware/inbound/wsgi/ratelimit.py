"""``RateLimitMiddleware`` for WSGI: the twin of ``meshware.inbound.asgi.ratelimit``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from meshware.inbound.asgi.ratelimit import RateLimitCore
from meshware.inbound.facts import facts_from_environ
from meshware.inbound.record import record_of
from meshware.inbound.responses import start_json
from meshware.inbound.routes import RouteResolver, route_of_environ
from meshware.policy.ratelimit import RateLimiter, RateLimitPolicy
from meshware.types import Environ, StartResponse, WSGIApp

__all__ = ["RateLimitMiddleware"]


class RateLimitMiddleware:
    """WSGI rate limiting, as Envoy's local and global rate limit filters.

    The WSGI twin of :class:`meshware.inbound.asgi.RateLimitMiddleware`, with the same
    arguments and behaviour; decisions use the blocking
    :meth:`~meshware.policy.ratelimit.RateLimiter.decide`, and the rate-limit fields of an
    allowed request are added through ``start_response``.

    Args:
        app: the WSGI application to wrap.
        policy: the service's :class:`~meshware.policy.ratelimit.RateLimitPolicy`.
        limiter: a limiter built by the caller, instead of ``policy``.
        routes: a :class:`~meshware.inbound.routes.RouteResolver` (``FlaskRoutes(app)``) to
            apply per-handler limits.

    Raises:
        ConfigurationError: neither or both of ``policy`` and ``limiter``, or an argument of
            the wrong type.

    Attributes:
        limiter: the :class:`~meshware.policy.ratelimit.RateLimiter` in use; close it with
            ``middleware.limiter.close()`` at shutdown.
        routes: the route resolver, or ``None``.
    """

    __slots__ = ("_core", "app", "limiter", "routes")

    def __init__(
        self,
        app: WSGIApp,
        *,
        policy: RateLimitPolicy | None = None,
        limiter: RateLimiter | None = None,
        routes: RouteResolver | None = None,
    ) -> None:
        self.app = app
        self._core = RateLimitCore(policy, limiter, routes)
        self.limiter = self._core.limiter
        self.routes = routes

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        core = self._core
        record = record_of(environ)
        charges = core.charges_of(environ, record, route_of_environ, facts_from_environ)
        if charges is None:
            return self.app(environ, start_response)
        verdict = core.decided(record, core.limiter.charge(charges))
        if isinstance(verdict, tuple):
            status, body, headers = verdict
            return start_json(start_response, status, body, headers)
        if not verdict:
            return self.app(environ, start_response)
        fields = verdict

        def start_with_fields(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Callable[[bytes], object]:
            headers = [*headers, *fields]
            if exc_info is None:
                return start_response(status, headers)  # type: ignore[no-any-return]
            return start_response(status, headers, exc_info)  # type: ignore[no-any-return]

        return self.app(environ, start_with_fields)
