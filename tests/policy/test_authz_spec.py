from __future__ import annotations

from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from meshware.exceptions import ConfigurationError
from meshware.policy.authz import (
    AuthorizationPolicy,
    Authorizer,
    Condition,
    Operation,
    Rule,
    Source,
)
from meshware.policy.facts import RequestFacts

ISTIO_EXAMPLE = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: httpbin
  namespace: foo
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep"]
    - source:
        namespaces: ["test"]
    to:
    - operation:
        methods: ["GET"]
        paths: ["/info*"]
    - operation:
        methods: ["POST"]
        paths: ["/data"]
    when:
    - key: request.auth.claims[iss]
      values: ["https://accounts.google.com"]
"""

EXPECTED_RULE = Rule(
    from_=[
        Source(principals=["cluster.local/ns/default/sa/sleep"]),
        Source(namespaces=["test"]),
    ],
    to=[
        Operation(methods=["GET"], paths=["/info*"]),
        Operation(methods=["POST"], paths=["/data"]),
    ],
    when=[Condition(key="request.auth.claims[iss]", values=["https://accounts.google.com"])],
)


def test_istio_example_from_manifest() -> None:
    policy = AuthorizationPolicy.from_manifest(yaml.safe_load(ISTIO_EXAMPLE))
    assert policy == AuthorizationPolicy(name="httpbin", action="ALLOW", rules=[EXPECTED_RULE])
    authorizer = Authorizer([policy])
    google = {"iss": "https://accounts.google.com"}
    assert authorizer.decide(
        RequestFacts(
            method="GET",
            path="/info/x",
            source_principal="cluster.local/ns/default/sa/sleep",
            claims=google,
        )
    ).allowed
    assert not authorizer.decide(
        RequestFacts(method="POST", path="/info/x", source_namespace="test", claims=google)
    ).allowed
    assert not authorizer.decide(
        RequestFacts(method="POST", path="/data", source_namespace="test")
    ).allowed


def test_istio_example_from_mapping() -> None:
    spec = yaml.safe_load(ISTIO_EXAMPLE)["spec"]
    assert AuthorizationPolicy.from_mapping("httpbin", spec) == AuthorizationPolicy(
        name="httpbin", rules=[EXPECTED_RULE]
    )


def test_every_field() -> None:
    spec = {
        "action": "DENY",
        "rules": [
            {
                "from": [
                    {
                        "source": {
                            "principals": ["a/ns/b/sa/c"],
                            "notPrincipals": ["a/ns/b/sa/d"],
                            "requestPrincipals": ["iss/sub"],
                            "notRequestPrincipals": ["iss/other"],
                            "namespaces": ["b"],
                            "notNamespaces": ["e"],
                            "ipBlocks": ["10.0.0.0/8"],
                            "notIpBlocks": ["10.1.0.0/16"],
                        }
                    }
                ],
                "to": [
                    {
                        "operation": {
                            "hosts": ["example.com"],
                            "notHosts": ["admin.example.com"],
                            "ports": ["8080", 8443],
                            "notPorts": ["9090"],
                            "methods": ["GET"],
                            "notMethods": ["DELETE"],
                            "paths": ["/api/*"],
                            "notPaths": ["/api/private"],
                        }
                    }
                ],
                "when": [
                    {"key": "request.headers[x-env]", "values": ["prod"], "notValues": ["dev"]}
                ],
            }
        ],
    }
    policy = AuthorizationPolicy.from_mapping("everything", spec, dry_run=True)
    assert policy == AuthorizationPolicy(
        name="everything",
        action="DENY",
        dry_run=True,
        rules=[
            Rule(
                from_=[
                    Source(
                        principals=["a/ns/b/sa/c"],
                        not_principals=["a/ns/b/sa/d"],
                        request_principals=["iss/sub"],
                        not_request_principals=["iss/other"],
                        namespaces=["b"],
                        not_namespaces=["e"],
                        ip_blocks=["10.0.0.0/8"],
                        not_ip_blocks=["10.1.0.0/16"],
                    )
                ],
                to=[
                    Operation(
                        hosts=["example.com"],
                        not_hosts=["admin.example.com"],
                        ports=[8080, 8443],
                        not_ports=[9090],
                        methods=["GET"],
                        not_methods=["DELETE"],
                        paths=["/api/*"],
                        not_paths=["/api/private"],
                    )
                ],
                when=[Condition(key="request.headers[x-env]", values=["prod"], not_values=["dev"])],
            )
        ],
    )


@pytest.mark.parametrize(
    ("spec", "action", "rules"),
    [
        ({}, "ALLOW", ()),
        ({"action": None, "rules": None}, "ALLOW", ()),
        ({"action": "DENY", "rules": []}, "DENY", ()),
        ({"action": "AUDIT", "rules": [{}]}, "AUDIT", (Rule(),)),
        ({"rules": [{"from": None, "to": None, "when": None}]}, "ALLOW", (Rule(),)),
    ],
)
def test_minimal_specs(spec: dict[str, Any], action: str, rules: tuple[Rule, ...]) -> None:
    policy = AuthorizationPolicy.from_mapping("p", spec)
    assert policy.action == action
    assert policy.rules == rules


def test_allow_nothing_spec_denies_all() -> None:
    authorizer = Authorizer([AuthorizationPolicy.from_mapping("allow-nothing", {})])
    assert authorizer.decide(RequestFacts(method="GET", path="/")).reason == (
        "no ALLOW policy matched"
    )


def test_null_fields_are_absent() -> None:
    spec = {"rules": [{"from": [{"source": {"principals": None, "namespaces": ["shop"]}}]}]}
    policy = AuthorizationPolicy.from_mapping("p", spec)
    assert policy.rules[0].from_ == (Source(namespaces=["shop"]),)


_SOURCES = (
    "principals, notPrincipals, requestPrincipals, notRequestPrincipals, namespaces, "
    "notNamespaces, ipBlocks, notIpBlocks"
)
_OPERATIONS = "hosts, notHosts, ports, notPorts, methods, notMethods, paths, notPaths"
_KEYS = (
    "request.headers[<name>], source.ip, source.namespace, source.principal, "
    "request.auth.principal, request.auth.audiences, request.auth.presenter, "
    "request.auth.claims[<claim>], destination.port"
)
_BAD_IP = (
    "bad IP address or CIDR block; expected an address like 10.1.2.3 or a block like 10.0.0.0/8"
)


def _source(**fields: Any) -> dict[str, Any]:
    return {"rules": [{"from": [{"source": {"principals": ["a"]}}, {"source": fields}]}]}


def _operation(**fields: Any) -> dict[str, Any]:
    return {"rules": [{"to": [{"operation": fields}]}]}


def _when(*conditions: Any) -> dict[str, Any]:
    return {"rules": [{}, {"when": list(conditions)}]}


@pytest.mark.parametrize(
    ("spec", "field", "message", "value"),
    [
        # unknown and unsupported fields
        (
            _source(principles=["b"]),
            "rules[0].from[1].source.principles",
            f"unknown field; expected one of {_SOURCES}",
            ["b"],
        ),
        ({"rulez": []}, "rulez", "unknown field; expected one of action, rules", []),
        (
            {"rules": [{"form": []}]},
            "rules[0].form",
            "unknown field; expected one of from, to, when",
            [],
        ),
        (
            {"rules": [{"from": [{"sources": {}}]}]},
            "rules[0].from[0].sources",
            "unknown field; expected one of source",
            {},
        ),
        (
            {"rules": [{"to": [{"operations": {}}]}]},
            "rules[0].to[0].operations",
            "unknown field; expected one of operation",
            {},
        ),
        (
            _operation(verbs=["GET"]),
            "rules[0].to[0].operation.verbs",
            f"unknown field; expected one of {_OPERATIONS}",
            ["GET"],
        ),
        (
            _when({"key": "source.ip", "value": ["10.0.0.1"]}),
            "rules[1].when[0].value",
            "unknown field; expected one of key, values, notValues",
            ["10.0.0.1"],
        ),
        (
            {"selector": {"matchLabels": {"app": "x"}}},
            "selector",
            "unsupported field: a policy applies to the service it is installed in, so there are "
            "no workloads to select",
            {"matchLabels": {"app": "x"}},
        ),
        (
            {"targetRefs": []},
            "targetRefs",
            "unsupported field: a policy applies to the service it is installed in",
            [],
        ),
        (
            {"provider": {"name": "opa"}},
            "provider",
            "unsupported field: only used by the CUSTOM action, which is not supported",
            {"name": "opa"},
        ),
        (
            _source(remoteIpBlocks=["1.2.3.4"]),
            "rules[0].from[1].source.remoteIpBlocks",
            "unsupported field: the original client address behind proxies is not known "
            "in-process; use ipBlocks for the direct peer",
            ["1.2.3.4"],
        ),
        (
            _source(serviceAccounts=["ns/sa"]),
            "rules[0].from[1].source.serviceAccounts",
            "unsupported field: use principals (<trust-domain>/ns/<ns>/sa/<sa>)",
            ["ns/sa"],
        ),
        # action
        (
            {"action": "CUSTOM"},
            "action",
            "unsupported action CUSTOM: external authorization is "
            "not supported; expected one of ALLOW, DENY, AUDIT",
            "CUSTOM",
        ),
        ({"action": "deny"}, "action", "expected one of ALLOW, DENY, AUDIT", "deny"),
        ({"action": 1}, "action", "expected one of ALLOW, DENY, AUDIT", 1),
        # structure and types
        ({"rules": {}}, "rules", "expected a list of rules, got dict", {}),
        ({"rules": "all"}, "rules", "expected a list of rules, got str", "all"),
        ({"rules": [[]]}, "rules[0]", "expected a mapping, got list", []),
        ({"rules": [{"from": {}}]}, "rules[0].from", "expected a list of sources, got dict", {}),
        (
            {"rules": [{"from": []}]},
            "rules[0].from",
            "must not be empty; omit `from` to match any source",
            [],
        ),
        (
            {"rules": [{"to": []}]},
            "rules[0].to",
            "must not be empty; omit `to` to match any operation",
            [],
        ),
        (
            {"rules": [{"from": [{}]}]},
            "rules[0].from[0].source",
            f"must not be empty; expected at least one of {_SOURCES}",
            None,
        ),
        (
            {"rules": [{"from": [{"source": {}}]}]},
            "rules[0].from[0].source",
            f"must not be empty; expected at least one of {_SOURCES}",
            {},
        ),
        ({"rules": [{"from": ["x"]}]}, "rules[0].from[0]", "expected a mapping, got str", "x"),
        (
            {"rules": [{"to": [{"operation": {}}]}]},
            "rules[0].to[0].operation",
            f"must not be empty; expected at least one of {_OPERATIONS}",
            {},
        ),
        (
            {"rules": [{"when": {"key": "x"}}]},
            "rules[0].when",
            "expected a list of conditions, got dict",
            {"key": "x"},
        ),
        (
            _source(principals="b"),
            "rules[0].from[1].source.principals",
            "expected a list of strings, got str",
            "b",
        ),
        (
            _source(namespaces=["a", 1]),
            "rules[0].from[1].source.namespaces[1]",
            "expected a string, got int",
            1,
        ),
        (
            _source(notIpBlocks=["10.0.0.0/8", "300.0.0.1"]),
            "rules[0].from[1].source.notIpBlocks[1]",
            _BAD_IP,
            "300.0.0.1",
        ),
        (
            _source(notRequestPrincipals=[""]),
            "rules[0].from[1].source.notRequestPrincipals[0]",
            "empty value not allowed; expected a non-empty string",
            "",
        ),
        (
            _source(principals=["spiffe://td/ns/a/sa/b"]),
            "rules[0].from[1].source.principals[0]",
            "expected a principal without the spiffe:// scheme, like "
            "cluster.local/ns/default/sa/orders",
            "spiffe://td/ns/a/sa/b",
        ),
        (
            _operation(ports=["80a"]),
            "rules[0].to[0].operation.ports[0]",
            'expected a port number like "8080", got str',
            "80a",
        ),
        (
            _operation(notPorts=[80, True]),
            "rules[0].to[0].operation.notPorts[1]",
            'expected a port number like "8080", got bool',
            True,
        ),
        (
            _operation(ports=["70000"]),
            "rules[0].to[0].operation.ports[0]",
            "bad port; expected an integer from 0 to 65535",
            70000,
        ),
        (
            _operation(ports="80"),
            "rules[0].to[0].operation.ports",
            "expected a list of ports, got str",
            "80",
        ),
        (
            _operation(methods=["get"]),
            "rules[0].to[0].operation.methods[0]",
            "methods are matched case-sensitively against the upper-case request method; "
            "expected 'GET'",
            "get",
        ),
        (
            _operation(notPaths=["/api/*/x"]),
            "rules[0].to[0].operation.notPaths[0]",
            "wildcard '*' is only supported as the whole value or at its start or end; use {*} "
            "or {**} for whole path segments",
            "/api/*/x",
        ),
        (
            _operation(paths=["/users/{id}"]),
            "rules[0].to[0].operation.paths[0]",
            "'{' or '}' is only supported in whole-segment path templates {*} and {**}",
            "/users/{id}",
        ),
        (
            _operation(notHosts=["a*b"]),
            "rules[0].to[0].operation.notHosts[0]",
            "wildcard '*' is only supported as the whole value or at its start or end",
            "a*b",
        ),
        # conditions
        (
            _when({"key": "foo", "values": ["x"]}),
            "rules[1].when[0].key",
            f"unknown key 'foo'; expected one of {_KEYS}",
            "foo",
        ),
        (
            _when({"key": "connection.sni", "values": ["x"]}),
            "rules[1].when[0].key",
            "unsupported key 'connection.sni': the TLS server name is not part of the request facts",
            "connection.sni",
        ),
        (
            _when({"values": ["x"]}),
            "rules[1].when[0].key",
            "missing; expected the attribute to match, like request.headers[x-env]",
            None,
        ),
        (
            _when({"key": "source.ip"}),
            "rules[1].when[0]",
            "at least one of values or notValues must be set for key source.ip",
            {"key": "source.ip"},
        ),
        (
            _when({"key": "source.ip", "values": []}),
            "rules[1].when[0]",
            "at least one of values or notValues must be set for key source.ip",
            {"key": "source.ip", "values": []},
        ),
        (
            _when({"key": "source.ip", "notValues": ["nope"]}),
            "rules[1].when[0].notValues[0]",
            _BAD_IP,
            "nope",
        ),
        (
            _when({"key": "destination.port", "values": ["https"]}),
            "rules[1].when[0].values[0]",
            "bad port; expected a port number from 0 to 65535",
            "https",
        ),
        (
            _when({"key": 7, "values": ["x"]}),
            "rules[1].when[0].key",
            f"expected an attribute name like request.headers[x-env]; known keys: {_KEYS}",
            7,
        ),
        (
            _when({"key": "request.headers[x]", "values": "x"}),
            "rules[1].when[0].values",
            "expected a list of strings, got str",
            "x",
        ),
    ],
)
def test_parse_errors(spec: dict[str, Any], field: str, message: str, value: object) -> None:
    with pytest.raises(ConfigurationError) as info:
        AuthorizationPolicy.from_mapping("p", spec)
    assert info.value.field == field
    assert str(info.value) == f"{field}: {message}"
    assert info.value.value == value


def test_spec_must_be_a_mapping() -> None:
    with pytest.raises(ConfigurationError) as info:
        AuthorizationPolicy.from_mapping("p", [])  # type: ignore[arg-type]
    assert info.value.field is None
    assert (
        str(info.value)
        == "expected the spec of an Istio AuthorizationPolicy as a mapping, got list"
    )


def test_name_is_validated() -> None:
    with pytest.raises(ConfigurationError) as info:
        AuthorizationPolicy.from_mapping("", {})
    assert str(info.value) == "name: expected a non-empty string"


def test_parse_errors_chain_the_local_error() -> None:
    with pytest.raises(ConfigurationError) as info:
        AuthorizationPolicy.from_mapping("p", _source(ipBlocks=["x"]))
    cause = info.value.__cause__
    assert isinstance(cause, ConfigurationError)
    assert cause.field == "source.ip_blocks[0]"


MANIFEST = {
    "apiVersion": "security.istio.io/v1beta1",
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "deny-admin", "annotations": {"istio.io/dry-run": "true"}},
    "spec": {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]},
}


def test_from_manifest_dry_run_annotation() -> None:
    policy = AuthorizationPolicy.from_manifest(MANIFEST)
    assert policy == AuthorizationPolicy(
        name="deny-admin",
        action="DENY",
        dry_run=True,
        rules=[Rule(to=[Operation(paths=["/admin*"])])],
    )
    enforced = {**MANIFEST, "metadata": {"name": "deny-admin"}}
    assert AuthorizationPolicy.from_manifest(enforced).dry_run is False
    no_spec = {**MANIFEST, "spec": None}
    assert AuthorizationPolicy.from_manifest(no_spec).rules == ()


@pytest.mark.parametrize(
    ("change", "field", "message", "value"),
    [
        (
            {"kind": "PeerAuthentication"},
            "kind",
            "expected AuthorizationPolicy",
            "PeerAuthentication",
        ),
        (
            {"apiVersion": "v1"},
            "apiVersion",
            "expected security.istio.io/v1 or security.istio.io/v1beta1",
            "v1",
        ),
        ({"metadata": None}, "metadata", "expected a mapping, got NoneType", None),
        ({"metadata": {"namespace": "x"}}, "metadata.name", "expected a non-empty string", None),
        (
            {"metadata": {"name": "x", "annotations": {"istio.io/dry-run": True}}},
            'metadata.annotations["istio.io/dry-run"]',
            'expected "true" or "false"',
            True,
        ),
        (
            {"spec": {"rules": [{"to": [{"operation": {"ports": ["x"]}}]}]}},
            "spec.rules[0].to[0].operation.ports[0]",
            'expected a port number like "8080", got str',
            "x",
        ),
        (
            {"spec": []},
            "spec",
            "expected the spec of an Istio AuthorizationPolicy as a mapping, got list",
            [],
        ),
    ],
)
def test_from_manifest_errors(
    change: dict[str, Any], field: str, message: str, value: object
) -> None:
    with pytest.raises(ConfigurationError) as info:
        AuthorizationPolicy.from_manifest({**MANIFEST, **change})
    assert info.value.field == field
    assert str(info.value) == f"{field}: {message}"
    assert info.value.value == value


def test_from_manifest_needs_a_mapping() -> None:
    with pytest.raises(ConfigurationError) as info:
        AuthorizationPolicy.from_manifest("kind: AuthorizationPolicy")  # type: ignore[arg-type]
    assert str(info.value) == "expected a mapping, got str"


# -- property: parsing never raises anything but ConfigurationError ---------------------

_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 70000),
    st.sampled_from(
        [
            "",
            "*",
            "a*",
            "*a",
            "a*b",
            "/x/{*}",
            "/{**}/{*}",
            "10.0.0.0/8",
            "GET",
            "get",
            "8080",
            "request.headers[x]",
            "request.auth.claims[a][b]",
            "foo",
            "spiffe://x",
            "ALLOW",
            "DENY",
            "AUDIT",
            "CUSTOM",
            "/a//b",
        ]
    ),
    st.text(max_size=8),
)
_names = st.sampled_from(
    [
        "action",
        "rules",
        "from",
        "to",
        "when",
        "source",
        "operation",
        "key",
        "values",
        "notValues",
        "principals",
        "notPrincipals",
        "requestPrincipals",
        "namespaces",
        "ipBlocks",
        "notIpBlocks",
        "hosts",
        "ports",
        "notPorts",
        "methods",
        "paths",
        "notPaths",
        "selector",
        "x",
    ]
)
_tree = st.recursive(
    _leaf,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(_names, children, max_size=4),
    ),
    max_leaves=20,
)


@settings(max_examples=500, deadline=None)
@given(spec=st.dictionaries(_names, _tree, max_size=3))
def test_from_mapping_only_raises_configuration_error(spec: dict[str, Any]) -> None:
    try:
        authorizer = Authorizer([AuthorizationPolicy.from_mapping("p", spec)])
    except ConfigurationError as exc:
        assert exc.field is None or isinstance(exc.field, str)
        return
    decision = authorizer.decide(RequestFacts(method="GET", path="/x"))
    assert decision.status in (200, 403)
