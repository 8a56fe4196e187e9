"""``RateLimitMiddleware`` for ASGI: local or Redis-backed limits, 429 with standard headers.

The decision core is :class:`~meshware.policy.ratelimit.RateLimiter`; this shell charges the
service-wide rules and the handler's own (:func:`~meshware.policy.ratelimit.rate_limit`),
notes the verdict in the request record, answers 429 or 503 itself and adds the
``RateLimit-Policy`` / ``RateLimit`` fields to allowed responses. :class:`RateLimitCore` holds
what the ASGI and WSGI shells share. See ``docs/rate-limiting.md``.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping, Sequence
from math import ceil as _ceil
from typing import Any, Final, Literal, TypeAlias, overload

from meshware.exceptions import ConfigurationError
from meshware.inbound.facts import facts_from_scope
from meshware.inbound.record import RECORD_KEY, RequestRecord, record_of
from meshware.inbound.responses import json_body, send_json
from meshware.inbound.routes import RouteMatch, RouteResolver, route_of_scope
from meshware.policy.facts import RequestFacts
from meshware.policy.ratelimit import (
    RateLimitCharges,
    RateLimitDecision,
    RateLimiter,
    RateLimitKey,
    RateLimitPolicy,
    RateLimitRule,
    route_rate_limits,
)
from meshware.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["RateLimitCore", "RateLimitMiddleware"]

_LIMITED_BODY: Final = json_body(429, "too_many_requests", "rate limit exceeded")
_UNAVAILABLE_BODY: Final = json_body(503, "service_unavailable", "rate limit backend unavailable")
_NO_RULES: tuple[RateLimitRule, ...] = ()
# The status, body and header fields of a refused request.
_Refusal: TypeAlias = "tuple[int, bytes, list[tuple[str, str]]]"
_LOWER: Final = {
    name: name.lower().encode("latin-1")
    for name in (
        "RateLimit-Policy",
        "RateLimit",
        "Retry-After",
        "X-RateLimit-Limit",
        "X-RateLimit-Remaining",
        "X-RateLimit-Reset",
    )
}
_RATELIMIT_POLICY: Final = _LOWER["RateLimit-Policy"]
_RATELIMIT: Final = _LOWER["RateLimit"]
_MAX_POLICIES: Final = 1024  # encoded RateLimit-Policy values kept (one per rule in use)


def _reads_headers(rules: Sequence[RateLimitRule]) -> bool:
    # A function key may read anything, headers included.
    return any(
        callable(part) or (isinstance(part, str) and part.lower().startswith("header:"))
        for rule in rules
        for part in RateLimitKey.of(rule.key).parts
    )


class RateLimitCore:
    """What both rate-limit shells share; the arguments are the middleware's.

    Raises:
        ConfigurationError: see :class:`RateLimitMiddleware`.
    """

    __slots__ = ("_by_handler", "_policies", "has_rules", "limiter", "reads_headers", "routes")

    def __init__(
        self,
        policy: RateLimitPolicy | None,
        limiter: RateLimiter | None,
        routes: RouteResolver | None,
    ) -> None:
        if limiter is not None:
            if policy is not None:
                raise ConfigurationError(
                    "expected either a policy or a limiter, not both", field="policy", value=policy
                )
            if not isinstance(limiter, RateLimiter):
                raise ConfigurationError("expected a RateLimiter", field="limiter", value=limiter)
        elif policy is None:
            raise ConfigurationError(
                "expected a RateLimitPolicy, or a limiter", field="policy", value=policy
            )
        else:
            limiter = RateLimiter(policy)
        if routes is not None and not isinstance(routes, RouteResolver):
            raise ConfigurationError(
                "expected a RouteResolver such as StarletteRoutes(app) or FlaskRoutes(app)",
                field="routes",
                value=routes,
            )
        self.limiter = limiter
        self.routes = routes
        rules = limiter.policy.rules
        self.has_rules = bool(rules)
        self.reads_headers = _reads_headers(rules)
        self._by_handler: dict[int, tuple[object, tuple[RateLimitRule, ...], bool]] = {}
        self._policies: dict[tuple[str, int | None, int | None], bytes] = {}

    def for_handler(self, handler: object | None) -> tuple[tuple[RateLimitRule, ...], bool]:
        """The handler's own rules, and whether any rule that may apply reads headers."""
        if handler is None:
            return _NO_RULES, self.reads_headers
        cached = self._by_handler.get(id(handler))
        if cached is None or cached[0] is not handler:
            rules = route_rate_limits(handler)
            cached = (handler, rules, self.reads_headers or _reads_headers(rules))
            self._by_handler[id(handler)] = cached
        return cached[1], cached[2]

    def charges_of_scope(self, scope: Scope, record: RequestRecord) -> RateLimitCharges | None:
        """What an ASGI request charges (:meth:`RateLimiter.charges_for`: the service-wide
        rules and its handler's own), or ``None`` when no rule may apply to it."""
        return self.charges_of(scope, record, route_of_scope, facts_from_scope)

    def charges_of(
        self,
        request: MutableMapping[str, Any],
        record: RequestRecord,
        route_of: Callable[
            [MutableMapping[str, Any], RouteResolver, RequestRecord], RouteMatch | None
        ],
        facts_of: Callable[..., RequestFacts],
    ) -> RateLimitCharges | None:
        """What a request charges, or ``None`` when no rule may apply to it: an ASGI scope
        with :func:`route_of_scope` and :func:`facts_from_scope`, a WSGI environ with their
        ``environ`` twins."""
        route_rules, needs_headers = _NO_RULES, self.reads_headers
        if self.routes is not None:
            match = route_of(request, self.routes, record)
            if match is not None:
                route_rules, needs_headers = self.for_handler(match.handler)
        if not (self.has_rules or route_rules):
            return None
        facts = facts_of(request, record, headers=needs_headers)
        return self.limiter.charges_for(facts, route_rules)

    def encoded(self, decision: RateLimitDecision) -> list[tuple[bytes, bytes]]:
        """The header fields of an allowed decision (:meth:`RateLimitDecision.headers`), as
        ASGI header pairs: lower-case names, values encoded."""
        rule = decision.rule
        if rule is not None and decision.header_mode == "ietf" and decision.status != 429:
            # The usual pair; the policy field is the same for every request of a rule.
            key = (rule, decision.limit, decision.window)
            policy = self._policies.get(key)
            if policy is None:
                policy = f'"{rule}";q={decision.limit};w={decision.window}'.encode("latin-1")
                if len(self._policies) < _MAX_POLICIES:
                    self._policies[key] = policy
            reset = max(0, _ceil(decision.reset_after - 1e-6))
            current = f'"{rule}";r={decision.remaining};t={reset}'.encode("latin-1")
            return [(_RATELIMIT_POLICY, policy), (_RATELIMIT, current)]
        return [
            (_LOWER.get(name) or name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in decision.headers()
        ]

    @staticmethod
    def note(record: RequestRecord, decision: RateLimitDecision) -> None:
        """Note the verdict on the record (when a rule applied or the backend failed)."""
        if decision.rule is not None or decision.shadow_limited or decision.backend_error:
            outcome = decision.outcome
            record.ratelimit = outcome
            record.ratelimit_rule = (
                decision.shadow_rule if outcome == "shadow-limited" else decision.rule
            )

    @overload
    def decided(
        self, record: RequestRecord, decision: RateLimitDecision, *, asgi: Literal[True]
    ) -> _Refusal | list[tuple[bytes, bytes]]: ...

    @overload
    def decided(
        self, record: RequestRecord, decision: RateLimitDecision, *, asgi: Literal[False] = False
    ) -> _Refusal | list[tuple[str, str]]: ...

    def decided(
        self, record: RequestRecord, decision: RateLimitDecision, *, asgi: bool = False
    ) -> _Refusal | list[tuple[str, str]] | list[tuple[bytes, bytes]]:
        """Note the verdict on the record.

        Returns:
            ``(status, body, headers)`` to answer with, or the header fields to add to the
            application's response (possibly none): ``(name, value)`` text pairs, or with
            ``asgi`` the ASGI pairs of :meth:`encoded`.
        """
        if not decision.allowed:
            return self.refused(record, decision)
        self.note(record, decision)
        return self.encoded(decision) if asgi else decision.headers()

    @staticmethod
    def refused(record: RequestRecord, decision: RateLimitDecision) -> _Refusal:
        """Note a verdict that refuses the request; return ``(status, body, headers)``."""
        RateLimitCore.note(record, decision)
        if decision.backend_error:
            return 503, _UNAVAILABLE_BODY, []
        return 429, _LIMITED_BODY, decision.headers()


class RateLimitMiddleware:
    """Pure-ASGI rate limiting, as Envoy's local and global rate limit filters.

    For each ``http`` or ``websocket`` request, every service-wide rule that applies and every
    rule of the request's handler (with ``routes``) is charged
    (:meth:`~meshware.policy.ratelimit.RateLimiter.decide_async`). Then:

    - limited: ``429`` with ``{"status": 429, "error": "too_many_requests", "detail": "rate
      limit exceeded"}``, ``Retry-After`` and the ``RateLimit-Policy`` / ``RateLimit`` fields
      of the policy's header style; a websocket is closed with 1013 (try again later);
    - the backend failed and ``failure_mode`` is ``"closed"``: ``503`` with ``"error":
      "service_unavailable"``;
    - allowed (shadow-limited included): the request goes on, and the reported rule's
      ``RateLimit-Policy`` / ``RateLimit`` fields are added to the application's response.

    The verdict is noted in ``record.ratelimit`` (``"allowed"``, ``"limited"``,
    ``"shadow-limited"``, ``"backend-error"``) and ``record.ratelimit_rule``, for metrics and
    the access log; a request no rule applied to leaves both unset.

    Args:
        app: the ASGI application to wrap.
        policy: the service's :class:`~meshware.policy.ratelimit.RateLimitPolicy`; a
            :class:`~meshware.policy.ratelimit.RateLimiter` is built from it. Use a policy
            without rules to apply only per-handler limits.
        limiter: a limiter built by the caller (to share one, or give it a clock or a
            backend), instead of ``policy``.
        routes: a :class:`~meshware.inbound.routes.RouteResolver` (``StarletteRoutes(app)``)
            to apply per-handler limits; ``None`` applies the policy's rules only.

    Raises:
        ConfigurationError: neither or both of ``policy`` and ``limiter``, or an argument of
            the wrong type.

    Attributes:
        limiter: the :class:`~meshware.policy.ratelimit.RateLimiter` in use; close it with
            ``await middleware.limiter.aclose()`` at shutdown.
        routes: the route resolver, or ``None``.
    """

    __slots__ = ("_core", "app", "limiter", "routes")

    def __init__(
        self,
        app: ASGIApp,
        *,
        policy: RateLimitPolicy | None = None,
        limiter: RateLimiter | None = None,
        routes: RouteResolver | None = None,
    ) -> None:
        self.app = app
        self._core = RateLimitCore(policy, limiter, routes)
        self.limiter = self._core.limiter
        self.routes = routes

    @property
    def core(self) -> RateLimitCore:
        """The shell-neutral part, shared with the fused stack path."""
        return self._core

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        core = self._core
        record = scope.get(RECORD_KEY) or record_of(scope)
        charges = core.charges_of_scope(scope, record)
        if charges is None:
            await self.app(scope, receive, send)
            return
        verdict = core.decided(record, await core.limiter.charge_async(charges), asgi=True)
        if isinstance(verdict, tuple):
            if kind == "http":
                await send_json(send, *verdict)
            else:
                await send({"type": "websocket.close", "code": 1013})
            return
        extra = verdict if kind == "http" else None
        if not extra:
            await self.app(scope, receive, send)
            return

        async def send_with_fields(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*(message.get("headers") or ()), *extra]
            await send(message)

        await self.app(scope, receive, send_with_fields)
