"""Building one :class:`~meshware.policy.facts.RequestFacts` per request, for every layer.

The policy cores (authorization, rate limiting) decide over plain ``RequestFacts``; the
shells build them here from an ASGI scope or a WSGI environ. The facts are built once, by the
first layer that needs them, and cached on the request's
:class:`~meshware.inbound.record.RequestRecord`, so that JWT authentication, authorization and
rate limiting share one object. What inner layers learn later (the JWT principal and claims,
the route template, the normalized path) is folded into the cached facts as they learn it.

Collecting the request headers into a dict is the most expensive part, and most policies
never read a header. A layer therefore says whether it needs them (``headers=True``); when an
earlier layer built the facts without headers and a later one needs them, they are added then.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import fields, replace
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import quote, urlsplit

from meshware.inbound.record import RequestRecord, record_of
from meshware.policy.facts import RequestFacts
from meshware.policy.paths import encode_raw_path

__all__ = [
    "environ_headers",
    "facts_from_environ",
    "facts_from_scope",
    "has_headers",
    "host_without_port",
    "raw_path_of_environ",
    "raw_path_of_scope",
    "scope_headers",
    "updated",
]

_NO_CLAIMS: Final[Mapping[str, Any]] = MappingProxyType({})
# A distinct empty mapping: "headers were not collected", as opposed to "there were none".
_UNCOLLECTED: Final[Mapping[str, str]] = MappingProxyType({})
# Characters a client may send literally in a path (RFC 3986 pchar and "/"), besides the
# unreserved ones quote() always keeps.
_PATH_SAFE: Final = "/:@!$&'()*+,;="


def host_without_port(host: str) -> str:
    """The host part of a ``Host`` header, lower-case: ``"API.example.com:8443"`` gives
    ``"api.example.com"`` and ``"[::1]:8000"`` gives ``"[::1]"``."""
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1].lower() if end > 0 else host.lower()
    # One colon is a port separator; more than one is a bare IPv6 address.
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.lower()


def scope_headers(scope: Mapping[str, Any]) -> dict[str, str]:
    """The headers of an ASGI scope as a dict of names (lower-case, as ASGI servers give them)
    to values.

    A repeated header's values are joined with ``", "`` (``"; "`` for ``cookie``, which
    HTTP/2 splits into several fields).
    """
    raw = scope.get("headers") or ()
    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in raw}
    if len(headers) == len(raw):
        return headers
    # Some name is repeated: join its values in order.
    headers = {}
    for raw_name, raw_value in raw:
        name = raw_name.decode("latin-1")
        value = raw_value.decode("latin-1")
        if name in headers:
            value = headers[name] + ("; " if name == "cookie" else ", ") + value
        headers[name] = value
    return headers


def environ_headers(environ: Mapping[str, Any]) -> dict[str, str]:
    """The headers of a WSGI environ as a dict of lower-case names to values.

    ``HTTP_X_API_KEY`` becomes ``x-api-key``; ``CONTENT_TYPE`` and ``CONTENT_LENGTH`` are
    included under their header names. The server has already joined repeated headers.
    """
    headers: dict[str, str] = {}
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            headers[key[5:].lower().replace("_", "-")] = value
    content_type = environ.get("CONTENT_TYPE")
    if content_type:
        headers["content-type"] = content_type
    content_length = environ.get("CONTENT_LENGTH")
    if content_length:
        headers["content-length"] = content_length
    return headers


def raw_path_of_scope(scope: Mapping[str, Any]) -> str:
    """The request path as the client sent it, percent-encoded, without the query.

    ASGI's ``raw_path`` when the server provides it (non-ASCII bytes percent-encoded, see
    :func:`~meshware.policy.paths.encode_raw_path`), else the decoded ``path`` encoded again.
    """
    raw = scope.get("raw_path")
    if isinstance(raw, bytes) and raw:
        cut = raw.find(b"?")
        return encode_raw_path(raw if cut < 0 else raw[:cut]) or "/"
    path: str = scope.get("path") or "/"
    return quote(path, safe=_PATH_SAFE)


def raw_path_of_environ(environ: Mapping[str, Any]) -> str:
    """The request path as the client sent it, percent-encoded, without the query.

    gunicorn's ``RAW_URI`` or the ``REQUEST_URI`` of other servers when present (the path as
    received); otherwise ``SCRIPT_NAME + PATH_INFO`` turned back into bytes (PEP 3333 decodes
    them as latin-1) and percent-encoded where a client would have had to.
    """
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if isinstance(raw, str) and raw:
        if not raw.startswith("/") and "://" in raw:
            # absolute-form request target (a request meant for a proxy)
            raw = urlsplit(raw).path or "/"
        cut = raw.find("?")
        return encode_raw_path((raw if cut < 0 else raw[:cut]).encode("latin-1", "replace")) or "/"
    path = str(environ.get("SCRIPT_NAME", "")) + str(environ.get("PATH_INFO", ""))
    try:
        data = path.encode("latin-1")
    except UnicodeEncodeError:  # not PEP 3333, but some servers hand over real text
        data = path.encode("utf-8", "surrogateescape")
    return quote(data, safe=_PATH_SAFE) or "/"


_hosts: dict[bytes, str] = {}
_MAX_HOSTS: Final = 256


def _scope_host(scope: Mapping[str, Any]) -> str:
    for name, value in scope.get("headers") or ():
        if name == b"host":
            # A service is called by a few host names; each is lower-cased once.
            host = _hosts.get(value)
            if host is None:
                host = host_without_port(value.decode("latin-1"))
                if len(_hosts) >= _MAX_HOSTS:
                    _hosts.clear()
                _hosts[value] = host
            return host
    return ""


def _principal_fields(record: RequestRecord) -> tuple[str | None, str | None]:
    identity = record.identity
    if identity is None:
        return None, None
    return identity.principal, identity.namespace


# RequestFacts is a frozen dataclass: its generated __init__ sets each of its twelve slots
# through object.__setattr__, which costs more than the rest of building the facts together.
# On this per-request path the slots are filled through their descriptors instead, when the
# class has exactly the slots expected (otherwise the ordinary constructor is used).
_FIELDS: Final = (
    "method",
    "path",
    "query",
    "host",
    "port",
    "headers",
    "source_ip",
    "source_principal",
    "source_namespace",
    "request_principal",
    "claims",
    "route",
)


def _slot_setters() -> tuple[Callable[[RequestFacts, Any], None], ...] | None:
    if tuple(f.name for f in fields(RequestFacts)) != _FIELDS:
        return None
    setters = []
    for name in _FIELDS:
        descriptor = RequestFacts.__dict__.get(name)
        if descriptor is None or type(descriptor).__name__ != "member_descriptor":
            return None
        setters.append(descriptor.__set__)
    return tuple(setters)


_SETTERS: Final = _slot_setters()


def _make_slow(*values: Any) -> RequestFacts:
    return RequestFacts(**dict(zip(_FIELDS, values, strict=True)))


def _fast_maker() -> Callable[..., RequestFacts]:
    if _SETTERS is None:
        return _make_slow
    new = object.__new__
    (
        set_method,
        set_path,
        set_query,
        set_host,
        set_port,
        set_headers,
        set_source_ip,
        set_source_principal,
        set_source_namespace,
        set_request_principal,
        set_claims,
        set_route,
    ) = _SETTERS

    def make(
        method: str,
        path: str,
        query: str,
        host: str,
        port: int | None,
        headers: Mapping[str, str],
        source_ip: str | None,
        source_principal: str | None,
        source_namespace: str | None,
        request_principal: str | None,
        claims: Mapping[str, Any],
        route: str | None,
    ) -> RequestFacts:
        facts: RequestFacts = new(RequestFacts)
        set_method(facts, method)
        set_path(facts, path)
        set_query(facts, query)
        set_host(facts, host)
        set_port(facts, port)
        set_headers(facts, headers)
        set_source_ip(facts, source_ip)
        set_source_principal(facts, source_principal)
        set_source_namespace(facts, source_namespace)
        set_request_principal(facts, request_principal)
        set_claims(facts, claims)
        set_route(facts, route)
        return facts

    return make


_make: Final = _fast_maker()
"""``RequestFacts`` from the values of all its fields, in ``_FIELDS`` order."""


def updated(facts: RequestFacts, **changes: Any) -> RequestFacts:
    """``dataclasses.replace(facts, **changes)``, built the fast way (see ``_make``)."""
    if _SETTERS is None:
        return replace(facts, **changes)
    return _make(*(changes[name] if name in changes else getattr(facts, name) for name in _FIELDS))


def facts_from_scope(
    scope: MutableMapping[str, Any],
    record: RequestRecord | None = None,
    *,
    headers: bool = True,
    path: str | None = None,
) -> RequestFacts:
    """The facts of an ASGI request, built once and cached on its record.

    Args:
        scope: the ASGI ``http`` (or ``websocket``) scope.
        record: the request's record; looked up (or created) in the scope when omitted.
        headers: whether the caller reads ``RequestFacts.headers``. Without it, facts built
            here carry no headers until a later call asks for them.
        path: the path to record instead of the one the scope holds: the authorization layer
            passes the normalized path it hands to the application, so that the layers after
            it decide on the same path the application routes.

    Returns:
        The facts: method (``"GET"`` for a websocket), the raw path (see
        :func:`raw_path_of_scope`), the query string, the ``Host`` header without its port,
        the server's port, the direct peer's address, the caller's principal and namespace
        from ``record.identity``, the JWT principal and claims, and ``record.route``.
    """
    if record is None:
        record = record_of(scope)
    facts = record.facts
    if facts is not None:
        return _current(facts, record, headers, scope_headers, scope, path)
    server = scope.get("server")
    client = scope.get("client")
    principal, namespace = _principal_fields(record)
    query = scope.get("query_string")
    collected: Mapping[str, str]
    if headers:
        collected = scope_headers(scope)
        host = host_without_port(collected.get("host", ""))
    else:
        collected = _UNCOLLECTED
        host = _scope_host(scope)
    facts = record.facts = _make(
        scope.get("method", "GET"),
        raw_path_of_scope(scope) if path is None else path,
        query.decode("latin-1") if query else "",
        host,
        server[1] if server else None,
        collected,
        client[0] if client else None,
        principal,
        namespace,
        record.request_principal,
        record.claims or _NO_CLAIMS,
        record.route,
    )
    return facts


def facts_from_environ(
    environ: MutableMapping[str, Any],
    record: RequestRecord | None = None,
    *,
    headers: bool = True,
    path: str | None = None,
) -> RequestFacts:
    """The facts of a WSGI request, built once and cached on its record.

    The WSGI twin of :func:`facts_from_scope`, with the same arguments and result; the path
    comes from :func:`raw_path_of_environ`, the port from ``SERVER_PORT`` and the peer from
    ``REMOTE_ADDR``.
    """
    if record is None:
        record = record_of(environ)
    facts = record.facts
    if facts is not None:
        return _current(facts, record, headers, environ_headers, environ, path)
    principal, namespace = _principal_fields(record)
    port = environ.get("SERVER_PORT")
    facts = record.facts = _make(
        environ.get("REQUEST_METHOD", "GET"),
        raw_path_of_environ(environ) if path is None else path,
        environ.get("QUERY_STRING", ""),
        host_without_port(environ.get("HTTP_HOST", "")),
        int(port) if isinstance(port, str) and port.isascii() and port.isdigit() else None,
        environ_headers(environ) if headers else _UNCOLLECTED,
        environ.get("REMOTE_ADDR") or None,
        principal,
        namespace,
        record.request_principal,
        record.claims or _NO_CLAIMS,
        record.route,
    )
    return facts


def _current(
    facts: RequestFacts,
    record: RequestRecord,
    headers: bool,
    collect: Callable[[Mapping[str, Any]], dict[str, str]],
    source: Mapping[str, Any],
    path: str | None,
) -> RequestFacts:
    """The cached facts, updated with what inner layers learned since they were built."""
    missing = headers and facts.headers is _UNCOLLECTED
    if (
        not missing
        and facts.route is record.route
        and facts.request_principal is record.request_principal
        and (path is None or path is facts.path)
    ):
        return facts
    changes: dict[str, Any] = {}
    if missing:
        changes["headers"] = collect(source)
    if facts.route != record.route:
        changes["route"] = record.route
    if facts.request_principal != record.request_principal:
        changes["request_principal"] = record.request_principal
        changes["claims"] = record.claims or _NO_CLAIMS
    if path is not None and path != facts.path:
        changes["path"] = path
    if not changes:
        return facts
    facts = record.facts = updated(facts, **changes)
    return facts


def has_headers(facts: RequestFacts) -> bool:
    """Whether ``facts`` carry the request's headers (they may have been built without)."""
    return facts.headers is not _UNCOLLECTED
