"""Istio's own documentation examples, loaded unchanged: what they do here, or why they are
refused. The YAML files in ``istio_examples/`` are copied from istio.io (each names its page)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from meshware.config import MeshConfig, check_config, load_config
from meshware.outbound.destination import DestinationRule
from meshware.outbound.faults import FaultDecision
from meshware.outbound.routing import RouteTable
from meshware.server.tls import MtlsMode
from meshware.testing import assert_allowed, assert_denied

EXAMPLES = Path(__file__).parent / "istio_examples"
SLEEP = "cluster.local/ns/default/sa/sleep"
GOOGLE = {"iss": "https://accounts.google.com", "sub": "someone"}


class Dice:
    """A random source that always draws ``value``."""

    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


def example(*names: str, **options: str) -> MeshConfig:
    return load_config([EXAMPLES / name for name in names], **options)


ACCEPTED = [
    "authz-allow-all.yaml",
    "authz-allow-httpbin.yaml",
    "authz-allow-nothing-selector.yaml",
    "authz-allow-nothing.yaml",
    "authz-audit.yaml",
    "authz-deny-dev-post.yaml",
    "authz-deny-post-port.yaml",
    "authz-dry-run.yaml",
    "destination-rule-all.yaml",
    "destination-rule-circuit-breaker.yaml",
    "destination-rule-sticky.yaml",
    "destination-rule-subset-policy.yaml",
    "mirroring.yaml",
    "peer-authentication-finance.yaml",
    "peer-authentication-strict.yaml",
    "request-authentication.yaml",
]


@pytest.mark.parametrize("name", ACCEPTED)
def test_accepted_examples_load_without_errors_or_warnings(name: str) -> None:
    report = check_config(EXAMPLES / name)

    assert (report.errors, report.warnings) == ((), ())
    assert len(report.resources) == report.documents >= 1


@pytest.mark.parametrize(
    "name",
    [
        "virtual-service-reviews-80-20.yaml",
        "virtual-service-reviews-jason.yaml",
        "virtual-service-ratings-delay.yaml",
        "virtual-service-ratings-abort.yaml",
    ],
)
def test_routing_examples_load_with_bookinfos_destination_rules(name: str) -> None:
    report = check_config([EXAMPLES / "destination-rule-all.yaml", EXAMPLES / name])

    assert (report.errors, report.warnings) == ((), ())


REFUSED = {
    "authz-root-version-selector.yaml": [
        (
            1,
            11,
            "spec.selector.matchLabels.version",
            "unsupported label: meshware knows a workload by its service name, which is its app "
            "label; select with {app: <service>}",
        )
    ],
    "peer-authentication-port-level.yaml": [
        (
            1,
            14,
            "spec.portLevelMtls",
            "is not supported: a service has one mTLS mode for its port; per-port modes are not "
            "supported",
        )
    ],
    "virtual-service-rewrite.yaml": [
        (
            1,
            17,
            "spec.http[0].rewrite",
            "is not supported: meshware routes calls, it does not rewrite them",
        )
    ],
    "virtual-service-ratings-abort-legacy.yaml": [
        (
            1,
            17,
            "spec.http[0].fault.abort.percent",
            "unknown field; expected one of httpStatus, percentage",
        )
    ],
    "destination-rule-unsupported.yaml": [
        (
            1,
            11,
            "spec.trafficPolicy.portLevelSettings",
            "is not supported: a destination has one policy (per subset), not one per port",
        ),
        (
            2,
            32,
            "spec.trafficPolicy.connectionPool.tcp.tcpKeepalive",
            "is not supported; understood keys are maxConnections, connectTimeout",
        ),
        (
            3,
            47,
            "spec.trafficPolicy.connectionPool.http.http2MaxRequests",
            "is not supported; understood keys are http1MaxPendingRequests, "
            "maxRequestsPerConnection, idleTimeout",
        ),
        (
            4,
            63,
            "spec.trafficPolicy.tls.clientCertificate",
            "is not supported: meshware presents the service's own certificate",
        ),
    ],
}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_examples_say_exactly_why(name: str) -> None:
    report = check_config(EXAMPLES / name)

    assert [(p.document, p.line, p.field, p.message) for p in report.errors] == REFUSED[name]
    assert report.resources == ()


def test_every_example_file_is_accepted_or_refused_here() -> None:
    files = {p.name for p in EXAMPLES.glob("*.yaml")}
    routing = {
        "virtual-service-reviews-80-20.yaml",
        "virtual-service-reviews-jason.yaml",
        "virtual-service-ratings-delay.yaml",
        "virtual-service-ratings-abort.yaml",
    }

    assert files == set(ACCEPTED) | set(REFUSED) | routing


def test_checking_all_examples_at_once_finds_their_clashes_too() -> None:
    report = check_config(EXAMPLES)

    clashes = [
        (os.path.basename(p.file or ""), p.document, p.field)
        for p in report.errors
        if p.field == "metadata.name"
    ]
    assert clashes == [
        ("authz-deny-dev-post.yaml", 1, "metadata.name"),
        ("authz-deny-post-port.yaml", 1, "metadata.name"),
        ("destination-rule-subset-policy.yaml", 1, "metadata.name"),
        ("mirroring.yaml", 2, "metadata.name"),
        ("peer-authentication-strict.yaml", 1, "metadata.name"),
        ("request-authentication.yaml", 2, "metadata.name"),
        ("virtual-service-ratings-delay.yaml", 1, "metadata.name"),
        ("virtual-service-reviews-jason.yaml", 1, "metadata.name"),
    ]
    assert len(report.errors) == len(clashes) + sum(len(v) for v in REFUSED.values())


# -- what the accepted examples do ------------------------------------------------------------


def test_allow_httpbin() -> None:
    config = example("authz-allow-httpbin.yaml", namespace="foo", service="httpbin")

    assert [p.name for p in config.policies] == ["httpbin"]
    assert_allowed(config, "GET", "/info/status", from_=SLEEP, claims=GOOGLE, by_policy="httpbin")
    assert_allowed(config, "POST", "/data", from_="cluster.local/ns/test/sa/anyone", claims=GOOGLE)
    assert_denied(config, "GET", "/info", from_=SLEEP)  # no token from Google
    assert_denied(config, "DELETE", "/data", from_=SLEEP, claims=GOOGLE)
    assert_denied(config, "POST", "/data", from_="cluster.local/ns/prod/sa/x", claims=GOOGLE)


def test_deny_post_from_dev() -> None:
    config = example("authz-deny-dev-post.yaml", namespace="foo", service="anything")

    assert_denied(config, "POST", "/", from_="cluster.local/ns/dev/sa/ci", by_policy="httpbin")
    assert_allowed(config, "GET", "/", from_="cluster.local/ns/dev/sa/ci")
    assert_allowed(config, "POST", "/", from_="cluster.local/ns/prod/sa/web")


def test_deny_post_on_port_8080() -> None:
    config = example("authz-deny-post-port.yaml", namespace="foo", service="anything")

    assert_denied(config, "POST", "/", port=8080, by_policy="httpbin", rule=0)
    assert_allowed(config, "POST", "/", port=9080)


def test_audit() -> None:
    config = example("authz-audit.yaml", namespace="ns1", service="myapi")

    decision = assert_allowed(config, "GET", "/user/profile/me")
    assert decision.audited == ("anyname",)
    assert assert_allowed(config, "GET", "/user/settings").audited == ()
    assert example("authz-audit.yaml", namespace="ns1", service="other").policies == ()


def test_allow_nothing_and_allow_all() -> None:
    nothing = example("authz-allow-nothing.yaml", namespace="foo", service="httpbin")
    everything = example("authz-allow-all.yaml", namespace="foo", service="httpbin")

    assert assert_denied(nothing, "GET", "/", from_=SLEEP).code == "no-allow-match"
    assert_allowed(everything, "DELETE", "/anything", by_policy="allow-all", rule=0)


def test_allow_nothing_for_one_workload() -> None:
    httpbin = example("authz-allow-nothing-selector.yaml", namespace="bar", service="httpbin")

    assert_denied(httpbin, "GET", "/", from_=SLEEP)
    assert_allowed(httpbin.for_service("sleep"), "GET", "/", from_=SLEEP)
    assert httpbin.for_service("httpbin", namespace="foo").policies == ()


def test_dry_run() -> None:
    config = example("authz-dry-run.yaml", service="httpbin")

    decision = assert_allowed(config, "GET", "/headers")
    assert [(m.policy, m.would_allow, m.rule) for m in decision.dry_run] == [
        ("dry-run-example", False, 0)
    ]
    assert decision.dry_run_allowed is False
    assert assert_allowed(config, "GET", "/get").dry_run_allowed is True


def test_request_authentication_with_a_policy_that_requires_a_token() -> None:
    config = example("request-authentication.yaml", namespace="foo", service="httpbin")

    (rule,) = config.jwt_rules
    assert (rule.issuer, rule.jwks_uri) == (
        "issuer-foo",
        "https://example.com/.well-known/jwks.json",
    )
    assert_denied(config, "GET", "/ip")
    assert_allowed(config, "GET", "/ip", request_principal="issuer-foo/alice")
    assert example("request-authentication.yaml", namespace="foo", service="x").jwt_rules == ()


def test_peer_authentication_examples() -> None:
    strict = example("peer-authentication-strict.yaml", namespace="foo", service="anything")
    finance = example("peer-authentication-finance.yaml", namespace="foo", service="finance")

    assert strict.mtls_mode is MtlsMode.STRICT
    assert finance.mtls_mode is MtlsMode.STRICT
    assert finance.for_service("ledger").mtls_mode is MtlsMode.PERMISSIVE
    assert strict.for_service("anything", namespace="bar").mtls_mode is None


def routes(*names: str) -> RouteTable:
    return example("destination-rule-all.yaml", *names, service="productpage").routes


def test_reviews_80_20() -> None:
    table = routes("virtual-service-reviews-80-20.yaml")

    def subset(draw: float) -> str | None:
        return table.select("reviews", "GET", "/", "", {}, Dice(draw)).subset

    assert [subset(d) for d in (0.0, 0.7999, 0.80, 0.9999)] == ["v1", "v1", "v2", "v2"]


def test_reviews_for_jason() -> None:
    table = routes("virtual-service-reviews-jason.yaml")
    dice = Dice(0.5)

    assert table.select("reviews", "GET", "/", "", {"end-user": "jason"}, dice).subset == "v2"
    assert table.select("reviews", "GET", "/", "", {"end-user": "maria"}, dice).subset == "v1"
    assert table.select("reviews", "GET", "/", "", {}, dice).subset == "v1"


@pytest.mark.parametrize(
    ("name", "decision"),
    [
        ("virtual-service-ratings-delay.yaml", FaultDecision(delay_s=7.0)),
        ("virtual-service-ratings-abort.yaml", FaultDecision(abort_status=500)),
    ],
    ids=["delay", "abort"],
)
def test_faults_for_jason(name: str, decision: FaultDecision) -> None:
    table = routes(name)
    dice = Dice(0.5)

    jason = table.select("ratings", "GET", "/ratings/0", "", {"end-user": "jason"}, dice)
    others = table.select("ratings", "GET", "/ratings/0", "", {}, dice)
    assert jason.subset == others.subset == "v1"
    assert jason.http_route.fault is not None
    assert jason.http_route.fault.decide(dice) == decision
    assert others.http_route.fault is None


def test_mirroring() -> None:
    config = example("mirroring.yaml", service="sleep")

    selection = config.routes.select("httpbin", "GET", "/headers", "", {}, Dice(0.5))
    assert selection.subset == "v1"
    assert selection.http_route.mirror is not None
    assert (selection.http_route.mirror.host, selection.http_route.mirror.subset) == (
        "httpbin",
        "v2",
    )
    assert selection.http_route.mirror_percentage == 100.0
    (rule,) = config.destination_rules
    assert rule.subset_names == frozenset({"v1", "v2"})


def test_bookinfo_destination_rules() -> None:
    config = example("destination-rule-all.yaml")

    assert {r.host: sorted(r.subset_names) for r in config.destination_rules} == {
        "productpage": ["v1"],
        "reviews": ["v1", "v2", "v3"],
        "ratings": ["v1", "v2", "v2-mysql", "v2-mysql-vm"],
        "details": ["v1", "v2"],
    }


def rule_of(name: str) -> DestinationRule:
    (rule,) = example(name).destination_rules
    return rule


def test_load_balancer_examples() -> None:
    subset_policy = rule_of("destination-rule-subset-policy.yaml")
    sticky = rule_of("destination-rule-sticky.yaml")

    assert subset_policy.policy_for().load_balancer is not None
    assert subset_policy.policy_for().load_balancer.simple == "LEAST_REQUEST"  # LEAST_CONN
    testversion = subset_policy.policy_for("testversion").load_balancer
    assert testversion is not None and testversion.simple == "ROUND_ROBIN"
    balancer = sticky.policy_for().load_balancer
    assert balancer is not None and balancer.consistent_hash is not None
    cookie = balancer.consistent_hash.http_cookie
    assert cookie is not None and (cookie.name, cookie.ttl) == ("user", 0.0)


def test_circuit_breaking_example() -> None:
    policy = rule_of("destination-rule-circuit-breaker.yaml").policy_for()

    pool = policy.connection_pool
    assert pool is not None
    assert (pool.max_connections, pool.max_pending_requests, pool.max_requests_per_connection) == (
        1,
        1,
        1,
    )
    outlier = policy.outlier_detection
    assert outlier is not None
    assert (
        outlier.consecutive_5xx_errors,
        outlier.interval,
        outlier.base_ejection_time,
        outlier.max_ejection_percent,
    ) == (1, 1.0, 180.0, 100)
