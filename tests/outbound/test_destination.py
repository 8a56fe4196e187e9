"""DestinationRule, TrafficPolicy, ClientTLSSettings and DestinationRules."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from meshware.exceptions import ConfigurationError
from meshware.outbound.balancing import LoadBalancerSettings
from meshware.outbound.destination import (
    ClientTLSSettings,
    DestinationRule,
    DestinationRules,
    TrafficPolicy,
)
from meshware.outbound.endpoints import Endpoint, Subset
from meshware.outbound.outlier import OutlierDetection
from meshware.outbound.pool_limits import ConnectionPoolLimits

# --- Istio's own examples load unchanged -------------------------------------------------

BOOKINFO_RATINGS = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: bookinfo-ratings
spec:
  host: ratings.prod.svc.cluster.local
  trafficPolicy:
    loadBalancer:
      simple: LEAST_REQUEST
  subsets:
  - name: testversion
    labels:
      version: v3
    trafficPolicy:
      loadBalancer:
        simple: ROUND_ROBIN
"""

CIRCUIT_BREAKING_TASK = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: httpbin
spec:
  host: httpbin
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 1
      http:
        http1MaxPendingRequests: 1
        maxRequestsPerConnection: 1
    outlierDetection:
      consecutive5xxErrors: 1
      interval: 1s
      baseEjectionTime: 3m
      maxEjectionPercent: 100
"""

LOCALITY_FAILOVER = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: helloworld
spec:
  host: helloworld.sample.svc.cluster.local
  trafficPolicy:
    connectionPool:
      http:
        maxRequestsPerConnection: 1
    loadBalancer:
      simple: ROUND_ROBIN
      localityLbSetting:
        enabled: true
        failover:
          - from: region1
            to: region2
    outlierDetection:
      consecutive5xxErrors: 1
      interval: 1s
      baseEjectionTime: 1m
"""

BOOKINFO_ALL_MTLS = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
spec:
  host: reviews
  trafficPolicy:
    tls:
      mode: ISTIO_MUTUAL
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
  - name: v3
    labels:
      version: v3
"""


def load(text: str) -> DestinationRule:
    return DestinationRule.from_resource(yaml.safe_load(text))


def test_subset_overrides_the_load_balancer_of_the_rule() -> None:
    rule = load(BOOKINFO_RATINGS)
    assert rule.name == "bookinfo-ratings"
    assert rule.host == "ratings.prod.svc.cluster.local"
    assert rule.policy_for(None).load_balancer == LoadBalancerSettings(simple="LEAST_REQUEST")
    assert rule.policy_for("testversion").load_balancer == LoadBalancerSettings(
        simple="ROUND_ROBIN"
    )
    assert rule.subset("testversion") == Subset(name="testversion", labels={"version": "v3"})
    assert rule.subset_names == frozenset({"testversion"})


def test_circuit_breaking_task_example() -> None:
    policy = load(CIRCUIT_BREAKING_TASK).traffic_policy
    assert policy.connection_pool == ConnectionPoolLimits(
        max_connections=1, max_pending_requests=1, max_requests_per_connection=1
    )
    assert policy.outlier_detection == OutlierDetection(
        consecutive_5xx_errors=1, interval=1.0, base_ejection_time=180.0, max_ejection_percent=100
    )
    assert policy.load_balancer is None
    assert policy.tls is None


def test_locality_failover_example() -> None:
    policy = load(LOCALITY_FAILOVER).traffic_policy
    assert policy.load_balancer is not None
    assert policy.load_balancer.simple == "ROUND_ROBIN"
    assert policy.load_balancer.locality is not None
    assert policy.load_balancer.locality.failover == (("region1", "region2"),)
    assert policy.outlier_detection is not None
    assert policy.outlier_detection.base_ejection_time == 60.0


def test_bookinfo_mtls_rule_gives_every_subset_the_rules_tls() -> None:
    rule = load(BOOKINFO_ALL_MTLS)
    for subset in ("v1", "v2", "v3"):
        assert rule.policy_for(subset).tls == ClientTLSSettings(mode="ISTIO_MUTUAL")
    v2 = rule.subset("v2")
    assert v2 is not None
    endpoints = (
        Endpoint("10.0.0.1", 9080, labels={"version": "v1"}),
        Endpoint("10.0.0.2", 9080, labels={"version": "v2", "track": "canary"}),
    )
    assert v2.select(endpoints) == (endpoints[1],)


def test_several_documents_make_a_rule_set() -> None:
    rules = DestinationRules.from_resources(
        yaml.safe_load_all(BOOKINFO_RATINGS + "\n---\n" + CIRCUIT_BREAKING_TASK + "\n---\n")
    )
    assert len(rules) == 2
    assert [r.host for r in rules] == ["ratings.prod.svc.cluster.local", "httpbin"]


# --- subset policies merge field by field -------------------------------------------------


def test_subset_policy_replaces_whole_fields_and_inherits_the_others() -> None:
    rule = DestinationRule.from_mapping(
        {
            "host": "payments",
            "trafficPolicy": {
                "loadBalancer": {"simple": "RANDOM"},
                "connectionPool": {"tcp": {"maxConnections": 10, "connectTimeout": "2s"}},
                "outlierDetection": {"consecutive5xxErrors": 3},
                "tls": {"mode": "ISTIO_MUTUAL"},
            },
            "subsets": [
                {
                    "name": "canary",
                    "labels": {"track": "canary"},
                    "trafficPolicy": {
                        "connectionPool": {"tcp": {"maxConnections": 2}},
                        "tls": {"mode": "DISABLE"},
                    },
                },
                {"name": "stable", "labels": {"track": "stable"}},
            ],
        }
    )
    canary = rule.policy_for("canary")
    # The subset's connectionPool replaces the rule's entirely (connectTimeout is back to
    # its default), as Istio merges: field by field, never deeper.
    assert canary.connection_pool == ConnectionPoolLimits(max_connections=2)
    assert canary.tls == ClientTLSSettings(mode="DISABLE")
    assert canary.load_balancer == LoadBalancerSettings(simple="RANDOM")
    assert canary.outlier_detection == OutlierDetection(consecutive_5xx_errors=3)
    assert rule.policy_for("stable") == rule.traffic_policy
    assert rule.subset_policies["canary"].load_balancer is None


def test_merged_with_none_or_an_empty_policy_is_the_same_policy() -> None:
    policy = TrafficPolicy(load_balancer=LoadBalancerSettings(simple="RANDOM"))
    assert policy.merged_with(None) is policy
    assert policy.merged_with(TrafficPolicy()) is policy


def test_unknown_subset_is_refused_by_name() -> None:
    rule = load(BOOKINFO_ALL_MTLS)
    with pytest.raises(ConfigurationError) as info:
        rule.policy_for("v9")
    assert info.value.field == "subset"
    assert str(info.value) == (
        "subset: the DestinationRule for reviews has no such subset (subsets: v1, v2, v3)"
    )
    assert rule.subset("v9") is None


# --- TLS settings --------------------------------------------------------------------------


def test_tls_modes() -> None:
    simple = ClientTLSSettings.from_mapping({"mode": "SIMPLE"})
    assert (simple.encrypted, simple.presents_certificate) == (True, False)
    mutual = ClientTLSSettings.from_mapping({"mode": "MUTUAL"})
    assert (mutual.encrypted, mutual.presents_certificate) == (True, True)
    istio = ClientTLSSettings.from_mapping({"mode": "ISTIO_MUTUAL"})
    assert (istio.encrypted, istio.presents_certificate) == (True, True)
    # Istio's default when a tls block names no mode.
    assert ClientTLSSettings.from_mapping({}).mode == "DISABLE"
    assert not ClientTLSSettings.from_mapping({}).encrypted


def test_subject_alt_names_and_sni() -> None:
    tls = ClientTLSSettings.from_mapping(
        {
            "mode": "ISTIO_MUTUAL",
            "subjectAltNames": ["spiffe://cluster.local/ns/shop/sa/payments-v2"],
            "sni": "payments.shop.svc.cluster.local",
        }
    )
    assert tls.subject_alt_names == ("spiffe://cluster.local/ns/shop/sa/payments-v2",)
    assert tls.sni == "payments.shop.svc.cluster.local"


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        (
            {"mode": "ISTIO_MUTUAL", "clientCertificate": "/etc/certs/cert.pem"},
            "spec.trafficPolicy.tls.clientCertificate",
            "is not supported: meshware presents the service's own certificate",
        ),
        (
            {"mode": "SIMPLE", "insecureSkipVerify": True},
            "spec.trafficPolicy.tls.insecureSkipVerify",
            "is not supported: server verification cannot be turned off",
        ),
        (
            {"mode": "PERMISSIVE"},
            "spec.trafficPolicy.tls.mode",
            "expected one of DISABLE, ISTIO_MUTUAL, MUTUAL, SIMPLE",
        ),
        (
            {"mode": "SIMPLE", "subjectAltNames": "spiffe://cluster.local/ns/a/sa/b"},
            "spec.trafficPolicy.tls.subjectAltNames",
            "expected a list of SPIFFE ids",
        ),
        (
            {"mode": "DISABLE", "sni": "payments"},
            "spec.trafficPolicy.tls.mode",
            "subjectAltNames and sni need TLS; mode is DISABLE",
        ),
    ],
)
def test_tls_errors_name_the_full_path(spec: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        DestinationRule.from_mapping({"host": "payments", "trafficPolicy": {"tls": spec}})
    assert info.value.field == field
    assert str(info.value) == f"{field}: {message}"


def test_invalid_subject_alt_name_names_its_index() -> None:
    with pytest.raises(ConfigurationError) as info:
        DestinationRule.from_mapping(
            {
                "host": "payments",
                "subsets": [
                    {
                        "name": "v1",
                        "labels": {"version": "v1"},
                        "trafficPolicy": {
                            "tls": {
                                "mode": "SIMPLE",
                                "subjectAltNames": ["spiffe://cluster.local/ns/a/sa/b", "b"],
                            }
                        },
                    }
                ],
            }
        )
    assert info.value.field == "spec.subsets[0].trafficPolicy.tls.subjectAltNames[1]"
    assert info.value.value == "b"


# --- every unsupported field is refused with its full path -------------------------------


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        (
            {"host": "payments", "exportTo": ["."]},
            "spec.exportTo",
            "is not supported: visibility across namespaces has no meaning in process: a rule "
            "applies to the service that loads it",
        ),
        (
            {"host": "payments", "workloadSelector": {"matchLabels": {"app": "x"}}},
            "spec.workloadSelector",
            "is not supported: a rule applies to the service that loads it; there are no "
            "other workloads to select",
        ),
        (
            {"host": "payments", "trafficPolicy": {"portLevelSettings": []}},
            "spec.trafficPolicy.portLevelSettings",
            "is not supported: a destination has one policy (per subset), not one per port",
        ),
        (
            {"host": "payments", "trafficPolicy": {"tunnel": {"protocol": "CONNECT"}}},
            "spec.trafficPolicy.tunnel",
            "is not supported: meshware does not tunnel calls over CONNECT",
        ),
        (
            {"host": "payments", "colour": "blue"},
            "spec.colour",
            "unknown field; expected one of host, trafficPolicy, subsets",
        ),
        (
            {"host": "payments", "subsets": [{"name": "v1", "lables": {}}]},
            "spec.subsets[0].lables",
            "unknown field; expected one of name, labels, trafficPolicy",
        ),
        (
            {
                "host": "payments",
                "subsets": [{"name": "v1"}, {"name": "v1", "labels": {"version": "v2"}}],
            },
            "spec.subsets[1].name",
            "another subset has this name",
        ),
        ({"trafficPolicy": {}}, "spec.host", "is required"),
        (
            {"host": "pay ments"},
            "spec.host",
            "expected a host name such as 'reviews', 'reviews.prod.svc.cluster.local' or "
            "'*.example.com'",
        ),
        (
            {
                "host": "payments",
                "trafficPolicy": {"connectionPool": {"http": {"http2MaxRequests": 1000}}},
            },
            "spec.trafficPolicy.connectionPool.http.http2MaxRequests",
            "is not supported; understood keys are http1MaxPendingRequests, "
            "maxRequestsPerConnection, idleTimeout",
        ),
        (
            {
                "host": "payments",
                "subsets": [
                    {
                        "name": "v1",
                        "trafficPolicy": {"outlierDetection": {"consecutiveErrors": 5}},
                    }
                ],
            },
            "spec.subsets[0].trafficPolicy.outlierDetection.consecutiveErrors",
            "was removed from Istio; use consecutive5xxErrors (or consecutiveGatewayErrors "
            "for 502/503/504 only)",
        ),
        (
            {"host": "payments", "trafficPolicy": {"loadBalancer": {"simple": "PASSTHROUGH"}}},
            "spec.trafficPolicy.loadBalancer.simple",
            "PASSTHROUGH is not supported: a host that no resolver knows is already sent "
            "untouched, so leave the host out of discovery instead",
        ),
        (
            {"host": "payments", "subsets": {"name": "v1"}},
            "spec.subsets",
            "expected a list of subsets",
        ),
        (
            {"host": "payments", "trafficPolicy": []},
            "spec.trafficPolicy",
            "expected a mapping, got list",
        ),
    ],
)
def test_spec_errors_name_the_full_path(spec: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        DestinationRule.from_mapping(spec)
    assert info.value.field == field
    assert str(info.value) == f"{field}: {message}"


@pytest.mark.parametrize(
    ("resource", "field", "message"),
    [
        (
            {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "spec": {}},
            "kind",
            "expected 'DestinationRule'",
        ),
        (
            {"apiVersion": "v1", "kind": "DestinationRule", "spec": {"host": "a"}},
            "apiVersion",
            "expected 'networking.istio.io/v1' (or another networking.istio.io version)",
        ),
        (
            {"apiVersion": "networking.istio.io/v1beta1", "kind": "DestinationRule"},
            "spec",
            "is required",
        ),
        (
            {
                "apiVersion": "networking.istio.io/v1",
                "kind": "DestinationRule",
                "spec": {"host": "a"},
                "extra": 1,
            },
            "extra",
            "unknown field; expected apiVersion, kind, metadata and spec",
        ),
    ],
)
def test_resource_errors(resource: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        DestinationRule.from_resource(resource)
    assert info.value.field == field
    assert str(info.value) == f"{field}: {message}"


def test_resource_errors_carry_the_document_index() -> None:
    docs = [
        yaml.safe_load(BOOKINFO_RATINGS),
        None,
        {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "spec": {"host": 1}},
    ]
    with pytest.raises(ConfigurationError) as info:
        DestinationRules.from_resources(docs)
    assert info.value.field == "resources[2].spec.host"


def test_constructor_validation() -> None:
    with pytest.raises(ConfigurationError) as info:
        DestinationRule(host="payments", subset_policies={"v1": TrafficPolicy()})
    assert (info.value.field, info.value.value) == ("subset_policies", "v1")
    with pytest.raises(ConfigurationError) as info:
        TrafficPolicy(tls="ISTIO_MUTUAL")  # type: ignore[arg-type]
    assert info.value.field == "trafficPolicy.tls"
    with pytest.raises(ConfigurationError) as info:
        DestinationRule(
            host="payments",
            subsets=(Subset(name="v1"), Subset(name="v1", labels={"version": "v2"})),
        )
    assert info.value.field == "subsets[1].name"


def test_rules_are_hashable_and_compare_by_value() -> None:
    assert load(BOOKINFO_RATINGS) == load(BOOKINFO_RATINGS)
    assert hash(load(BOOKINFO_RATINGS)) == hash(load(BOOKINFO_RATINGS))


# --- finding the rule of a destination ------------------------------------------------------


def rule(host: str) -> DestinationRule:
    return DestinationRule(host=host)


def test_lookup_precedence() -> None:
    rules = DestinationRules(
        [
            rule("reviews.prod.svc.cluster.local"),
            rule("ratings"),
            rule("*.example.com"),
            rule("*.api.example.com"),
            rule("*"),
        ]
    )
    assert rules.get("reviews.prod.svc.cluster.local") is not None
    found = rules.get("reviews")
    assert found is not None and found.host == "reviews.prod.svc.cluster.local"
    found = rules.get("reviews.prod")
    assert found is not None and found.host == "reviews.prod.svc.cluster.local"
    found = rules.get("ratings.default.svc.cluster.local")
    assert found is not None and found.host == "ratings"
    found = rules.get("v1.api.example.com")
    assert found is not None and found.host == "*.api.example.com"
    found = rules.get("www.example.com")
    assert found is not None and found.host == "*.example.com"
    found = rules.get("payments")
    assert found is not None and found.host == "*"
    assert rules.get("RATINGS.") is rules.get("ratings")


def test_ambiguous_short_names_find_nothing() -> None:
    rules = DestinationRules(
        [rule("reviews.prod.svc.cluster.local"), rule("reviews.test.svc.cluster.local")]
    )
    assert rules.get("reviews") is None
    found = rules.get("reviews.test")
    assert found is not None and found.host == "reviews.test.svc.cluster.local"


def test_duplicate_hosts_are_refused() -> None:
    with pytest.raises(ConfigurationError) as info:
        DestinationRules([rule("reviews"), rule("REVIEWS")])
    assert (info.value.field, info.value.value) == ("rules[1].host", "reviews")
    with pytest.raises(ConfigurationError) as info:
        DestinationRules([rule("reviews"), "reviews"])  # type: ignore[list-item]
    assert info.value.field == "rules[1]"


# --- property: anything in, a rule or a ConfigurationError out -----------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5000),
    st.floats(allow_nan=True),
    st.sampled_from(
        ["1s", "30ms", "x", "", "ROUND_ROBIN", "ISTIO_MUTUAL", "SIMPLE", "v1", "reviews", "*"]
    ),
)
_keys = st.sampled_from(
    [
        "host",
        "trafficPolicy",
        "subsets",
        "name",
        "labels",
        "loadBalancer",
        "simple",
        "connectionPool",
        "tcp",
        "http",
        "maxConnections",
        "outlierDetection",
        "consecutive5xxErrors",
        "interval",
        "tls",
        "mode",
        "subjectAltNames",
        "sni",
        "consistentHash",
        "httpHeaderName",
        "exportTo",
    ]
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_keys, inner, max_size=4)),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_keys, _values, max_size=4))
def test_from_mapping_raises_only_configuration_errors(spec: dict[str, Any]) -> None:
    try:
        result = DestinationRule.from_mapping(spec)
    except ConfigurationError as exc:
        assert exc.field is not None and exc.field.startswith("spec")
    else:
        assert isinstance(result, DestinationRule)
        for name in result.subset_names:
            assert isinstance(result.policy_for(name), TrafficPolicy)
