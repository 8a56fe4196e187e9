"""The ``MESHWARE`` settings dict, and the mesh of this process built from it.

``settings.MESHWARE`` holds the settings of ``docs/settings.md`` under upper-case keys::

    MESHWARE = {
        "SERVICE": "inventory",
        "CERT_DIR": BASE_DIR / "certs",
        "POLICIES": [{"name": "no-admin", "action": "DENY",
                      "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]}],
        "RATE_LIMIT": "100/second burst 20",
    }

They merge with ``MESHWARE_*`` environment variables and the config file, the dict first
(:func:`meshware.settings.load_settings`). :func:`mesh` builds the process's
:class:`DjangoMesh` from them once, and builds it anew when a test changes ``MESHWARE`` with
``override_settings``.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final

import httpx

from meshware.inbound.asgi.authz import AuthzCore
from meshware.inbound.asgi.ratelimit import RateLimitCore
from meshware.outbound.client import mesh_client, mesh_sync_client
from meshware.policy.authz import AuthorizationPolicy, Authorizer, route_policies
from meshware.policy.ratelimit import (
    RateLimitKey,
    RateLimitPolicy,
    RateLimitRule,
    route_rate_limits,
)
from meshware.settings import MeshSettings, SettingsSource, load_settings
from meshware_django.decorators import kept_declarations

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from meshware.inbound.asgi.stack import MeshStack as AsgiStack
    from meshware.inbound.health import HealthChecks
    from meshware.inbound.stack import InboundConfig
    from meshware.inbound.wsgi.stack import MeshStack as WsgiStack
    from meshware.outbound.client import OutboundConfig
    from meshware.telemetry.metrics import MeshMetrics
    from meshware.types import ASGIApp, WSGIApp

__all__ = [
    "MIDDLEWARE_PATH",
    "SETTING",
    "DjangoMesh",
    "ViewPlan",
    "mesh",
    "reset",
    "settings_source",
]

SETTING: Final = "MESHWARE"
"""The name of the Django setting holding meshware's settings dict."""

MIDDLEWARE_PATH: Final = "meshware_django.middleware.MeshwareMiddleware"
"""The middleware's dotted path, as ``MIDDLEWARE`` lists it."""

_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)
# method_decorator() hands decorators a stand-in function from this module; declarations it
# carries are renamed after the view's method.
_STAND_IN: Final = "django.utils.decorators."


def settings_source() -> SettingsSource:
    """``settings.MESHWARE`` as a :class:`~meshware.settings.SettingsSource` (an absent
    setting is an empty dict).

    Raises:
        InvalidSetting: ``MESHWARE`` is not a dict.
    """
    from django.conf import settings  # type: ignore[import-untyped]

    raw = getattr(settings, SETTING, None)
    return SettingsSource.keyed(
        {} if raw is None else raw, name="settings.MESHWARE", template='MESHWARE["{}"]'
    )


@dataclass(frozen=True, slots=True)
class ViewPlan:
    """What applies to the requests of one view and method, worked out once.

    Attributes:
        authorizer: the service-wide policies and the view's own, or ``None`` when none apply.
        authz_headers: whether a policy reads request headers.
        rules: the view's own rate-limit rules.
        limited: whether any rate-limit rule (service-wide or the view's) may apply.
        limit_headers: whether a rule's key reads request headers.
    """

    authorizer: Authorizer | None
    authz_headers: bool
    rules: tuple[RateLimitRule, ...]
    limited: bool
    limit_headers: bool


def _policies_read_headers(policies: Sequence[AuthorizationPolicy]) -> bool:
    return any(
        condition.key.startswith("request.headers[")
        for policy in policies
        for rule in policy.rules
        for condition in rule.when
    )


def _rules_read_headers(rules: Sequence[RateLimitRule]) -> bool:
    # A function key may read anything, headers included.
    return any(
        callable(part) or (isinstance(part, str) and part.lower().startswith("header:"))
        for rule in rules
        for part in RateLimitKey.of(rule.key).parts
    )


def _targets(view: object, method: str) -> tuple[object, list[object]]:
    """The objects a view's declarations may sit on, and the owner its default names use."""
    targets: list[object] = [view]
    view_class = getattr(view, "view_class", None)
    if not isinstance(view_class, type):
        return view, targets
    targets.append(view_class)
    name = method.lower()
    if name in getattr(view_class, "http_method_names", ()):
        handler = getattr(view_class, name, None)
        if handler is None and name == "head":  # View.setup() serves HEAD with get()
            handler = getattr(view_class, "get", None)
        if handler is not None:
            targets.append(handler)
            return handler, targets
    return view_class, targets


def _owner_name(owner: object, view: object) -> str:
    view_class = getattr(view, "view_class", None)
    if isinstance(view_class, type) and owner is not view_class:
        return f"{view_class.__module__}.{view_class.__qualname__}.{getattr(owner, '__name__', '')}"
    module = getattr(owner, "__module__", None) or "view"
    return f"{module}.{getattr(owner, '__qualname__', type(owner).__qualname__)}"


def declarations(
    view: object, method: str
) -> tuple[tuple[AuthorizationPolicy, ...], tuple[RateLimitRule, ...]]:
    """The ``@authorize`` policies and ``@rate_limit`` rules that apply to ``method`` requests
    of a Django view.

    They are read from the view function (Django's decorators keep them: ``functools.wraps``
    copies attributes), and for a class-based view (``View.as_view()``) also from the class
    and from the method handler (``get``, ``post``, ...; ``get`` for ``HEAD`` when there is no
    ``head``), decorated directly or with ``method_decorator``. Declarations given through
    ``method_decorator`` are named after the view's method unless they have a name.
    """
    owner, targets = _targets(view, method)
    policies: list[AuthorizationPolicy] = []
    rules: list[RateLimitRule] = []
    for target in targets:
        kept = _kept(target)
        for policy in (*route_policies(target), *kept):
            if isinstance(policy, AuthorizationPolicy) and not any(
                policy is known for known in policies
            ):
                policies.append(policy)
        for rule in (*route_rate_limits(target), *kept):
            if isinstance(rule, RateLimitRule) and not any(rule is known for known in rules):
                rules.append(rule)
    base = _owner_name(owner, view)
    taken_policies = {p.name for p in policies}
    for index, policy in enumerate(policies):
        if policy.name.startswith(_STAND_IN):
            name = _unique(base, taken_policies)
            policies[index] = replace(policy, name=name)
    taken_rules = {r.name for r in rules}
    for index, rule in enumerate(rules):
        if rule.name.startswith(_STAND_IN):
            rules[index] = replace(rule, name=_unique(base, taken_rules))
    return tuple(policies), tuple(rules)


def _kept(target: object) -> list[object]:
    """Declarations kept by ``meshware_django``'s decorators, along ``__wrapped__`` chains."""
    found: list[object] = []
    seen: set[int] = set()
    current: object | None = target
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        found.extend(kept_declarations(current))
        current = getattr(current, "__func__", None) or getattr(current, "__wrapped__", None)
    return found


def _unique(base: str, taken: set[str]) -> str:
    candidate, number = base, 1
    while candidate in taken:
        number += 1
        candidate = f"{base}#{number}"
    taken.add(candidate)
    return candidate


class DjangoMesh:
    """The mesh of one Django process: settings, the stack's configuration, the policy cores
    and the mesh clients. Get it with :func:`mesh`.

    Args:
        settings: the merged settings.

    Attributes:
        settings: the :class:`~meshware.settings.MeshSettings`.
        inbound: the configuration of the server-level stack (telemetry, health, deadline,
            identity, JWT); authorization and rate limits are left to the middleware, which
            knows the view.
        authz: the authorization core holding the service-wide policies.
        limiter: the rate-limit core holding the service-wide rules (and the backend that
            keeps every bucket, the views' included).
    """

    def __init__(self, settings: MeshSettings) -> None:
        self.settings = settings
        self.inbound: InboundConfig = settings.inbound_config(policies=(), rate_limit=None)
        self.authz = AuthzCore(settings.policies, None, None, None, settings.explain_denials)
        policy = settings.rate_limit if settings.rate_limit is not None else RateLimitPolicy()
        self.limiter = RateLimitCore(policy, None, None)
        self._plans: dict[tuple[int, str], tuple[object, ViewPlan]] = {}
        service_policies = self.authz.authorizer.policies
        self._unrouted = self._plan((), ())
        self.guards_unrouted = bool(service_policies) or self.limiter.has_rules
        self._lock = threading.Lock()
        self._client: httpx.Client | None = None
        self._async_clients: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, httpx.AsyncClient
        ] = weakref.WeakKeyDictionary()
        self._tracer_provider: TracerProvider | None = None
        self._own_provider = False

    @property
    def health(self) -> HealthChecks | None:
        """The health checks behind ``/readyz``; register your own with ``health.add()``."""
        return self.inbound.health

    @property
    def metrics(self) -> MeshMetrics | None:
        """The Prometheus metrics of both directions (served at ``/metrics``)."""
        return self.inbound.metrics

    # -- the stack ------------------------------------------------------------------------------

    def wsgi_stack(self, app: WSGIApp) -> WsgiStack:
        """A WSGI stack of :attr:`inbound` around ``app``."""
        from meshware.inbound.wsgi.stack import build_wsgi_stack

        stack = build_wsgi_stack(app, self.inbound)
        self._adopt(stack.tracer_provider)
        return stack

    def asgi_stack(self, app: ASGIApp) -> AsgiStack:
        """An ASGI stack of :attr:`inbound` around ``app``."""
        from meshware.inbound.asgi.stack import build_asgi_stack

        stack = build_asgi_stack(app, self.inbound)
        self._adopt(stack.tracer_provider)
        return stack

    def _adopt(self, provider: TracerProvider | None) -> None:
        if self._tracer_provider is None and provider is not None:
            self._tracer_provider = provider

    # -- per view -------------------------------------------------------------------------------

    def _plan(
        self, policies: tuple[AuthorizationPolicy, ...], rules: tuple[RateLimitRule, ...]
    ) -> ViewPlan:
        service = self.authz.authorizer
        authorizer: Authorizer | None = service if service.policies else None
        if policies:
            authorizer = Authorizer(
                (*service.policies, *policies), path_normalization=service.path_normalization
            )
        return ViewPlan(
            authorizer=authorizer,
            authz_headers=authorizer is not None and _policies_read_headers(authorizer.policies),
            rules=rules,
            limited=self.limiter.has_rules or bool(rules),
            limit_headers=self.limiter.reads_headers or _rules_read_headers(rules),
        )

    def view_plan(self, view: object | None, method: str) -> ViewPlan:
        """The :class:`ViewPlan` of ``method`` requests to ``view`` (``None``: no view
        resolved), worked out on first use and kept.

        Raises:
            ConfigurationError: the view's policies cannot join the service-wide ones (two
                policies share a name).
        """
        if view is None:
            return self._unrouted
        if method not in _METHODS:
            method = ""
        key = (id(view), method)
        cached = self._plans.get(key)
        if cached is not None and cached[0] is view:
            return cached[1]
        plan = self._plan(*declarations(view, method))
        self._plans[key] = (view, plan)
        return plan

    # -- outbound -------------------------------------------------------------------------------

    def outbound_config(self) -> OutboundConfig:
        """The mesh clients' configuration: the settings, with the inbound side's metrics and
        tracer provider (this process's own when no stack was built here)."""
        provider = self._tracer_provider
        if provider is None and self.settings.tracing:
            from meshware.telemetry.tracing import configure_tracing

            tracing = self.settings.tracing_config()
            if tracing is not None:
                provider = self._tracer_provider = configure_tracing(tracing)
                self._own_provider = True
        return self.settings.outbound_config(metrics=self.metrics, tracer_provider=provider)

    def client(self) -> httpx.Client:
        """The process's sync mesh client (an ``httpx.Client``, shared by all threads)."""
        found = self._client
        if found is None or found.is_closed:
            with self._lock:
                found = self._client
                if found is None or found.is_closed:
                    found = self._client = mesh_sync_client(self.outbound_config())
        return found

    def async_client(self) -> httpx.AsyncClient:
        """The async mesh client of the running event loop (one per loop, since an
        ``httpx.AsyncClient``'s connections belong to the loop that opened them).

        Raises:
            RuntimeError: no event loop is running.
        """
        loop = asyncio.get_running_loop()
        found = self._async_clients.get(loop)
        if found is None or found.is_closed:
            found = self._async_clients[loop] = mesh_client(self.outbound_config())
        return found

    def close(self) -> None:
        """Close the sync client, and the tracer provider built here for the clients."""
        with self._lock:
            found, self._client = self._client, None
        if found is not None:
            found.close()
        if self._own_provider and self._tracer_provider is not None:
            self._tracer_provider.shutdown()
            self._tracer_provider = None
            self._own_provider = False

    async def aclose(self) -> None:
        """Close the running event loop's async client (call it from that loop)."""
        found = self._async_clients.pop(asyncio.get_running_loop(), None)
        if found is not None:
            await found.aclose()


_current: DjangoMesh | None = None
_lock = threading.Lock()


def mesh(factory: Callable[[], MeshSettings] | None = None) -> DjangoMesh:
    """The :class:`DjangoMesh` of this process, built from the settings on first use.

    Args:
        factory: how to load the settings; ``settings.MESHWARE`` merged with the environment
            and the config file by default.

    Raises:
        InvalidSetting: a setting is unknown, missing or invalid.
    """
    global _current
    found = _current
    if found is None:
        with _lock:
            found = _current
            if found is None:
                load = factory or (lambda: load_settings(framework=settings_source()))
                found = _current = DjangoMesh(load())
    return found


def reset(**_: Any) -> None:
    """Forget the process's mesh, so the next :func:`mesh` reads the settings again (a
    ``setting_changed`` receiver for ``MESHWARE``); its sync client is closed."""
    global _current
    with _lock:
        old, _current = _current, None
    if old is not None:
        old.close()


def _on_setting_changed(*, setting: str, **kwargs: Any) -> None:
    if setting == SETTING:
        reset()
