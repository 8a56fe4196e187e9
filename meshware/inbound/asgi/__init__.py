"""Pure-ASGI inbound middlewares, and the stack builder that composes them.

Every class here has a WSGI twin of the same name and arguments in
:mod:`meshware.inbound.wsgi`. The stack order, outermost first, is telemetry, health,
deadline, identity, JWT, authorization, rate limiting; :func:`build_asgi_stack` builds it
from an :class:`~meshware.inbound.stack.InboundConfig`.
"""

from meshware.inbound.asgi.authz import AuthorizationMiddleware
from meshware.inbound.asgi.deadline import DeadlineMiddleware
from meshware.inbound.asgi.health import HealthMiddleware
from meshware.inbound.asgi.identity import IdentityMiddleware
from meshware.inbound.asgi.jwt import JwtAuthenticationMiddleware
from meshware.inbound.asgi.ratelimit import RateLimitMiddleware
from meshware.inbound.asgi.stack import MeshStack, build_asgi_stack
from meshware.inbound.asgi.telemetry import TelemetryMiddleware

__all__ = [
    "AuthorizationMiddleware",
    "DeadlineMiddleware",
    "HealthMiddleware",
    "IdentityMiddleware",
    "JwtAuthenticationMiddleware",
    "MeshStack",
    "RateLimitMiddleware",
    "TelemetryMiddleware",
    "build_asgi_stack",
]
