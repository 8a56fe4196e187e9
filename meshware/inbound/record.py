"""What the inbound stack learns about one request, shared between its layers.

The outermost layer (telemetry) creates one ``RequestRecord`` per request and stores it in the
ASGI scope or WSGI environ under ``RECORD_KEY``; inner layers fill in what they decide (the
caller's identity, the authorization decision, a rate-limit verdict) and the outer layer reads it
after the response to write metrics, span attributes and the access log. A layer used alone,
without telemetry, creates the record itself (``record_of_scope`` / ``record_of_environ``).
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshware.identity.identity import Identity
    from meshware.policy.facts import RequestFacts

RECORD_KEY = "meshware.record"
"""Scope / environ key of the request's ``RequestRecord``."""

IDENTITY_KEY = "meshware.identity"
"""Scope / environ key of the caller's verified ``Identity`` (absent when unauthenticated)."""


@dataclass(slots=True)
class RequestRecord:
    """Mutable per-request notes written by inner layers and read by the outer ones.

    Attributes:
        request_id: the ``x-request-id`` of the request (taken from the request or generated).
        identity: the caller's verified identity, or ``None``.
        identity_error: why a presented identity was not accepted (a short reason code).
        request_principal: ``"<iss>/<sub>"`` of a validated JWT, or ``None``.
        authz_decision: ``"allow"``, ``"deny"``, or ``None`` when authorization did not run.
        authz_policy: name of the policy that decided, if any.
        authz_reason: a one-line explanation of the decision.
        authz_dry_run: the outcome a dry-run policy would have had (``"allow"``/``"deny"``).
        authz_dry_run_policy: the dry-run policy that would have decided.
        ratelimit_rule: the rate-limit rule whose verdict was reported.
        ratelimit: ``"allowed"``, ``"limited"``, ``"shadow-limited"``, ``"backend-error"``, or ``None``.
        route: the route template, where a framework has told us.
        extra: room for additional fields a layer wants in the access log.
        claims: the validated JWT's claims, or ``None`` when no token was validated.
        authz_rule: the index of the deciding policy's first matching rule, if any.
        facts: the request's :class:`~meshware.policy.facts.RequestFacts`, built once by the
            first layer that needs them (see ``meshware.inbound.facts``) and shared by the
            layers after it.
        response_headers: header fields (ASGI pairs) for the telemetry layer to add to the
            response along with the request id; the fused stack path puts the rate-limit
            fields here instead of wrapping ``send`` once more.
    """

    request_id: str | None = None
    identity: Identity | None = None
    identity_error: str | None = None
    request_principal: str | None = None
    authz_decision: str | None = None
    authz_policy: str | None = None
    authz_reason: str | None = None
    authz_dry_run: str | None = None
    authz_dry_run_policy: str | None = None
    ratelimit: str | None = None
    ratelimit_rule: str | None = None
    route: str | None = None
    extra: dict[str, Any] | None = None
    claims: Mapping[str, Any] | None = None
    authz_rule: int | None = None
    facts: RequestFacts | None = None
    response_headers: list[tuple[bytes, bytes]] | None = None


def record_of(mapping: MutableMapping[str, Any]) -> RequestRecord:
    """Return the record in an ASGI scope or WSGI environ, creating it if absent."""
    record = mapping.get(RECORD_KEY)
    if record is None:
        record = mapping[RECORD_KEY] = RequestRecord()
    return record  # type: ignore[no-any-return,unused-ignore]
