"""``JwtAuthenticationMiddleware`` for ASGI: verifies the request's JWT, if it carries one.

Istio's ``RequestAuthentication`` in-process. A request without a token passes on
unauthenticated; a request with an invalid token is answered ``401`` here; a valid token's
principal and claims go to the request record (and so to the request facts that
authorization and rate limiting decide on). The core is
:class:`~meshware.policy.jwt.JwtAuthenticator`; see ``docs/jwt.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

from meshware.exceptions import ConfigurationError
from meshware.inbound.facts import facts_from_scope, updated
from meshware.inbound.record import RequestRecord, record_of
from meshware.inbound.responses import json_body, send_json
from meshware.policy.facts import RequestFacts
from meshware.policy.jwt import InvalidToken, JwtAuthenticator, JwtResult, JwtRule
from meshware.types import ASGIApp, Receive, Scope, Send

__all__ = ["JWT_ERROR_FIELD", "JwtAuthenticationMiddleware", "JwtCore"]

JWT_ERROR_FIELD: Final = "jwt_error"
"""The ``RequestRecord.extra`` key (and access-log field) of an invalid token's reason."""


class JwtCore:
    """What both JWT shells share: the authenticator and the precomputed header names.

    The arguments are those of :class:`JwtAuthenticationMiddleware`.
    """

    __slots__ = ("authenticator", "output_names")

    def __init__(self, rules: Sequence[JwtRule], authenticator: JwtAuthenticator | None) -> None:
        if authenticator is not None:
            if rules:
                raise ConfigurationError(
                    "expected either rules or an authenticator, not both",
                    field="rules",
                    value=rules,
                )
            if not isinstance(authenticator, JwtAuthenticator):
                raise ConfigurationError(
                    "expected a JwtAuthenticator", field="authenticator", value=authenticator
                )
        elif not rules:
            raise ConfigurationError(
                "expected at least one JwtRule, or an authenticator", field="rules", value=rules
            )
        else:
            authenticator = JwtAuthenticator(rules)
        self.authenticator = authenticator
        # Headers the layer writes for the application: a client's own copies never pass.
        self.output_names: frozenset[str] = frozenset(
            rule.output_payload_to_header
            for rule in authenticator.rules
            if rule.output_payload_to_header is not None
        )

    def failed(
        self, record: RequestRecord, exc: InvalidToken
    ) -> tuple[bytes, list[tuple[str, str]]]:
        """Note an invalid token on the record; return the 401 body and headers."""
        extra = record.extra
        if extra is None:
            extra = record.extra = {}
        extra[JWT_ERROR_FIELD] = exc.reason
        body = json_body(401, "unauthorized", exc.description, reason=exc.reason)
        return body, [("WWW-Authenticate", exc.www_authenticate)]

    def header_changes(
        self, headers: Mapping[str, str], result: JwtResult | None
    ) -> tuple[frozenset[str], tuple[str, str] | None]:
        """The header names to remove from the request and the header to add, if any."""
        remove = self.output_names.intersection(headers) if self.output_names else frozenset()
        added = None
        if result is not None:
            if result.header_to_strip is not None and result.header_to_strip in headers:
                remove = remove | {result.header_to_strip}
            added = result.output_header
        return remove, added

    @staticmethod
    def accepted(
        record: RequestRecord,
        facts: RequestFacts,
        result: JwtResult | None,
        remove: frozenset[str],
        added: tuple[str, str] | None,
    ) -> None:
        """Note a valid token on the record, and fold the header changes into its facts."""
        changes: dict[str, Any] = {}
        if remove or added is not None:
            headers = {k: v for k, v in facts.headers.items() if k not in remove}
            if added is not None:
                headers[added[0]] = added[1]
            changes["headers"] = headers
        if result is not None:
            record.request_principal = result.principal
            record.claims = result.claims
            changes["request_principal"] = result.principal
            changes["claims"] = result.claims
        if changes:
            record.facts = updated(facts, **changes)


class JwtAuthenticationMiddleware:
    """Pure-ASGI JWT request authentication, as Istio's ``RequestAuthentication``.

    For each ``http`` or ``websocket`` request:

    - no token in any configured location: the request passes on unauthenticated (an
      authorization policy decides whether that is acceptable, e.g. with
      ``request_principals=["*"]``);
    - an invalid token: ``401`` with ``{"status": 401, "error": "unauthorized", "detail":
      <a fixed phrase>, "reason": <code>}`` and ``WWW-Authenticate: Bearer
      error="invalid_token", error_description="..."`` (a websocket is closed with 1008); the
      reason is noted in the access log as ``jwt_error``;
    - a valid token: ``record.request_principal`` (``"<iss>/<sub>"``) and ``record.claims``
      are set for authorization and rate limiting; the token header is removed from the
      request unless the rule sets ``forward_original_token``; the payload is added in the
      rule's ``output_payload_to_header``, if any.

    A header named by some rule's ``output_payload_to_header`` is always removed from incoming
    requests first, so a client can never supply claims of its own. Tokens are verified with
    :meth:`~meshware.policy.jwt.JwtAuthenticator.authenticate_async`, so fetching a JWKS never
    blocks the event loop.

    Args:
        app: the ASGI application to wrap.
        rules: the accepted issuers (Istio's ``jwtRules``); a
            :class:`~meshware.policy.jwt.JwtAuthenticator` is built from them.
        authenticator: an authenticator built by the caller (to share it, or to give it
            clocks and HTTP clients), instead of ``rules``.

    Raises:
        ConfigurationError: neither or both of ``rules`` and ``authenticator``, or a rule
            the authenticator refuses.

    Attributes:
        authenticator: the :class:`~meshware.policy.jwt.JwtAuthenticator` in use.
    """

    __slots__ = ("_core", "app", "authenticator")

    def __init__(
        self,
        app: ASGIApp,
        *,
        rules: Sequence[JwtRule] = (),
        authenticator: JwtAuthenticator | None = None,
    ) -> None:
        self.app = app
        self._core = JwtCore(rules, authenticator)
        self.authenticator = self._core.authenticator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        core = self._core
        record = record_of(scope)
        facts = facts_from_scope(scope, record)
        try:
            result = await core.authenticator.authenticate_async(facts.headers, facts.query)
        except InvalidToken as exc:
            body, headers = core.failed(record, exc)
            if kind == "http":
                await send_json(send, 401, body, headers)
            else:
                await send({"type": "websocket.close", "code": 1008})
            return
        remove, added = core.header_changes(facts.headers, result)
        if remove or added is not None:
            _rewrite_headers(scope, remove, added)
        core.accepted(record, facts, result, remove, added)
        await self.app(scope, receive, send)


def _rewrite_headers(scope: Scope, remove: frozenset[str], added: tuple[str, str] | None) -> None:
    names = {name.encode("latin-1") for name in remove}
    headers = [pair for pair in scope["headers"] if pair[0].lower() not in names]
    if added is not None:
        name = added[0].encode("latin-1")
        headers = [pair for pair in headers if pair[0].lower() != name]
        headers.append((name, added[1].encode("latin-1")))
    scope["headers"] = headers
