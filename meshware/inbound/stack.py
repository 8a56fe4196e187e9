"""The inbound stack's configuration, and the parts both stack builders share.

:class:`InboundConfig` says what the inbound side of a service does: who it is (the
``destination_*`` labels and health bodies), whom it trusts (mTLS identities, JWT issuers),
what it allows (authorization policies), how fast (rate limits), and what it reports
(metrics, traces, access log). ``build_asgi_stack(app, config)``
(:mod:`meshware.inbound.asgi.stack`) and ``build_wsgi_stack(app, config)``
(:mod:`meshware.inbound.wsgi.stack`) wrap an application in the layers it calls for, always in
one order, outermost first::

    telemetry -> health -> deadline -> identity -> jwt -> authz -> ratelimit -> app

A layer whose configuration is empty is left out entirely. See ``docs/inbound-stack.md``.

The two builders differ only in their middleware classes: :func:`layer_specs` plans the
layers and their arguments, :func:`assemble_stack` builds them, and :class:`MeshStackBase` is
what both ``MeshStack`` classes share.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import (
    TYPE_CHECKING,
    Any,
    ClassVar,
    Final,
    Generic,
    NamedTuple,
    TypeAlias,
    TypeVar,
)

from meshware.exceptions import ConfigurationError
from meshware.identity.bundle import PeerVerifier, TrustBundles
from meshware.identity.resolve import IdentityResolver, TrustedProxies
from meshware.inbound.health import HealthChecks
from meshware.inbound.routes import RouteResolver
from meshware.policy.authz import AuthorizationPolicy, Authorizer
from meshware.policy.jwt import JwtAuthenticator, JwtRule
from meshware.policy.paths import DEFAULT_PATH_NORMALIZATION, PathNormalization
from meshware.policy.ratelimit import RateLimiter, RateLimitPolicy
from meshware.telemetry.access_log import AccessLog
from meshware.telemetry.metrics import MeshMetrics, WorkloadInfo
from meshware.telemetry.tracing import TracingConfig, build_propagator, configure_tracing

if TYPE_CHECKING:
    from opentelemetry.propagators.textmap import TextMapPropagator
    from opentelemetry.sdk.trace import TracerProvider

    from meshware.state.base import RateLimitBackend

__all__ = [
    "LAYERS",
    "BundleSource",
    "InboundConfig",
    "LayerSpec",
    "MeshStackBase",
    "StackParts",
    "assemble_stack",
    "build_parts",
    "layer_specs",
]

BundleSource: TypeAlias = "str | os.PathLike[str] | TrustBundles | Callable[[], TrustBundles]"
"""Where the identity layer gets its trust bundles: a PEM file's path (read once, when the
stack is built), a :class:`~meshware.identity.bundle.TrustBundles`, or a callable returning
the bundles in force (a reloading source, as ``meshware serve`` passes)."""

LAYERS: Final = ("telemetry", "health", "deadline", "identity", "jwt", "authz", "ratelimit")
"""The layers of the inbound stack, outermost first."""

# The health layer's paths in a stack; the telemetry layer skips them.
_HEALTH_PATHS: Final = ("/livez", "/readyz")


def _type_name(value: object) -> str:
    return type(value).__name__


def _instance(value: object, kind: type[Any] | tuple[type[Any], ...], name: str, what: str) -> None:
    if value is not None and not isinstance(value, kind):
        raise ConfigurationError(
            f"expected {what} or None, got {_type_name(value)}", field=name, value=value
        )


def _items(value: object, kind: type[Any], name: str) -> tuple[Any, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigurationError(
            f"expected a list of {kind.__name__}, got {_type_name(value)}", field=name, value=value
        )
    for index, item in enumerate(value):
        if not isinstance(item, kind):
            raise ConfigurationError(
                f"expected a {kind.__name__}, got {_type_name(item)}",
                field=f"{name}[{index}]",
                value=item,
            )
    return tuple(value)


def _bool(value: object, name: str) -> None:
    if not isinstance(value, bool):
        raise ConfigurationError(
            f"expected True or False, got {_type_name(value)}", field=name, value=value
        )


def _timeout(value: object, name: str) -> None:
    if value is not None and (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigurationError(
            "expected a positive, finite number of seconds or None", field=name, value=value
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class InboundConfig:
    """Everything the inbound stack of one service needs, in one frozen object.

    Build it once at start-up and pass it to ``build_asgi_stack`` or ``build_wsgi_stack``.
    Derive variants with :func:`dataclasses.replace`.

    Attributes:
        service: the service's name (``"orders"``): the ``destination_*`` metric labels and
            the ``serviceId`` of health bodies.
        namespace: the namespace it runs in.
        version: the deployed version, or ``None`` (metrics say ``"unknown"``).
        trust_domain: the SPIFFE trust domain (metric labels; the trust domain of CAs in
            ``bundle`` that name none).
        bundle: the trust bundles that verify callers' certificates (see
            :data:`BundleSource`); ``None`` leaves the identity layer out: no caller has a
            verified identity.
        trusted_proxies: who may send ``x-forwarded-client-cert``: addresses, CIDR networks
            or ``spiffe://`` ids (see :class:`~meshware.identity.resolve.TrustedProxies`).
        require_identity: refuse (403) requests without a verified identity.
        jwt_rules: the accepted JWT issuers (Istio's ``jwtRules``); none leaves the JWT
            layer out.
        policies: the service-wide authorization policies.
        path_normalization: how request paths are normalized before authorization; the
            strict defaults when ``None``.
        explain_denials: add the deciding policy, rule and reason to 403 bodies (for
            development).
        rate_limit: the service's rate-limit policy, or ``None``.
        routes: a :class:`~meshware.inbound.routes.RouteResolver` (``StarletteRoutes(app)``,
            ``FlaskRoutes(app)``) for per-route policies and limits and route-template
            labels. With it, the authorization and rate-limit layers are always present, so
            that declarations on handlers (``@authorize``, ``@rate_limit``) are enforced even
            when ``policies`` and ``rate_limit`` are empty (buckets then live in
            ``memory://``).
        health: the health checks and readiness state served at ``/livez`` and ``/readyz``;
            a new :class:`~meshware.inbound.health.HealthChecks` by default; ``None`` leaves
            the health layer out.
        metrics: the Prometheus metrics; a new :class:`~meshware.telemetry.metrics.MeshMetrics`
            (in a registry of its own) by default; ``None`` records none.
        metrics_path: the path that serves the Prometheus scrape, or ``None``.
        tracing: how requests are traced, or ``None`` to use OpenTelemetry's global tracer
            provider and propagator (which do nothing until configured).
        access_log: write a JSON access-log line per request: ``True``, ``False``, or a
            configured :class:`~meshware.telemetry.access_log.AccessLog`. The telemetry layer
            is left out when there are no metrics, no tracing and no access log.
        deadlines: read the caller's ``x-meshware-timeout`` and run each request inside its
            deadline; ``False`` leaves the deadline layer out.
        default_timeout: the deadline of a request without the header, in seconds, or
            ``None`` for none.
        max_timeout: the longest deadline a caller may ask for, in seconds, or ``None``.

    Raises:
        ConfigurationError: a field has the wrong type or value; ``field`` names it. The
            policies are compiled here, so a policy that can never match fails now.
    """

    service: str
    namespace: str = "default"
    version: str | None = None
    trust_domain: str = "cluster.local"
    bundle: BundleSource | None = None
    trusted_proxies: Sequence[str] = ()
    require_identity: bool = False
    jwt_rules: Sequence[JwtRule] = ()
    policies: Sequence[AuthorizationPolicy] = ()
    path_normalization: PathNormalization | None = None
    explain_denials: bool = False
    rate_limit: RateLimitPolicy | None = None
    routes: RouteResolver | None = None
    health: HealthChecks | None = field(default_factory=HealthChecks)
    metrics: MeshMetrics | None = field(default_factory=MeshMetrics)
    metrics_path: str | None = "/metrics"
    tracing: TracingConfig | None = None
    access_log: bool | AccessLog = True
    deadlines: bool = True
    default_timeout: float | None = None
    max_timeout: float | None = None

    def __post_init__(self) -> None:
        try:
            self.workload()
        except ConfigurationError as exc:
            name = (exc.field or "").removeprefix("workload.")
            message = str(exc).removeprefix(f"{exc.field}: ")
            raise ConfigurationError(message, field=name or None, value=exc.value) from exc
        bundle = self.bundle
        if bundle is not None and (
            isinstance(bundle, bytes)
            or not (isinstance(bundle, (str, os.PathLike, TrustBundles)) or callable(bundle))
        ):
            raise ConfigurationError(
                "expected a bundle file path, a TrustBundles, a callable returning "
                f"TrustBundles, or None; got {_type_name(bundle)}",
                field="bundle",
                value=bundle,
            )
        if isinstance(self.trusted_proxies, str) or not isinstance(self.trusted_proxies, Sequence):
            raise ConfigurationError(
                "expected a list of addresses, networks or spiffe:// ids",
                field="trusted_proxies",
                value=self.trusted_proxies,
            )
        object.__setattr__(self, "trusted_proxies", tuple(self.trusted_proxies))
        TrustedProxies.parse(self.trusted_proxies)
        _bool(self.require_identity, "require_identity")
        if bundle is None:
            for name in ("trusted_proxies", "require_identity"):
                if getattr(self, name):
                    raise ConfigurationError(
                        "needs a trust bundle to verify identities; set bundle",
                        field=name,
                        value=getattr(self, name),
                    )
        object.__setattr__(self, "jwt_rules", _items(self.jwt_rules, JwtRule, "jwt_rules"))
        issuers: set[str] = set()
        for index, rule in enumerate(self.jwt_rules):
            if rule.issuer in issuers:
                raise ConfigurationError(
                    "duplicate issuer; each issuer needs exactly one rule",
                    field=f"jwt_rules[{index}].issuer",
                    value=rule.issuer,
                )
            issuers.add(rule.issuer)
        _instance(
            self.path_normalization, PathNormalization, "path_normalization", "a PathNormalization"
        )
        object.__setattr__(self, "policies", _items(self.policies, AuthorizationPolicy, "policies"))
        self.authorizer()  # compiles and checks the policies now
        _bool(self.explain_denials, "explain_denials")
        _instance(self.rate_limit, RateLimitPolicy, "rate_limit", "a RateLimitPolicy")
        _instance(self.routes, RouteResolver, "routes", "a RouteResolver")
        _instance(self.health, HealthChecks, "health", "a HealthChecks")
        _instance(self.metrics, MeshMetrics, "metrics", "a MeshMetrics")
        path = self.metrics_path
        if path is not None and (not isinstance(path, str) or not path.startswith("/")):
            raise ConfigurationError(
                'expected a path starting with "/" or None', field="metrics_path", value=path
            )
        if self.health is not None and path in _HEALTH_PATHS:
            raise ConfigurationError(
                "collides with a health path (/livez, /readyz)", field="metrics_path", value=path
            )
        _instance(self.tracing, TracingConfig, "tracing", "a TracingConfig")
        if not isinstance(self.access_log, (bool, AccessLog)):
            raise ConfigurationError(
                f"expected True, False or an AccessLog, got {_type_name(self.access_log)}",
                field="access_log",
                value=self.access_log,
            )
        _bool(self.deadlines, "deadlines")
        _timeout(self.default_timeout, "default_timeout")
        _timeout(self.max_timeout, "max_timeout")
        if (
            self.default_timeout is not None
            and self.max_timeout is not None
            and self.default_timeout > self.max_timeout
        ):
            raise ConfigurationError(
                f"expected at most max_timeout ({self.max_timeout:g} s)",
                field="default_timeout",
                value=self.default_timeout,
            )
        if not self.deadlines and (self.default_timeout or self.max_timeout):
            raise ConfigurationError(
                "timeouts need the deadline layer; set deadlines=True",
                field="deadlines",
                value=False,
            )

    def workload(self) -> WorkloadInfo:
        """This service as the telemetry layer labels it."""
        return WorkloadInfo(
            service=self.service,
            namespace=self.namespace,
            version=self.version,
            trust_domain=self.trust_domain,
        )

    def authorizer(self) -> Authorizer:
        """A new :class:`~meshware.policy.authz.Authorizer` of the service-wide policies."""
        return Authorizer(
            self.policies,
            path_normalization=(
                DEFAULT_PATH_NORMALIZATION
                if self.path_normalization is None
                else self.path_normalization
            ),
        )

    def layers(self) -> tuple[str, ...]:
        """The names of the layers a stack built from this configuration has, outermost
        first (a subset of :data:`LAYERS`, in that order)."""
        present = {
            "telemetry": (
                self.metrics is not None or self.tracing is not None or bool(self.access_log)
            ),
            "health": self.health is not None,
            "deadline": self.deadlines,
            "identity": self.bundle is not None,
            "jwt": bool(self.jwt_rules),
            "authz": bool(self.policies) or self.routes is not None,
            "ratelimit": self.rate_limit is not None or self.routes is not None,
        }
        return tuple(name for name in LAYERS if present[name])


@dataclass(slots=True)
class StackParts:
    """The framework-neutral objects a stack is assembled from (built once per stack).

    Attributes:
        layers: the layer names, outermost first (:meth:`InboundConfig.layers`).
        workload: the service, as telemetry labels it.
        resolver: the identity layer's resolver, or ``None``.
        authenticator: the JWT layer's authenticator, or ``None``.
        authorizer: the service-wide authorizer, or ``None`` without an authz layer.
        limiter: the rate limiter, or ``None`` without a rate-limit layer.
        tracer_provider: the provider built from ``config.tracing``, or ``None``.
        propagator: the propagator built from ``config.tracing``, or ``None``.
    """

    layers: tuple[str, ...]
    workload: WorkloadInfo
    resolver: IdentityResolver | None = None
    authenticator: JwtAuthenticator | None = None
    authorizer: Authorizer | None = None
    limiter: RateLimiter | None = None
    tracer_provider: TracerProvider | None = None
    propagator: TextMapPropagator | None = None


def _verifier(bundle: BundleSource, trust_domain: str) -> PeerVerifier:
    if isinstance(bundle, TrustBundles):
        return PeerVerifier(bundle)
    if isinstance(bundle, (str, os.PathLike)):
        return PeerVerifier(TrustBundles.from_file(bundle, default_trust_domain=trust_domain))
    return PeerVerifier(bundle)


def build_parts(
    config: InboundConfig,
    *,
    rate_limit_backend: RateLimitBackend | None = None,
    tracer_provider: TracerProvider | None = None,
) -> StackParts:
    """Build the neutral parts of a stack from ``config``.

    Args:
        config: the inbound configuration.
        rate_limit_backend: the rate limiter's backend, instead of a new one from
            ``config.rate_limit.backend`` (a stack rebuilt on a configuration change keeps
            its buckets this way); the caller keeps ownership and closes it.
        tracer_provider: the tracer provider to use instead of building one from
            ``config.tracing`` (only used when ``config.tracing`` is set).

    Raises:
        ConfigurationError: ``config`` is not an :class:`InboundConfig`, the bundle file
            cannot be read, or a JWT key source is invalid.
    """
    if not isinstance(config, InboundConfig):
        raise ConfigurationError(
            f"expected an InboundConfig, got {_type_name(config)}", field="config", value=config
        )
    layers = config.layers()
    parts = StackParts(layers=layers, workload=config.workload())
    if "identity" in layers and config.bundle is not None:
        parts.resolver = IdentityResolver(
            _verifier(config.bundle, config.trust_domain),
            trusted_proxies=TrustedProxies.parse(config.trusted_proxies),
        )
    if "jwt" in layers:
        parts.authenticator = JwtAuthenticator(config.jwt_rules)
    if "authz" in layers:
        parts.authorizer = config.authorizer()
    if "ratelimit" in layers:
        parts.limiter = RateLimiter(
            config.rate_limit if config.rate_limit is not None else RateLimitPolicy(),
            backend=rate_limit_backend,
        )
    if config.tracing is not None:
        parts.tracer_provider = (
            configure_tracing(config.tracing) if tracer_provider is None else tracer_provider
        )
        parts.propagator = build_propagator(config.tracing.propagators)
    return parts


class LayerSpec(NamedTuple):
    """One layer of a stack to build: which middleware, and what to pass it.

    Attributes:
        name: the layer's name, one of :data:`LAYERS`; both shells have a middleware for it.
        arguments: the keyword arguments that middleware takes after the application it wraps
            (the same for the ASGI and the WSGI middleware of a name).
    """

    name: str
    arguments: Mapping[str, Any]


def layer_specs(config: InboundConfig, parts: StackParts) -> tuple[LayerSpec, ...]:
    """The layers of a stack, innermost first (the order to wrap the application in).

    Args:
        config: the inbound configuration.
        parts: its neutral parts, from :func:`build_parts`; ``parts.layers`` says which layers
            there are.
    """
    present = parts.layers
    specs: list[LayerSpec] = []
    if "ratelimit" in present:
        specs.append(LayerSpec("ratelimit", {"limiter": parts.limiter, "routes": config.routes}))
    if "authz" in present:
        specs.append(
            LayerSpec(
                "authz",
                {
                    "authorizer": parts.authorizer,
                    "routes": config.routes,
                    "explain": config.explain_denials,
                },
            )
        )
    if "jwt" in present:
        specs.append(LayerSpec("jwt", {"authenticator": parts.authenticator}))
    if "identity" in present and parts.resolver is not None:
        specs.append(
            LayerSpec(
                "identity",
                {"resolver": parts.resolver, "require_identity": config.require_identity},
            )
        )
    if "deadline" in present:
        specs.append(
            LayerSpec(
                "deadline",
                {"default_timeout": config.default_timeout, "max_timeout": config.max_timeout},
            )
        )
    skip_paths: frozenset[str] = frozenset()
    if "health" in present:
        live_path, ready_path = _HEALTH_PATHS
        specs.append(
            LayerSpec(
                "health",
                {
                    "checks": config.health,
                    "live_path": live_path,
                    "ready_path": ready_path,
                    "service_id": config.service,
                    "version": config.version,
                },
            )
        )
        skip_paths = frozenset(_HEALTH_PATHS)
    if "telemetry" in present:
        specs.append(
            LayerSpec(
                "telemetry",
                {
                    "workload": parts.workload,
                    "metrics": config.metrics,
                    "tracer_provider": parts.tracer_provider,
                    "propagator": parts.propagator,
                    "access_log": config.access_log,
                    "metrics_path": config.metrics_path,
                    "skip_paths": skip_paths,
                },
            )
        )
    return tuple(specs)


_App = TypeVar("_App")


class MeshStackBase(Generic[_App]):
    """What the ASGI and the WSGI ``MeshStack`` share: an application wrapped in the inbound
    mesh, and the parts of the mesh it exposes. Each shell adds how it is called and closed.

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
        app: _App,
        entry: _App,
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

    def __repr__(self) -> str:
        names = " -> ".join(type(layer).__name__ for layer in self.layers)
        return f"<MeshStack {self.config.service}: {names or 'no layers'} -> {self.app!r}>"


_Stack = TypeVar("_Stack", bound=MeshStackBase[Any])


def assemble_stack(
    stack: type[_Stack],
    middleware: Mapping[str, Callable[..., _App]],
    app: _App,
    config: InboundConfig,
    *,
    rate_limit_backend: RateLimitBackend | None = None,
    tracer_provider: TracerProvider | None = None,
) -> _Stack:
    """Build a stack of one shell: ``build_asgi_stack`` and ``build_wsgi_stack`` in full.

    Args:
        stack: the shell's ``MeshStack`` class.
        middleware: the shell's middleware class of each name in :data:`LAYERS`.
        app: the application to wrap.
        config: the inbound configuration.
        rate_limit_backend: passed to :func:`build_parts`.
        tracer_provider: passed to :func:`build_parts`.

    Raises:
        ConfigurationError: as :func:`build_parts`.
    """
    parts = build_parts(
        config, rate_limit_backend=rate_limit_backend, tracer_provider=tracer_provider
    )
    entry = app
    layers: list[_App] = []
    for spec in layer_specs(config, parts):
        entry = middleware[spec.name](entry, **spec.arguments)
        layers.append(entry)
    layers.reverse()
    return stack(
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
