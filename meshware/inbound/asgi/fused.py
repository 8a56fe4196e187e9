"""The layers after telemetry, fused into one call for each HTTP request.

Nested, the inbound layers cost a middleware call each, and each works out again per request
what it worked out for the last request of the same shape: the same caller behind the same
proxy asking for the same path gets the same identity, the same normalized path, route and
authorization decision, and charges the same rate-limit buckets. :class:`FusedLayers` runs
the cores of the deadline, identity, authorization and rate-limit layers in one call, exactly
as the nested layers would, and keeps what they decided as a *plan* for the next request of
that shape. A request whose plan is known is served by replaying it: the record, the scope
and the 403 (if any) come out as they would from the layers, and only what must happen per
request happens: the deadline is read, the rate-limit buckets are charged, the request goes
to the application.

``build_asgi_stack`` installs it as the telemetry layer's ``handler`` when the stack has a
telemetry layer and no JWT layer (a token is checked on every request, so a stack with JWT
rules keeps the nested layers). The nested layers stay in place: lifespan, websockets, health
probes, the metrics path and the first request before lifespan (which marks the service
ready) go through them, and each layer still works alone.

Which requests share a plan: the same method, path (decoded and raw), root path, ``Host``
header, peer address, server port, ``x-forwarded-client-cert`` value and client certificate
chain. Those are all the inputs of what a plan holds, as long as no policy or rule reads a
header (then the facts carry the headers, and nothing is kept). Not kept either: refused
identities and ignored forwarded certificates (counted and logged per request), paths that
cannot be normalized (400), an ``x-forwarded-client-cert`` longer than 4 KiB. A plan is
dropped when the trust bundles change and when the caller's certificate expires. At most
:data:`PLAN_CACHE_SIZE` plans are kept, oldest dropped first.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import TYPE_CHECKING, Final

from meshware.inbound.asgi.authz import AuthzCore, SavedPath, restore_path
from meshware.inbound.asgi.deadline import TIMEOUT_HEADER_BYTES, DeadlineCore
from meshware.inbound.facts import has_headers, updated
from meshware.inbound.record import IDENTITY_KEY, RECORD_KEY, RequestRecord, record_of
from meshware.inbound.responses import send_json
from meshware.inbound.routes import ROUTE_KEY, RouteMatch
from meshware.outbound.deadline import InvalidTimeoutHeader, deadline_scope

if TYPE_CHECKING:
    from meshware.identity.bundle import PeerVerifier, TrustBundles
    from meshware.identity.identity import Identity
    from meshware.inbound.asgi.health import HealthMiddleware
    from meshware.inbound.asgi.identity import IdentityMiddleware
    from meshware.inbound.asgi.ratelimit import RateLimitCore
    from meshware.policy.authz import AuthzDecision
    from meshware.policy.facts import RequestFacts
    from meshware.policy.ratelimit import RateLimitCharges
    from meshware.types import ASGIApp, Receive, Scope, Send

__all__ = ["PLAN_CACHE_SIZE", "FusedLayers"]

PLAN_CACHE_SIZE: Final = 4096
"""How many request shapes a stack remembers the plan of."""

_XFCC: Final = b"x-forwarded-client-cert"
_MAX_XFCC: Final = 4096  # longer forwarded certificates are verified on every request
_time = time.time


class _Plan:
    """What the layers decided for one shape of request (see the module docstring)."""

    __slots__ = (
        "bundles",
        "charges",
        "decision",
        "expires",
        "facts",
        "identity",
        "match",
        "refusal",
        "rewrite",
        "routed",
    )

    def __init__(
        self,
        *,
        identity: Identity | None,
        bundles: TrustBundles | None,
        expires: float,
        rewrite: tuple[str, bytes] | None,
        routed: bool,
        match: RouteMatch | None,
        decision: AuthzDecision | None,
        refusal: tuple[int, bytes] | None,
        facts: RequestFacts | None,
        charges: RateLimitCharges | None,
    ) -> None:
        self.identity = identity
        self.bundles = bundles  # the trust bundles in force when the identity was resolved
        self.expires = expires  # when the caller's certificate expires (epoch seconds)
        self.rewrite = rewrite  # the normalized (path, raw_path) handed to the application
        self.routed = routed  # whether a layer resolved the route
        self.match = match
        self.decision = decision  # the authorization decision, when a policy applied
        self.refusal = refusal  # the 403 of a denied request
        self.facts = facts
        self.charges = charges  # the rate-limit buckets to charge, when a rule applied


class FusedLayers:
    """The deadline, identity, authorization and rate-limit layers of a stack in one call.

    An ASGI callable for the HTTP requests the telemetry layer measures; the module
    docstring says what it does and when a stack uses it.

    Args:
        app: the user's application.
        layered: the nested layers after telemetry (health first), for the requests that
            must go through them.
        health: the stack's health layer, or ``None``.
        deadline: the deadline layer's core, or ``None``.
        identity: the identity layer, or ``None``.
        authz: the authorization layer's core, or ``None``.
        ratelimit: the rate-limit layer's core, or ``None``.
        cache_size: the most plans kept.
    """

    __slots__ = (
        "_app",
        "_authz",
        "_deadline",
        "_health",
        "_identity",
        "_layered",
        "_plans",
        "_ratelimit",
        "_size",
        "_verifier",
    )

    def __init__(
        self,
        app: ASGIApp,
        *,
        layered: ASGIApp,
        health: HealthMiddleware | None,
        deadline: DeadlineCore | None,
        identity: IdentityMiddleware | None,
        authz: AuthzCore | None,
        ratelimit: RateLimitCore | None,
        cache_size: int = PLAN_CACHE_SIZE,
    ) -> None:
        self._app = app
        self._layered = layered
        self._health = health
        self._deadline = deadline
        self._identity = identity
        self._verifier: PeerVerifier | None = (
            None if identity is None else identity.resolver.verifier
        )
        self._authz = authz
        self._ratelimit = ratelimit
        self._plans: dict[tuple[object, ...], _Plan] = {}
        self._size = cache_size

    def __len__(self) -> int:
        """The number of plans kept."""
        return len(self._plans)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        health = self._health
        if health is not None and health.awaiting_first_request:
            await self._layered(scope, receive, send)
            return
        record = scope.get(RECORD_KEY) or record_of(scope)
        xfcc = host = timeout = None
        for name, value in scope["headers"]:
            if name == _XFCC:
                xfcc = value if xfcc is None else xfcc + b"," + value
            elif name == b"host":
                if host is None:
                    host = value
            elif name == TIMEOUT_HEADER_BYTES and timeout is None:
                timeout = value
        deadline = None
        core = self._deadline
        if core is not None and (timeout is not None or core.default_timeout is not None):
            try:
                deadline = core.deadline(timeout)
            except InvalidTimeoutHeader as exc:
                await send_json(send, 400, DeadlineCore.malformed(record, exc))
                return
        client = scope.get("client")
        server = scope.get("server")
        chain = None
        extensions = scope.get("extensions")
        if extensions:
            tls = extensions.get("tls")
            if tls:
                chain = tuple(tls.get("client_cert_chain") or ()) or None
        # A longer forwarded certificate is verified on every request: no plan is kept for it.
        key = (
            None
            if xfcc is not None and len(xfcc) > _MAX_XFCC
            else (
                scope["method"],
                scope["path"],
                scope.get("raw_path"),
                scope.get("root_path", ""),
                host,
                client[0] if client else None,
                server[1] if server else None,
                xfcc,
                chain,
            )
        )
        if deadline is None:
            await self._serve(scope, receive, send, record, key)
        else:
            with deadline_scope(deadline):
                await self._serve(scope, receive, send, record, key)

    async def _serve(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        record: RequestRecord,
        key: tuple[object, ...] | None,
    ) -> None:
        plan = None if key is None else self._plans.get(key)
        if plan is not None and (
            plan.expires <= _time() or (plan.bundles is not None and self._stale(plan.bundles))
        ):
            plan = None
        saved: SavedPath | None = None
        if plan is None:
            refusal, saved, plan = self._decide(scope, record, key)
            if refusal is not None:
                try:
                    await send_json(send, *refusal)
                finally:
                    if saved is not None:
                        restore_path(scope, saved)
                return
        else:
            saved = self._replay(plan, scope, record)
        try:
            if plan is not None:
                if plan.refusal is not None:
                    await send_json(send, *plan.refusal)
                    return
                charges = plan.charges
            else:
                charges = None
            core = self._ratelimit
            if charges is not None and core is not None:  # charges come from that core
                limiter = core.limiter
                decision = (
                    limiter.charge(charges)
                    if limiter.in_process
                    else await limiter.charge_async(charges)
                )
                verdict = core.decided(record, decision, asgi=True)
                if isinstance(verdict, tuple):
                    await send_json(send, *verdict)
                    return
                if verdict:
                    record.response_headers = verdict
            await self._app(scope, receive, send)
        finally:
            if saved is not None:
                restore_path(scope, saved)

    def _stale(self, bundles: TrustBundles) -> bool:
        """Whether the trust bundles changed since ``bundles`` were in force."""
        return self._verifier is not None and self._verifier.bundles is not bundles

    def _decide(
        self, scope: Scope, record: RequestRecord, key: tuple[object, ...] | None
    ) -> tuple[tuple[int, bytes] | None, SavedPath | None, _Plan | None]:
        """Run the layers' cores as the nested layers would.

        Returns:
            ``(refusal, saved, plan)``: an identity refusal or a 400 to send (then no plan),
            the path to restore, and the plan (kept under ``key``, unless that is ``None``,
            when it may be; a 403 is the plan's refusal).
        """
        identity = self._identity
        if identity is not None:
            refused = identity.admit(scope, record)
            if refused is not None:
                return refused, None, None
        saved = decision = refusal = None
        if self._authz is not None:
            refusal, saved, decision = self._authz.admit_scope(scope, record)
            if refusal is not None and refusal[0] != 403:
                return refusal, saved, None
        charges = None
        if refusal is None and self._ratelimit is not None:
            try:  # a key function is the application's code, and may raise
                charges = self._ratelimit.charges_of_scope(scope, record)
            except BaseException:
                if saved is not None:
                    restore_path(scope, saved)
                raise
        caller = record.identity
        expires = math.inf
        if caller is not None and caller.not_after is not None:
            expires = caller.not_after.timestamp()
        facts = record.facts
        plan = _Plan(
            identity=caller,
            bundles=None if self._verifier is None else self._verifier.bundles,
            expires=expires,
            rewrite=None if saved is None else (scope["path"], scope["raw_path"]),
            routed=ROUTE_KEY in scope,
            match=scope.get(ROUTE_KEY),
            decision=decision,
            refusal=refusal,
            facts=facts,
            charges=charges,
        )
        if (
            key is not None
            and record.identity_error is None
            and (facts is None or not has_headers(facts))
        ):
            plans = self._plans
            if len(plans) >= self._size:
                with contextlib.suppress(StopIteration, KeyError, RuntimeError):
                    del plans[next(iter(plans))]
            plans[key] = plan
        return None, saved, plan

    def _replay(self, plan: _Plan, scope: Scope, record: RequestRecord) -> SavedPath | None:
        """Leave in the scope and the record what the layers left for the plan's request."""
        identity = plan.identity
        if identity is not None:
            scope[IDENTITY_KEY] = identity
            record.identity = identity
        saved: SavedPath | None = None
        rewrite = plan.rewrite
        if rewrite is not None:
            saved = (scope["path"], scope.get("raw_path"))
            scope["path"], scope["raw_path"] = rewrite
        if plan.routed:
            match = scope[ROUTE_KEY] = plan.match
            if match is not None:
                record.route = match.template
        if plan.decision is not None and self._authz is not None:
            self._authz.decided(record, plan.decision)
        facts = plan.facts
        if facts is not None:
            query = scope.get("query_string")
            text = query.decode("latin-1") if query else ""
            record.facts = facts if text == facts.query else updated(facts, query=text)
        return saved
