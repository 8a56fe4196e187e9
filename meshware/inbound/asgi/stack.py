"""``build_asgi_stack``: an ASGI application wrapped in the whole inbound mesh.

The layers, outermost first, each present only when :class:`~meshware.inbound.stack.InboundConfig`
calls for it::

    TelemetryMiddleware -> HealthMiddleware -> DeadlineMiddleware -> IdentityMiddleware
      -> JwtAuthenticationMiddleware -> AuthorizationMiddleware -> RateLimitMiddleware -> app
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from meshware.inbound.asgi.authz import AuthorizationMiddleware
from meshware.inbound.asgi.deadline import DeadlineMiddleware
from meshware.inbound.asgi.health import HealthMiddleware
from meshware.inbound.asgi.identity import IdentityMiddleware
from meshware.inbound.asgi.jwt import JwtAuthenticationMiddleware
from meshware.inbound.asgi.ratelimit import RateLimitMiddleware
from meshware.inbound.asgi.telemetry import TelemetryMiddleware
from meshware.inbound.stack import InboundConfig, build_parts

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from meshware.identity.resolve import IdentityResolver
    from meshware.inbound.health import HealthChecks
    from meshware.inbound.routes import RouteResolver
    from meshware.policy.authz import Authorizer
    from meshware.policy.jwt import JwtAuthenticator
    from meshware.policy.ratelimit import RateLimiter
    from meshware.state.base import RateLimitBackend
    from meshware.telemetry.metrics import MeshMetrics
    from meshware.types import ASGIApp, Receive, Scope, Send

__all__ = ["MeshStack", "build_asgi_stack"]


class MeshStack:
    """An ASGI application wrapped in the inbound mesh; itself an ASGI application.

    Built by :func:`build_asgi_stack`. Serve it as you would the application itself
    (``uvicorn module:stack``).

    Attributes:
        app: the user's application, innermost.
        config: the configuration the stack was built from.
        layers: the middleware instances, outermost first.
        metrics: the :class:`~meshware.telemetry.metrics.MeshMetrics`, or ``None``.
        health: the :class:`~meshware.inbound.health.HealthChecks` behind ``/livez`` and
            ``/readyz``, or ``None``; register checks on it.
        resolver: the identity layer's
            :class:`~meshware.identity.resolve.IdentityResolver`, or ``None``.
        authenticator: the JWT layer's :class:`~meshware.policy.jwt.JwtAuthenticator`, or
            ``None``.
        authorizer: the service-wide :class:`~meshware.policy.authz.Authorizer`, or ``None``.
        limiter: the :class:`~meshware.policy.ratelimit.RateLimiter`, or ``None``.
        routes: the :class:`~meshware.inbound.routes.RouteResolver`, or ``None``.
        tracer_provider: the tracer provider built from ``config.tracing``, or ``None``.
    """

    __meshware_stack__: ClassVar[bool] = True
    """Marks a stack, so that ``meshware serve`` does not add a second identity layer."""

    __slots__ = (
        "_entry",
        "app",
        "authenticator",
        "authorizer",
        "config",
        "health",
        "layers",
        "limiter",
        "metrics",
        "resolver",
        "routes",
        "tracer_provider",
    )

    def __init__(
        self,
        *,
        app: ASGIApp,
        entry: ASGIApp,
        config: InboundConfig,
        layers: tuple[Any, ...],
        resolver: IdentityResolver | None,
        authenticator: JwtAuthenticator | None,
        authorizer: Authorizer | None,
        limiter: RateLimiter | None,
        tracer_provider: TracerProvider | None,
    ) -> None:
        self.app = app
        self._entry = entry
        self.config = config
        self.layers = layers
        self.metrics: MeshMetrics | None = config.metrics
        self.health: HealthChecks | None = config.health if "health" in config.layers() else None
        self.resolver = resolver
        self.authenticator = authenticator
        self.authorizer = authorizer
        self.limiter = limiter
        self.routes: RouteResolver | None = config.routes
        self.tracer_provider = tracer_provider

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._entry(scope, receive, send)

    async def aclose(self) -> None:
        """Release what the stack owns: the rate limiter's backend connections and the
        tracer provider built from ``config.tracing`` (flushing its last spans)."""
        if self.limiter is not None:
            await self.limiter.aclose()
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()

    def __repr__(self) -> str:
        names = " -> ".join(type(layer).__name__ for layer in self.layers)
        return f"<MeshStack {self.config.service}: {names or 'no layers'} -> {self.app!r}>"


def build_asgi_stack(
    app: ASGIApp,
    config: InboundConfig,
    *,
    rate_limit_backend: RateLimitBackend | None = None,
    tracer_provider: TracerProvider | None = None,
) -> MeshStack:
    """Wrap an ASGI application in the inbound layers ``config`` calls for.

    The order is fixed, outermost first: telemetry (so every request is measured and logged,
    refused ones included), health (probes bypass everything after it), deadline, identity,
    JWT, authorization, rate limiting (so only authorized requests use rate budget), then the
    application. A layer whose configuration is empty is left out, not run as a no-op; see
    :meth:`~meshware.inbound.stack.InboundConfig.layers`.

    Args:
        app: the ASGI application (Starlette, FastAPI, or any ASGI callable).
        config: the inbound configuration.
        rate_limit_backend: the rate limiter's backend instead of a new one (see
            :func:`~meshware.inbound.stack.build_parts`); the caller closes it.
        tracer_provider: the tracer provider instead of one built from ``config.tracing``.

    Returns:
        The :class:`MeshStack`, an ASGI application exposing its parts.

    Raises:
        ConfigurationError: ``config`` is not an
            :class:`~meshware.inbound.stack.InboundConfig`, the trust bundle file cannot be
            read, or a JWT key source is invalid.
    """
    parts = build_parts(
        config, rate_limit_backend=rate_limit_backend, tracer_provider=tracer_provider
    )
    present = parts.layers
    layers: list[Any] = []
    entry: Any = app
    if "ratelimit" in present:
        entry = RateLimitMiddleware(entry, limiter=parts.limiter, routes=config.routes)
        layers.append(entry)
    if "authz" in present:
        entry = AuthorizationMiddleware(
            entry,
            authorizer=parts.authorizer,
            routes=config.routes,
            explain=config.explain_denials,
        )
        layers.append(entry)
    if "jwt" in present:
        entry = JwtAuthenticationMiddleware(entry, authenticator=parts.authenticator)
        layers.append(entry)
    if "identity" in present and parts.resolver is not None:
        entry = IdentityMiddleware(
            entry, resolver=parts.resolver, require_identity=config.require_identity
        )
        layers.append(entry)
    if "deadline" in present:
        entry = DeadlineMiddleware(
            entry, default_timeout=config.default_timeout, max_timeout=config.max_timeout
        )
        layers.append(entry)
    skip_paths: frozenset[str] = frozenset()
    if "health" in present:
        entry = HealthMiddleware(
            entry, checks=config.health, service_id=config.service, version=config.version
        )
        skip_paths = entry.paths
        layers.append(entry)
    if "telemetry" in present:
        entry = TelemetryMiddleware(
            entry,
            workload=parts.workload,
            metrics=config.metrics,
            tracer_provider=parts.tracer_provider,
            propagator=parts.propagator,
            access_log=config.access_log,
            metrics_path=config.metrics_path,
            skip_paths=skip_paths,
        )
        layers.append(entry)
    layers.reverse()
    return MeshStack(
        app=app,
        entry=entry,
        config=config,
        layers=tuple(layers),
        resolver=parts.resolver,
        authenticator=parts.authenticator,
        authorizer=parts.authorizer,
        limiter=parts.limiter,
        tracer_provider=parts.tracer_provider,
    )
