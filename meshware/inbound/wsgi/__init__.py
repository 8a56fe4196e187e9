"""WSGI inbound middlewares (same names and arguments as :mod:`meshware.inbound.asgi`), and
the stack builder that composes them.

The stack order, outermost first, is telemetry, health, deadline, identity, JWT,
authorization, rate limiting; :func:`build_wsgi_stack` builds it from an
:class:`~meshware.inbound.stack.InboundConfig`.
"""

from meshware.inbound.wsgi.authz import AuthorizationMiddleware
from meshware.inbound.wsgi.deadline import DeadlineMiddleware
from meshware.inbound.wsgi.health import HealthMiddleware
from meshware.inbound.wsgi.identity import IdentityMiddleware
from meshware.inbound.wsgi.jwt import JwtAuthenticationMiddleware
from meshware.inbound.wsgi.ratelimit import RateLimitMiddleware
from meshware.inbound.wsgi.stack import MeshStack, build_wsgi_stack
from meshware.inbound.wsgi.telemetry import TelemetryMiddleware

__all__ = [
    "AuthorizationMiddleware",
    "DeadlineMiddleware",
    "HealthMiddleware",
    "IdentityMiddleware",
    "JwtAuthenticationMiddleware",
    "MeshStack",
    "RateLimitMiddleware",
    "TelemetryMiddleware",
    "build_wsgi_stack",
]
