"""``build_wsgi_stack``: a WSGI application wrapped in the whole inbound mesh.

The layers are the WSGI middleware of :mod:`meshware.inbound.wsgi`, one per name in
:data:`~meshware.inbound.stack.LAYERS` and in that order (outermost first), each present only
when :class:`~meshware.inbound.stack.InboundConfig` calls for it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Final

from meshware.inbound.stack import InboundConfig, MeshStackBase, assemble_stack
from meshware.inbound.wsgi.authz import AuthorizationMiddleware
from meshware.inbound.wsgi.deadline import DeadlineMiddleware
from meshware.inbound.wsgi.health import HealthMiddleware
from meshware.inbound.wsgi.identity import IdentityMiddleware
from meshware.inbound.wsgi.jwt import JwtAuthenticationMiddleware
from meshware.inbound.wsgi.ratelimit import RateLimitMiddleware
from meshware.inbound.wsgi.telemetry import TelemetryMiddleware
from meshware.types import WSGIApp

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from meshware.state.base import RateLimitBackend
    from meshware.types import Environ, StartResponse

__all__ = ["MeshStack", "build_wsgi_stack"]

# The middleware of each layer name in meshware.inbound.stack.LAYERS.
_MIDDLEWARE: Final[Mapping[str, Callable[..., WSGIApp]]] = {
    "telemetry": TelemetryMiddleware,
    "health": HealthMiddleware,
    "deadline": DeadlineMiddleware,
    "identity": IdentityMiddleware,
    "jwt": JwtAuthenticationMiddleware,
    "authz": AuthorizationMiddleware,
    "ratelimit": RateLimitMiddleware,
}


class MeshStack(MeshStackBase[WSGIApp]):
    """A WSGI application wrapped in the inbound mesh; itself a WSGI application.

    Built by :func:`build_wsgi_stack`; the twin of :class:`meshware.inbound.asgi.MeshStack`.
    Serve it as you would the application itself (``gunicorn module:stack``), or put it in
    ``flask_app.wsgi_app`` to keep using the Flask object.

    Attributes: those of :class:`~meshware.inbound.stack.MeshStackBase` (``app``,
    ``config``, ``layers``, ``metrics``, ``health``, ``resolver``, ``authenticator``,
    ``authorizer``, ``limiter``, ``routes``, ``tracer_provider``).
    """

    # Declared again (the base has it too) so that the read on every request finds the slot
    # on this class itself, without CPython's subclass check for an inherited slot.
    __slots__ = ("_entry",)

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        return self._entry(environ, start_response)

    def close(self) -> None:
        """Release what the stack owns: the rate limiter's backend connections and the
        tracer provider built from ``config.tracing`` (flushing its last spans)."""
        if self.limiter is not None:
            self.limiter.close()
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()


def build_wsgi_stack(
    app: WSGIApp,
    config: InboundConfig,
    *,
    rate_limit_backend: RateLimitBackend | None = None,
    tracer_provider: TracerProvider | None = None,
) -> MeshStack:
    """Wrap a WSGI application in the inbound layers ``config`` calls for.

    The order is fixed, outermost first: telemetry (so every request is measured and logged,
    refused ones included), health (probes bypass everything after it), deadline, identity,
    JWT, authorization, rate limiting (so only authorized requests use rate budget), then the
    application. A layer whose configuration is empty is left out, not run as a no-op; see
    :meth:`~meshware.inbound.stack.InboundConfig.layers`.

    Args:
        app: the WSGI application (Flask's ``app.wsgi_app`` or the Flask object, Django's
            WSGI handler, or any WSGI callable).
        config: the inbound configuration.
        rate_limit_backend: the rate limiter's backend instead of a new one (see
            :func:`~meshware.inbound.stack.build_parts`); the caller closes it.
        tracer_provider: the tracer provider instead of one built from ``config.tracing``.

    Returns:
        The :class:`MeshStack`, a WSGI application exposing its parts.

    Raises:
        ConfigurationError: ``config`` is not an
            :class:`~meshware.inbound.stack.InboundConfig`, the trust bundle file cannot be
            read, or a JWT key source is invalid.
    """
    return assemble_stack(
        MeshStack,
        _MIDDLEWARE,
        app,
        config,
        rate_limit_backend=rate_limit_backend,
        tracer_provider=tracer_provider,
    )
