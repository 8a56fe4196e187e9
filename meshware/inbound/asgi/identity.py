"""``IdentityMiddleware`` for ASGI: establishes the caller's verified identity."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from meshware.identity.resolve import IdentityResolver, TrustedProxies
from meshware.inbound.identity import missing_identity_body, refusal
from meshware.inbound.record import IDENTITY_KEY, RECORD_KEY, RequestRecord, record_of
from meshware.inbound.responses import send_json
from meshware.types import ASGIApp, Receive, Scope, Send


class IdentityMiddleware:
    """Puts the caller's verified :class:`~meshware.identity.Identity` on every request.

    The identity is stored in ``scope["meshware.identity"]`` (absent when the caller is
    unauthenticated) and in the request record read by telemetry and authorization. A
    presented certificate that fails verification gets 403; a malformed
    ``x-forwarded-client-cert`` from a trusted proxy gets 400.

    Args:
        app: the ASGI application to wrap.
        resolver: the resolver chain (see :mod:`meshware.identity.resolve`).
        require_identity: refuse (403) requests with no verified identity, except on
            ``exempt_paths``. Useful behind a proxy under STRICT mTLS.
        exempt_paths: exact paths that never require an identity (health probes).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        resolver: IdentityResolver,
        require_identity: bool = False,
        exempt_paths: Iterable[str] = ("/livez", "/readyz"),
    ) -> None:
        self.app = app
        self.resolver = resolver
        self.require_identity = require_identity
        self.exempt_paths = frozenset(exempt_paths)

    @classmethod
    def from_bundle(
        cls, app: ASGIApp, *, bundle: str, trusted_proxies: Iterable[str] = (), **kwargs: Any
    ) -> IdentityMiddleware:
        """Build from a trust bundle file path (see :class:`IdentityResolver` for the rest)."""
        from meshware.identity.bundle import PeerVerifier, TrustBundles

        resolver = IdentityResolver(
            PeerVerifier(TrustBundles.from_file(bundle)),
            trusted_proxies=TrustedProxies.parse(trusted_proxies),
        )
        return cls(app, resolver=resolver, **kwargs)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        refused = self.admit(scope, scope.get(RECORD_KEY))
        if refused is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            await send_json(send, *refused)
        else:
            await send({"type": "websocket.close", "code": 1008})

    def admit(self, scope: Scope, record: RequestRecord | None) -> tuple[int, bytes] | None:
        """Resolve the caller of an ``http`` or ``websocket`` request and note it in the scope
        and the request's record; return the ``(status, body)`` to refuse it with, or ``None``.

        Without ``record``, one is created in the scope only when there is something to note.
        """
        resolution = self.resolver.resolve_scope(scope)
        identity = resolution.identity
        if identity is not None:
            scope[IDENTITY_KEY] = identity
            record = record or record_of(scope)
            record.identity = identity
        error = resolution.error
        problem = error.reason if error is not None else resolution.ignored
        if problem is not None:
            record = record or record_of(scope)
            record.identity_error = problem
        refused = None if error is None else refusal(resolution)
        if (
            refused is None
            and identity is None
            and self.require_identity
            and scope["path"] not in self.exempt_paths
        ):
            (record or record_of(scope)).identity_error = problem or "no-identity"
            refused = (403, missing_identity_body())
        return refused
