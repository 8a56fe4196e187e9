"""meshware: an in-process service mesh for Python web services.

The flat public API. Names are imported on first use, so ``import meshware`` stays cheap and
a WSGI service never imports asyncio-only parts it does not use::

    import meshware

    stack = meshware.build_asgi_stack(app, meshware.InboundConfig(service="orders"))
    client = meshware.mesh_client(meshware.OutboundConfig(service="orders"))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from meshware.__about__ import __version__
from meshware.exceptions import (
    CertificateRejected,
    ConfigurationError,
    IdentityError,
    InvalidSpiffeId,
    InvalidXfcc,
    MeshwareError,
)

if TYPE_CHECKING:
    from meshware.config import MeshConfig, load_config
    from meshware.identity.bundle import PeerVerifier, TrustBundles
    from meshware.identity.ca import LocalCA
    from meshware.identity.identity import Identity
    from meshware.identity.resolve import IdentityResolver
    from meshware.identity.spiffe import SpiffeId
    from meshware.inbound.asgi.stack import build_asgi_stack
    from meshware.inbound.health import HealthChecks
    from meshware.inbound.stack import InboundConfig
    from meshware.inbound.wsgi.stack import build_wsgi_stack
    from meshware.outbound.client import (
        OutboundConfig,
        mesh_client,
        mesh_sync_client,
    )
    from meshware.outbound.destination import DestinationRule
    from meshware.outbound.errors import (
        CircuitOpen,
        DeadlineExceeded,
        NoHealthyEndpoint,
        OutboundError,
        PoolOverloaded,
        RetryBudgetExhausted,
    )
    from meshware.outbound.retry import RetryPolicy
    from meshware.outbound.routing import RouteTable, VirtualService
    from meshware.policy.authz import AuthorizationPolicy, Authorizer, authorize
    from meshware.policy.jwt import JwtRule
    from meshware.policy.ratelimit import RateLimitPolicy, RateLimitRule, rate_limit
    from meshware.telemetry.metrics import MeshMetrics
    from meshware.telemetry.tracing import TracingConfig

_LAZY = {
    "AuthorizationPolicy": "meshware.policy.authz",
    "Authorizer": "meshware.policy.authz",
    "authorize": "meshware.policy.authz",
    "CircuitOpen": "meshware.outbound.errors",
    "DeadlineExceeded": "meshware.outbound.errors",
    "DestinationRule": "meshware.outbound.destination",
    "HealthChecks": "meshware.inbound.health",
    "Identity": "meshware.identity.identity",
    "IdentityResolver": "meshware.identity.resolve",
    "InboundConfig": "meshware.inbound.stack",
    "JwtRule": "meshware.policy.jwt",
    "LocalCA": "meshware.identity.ca",
    "MeshConfig": "meshware.config",
    "load_config": "meshware.config",
    "MeshMetrics": "meshware.telemetry.metrics",
    "NoHealthyEndpoint": "meshware.outbound.errors",
    "OutboundConfig": "meshware.outbound.client",
    "OutboundError": "meshware.outbound.errors",
    "PeerVerifier": "meshware.identity.bundle",
    "PoolOverloaded": "meshware.outbound.errors",
    "RateLimitPolicy": "meshware.policy.ratelimit",
    "RateLimitRule": "meshware.policy.ratelimit",
    "rate_limit": "meshware.policy.ratelimit",
    "RetryBudgetExhausted": "meshware.outbound.errors",
    "RetryPolicy": "meshware.outbound.retry",
    "RouteTable": "meshware.outbound.routing",
    "SpiffeId": "meshware.identity.spiffe",
    "TracingConfig": "meshware.telemetry.tracing",
    "TrustBundles": "meshware.identity.bundle",
    "VirtualService": "meshware.outbound.routing",
    "build_asgi_stack": "meshware.inbound.asgi.stack",
    "build_wsgi_stack": "meshware.inbound.wsgi.stack",
    "mesh_client": "meshware.outbound.client",
    "mesh_sync_client": "meshware.outbound.client",
}

__all__ = [
    "AuthorizationPolicy",
    "Authorizer",
    "CertificateRejected",
    "CircuitOpen",
    "ConfigurationError",
    "DeadlineExceeded",
    "DestinationRule",
    "HealthChecks",
    "Identity",
    "IdentityError",
    "IdentityResolver",
    "InboundConfig",
    "InvalidSpiffeId",
    "InvalidXfcc",
    "JwtRule",
    "LocalCA",
    "MeshConfig",
    "MeshMetrics",
    "MeshwareError",
    "NoHealthyEndpoint",
    "OutboundConfig",
    "OutboundError",
    "PeerVerifier",
    "PoolOverloaded",
    "RateLimitPolicy",
    "RateLimitRule",
    "RetryBudgetExhausted",
    "RetryPolicy",
    "RouteTable",
    "SpiffeId",
    "TracingConfig",
    "TrustBundles",
    "VirtualService",
    "__version__",
    "authorize",
    "build_asgi_stack",
    "build_wsgi_stack",
    "load_config",
    "mesh_client",
    "mesh_sync_client",
    "rate_limit",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'meshware' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
