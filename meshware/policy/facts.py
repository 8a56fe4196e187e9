"""The plain facts about one inbound request that every policy core decides over.

The inbound shells (ASGI and WSGI) build one ``RequestFacts`` per request; policy cores
never see a scope or an environ, so they can be unit-tested with plain values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestFacts:
    """What is known about a request when a policy decides on it.

    Attributes:
        method: the HTTP method, upper-case (``"GET"``).
        path: the request path as received, still percent-encoded, without the query.
        query: the raw query string without the leading ``?`` (``""`` when absent).
        host: the ``Host`` header (or ``:authority``), lower-case, without the port.
        port: the port the request arrived on (the server's port), when known.
        headers: request headers with lower-case names; a repeated header's values are
            joined with ``", "`` as HTTP allows.
        source_ip: the direct peer's IP address (not taken from ``x-forwarded-for``).
        source_principal: the verified caller's principal
            (``"cluster.local/ns/default/sa/orders"``), or ``None`` when unauthenticated.
        source_namespace: the verified caller's namespace, or ``None``.
        request_principal: ``"<iss>/<sub>"`` of a validated JWT, or ``None``.
        claims: the validated JWT's claims (empty when there is no token).
        route: the route template (``"/api/users/{id}"``) where the framework knows it.
    """

    method: str
    path: str
    query: str = ""
    host: str = ""
    port: int | None = None
    headers: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    source_ip: str | None = None
    source_principal: str | None = None
    source_namespace: str | None = None
    request_principal: str | None = None
    claims: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    route: str | None = None
