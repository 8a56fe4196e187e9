"""What the inbound stack learns about one request, shared between its layers.

The outermost layer (telemetry) creates one ``RequestRecord`` per request and stores it in the
ASGI scope or WSGI environ under ``RECORD_KEY``; inner layers fill in what they decide (the
caller's identity, the authorization decision, a rate-limit verdict) and the outer layer reads it
after the response to write metrics, span attributes and the access log. A layer used alone,
without telemetry, creates the record itself (``record_of_scope`` / ``record_of_environ``).
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshware.identity.identity import Identity

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
        ratelimit: ``"allowed"``, ``"limited"``, ``"shadow-limited"``, ``"backend-error"``, or ``None``.
        route: the route template, where a framework has told us.
        extra: room for additional fields a layer wants in the access log.
    """

    request_id: str | None = None
    identity: Identity | None = None
    identity_error: str | None = None
    request_principal: str | None = None
    authz_decision: str | None = None
    authz_policy: str | None = None
    authz_reason: str | None = None
    authz_dry_run: str | None = None
    ratelimit: str | None = None
    route: str | None = None
    extra: dict[str, Any] | None = None


def record_of(mapping: MutableMapping[str, Any]) -> RequestRecord:
    """Return the record in an ASGI scope or WSGI environ, creating it if absent."""
    record = mapping.get(RECORD_KEY)
    if record is None:
        record = mapping[RECORD_KEY] = RequestRecord()
    return record  # type: ignore[no-any-return,unused-ignore]
