"""Authorization with the semantics of Istio's AuthorizationPolicy, declared in code.

A policy has an action (``ALLOW``, ``DENY`` or ``AUDIT``) and rules; a rule matches a
request when one of its sources (``from``) and one of its operations (``to``) match and all
of its conditions (``when``) hold. An :class:`Authorizer` combines policies exactly as Istio
does:

1. If any ``DENY`` policy matches, deny.
2. If there are no ``ALLOW`` policies, allow.
3. If any ``ALLOW`` policy matches, allow.
4. Otherwise deny.

``AUDIT`` policies never change the outcome; the decision records which ones matched.
Dry-run policies (Istio's ``istio.io/dry-run`` annotation) are evaluated and their would-be
outcome recorded, but never enforced.

Everything is compiled when policies are built: :meth:`Authorizer.decide` normalizes the
path once and runs precompiled checks over a :class:`~meshware.policy.facts.RequestFacts`.

Example::

    from meshware.policy.authz import AuthorizationPolicy, Authorizer, Operation, Rule, Source
    from meshware.policy.facts import RequestFacts

    authz = Authorizer([
        AuthorizationPolicy(
            name="orders-only",
            action="ALLOW",
            rules=[Rule(from_=[Source(principals=["cluster.local/ns/shop/sa/orders"])],
                        to=[Operation(methods=["GET"], paths=["/api/*"])])],
        ),
    ])
    decision = authz.decide(RequestFacts(
        method="GET", path="/api/items",
        source_principal="cluster.local/ns/shop/sa/orders",
    ))
    assert decision.allowed and decision.status == 200
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from operator import attrgetter
from typing import Any, Literal, NamedTuple, TypeVar

from meshware.exceptions import ConfigurationError
from meshware.policy.facts import RequestFacts
from meshware.policy.matching import IPMatcher, StringMatcher, port_set
from meshware.policy.paths import DEFAULT_PATH_NORMALIZATION, InvalidPath, PathNormalization

__all__ = [
    "ALLOWED_BY_POLICY",
    "DENIED_BY_POLICY",
    "INVALID_PATH",
    "NO_ALLOW_MATCH",
    "NO_ALLOW_POLICIES",
    "Action",
    "AuthorizationPolicy",
    "Authorizer",
    "AuthzDecision",
    "Condition",
    "DryRunMatch",
    "Operation",
    "Rule",
    "Source",
    "authorize",
    "route_policies",
]

Action = Literal["ALLOW", "DENY", "AUDIT"]
"""A policy's action. Istio's ``CUSTOM`` (external authorization) is not supported."""

ALLOWED_BY_POLICY = "allowed-by-policy"
"""Decision code: an ``ALLOW`` policy matched."""
DENIED_BY_POLICY = "denied-by-policy"
"""Decision code: a ``DENY`` policy matched."""
NO_ALLOW_MATCH = "no-allow-match"
"""Decision code: there are ``ALLOW`` policies and none matched, so the request is denied."""
NO_ALLOW_POLICIES = "no-allow-policies"
"""Decision code: no ``DENY`` policy matched and there are no ``ALLOW`` policies: allowed."""
INVALID_PATH = "invalid-path"
"""Decision code: the path could not be normalized safely; answer 400."""

_ACTIONS = ("ALLOW", "DENY", "AUDIT")
_ATTRIBUTE = "__meshware_authz__"
_Check = Callable[[RequestFacts, str], bool]
_Group = tuple[_Check, ...]
_T = TypeVar("_T")


def _type_name(value: object) -> str:
    return type(value).__name__


def _strings(value: object, where: str) -> tuple[str, ...]:
    # Sequence check first: a lone string would otherwise become a tuple of characters.
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigurationError(
            f"expected a list of strings, got {_type_name(value)}", field=where, value=value
        )
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise ConfigurationError(
                f"expected a string, got {_type_name(item)}", field=f"{where}[{index}]", value=item
            )
    return tuple(value)


def _items(value: object, where: str, kind: type[Any]) -> tuple[Any, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigurationError(
            f"expected a list of {kind.__name__}, got {_type_name(value)}", field=where, value=value
        )
    for index, item in enumerate(value):
        if not isinstance(item, kind):
            raise ConfigurationError(
                f"expected a {kind.__name__}, got {_type_name(item)}",
                field=f"{where}[{index}]",
                value=item,
            )
    return tuple(value)


def _check_principals(values: tuple[str, ...], where: str) -> None:
    for index, value in enumerate(values):
        if value.startswith("spiffe://"):
            raise ConfigurationError(
                "expected a principal without the spiffe:// scheme, like "
                "cluster.local/ns/default/sa/orders",
                field=f"{where}[{index}]",
                value=value,
            )


def _check_methods(values: tuple[str, ...], where: str) -> None:
    for index, value in enumerate(values):
        if value != value.upper():
            raise ConfigurationError(
                "methods are matched case-sensitively against the upper-case request method; "
                f"expected {value.upper()!r}",
                field=f"{where}[{index}]",
                value=value,
            )


# -- per-field checks -------------------------------------------------------------------
# Each check is a closure over precompiled matchers, called as check(facts, path).


def _string_check(
    get: Callable[[RequestFacts], str | None], matcher: StringMatcher, negate: bool
) -> _Check:
    match = matcher.fast
    if negate:

        def check_not(facts: RequestFacts, path: str) -> bool:
            value = get(facts)
            return value is None or not match(value)

        return check_not

    def check(facts: RequestFacts, path: str) -> bool:
        value = get(facts)
        return value is not None and match(value)

    return check


def _ip_check(matcher: IPMatcher, negate: bool) -> _Check:
    match = matcher.match
    if negate:

        def check_not(facts: RequestFacts, path: str) -> bool:
            ip = facts.source_ip
            return ip is None or not match(ip)

        return check_not

    def check(facts: RequestFacts, path: str) -> bool:
        ip = facts.source_ip
        return ip is not None and match(ip)

    return check


def _host_check(matcher: StringMatcher, negate: bool) -> _Check:
    # RequestFacts.host has no port; "host:port" patterns are tried against host:port.
    match = matcher.match
    with_port = any(":" in pattern for pattern in matcher.patterns)

    def hit(facts: RequestFacts) -> bool:
        host = facts.host
        if match(host):
            return True
        return with_port and facts.port is not None and match(f"{host}:{facts.port}")

    if negate:
        return lambda facts, path: not hit(facts)
    return lambda facts, path: hit(facts)


def _port_check(ports: frozenset[int], negate: bool) -> _Check:
    if negate:
        return lambda facts, path: facts.port not in ports
    return lambda facts, path: facts.port in ports


def _path_check(matcher: StringMatcher, negate: bool) -> _Check:
    match = matcher.fast
    if negate:
        return lambda facts, path: not match(path)
    return lambda facts, path: match(path)


# -- Source / Operation / Condition / Rule ----------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Source:
    """Who sends the request: one entry of a rule's ``from`` (Istio's ``source``).

    Every field that is set must match; within a field, a positive list matches when any
    of its values matches and a ``not_`` list matches when none of its values does. String
    values take Istio's forms: exact, ``prefix*``, ``*suffix`` or ``*`` (any non-empty
    value, so ``principals=["*"]`` requires an mTLS identity and
    ``request_principals=["*"]`` a validated JWT).

    Args:
        principals: peer identities from mTLS, ``<trust-domain>/ns/<ns>/sa/<sa>``
            (``cluster.local/ns/default/sa/orders``), matched against
            ``RequestFacts.source_principal``. Without the ``spiffe://`` scheme.
        not_principals: peer identities that must not match.
        request_principals: JWT principals ``<iss>/<sub>``, matched against
            ``RequestFacts.request_principal``.
        not_request_principals: JWT principals that must not match.
        namespaces: the peer's namespace (from its mTLS identity), matched against
            ``RequestFacts.source_namespace``.
        not_namespaces: namespaces that must not match.
        ip_blocks: addresses or CIDR blocks of the direct peer (``10.0.0.0/8``), matched
            against ``RequestFacts.source_ip``.
        not_ip_blocks: addresses or blocks that must not match.

    Raises:
        ConfigurationError: no field is set (Istio: "from.source must not be empty"), a
            field is not a list of strings, or a value is malformed.
    """

    principals: Sequence[str] = ()
    not_principals: Sequence[str] = ()
    request_principals: Sequence[str] = ()
    not_request_principals: Sequence[str] = ()
    namespaces: Sequence[str] = ()
    not_namespaces: Sequence[str] = ()
    ip_blocks: Sequence[str] = ()
    not_ip_blocks: Sequence[str] = ()
    _checks: _Group = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        checks: list[_Check] = []
        for name, attribute in (
            ("principals", "source_principal"),
            ("request_principals", "request_principal"),
            ("namespaces", "source_namespace"),
        ):
            get = attrgetter(attribute)
            for negate in (False, True):
                key = f"not_{name}" if negate else name
                where = f"source.{key}"
                values = _strings(getattr(self, key), where)
                object.__setattr__(self, key, values)
                if name == "principals":
                    _check_principals(values, where)
                if values:
                    checks.append(_string_check(get, StringMatcher(values, field=where), negate))
        for negate in (False, True):
            key = "not_ip_blocks" if negate else "ip_blocks"
            where = f"source.{key}"
            values = _strings(getattr(self, key), where)
            object.__setattr__(self, key, values)
            if values:
                checks.append(_ip_check(IPMatcher(values, field=where), negate))
        if not checks:
            raise ConfigurationError(
                "a source must set at least one field; expected principals, request_principals, "
                "namespaces, ip_blocks or a not_ variant",
                field="source",
            )
        object.__setattr__(self, "_checks", tuple(checks))

    def matches(self, facts: RequestFacts) -> bool:
        """Return whether every field that is set matches ``facts``."""
        return all(check(facts, facts.path) for check in self._checks)


@dataclass(frozen=True, slots=True, kw_only=True)
class Operation:
    """What the request does: one entry of a rule's ``to`` (Istio's ``operation``).

    Every field that is set must match, as for :class:`Source`.

    Args:
        hosts: the ``Host`` header, matched case-insensitively against
            ``RequestFacts.host`` (which carries no port); a value with a port
            (``example.com:8080``) is matched against ``host:port``.
        not_hosts: hosts that must not match.
        ports: the port the request arrived on (``RequestFacts.port``), integers.
        not_ports: ports that must not match.
        methods: HTTP methods, upper-case (``GET``), matched case-sensitively.
        not_methods: methods that must not match.
        paths: request paths, matched against the *normalized* path without the query:
            exact, ``prefix*``, ``*suffix``, ``*``, or a template where a whole segment
            ``{*}`` matches one segment and a final ``{**}`` matches the rest
            (``/api/{*}/items``, ``/static/{**}``).
        not_paths: paths that must not match.

    Raises:
        ConfigurationError: no field is set (Istio: "to.operation must not be empty"), a
            field has the wrong type, or a value is malformed.
    """

    hosts: Sequence[str] = ()
    not_hosts: Sequence[str] = ()
    ports: Sequence[int] = ()
    not_ports: Sequence[int] = ()
    methods: Sequence[str] = ()
    not_methods: Sequence[str] = ()
    paths: Sequence[str] = ()
    not_paths: Sequence[str] = ()
    _checks: _Group = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        checks: list[_Check] = []
        for negate in (False, True):
            prefix = "not_" if negate else ""
            key = f"{prefix}hosts"
            hosts = _strings(self.hosts if not negate else self.not_hosts, f"operation.{key}")
            object.__setattr__(self, key, hosts)
            if hosts:
                matcher = StringMatcher(hosts, field=f"operation.{key}", ignore_case=True)
                checks.append(_host_check(matcher, negate))
            key = f"{prefix}ports"
            given = self.not_ports if negate else self.ports
            if isinstance(given, (str, bytes)) or not isinstance(given, Sequence):
                raise ConfigurationError(
                    f"expected a list of port numbers, got {_type_name(given)}",
                    field=f"operation.{key}",
                    value=given,
                )
            ports = port_set(given, field=f"operation.{key}")
            object.__setattr__(self, key, tuple(given))
            if ports:
                checks.append(_port_check(ports, negate))
            key = f"{prefix}methods"
            methods = _strings(self.not_methods if negate else self.methods, f"operation.{key}")
            _check_methods(methods, f"operation.{key}")
            object.__setattr__(self, key, methods)
            if methods:
                matcher = StringMatcher(methods, field=f"operation.{key}")
                checks.append(_string_check(_METHOD, matcher, negate))
            key = f"{prefix}paths"
            paths = _strings(self.not_paths if negate else self.paths, f"operation.{key}")
            object.__setattr__(self, key, paths)
            if paths:
                matcher = StringMatcher(paths, field=f"operation.{key}", path_templates=True)
                checks.append(_path_check(matcher, negate))
        if not checks:
            raise ConfigurationError(
                "an operation must set at least one field; expected hosts, ports, methods, "
                "paths or a not_ variant",
                field="operation",
            )
        object.__setattr__(self, "_checks", tuple(checks))

    def matches(self, facts: RequestFacts, path: str | None = None) -> bool:
        """Return whether every field that is set matches.

        Args:
            facts: the request.
            path: the normalized path; when omitted, ``facts.path`` is taken as already
                normalized.
        """
        target = facts.path if path is None else path
        return all(check(facts, target) for check in self._checks)


_METHOD = attrgetter("method")

_KEY_HELP = (
    "request.headers[<name>], source.ip, source.namespace, source.principal, "
    "request.auth.principal, request.auth.audiences, request.auth.presenter, "
    "request.auth.claims[<claim>], destination.port"
)
_UNSUPPORTED_KEYS = {
    "remote.ip": "the original client address behind proxies is not known in-process; "
    "use source.ip for the direct peer",
    "destination.ip": "the local address is not part of the request facts",
    "connection.sni": "the TLS server name is not part of the request facts",
    "source.serviceAccount": "use source.principal (<trust-domain>/ns/<ns>/sa/<sa>)",
    "destination.namespace": "replaced by the namespace the policy is installed in",
    "destination.name": "deprecated in Istio (v1alpha1 only)",
    "destination.user": "deprecated in Istio (v1alpha1 only)",
}
_UNSUPPORTED_KEY_PREFIXES = {
    "destination.labels": "replaced by where the policy is installed",
    "request.experimental.inline.headers": "use request.headers[<name>]",
    "experimental.envoy.filters.": "Envoy filter metadata does not exist in-process",
}
_HEADER_KEY = re.compile(r"request\.headers\[([!#$%&'*+\-.^_`|~0-9A-Za-z]+)\]\Z")
_CLAIM_KEY = re.compile(r"request\.auth\.claims((?:\[[^\[\]]+\])+)\Z")
_CLAIM_PART = re.compile(r"\[([^\[\]]+)\]")


def _claim(value: object, names: tuple[str, ...]) -> object:
    for name in names:
        if not isinstance(value, Mapping):
            return None
        value = value.get(name)
    return value


def _claims_extractor(names: tuple[str, ...]) -> Callable[[RequestFacts], object]:
    if len(names) == 1:
        (name,) = names
        return lambda facts: facts.claims.get(name)
    return lambda facts: _claim(facts.claims, names)


def _value_hits(match: Callable[[str], bool], value: object) -> bool:
    # JWT claims may be a string or a list of strings; anything else never matches.
    if isinstance(value, str):
        return match(value)
    if isinstance(value, (list, tuple)):
        return any(isinstance(item, str) and match(item) for item in value)
    return False


def _condition_check(
    extract: Callable[[RequestFacts], object],
    positive: Callable[[str], bool] | None,
    negative: Callable[[str], bool] | None,
) -> _Check:
    def check(facts: RequestFacts, path: str) -> bool:
        value = extract(facts)
        if positive is not None and not _value_hits(positive, value):
            return False
        return negative is None or not _value_hits(negative, value)

    return check


def _port_values(values: tuple[str, ...], where: str) -> frozenset[int]:
    ports: set[int] = set()
    for index, value in enumerate(values):
        if not (value.isascii() and value.isdigit()) or int(value) > 65535:
            raise ConfigurationError(
                "bad port; expected a port number from 0 to 65535",
                field=f"{where}[{index}]",
                value=value,
            )
        ports.add(int(value))
    return frozenset(ports)


def _destination_port_check(
    positive: frozenset[int] | None, negative: frozenset[int] | None
) -> _Check:
    def check(facts: RequestFacts, path: str) -> bool:
        port = facts.port
        if positive is not None and port not in positive:
            return False
        return negative is None or port not in negative

    return check


_Extractor = Callable[[RequestFacts], object]
_ValueCompiler = Callable[[tuple[str, ...], str], Callable[[str], bool]]


def _compile_strings(values: tuple[str, ...], where: str) -> Callable[[str], bool]:
    return StringMatcher(values, field=where).fast


def _compile_principals(values: tuple[str, ...], where: str) -> Callable[[str], bool]:
    _check_principals(values, where)
    return StringMatcher(values, field=where).fast


def _compile_ips(values: tuple[str, ...], where: str) -> Callable[[str], bool]:
    return IPMatcher(values, field=where).match


def _parse_key(key: str) -> tuple[_Extractor, _ValueCompiler]:
    header = _HEADER_KEY.match(key)
    if header:
        name = header.group(1).lower()
        return (lambda facts: facts.headers.get(name)), _compile_strings
    claim = _CLAIM_KEY.match(key)
    if claim:
        return _claims_extractor(tuple(_CLAIM_PART.findall(claim.group(1)))), _compile_strings
    known = _SIMPLE_KEYS.get(key)
    if known is not None:
        return known
    reason = _UNSUPPORTED_KEYS.get(key)
    if reason is None:
        for prefix, why in _UNSUPPORTED_KEY_PREFIXES.items():
            if key.startswith(prefix):
                reason = why
    if reason is not None:
        raise ConfigurationError(
            f"unsupported key {key!r}: {reason}", field="condition.key", value=key
        )
    raise ConfigurationError(
        f"unknown key {key!r}; expected one of {_KEY_HELP}", field="condition.key", value=key
    )


_SIMPLE_KEYS: dict[str, tuple[_Extractor, _ValueCompiler]] = {
    "source.ip": (attrgetter("source_ip"), _compile_ips),
    "source.namespace": (attrgetter("source_namespace"), _compile_strings),
    "source.principal": (attrgetter("source_principal"), _compile_principals),
    "request.auth.principal": (attrgetter("request_principal"), _compile_strings),
    "request.auth.audiences": (_claims_extractor(("aud",)), _compile_strings),
    "request.auth.presenter": (_claims_extractor(("azp",)), _compile_strings),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Condition:
    """An extra condition of a rule: one entry of its ``when`` (Istio's ``condition``).

    The condition holds when the attribute named by ``key`` matches one of ``values``
    (if set) and none of ``not_values`` (if set). A missing attribute matches no value.

    Args:
        key: the attribute, as Istio names it:

            - ``request.headers[<name>]``: a request header (name case-insensitive).
            - ``source.ip``: the direct peer address; values are addresses or CIDR blocks.
            - ``source.namespace``, ``source.principal``: from the peer's mTLS identity.
            - ``request.auth.principal``: the JWT principal ``<iss>/<sub>``.
            - ``request.auth.audiences``: the JWT ``aud`` claim.
            - ``request.auth.presenter``: the JWT ``azp`` claim.
            - ``request.auth.claims[<claim>]``: a JWT claim; nested claims as
              ``request.auth.claims[a][b]``. A list-valued claim matches when any of its
              elements does; claims that are neither strings nor lists never match.
            - ``destination.port``: the port the request arrived on; values are digits.

        values: the values of which one must match (Istio string forms apply).
        not_values: the values of which none may match.

    Raises:
        ConfigurationError: the key is unknown or unsupported (the error names it),
            neither ``values`` nor ``not_values`` is set, or a value is malformed.
    """

    key: str
    values: Sequence[str] = ()
    not_values: Sequence[str] = ()
    _check: _Check = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        key = self.key
        if not isinstance(key, str) or not key:
            raise ConfigurationError(
                f"expected an attribute name like request.headers[x-env]; known keys: {_KEY_HELP}",
                field="condition.key",
                value=key,
            )
        values = _strings(self.values, "condition.values")
        not_values = _strings(self.not_values, "condition.not_values")
        object.__setattr__(self, "values", values)
        object.__setattr__(self, "not_values", not_values)
        if not values and not not_values:
            raise ConfigurationError(
                f"at least one of values or not_values must be set for key {key}",
                field="condition",
                value=key,
            )
        check: _Check
        if key == "destination.port":
            check = _destination_port_check(
                _port_values(values, "condition.values") if values else None,
                _port_values(not_values, "condition.not_values") if not_values else None,
            )
        else:
            extract, compile_values = _parse_key(key)
            check = _condition_check(
                extract,
                compile_values(values, "condition.values") if values else None,
                compile_values(not_values, "condition.not_values") if not_values else None,
            )
        object.__setattr__(self, "_check", check)

    def matches(self, facts: RequestFacts) -> bool:
        """Return whether the condition holds for ``facts``."""
        return self._check(facts, facts.path)


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """One rule of a policy: sources, operations and conditions.

    The rule matches a request when (``from_`` is empty or any :class:`Source` matches)
    and (``to`` is empty or any :class:`Operation` matches) and every :class:`Condition`
    in ``when`` holds. A rule with nothing set (``Rule()``, Istio's ``{}``) matches every
    request.

    Args:
        from_: the sources (Istio's ``from``); any one must match.
        to: the operations; any one must match.
        when: the conditions; all must hold.

    Raises:
        ConfigurationError: an entry has the wrong type.
    """

    from_: Sequence[Source] = ()
    to: Sequence[Operation] = ()
    when: Sequence[Condition] = ()
    _compiled: _Check = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        sources = _items(self.from_, "rule.from_", Source)
        operations = _items(self.to, "rule.to", Operation)
        conditions = _items(self.when, "rule.when", Condition)
        object.__setattr__(self, "from_", sources)
        object.__setattr__(self, "to", operations)
        object.__setattr__(self, "when", conditions)
        parts: list[_Check] = []
        if sources:
            parts.append(_any_of([_all_of(source._checks) for source in sources]))
        if operations:
            parts.append(_any_of([_all_of(operation._checks) for operation in operations]))
        parts.extend(condition._check for condition in conditions)
        object.__setattr__(self, "_compiled", _all_of(parts))

    def matches(self, facts: RequestFacts, path: str | None = None) -> bool:
        """Return whether the rule matches.

        Args:
            facts: the request.
            path: the normalized path; when omitted, ``facts.path`` is taken as already
                normalized.
        """
        return self._compiled(facts, facts.path if path is None else path)


# A rule compiles into one closure shaped like the rule, so that the common shapes
# (one source, one operation, one or two checks each) cost as few calls as possible.


def _always(facts: RequestFacts, path: str) -> bool:
    return True


def _all_of(checks: Sequence[_Check]) -> _Check:
    if not checks:
        return _always
    if len(checks) == 1:
        return checks[0]
    if len(checks) == 2:
        first, second = checks
        return lambda facts, path: first(facts, path) and second(facts, path)
    frozen = tuple(checks)

    def all_of(facts: RequestFacts, path: str) -> bool:
        # A plain loop: all() over a generator costs a frame per call on this hot path.
        for check in frozen:  # noqa: SIM110
            if not check(facts, path):
                return False
        return True

    return all_of


def _any_of(checks: Sequence[_Check]) -> _Check:
    if len(checks) == 1:
        return checks[0]
    frozen = tuple(checks)

    def any_of(facts: RequestFacts, path: str) -> bool:
        for check in frozen:  # noqa: SIM110
            if check(facts, path):
                return True
        return False

    return any_of


def _first_match(rules: tuple[_Check, ...], facts: RequestFacts, path: str) -> int:
    for index, rule in enumerate(rules):
        if rule(facts, path):
            return index
    return -1


# -- AuthorizationPolicy ----------------------------------------------------------------

_SPEC_FIELDS = {"action": "action", "rules": "rules"}
_SPEC_UNSUPPORTED = {
    "selector": "a policy applies to the service it is installed in, so there are no "
    "workloads to select",
    "targetRef": "a policy applies to the service it is installed in",
    "targetRefs": "a policy applies to the service it is installed in",
    "provider": "only used by the CUSTOM action, which is not supported",
}
_RULE_FIELDS = {"from": "from_", "to": "to", "when": "when"}
_FROM_FIELDS = {"source": "source"}
_TO_FIELDS = {"operation": "operation"}
_SOURCE_FIELDS = {
    "principals": "principals",
    "notPrincipals": "not_principals",
    "requestPrincipals": "request_principals",
    "notRequestPrincipals": "not_request_principals",
    "namespaces": "namespaces",
    "notNamespaces": "not_namespaces",
    "ipBlocks": "ip_blocks",
    "notIpBlocks": "not_ip_blocks",
}
_REMOTE_IP = (
    "the original client address behind proxies is not known in-process; use ipBlocks "
    "for the direct peer"
)
_SERVICE_ACCOUNTS = "use principals (<trust-domain>/ns/<ns>/sa/<sa>)"
_SOURCE_UNSUPPORTED = {
    "remoteIpBlocks": _REMOTE_IP,
    "notRemoteIpBlocks": _REMOTE_IP,
    "serviceAccounts": _SERVICE_ACCOUNTS,
    "notServiceAccounts": _SERVICE_ACCOUNTS,
}
_OPERATION_FIELDS = {
    "hosts": "hosts",
    "notHosts": "not_hosts",
    "ports": "ports",
    "notPorts": "not_ports",
    "methods": "methods",
    "notMethods": "not_methods",
    "paths": "paths",
    "notPaths": "not_paths",
}
_CONDITION_FIELDS = {"key": "key", "values": "values", "notValues": "not_values"}
_NO_UNSUPPORTED: Mapping[str, str] = {}
_CAMEL = re.compile(r"_([a-z])")


def _camel(text: str) -> str:
    return _CAMEL.sub(lambda m: m.group(1).upper(), text)


def _rewrap(exc: ConfigurationError, local: str, prefix: str, *, camel: bool) -> ConfigurationError:
    """Re-address an error raised with a local field name (``source.ip_blocks[0]``)."""
    own = exc.field or ""
    message = str(exc)
    if own and message.startswith(f"{own}: "):
        message = message[len(own) + 2 :]
    rest = own[len(local) :] if own.startswith(local) else own
    if camel:
        rest = _camel(rest)
    if not prefix:
        rest = rest.lstrip(".")
    new = ConfigurationError(message, field=(prefix + rest) or None, value=exc.value)
    new.__cause__ = exc
    return new


def _fields(
    value: object, where: str, known: Mapping[str, str], unsupported: Mapping[str, str]
) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            f"expected a mapping, got {_type_name(value)}", field=where or None, value=value
        )
    result: dict[str, Any] = {}
    for key, item in value.items():
        path = f"{where}.{key}" if where else str(key)
        if key in known:
            if item is not None:
                result[known[key]] = item
        elif key in unsupported:
            raise ConfigurationError(
                f"unsupported field: {unsupported[key]}", field=path, value=item
            )
        else:
            raise ConfigurationError(
                f"unknown field; expected one of {', '.join(known)}", field=path, value=item
            )
    return result


def _entries(value: object, where: str, what: str) -> Sequence[Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigurationError(
            f"expected a list of {what}, got {_type_name(value)}", field=where, value=value
        )
    return value


def _spec_ports(value: object, where: str) -> tuple[int, ...]:
    ports: list[int] = []
    for index, port in enumerate(_entries(value, where, "ports")):
        if isinstance(port, str) and port.isascii() and port.isdigit():
            ports.append(int(port))
        elif isinstance(port, int) and not isinstance(port, bool):
            ports.append(port)
        else:
            raise ConfigurationError(
                f'expected a port number like "8080", got {_type_name(port)}',
                field=f"{where}[{index}]",
                value=port,
            )
    return tuple(ports)


def _parse_rule(value: object, where: str) -> Rule:
    spec = _fields(value, where, _RULE_FIELDS, _NO_UNSUPPORTED)
    sources: list[Source] = []
    operations: list[Operation] = []
    conditions: list[Condition] = []
    if "from_" in spec:
        entries = _entries(spec["from_"], f"{where}.from", "sources")
        if not entries:
            raise ConfigurationError(
                "must not be empty; omit `from` to match any source",
                field=f"{where}.from",
                value=entries,
            )
        for index, entry in enumerate(entries):
            at = f"{where}.from[{index}]"
            source = _fields(entry, at, _FROM_FIELDS, _NO_UNSUPPORTED).get("source")
            kwargs = _fields(
                {} if source is None else source,
                f"{at}.source",
                _SOURCE_FIELDS,
                _SOURCE_UNSUPPORTED,
            )
            if not kwargs:
                raise ConfigurationError(
                    f"must not be empty; expected at least one of {', '.join(_SOURCE_FIELDS)}",
                    field=f"{at}.source",
                    value=source,
                )
            try:
                sources.append(Source(**kwargs))
            except ConfigurationError as exc:
                raise _rewrap(exc, "source", f"{at}.source", camel=True) from exc
    if "to" in spec:
        entries = _entries(spec["to"], f"{where}.to", "operations")
        if not entries:
            raise ConfigurationError(
                "must not be empty; omit `to` to match any operation",
                field=f"{where}.to",
                value=entries,
            )
        for index, entry in enumerate(entries):
            at = f"{where}.to[{index}]"
            operation = _fields(entry, at, _TO_FIELDS, _NO_UNSUPPORTED).get("operation")
            kwargs = _fields(
                {} if operation is None else operation,
                f"{at}.operation",
                _OPERATION_FIELDS,
                _NO_UNSUPPORTED,
            )
            if not kwargs:
                raise ConfigurationError(
                    f"must not be empty; expected at least one of {', '.join(_OPERATION_FIELDS)}",
                    field=f"{at}.operation",
                    value=operation,
                )
            for key, spec_key in (("ports", "ports"), ("not_ports", "notPorts")):
                if key in kwargs:
                    kwargs[key] = _spec_ports(kwargs[key], f"{at}.operation.{spec_key}")
            try:
                operations.append(Operation(**kwargs))
            except ConfigurationError as exc:
                raise _rewrap(exc, "operation", f"{at}.operation", camel=True) from exc
    if "when" in spec:
        for index, entry in enumerate(_entries(spec["when"], f"{where}.when", "conditions")):
            at = f"{where}.when[{index}]"
            kwargs = _fields(entry, at, _CONDITION_FIELDS, _NO_UNSUPPORTED)
            if "key" not in kwargs:
                raise ConfigurationError(
                    "missing; expected the attribute to match, like request.headers[x-env]",
                    field=f"{at}.key",
                )
            if not kwargs.get("values") and not kwargs.get("not_values"):
                raise ConfigurationError(
                    f"at least one of values or notValues must be set for key {kwargs['key']}",
                    field=at,
                    value=entry,
                )
            try:
                conditions.append(Condition(**kwargs))
            except ConfigurationError as exc:
                raise _rewrap(exc, "condition", at, camel=True) from exc
    return Rule(from_=sources, to=operations, when=conditions)


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthorizationPolicy:
    """A named set of rules with an action, as Istio's AuthorizationPolicy.

    A policy matches a request when any of its rules does. A policy without rules
    matches nothing: an ``ALLOW`` policy without rules therefore denies every request
    (Istio's allow-nothing ``spec: {}``), while ``DENY`` and ``AUDIT`` policies without
    rules have no effect.

    Args:
        name: the policy's name, used in decisions and logs; unique within an
            :class:`Authorizer`.
        action: ``"ALLOW"`` (default, as in Istio), ``"DENY"`` or ``"AUDIT"``.
        rules: the rules; see :class:`Rule`.
        dry_run: evaluate the policy and record its would-be outcome in
            :attr:`AuthzDecision.dry_run`, but never enforce it (Istio's
            ``istio.io/dry-run: "true"`` annotation). ALLOW and DENY only.

    Raises:
        ConfigurationError: an empty name, an unknown action, ``CUSTOM`` (unsupported:
            external authorization), a rule of the wrong type, or ``dry_run`` on an
            ``AUDIT`` policy.
    """

    name: str
    action: Action = "ALLOW"
    rules: Sequence[Rule] = ()
    dry_run: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigurationError("expected a non-empty string", field="name", value=self.name)
        action: object = self.action
        if action == "CUSTOM":
            raise ConfigurationError(
                "unsupported action CUSTOM: external authorization is not supported; expected "
                "one of ALLOW, DENY, AUDIT",
                field="action",
                value=self.action,
            )
        if self.action not in _ACTIONS:
            raise ConfigurationError(
                "expected one of ALLOW, DENY, AUDIT", field="action", value=self.action
            )
        object.__setattr__(self, "rules", _items(self.rules, "rules", Rule))
        if not isinstance(self.dry_run, bool):
            raise ConfigurationError(
                f"expected a bool, got {_type_name(self.dry_run)}",
                field="dry_run",
                value=self.dry_run,
            )
        if self.dry_run and self.action == "AUDIT":
            raise ConfigurationError(
                "dry_run applies to ALLOW and DENY policies; an AUDIT policy never enforces",
                field="dry_run",
                value=True,
            )

    def matching_rule(self, facts: RequestFacts, path: str | None = None) -> int | None:
        """Return the index of the first rule that matches, or ``None``.

        Args:
            facts: the request.
            path: the normalized path; when omitted, ``facts.path`` is taken as already
                normalized.
        """
        target = facts.path if path is None else path
        index = _first_match(tuple(rule._compiled for rule in self.rules), facts, target)
        return None if index < 0 else index

    @classmethod
    def from_mapping(
        cls, name: str, spec: Mapping[str, Any], *, dry_run: bool = False
    ) -> AuthorizationPolicy:
        """Build a policy from the camelCase ``spec`` of an Istio AuthorizationPolicy.

        Accepted fields: ``action``; ``rules[].from[].source.{principals, notPrincipals,
        requestPrincipals, notRequestPrincipals, namespaces, notNamespaces, ipBlocks,
        notIpBlocks}``; ``rules[].to[].operation.{hosts, notHosts, ports, notPorts,
        methods, notMethods, paths, notPaths}``; ``rules[].when[].{key, values,
        notValues}``. Ports may be strings (as in Istio) or integers; a ``null`` value is
        the same as an absent field.

        Args:
            name: the policy's name (Istio's ``metadata.name``).
            spec: the mapping, as loaded from YAML or JSON.
            dry_run: see :class:`AuthorizationPolicy`.

        Raises:
            ConfigurationError: an unknown or unsupported field, a wrong type or a bad
                value; ``field`` is the full path, like
                ``rules[0].from[1].source.principals[2]``.
        """
        if not isinstance(spec, Mapping):
            raise ConfigurationError(
                "expected the spec of an Istio AuthorizationPolicy as a mapping, got "
                f"{_type_name(spec)}",
                value=spec,
            )
        fields = _fields(spec, "", _SPEC_FIELDS, _SPEC_UNSUPPORTED)
        rules = [
            _parse_rule(rule, f"rules[{index}]")
            for index, rule in enumerate(_entries(fields.get("rules", ()), "rules", "rules"))
        ]
        action = fields.get("action", "ALLOW")
        try:
            return cls(name=name, action=action, rules=rules, dry_run=dry_run)
        except ConfigurationError as exc:
            raise _rewrap(exc, "", "", camel=False) from exc

    @classmethod
    def from_manifest(cls, document: Mapping[str, Any]) -> AuthorizationPolicy:
        """Build a policy from a whole Istio manifest (``kind: AuthorizationPolicy``).

        The name comes from ``metadata.name`` and ``dry_run`` from the
        ``istio.io/dry-run`` annotation (``"true"`` or ``"false"``); ``metadata.namespace``
        and other metadata are ignored.

        Raises:
            ConfigurationError: not an AuthorizationPolicy of ``security.istio.io``, a
                missing name, a bad annotation, or any error of :meth:`from_mapping`
                (with ``field`` prefixed by ``spec.``).
        """
        if not isinstance(document, Mapping):
            raise ConfigurationError(
                f"expected a mapping, got {_type_name(document)}", value=document
            )
        api_version = document.get("apiVersion")
        if not isinstance(api_version, str) or not api_version.startswith("security.istio.io/"):
            raise ConfigurationError(
                "expected security.istio.io/v1 or security.istio.io/v1beta1",
                field="apiVersion",
                value=api_version,
            )
        if document.get("kind") != "AuthorizationPolicy":
            raise ConfigurationError(
                "expected AuthorizationPolicy", field="kind", value=document.get("kind")
            )
        metadata = document.get("metadata")
        if not isinstance(metadata, Mapping):
            raise ConfigurationError(
                f"expected a mapping, got {_type_name(metadata)}", field="metadata", value=metadata
            )
        name = metadata.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigurationError(
                "expected a non-empty string", field="metadata.name", value=name
            )
        annotations = metadata.get("annotations") or {}
        flag = (
            annotations.get("istio.io/dry-run", "false")
            if isinstance(annotations, Mapping)
            else None
        )
        if flag not in ("true", "false"):
            raise ConfigurationError(
                'expected "true" or "false"',
                field='metadata.annotations["istio.io/dry-run"]',
                value=flag,
            )
        spec = document.get("spec")
        try:
            return cls.from_mapping(name, {} if spec is None else spec, dry_run=flag == "true")
        except ConfigurationError as exc:
            raise _rewrap(exc, "", "spec." if exc.field else "spec", camel=False) from exc


# -- decisions --------------------------------------------------------------------------


class DryRunMatch(NamedTuple):
    """A dry-run policy that matched a request: what it would have done."""

    policy: str
    """The policy's name."""
    would_allow: bool
    """``True`` for a dry-run ALLOW policy, ``False`` for a dry-run DENY policy."""
    rule: int
    """The index of the first rule that matched."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthzDecision:
    """The outcome of :meth:`Authorizer.decide`.

    Decisions without per-request details are built once and shared, so compare them by
    value, never by identity.

    Attributes:
        allowed: whether the request may proceed.
        status: the HTTP status a shell should answer with: 200 when allowed, 403 when
            denied, 400 for a path that cannot be normalized safely.
        code: a stable short code: :data:`ALLOWED_BY_POLICY`, :data:`DENIED_BY_POLICY`,
            :data:`NO_ALLOW_MATCH`, :data:`NO_ALLOW_POLICIES` or :data:`INVALID_PATH`.
        reason: one line for people and logs, like
            ``denied by DENY policy "block-shipping" rule 0``.
        policy: the name of the policy that decided, when one did.
        action: that policy's action (``"ALLOW"`` or ``"DENY"``), when one decided.
        rule: the index of that policy's first matching rule, when one decided.
        rewritten_path: the normalized path the rules were matched against, when it
            differs from ``RequestFacts.path``; ``None`` when the path was already
            canonical (or invalid). A shell should hand this path to the application, so
            that the application routes on exactly what was authorized.
        dry_run: the dry-run policies that matched, in declaration order.
        dry_run_allowed: what the decision would have been with the dry-run policies
            enforced too; ``None`` when there are no dry-run policies.
        audited: the names of the ``AUDIT`` policies that matched.
    """

    allowed: bool
    status: int
    code: str
    reason: str
    policy: str | None = None
    action: str | None = None
    rule: int | None = None
    rewritten_path: str | None = None
    dry_run: tuple[DryRunMatch, ...] = ()
    dry_run_allowed: bool | None = None
    audited: tuple[str, ...] = ()


_FirstMatch = Callable[[RequestFacts, str], int]

# (name, first matching rule's index or -1, one prebuilt decision per rule)
_Compiled = tuple[str, _FirstMatch, tuple[AuthzDecision, ...]]


def _exact_principals(rule: Rule) -> frozenset[str] | None:
    """The principals one of which a request must have for ``rule`` to match, or ``None``
    when the rule may match other requests too (no sources, or a source that does not
    require an exact principal)."""
    if not rule.from_:
        return None
    principals: set[str] = set()
    for source in rule.from_:
        values = source.principals
        if not values or any(v == "*" or v.startswith("*") or v.endswith("*") for v in values):
            return None
        principals.update(values)
    return frozenset(principals)


def _first_match_of(rules: Sequence[Rule]) -> _FirstMatch:
    """A function returning the index of the first of ``rules`` that matches, or -1.

    Rules that can only match callers with given principals are indexed by them, so a
    request is matched against the rules its caller may match, in order, not all of them.
    """
    checks = tuple(rule._compiled for rule in rules)
    by_principal: dict[str, list[int]] = {}
    others: list[int] = []
    for index, rule in enumerate(rules):
        principals = _exact_principals(rule)
        if principals is None:
            others.append(index)
        else:
            for principal in principals:
                by_principal.setdefault(principal, []).append(index)
    if not by_principal or len(rules) < 2:
        return lambda facts, path: _first_match(checks, facts, path)
    rest = tuple((index, checks[index]) for index in others)
    candidates = {
        principal: tuple((index, checks[index]) for index in sorted({*indexes, *others}))
        for principal, indexes in by_principal.items()
    }

    def first_match(facts: RequestFacts, path: str) -> int:
        principal = facts.source_principal
        for index, check in rest if principal is None else candidates.get(principal, rest):
            if check(facts, path):
                return index
        return -1

    return first_match


def _compile(policy: AuthorizationPolicy) -> _Compiled:
    rules = policy.rules
    allowed = policy.action != "DENY"
    verb = "allowed" if allowed else "denied"
    decisions = tuple(
        AuthzDecision(
            allowed=allowed,
            status=200 if allowed else 403,
            code=ALLOWED_BY_POLICY if allowed else DENIED_BY_POLICY,
            reason=f'{verb} by {policy.action} policy "{policy.name}" rule {index}',
            policy=policy.name,
            action=policy.action,
            rule=index,
        )
        for index in range(len(rules))
    )
    return policy.name, _first_match_of(rules), decisions


def _path_never_matches(pattern: str, normalization: PathNormalization) -> str | None:
    """Return what an exact or prefix path pattern normalizes to, if not itself."""
    if pattern == "*" or pattern.startswith("*") or "{" in pattern:
        return None
    if pattern.endswith("*"):
        # Probe a prefix with a trailing character so "/api/." stays a valid prefix.
        stem = re.sub(r"%[0-9A-Fa-f]?\Z", "", pattern[:-1])
        probe = stem + "x"
        try:
            normalized = normalization.normalize(probe)
        except InvalidPath as exc:
            return f"an invalid path [{exc.reason}]"
        return None if normalized == probe else repr(normalized[:-1] + "*")
    try:
        normalized = normalization.normalize(pattern)
    except InvalidPath as exc:
        return f"an invalid path [{exc.reason}]"
    return None if normalized == pattern else repr(normalized)


class Authorizer:
    """Decides on requests with a fixed set of policies, as Istio combines them.

    Args:
        policies: the policies. Names must be unique.
        path_normalization: how request paths are normalized before path rules are
            matched; the strict defaults of :class:`~meshware.policy.paths.PathNormalization`
            when omitted.

    Raises:
        ConfigurationError: an entry is not an :class:`AuthorizationPolicy`, two policies
            share a name, or an exact or prefix path in a rule can never match because
            requests are matched on normalized paths (``/a//b`` with merged slashes,
            ``/caf%c3%a9`` with lower-case escapes, ``/x/../y``).

    Attributes:
        policies: the policies, in the order given.
        path_normalization: the path settings in use.
    """

    __slots__ = (
        "_allow",
        "_audit",
        "_deny",
        "_dry",
        "_extras",
        "_has_allow",
        "_has_dry_allow",
        "_no_allow",
        "_no_allow_match",
        "_normalize",
        "path_normalization",
        "policies",
    )

    def __init__(
        self,
        policies: Iterable[AuthorizationPolicy],
        *,
        path_normalization: PathNormalization = DEFAULT_PATH_NORMALIZATION,
    ) -> None:
        if not isinstance(path_normalization, PathNormalization):
            raise ConfigurationError(
                f"expected a PathNormalization, got {_type_name(path_normalization)}",
                field="path_normalization",
                value=path_normalization,
            )
        given = tuple(policies)
        names: set[str] = set()
        for index, policy in enumerate(given):
            if not isinstance(policy, AuthorizationPolicy):
                raise ConfigurationError(
                    f"expected an AuthorizationPolicy, got {_type_name(policy)}",
                    field=f"policies[{index}]",
                    value=policy,
                )
            if policy.name in names:
                raise ConfigurationError(
                    f"duplicate policy name {policy.name!r}; names must be unique",
                    field=f"policies[{index}].name",
                    value=policy.name,
                )
            names.add(policy.name)
            self._check_paths(index, policy, path_normalization)
        self.policies = given
        self.path_normalization = path_normalization
        self._normalize = path_normalization.normalize
        enforced = [p for p in given if not p.dry_run]
        # Policies without rules match nothing; only their existence matters (ALLOW).
        self._deny = tuple(_compile(p) for p in enforced if p.action == "DENY" and p.rules)
        self._allow = tuple(_compile(p) for p in enforced if p.action == "ALLOW" and p.rules)
        self._audit = tuple(_compile(p) for p in enforced if p.action == "AUDIT" and p.rules)
        self._has_allow = any(p.action == "ALLOW" for p in enforced)
        dry = [p for p in given if p.dry_run]
        self._dry: tuple[tuple[str, str, _FirstMatch], ...] = tuple(
            (p.action, p.name, _first_match_of(p.rules)) for p in dry
        )
        self._has_dry_allow = any(p.action == "ALLOW" for p in dry)
        self._extras = bool(self._dry or self._audit)
        if any(p.action in ("ALLOW", "DENY") for p in enforced):
            reason = "no DENY policy matched and no ALLOW policies: allowed"
        else:
            reason = "no policies: allowed"
        self._no_allow = AuthzDecision(
            allowed=True, status=200, code=NO_ALLOW_POLICIES, reason=reason
        )
        self._no_allow_match = AuthzDecision(
            allowed=False, status=403, code=NO_ALLOW_MATCH, reason="no ALLOW policy matched"
        )

    @staticmethod
    def _check_paths(
        index: int, policy: AuthorizationPolicy, normalization: PathNormalization
    ) -> None:
        for r, rule in enumerate(policy.rules):
            for o, operation in enumerate(rule.to):
                for key in ("paths", "not_paths"):
                    for k, pattern in enumerate(getattr(operation, key)):
                        becomes = _path_never_matches(pattern, normalization)
                        if becomes is not None:
                            raise ConfigurationError(
                                f"path can never match in policy {policy.name!r}: requests are "
                                f"matched on normalized paths and this one normalizes to "
                                f"{becomes}",
                                field=f"policies[{index}].rules[{r}].to[{o}].{key}[{k}]",
                                value=pattern,
                            )

    def decide(self, facts: RequestFacts) -> AuthzDecision:
        """Decide on one request.

        The path is normalized once; an invalid path is denied with status 400 and code
        :data:`INVALID_PATH` before any policy is evaluated.

        Args:
            facts: the request; ``facts.path`` is the raw, percent-encoded path.

        Returns:
            The decision; see :class:`AuthzDecision`.
        """
        raw = facts.path
        try:
            path = self._normalize(raw)
        except InvalidPath as exc:
            return AuthzDecision(
                allowed=False, status=400, code=INVALID_PATH, reason=f"invalid path: {exc}"
            )
        decision = None
        for _, first_match, decisions in self._deny:
            index = first_match(facts, path)
            if index >= 0:
                decision = decisions[index]
                break
        else:
            if not self._has_allow:
                decision = self._no_allow
            else:
                decision = self._no_allow_match
                for _, first_match, decisions in self._allow:
                    index = first_match(facts, path)
                    if index >= 0:
                        decision = decisions[index]
                        break
        # normalize() returns its argument itself when the path is already canonical.
        rewritten = None if path is raw else path
        if self._extras:
            return self._with_extras(decision, facts, path, rewritten)
        if rewritten is None:
            return decision
        return _decision(decision, rewritten, (), None, ())

    def _with_extras(
        self, decision: AuthzDecision, facts: RequestFacts, path: str, rewritten: str | None
    ) -> AuthzDecision:
        dry_run: list[DryRunMatch] = []
        dry_deny = dry_allow = False
        for dry_action, name, first_match in self._dry:
            index = first_match(facts, path)
            if index >= 0:
                dry_run.append(DryRunMatch(name, dry_action == "ALLOW", index))
                if dry_action == "DENY":
                    dry_deny = True
                else:
                    dry_allow = True
        dry_run_allowed: bool | None = None
        if self._dry:
            if decision.code == DENIED_BY_POLICY or dry_deny:
                dry_run_allowed = False
            elif not (self._has_allow or self._has_dry_allow):
                dry_run_allowed = True
            else:
                dry_run_allowed = decision.code == ALLOWED_BY_POLICY or dry_allow
        audited = tuple(
            name for name, first_match, _ in self._audit if first_match(facts, path) >= 0
        )
        return _decision(decision, rewritten, tuple(dry_run), dry_run_allowed, audited)

    def __repr__(self) -> str:
        names = ", ".join(f"{p.action} {p.name!r}" for p in self.policies)
        return f"Authorizer([{names}])"


def _decision(
    base: AuthzDecision,
    rewritten_path: str | None,
    dry_run: tuple[DryRunMatch, ...],
    dry_run_allowed: bool | None,
    audited: tuple[str, ...],
) -> AuthzDecision:
    return AuthzDecision(
        allowed=base.allowed,
        status=base.status,
        code=base.code,
        reason=base.reason,
        policy=base.policy,
        action=base.action,
        rule=base.rule,
        rewritten_path=rewritten_path,
        dry_run=dry_run,
        dry_run_allowed=dry_run_allowed,
        audited=audited,
    )


# -- per-route declarations -------------------------------------------------------------


def authorize(
    *,
    principals: Sequence[str] = (),
    not_principals: Sequence[str] = (),
    namespaces: Sequence[str] = (),
    not_namespaces: Sequence[str] = (),
    request_principals: Sequence[str] = (),
    not_request_principals: Sequence[str] = (),
    ip_blocks: Sequence[str] = (),
    not_ip_blocks: Sequence[str] = (),
    methods: Sequence[str] = (),
    not_methods: Sequence[str] = (),
    paths: Sequence[str] = (),
    not_paths: Sequence[str] = (),
    when: Sequence[Condition] | Mapping[str, Sequence[str]] = (),
    action: Action = "ALLOW",
    name: str | None = None,
    dry_run: bool = False,
) -> Callable[[_T], _T]:
    """Declare a one-rule policy on a handler function or class.

    The source arguments (``principals`` ... ``not_ip_blocks``) form one :class:`Source`,
    the operation arguments (``methods`` ... ``not_paths``) one :class:`Operation`; an
    argument left empty is not part of the rule. Decorators stack: each one adds a
    policy, and :func:`route_policies` returns them in the order they are written. This
    only declares policies; applying them is up to the framework integration.

    Args:
        principals, not_principals, namespaces, not_namespaces, request_principals,
            not_request_principals, ip_blocks, not_ip_blocks: see :class:`Source`.
        methods, not_methods, paths, not_paths: see :class:`Operation`.
        when: conditions, as :class:`Condition` objects or as a mapping of key to the
            values of which one must match (``{"request.headers[x-env]": ["prod"]}``).
        action: ``"ALLOW"`` (default), ``"DENY"`` or ``"AUDIT"``.
        name: the policy's name; by default the handler's ``module.qualname``, with
            ``#2``, ``#3``... for further policies on the same handler.
        dry_run: see :class:`AuthorizationPolicy`.

    Returns:
        A decorator that attaches the policy and returns the object unchanged.

    Raises:
        ConfigurationError: an argument is invalid (raised when the decorator is built).
        TypeError: the decorated object cannot carry attributes.
    """
    source_args = {
        "principals": principals,
        "not_principals": not_principals,
        "namespaces": namespaces,
        "not_namespaces": not_namespaces,
        "request_principals": request_principals,
        "not_request_principals": not_request_principals,
        "ip_blocks": ip_blocks,
        "not_ip_blocks": not_ip_blocks,
    }
    operation_args = (methods, not_methods, paths, not_paths)
    try:
        sources = [Source(**source_args)] if any(source_args.values()) else []
    except ConfigurationError as exc:
        raise _rewrap(exc, "source", "", camel=False) from exc
    try:
        operations = (
            [Operation(methods=methods, not_methods=not_methods, paths=paths, not_paths=not_paths)]
            if any(operation_args)
            else []
        )
    except ConfigurationError as exc:
        raise _rewrap(exc, "operation", "", camel=False) from exc
    conditions: list[Condition] = []
    if isinstance(when, Mapping):
        for index, (key, values) in enumerate(when.items()):
            try:
                conditions.append(Condition(key=key, values=values))
            except ConfigurationError as exc:
                raise _rewrap(exc, "condition", f"when[{index}]", camel=False) from exc
    else:
        conditions = list(_items(when, "when", Condition))
    rule = Rule(from_=sources, to=operations, when=conditions)
    template = AuthorizationPolicy(
        name=name or "route", action=action, rules=[rule], dry_run=dry_run
    )

    def attach(obj: _T) -> _T:
        existing: tuple[AuthorizationPolicy, ...] = getattr(obj, _ATTRIBUTE, ())
        policy = template
        if name is None:
            base = f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
            taken = {p.name for p in existing}
            candidate, number = base, 1
            while candidate in taken:
                number += 1
                candidate = f"{base}#{number}"
            policy = replace(template, name=candidate)
        try:
            setattr(obj, _ATTRIBUTE, (policy, *existing))
        except (AttributeError, TypeError) as exc:
            raise TypeError(
                f"authorize() decorates functions and classes; cannot attach a policy to "
                f"{_type_name(obj)}"
            ) from exc
        return obj

    return attach


def route_policies(handler: object) -> tuple[AuthorizationPolicy, ...]:
    """Return the policies declared with :func:`authorize` on a handler.

    Follows ``functools.wraps`` chains (``__wrapped__``), bound methods (``__func__``)
    and ``functools.partial`` objects (``func``), so a handler decorated before being
    wrapped still reports its policies. Each policy appears once, in declaration order.
    """
    found: list[AuthorizationPolicy] = []
    seen: set[int] = set()
    current: object | None = handler
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        for policy in getattr(current, _ATTRIBUTE, ()):
            if not any(policy is known for known in found):
                found.append(policy)
        nxt = getattr(current, "__func__", None)
        if nxt is None:
            nxt = getattr(current, "__wrapped__", None)
        if nxt is None and isinstance(current, functools.partial):
            nxt = current.func
        current = nxt
    return tuple(found)
