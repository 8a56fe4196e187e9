"""``AuthorizationMiddleware`` for WSGI: the twin of ``meshware.inbound.asgi.authz``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from urllib.parse import unquote_to_bytes

from meshware.inbound.asgi.authz import AuthzCore
from meshware.inbound.facts import facts_from_environ, raw_path_of_environ, updated
from meshware.inbound.record import record_of
from meshware.inbound.responses import start_json
from meshware.inbound.routes import RouteResolver, route_of_environ
from meshware.policy.authz import AuthorizationPolicy, Authorizer
from meshware.policy.paths import InvalidPath, PathNormalization
from meshware.types import Environ, StartResponse, WSGIApp

__all__ = ["AuthorizationMiddleware"]


class AuthorizationMiddleware:
    """WSGI authorization with the semantics of Istio's AuthorizationPolicy.

    The WSGI twin of :class:`meshware.inbound.asgi.AuthorizationMiddleware`, with the same
    arguments and behaviour. The path decided on is gunicorn's ``RAW_URI`` (or
    ``REQUEST_URI``) when the server provides it, else ``SCRIPT_NAME + PATH_INFO`` encoded
    again. When normalization changes the path, the application is called with a copy of the
    environ whose ``PATH_INFO`` is the normalized path (decoded, as PEP 3333 wants it), as are
    ``RAW_URI`` and ``REQUEST_URI`` when present; a normalized path that no longer starts with ``SCRIPT_NAME`` is answered ``400`` with
    reason ``"outside-script-name"``.

    Args:
        app: the WSGI application to wrap.
        policies: the service-wide policies.
        authorizer: an :class:`~meshware.policy.authz.Authorizer` built by the caller,
            instead of ``policies`` and ``path_normalization``.
        routes: a :class:`~meshware.inbound.routes.RouteResolver` (``FlaskRoutes(app)``) to
            apply per-route policies; ``None`` applies the service-wide ones only.
        path_normalization: how paths are normalized; the strict defaults when ``None``.
        explain: add the deciding policy, rule and reason to 403 bodies.

    Raises:
        ConfigurationError: both ``policies`` and ``authorizer``, an invalid policy set, or
            an argument of the wrong type.

    Attributes:
        authorizer: the service-wide :class:`~meshware.policy.authz.Authorizer`.
        routes: the route resolver, or ``None``.
    """

    __slots__ = ("_core", "app", "authorizer", "routes")

    def __init__(
        self,
        app: WSGIApp,
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

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        core = self._core
        record = record_of(environ)
        facts = record.facts
        raw = raw_path_of_environ(environ) if facts is None else facts.path
        try:
            path = core.normalize(raw)
            if path != raw:
                environ = _rewritten(environ, path)
        except InvalidPath as exc:
            return start_json(start_response, 400, core.invalid_path(record, exc))
        authorizer, needs_headers = core.default
        if core.routes is not None:
            match = route_of_environ(environ, core.routes, record)
            authorizer, needs_headers = core.for_handler(None if match is None else match.handler)
        if authorizer is not None:
            facts = facts_from_environ(environ, record, headers=needs_headers, path=path)
            denied = core.decided(record, authorizer.decide(facts))
            if denied is not None:
                return start_json(start_response, 403, denied)
        elif path != raw and record.facts is not None:
            record.facts = updated(record.facts, path=path)
        return self.app(environ, start_response)


def _rewritten(environ: Environ, path: str) -> Environ:
    """A copy of the environ for the application, with the normalized path.

    A copy, so that the outer layers keep the environ (and the path) as received.
    """
    copy = dict(environ)
    copy["PATH_INFO"] = _path_info(environ, path)
    query = environ.get("QUERY_STRING")
    target = f"{path}?{query}" if query else path
    for key in ("RAW_URI", "REQUEST_URI"):
        if key in copy:
            copy[key] = target
    return copy


def _path_info(environ: Environ, path: str) -> str:
    """``PATH_INFO`` for a normalized path: decoded as latin-1, without ``SCRIPT_NAME``."""
    decoded = unquote_to_bytes(path).decode("latin-1")
    script_name: str = environ.get("SCRIPT_NAME", "")
    if not script_name:
        return decoded
    rest = decoded[len(script_name) :]
    if decoded.startswith(script_name) and (not rest or rest.startswith("/")):
        return rest
    raise InvalidPath(
        "the normalized path leaves the application's mount point",
        reason="outside-script-name",
        path=path,
    )
