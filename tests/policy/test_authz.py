from __future__ import annotations

import functools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshware.exceptions import ConfigurationError
from meshware.policy.authz import (
    ALLOWED_BY_POLICY,
    DENIED_BY_POLICY,
    INVALID_PATH,
    NO_ALLOW_MATCH,
    NO_ALLOW_POLICIES,
    AuthorizationPolicy,
    Authorizer,
    AuthzDecision,
    Condition,
    DryRunMatch,
    Operation,
    Rule,
    Source,
    authorize,
    route_policies,
)
from meshware.policy.facts import RequestFacts
from meshware.policy.matching import IPMatcher, StringMatcher, parse_ip
from meshware.policy.paths import PathNormalization

ORDERS = "cluster.local/ns/shop/sa/orders"
SHIPPING = "cluster.local/ns/shop/sa/shipping"


def facts(**kwargs: Any) -> RequestFacts:
    kwargs.setdefault("method", "GET")
    kwargs.setdefault("path", "/")
    return RequestFacts(**kwargs)


def allow(name: str, *rules: Rule, dry_run: bool = False) -> AuthorizationPolicy:
    return AuthorizationPolicy(name=name, action="ALLOW", rules=rules, dry_run=dry_run)


def deny(name: str, *rules: Rule, dry_run: bool = False) -> AuthorizationPolicy:
    return AuthorizationPolicy(name=name, action="DENY", rules=rules, dry_run=dry_run)


def audit(name: str, *rules: Rule) -> AuthorizationPolicy:
    return AuthorizationPolicy(name=name, action="AUDIT", rules=rules)


def paths_rule(*paths: str) -> Rule:
    return Rule(to=[Operation(paths=paths)])


# -- matchers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patterns", "value", "expected"),
    [
        (["abc"], "abc", True),
        (["abc"], "abcd", False),
        (["abc*"], "abc", True),
        (["abc*"], "abcd", True),
        (["abc*"], "xabc", False),
        (["*abc"], "xabc", True),
        (["*abc"], "abcx", False),
        (["*"], "x", True),
        (["*"], "", False),
        (["a", "b*", "*c"], "bzz", True),
        (["a", "b*", "*c"], "zzc", True),
        (["a", "b*", "*c"], "zzz", False),
        (["/api/{*}/items"], "/api/v1/items", True),
        (["/api/{*}/items"], "/api/v1/v2/items", False),
        (["/api/{*}/items"], "/api//items", False),
        (["/static/{**}"], "/static/", True),
        (["/static/{**}"], "/static/a/b/c.css", True),
        (["/static/{**}"], "/static", False),
        (["/{*}/{**}"], "/a/b/c", True),
        (["/api/{*}/"], "/api/v1/", True),
        (["/api/{*}/"], "/api/v1", False),
        (["/{*}"], "/a=b", False),
    ],
)
def test_string_matcher(patterns: list[str], value: str, expected: bool) -> None:
    matcher = StringMatcher(patterns, path_templates=True)
    assert matcher.match(value) is expected
    assert bool(matcher.fast(value)) is expected


def test_string_matcher_ignore_case_and_lists() -> None:
    matcher = StringMatcher(["Example.COM", "*.Internal"], ignore_case=True)
    assert matcher.match("example.com")
    assert matcher.match("API.internal")
    assert not matcher.match("example.org")
    assert matcher.match_any(["x", "EXAMPLE.com"])
    assert not matcher.match_any([])


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("", "empty value not allowed; expected a non-empty string"),
        ("a*b", "wildcard '*' is only supported as the whole value or at its start or end"),
        ("*a*", "wildcard '*' is only supported as the whole value or at its start or end"),
        ("**", "wildcard '*' is only supported as the whole value or at its start or end"),
    ],
)
def test_string_matcher_rejects(pattern: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        StringMatcher(["ok", pattern], field="values")
    assert str(info.value) == f"values[1]: {message}"
    assert info.value.value == pattern


def test_string_matcher_rejects_non_strings() -> None:
    with pytest.raises(ConfigurationError) as info:
        StringMatcher([1], field="values")  # type: ignore[list-item]
    assert str(info.value) == "values[0]: expected a string, got int"


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        (
            "/a/*/b",
            "wildcard '*' is only supported as the whole value or at its start or end; "
            "use {*} or {**} for whole path segments",
        ),
        (
            "/users/{id}",
            "'{' or '}' is only supported in whole-segment path templates {*} and {**}",
        ),
        (
            "/a/{*}.json",
            "'{' or '}' is only supported in whole-segment path templates {*} and {**}",
        ),
        ("/{**}/x/{*}", "{**} must be the last operator of a path template"),
        ("/{**}/{**}", "{**} must be the last operator of a path template"),
        ("api/{*}", "a path template must start with '/'"),
        ("/a//{*}", "path template segment '' is not a valid path literal"),
        ("/a b/{*}", "path template segment 'a b' is not a valid path literal"),
    ],
)
def test_path_template_rejects(pattern: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        StringMatcher([pattern], field="paths", path_templates=True)
    assert str(info.value) == f"paths[0]: {message}"


@pytest.mark.parametrize(
    ("blocks", "address", "expected"),
    [
        (["10.0.0.0/8"], "10.1.2.3", True),
        (["10.0.0.0/8"], "11.1.2.3", False),
        (["10.1.2.3"], "10.1.2.3", True),
        (["10.1.2.3"], "10.1.2.4", False),
        (["10.1.2.3/16"], "10.1.200.1", True),
        (["10.0.0.0/8"], "::ffff:10.1.2.3", True),
        (["2001:db8::/32"], "2001:db8::1", True),
        (["2001:db8::/32"], "[2001:db8::1]", True),
        (["fe80::/10"], "fe80::1%eth0", True),
        (["2001:db8::/32"], "10.1.2.3", False),
        (["10.0.0.0/8"], "not-an-ip", False),
        (["10.0.0.0/8"], "", False),
        (["0.0.0.0/0"], "192.168.1.1", True),
    ],
)
def test_ip_matcher(blocks: list[str], address: str, expected: bool) -> None:
    assert IPMatcher(blocks).match(address) is expected


def test_ip_matcher_rejects_bad_blocks() -> None:
    with pytest.raises(ConfigurationError) as info:
        IPMatcher(["10.0.0.0/8", "10.0.0.0/33"], field="ip_blocks")
    assert str(info.value) == (
        "ip_blocks[1]: bad IP address or CIDR block; expected an address like 10.1.2.3 or a "
        "block like 10.0.0.0/8"
    )
    assert info.value.value == "10.0.0.0/33"


def test_parse_ip() -> None:
    assert parse_ip("0.0.0.1") == (4, 1)
    assert parse_ip("::1") == (6, 1)
    assert parse_ip("::ffff:0.0.0.2") == (4, 2)
    assert parse_ip("1.2.3") is None
    assert parse_ip("1.2.3.4\x00") is None


# -- Source -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "request_facts", "expected"),
    [
        # principals: mTLS identity; "*" requires one.
        ({"principals": [ORDERS]}, {"source_principal": ORDERS}, True),
        ({"principals": [ORDERS]}, {"source_principal": SHIPPING}, False),
        ({"principals": [ORDERS]}, {}, False),
        ({"principals": ["*"]}, {"source_principal": ORDERS}, True),
        ({"principals": ["*"]}, {}, False),
        ({"principals": ["*"]}, {"source_principal": ""}, False),
        ({"principals": ["cluster.local/ns/shop/*"]}, {"source_principal": SHIPPING}, True),
        ({"principals": ["*/sa/orders"]}, {"source_principal": ORDERS}, True),
        ({"not_principals": [ORDERS]}, {"source_principal": SHIPPING}, True),
        ({"not_principals": [ORDERS]}, {"source_principal": ORDERS}, False),
        ({"not_principals": [ORDERS]}, {}, True),
        ({"not_principals": ["*"]}, {}, True),
        ({"not_principals": ["*"]}, {"source_principal": ORDERS}, False),
        # request principals: JWT "<iss>/<sub>"; "*" requires a validated token.
        (
            {"request_principals": ["https://idp/alice"]},
            {"request_principal": "https://idp/alice"},
            True,
        ),
        ({"request_principals": ["https://idp/*"]}, {"request_principal": "https://idp/bob"}, True),
        ({"request_principals": ["*"]}, {"request_principal": "https://idp/bob"}, True),
        ({"request_principals": ["*"]}, {}, False),
        ({"not_request_principals": ["*"]}, {}, True),
        (
            {"not_request_principals": ["https://idp/alice"]},
            {"request_principal": "https://idp/alice"},
            False,
        ),
        # namespaces
        ({"namespaces": ["shop"]}, {"source_namespace": "shop"}, True),
        ({"namespaces": ["shop"]}, {"source_namespace": "billing"}, False),
        ({"namespaces": ["prod-*"]}, {"source_namespace": "prod-eu"}, True),
        ({"namespaces": ["shop"]}, {}, False),
        ({"not_namespaces": ["shop"]}, {"source_namespace": "billing"}, True),
        ({"not_namespaces": ["shop"]}, {"source_namespace": "shop"}, False),
        ({"not_namespaces": ["shop"]}, {}, True),
        # ip blocks
        ({"ip_blocks": ["10.0.0.0/8"]}, {"source_ip": "10.2.3.4"}, True),
        ({"ip_blocks": ["10.0.0.0/8"]}, {"source_ip": "192.168.0.1"}, False),
        ({"ip_blocks": ["10.0.0.0/8"]}, {}, False),
        ({"not_ip_blocks": ["10.0.0.0/8"]}, {"source_ip": "192.168.0.1"}, True),
        ({"not_ip_blocks": ["10.0.0.0/8"]}, {"source_ip": "10.0.0.1"}, False),
        ({"not_ip_blocks": ["10.0.0.0/8"]}, {}, True),
        # every set field must match
        (
            {"principals": [ORDERS], "ip_blocks": ["10.0.0.0/8"]},
            {"source_principal": ORDERS, "source_ip": "10.0.0.1"},
            True,
        ),
        (
            {"principals": [ORDERS], "ip_blocks": ["10.0.0.0/8"]},
            {"source_principal": ORDERS, "source_ip": "11.0.0.1"},
            False,
        ),
        (
            {"namespaces": ["shop"], "not_principals": [ORDERS]},
            {"source_namespace": "shop", "source_principal": ORDERS},
            False,
        ),
        (
            {"namespaces": ["shop"], "not_principals": [ORDERS]},
            {"source_namespace": "shop", "source_principal": SHIPPING},
            True,
        ),
    ],
)
def test_source(source: dict[str, Any], request_facts: dict[str, Any], expected: bool) -> None:
    compiled = Source(**source)
    assert compiled.matches(facts(**request_facts)) is expected
    # The same through a whole ALLOW policy.
    decision = Authorizer([allow("p", Rule(from_=[compiled]))]).decide(facts(**request_facts))
    assert decision.allowed is expected


def test_source_requires_a_field() -> None:
    with pytest.raises(ConfigurationError) as info:
        Source()
    assert info.value.field == "source"
    assert str(info.value) == (
        "source: a source must set at least one field; expected principals, "
        "request_principals, namespaces, ip_blocks or a not_ variant"
    )


@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        ({"principals": ORDERS}, "source.principals", "expected a list of strings, got str"),
        ({"namespaces": ["a", 2]}, "source.namespaces[1]", "expected a string, got int"),
        (
            {"principals": ["spiffe://cluster.local/ns/a/sa/b"]},
            "source.principals[0]",
            "expected a principal without the spiffe:// scheme, like cluster.local/ns/default/sa/orders",
        ),
        (
            {"not_principals": ["spiffe://x"]},
            "source.not_principals[0]",
            "expected a principal without the spiffe:// scheme, like cluster.local/ns/default/sa/orders",
        ),
        (
            {"ip_blocks": ["10.0.0.300"]},
            "source.ip_blocks[0]",
            "bad IP address or CIDR block; expected an address like 10.1.2.3 or a block like 10.0.0.0/8",
        ),
        (
            {"principals": [""]},
            "source.principals[0]",
            "empty value not allowed; expected a non-empty string",
        ),
    ],
)
def test_source_validation(kwargs: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Source(**kwargs)
    assert info.value.field == field
    assert str(info.value) == f"{field}: {message}"


def test_source_lists_become_tuples_and_compare_by_value() -> None:
    source = Source(principals=[ORDERS], ip_blocks=["10.0.0.0/8"])
    assert source.principals == (ORDERS,)
    assert source == Source(principals=(ORDERS,), ip_blocks=("10.0.0.0/8",))
    assert hash(source) == hash(Source(principals=(ORDERS,), ip_blocks=("10.0.0.0/8",)))


# -- Operation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("operation", "request_facts", "expected"),
    [
        ({"hosts": ["api.example.com"]}, {"host": "api.example.com"}, True),
        ({"hosts": ["API.Example.com"]}, {"host": "api.example.com"}, True),
        ({"hosts": ["*.example.com"]}, {"host": "api.example.com"}, True),
        ({"hosts": ["api.example.com"]}, {"host": "example.com"}, False),
        ({"hosts": ["api.example.com:8443"]}, {"host": "api.example.com", "port": 8443}, True),
        ({"hosts": ["api.example.com:8443"]}, {"host": "api.example.com", "port": 443}, False),
        ({"hosts": ["api.example.com:*"]}, {"host": "api.example.com", "port": 80}, True),
        ({"hosts": ["*"]}, {"host": ""}, False),
        ({"not_hosts": ["admin.example.com"]}, {"host": "api.example.com"}, True),
        ({"not_hosts": ["admin.example.com"]}, {"host": "ADMIN.example.com"}, False),
        ({"ports": [8080]}, {"port": 8080}, True),
        ({"ports": [8080]}, {"port": 9090}, False),
        ({"ports": [8080]}, {}, False),
        ({"not_ports": [8080]}, {"port": 9090}, True),
        ({"not_ports": [8080]}, {"port": 8080}, False),
        ({"not_ports": [8080]}, {}, True),
        ({"methods": ["GET", "HEAD"]}, {"method": "HEAD"}, True),
        ({"methods": ["GET"]}, {"method": "POST"}, False),
        ({"methods": ["*"]}, {"method": "PATCH"}, True),
        ({"not_methods": ["DELETE"]}, {"method": "GET"}, True),
        ({"not_methods": ["DELETE"]}, {"method": "DELETE"}, False),
        ({"paths": ["/api/items"]}, {"path": "/api/items"}, True),
        ({"paths": ["/api/items"]}, {"path": "/api/items/"}, False),
        ({"paths": ["/api/*"]}, {"path": "/api/items"}, True),
        ({"paths": ["/api/*"]}, {"path": "/api"}, False),
        ({"paths": ["*.json"]}, {"path": "/data/x.json"}, True),
        ({"paths": ["*"]}, {"path": "/anything"}, True),
        ({"paths": ["/api/{*}/items"]}, {"path": "/api/v2/items"}, True),
        ({"paths": ["/api/{*}/items"]}, {"path": "/api/v2/x/items"}, False),
        ({"paths": ["/static/{**}"]}, {"path": "/static/css/site.css"}, True),
        ({"not_paths": ["/healthz"]}, {"path": "/api"}, True),
        ({"not_paths": ["/healthz"]}, {"path": "/healthz"}, False),
        ({"methods": ["GET"], "paths": ["/api/*"]}, {"method": "GET", "path": "/api/x"}, True),
        ({"methods": ["GET"], "paths": ["/api/*"]}, {"method": "POST", "path": "/api/x"}, False),
    ],
)
def test_operation(
    operation: dict[str, Any], request_facts: dict[str, Any], expected: bool
) -> None:
    compiled = Operation(**operation)
    assert compiled.matches(facts(**request_facts)) is expected
    decision = Authorizer([allow("p", Rule(to=[compiled]))]).decide(facts(**request_facts))
    assert decision.allowed is expected


def test_operation_paths_match_the_normalized_path() -> None:
    operation = Operation(paths=["/api/items"])
    authorizer = Authorizer([allow("p", Rule(to=[operation]))])
    assert authorizer.decide(facts(path="/api/./%69tems")).allowed
    assert authorizer.decide(facts(path="/api/items?x=/admin")).allowed
    # Operation.matches on its own takes the given path as already normalized.
    assert not operation.matches(facts(path="/api/./%69tems"))
    assert operation.matches(facts(path="/api/./%69tems"), "/api/items")


@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        (
            {},
            "operation",
            "an operation must set at least one field; expected hosts, ports, "
            "methods, paths or a not_ variant",
        ),
        (
            {"methods": ["get"]},
            "operation.methods[0]",
            "methods are matched case-sensitively "
            "against the upper-case request method; expected 'GET'",
        ),
        ({"ports": [70000]}, "operation.ports[0]", "bad port; expected an integer from 0 to 65535"),
        ({"ports": ["80"]}, "operation.ports[0]", "bad port; expected an integer from 0 to 65535"),
        (
            {"not_ports": [True]},
            "operation.not_ports[0]",
            "bad port; expected an integer from 0 to 65535",
        ),
        ({"ports": 80}, "operation.ports", "expected a list of port numbers, got int"),
        ({"paths": "/api"}, "operation.paths", "expected a list of strings, got str"),
        (
            {"not_paths": ["/a/*/b"]},
            "operation.not_paths[0]",
            "wildcard '*' is only supported "
            "as the whole value or at its start or end; use {*} or {**} for whole path segments",
        ),
    ],
)
def test_operation_validation(kwargs: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Operation(**kwargs)
    assert info.value.field == field
    assert str(info.value) == f"{field}: {message}"


# -- Condition --------------------------------------------------------------------------

JWT = "https://idp.example.com/alice"


@pytest.mark.parametrize(
    ("condition", "request_facts", "expected"),
    [
        (("request.headers[X-Env]", ["prod"], []), {"headers": {"x-env": "prod"}}, True),
        (("request.headers[x-env]", ["prod"], []), {"headers": {"x-env": "dev"}}, False),
        (("request.headers[x-env]", ["prod"], []), {}, False),
        (("request.headers[x-env]", ["*"], []), {"headers": {"x-env": "x"}}, True),
        (("request.headers[x-env]", [], ["prod"]), {}, True),
        (("request.headers[x-env]", [], ["prod"]), {"headers": {"x-env": "prod"}}, False),
        (
            ("request.headers[user-agent]", ["curl/*"], ["curl/7*"]),
            {"headers": {"user-agent": "curl/8.1"}},
            True,
        ),
        (
            ("request.headers[user-agent]", ["curl/*"], ["curl/7*"]),
            {"headers": {"user-agent": "curl/7.1"}},
            False,
        ),
        (("source.ip", ["10.0.0.0/8"], []), {"source_ip": "10.9.9.9"}, True),
        (("source.ip", ["10.0.0.0/8"], []), {"source_ip": "172.16.0.1"}, False),
        (("source.ip", [], ["10.0.0.0/8"]), {"source_ip": "172.16.0.1"}, True),
        (("source.namespace", ["shop"], []), {"source_namespace": "shop"}, True),
        (("source.principal", [ORDERS], []), {"source_principal": ORDERS}, True),
        (("source.principal", [ORDERS], []), {}, False),
        (
            ("request.auth.principal", ["https://idp.example.com/*"], []),
            {"request_principal": JWT},
            True,
        ),
        (("request.auth.audiences", ["orders"], []), {"claims": {"aud": "orders"}}, True),
        (("request.auth.audiences", ["orders"], []), {"claims": {"aud": ["web", "orders"]}}, True),
        (("request.auth.audiences", ["orders"], []), {"claims": {"aud": ["web"]}}, False),
        (("request.auth.presenter", ["web-app"], []), {"claims": {"azp": "web-app"}}, True),
        (
            ("request.auth.claims[iss]", ["https://idp.example.com"], []),
            {"claims": {"iss": "https://idp.example.com"}},
            True,
        ),
        (
            ("request.auth.claims[groups]", ["admins"], []),
            {"claims": {"groups": ["dev", "admins"]}},
            True,
        ),
        (
            ("request.auth.claims[groups]", [], ["admins"]),
            {"claims": {"groups": ["dev", "admins"]}},
            False,
        ),
        (("request.auth.claims[groups]", [], ["admins"]), {"claims": {"groups": ["dev"]}}, True),
        (("request.auth.claims[groups]", [], ["admins"]), {}, True),
        (("request.auth.claims[groups]", ["admins"], []), {}, False),
        (
            ("request.auth.claims[realm][role]", ["admin"], []),
            {"claims": {"realm": {"role": "admin"}}},
            True,
        ),
        (
            ("request.auth.claims[realm][role]", ["admin"], []),
            {"claims": {"realm": "admin"}},
            False,
        ),
        (
            ("request.auth.claims[realm][roles]", ["admin"], []),
            {"claims": {"realm": {"roles": ["admin"]}}},
            True,
        ),
        (
            ("request.auth.claims[https://example.com/tier]", ["gold"], []),
            {"claims": {"https://example.com/tier": "gold"}},
            True,
        ),
        (("request.auth.claims[admin]", ["true"], []), {"claims": {"admin": True}}, False),
        (("request.auth.claims[level]", ["3"], []), {"claims": {"level": 3}}, False),
        (("destination.port", ["8080", "8443"], []), {"port": 8443}, True),
        (("destination.port", ["8080"], []), {"port": 9090}, False),
        (("destination.port", ["8080"], []), {}, False),
        (("destination.port", [], ["8080"]), {}, True),
        (("destination.port", [], ["8080"]), {"port": 8080}, False),
    ],
)
def test_condition(
    condition: tuple[str, list[str], list[str]], request_facts: dict[str, Any], expected: bool
) -> None:
    key, values, not_values = condition
    compiled = Condition(key=key, values=values, not_values=not_values)
    assert compiled.matches(facts(**request_facts)) is expected
    decision = Authorizer([allow("p", Rule(when=[compiled]))]).decide(facts(**request_facts))
    assert decision.allowed is expected


_KNOWN = (
    "request.headers[<name>], source.ip, source.namespace, source.principal, "
    "request.auth.principal, request.auth.audiences, request.auth.presenter, "
    "request.auth.claims[<claim>], destination.port"
)


@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        (
            {"key": "request.header[x]", "values": ["a"]},
            "condition.key",
            f"unknown key 'request.header[x]'; expected one of {_KNOWN}",
        ),
        (
            {"key": "request.headers[]", "values": ["a"]},
            "condition.key",
            f"unknown key 'request.headers[]'; expected one of {_KNOWN}",
        ),
        (
            {"key": "request.auth.claims", "values": ["a"]},
            "condition.key",
            f"unknown key 'request.auth.claims'; expected one of {_KNOWN}",
        ),
        (
            {"key": "remote.ip", "values": ["10.0.0.1"]},
            "condition.key",
            "unsupported key 'remote.ip': the original client address behind proxies is not known "
            "in-process; use source.ip for the direct peer",
        ),
        (
            {"key": "experimental.envoy.filters.x[y]", "values": ["a"]},
            "condition.key",
            "unsupported key 'experimental.envoy.filters.x[y]': Envoy filter metadata does not "
            "exist in-process",
        ),
        (
            {"key": "", "values": ["a"]},
            "condition.key",
            f"expected an attribute name like request.headers[x-env]; known keys: {_KNOWN}",
        ),
        (
            {"key": "source.ip"},
            "condition",
            "at least one of values or not_values must be set for key source.ip",
        ),
        (
            {"key": "source.ip", "values": ["10.0.0.0/40"]},
            "condition.values[0]",
            "bad IP address or CIDR block; expected an address like 10.1.2.3 or a block like 10.0.0.0/8",
        ),
        (
            {"key": "destination.port", "not_values": ["http"]},
            "condition.not_values[0]",
            "bad port; expected a port number from 0 to 65535",
        ),
        (
            {"key": "destination.port", "values": ["65536"]},
            "condition.values[0]",
            "bad port; expected a port number from 0 to 65535",
        ),
        (
            {"key": "source.principal", "values": ["spiffe://td/ns/a/sa/b"]},
            "condition.values[0]",
            "expected a principal without the spiffe:// scheme, like cluster.local/ns/default/sa/orders",
        ),
        (
            {"key": "source.namespace", "values": "shop"},
            "condition.values",
            "expected a list of strings, got str",
        ),
    ],
)
def test_condition_validation(kwargs: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Condition(**kwargs)
    assert info.value.field == field
    assert str(info.value) == f"{field}: {message}"


# -- Rule -------------------------------------------------------------------------------


def test_empty_rule_matches_everything() -> None:
    rule = Rule()
    assert rule.matches(facts())
    assert rule.matches(facts(method="DELETE", path="/admin", source_ip="1.2.3.4"))


def test_rule_is_any_source_and_any_operation_and_all_conditions() -> None:
    rule = Rule(
        from_=[Source(principals=[ORDERS]), Source(namespaces=["billing"])],
        to=[Operation(methods=["GET"]), Operation(paths=["/api/*"])],
        when=[
            Condition(key="request.headers[x-env]", values=["prod"]),
            Condition(key="destination.port", values=["8080"]),
        ],
    )
    good = {"headers": {"x-env": "prod"}, "port": 8080}
    assert rule.matches(facts(source_principal=ORDERS, method="GET", **good))
    assert rule.matches(facts(source_namespace="billing", method="POST", path="/api/x", **good))
    assert not rule.matches(facts(source_namespace="shop", method="GET", **good))
    assert not rule.matches(facts(source_principal=ORDERS, method="POST", path="/x", **good))
    assert not rule.matches(facts(source_principal=ORDERS, method="GET", headers={"x-env": "prod"}))
    assert not rule.matches(facts(source_principal=ORDERS, method="GET", port=8080))


def test_rule_validation() -> None:
    with pytest.raises(ConfigurationError) as info:
        Rule(from_=[Operation(methods=["GET"])])  # type: ignore[list-item]
    assert str(info.value) == "rule.from_[0]: expected a Source, got Operation"
    with pytest.raises(ConfigurationError) as info:
        Rule(when=Condition(key="source.ip", values=["10.0.0.1"]))  # type: ignore[arg-type]
    assert str(info.value) == "rule.when: expected a list of Condition, got Condition"


# -- AuthorizationPolicy ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        ({"name": ""}, "name", "expected a non-empty string"),
        (
            {"name": "p", "action": "CUSTOM"},
            "action",
            "unsupported action CUSTOM: external "
            "authorization is not supported; expected one of ALLOW, DENY, AUDIT",
        ),
        ({"name": "p", "action": "allow"}, "action", "expected one of ALLOW, DENY, AUDIT"),
        (
            {"name": "p", "rules": [Source(principals=["*"])]},
            "rules[0]",
            "expected a Rule, got Source",
        ),
        ({"name": "p", "dry_run": "yes"}, "dry_run", "expected a bool, got str"),
        (
            {"name": "p", "action": "AUDIT", "dry_run": True},
            "dry_run",
            "dry_run applies to ALLOW and DENY policies; an AUDIT policy never enforces",
        ),
    ],
)
def test_policy_validation(kwargs: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        AuthorizationPolicy(**kwargs)
    assert info.value.field == field
    assert str(info.value) == f"{field}: {message}"


def test_policy_matching_rule() -> None:
    policy = allow("p", paths_rule("/a"), paths_rule("/b*"), paths_rule("/b/c"))
    assert policy.matching_rule(facts(path="/b/c")) == 1
    assert policy.matching_rule(facts(path="/c")) is None
    assert policy.action == "ALLOW"
    assert AuthorizationPolicy(name="x").action == "ALLOW"


# -- Authorizer: Istio's evaluation order -----------------------------------------------

ADMIN_DENY = deny("block-admin", paths_rule("/admin*"))
ORDERS_ALLOW = allow(
    "orders-only",
    Rule(from_=[Source(principals=[SHIPPING])], to=[Operation(methods=["POST"])]),
    Rule(from_=[Source(principals=[ORDERS])]),
)


@pytest.mark.parametrize(
    ("policies", "request_facts", "expected"),
    [
        (
            [],
            {},
            AuthzDecision(
                allowed=True, status=200, code=NO_ALLOW_POLICIES, reason="no policies: allowed"
            ),
        ),
        (
            [ADMIN_DENY],
            {"path": "/api"},
            AuthzDecision(
                allowed=True,
                status=200,
                code=NO_ALLOW_POLICIES,
                reason="no DENY policy matched and no ALLOW policies: allowed",
            ),
        ),
        (
            [ADMIN_DENY],
            {"path": "/admin/users"},
            AuthzDecision(
                allowed=False,
                status=403,
                code=DENIED_BY_POLICY,
                reason='denied by DENY policy "block-admin" rule 0',
                policy="block-admin",
                action="DENY",
                rule=0,
            ),
        ),
        (
            [ORDERS_ALLOW, ADMIN_DENY],
            {"path": "/admin", "source_principal": ORDERS},
            AuthzDecision(
                allowed=False,
                status=403,
                code=DENIED_BY_POLICY,
                reason='denied by DENY policy "block-admin" rule 0',
                policy="block-admin",
                action="DENY",
                rule=0,
            ),
        ),
        (
            [ORDERS_ALLOW, ADMIN_DENY],
            {"path": "/api", "source_principal": ORDERS},
            AuthzDecision(
                allowed=True,
                status=200,
                code=ALLOWED_BY_POLICY,
                reason='allowed by ALLOW policy "orders-only" rule 1',
                policy="orders-only",
                action="ALLOW",
                rule=1,
            ),
        ),
        (
            [ORDERS_ALLOW, ADMIN_DENY],
            {"path": "/api", "source_principal": SHIPPING, "method": "POST"},
            AuthzDecision(
                allowed=True,
                status=200,
                code=ALLOWED_BY_POLICY,
                reason='allowed by ALLOW policy "orders-only" rule 0',
                policy="orders-only",
                action="ALLOW",
                rule=0,
            ),
        ),
        (
            [ORDERS_ALLOW, ADMIN_DENY],
            {"path": "/api", "source_principal": SHIPPING},
            AuthzDecision(
                allowed=False, status=403, code=NO_ALLOW_MATCH, reason="no ALLOW policy matched"
            ),
        ),
        (
            [ORDERS_ALLOW],
            {"path": "/api"},
            AuthzDecision(
                allowed=False, status=403, code=NO_ALLOW_MATCH, reason="no ALLOW policy matched"
            ),
        ),
    ],
)
def test_evaluation_order(
    policies: list[AuthorizationPolicy], request_facts: dict[str, Any], expected: AuthzDecision
) -> None:
    assert Authorizer(policies).decide(facts(**request_facts)) == expected


def test_allow_policy_without_rules_denies_everything() -> None:
    authorizer = Authorizer([allow("allow-nothing")])
    decision = authorizer.decide(facts(source_principal=ORDERS))
    assert decision == AuthzDecision(
        allowed=False, status=403, code=NO_ALLOW_MATCH, reason="no ALLOW policy matched"
    )


def test_allow_nothing_does_not_block_other_allow_policies() -> None:
    authorizer = Authorizer([allow("allow-nothing"), allow("allow-all", Rule())])
    decision = authorizer.decide(facts())
    assert decision.reason == 'allowed by ALLOW policy "allow-all" rule 0'


def test_deny_policy_without_rules_has_no_effect() -> None:
    decision = Authorizer([deny("deny-nothing")]).decide(facts())
    assert decision.allowed
    assert decision.reason == "no DENY policy matched and no ALLOW policies: allowed"


def test_deny_with_empty_rule_denies_everything() -> None:
    decision = Authorizer([allow("all", Rule()), deny("deny-all", Rule())]).decide(facts())
    assert decision.reason == 'denied by DENY policy "deny-all" rule 0'


def test_first_deny_policy_and_first_rule_are_reported() -> None:
    authorizer = Authorizer(
        [
            deny("first", paths_rule("/x"), paths_rule("/a*"), paths_rule("/ab")),
            deny("second", paths_rule("/ab")),
        ]
    )
    decision = authorizer.decide(facts(path="/ab"))
    assert (decision.policy, decision.rule) == ("first", 1)


def test_audit_never_changes_the_decision() -> None:
    authorizer = Authorizer(
        [
            audit("audit-admin", paths_rule("/admin*")),
            audit("audit-posts", Rule(to=[Operation(methods=["POST"])])),
            audit("audit-nothing"),
            ORDERS_ALLOW,
        ]
    )
    decision = authorizer.decide(facts(path="/admin", method="POST"))
    assert decision == AuthzDecision(
        allowed=False,
        status=403,
        code=NO_ALLOW_MATCH,
        reason="no ALLOW policy matched",
        audited=("audit-admin", "audit-posts"),
    )
    allowed = authorizer.decide(facts(path="/api", source_principal=ORDERS))
    assert allowed.allowed and allowed.audited == ()


def test_audit_only_allows() -> None:
    decision = Authorizer([audit("audit-all", Rule())]).decide(facts())
    assert decision == AuthzDecision(
        allowed=True,
        status=200,
        code=NO_ALLOW_POLICIES,
        reason="no policies: allowed",
        audited=("audit-all",),
    )


def test_dry_run_deny_is_recorded_not_enforced() -> None:
    authorizer = Authorizer([deny("block-admin", paths_rule("/admin*"), dry_run=True)])
    decision = authorizer.decide(facts(path="/admin"))
    assert decision == AuthzDecision(
        allowed=True,
        status=200,
        code=NO_ALLOW_POLICIES,
        reason="no policies: allowed",
        dry_run=(DryRunMatch("block-admin", False, 0),),
        dry_run_allowed=False,
    )
    other = authorizer.decide(facts(path="/api"))
    assert other.dry_run == () and other.dry_run_allowed is True


def test_dry_run_allow_does_not_count_as_an_allow_policy() -> None:
    authorizer = Authorizer(
        [allow("orders", Rule(from_=[Source(principals=[ORDERS])]), dry_run=True)]
    )
    stranger = authorizer.decide(facts(source_principal=SHIPPING))
    assert stranger.allowed
    assert stranger.code == NO_ALLOW_POLICIES
    assert stranger.dry_run == ()
    assert stranger.dry_run_allowed is False
    orders = authorizer.decide(facts(source_principal=ORDERS))
    assert orders.allowed
    assert orders.dry_run == (DryRunMatch(policy="orders", would_allow=True, rule=0),)
    assert orders.dry_run_allowed is True


def test_dry_run_together_with_enforced_policies() -> None:
    authorizer = Authorizer(
        [
            ORDERS_ALLOW,
            ADMIN_DENY,
            allow("shipping", Rule(from_=[Source(principals=[SHIPPING])]), dry_run=True),
            deny("no-delete", Rule(to=[Operation(methods=["DELETE"])]), dry_run=True),
        ]
    )
    shipping = authorizer.decide(facts(source_principal=SHIPPING, path="/api"))
    assert not shipping.allowed
    assert shipping.dry_run == (DryRunMatch("shipping", True, 0),)
    assert shipping.dry_run_allowed is True
    delete = authorizer.decide(facts(source_principal=ORDERS, method="DELETE", path="/api"))
    assert delete.allowed
    assert delete.reason == 'allowed by ALLOW policy "orders-only" rule 1'
    assert delete.dry_run == (DryRunMatch("no-delete", False, 0),)
    assert delete.dry_run_allowed is False
    admin = authorizer.decide(facts(source_principal=SHIPPING, path="/admin"))
    assert not admin.allowed and admin.dry_run_allowed is False


def test_invalid_path_is_a_400_before_any_policy() -> None:
    authorizer = Authorizer([allow("all", Rule()), audit("audit-all", Rule())])
    decision = authorizer.decide(facts(path="/public%2F..%2Fadmin"))
    assert decision == AuthzDecision(
        allowed=False,
        status=400,
        code=INVALID_PATH,
        reason="invalid path: percent-encoded slash or backslash in path: "
        "'/public%2F..%2Fadmin' [escaped-slash]",
    )
    assert Authorizer([]).decide(facts(path="/a\x00")).status == 400


def test_rewritten_path() -> None:
    authorizer = Authorizer([allow("api", paths_rule("/api/*"))])
    decision = authorizer.decide(facts(path="/api/./%69tems"))
    assert decision.allowed and decision.rewritten_path == "/api/items"
    assert authorizer.decide(facts(path="/api/items")).rewritten_path is None
    assert authorizer.decide(facts(path="/x//y")).rewritten_path == "/x/y"


def test_path_normalization_setting_is_used() -> None:
    policies = [allow("api", paths_rule("/api/*"))]
    decoding = Authorizer(policies, path_normalization=PathNormalization(escaped_slashes="decode"))
    assert decoding.decide(facts(path="/api%2Fitems")).rewritten_path == "/api/items"
    keeping = Authorizer(policies, path_normalization=PathNormalization(escaped_slashes="keep"))
    kept = keeping.decide(facts(path="/api%2fitems"))
    assert not kept.allowed and kept.rewritten_path == "/api%2Fitems"


@pytest.mark.parametrize(
    ("pattern", "key", "message"),
    [
        ("/a//b", "paths", "normalizes to '/a/b'"),
        ("/x/../y", "paths", "normalizes to '/y'"),
        ("/caf%c3%a9", "not_paths", "normalizes to '/caf%C3%A9'"),
        ("/%61dmin", "paths", "normalizes to '/admin'"),
        ("/api//v1*", "paths", "normalizes to '/api/v1*'"),
        ("/a%2Fb", "paths", "normalizes to an invalid path [escaped-slash]"),
        ("/a?b", "paths", "normalizes to '/a'"),
    ],
)
def test_paths_that_can_never_match_are_rejected(pattern: str, key: str, message: str) -> None:
    operation = Operation(**{key: [pattern]})
    with pytest.raises(ConfigurationError) as info:
        Authorizer([allow("ok", paths_rule("/ok")), deny("bad", Rule(to=[operation]))])
    assert info.value.field == f"policies[1].rules[0].to[0].{key}[0]"
    assert info.value.value == pattern
    assert str(info.value) == (
        f"policies[1].rules[0].to[0].{key}[0]: path can never match in policy 'bad': requests "
        f"are matched on normalized paths and this one {message}"
    )


@pytest.mark.parametrize(
    "pattern", ["/api/.*", "/.well-known/*", "/a%2*", "/a%*", "*//x", "/{*}/x"]
)
def test_paths_that_can_match_are_accepted(pattern: str) -> None:
    Authorizer([allow("p", paths_rule(pattern))])


def test_authorizer_validation() -> None:
    with pytest.raises(ConfigurationError) as info:
        Authorizer([allow("a"), deny("a")])
    assert str(info.value) == "policies[1].name: duplicate policy name 'a'; names must be unique"
    with pytest.raises(ConfigurationError) as info:
        Authorizer([Rule()])  # type: ignore[list-item]
    assert str(info.value) == "policies[0]: expected an AuthorizationPolicy, got Rule"
    with pytest.raises(ConfigurationError) as info:
        Authorizer([], path_normalization="strict")  # type: ignore[arg-type]
    assert str(info.value) == "path_normalization: expected a PathNormalization, got str"


def test_authorizer_repr_and_attributes() -> None:
    authorizer = Authorizer([ORDERS_ALLOW, ADMIN_DENY])
    assert repr(authorizer) == "Authorizer([ALLOW 'orders-only', DENY 'block-admin'])"
    assert authorizer.policies == (ORDERS_ALLOW, ADMIN_DENY)
    assert authorizer.path_normalization == PathNormalization()


# -- alternative spellings cannot reach a denied path -----------------------------------

PUBLIC_ADMIN = [allow("public", paths_rule("/public/*")), deny("admin", paths_rule("/admin*"))]
# Settings that reject or decode escaped slashes.
SAFE = [
    PathNormalization(),
    PathNormalization(strip_params=True),
    PathNormalization(merge_slashes=False),
    PathNormalization(escaped_slashes="decode", backslash="to-slash"),
    PathNormalization.from_istio("DECODE_AND_MERGE_SLASHES"),
]
# Settings that keep escaped slashes as data (Istio's BASE and MERGE_SLASHES).
KEEP = [
    PathNormalization(escaped_slashes="keep", strip_params=True),
    PathNormalization.from_istio("BASE"),
    PathNormalization.from_istio("MERGE_SLASHES"),
]
NORMALIZATIONS = SAFE + KEEP
HOSTILE = [
    "/admin",
    "/admin/users",
    "//admin",
    "/./admin",
    "/public/../admin",
    "/public/./../admin/x",
    "/public/%2e%2e/admin",
    "/public/%2E%2E/admin",
    "/public/.%2e/admin",
    "/public/%2e./admin",
    "/public%2F..%2Fadmin",
    "/public%2f..%2fadmin",
    "/public/..%2Fadmin",
    "/public%5C..%5Cadmin",
    "/public\\..\\admin",
    "/public/..\\admin",
    "/public//../admin",
    "/public/x/../../admin",
    "/public/../../../admin",
    "/%61dmin",
    "/%41dmin".replace("%41", "%61"),
    "/adm%69n/",
    "/public/..;/admin",
    "/public/%2e%2e;/admin",
    "/public/../admin?/public/x",
    "/public/../admin#/public/x",
    "/%2e%2e/admin",
    "/public/%c0%ae%c0%ae/admin",
    "/public/%252e%252e/../../admin",
    "/public/.../../../admin",
]


_ESCAPED_SLASH = ("%2f", "%5c")


@pytest.mark.parametrize("raw", HOSTILE)
def test_hostile_spellings_are_denied_by_default(raw: str) -> None:
    decision = Authorizer(PUBLIC_ADMIN).decide(facts(path=raw))
    assert not decision.allowed
    assert decision.status in (400, 403)


# Under "keep", escaped slashes are data; test_keep_mode_escaped_slashes covers them.
_CASES = [
    pytest.param(normalization, raw, id=f"{index}-{raw}")
    for index, normalization in enumerate(NORMALIZATIONS)
    for raw in HOSTILE
    if not (normalization in KEEP and any(e in raw.lower() for e in _ESCAPED_SLASH))
]


@pytest.mark.parametrize(("normalization", "raw"), _CASES)
def test_hostile_spellings_never_reach_admin(normalization: PathNormalization, raw: str) -> None:
    authorizer = Authorizer(PUBLIC_ADMIN, path_normalization=normalization)
    decision = authorizer.decide(facts(path=raw))
    if decision.allowed:
        # Only where these settings resolve the spelling to a public path (merging off:
        # "/public//../admin" is "/public/admin"), which is what the application gets.
        assert decision.rewritten_path is not None
        assert decision.rewritten_path.startswith("/public/")
    else:
        assert decision.status in (400, 403)


@pytest.mark.parametrize("normalization", KEEP, ids=["keep", "BASE", "MERGE_SLASHES"])
def test_keep_mode_escaped_slashes(normalization: PathNormalization) -> None:
    # Istio's default: an escaped slash is part of a segment, so "..%2Fadmin" is a
    # (strange) file name under /public/, which the ALLOW rule admits. This is why the
    # default rejects escaped slashes: an application that decodes before routing
    # would see /public/../admin.
    authorizer = Authorizer(PUBLIC_ADMIN, path_normalization=normalization)
    inside = authorizer.decide(facts(path="/public/..%2fadmin"))
    assert inside.allowed and inside.rewritten_path == "/public/..%2Fadmin"
    outside = authorizer.decide(facts(path="/public%2F..%2Fadmin"))
    assert not outside.allowed and outside.code == NO_ALLOW_MATCH


@pytest.mark.parametrize(
    ("raw", "rewritten"),
    [("/public/x", None), ("/public/%78", "/public/x"), ("/public//x/./y", "/public/x/y")],
)
def test_public_paths_are_allowed(raw: str, rewritten: str | None) -> None:
    decision = Authorizer(PUBLIC_ADMIN).decide(facts(path=raw))
    assert decision.allowed
    assert decision.rewritten_path == rewritten


def _spell(path: str, data: st.DataObject) -> str:
    """One random alternative spelling of ``path``."""
    out: list[str] = []
    for char in path:
        choice = data.draw(st.integers(0, 9))
        if char == "/" and choice == 0:
            out.append("/" + data.draw(st.sampled_from(["", "./", "x/../", "public/../", "/"])))
        elif char not in "/" and choice == 1:
            out.append(f"%{ord(char):02x}")
        elif char not in "/" and choice == 2:
            out.append(f"%{ord(char):02X}")
        else:
            out.append(char)
    return data.draw(st.sampled_from(["", "/public/..", "/public/x/../.."])) + "".join(out)


@settings(max_examples=400, deadline=None)
@given(data=st.data(), index=st.integers(0, len(NORMALIZATIONS) - 1))
def test_random_spellings_never_reach_admin(data: st.DataObject, index: int) -> None:
    target = data.draw(st.sampled_from(["/admin", "/admin/", "/admin/users", "/administrator"]))
    raw = _spell(target, data)
    authorizer = Authorizer(PUBLIC_ADMIN, path_normalization=NORMALIZATIONS[index])
    assert not authorizer.decide(facts(path=raw)).allowed


@settings(max_examples=400, deadline=None)
@given(raw=st.text(alphabet="/.%2eEfF5cC;\\adminpublicx?#", max_size=40))
def test_allowed_paths_are_exactly_public(raw: str) -> None:
    decision = Authorizer(PUBLIC_ADMIN).decide(facts(path=raw))
    if decision.allowed:
        seen = decision.rewritten_path or raw
        assert seen.startswith("/public/")
        assert not seen.startswith("/admin")


# -- per-route declarations -------------------------------------------------------------


def test_authorize_attaches_a_policy() -> None:
    @authorize(principals=[ORDERS], methods=["GET"], when={"request.headers[x-env]": ["prod"]})
    def handler() -> str:
        return "ok"

    (policy,) = route_policies(handler)
    assert policy == AuthorizationPolicy(
        name=f"{__name__}.test_authorize_attaches_a_policy.<locals>.handler",
        action="ALLOW",
        rules=[
            Rule(
                from_=[Source(principals=[ORDERS])],
                to=[Operation(methods=["GET"])],
                when=[Condition(key="request.headers[x-env]", values=["prod"])],
            )
        ],
    )
    assert handler() == "ok"


def test_authorize_stacks_in_written_order() -> None:
    @authorize(action="DENY", paths=["/admin*"], name="no-admin")
    @authorize(namespaces=["shop"])
    @authorize(request_principals=["*"], dry_run=True)
    def handler() -> None:
        return None

    policies = route_policies(handler)
    assert [p.name for p in policies] == [
        "no-admin",
        f"{__name__}.test_authorize_stacks_in_written_order.<locals>.handler#2",
        f"{__name__}.test_authorize_stacks_in_written_order.<locals>.handler",
    ]
    assert [p.action for p in policies] == ["DENY", "ALLOW", "ALLOW"]
    assert [p.dry_run for p in policies] == [False, False, True]
    authorizer = Authorizer(policies)
    assert authorizer.decide(facts(source_namespace="shop")).allowed
    assert not authorizer.decide(facts(source_namespace="shop", path="/admin")).allowed
    assert not authorizer.decide(facts(source_namespace="billing")).allowed


def test_authorize_without_arguments_allows_everything() -> None:
    @authorize()
    def handler() -> None:
        return None

    (policy,) = route_policies(handler)
    assert policy.rules == (Rule(),)
    assert Authorizer([policy]).decide(facts(method="DELETE")).allowed


def test_authorize_on_classes_and_methods() -> None:
    @authorize(principals=[ORDERS])
    class View:
        @authorize(methods=["POST"], name="post-only")
        def post(self) -> str:
            return "posted"

    class Child(View):
        pass

    assert [p.name for p in route_policies(View)] == [
        f"{__name__}.test_authorize_on_classes_and_methods.<locals>.View"
    ]
    assert route_policies(Child) == route_policies(View)
    assert route_policies(View()) == route_policies(View)
    bound = View().post
    assert [p.name for p in route_policies(bound)] == ["post-only"]
    assert bound() == "posted"


def test_route_policies_follows_wrappers() -> None:
    @authorize(namespaces=["shop"], name="inner")
    def inner() -> str:
        return "inner"

    @functools.wraps(inner)
    def wrapper() -> str:
        return inner()

    decorated = authorize(methods=["GET"], name="outer")(wrapper)
    assert [p.name for p in route_policies(decorated)] == ["outer", "inner"]

    def bare_wrapper() -> str:
        return inner()

    bare_wrapper.__wrapped__ = inner  # type: ignore[attr-defined]
    assert [p.name for p in route_policies(bare_wrapper)] == ["inner"]

    partial = functools.partial(inner)
    assert [p.name for p in route_policies(partial)] == ["inner"]


def test_route_policies_of_plain_objects() -> None:
    def handler() -> None:
        return None

    assert route_policies(handler) == ()
    assert route_policies(None) == ()
    assert route_policies(42) == ()


def test_authorize_validation() -> None:
    with pytest.raises(ConfigurationError) as info:
        authorize(principals=ORDERS)  # type: ignore[arg-type]
    assert str(info.value) == "principals: expected a list of strings, got str"
    with pytest.raises(ConfigurationError) as info:
        authorize(methods=["get"])
    assert info.value.field == "methods[0]"
    with pytest.raises(ConfigurationError) as info:
        authorize(when={"request.headers[x]": []})
    assert str(info.value) == (
        "when[0]: at least one of values or not_values must be set for key request.headers[x]"
    )
    with pytest.raises(ConfigurationError) as info:
        authorize(action="CUSTOM")  # type: ignore[arg-type]
    assert info.value.field == "action"
    with pytest.raises(TypeError) as type_info:
        authorize()(len)
    assert str(type_info.value) == (
        "authorize() decorates functions and classes; cannot attach a policy to "
        "builtin_function_or_method"
    )
