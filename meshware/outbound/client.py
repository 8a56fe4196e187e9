"""The mesh client: an ordinary ``httpx.AsyncClient`` (or ``httpx.Client``) whose transport is
meshware's outbound stack.

::

    from meshware.outbound.client import OutboundConfig, mesh_client

    client = mesh_client(OutboundConfig(service="orders", cert_dir=".meshware/certs"))
    response = await client.get("http://payments/api/charge")

The stack, outermost first (Finagle's order):
telemetry → deadline → routing → retry (with budget) → balancing → breaker → connection.
A host that no resolver knows is not a mesh service: the call goes straight out through a plain
httpx transport, untouched (trace headers and ``x-request-id`` are still added).
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from meshware.exceptions import ConfigurationError
from meshware.outbound.balancing import LoadBalancerSettings
from meshware.outbound.breaker import BreakerPolicy
from meshware.outbound.destination import DestinationRule, DestinationRules
from meshware.outbound.discovery import EnvResolver, Resolver
from meshware.outbound.endpoints import Locality
from meshware.outbound.mirror import MirrorObserver
from meshware.outbound.outlier import OutlierDetection
from meshware.outbound.pool_limits import ConnectionPoolLimits
from meshware.outbound.retry import RetryPolicy
from meshware.outbound.routing import RouteTable
from meshware.outbound.transports import OutboundState
from meshware.telemetry.metrics import MeshMetrics, WorkloadInfo

_DEFAULT_BREAKER = BreakerPolicy()


@dataclass(frozen=True, slots=True, kw_only=True)
class OutboundConfig:
    """How one service calls the others.

    Attributes:
        service: this service's name (its SPIFFE service account; ``source_*`` metric labels).
        namespace: its namespace.
        version: its version label, if any.
        trust_domain: the trust domain, for the expected server identities
            (``spiffe://<trust_domain>/ns/<namespace>/sa/<destination>`` by default).
        cert_dir: the certificate directory holding this service's key, certificate and bundle
            (``services/<namespace>/<service>/``); ``None`` calls mesh services in plaintext
            (development and tests only).
        resolver: where endpoints come from; default :class:`EnvResolver`
            (``MESHWARE_SERVICE_<NAME>=host:port,...``).
        routes: VirtualService routing (subsets, weights, mirrors, faults, timeouts, retries);
            ``None`` sends every call to all endpoints of its host.
        destinations: DestinationRules (subsets, load balancing, outlier detection, pool limits,
            TLS mode).
        retry: the retry policy of calls whose route sets none.
        load_balancer: the load balancing of destinations whose rule sets none.
        outlier_detection: the outlier detection of destinations whose rule sets none
            (``None``: off, as in Istio).
        connection_pool: pool limits of destinations whose rule sets none.
        breaker: the per-cluster circuit breaker, or ``None`` for none.
        server_ids: expected server SPIFFE id(s) per destination, where not the default.
        retry_budget_ratio: retries allowed as a share of requests (Linkerd/Finagle: 0.2).
        locality: this service's locality, for locality-aware balancing.
        metrics: where client-side (``reporter="source"``) metrics go; ``None`` for none.
        tracer_provider: the OpenTelemetry tracer provider for client spans (``None``: the
            global one).
        mirror_observer: receives the outcome of mirrored calls (a new one by default).
        timeout: httpx's default timeout for the client (per attempt; deadlines and route
            timeouts tighten it).
        limits: the connection limits of each destination's connection pool (and of the
            pool of calls outside the mesh); ``None`` for httpx's defaults: at most 100
            connections, 20 of them kept alive when idle. Raise ``max_keepalive_connections``
            for a destination called with more concurrency than that, so that connections
            are reused rather than opened and closed per call.
    """

    service: str
    namespace: str = "default"
    version: str | None = None
    trust_domain: str = "cluster.local"
    cert_dir: str | os.PathLike[str] | None = None
    resolver: Resolver | None = None
    routes: RouteTable | None = None
    destinations: Sequence[DestinationRule] = ()
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    load_balancer: LoadBalancerSettings | None = None
    outlier_detection: OutlierDetection | None = None
    connection_pool: ConnectionPoolLimits | None = None
    breaker: BreakerPolicy | None = _DEFAULT_BREAKER
    server_ids: Mapping[str, str] = field(default_factory=dict)
    retry_budget_ratio: float = 0.2
    locality: Locality | None = None
    metrics: MeshMetrics | None = None
    tracer_provider: Any = None
    mirror_observer: MirrorObserver | None = None
    timeout: float = 10.0
    limits: httpx.Limits | None = None

    def __post_init__(self) -> None:
        if not self.service:
            raise ConfigurationError("must name this service", field="service", value=self.service)
        try:
            self.workload()
        except ConfigurationError as exc:
            # WorkloadInfo names its own fields; these are this object's.
            name = (exc.field or "").removeprefix("workload.")
            message = str(exc).removeprefix(f"{exc.field}: ")
            raise ConfigurationError(message, field=name or None, value=exc.value) from exc
        if not isinstance(self.retry, RetryPolicy):
            raise ConfigurationError("expected a RetryPolicy", field="retry", value=self.retry)
        timeout = self.timeout
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not 0 < timeout < math.inf
        ):
            raise ConfigurationError(
                "expected a positive, finite number of seconds", field="timeout", value=timeout
            )
        if isinstance(self.destinations, (str, bytes)) or not isinstance(
            self.destinations, Sequence
        ):
            raise ConfigurationError(
                "expected a list of DestinationRule", field="destinations", value=self.destinations
            )
        if self.limits is not None and not isinstance(self.limits, httpx.Limits):
            raise ConfigurationError(
                "expected an httpx.Limits or None", field="limits", value=self.limits
            )
        # A tuple, so that the frozen configuration stays hashable and unchanged.
        object.__setattr__(self, "destinations", tuple(self.destinations))

    def workload(self) -> WorkloadInfo:
        """This service as the ``source_*`` labels of client metrics describe it."""
        return WorkloadInfo(
            service=self.service,
            namespace=self.namespace,
            version=self.version,
            trust_domain=self.trust_domain,
        )


@dataclass(slots=True)
class _Parts:
    state: OutboundState
    resolver: Resolver
    mirror_observer: MirrorObserver


def _parts(config: OutboundConfig, clock: Callable[[], float], rng: random.Random | None) -> _Parts:
    recorder = config.metrics.outbound(config.workload()) if config.metrics is not None else None
    state_args: dict[str, Any] = {
        "rules": DestinationRules(config.destinations),
        "outlier_detection": config.outlier_detection,
        "connection_pool": config.connection_pool,
        "breaker": config.breaker,
        "tls_mode": "ISTIO_MUTUAL" if config.cert_dir is not None else "DISABLE",
        "retry_budget_ratio": config.retry_budget_ratio,
        "locality": config.locality,
        "clock": clock,
        "rng": rng,
        "recorder": recorder,
    }
    if config.load_balancer is not None:
        state_args["load_balancer"] = config.load_balancer
    return _Parts(
        state=OutboundState(**state_args),
        resolver=config.resolver if config.resolver is not None else EnvResolver(),
        mirror_observer=config.mirror_observer or MirrorObserver(),
    )


def mesh_transport(
    config: OutboundConfig,
    *,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
    passthrough: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncBaseTransport:
    """The async outbound stack for ``config`` (for an ``httpx.AsyncClient(transport=...)``).

    Args:
        config: how this service calls the others.
        clock: the monotonic clock of deadlines, route timeouts, retry budgets, outlier
            detection and breakers (seconds; tests pass a fake one).
        rng: the random source of weighted routes, mirror and fault percentages, balancer
            picks and backoff jitter; seed it for reproducible runs. ``None``: unseeded.
        passthrough: the transport that sends what does not go over mesh mTLS: calls to
            hosts that are not mesh services, and every mesh call when ``config.cert_dir``
            is ``None`` (plaintext). ``None``: a new ``httpx.AsyncHTTPTransport``. Tests
            pass an ``httpx.MockTransport`` here to run the whole stack without a network.

    Returns:
        The outermost transport of the stack (telemetry).

    Raises:
        ConfigurationError: the certificate files of ``config.cert_dir`` cannot be read, or
            another argument is invalid.
    """
    from meshware.outbound.route_transport import AsyncRoutingTransport
    from meshware.outbound.transport_balancing import AsyncBalancingTransport
    from meshware.outbound.transport_breaker import AsyncBreakerTransport
    from meshware.outbound.transport_connection import AsyncConnectionTransport
    from meshware.outbound.transport_deadline import AsyncDeadlineTransport
    from meshware.outbound.transport_retry import AsyncRetryTransport
    from meshware.outbound.transport_telemetry import AsyncTelemetryTransport

    parts = _parts(config, clock, rng)
    transport: httpx.AsyncBaseTransport = AsyncConnectionTransport(
        workload=config.workload(),
        cert_dir=config.cert_dir,
        server_ids=dict(config.server_ids),
        passthrough=passthrough,
        state=parts.state,
        clock=clock,
        **_limits(config),
    )
    transport = AsyncBreakerTransport(transport, state=parts.state)
    transport = AsyncBalancingTransport(transport, resolver=parts.resolver, state=parts.state)
    transport = AsyncRetryTransport(
        transport, policy=config.retry, resolver=parts.resolver, state=parts.state, rng=rng
    )
    if config.routes is not None:
        transport = AsyncRoutingTransport(
            transport,
            routes=config.routes,
            resolver=parts.resolver,
            rng=rng,
            mirror_observer=parts.mirror_observer,
            clock=clock,
        )
    transport = AsyncDeadlineTransport(transport, clock=clock)
    recorder = parts.state.recorder
    return AsyncTelemetryTransport(
        transport, recorder=recorder, tracer_provider=config.tracer_provider
    )


def mesh_sync_transport(
    config: OutboundConfig,
    *,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
    passthrough: httpx.BaseTransport | None = None,
) -> httpx.BaseTransport:
    """The sync outbound stack for ``config`` (for an ``httpx.Client(transport=...)``).

    The arguments are :func:`mesh_transport`'s; ``passthrough`` is an
    ``httpx.BaseTransport`` (a new ``httpx.HTTPTransport`` when ``None``).
    """
    from meshware.outbound.route_transport import RoutingTransport
    from meshware.outbound.transport_balancing import BalancingTransport
    from meshware.outbound.transport_breaker import BreakerTransport
    from meshware.outbound.transport_connection import ConnectionTransport
    from meshware.outbound.transport_deadline import DeadlineTransport
    from meshware.outbound.transport_retry import RetryTransport
    from meshware.outbound.transport_telemetry import TelemetryTransport

    parts = _parts(config, clock, rng)
    transport: httpx.BaseTransport = ConnectionTransport(
        workload=config.workload(),
        cert_dir=config.cert_dir,
        server_ids=dict(config.server_ids),
        passthrough=passthrough,
        state=parts.state,
        clock=clock,
        **_limits(config),
    )
    transport = BreakerTransport(transport, state=parts.state)
    transport = BalancingTransport(transport, resolver=parts.resolver, state=parts.state)
    transport = RetryTransport(
        transport, policy=config.retry, resolver=parts.resolver, state=parts.state, rng=rng
    )
    if config.routes is not None:
        transport = RoutingTransport(
            transport,
            routes=config.routes,
            resolver=parts.resolver,
            rng=rng,
            mirror_observer=parts.mirror_observer,
            clock=clock,
        )
    transport = DeadlineTransport(transport, clock=clock)
    return TelemetryTransport(
        transport, recorder=parts.state.recorder, tracer_provider=config.tracer_provider
    )


def mesh_client(
    config: OutboundConfig,
    *,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
    passthrough: httpx.AsyncBaseTransport | None = None,
    **client_kwargs: Any,
) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` that calls other services through the mesh.

    Args:
        config: how this service calls the others.
        clock: the monotonic clock of the stack (see :func:`mesh_transport`).
        rng: the stack's random source; seed it for reproducible routing (see
            :func:`mesh_transport`).
        passthrough: the transport of calls that do not go over mesh mTLS (see
            :func:`mesh_transport`).
        client_kwargs: passed to ``httpx.AsyncClient`` (``headers``, ``base_url``, ...);
            ``timeout`` defaults to ``config.timeout``. ``transport`` is meshware's and may
            not be given.

    Raises:
        ConfigurationError: as :func:`mesh_transport`, or ``transport`` was given.
    """
    _check_client_kwargs(client_kwargs)
    client_kwargs.setdefault("timeout", config.timeout)
    transport = mesh_transport(config, clock=clock, rng=rng, passthrough=passthrough)
    return httpx.AsyncClient(transport=transport, **client_kwargs)


def mesh_sync_client(
    config: OutboundConfig,
    *,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
    passthrough: httpx.BaseTransport | None = None,
    **client_kwargs: Any,
) -> httpx.Client:
    """An ``httpx.Client`` that calls other services through the mesh (Flask, Django, threads).

    The arguments are :func:`mesh_client`'s; ``passthrough`` is an ``httpx.BaseTransport``.
    """
    _check_client_kwargs(client_kwargs)
    client_kwargs.setdefault("timeout", config.timeout)
    transport = mesh_sync_transport(config, clock=clock, rng=rng, passthrough=passthrough)
    return httpx.Client(transport=transport, **client_kwargs)


def _limits(config: OutboundConfig) -> dict[str, Any]:
    return {} if config.limits is None else {"limits": config.limits}


def _check_client_kwargs(client_kwargs: Mapping[str, Any]) -> None:
    # httpx would raise a bare TypeError for the duplicate keyword; say what to do instead.
    if "transport" in client_kwargs:
        raise ConfigurationError(
            "the mesh client's transport is meshware's; build a client around "
            "mesh_transport() instead, or pass passthrough= for the calls outside the mesh",
            field="transport",
            value=client_kwargs["transport"],
        )
