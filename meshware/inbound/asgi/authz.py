"""``AuthorizationMiddleware`` for ASGI: Istio's AuthorizationPolicy, enforced in-process.

The decision core is :class:`~meshware.policy.authz.Authorizer`; this shell normalizes the
path, finds the route's own policies, decides on the request facts, notes the decision in the
request record and answers 403 or 400 itself. :class:`AuthzCore` holds what the ASGI and WSGI
shells share. See ``docs/authorization.md``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final, TypeAlias
from urllib.parse import unquote

from meshware.exceptions import ConfigurationError
from meshware.inbound.facts import facts_from_scope, raw_path_of_scope, updated
from meshware.inbound.record import RECORD_KEY, RequestRecord, record_of
from meshware.inbound.responses import json_body, send_json
from meshware.inbound.routes import RouteResolver, route_of_scope
from meshware.policy.authz import AuthorizationPolicy, Authorizer, AuthzDecision, route_policies
from meshware.policy.paths import DEFAULT_PATH_NORMALIZATION, InvalidPath, PathNormalization
from meshware.types import ASGIApp, Receive, Scope, Send

__all__ = [
    "AUDIT_FIELD",
    "DENIED_DETAIL",
    "AuthorizationMiddleware",
    "AuthzCore",
    "SavedPath",
    "restore_path",
]

DENIED_DETAIL: Final = "RBAC: access denied"
"""The ``detail`` of a 403 answer: Envoy's RBAC filter's text, which Istio users know."""

AUDIT_FIELD: Final = "authz_audit"
"""The ``RequestRecord.extra`` key (and access-log field) listing matched AUDIT policies."""

_PATH_DETAILS: Final = {
    "too-long": "the request path is too long",
    "control-character": "the request path contains a control character",
    "invalid-percent-encoding": "the request path has a '%' not followed by two hex digits",
    "invalid-utf8": "the request path is not valid UTF-8",
    "escaped-slash": "the request path contains a percent-encoded slash or backslash",
    "backslash": "the request path contains a backslash",
    "ambiguous-dot-segment": "the request path has a dot segment with parameters",
    "outside-script-name": "the normalized request path leaves the application's mount point",
}
_DENIED_BODY: Final = json_body(403, "forbidden", DENIED_DETAIL)


def _reads_headers(policies: Iterable[AuthorizationPolicy]) -> bool:
    return any(
        condition.key.startswith("request.headers[")
        for policy in policies
        for rule in policy.rules
        for condition in rule.when
    )


class AuthzCore:
    """What both authorization shells share; the arguments are the middleware's.

    Raises:
        ConfigurationError: see :class:`AuthorizationMiddleware`.
    """

    __slots__ = (
        "_by_handler",
        "authorizer",
        "default",
        "explain",
        "normalize",
        "routes",
    )

    def __init__(
        self,
        policies: Sequence[AuthorizationPolicy],
        authorizer: Authorizer | None,
        routes: RouteResolver | None,
        path_normalization: PathNormalization | None,
        explain: bool,
    ) -> None:
        if authorizer is not None:
            if not isinstance(authorizer, Authorizer):
                raise ConfigurationError(
                    "expected an Authorizer", field="authorizer", value=authorizer
                )
            if policies:
                raise ConfigurationError(
                    "expected either policies or an authorizer, not both",
                    field="policies",
                    value=policies,
                )
            if path_normalization is not None:
                raise ConfigurationError(
                    "set the path normalization on the Authorizer given",
                    field="path_normalization",
                    value=path_normalization,
                )
        else:
            if isinstance(policies, AuthorizationPolicy):
                raise ConfigurationError(
                    "expected a list of AuthorizationPolicy, got one policy",
                    field="policies",
                    value=policies,
                )
            authorizer = Authorizer(
                policies,
                path_normalization=(
                    DEFAULT_PATH_NORMALIZATION if path_normalization is None else path_normalization
                ),
            )
        if routes is not None and not isinstance(routes, RouteResolver):
            raise ConfigurationError(
                "expected a RouteResolver such as StarletteRoutes(app) or FlaskRoutes(app)",
                field="routes",
                value=routes,
            )
        if not isinstance(explain, bool):
            raise ConfigurationError("expected True or False", field="explain", value=explain)
        self.authorizer = authorizer
        self.routes = routes
        self.explain = explain
        self.normalize = authorizer.path_normalization.normalize
        # (the authorizer, or None when no policy applies; whether it reads headers)
        self.default: tuple[Authorizer | None, bool] = (
            authorizer if authorizer.policies else None,
            _reads_headers(authorizer.policies),
        )
        self._by_handler: dict[int, tuple[object, Authorizer | None, bool]] = {}

    def for_handler(self, handler: object | None) -> tuple[Authorizer | None, bool]:
        """The authorizer for a request served by ``handler``, and whether it reads headers.

        The handler's own policies (:func:`~meshware.policy.authz.route_policies`) join the
        service-wide ones in one :class:`Authorizer`, built on first use and kept.

        Raises:
            ConfigurationError: a handler's policy clashes with the service-wide ones (a
                duplicate name), raised on the first request the handler serves.
        """
        if handler is None:
            return self.default
        cached = self._by_handler.get(id(handler))
        if cached is not None and cached[0] is handler:
            return cached[1], cached[2]
        own = route_policies(handler)
        if own:
            policies = (*self.authorizer.policies, *own)
            try:
                authorizer = Authorizer(
                    policies, path_normalization=self.authorizer.path_normalization
                )
            except ConfigurationError as exc:
                raise ConfigurationError(
                    f"the policies of handler {handler!r} cannot join the service-wide ones: {exc}",
                    field="routes",
                    value=handler,
                ) from exc
            entry: tuple[object, Authorizer | None, bool] = (
                handler,
                authorizer,
                _reads_headers(policies),
            )
        else:
            entry = (handler, *self.default)
        self._by_handler[id(handler)] = entry
        return entry[1], entry[2]

    def admit_scope(
        self, scope: Scope, record: RequestRecord
    ) -> tuple[tuple[int, bytes] | None, SavedPath | None, AuthzDecision | None]:
        """Normalize the path of an ASGI request, find its route and decide on it.

        Returns:
            ``(refusal, saved, decision)``: the ``(status, body)`` to refuse the request with
            (400 for a path that cannot be normalized, 403 when denied) or ``None``; the
            scope's path before it was rewritten to the normalized one, for
            :func:`restore_path` once the request is served (``None`` when unchanged); and the
            decision (``None`` when no policy applies). The decision, route and facts are
            noted in ``record``.
        """
        facts = record.facts
        raw = raw_path_of_scope(scope) if facts is None else facts.path
        try:
            path = self.normalize(raw)
        except InvalidPath as exc:
            return (400, self.invalid_path(record, exc)), None, None
        saved: SavedPath | None = None
        if path != raw:
            saved = (scope["path"], scope.get("raw_path"))
            _rewrite(scope, raw, path)
        try:
            authorizer, needs_headers = self.default
            if self.routes is not None:
                match = route_of_scope(scope, self.routes, record)
                authorizer, needs_headers = self.for_handler(
                    None if match is None else match.handler
                )
            if authorizer is None:
                if saved is not None and record.facts is not None:
                    record.facts = updated(record.facts, path=path)
                return None, saved, None
            facts = facts_from_scope(scope, record, headers=needs_headers, path=path)
            decision = authorizer.decide(facts)
        except BaseException:
            if saved is not None:
                restore_path(scope, saved)
            raise
        denied = self.decided(record, decision)
        return (None if denied is None else (403, denied)), saved, decision

    @staticmethod
    def invalid_path(record: RequestRecord, exc: InvalidPath) -> bytes:
        """Note an unusable path on the record; return the 400 body."""
        record.authz_decision = "deny"
        record.authz_reason = str(exc)
        detail = _PATH_DETAILS.get(exc.reason, "the request path cannot be normalized safely")
        return json_body(400, "bad_request", detail, reason=exc.reason)

    def decided(self, record: RequestRecord, decision: AuthzDecision) -> bytes | None:
        """Note the decision on the record; return the 403 body when it denies."""
        allowed = decision.allowed
        record.authz_decision = "allow" if allowed else "deny"
        record.authz_policy = decision.policy
        record.authz_rule = decision.rule
        record.authz_reason = decision.reason
        dry_allowed = decision.dry_run_allowed
        if dry_allowed is not None:
            record.authz_dry_run = "allow" if dry_allowed else "deny"
            record.authz_dry_run_policy = next(
                (m.policy for m in decision.dry_run if m.would_allow is dry_allowed), None
            )
        if decision.audited:
            extra = record.extra
            if extra is None:
                extra = record.extra = {}
            extra[AUDIT_FIELD] = list(decision.audited)
        if allowed:
            return None
        if not self.explain:
            return _DENIED_BODY
        return json_body(
            403,
            "forbidden",
            DENIED_DETAIL,
            policy=decision.policy,
            rule=decision.rule,
            reason=decision.reason,
        )


class AuthorizationMiddleware:
    """Pure-ASGI authorization with the semantics of Istio's AuthorizationPolicy.

    For each ``http`` or ``websocket`` request:

    1. The path is normalized (:class:`~meshware.policy.paths.PathNormalization`); a path
       that cannot be normalized safely is answered ``400`` with
       ``{"status": 400, "error": "bad_request", "detail": ..., "reason": <code>}``, the code
       being :class:`~meshware.policy.paths.InvalidPath`'s (``"escaped-slash"``, ...).
    2. With ``routes``, the route is resolved on the normalized path, its template noted in
       the record, and the handler's own policies (declared with
       :func:`~meshware.policy.authz.authorize`) join the service-wide ones, exactly as if
       they were all service-wide.
    3. When policies apply, the request facts (identity and JWT from the layers before) are
       decided on. The decision goes to the record: ``authz_decision``, ``authz_policy``,
       ``authz_rule``, ``authz_reason``, and the dry-run outcome and policy; matched AUDIT
       policies are listed in the access log as ``authz_audit``.
    4. A denied request is answered ``403`` with Istio's body,
       ``{"status": 403, "error": "forbidden", "detail": "RBAC: access denied"}`` and nothing
       about the policies, unless ``explain`` (then ``"policy"``, ``"rule"`` and ``"reason"``
       are added); a websocket is closed with 1008.
    5. An allowed request reaches the application with the normalized path in
       ``scope["path"]`` and ``scope["raw_path"]`` (when normalization changed it), so the
       application routes exactly what was authorized. Both are restored once the application
       returns, so outer layers log the path as received.

    With no policy for a request (none service-wide, none on its handler), nothing is decided
    or recorded; the path is still normalized.

    Args:
        app: the ASGI application to wrap.
        policies: the service-wide policies.
        authorizer: an :class:`~meshware.policy.authz.Authorizer` built by the caller,
            instead of ``policies`` and ``path_normalization``.
        routes: a :class:`~meshware.inbound.routes.RouteResolver` (``StarletteRoutes(app)``)
            to apply per-route policies; ``None`` applies the service-wide ones only.
        path_normalization: how paths are normalized; the strict defaults when ``None``.
        explain: add the deciding policy, rule and reason to 403 bodies. For development:
            it tells a caller how the policies are written.

    Raises:
        ConfigurationError: both ``policies`` and ``authorizer``, an invalid policy set (see
            :class:`~meshware.policy.authz.Authorizer`), or an argument of the wrong type.

    Attributes:
        authorizer: the service-wide :class:`~meshware.policy.authz.Authorizer`.
        routes: the route resolver, or ``None``.
    """

    __slots__ = ("_core", "app", "authorizer", "routes")

    def __init__(
        self,
        app: ASGIApp,
        *,
        policies: Sequence[AuthorizationPolicy] = (),
        authorizer: Authorizer | None = None,
        routes: RouteResolver | None = None,
        path_normalization: PathNormalization | None = None,
        explain: bool = False,
    ) -> None:
        self.app = app
        self._core = AuthzCore(policies, authorizer, routes, path_normalization, explain)
        self.authorizer = self._core.authorizer
        self.routes = routes

    @property
    def core(self) -> AuthzCore:
        """The shell-neutral part, shared with the fused stack path."""
        return self._core

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        refused, saved, _ = self._core.admit_scope(scope, scope.get(RECORD_KEY) or record_of(scope))
        try:
            if refused is not None:
                await _refuse(send, kind, *refused)
                return
            await self.app(scope, receive, send)
        finally:
            if saved is not None:
                restore_path(scope, saved)


SavedPath: TypeAlias = "tuple[str, bytes | None]"
"""A scope's ``path`` and ``raw_path`` before the authorization layer rewrote them."""


def restore_path(scope: Scope, saved: SavedPath) -> None:
    """Give the scope back the path it had before :meth:`AuthzCore.admit_scope` rewrote it."""
    scope["path"] = saved[0]
    if saved[1] is None:
        scope.pop("raw_path", None)
    else:
        scope["raw_path"] = saved[1]


def _rewrite(scope: Scope, raw: str, path: str) -> None:
    """Hand the application the normalized path, in ``path`` (decoded) and ``raw_path``."""
    old: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    # Servers that include root_path in path but not in raw_path keep that shape.
    prefix = (
        root_path
        if root_path and old.startswith(root_path) and not unquote(raw).startswith(root_path)
        else ""
    )
    scope["path"] = prefix + unquote(path)
    scope["raw_path"] = path.encode("ascii")


async def _refuse(send: Send, kind: str, status: int, body: bytes) -> None:
    if kind == "http":
        await send_json(send, status, body)
    else:
        await send({"type": "websocket.close", "code": 1008})
