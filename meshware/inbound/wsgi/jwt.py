"""``JwtAuthenticationMiddleware`` for WSGI: the twin of ``meshware.inbound.asgi.jwt``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

from meshware.inbound.asgi.jwt import JwtCore
from meshware.inbound.facts import facts_from_environ
from meshware.inbound.record import record_of
from meshware.inbound.responses import start_json
from meshware.policy.jwt import InvalidToken, JwtAuthenticator, JwtRule
from meshware.types import Environ, StartResponse, WSGIApp

__all__ = ["JwtAuthenticationMiddleware", "environ_key"]

_SPECIAL: Final = {"content-type": "CONTENT_TYPE", "content-length": "CONTENT_LENGTH"}


def environ_key(header: str) -> str:
    """The environ key of a header name: ``x-api-key`` is ``HTTP_X_API_KEY``."""
    return _SPECIAL.get(header) or "HTTP_" + header.upper().replace("-", "_")


class JwtAuthenticationMiddleware:
    """WSGI JWT request authentication, as Istio's ``RequestAuthentication``.

    The WSGI twin of :class:`meshware.inbound.asgi.JwtAuthenticationMiddleware`, with the same
    arguments and behaviour; tokens are verified with the blocking
    :meth:`~meshware.policy.jwt.JwtAuthenticator.authenticate`, and the token header is
    removed from (and the payload header added to) the environ the application sees.

    Args:
        app: the WSGI application to wrap.
        rules: the accepted issuers (Istio's ``jwtRules``).
        authenticator: an authenticator built by the caller, instead of ``rules``.

    Raises:
        ConfigurationError: neither or both of ``rules`` and ``authenticator``, or a rule
            the authenticator refuses.

    Attributes:
        authenticator: the :class:`~meshware.policy.jwt.JwtAuthenticator` in use.
    """

    __slots__ = ("_core", "app", "authenticator")

    def __init__(
        self,
        app: WSGIApp,
        *,
        rules: Sequence[JwtRule] = (),
        authenticator: JwtAuthenticator | None = None,
    ) -> None:
        self.app = app
        self._core = JwtCore(rules, authenticator)
        self.authenticator = self._core.authenticator

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        core = self._core
        record = record_of(environ)
        facts = facts_from_environ(environ, record)
        try:
            result = core.authenticator.authenticate(facts.headers, facts.query)
        except InvalidToken as exc:
            body, headers = core.failed(record, exc)
            return start_json(start_response, 401, body, headers)
        remove, added = core.header_changes(facts.headers, result)
        for name in remove:
            environ.pop(environ_key(name), None)
        if added is not None:
            environ[environ_key(added[0])] = added[1]
        core.accepted(record, facts, result, remove, added)
        return self.app(environ, start_response)
