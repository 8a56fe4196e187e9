"""``build_asgi_stack``: an ASGI application wrapped in the whole inbound mesh.

The layers are the pure-ASGI middleware of :mod:`meshware.inbound.asgi`, one per name in
:data:`~meshware.inbound.stack.LAYERS` and in that order (outermost first), each present only
when :class:`~meshware.inbound.stack.InboundConfig` calls for it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, TypeVar

from meshware.inbound.asgi.authz import AuthorizationMiddleware
from meshware.inbound.asgi.deadline import DeadlineMiddleware
from meshware.inbound.asgi.fused import FusedLayers
from meshware.inbound.asgi.health import HealthMiddleware
from meshware.inbound.asgi.identity import IdentityMiddleware
from meshware.inbound.asgi.jwt import JwtAuthenticationMiddleware
from meshware.inbound.asgi.ratelimit import RateLimitMiddleware
from meshware.inbound.asgi.telemetry import TelemetryMiddleware
from meshware.inbound.stack import InboundConfig, MeshStackBase, assemble_stack
from meshware.types import ASGIApp

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from meshware.state.base import RateLimitBackend
    from meshware.types import Receive, Scope, Send

__all__ = ["MeshStack", "build_asgi_stack"]

# The middleware of each layer name in meshware.inbound.stack.LAYERS.
_MIDDLEWARE: Final[Mapping[str, Callable[..., ASGIApp]]] = {
    "telemetry": TelemetryMiddleware,
    "health": HealthMiddleware,
    "deadline": DeadlineMiddleware,
    "identity": IdentityMiddleware,
    "jwt": JwtAuthenticationMiddleware,
    "authz": AuthorizationMiddleware,
    "ratelimit": RateLimitMiddleware,
}


class MeshStack(MeshStackBase[ASGIApp]):
    """An ASGI application wrapped in the inbound mesh; itself an ASGI application.

    Built by :func:`build_asgi_stack`. Serve it as you would the application itself
    (``uvicorn module:stack``).

    Attributes: those of :class:`~meshware.inbound.stack.MeshStackBase` (``app``,
    ``config``, ``layers``, ``metrics``, ``health``, ``resolver``, ``authenticator``,
    ``authorizer``, ``limiter``, ``routes``, ``tracer_provider``).
    """

    # Declared again (the base has it too) so that the read on every request finds the slot
    # on this class itself, without CPython's subclass check for an inherited slot.
    __slots__ = ("_entry",)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._entry(scope, receive, send)

    async def aclose(self) -> None:
        """Release what the stack owns: the rate limiter's backend connections and the
        tracer provider built from ``config.tracing`` (flushing its last spans)."""
        if self.limiter is not None:
            await self.limiter.aclose()
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()


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
    stack = assemble_stack(
        MeshStack,
        _MIDDLEWARE,
        app,
        config,
        rate_limit_backend=rate_limit_backend,
        tracer_provider=tracer_provider,
    )
    _fuse(stack)
    return stack


def _fuse(stack: MeshStack) -> None:
    """Serve the HTTP requests the telemetry layer measures through :class:`FusedLayers`
    (the layers after it in one call), when the stack has a telemetry layer and no JWT one."""
    layers = stack.layers
    if not layers or not isinstance(layers[0], TelemetryMiddleware):
        return
    telemetry = layers[0]
    if _layer(layers, JwtAuthenticationMiddleware) is not None:
        return
    deadline = _layer(layers, DeadlineMiddleware)
    authz = _layer(layers, AuthorizationMiddleware)
    ratelimit = _layer(layers, RateLimitMiddleware)
    telemetry.handler = FusedLayers(
        stack.app,
        layered=telemetry.app,
        health=_layer(layers, HealthMiddleware),
        deadline=None if deadline is None else deadline.core,
        identity=_layer(layers, IdentityMiddleware),
        authz=None if authz is None else authz.core,
        ratelimit=None if ratelimit is None else ratelimit.core,
    )


_L = TypeVar("_L")


def _layer(layers: tuple[Any, ...], kind: type[_L]) -> _L | None:
    """The stack's layer of class ``kind``, or ``None``."""
    return next((layer for layer in layers if type(layer) is kind), None)
