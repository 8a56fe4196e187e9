"""Outbound routing with Istio VirtualService semantics, decided without I/O.

A :class:`VirtualService` holds the ``http`` routes of one or more destination hosts, in
order; the first route whose ``match`` accepts a call wins, and its ``route`` destinations
say where the call goes: a subset of the same service, weighted between subsets (a canary
split), or another service altogether (traffic shifting). A :class:`RouteTable` holds many
virtual services, looked up by the call's host, and answers :meth:`RouteTable.select` with a
prebuilt :class:`RouteSelection` — no allocation on the hot path beyond the query string
parse a ``queryParams`` match needs.

When no virtual service names the host, or none of its routes matches, the call takes the
*default route*: to the host itself, all endpoints, with the client's default retries (the
retry layer's policy; Istio's default unless configured). Note that Istio answers a call that
matches none of a virtual service's routes with ``404``; meshware sends it to the host
instead, as if there were no virtual service.

Build from code, or from Istio's YAML with :meth:`VirtualService.from_mapping`,
:meth:`RouteTable.from_documents` or :meth:`RouteTable.from_yaml`. Every field meshware does
not evaluate (``rewrite``, ``redirect``, ``corsPolicy``, header manipulation, ...) is refused
with a :class:`~meshware.exceptions.ConfigurationError` naming its full path; nothing is
silently ignored.

The httpx transport that applies a selection to real calls, with its faults and mirror, is
:mod:`meshware.outbound.route_transport`.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from meshware.exceptions import ConfigurationError
from meshware.outbound.deadline import parse_duration
from meshware.outbound.endpoints import _check_subset_name
from meshware.outbound.faults import FaultInjection, RandomSource
from meshware.outbound.retry import RetryPolicy

__all__ = [
    "HttpMatch",
    "HttpRoute",
    "RouteDestination",
    "RouteSelection",
    "RouteTable",
    "StringMatch",
    "VirtualService",
]

_EMPTY_PARAMS: Mapping[str, str] = MappingProxyType({})
_EMPTY_MATCHES: Mapping[str, StringMatch] = MappingProxyType({})
_HOST_CHARS = re.compile(r"[a-z0-9_.:-]+")
_MAX_CACHED_HOSTS = 4096

# Istio fields meshware does not evaluate, and why, per level of the spec.
_UNSUPPORTED_SPEC = {
    "gateways": "meshware routes a service's own outbound calls; there are no gateways",
    "tcp": "only HTTP routes are supported",
    "tls": "only HTTP routes are supported",
    "exportTo": "there are no namespaces to export to; the table holds what it is given",
}
_UNSUPPORTED_ROUTE = {
    "rewrite": "meshware routes calls, it does not rewrite them",
    "redirect": "meshware routes calls, it does not answer them with redirects",
    "directResponse": "meshware routes calls, it does not answer them itself",
    "delegate": "delegate virtual services are not supported; write the routes inline",
    "corsPolicy": "CORS is the inbound side's business",
    "headers": "header manipulation is not supported",
    "mirrors": "a route has one mirror here; use mirror and mirrorPercentage",
}
_UNSUPPORTED_MATCH = {
    "sourceLabels": "routing by the caller's labels is not supported",
    "sourceNamespace": "routing by the caller's namespace is not supported",
    "gateways": "there are no gateways",
    "port": "routing by port is not supported",
    "scheme": "routing by scheme is not supported",
    "authority": "routing by authority is not supported; each host has its own virtual service",
    "statPrefix": "stat prefixes are not supported",
}
_UNSUPPORTED_DESTINATION = {
    "headers": "header manipulation is not supported",
}

_SPEC_KEYS = ("hosts", "http")
_ROUTE_KEYS = (
    "name",
    "match",
    "route",
    "timeout",
    "retries",
    "fault",
    "mirror",
    "mirrorPercentage",
    "mirror_percent",
    "mirrorPercent",
    "retryable",
)
_MATCH_KEYS = (
    "name",
    "uri",
    "method",
    "headers",
    "withoutHeaders",
    "queryParams",
    "ignoreUriCase",
)
_ROUTE_DESTINATION_KEYS = ("destination", "weight")
_DESTINATION_KEYS = ("host", "subset", "port")


def _type_name(value: object) -> str:
    return type(value).__name__


def _mapping(value: object, field: str) -> Mapping[Any, Any]:
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            f"expected a mapping, got {_type_name(value)}", field=field, value=value
        )
    return value


def _list(value: object, field: str) -> list[Any] | tuple[Any, ...]:
    if not isinstance(value, (list, tuple)):
        raise ConfigurationError(
            f"expected a list, got {_type_name(value)}", field=field, value=value
        )
    return value


def _check_keys(
    spec: Mapping[Any, Any], allowed: tuple[str, ...], unsupported: Mapping[str, str], at: str
) -> None:
    prefix = f"{at}." if at else ""
    for key in spec:
        if isinstance(key, str) and key in unsupported:
            raise ConfigurationError(
                f"is not supported: {unsupported[key]}", field=f"{prefix}{key}", value=spec[key]
            )
        if key not in allowed:
            raise ConfigurationError(
                f"unknown field; expected one of {', '.join(allowed)}",
                field=f"{prefix}{key}",
                value=spec[key],
            )


def _check_host(value: object, field: str) -> str:
    """A destination host: a service name (or address), lower-cased, no trailing dot."""
    if isinstance(value, str):
        host = value.lower()
        if host.endswith("."):
            host = host[:-1]
        if host and len(host) <= 253 and _HOST_CHARS.fullmatch(host):
            return host
    raise ConfigurationError(
        "expected a service host name such as 'reviews' or 'reviews.default.svc.cluster.local'",
        field=field,
        value=value,
    )


def _check_name(value: object, field: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigurationError("expected a non-empty string", field=field, value=value)
    return value


def _check_bool(value: object, field: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigurationError("expected true or false", field=field, value=value)
    return value


def _check_percentage(value: object, field: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or math.isnan(value)
        or not 0.0 <= value <= 100.0
    ):
        raise ConfigurationError("expected a percentage from 0 to 100", field=field, value=value)
    return float(value)


def _always(value: str) -> bool:
    return True


def _nested(exc: ConfigurationError, at: str) -> ConfigurationError:
    """The same error with its field moved under ``at``."""
    message = str(exc)
    if exc.field is None:
        return ConfigurationError(message, field=at, value=exc.value)
    message = message[len(exc.field) + 2 :]  # drop the "<field>: " the error put in front
    return ConfigurationError(message, field=f"{at}.{exc.field}", value=exc.value)


# --- string matches ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class StringMatch:
    """Istio's ``StringMatch``: one of ``exact``, ``prefix`` or ``regex``.

    ``regex`` is compiled once and must match the *whole* value (``re.fullmatch``), as
    Istio's RE2 regexes do. Python's ``re`` syntax applies; write patterns that RE2 would
    accept too (no backreferences or lookarounds) to keep the YAML portable.

    A match with none of the three set (``{}`` in YAML) is a *presence* match: it accepts any
    value, so on a header or query parameter it only asks that the header or parameter be
    there.

    Args:
        exact: the value must equal this.
        prefix: the value must start with this.
        regex: the whole value must match this regular expression.

    Raises:
        ConfigurationError: more than one of the three is set, a value is not a string, or
            ``regex`` does not compile.
    """

    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None
    _test: Callable[[str], bool] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        given = (("exact", self.exact), ("prefix", self.prefix), ("regex", self.regex))
        set_ = [(k, v) for k, v in given if v is not None]
        if len(set_) > 1:
            raise ConfigurationError(
                "expected one of exact, prefix or regex, not several",
                field=set_[1][0],
                value=set_[1][1],
            )
        for name, value in set_:
            if not isinstance(value, str):
                raise ConfigurationError(
                    f"expected a string, got {_type_name(value)}", field=name, value=value
                )
        test: Callable[[str], bool]
        if self.exact is not None:
            test = self.exact.__eq__
        elif self.prefix is not None:
            prefix = self.prefix
            test = (lambda value: value.startswith(prefix)) if prefix else _always
        elif self.regex is not None:
            try:
                pattern = re.compile(self.regex)
            except (re.error, RecursionError, OverflowError) as exc:
                raise ConfigurationError(
                    f"expected a regular expression: {exc}", field="regex", value=self.regex
                ) from None

            def test(value: str) -> bool:
                return pattern.fullmatch(value) is not None
        else:
            test = _always
        object.__setattr__(self, "_test", test)

    @classmethod
    def from_mapping(cls, spec: object, *, field: str = "match") -> StringMatch:
        """Build a match from Istio's shape: ``{"exact": "v2"}``, ``{"prefix": "/api/"}``,
        ``{"regex": "v[0-9]+"}`` or ``{}``.

        Args:
            spec: the mapping (``None`` is read as ``{}``, a presence match).
            field: the dotted path of the match, used in errors.

        Raises:
            ConfigurationError: the shape is wrong; ``field`` names the exact key
                (``"http[0].match[1].headers.end-user.regex"``).
        """
        if spec is None:
            return _PRESENT
        block = _mapping(spec, field)
        _check_keys(block, ("exact", "prefix", "regex"), {}, field)
        try:
            return cls(
                exact=block.get("exact"), prefix=block.get("prefix"), regex=block.get("regex")
            )
        except ConfigurationError as exc:
            raise _nested(exc, field) from None

    @property
    def is_presence(self) -> bool:
        """Whether this is a presence match (none of ``exact``, ``prefix``, ``regex`` set)."""
        return self.exact is None and self.prefix is None and self.regex is None

    def matches(self, value: str) -> bool:
        """Whether ``value`` satisfies this match."""
        return self._test(value)


_PRESENT: Final = StringMatch()


def _freeze_matches(value: object, field: str) -> Mapping[str, StringMatch]:
    if not value:
        return _EMPTY_MATCHES
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            "expected a mapping of names to StringMatch", field=field, value=value
        )
    frozen: dict[str, StringMatch] = {}
    for name, match in value.items():
        if not isinstance(name, str) or not name:
            raise ConfigurationError("expected a non-empty name", field=field, value=name)
        if not isinstance(match, StringMatch):
            raise ConfigurationError("expected a StringMatch", field=f"{field}.{name}", value=match)
        frozen[name] = match
    return MappingProxyType(frozen)


# --- matches -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpMatch:
    """One of a route's ``match`` conditions (Istio's ``HTTPMatchRequest``).

    Every field that is set must hold for the match to hold; a match with no fields accepts
    every call. A route accepts a call when *any* of its matches does.

    Args:
        uri: the request path, still percent-encoded, without the query string.
        method: the request method (upper-case, as sent).
        headers: header name (lower-case) to the match its value must satisfy. A presence
            match (``StringMatch()``) asks only that the header be there. A repeated header's
            values are joined with ``", "``.
        without_headers: header name to a match the header must *not* satisfy: the call is
            rejected when the header is present and its value matches (for a presence match:
            when the header is present at all).
        query_params: query parameter name to a match its value must satisfy; ``exact``,
            ``regex`` or presence only (Istio does not support ``prefix`` here). Values are
            compared raw (not percent-decoded) and the first occurrence counts, as in Envoy.
        ignore_uri_case: compare ``uri`` case-insensitively; as in Istio this applies to
            ``exact`` and ``prefix`` only, not to ``regex``.
        name: the match's name; it is appended to the route's name in
            :attr:`RouteSelection.name` (``"reviews-v2.jason"``), as Istio does.

    Raises:
        ConfigurationError: a field has the wrong type, or a query parameter uses ``prefix``.
    """

    uri: StringMatch | None = None
    method: StringMatch | None = None
    headers: Mapping[str, StringMatch] = field(default_factory=lambda: _EMPTY_MATCHES)
    without_headers: Mapping[str, StringMatch] = field(default_factory=lambda: _EMPTY_MATCHES)
    query_params: Mapping[str, StringMatch] = field(default_factory=lambda: _EMPTY_MATCHES)
    ignore_uri_case: bool = False
    name: str | None = None
    _uri: Callable[[str], bool] | None = field(init=False, repr=False, compare=False)
    _method: Callable[[str], bool] | None = field(init=False, repr=False, compare=False)
    _headers: tuple[tuple[str, Callable[[str], bool]], ...] = field(
        init=False, repr=False, compare=False
    )
    _without: tuple[tuple[str, Callable[[str], bool]], ...] = field(
        init=False, repr=False, compare=False
    )
    _params: tuple[tuple[str, Callable[[str], bool]], ...] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        for name in ("uri", "method"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, StringMatch):
                raise ConfigurationError("expected a StringMatch", field=name, value=value)
        _check_bool(self.ignore_uri_case, "ignore_uri_case")
        _check_name(self.name, "name")
        headers = _freeze_matches(self.headers, "headers")
        without = _freeze_matches(self.without_headers, "without_headers")
        params = _freeze_matches(self.query_params, "query_params")
        for key, match in params.items():
            if match.prefix is not None:
                raise ConfigurationError(
                    "prefix is not supported for query parameters (as in Istio); "
                    "use exact or regex",
                    field=f"query_params.{key}.prefix",
                    value=match.prefix,
                )
        object.__setattr__(self, "headers", headers)
        object.__setattr__(self, "without_headers", without)
        object.__setattr__(self, "query_params", params)
        object.__setattr__(self, "_uri", self._uri_test())
        object.__setattr__(self, "_method", None if self.method is None else self.method._test)
        object.__setattr__(
            self, "_headers", tuple((k.lower(), m._test) for k, m in headers.items())
        )
        object.__setattr__(
            self,
            "_without",
            tuple((k.lower(), m._test) for k, m in without.items()),
        )
        object.__setattr__(self, "_params", tuple((k, m._test) for k, m in params.items()))

    def _uri_test(self) -> Callable[[str], bool] | None:
        uri = self.uri
        if uri is None or uri.is_presence:
            return None
        if not self.ignore_uri_case or uri.regex is not None:
            return uri._test
        if uri.exact is not None:
            exact = uri.exact.lower()
            return lambda path: path.lower() == exact
        prefix = (uri.prefix or "").lower()
        return lambda path: path.lower().startswith(prefix)

    @classmethod
    def from_mapping(cls, spec: object, *, field: str = "match") -> HttpMatch:
        """Build a match from Istio's ``HTTPMatchRequest`` shape (camelCase keys).

        Accepted keys: ``name``, ``uri``, ``method``, ``headers``, ``withoutHeaders``,
        ``queryParams`` and ``ignoreUriCase``.

        Args:
            spec: the mapping.
            field: the dotted path of the match (``"http[0].match[1]"``), used in errors.

        Raises:
            ConfigurationError: a key is unknown or unsupported (``sourceLabels``, ``port``,
                ``authority``, ...), or a value is invalid; ``field`` is the full path.
        """
        block = _mapping(spec, field)
        _check_keys(block, _MATCH_KEYS, _UNSUPPORTED_MATCH, field)

        def string_match(key: str) -> StringMatch | None:
            return (
                StringMatch.from_mapping(block[key], field=f"{field}.{key}")
                if key in block
                else None
            )

        def string_matches(key: str) -> Mapping[str, StringMatch]:
            if key not in block or block[key] is None:
                return _EMPTY_MATCHES
            entries = _mapping(block[key], f"{field}.{key}")
            result: dict[str, StringMatch] = {}
            for name, match in entries.items():
                if not isinstance(name, str) or not name:
                    raise ConfigurationError(
                        "expected a non-empty name", field=f"{field}.{key}", value=name
                    )
                at = f"{field}.{key}.{name}"
                result[name] = StringMatch.from_mapping(match, field=at)
                if key == "queryParams" and result[name].prefix is not None:
                    raise ConfigurationError(
                        "prefix is not supported for query parameters (as in Istio); "
                        "use exact or regex",
                        field=f"{at}.prefix",
                        value=result[name].prefix,
                    )
            return result

        return cls(
            uri=string_match("uri"),
            method=string_match("method"),
            headers=string_matches("headers"),
            without_headers=string_matches("withoutHeaders"),
            query_params=string_matches("queryParams"),
            ignore_uri_case=_check_bool(
                block.get("ignoreUriCase", False), f"{field}.ignoreUriCase"
            ),
            name=_check_name(block.get("name"), f"{field}.name"),
        )

    def matches(
        self,
        *,
        method: str,
        path: str,
        query: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> bool:
        """Whether a call satisfies this match.

        Args:
            method: the request method, upper-case.
            path: the request path, percent-encoded, without the query string.
            query: the raw query string, without ``?``.
            headers: the request headers (lower-case names, or a case-insensitive mapping
                such as ``httpx.Headers``).
        """
        params = _parse_query(query) if self._params else _EMPTY_PARAMS
        return self._accepts(method, path, params, headers if headers is not None else {})

    def _accepts(
        self, method: str, path: str, params: Mapping[str, str], headers: Mapping[str, str]
    ) -> bool:
        if self._uri is not None and not self._uri(path):
            return False
        if self._method is not None and not self._method(method):
            return False
        for name, test in self._headers:
            value = headers.get(name)
            if value is None or not test(value):
                return False
        for name, test in self._without:
            value = headers.get(name)
            if value is not None and test(value):
                return False
        for name, test in self._params:
            value = params.get(name)
            if value is None or not test(value):
                return False
        return True


def _parse_query(query: str) -> Mapping[str, str]:
    # Raw values, first occurrence wins: Envoy's query parameter matching.
    if not query:
        return _EMPTY_PARAMS
    params: dict[str, str] = {}
    for part in query.split("&"):
        if part:
            key, _, value = part.partition("=")
            params.setdefault(key, value)
    return params


# --- destinations and routes ---------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteDestination:
    """Where a route sends (a share of) its calls (Istio's ``HTTPRouteDestination``).

    Args:
        host: the destination service, as discovery knows it (``"reviews"``). A host other
            than the one called shifts the traffic to that service.
        subset: the destination subset (a DestinationRule subset name such as ``"v2"``), or
            ``None`` for all endpoints.
        port: the destination port number (Istio's ``port.number``), or ``None``. Endpoints
            come from discovery with their own ports; the port is kept for telemetry and for
            configurations shared with Istio.
        weight: the share of the route's calls, 0-100. With several destinations the weights
            must add up to 100 (``None`` counts as 0); a single destination takes every call
            and its weight may be left out (or be 0 or 100).

    Raises:
        ConfigurationError: a field has the wrong type or range.
    """

    host: str
    subset: str | None = None
    port: int | None = None
    weight: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "host", _check_host(self.host, "host"))
        if self.subset is not None:
            _check_subset_name(self.subset, "subset")
        port = self.port
        if port is not None and (
            isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535
        ):
            raise ConfigurationError(
                "expected an integer port from 1 to 65535", field="port", value=port
            )
        weight = self.weight
        if weight is not None and (
            isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 100
        ):
            raise ConfigurationError(
                "expected an integer weight from 0 to 100", field="weight", value=weight
            )

    @classmethod
    def from_mapping(
        cls, spec: object, *, field: str = "destination", weight: int | None = None
    ) -> RouteDestination:
        """Build a destination from Istio's ``Destination`` shape: ``host``, ``subset`` and
        ``port.number``.

        Args:
            spec: the ``destination`` mapping.
            field: its dotted path, used in errors (``"http[1].route[0].destination"``).
            weight: the weight of the enclosing ``HTTPRouteDestination``, if any.

        Raises:
            ConfigurationError: a key is unknown, or a value is invalid; ``field`` is the
                full path (``"http[1].route[0].destination.subset"``).
        """
        block = _mapping(spec, field)
        _check_keys(block, _DESTINATION_KEYS, _UNSUPPORTED_DESTINATION, field)
        if "host" not in block:
            raise ConfigurationError("expected 'host', the destination service", field=field)
        host = _check_host(block["host"], f"{field}.host")
        subset = block.get("subset")
        if subset is not None:
            _check_subset_name(subset, f"{field}.subset")
        port: int | None = None
        if "port" in block:
            port_block = _mapping(block["port"], f"{field}.port")
            _check_keys(port_block, ("number",), {}, f"{field}.port")
            port = port_block.get("number")
            if port is not None and (
                isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535
            ):
                raise ConfigurationError(
                    "expected an integer port from 1 to 65535",
                    field=f"{field}.port.number",
                    value=port,
                )
        return cls(host=host, subset=subset, port=port, weight=weight)


@dataclass(frozen=True, slots=True, eq=False)
class RouteSelection:
    """The routing decision for one call: which route matched and which destination won.

    Selections are built once per route, match and destination, so selecting allocates
    nothing; they compare (and hash) by identity.

    Attributes:
        name: the route's name, joined with the match's name as Istio does
            (``"reviews-v2.jason"``); ``None`` for an unnamed route and for the default route.
        http_route: the matched :class:`HttpRoute` (for the default route, a route to the host
            itself, with nothing else set). Its ``timeout``, ``retries``,
            ``fault``, ``mirror`` and ``retryable`` apply to the call.
        destination: the chosen destination.
        default: whether no route matched and the call takes the default route.
    """

    name: str | None
    http_route: HttpRoute
    destination: RouteDestination
    default: bool = False

    @property
    def host(self) -> str:
        """The destination service (the called host, unless the route shifts traffic)."""
        return self.destination.host

    @property
    def subset(self) -> str | None:
        """The destination subset, or ``None`` for all endpoints."""
        return self.destination.subset


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpRoute:
    """One of a virtual service's ``http`` routes (Istio's ``HTTPRoute``).

    Args:
        route: the destinations, with weights adding up to 100 when there are several.
        match: the conditions, any of which selects this route; empty matches every call.
        name: the route's name, reported as ``CallPlan.route`` and in telemetry.
        timeout: the whole call's timeout in seconds, retries included (Istio's ``timeout``);
            ``None`` for none. It tightens the call's deadline.
        retries: the retry policy (Istio's ``retries``), or ``None`` (the default) to leave
            the choice to the retry layer, whose default policy is Istio's (2 retries on
            ``connect-failure,refused-stream,503``) unless configured otherwise. To disable
            retries on the route, pass ``RetryPolicy(attempts=0)``.
        fault: faults to inject into the route's calls, or ``None``.
        mirror: a destination that receives a copy of the route's calls, or ``None``.
        mirror_percentage: the share of calls mirrored, 0-100 (default 100).
        retryable: meshware's extension: the route's non-idempotent requests (``POST``...)
            are safe to repeat, so the retry policy may retry them.

    Raises:
        ConfigurationError: no destination is given, the weights do not add up, the mirror
            carries a weight, or a field has the wrong type or range.
    """

    route: tuple[RouteDestination, ...]
    match: tuple[HttpMatch, ...] = ()
    name: str | None = None
    timeout: float | None = None
    retries: RetryPolicy | None = None
    fault: FaultInjection | None = None
    mirror: RouteDestination | None = None
    mirror_percentage: float = 100.0
    retryable: bool = False
    # Per match (one entry when there is no match): the selections of the weighted choice.
    _selections: tuple[tuple[RouteSelection, ...], ...] = field(
        init=False, repr=False, compare=False
    )
    _cumulative: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        destinations = self.route
        if isinstance(destinations, RouteDestination):
            destinations = (destinations,)
        if not isinstance(destinations, (list, tuple)) or not destinations:
            raise ConfigurationError(
                "expected at least one destination", field="route", value=self.route
            )
        for index, destination in enumerate(destinations):
            if not isinstance(destination, RouteDestination):
                raise ConfigurationError(
                    "expected a RouteDestination", field=f"route[{index}]", value=destination
                )
        destinations = tuple(destinations)
        object.__setattr__(self, "route", destinations)
        matches = self.match
        if not isinstance(matches, (list, tuple)):
            raise ConfigurationError("expected a list of HttpMatch", field="match", value=matches)
        for index, match in enumerate(matches):
            if not isinstance(match, HttpMatch):
                raise ConfigurationError(
                    "expected an HttpMatch", field=f"match[{index}]", value=match
                )
        object.__setattr__(self, "match", tuple(matches))
        _check_name(self.name, "name")
        if self.timeout is not None:
            timeout = self.timeout
            if (
                isinstance(timeout, bool)
                or not isinstance(timeout, (int, float))
                or not math.isfinite(timeout)
                or timeout <= 0
            ):
                raise ConfigurationError(
                    "expected a positive, finite number of seconds (None for no timeout)",
                    field="timeout",
                    value=timeout,
                )
            object.__setattr__(self, "timeout", float(timeout))
        if self.retries is not None and not isinstance(self.retries, RetryPolicy):
            raise ConfigurationError(
                "expected a RetryPolicy or None", field="retries", value=self.retries
            )
        if self.fault is not None and not isinstance(self.fault, FaultInjection):
            raise ConfigurationError(
                "expected a FaultInjection or None", field="fault", value=self.fault
            )
        if self.mirror is not None:
            if not isinstance(self.mirror, RouteDestination):
                raise ConfigurationError(
                    "expected a RouteDestination", field="mirror", value=self.mirror
                )
            if self.mirror.weight is not None:
                raise ConfigurationError(
                    "a mirror takes no weight; set mirror_percentage",
                    field="mirror.weight",
                    value=self.mirror.weight,
                )
        object.__setattr__(
            self,
            "mirror_percentage",
            _check_percentage(self.mirror_percentage, "mirror_percentage"),
        )
        _check_bool(self.retryable, "retryable")

        if len(destinations) == 1:
            weight = destinations[0].weight
            if weight not in (None, 0, 100):
                raise ConfigurationError(
                    "a single destination takes every call; leave its weight out or set 100",
                    field="route[0].weight",
                    value=weight,
                )
            chosen: tuple[RouteDestination, ...] = destinations
            cumulative: tuple[int, ...] = (100,)
        else:
            total = sum(d.weight or 0 for d in destinations)
            if total != 100:
                raise ConfigurationError(
                    f"expected the weights of the destinations to add up to 100, not {total}",
                    field="route",
                    value=[d.weight for d in destinations],
                )
            chosen = tuple(d for d in destinations if d.weight)
            running = 0
            sums: list[int] = []
            for destination in chosen:
                running += destination.weight or 0
                sums.append(running)
            cumulative = tuple(sums)
        names: list[str | None] = (
            [_join_names(self.name, m.name) for m in self.match] if self.match else [self.name]
        )
        object.__setattr__(
            self,
            "_selections",
            tuple(tuple(RouteSelection(name, self, d) for d in chosen) for name in names),
        )
        object.__setattr__(self, "_cumulative", cumulative)

    @classmethod
    def from_mapping(cls, spec: object, *, field: str = "http[0]") -> HttpRoute:
        """Build a route from Istio's ``HTTPRoute`` shape (camelCase keys).

        Accepted keys: ``name``, ``match``, ``route``, ``timeout``, ``retries``, ``fault``,
        ``mirror``, ``mirrorPercentage`` (``{value: 50}``), the legacy ``mirror_percent`` /
        ``mirrorPercent`` (an integer), and meshware's ``retryable``. A ``timeout`` of ``0s``
        means no timeout, as in Envoy. A route without ``retries`` leaves them to the retry
        layer's default policy (Istio's default unless configured); ``retries: {attempts: 0}``
        disables them.

        Args:
            spec: the mapping.
            field: the dotted path of the route (``"http[1]"``), used in errors.

        Raises:
            ConfigurationError: a key is unknown or unsupported (``rewrite``, ``redirect``,
                ``corsPolicy``, ``headers``, ``delegate``, ``directResponse``, ...), or a
                value is invalid; ``field`` is the full path
                (``"http[1].route[0].destination.subset"``).
        """
        block = _mapping(spec, field)
        _check_keys(block, _ROUTE_KEYS, _UNSUPPORTED_ROUTE, field)
        name = _check_name(block.get("name"), f"{field}.name")

        matches: list[HttpMatch] = []
        if block.get("match") is not None:
            for index, item in enumerate(_list(block["match"], f"{field}.match")):
                matches.append(HttpMatch.from_mapping(item, field=f"{field}.match[{index}]"))

        if block.get("route") is None:
            raise ConfigurationError(
                "expected 'route', a list of destinations", field=f"{field}.route"
            )
        destinations: list[RouteDestination] = []
        for index, item in enumerate(_list(block["route"], f"{field}.route")):
            at = f"{field}.route[{index}]"
            entry = _mapping(item, at)
            _check_keys(entry, _ROUTE_DESTINATION_KEYS, _UNSUPPORTED_DESTINATION, at)
            weight = entry.get("weight")
            if weight is not None and (
                isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 100
            ):
                raise ConfigurationError(
                    "expected an integer weight from 0 to 100", field=f"{at}.weight", value=weight
                )
            if "destination" not in entry:
                raise ConfigurationError("expected 'destination'", field=at)
            destinations.append(
                RouteDestination.from_mapping(
                    entry["destination"], field=f"{at}.destination", weight=weight
                )
            )
        if not destinations:
            raise ConfigurationError(
                "expected at least one destination", field=f"{field}.route", value=[]
            )

        timeout: float | None = None
        if block.get("timeout") is not None:
            timeout = parse_duration(block["timeout"], field=f"{field}.timeout")
            if timeout == 0.0:
                timeout = None
            elif timeout < 0.001:
                raise ConfigurationError(
                    "expected at least 1ms (or 0s for no timeout)",
                    field=f"{field}.timeout",
                    value=block["timeout"],
                )

        retries: RetryPolicy | None = None
        if block.get("retries") is not None:
            retries = RetryPolicy.from_mapping(block["retries"], prefix=f"{field}.retries")

        fault: FaultInjection | None = None
        if block.get("fault") is not None:
            fault = FaultInjection.from_mapping(block["fault"], field=f"{field}.fault")

        mirror: RouteDestination | None = None
        if block.get("mirror") is not None:
            mirror = RouteDestination.from_mapping(block["mirror"], field=f"{field}.mirror")
        percentage = 100.0
        given = [k for k in ("mirrorPercentage", "mirror_percent", "mirrorPercent") if k in block]
        if len(given) > 1:
            raise ConfigurationError(
                f"give one of mirrorPercentage and the legacy {given[1]}, not both",
                field=f"{field}.{given[1]}",
                value=block[given[1]],
            )
        if given:
            key = given[0]
            at = f"{field}.{key}"
            if mirror is None:
                raise ConfigurationError(
                    "a mirror percentage needs 'mirror'", field=at, value=block[key]
                )
            if key == "mirrorPercentage":
                pct_block = _mapping(block[key], at)
                _check_keys(pct_block, ("value",), {}, at)
                if "value" not in pct_block:
                    raise ConfigurationError(
                        "expected 'value', a percentage from 0 to 100", field=at
                    )
                percentage = _check_percentage(pct_block["value"], f"{at}.value")
            else:
                legacy = block[key]
                if (
                    isinstance(legacy, bool)
                    or not isinstance(legacy, int)
                    or not 0 <= legacy <= 100
                ):
                    raise ConfigurationError(
                        "expected a whole percentage from 0 to 100", field=at, value=legacy
                    )
                percentage = float(legacy)

        retryable = _check_bool(block.get("retryable", False), f"{field}.retryable")
        try:
            return cls(
                route=tuple(destinations),
                match=tuple(matches),
                name=name,
                timeout=timeout,
                retries=retries,
                fault=fault,
                mirror=mirror,
                mirror_percentage=percentage,
                retryable=retryable,
            )
        except ConfigurationError as exc:
            raise _nested(exc, field) from None

    def choose(self, rng: RandomSource, match_index: int = 0) -> RouteSelection:
        """Pick a destination by weight: one draw of ``rng`` (none for a single destination).

        Args:
            rng: the random source.
            match_index: the index of the match that selected the route (names the selection).
        """
        selections = self._selections[match_index]
        if len(selections) == 1:
            return selections[0]
        index = bisect_right(self._cumulative, rng.random() * 100.0)
        # random() < 1.0, so the index stays in range; the guard covers a custom source.
        return selections[index if index < len(selections) else -1]

    def should_mirror(self, rng: RandomSource) -> bool:
        """Whether to mirror one call: ``mirror`` is set and the ``mirror_percentage`` draw
        hits (no draw for 0 or 100 %)."""
        if self.mirror is None:
            return False
        percentage = self.mirror_percentage
        if percentage >= 100.0:
            return True
        if percentage <= 0.0:
            return False
        return rng.random() * 100.0 < percentage


def _join_names(route: str | None, match: str | None) -> str | None:
    if route and match:
        return f"{route}.{match}"
    return route or match


# --- virtual services ----------------------------------------------------------------------


def _check_vs_host(value: object, field: str) -> str:
    if isinstance(value, str) and value == "*":
        raise ConfigurationError(
            "'*' alone is not allowed (as in Istio for the mesh); name the hosts, "
            "or use a wildcard such as '*.example.com'",
            field=field,
            value=value,
        )
    if isinstance(value, str) and value.startswith("*."):
        return "*." + _check_host(value[2:], field)
    return _check_host(value, field)


@dataclass(frozen=True, slots=True, kw_only=True)
class VirtualService:
    """The routes of one or more destination hosts (Istio's ``VirtualService``).

    Args:
        hosts: the hosts these routes apply to, as callers write them in URLs
            (``"reviews"``); ``"*.example.com"`` matches any host ending in ``.example.com``.
            A short name and its FQDN are different hosts here: list both if callers use both.
        http: the routes, in order: the first whose match accepts a call wins.
        name: the virtual service's name (``metadata.name``), used in messages.

    Raises:
        ConfigurationError: ``hosts`` is empty or holds something that is not a host name,
            or ``http`` holds something that is not an :class:`HttpRoute`.
    """

    hosts: tuple[str, ...]
    http: tuple[HttpRoute, ...] = ()
    name: str | None = None
    _needs_query: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        hosts = self.hosts
        if isinstance(hosts, str) or not isinstance(hosts, (list, tuple)) or not hosts:
            raise ConfigurationError(
                "expected a non-empty list of hosts", field="hosts", value=hosts
            )
        object.__setattr__(
            self,
            "hosts",
            tuple(dict.fromkeys(_check_vs_host(h, f"hosts[{i}]") for i, h in enumerate(hosts))),
        )
        routes = self.http
        if not isinstance(routes, (list, tuple)):
            raise ConfigurationError("expected a list of HttpRoute", field="http", value=routes)
        for index, route in enumerate(routes):
            if not isinstance(route, HttpRoute):
                raise ConfigurationError(
                    "expected an HttpRoute", field=f"http[{index}]", value=route
                )
        object.__setattr__(self, "http", tuple(routes))
        _check_name(self.name, "name")
        object.__setattr__(
            self,
            "_needs_query",
            any(m.query_params for r in self.http for m in r.match),
        )

    @classmethod
    def from_mapping(cls, spec: Mapping[str, Any], *, field: str = "") -> VirtualService:
        """Build a virtual service from Istio's YAML, parsed (``yaml.safe_load``).

        ``spec`` is the VirtualService's ``spec`` (``hosts`` and ``http``), or the whole
        Kubernetes resource (``apiVersion``, ``kind: VirtualService``, ``metadata``,
        ``spec``; ``kind`` and ``apiVersion`` may be left out), whose ``metadata.name`` then
        names the virtual service.

        Args:
            spec: the mapping.
            field: the dotted path of ``spec`` in a larger document, prefixed to error fields.

        Raises:
            ConfigurationError: naming the exact field, for example
                ``http[1].route[0].destination.subsett``; unknown and unsupported fields
                (``gateways``, ``tcp``, ``tls``, ``rewrite``, ``redirect``, ``corsPolicy``,
                ``headers``, ``delegate``, ``directResponse``, ``sourceLabels``, ...) are
                refused, never ignored.
        """
        prefix = f"{field}." if field else ""
        block = _mapping(spec, field or "spec")
        name: str | None = None
        if "kind" in block or "apiVersion" in block or "spec" in block:
            _check_keys(block, ("apiVersion", "kind", "metadata", "spec"), {}, field)
            if "kind" in block and block["kind"] != "VirtualService":
                raise ConfigurationError(
                    "expected kind: VirtualService", field=f"{prefix}kind", value=block.get("kind")
                )
            metadata = _mapping(block.get("metadata") or {}, f"{prefix}metadata")
            name = _check_name(metadata.get("name"), f"{prefix}metadata.name")
            if "spec" not in block:
                raise ConfigurationError("expected 'spec'", field=field or None, value=None)
            field = f"{prefix}spec"
            prefix = f"{field}."
            block = _mapping(block["spec"], field)
        _check_keys(block, _SPEC_KEYS, _UNSUPPORTED_SPEC, field)
        if "hosts" not in block:
            raise ConfigurationError(
                "expected 'hosts', the hosts these routes apply to", field=f"{prefix}hosts"
            )
        hosts = _list(block["hosts"], f"{prefix}hosts")
        if not hosts:
            raise ConfigurationError(
                "expected at least one host", field=f"{prefix}hosts", value=hosts
            )
        checked = tuple(_check_vs_host(h, f"{prefix}hosts[{i}]") for i, h in enumerate(hosts))
        routes: list[HttpRoute] = []
        if block.get("http") is not None:
            for index, item in enumerate(_list(block["http"], f"{prefix}http")):
                routes.append(HttpRoute.from_mapping(item, field=f"{prefix}http[{index}]"))
        return cls(hosts=checked, http=tuple(routes), name=name)

    def select(
        self,
        *,
        method: str,
        path: str,
        query: str = "",
        headers: Mapping[str, str] | None = None,
        rng: RandomSource,
    ) -> RouteSelection | None:
        """The selection of the first route that matches a call, or ``None`` when none does.

        Args:
            method: the request method, upper-case.
            path: the request path, percent-encoded, without the query string.
            query: the raw query string, without ``?``.
            headers: the request headers (lower-case names, or ``httpx.Headers``).
            rng: the random source of the weighted choice.
        """
        return self._select(method, path, query, headers if headers is not None else {}, rng)

    def _select(
        self,
        method: str,
        path: str,
        query: str,
        headers: Mapping[str, str],
        rng: RandomSource,
    ) -> RouteSelection | None:
        params = _parse_query(query) if self._needs_query else _EMPTY_PARAMS
        for route in self.http:
            matches = route.match
            if not matches:
                return route.choose(rng)
            for index, match in enumerate(matches):
                if match._accepts(method, path, params, headers):
                    return route.choose(rng, index)
        return None


class RouteTable:
    """Many virtual services, looked up by the called host; what the routing transport asks.

    Build it once (at start-up or when the configuration changes) and share it: selection is
    thread-safe and allocation-light.

    Args:
        virtual_services: the virtual services. A host may be named by one of them only.

    Raises:
        ConfigurationError: two virtual services name the same host, or an item is not a
            :class:`VirtualService`.
    """

    __slots__ = ("_cache", "_exact", "_virtual_services", "_wildcards")

    def __init__(self, virtual_services: Iterable[VirtualService] = ()) -> None:
        if isinstance(virtual_services, VirtualService):
            virtual_services = (virtual_services,)
        items = tuple(virtual_services)
        exact: dict[str, VirtualService] = {}
        wildcards: dict[str, VirtualService] = {}
        owner: dict[str, int] = {}
        for index, vs in enumerate(items):
            if not isinstance(vs, VirtualService):
                raise ConfigurationError(
                    "expected a VirtualService", field=f"virtual_services[{index}]", value=vs
                )
            for host in vs.hosts:
                if host in owner:
                    raise ConfigurationError(
                        f"host {host!r} is named by two virtual services "
                        f"(virtual_services[{owner[host]}] and [{index}]); merge their routes",
                        field=f"virtual_services[{index}].hosts",
                        value=host,
                    )
                owner[host] = index
                if host.startswith("*."):
                    wildcards[host[1:]] = vs  # ".example.com"
                else:
                    exact[host] = vs
        self._virtual_services = items
        self._exact = exact
        # Longest suffix first: the most specific wildcard wins, as in Istio.
        self._wildcards = tuple(sorted(wildcards.items(), key=lambda kv: -len(kv[0])))
        self._cache: dict[str, tuple[VirtualService | None, RouteSelection]] = {}

    @classmethod
    def from_documents(cls, documents: Iterable[Mapping[str, Any] | None]) -> RouteTable:
        """Build a table from parsed VirtualService documents (resources or bare specs).

        Empty documents (``None``, as ``yaml.safe_load_all`` yields for a trailing ``---``)
        are skipped.

        Args:
            documents: the documents, each as :meth:`VirtualService.from_mapping` accepts.

        Raises:
            ConfigurationError: as :meth:`VirtualService.from_mapping`, with fields prefixed
                by the document's index (``"[1].spec.http[0].timeout"``).
        """
        services = [
            VirtualService.from_mapping(doc, field=f"[{index}]")
            for index, doc in enumerate(documents)
            if doc is not None
        ]
        return cls(services)

    @classmethod
    def from_yaml(cls, text: str) -> RouteTable:
        """Build a table from YAML text holding one or more VirtualService documents.

        Raises:
            ConfigurationError: the text is not valid YAML, or as :meth:`from_documents`.
        """
        import yaml  # only route tables read from text need it

        try:
            documents = list(yaml.safe_load_all(text))
        except yaml.YAMLError as exc:
            raise ConfigurationError(f"invalid YAML: {exc}") from exc
        return cls.from_documents(documents)

    @property
    def virtual_services(self) -> tuple[VirtualService, ...]:
        """The virtual services, in the order given."""
        return self._virtual_services

    def virtual_service_for(self, host: str) -> VirtualService | None:
        """The virtual service that names ``host`` (exactly, else by the longest wildcard), or
        ``None``."""
        return self._entry(host)[0]

    def select(
        self,
        host: str,
        method: str,
        path: str,
        query: str,
        headers: Mapping[str, str],
        rng: RandomSource,
    ) -> RouteSelection:
        """Route one call.

        Args:
            host: the called host (``request.url.host``; case and a trailing dot ignored).
            method: the request method, upper-case.
            path: the request path, percent-encoded, without the query string.
            query: the raw query string, without ``?``.
            headers: the request headers (lower-case names, or ``httpx.Headers``).
            rng: the random source of weighted choices (one draw for a weighted route).

        Returns:
            The :class:`RouteSelection` of the first matching route of the host's virtual
            service, or the host's default route (``default=True``).
        """
        entry = self._cache.get(host)
        if entry is None:
            entry = self._entry(host)
        vs, default = entry
        if vs is not None:
            selection = vs._select(method, path, query, headers, rng)
            if selection is not None:
                return selection
        return default

    def _entry(self, host: str) -> tuple[VirtualService | None, RouteSelection]:
        cache = self._cache
        entry = cache.get(host)
        if entry is not None:
            return entry
        name = _check_host(host, "host")
        vs = self._exact.get(name)
        if vs is None:
            for suffix, candidate in self._wildcards:
                if name.endswith(suffix):
                    vs = candidate
                    break
        destination = RouteDestination(host=name)
        route = HttpRoute(route=(destination,))
        entry = (vs, RouteSelection(None, route, destination, default=True))
        if len(cache) >= _MAX_CACHED_HOSTS:
            cache.clear()
        cache[host] = entry
        return entry
