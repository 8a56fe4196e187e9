"""``IdentityMiddleware`` for WSGI: establishes the caller's verified identity."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from meshware.identity.resolve import IdentityResolver, TrustedProxies
from meshware.inbound.identity import missing_identity_body, refusal
from meshware.inbound.record import IDENTITY_KEY, record_of
from meshware.inbound.responses import start_json
from meshware.types import Environ, StartResponse, WSGIApp


class IdentityMiddleware:
    """Puts the caller's verified identity in ``environ["meshware.identity"]``.

    The WSGI twin of :class:`meshware.inbound.asgi.IdentityMiddleware`, with the same
    arguments and behaviour; the peer certificate comes from the server's TLS socket
    (gunicorn) or ``SSL_CLIENT_CERT``.
    """

    def __init__(
        self,
        app: WSGIApp,
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
        cls, app: WSGIApp, *, bundle: str, trusted_proxies: Iterable[str] = (), **kwargs: Any
    ) -> IdentityMiddleware:
        """Build from a trust bundle file path."""
        from meshware.identity.bundle import PeerVerifier, TrustBundles

        resolver = IdentityResolver(
            PeerVerifier(TrustBundles.from_file(bundle)),
            trusted_proxies=TrustedProxies.parse(trusted_proxies),
        )
        return cls(app, resolver=resolver, **kwargs)

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        resolution = self.resolver.resolve_environ(environ)
        identity = resolution.identity
        if identity is not None:
            environ[IDENTITY_KEY] = identity
            record_of(environ).identity = identity
        problem = resolution.error.reason if resolution.error is not None else resolution.ignored
        if problem is not None:
            record_of(environ).identity_error = problem
        refused = refusal(resolution)
        if (
            refused is None
            and identity is None
            and self.require_identity
            and environ.get("PATH_INFO", "") not in self.exempt_paths
        ):
            record_of(environ).identity_error = problem or "no-identity"
            refused = (403, missing_identity_body())
        if refused is not None:
            return start_json(start_response, *refused)
        return self.app(environ, start_response)
