"""Per-kind parsing: every kind's fields, its refusals, metadata, selectors and targets."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from meshware.config import ConfigReport, LoadedResource, PeerMtls, Target, check_config
from meshware.outbound.destination import DestinationRule
from meshware.outbound.discovery import StaticRegistry
from meshware.outbound.endpoints import Endpoint
from meshware.outbound.routing import VirtualService
from meshware.policy.authz import AuthorizationPolicy, Authorizer
from meshware.policy.facts import RequestFacts
from meshware.policy.jwt import JwtRule
from meshware.policy.ratelimit import Rate, RateLimitMatch, RateLimitPolicy, RateLimitRule
from meshware.server.tls import MtlsMode
from meshware.testing import JwtIssuer


def check(text: str, **options: str) -> ConfigReport:
    return check_config(text=textwrap.dedent(text), name="mesh.yaml", **options)


def errors(report: ConfigReport) -> list[tuple[str | None, str]]:
    return [(p.field, p.message) for p in report.errors]


def warnings(report: ConfigReport) -> list[tuple[str | None, str]]:
    return [(p.field, p.message) for p in report.warnings]


def only(report: ConfigReport) -> LoadedResource:
    assert report.errors == ()
    assert len(report.resources) == 1
    return report.resources[0]


def policy(text: str) -> AuthorizationPolicy:
    value = only(check(text)).value
    assert isinstance(value, AuthorizationPolicy)
    return value


# -- AuthorizationPolicy -----------------------------------------------------------------------

ALLOW_ORDERS = """\
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata:
      name: allow-orders
    spec:
      selector:
        matchLabels:
          app: payments
      action: ALLOW
      rules:
      - from:
        - source:
            principals: ["cluster.local/ns/default/sa/orders"]
        to:
        - operation:
            methods: ["POST"]
            paths: ["/api/charge"]
        when:
        - key: request.headers[x-env]
          values: ["prod"]
    """


def test_authorization_policy_is_read_with_its_target() -> None:
    resource = only(check(ALLOW_ORDERS))

    assert (resource.kind, resource.api_version) == ("AuthorizationPolicy", "security.istio.io/v1")
    assert (resource.name, resource.namespace) == ("allow-orders", "default")
    assert resource.target == Target(frozenset({"payments"}), "selector")
    assert (resource.file, resource.document, resource.line, resource.rule_lines) == (
        "mesh.yaml",
        1,
        1,
        (11,),
    )
    value = resource.value
    assert isinstance(value, AuthorizationPolicy)
    assert (value.name, value.action, value.dry_run, len(value.rules)) == (
        "allow-orders",
        "ALLOW",
        False,
        1,
    )
    authz = Authorizer([value])
    orders = "cluster.local/ns/default/sa/orders"
    ok = RequestFacts(
        method="POST", path="/api/charge", headers={"x-env": "prod"}, source_principal=orders
    )
    assert authz.decide(ok).reason == 'allowed by ALLOW policy "allow-orders" rule 0'
    staging = RequestFacts(
        method="POST", path="/api/charge", headers={"x-env": "dev"}, source_principal=orders
    )
    assert authz.decide(staging).code == "no-allow-match"


def test_every_broken_rule_of_a_policy_is_reported() -> None:
    report = check(
        """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: broken}
        spec:
          action: CUSTOM
          rules:
          - from: [{source: {principals: ["spiffe://cluster.local/ns/a/sa/b"]}}]
          - to: [{operation: {methods: ["GET"]}}]
          - to: [{operation: {methodz: ["GET"]}}]
        """
    )

    assert errors(report) == [
        (
            "spec.action",
            "unsupported action CUSTOM: external authorization is not supported; expected one "
            "of ALLOW, DENY, AUDIT",
        ),
        (
            "spec.rules[0].from[0].source.principals[0]",
            "expected a principal without the spiffe:// scheme, like "
            "cluster.local/ns/default/sa/orders",
        ),
        (
            "spec.rules[2].to[0].operation.methodz",
            "unknown field; expected one of hosts, notHosts, ports, notPorts, methods, "
            "notMethods, paths, notPaths",
        ),
    ]
    assert [p.line for p in report.errors] == [5, 7, 9]
    assert report.resources == ()


def test_a_path_that_can_never_match_names_the_manifest_field() -> None:
    report = check(
        """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: slashes}
        spec:
          rules:
          - to:
            - operation:
                notPaths: ["/ok", "/a//b"]
        """
    )

    assert errors(report) == [
        (
            "spec.rules[0].to[0].operation.notPaths[1]",
            "path can never match in policy 'slashes': requests are matched on normalized paths "
            "and this one normalizes to '/a/b'",
        )
    ]
    assert report.errors[0].line == 8


@pytest.mark.parametrize(
    ("annotation", "dry_run"), [('"true"', True), ('"false"', False)], ids=["true", "false"]
)
def test_the_dry_run_annotation(annotation: str, dry_run: bool) -> None:
    value = policy(
        f"""\
        apiVersion: security.istio.io/v1beta1
        kind: AuthorizationPolicy
        metadata:
          name: trial
          annotations:
            "istio.io/dry-run": {annotation}
        spec:
          action: DENY
          rules: [{{to: [{{operation: {{paths: ["/headers"]}}}}]}}]
        """
    )

    assert value.dry_run is dry_run


@pytest.mark.parametrize(
    ("spec", "annotation", "field", "message"),
    [
        (
            "action: DENY",
            "yes",
            'metadata.annotations["istio.io/dry-run"]',
            'expected the string "true" or "false"',
        ),
        (
            "action: DENY",
            "true",
            'metadata.annotations["istio.io/dry-run"]',
            'expected the string "true" or "false"',
        ),
        (
            "action: AUDIT",
            '"true"',
            'metadata.annotations["istio.io/dry-run"]',
            "dry_run applies to ALLOW and DENY policies; an AUDIT policy never enforces",
        ),
    ],
    ids=["not-a-flag", "a-yaml-boolean", "audit"],
)
def test_bad_dry_run_annotations(spec: str, annotation: str, field: str, message: str) -> None:
    report = check(
        f"""\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata:
          name: trial
          annotations:
            istio.io/dry-run: {annotation}
        spec:
          {spec}
        """
    )

    assert errors(report) == [(field, message)]
    assert report.errors[0].line == 6


def test_dry_run_on_another_kind_is_refused_rather_than_enforced() -> None:
    report = check(
        """\
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata:
          name: default
          annotations: {"istio.io/dry-run": "true"}
        spec: {mtls: {mode: STRICT}}
        """
    )

    assert errors(report) == [
        (
            'metadata.annotations["istio.io/dry-run"]',
            "istio.io/dry-run applies to AuthorizationPolicy only; this PeerAuthentication "
            "would be enforced",
        )
    ]


def test_a_policy_of_another_namespace_is_named_with_it() -> None:
    report = check(
        """\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: deny-all, namespace: istio-system}
        spec: {action: DENY, rules: [{}]}
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: deny-all, namespace: shop}
        spec: {action: DENY, rules: [{}]}
        """,
        namespace="shop",
    )

    names = [r.value.name for r in report.resources if isinstance(r.value, AuthorizationPolicy)]
    assert names == ["istio-system/deny-all", "deny-all"]


# -- targets -----------------------------------------------------------------------------------


def target_of(spec: str, kind: str = "AuthorizationPolicy") -> ConfigReport:
    body = textwrap.indent(textwrap.dedent(spec), "  ")
    return check_config(
        text=f"apiVersion: security.istio.io/v1\nkind: {kind}\nmetadata:\n  name: p\n"
        f"  namespace: shop\nspec:\n{body}",
        name="mesh.yaml",
    )


@pytest.mark.parametrize(
    ("spec", "target"),
    [
        ("{}", Target()),
        ("selector: {}", Target()),
        ("selector: {matchLabels: {}}", Target()),
        ("selector: {matchLabels: {app: orders}}", Target(frozenset({"orders"}), "selector")),
        (
            "targetRef: {kind: Service, group: '', name: orders}",
            Target(frozenset({"orders"}), "targetRef"),
        ),
        (
            "targetRef: {kind: Service, name: orders, namespace: shop}",
            Target(frozenset({"orders"}), "targetRef"),
        ),
        (
            "targetRefs: [{kind: Service, name: orders}, {kind: Service, group: core, name: cart}]",
            Target(frozenset({"orders", "cart"}), "targetRefs"),
        ),
    ],
    ids=["none", "empty-selector", "empty-labels", "app", "target-ref", "same-ns", "target-refs"],
)
def test_targets(spec: str, target: Target) -> None:
    assert only(target_of(spec)).target == target


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        (
            "selector: {matchLabels: {app: orders, version: v1}}",
            "spec.selector.matchLabels.version",
            "unsupported label: meshware knows a workload by its service name, which is its app "
            "label; select with {app: <service>}",
        ),
        (
            "selector: {matchExpressions: []}",
            "spec.selector.matchExpressions",
            "unknown field; expected one of matchLabels",
        ),
        (
            "selector: {matchLabels: {app: ''}}",
            "spec.selector.matchLabels.app",
            "expected the service's name",
        ),
        (
            "selector: {matchLabels: {app: a}}\ntargetRef: {kind: Service, name: a}",
            "spec.targetRef",
            "set at most one of selector, targetRef and targetRefs",
        ),
        (
            "targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: gw}",
            "spec.targetRef.kind",
            "is not supported: meshware has no gateways; target a Service or use a selector",
        ),
        (
            "targetRef: {kind: ServiceEntry, name: x}",
            "spec.targetRef.kind",
            "expected a core Service reference (kind: Service)",
        ),
        (
            "targetRef: {kind: Service, name: orders, namespace: other}",
            "spec.targetRef.namespace",
            "expected the resource's own namespace (shop); a policy applies to services of its "
            "namespace only",
        ),
        ("targetRefs: []", "spec.targetRefs", "expected a non-empty list of target references"),
        ("selector: [app]", "spec.selector", "expected a mapping, got list"),
    ],
    ids=[
        "other-label",
        "match-expressions",
        "empty-app",
        "two-targets",
        "gateway",
        "other-kind",
        "other-namespace",
        "empty-refs",
        "not-a-mapping",
    ],
)
def test_bad_targets(spec: str, field: str, message: str) -> None:
    assert errors(target_of(spec)) == [(field, message)]


def test_peer_authentication_takes_no_target_reference() -> None:
    report = target_of("targetRef: {kind: Service, name: orders}", kind="PeerAuthentication")

    assert errors(report) == [("spec.targetRef", "unknown field; expected selector")]


# -- PeerAuthentication ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "mode"),
    [
        ("mtls: {mode: STRICT}", MtlsMode.STRICT),
        ("mtls: {mode: PERMISSIVE}", MtlsMode.PERMISSIVE),
        ("mtls: {mode: DISABLE}", MtlsMode.DISABLE),
        ("mtls: {mode: UNSET}", None),
        ("mtls: {}", None),
        ("{}", None),
    ],
    ids=["strict", "permissive", "disable", "unset", "no-mode", "no-mtls"],
)
def test_peer_authentication_modes(spec: str, mode: MtlsMode | None) -> None:
    assert only(target_of(spec, kind="PeerAuthentication")).value == PeerMtls(mode)


@pytest.mark.parametrize(
    ("spec", "field", "message", "value"),
    [
        (
            "mtls: {mode: strict}",
            "spec.mtls.mode",
            "expected one of STRICT, PERMISSIVE, DISABLE, UNSET",
            "strict",
        ),
        (
            "mtls: {mode: STRICT}\nportLevelMtls: {8080: {mode: DISABLE}}",
            "spec.portLevelMtls",
            "is not supported: a service has one mTLS mode for its port; per-port modes are not "
            "supported",
            {8080: {"mode": "DISABLE"}},
        ),
        ("mtls: STRICT", "spec.mtls", "expected a mapping, got str", "STRICT"),
        (
            "mtls: {mode: STRICT, level: 2}",
            "spec.mtls.level",
            "unknown field; expected one of mode",
            2,
        ),
    ],
    ids=["lower-case", "port-level", "not-a-mapping", "unknown-field"],
)
def test_bad_peer_authentication(spec: str, field: str, message: str, value: object) -> None:
    report = target_of(spec, kind="PeerAuthentication")

    assert errors(report) == [(field, message)]
    assert report.errors[0].value == value


# -- RequestAuthentication ---------------------------------------------------------------------


def test_request_authentication_rules() -> None:
    value = only(
        target_of(
            """\
            jwtRules:
            - issuer: https://accounts.example.com
              jwksUri: https://accounts.example.com/.well-known/jwks.json
              audiences: [shop]
              fromHeaders: [{name: x-jwt, prefix: "Bearer "}]
            - issuer: issuer-foo
              jwksUri: https://example.com/.well-known/jwks.json
            """,
            kind="RequestAuthentication",
        )
    ).value

    assert value == (
        JwtRule(
            issuer="https://accounts.example.com",
            jwks_uri="https://accounts.example.com/.well-known/jwks.json",
            audiences=("shop",),
            from_headers=(("x-jwt", "Bearer "),),
        ),
        JwtRule(issuer="issuer-foo", jwks_uri="https://example.com/.well-known/jwks.json"),
    )


def test_every_broken_jwt_rule_is_reported() -> None:
    report = target_of(
        """\
        jwtRules:
        - issuer: a
          jwksUri: ftp://example.com/keys
        - issuer: b
          jwks: '{"keys": [1]}'
        - issuer: c
          jwksUri: https://example.com/keys
        - issuer: c
          jwksUri: https://example.com/other
        - issuer: d
          jwksUri: https://example.com/keys
          outputClaimToHeaders: []
        """,
        kind="RequestAuthentication",
    )

    assert errors(report) == [
        ("spec.jwtRules[0].jwksUri", "expected an http:// or https:// URL with a host"),
        ("spec.jwtRules[1].jwks", "invalid JWKS: key #0: expected a JSON object, got int"),
        (
            "spec.jwtRules[3].issuer",
            "duplicate issuer (also spec.jwtRules[2]); each issuer needs exactly one rule",
        ),
        ("spec.jwtRules[4].outputClaimToHeaders", "is not supported by meshware"),
    ]


def test_a_relative_jwks_file_is_found_next_to_the_manifest(tmp_path: Path) -> None:
    keys = tmp_path / "keys" / "jwks.json"
    keys.parent.mkdir()
    keys.write_text(JwtIssuer("me").jwks)
    manifest = tmp_path / "auth.yaml"
    manifest.write_text(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: a}\n"
        "spec:\n  jwtRules:\n  - {issuer: me, jwksFile: keys/jwks.json}\n"
    )

    report = check_config(manifest)

    assert report.errors == ()
    (rule,) = report.resources[0].value  # type: ignore[misc]
    assert rule.jwks_file == str(keys)


def test_request_authentication_without_rules_warns() -> None:
    report = target_of("{}", kind="RequestAuthentication")

    assert report.resources[0].value == ()
    assert warnings(report) == [("spec", "has no jwtRules; the resource has no effect")]


# -- VirtualService ----------------------------------------------------------------------------


def vs(spec: str) -> ConfigReport:
    body = textwrap.indent(textwrap.dedent(spec), "  ")
    return check_config(
        text="apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: r\n"
        f"spec:\n{body}",
        name="mesh.yaml",
    )


def test_virtual_service_is_read_whole() -> None:
    resource = only(
        vs(
            """\
            hosts: [reviews]
            http:
            - match: [{headers: {end-user: {exact: jason}}}]
              route: [{destination: {host: reviews, subset: v2}}]
              timeout: 2s
            - route:
              - {destination: {host: reviews, subset: v1}, weight: 75}
              - {destination: {host: reviews, subset: v3}, weight: 25}
            """
        )
    )

    value = resource.value
    assert isinstance(value, VirtualService)
    assert (value.name, value.hosts, len(value.http), resource.target) == (
        "r",
        ("reviews",),
        2,
        None,
    )
    assert value.http[0].timeout == 2.0
    assert [(d.subset, d.weight) for d in value.http[1].route] == [("v1", 75), ("v3", 25)]


def test_every_broken_route_is_reported() -> None:
    report = vs(
        """\
        hosts: [reviews]
        gateways: [ingress]
        http:
        - route: [{destination: {host: reviews, subsett: v2}}]
        - route: [{destination: {host: reviews}}]
        - route: [{destination: {host: reviews}, weight: 60}, {destination: {host: x}, weight: 30}]
          corsPolicy: {}
        """
    )

    assert errors(report) == [
        (
            "spec.gateways",
            "is not supported: meshware routes a service's own outbound calls; there are no "
            "gateways",
        ),
        (
            "spec.http[0].route[0].destination.subsett",
            "unknown field; expected one of host, subset, port",
        ),
        ("spec.http[2].corsPolicy", "is not supported: CORS is the inbound side's business"),
    ]
    assert [p.line for p in report.errors] == [7, 9, 12]


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        (
            "hosts: [a]\nkind: VirtualService",
            ("spec.kind", "unknown field; expected one of hosts, http"),
        ),
        ("hosts: [a]\nhttp: {route: []}", ("spec.http", "expected a list of routes, got dict")),
        ("http: []", ("spec.hosts", "expected 'hosts', the hosts these routes apply to")),
    ],
    ids=["resource-key-in-spec", "http-not-a-list", "no-hosts"],
)
def test_bad_virtual_service_shapes(spec: str, problem: tuple[str, str]) -> None:
    assert errors(vs(spec)) == [problem]


def test_the_mesh_gateway_is_where_meshware_routes_anyway() -> None:
    report = vs("hosts: [reviews]\ngateways: [mesh]\nhttp: [{route: [{destination: {host: a}}]}]")

    assert isinstance(only(report).value, VirtualService)
    assert warnings(report) == [
        ("spec.gateways", "ignored: 'mesh' (the sidecars) is where meshware routes anyway")
    ]
    other = vs("hosts: [reviews]\ngateways: [mesh, ingress]")
    assert [field for field, _ in errors(other)] == ["spec.gateways"]


def test_a_virtual_service_without_routes_warns() -> None:
    report = vs("hosts: [reviews]")

    assert isinstance(report.resources[0].value, VirtualService)
    assert warnings(report) == [("spec", "has no http routes; the resource has no effect")]


# -- DestinationRule ---------------------------------------------------------------------------


def test_destination_rule_keeps_name_and_namespace() -> None:
    report = check(
        """\
        apiVersion: networking.istio.io/v1beta1
        kind: DestinationRule
        metadata: {name: reviews, namespace: shop}
        spec:
          host: reviews
          trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
          subsets:
          - {name: v1, labels: {version: v1}}
          - {name: v2, labels: {version: v2}, trafficPolicy: {loadBalancer: {simple: RANDOM}}}
        """
    )

    value = only(report).value
    assert isinstance(value, DestinationRule)
    assert (value.host, value.name, value.namespace) == ("reviews", "reviews", "shop")
    assert value.subset_names == frozenset({"v1", "v2"})
    assert value.policy_for("v2").load_balancer is not None
    assert value.policy_for("v2").load_balancer.simple == "RANDOM"


def test_every_broken_subset_is_reported() -> None:
    report = check(
        """\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: reviews}
        spec:
          host: reviews
          exportTo: ["."]
          subsets:
          - {name: v1, labels: {version: v1}}
          - {name: v2, lables: {version: v2}}
          - {name: v3, labels: {version: v3}, trafficPolicy: {tunnel: {}}}
        """
    )

    assert errors(report) == [
        (
            "spec.exportTo",
            "is not supported: visibility across namespaces has no meaning in process: a rule "
            "applies to the service that loads it",
        ),
        ("spec.subsets[1].lables", "unknown field; expected one of name, labels, trafficPolicy"),
        (
            "spec.subsets[2].trafficPolicy.tunnel",
            "is not supported: meshware does not tunnel calls over CONNECT",
        ),
    ]


def test_every_broken_traffic_policy_block_is_reported() -> None:
    report = check(
        """\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: a}
        spec:
          host: a
          trafficPolicy:
            outlierDetection: {consecutiveErrors: 5}
            loadBalancer: {simple: PASSTHROUGH}
          subsets:
          - name: v1
            labels: {version: v1}
            trafficPolicy:
              tls: {mode: MUTUAL, caCertificates: /etc/ca.pem}
              connectionPool: {tcp: {tcpKeepalive: {}}}
          - name: v2
            trafficPolicy: []
        """
    )

    assert [(p.line, p.field) for p in report.errors] == [
        (7, "spec.trafficPolicy.outlierDetection.consecutiveErrors"),
        (8, "spec.trafficPolicy.loadBalancer.simple"),
        (13, "spec.subsets[0].trafficPolicy.tls.caCertificates"),
        (14, "spec.subsets[0].trafficPolicy.connectionPool.tcp.tcpKeepalive"),
        (16, "spec.subsets[1].trafficPolicy"),
    ]
    assert report.errors[-1].message == "expected a mapping, got list"


# -- ServiceRegistry ---------------------------------------------------------------------------


def test_service_registry() -> None:
    report = check(
        """\
        apiVersion: meshware.dev/v1alpha1
        kind: ServiceRegistry
        metadata: {name: endpoints}
        spec:
          services:
            payments:
              endpoints:
              - {address: 10.0.0.5, port: 8443, labels: {version: v2}}
              - 10.0.0.6:8443
        """
    )

    value = only(report).value
    assert isinstance(value, StaticRegistry)
    assert value.resolve("payments") == (
        Endpoint("10.0.0.5", 8443, labels={"version": "v2"}),
        Endpoint("10.0.0.6", 8443),
    )


def test_every_broken_registry_service_is_reported() -> None:
    report = check(
        """\
        apiVersion: meshware.dev/v1alpha1
        kind: ServiceRegistry
        metadata: {name: endpoints}
        spec:
          selector: {}
          services:
            payments: {endpoints: [{address: 10.0.0.5, port: 99999}]}
            ledger: {endpoints: ["10.0.0.7"]}
        """
    )

    assert [field for field, _ in errors(report)] == [
        "spec.selector",
        "spec.services.payments.endpoints[0].port",
        "spec.services.ledger.endpoints[0]",
    ]
    assert errors(report)[0] == ("spec.selector", "unknown field; expected one of services")


# -- RateLimit ---------------------------------------------------------------------------------


def test_rate_limit() -> None:
    report = check(
        """\
        apiVersion: meshware.dev/v1alpha1
        kind: RateLimit
        metadata: {name: payments-limits, namespace: shop}
        spec:
          selector: {matchLabels: {app: payments}}
          backend: redis://redis:6379/0
          failureMode: closed
          headers: ietf+legacy
          keyPrefix: "shop:"
          rules:
          - name: per-caller
            rate: 100/second burst 20
          - name: charges
            rate: 5/minute
            key: [principal, "header:x-api-key"]
            match: {methods: [POST], pathPrefixes: [/api/charge], routes: ["/api/{id}"]}
            shadow: true
        """,
        namespace="shop",
    )

    resource = only(report)
    assert resource.target == Target(frozenset({"payments"}), "selector")
    assert resource.value == RateLimitPolicy(
        rules=(
            RateLimitRule(name="per-caller", rate="100/second burst 20"),
            RateLimitRule(
                name="charges",
                rate=Rate(count=5, period_seconds=60.0),
                key=("principal", "header:x-api-key"),
                match=RateLimitMatch(
                    methods=("POST",), path_prefixes=("/api/charge",), routes=("/api/{id}",)
                ),
                shadow=True,
            ),
        ),
        backend="redis://redis:6379/0",
        failure_mode="closed",
        headers="ietf+legacy",
        key_prefix="shop:",
    )


def test_every_broken_rate_limit_field_is_reported() -> None:
    report = check(
        """\
        apiVersion: meshware.dev/v1alpha1
        kind: RateLimit
        metadata: {name: limits}
        spec:
          failureMode: sometimes
          rules:
          - rate: 5/minute
          - name: fast
            rate: 5 per minute
          - name: paths
            rate: 1/s
            match: {pathPrefixes: [api], hosts: [x]}
          - name: keyed
            rate: 1/s
            key: {header: x}
            shadow: "yes"
        """
    )

    assert errors(report) == [
        ("spec.rules[0].name", "is required"),
        (
            "spec.rules[1].rate",
            "invalid rate '5 per minute': expected '<count>/[<n>]<unit>[ burst <b>]' such as "
            "'100/second burst 20', '5/minute' or '2/5s', with unit second|s|minute|m|min|hour|h"
            "|day|d",
        ),
        (
            "spec.rules[2].match.hosts",
            "unknown field; expected one of methods, pathPrefixes, routes",
        ),
        (
            "spec.rules[3].key",
            "expected a key kind ('principal', 'header:x-api-key', ...) or a list of them",
        ),
        ("spec.rules[3].shadow", "expected true or false"),
    ]


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        (
            "match: {pathPrefixes: [api]}",
            (
                "spec.rules[0].match.pathPrefixes",
                "expected a path starting with '/' (printable, no spaces)",
            ),
        ),
        (
            "key: [principal, nobody]",
            (
                "spec.rules[0].key",
                "unknown key kind 'nobody'; expected 'principal', 'request_principal', "
                "'client_ip', 'route', 'header:<name>' or a callable",
            ),
        ),
    ],
    ids=["path-prefix", "key-kind"],
)
def test_rate_limit_core_errors_name_manifest_fields(extra: str, problem: tuple[str, str]) -> None:
    report = check(
        f"""\
        apiVersion: meshware.dev/v1alpha1
        kind: RateLimit
        metadata: {{name: limits}}
        spec:
          rules:
          - name: r
            rate: 1/s
            {extra}
        """
    )

    assert errors(report) == [problem]


def test_rate_limit_policy_errors_name_manifest_fields() -> None:
    report = check(
        """\
        apiVersion: meshware.dev/v1alpha1
        kind: RateLimit
        metadata: {name: limits}
        spec:
          failureMode: sometimes
          rules:
          - {name: a, rate: 1/s}
          - {name: a, rate: 2/s}
        """
    )

    # The rules are fine on their own; the policy refuses the pair (the first error found).
    assert errors(report) == [
        (
            "spec.rules[1].name",
            "expected unique rule names; rules with one name would share buckets",
        )
    ]


# -- metadata and the document as a whole -----------------------------------------------------


def test_harmless_fields_are_allowed_explicitly_with_a_warning_each() -> None:
    report = check(
        """\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata:
          name: reviews
          labels: {team: shop}
          annotations:
            kubectl.kubernetes.io/last-applied-configuration: "{}"
          uid: 7c6d
          resourceVersion: "42"
          creationTimestamp: "2024-01-01T00:00:00Z"
        spec: {host: reviews}
        status: {}
        """
    )

    assert report.errors == ()
    assert warnings(report) == [
        ("metadata.labels", "ignored: labels select nothing in meshware"),
        (
            'metadata.annotations["kubectl.kubernetes.io/last-applied-configuration"]',
            "ignored: meshware reads no annotation but istio.io/dry-run",
        ),
        ("metadata.uid", "ignored: written by the Kubernetes API server"),
        ("metadata.resourceVersion", "ignored: written by the Kubernetes API server"),
        ("metadata.creationTimestamp", "ignored: written by the Kubernetes API server"),
        ("status", "ignored: status is written by the cluster"),
    ]
    assert [p.line for p in report.warnings] == [5, 7, 8, 9, 10, 12]
    assert all(p.severity == "warning" for p in report.warnings)


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        (
            "kind: DestinationRule\napiVersion: networking.istio.io/v1\nspec: {host: a}",
            ("metadata", "is required; expected a mapping with at least 'name'"),
        ),
        (
            "kind: DestinationRule\napiVersion: networking.istio.io/v1\nmetadata: {}\n"
            "spec: {host: a}",
            ("metadata.name", "is required"),
        ),
        (
            "kind: DestinationRule\napiVersion: networking.istio.io/v1\nmetadata: {name: Reviews}"
            "\nspec: {host: a}",
            (
                "metadata.name",
                "expected a Kubernetes name: lower-case letters, digits, '-' and '.', starting "
                "and ending with a letter or digit",
            ),
        ),
        (
            "kind: DestinationRule\napiVersion: networking.istio.io/v1\n"
            "metadata: {name: a, namespace: my.ns}\nspec: {host: a}",
            (
                "metadata.namespace",
                "expected a Kubernetes namespace name: lower-case letters, digits and '-'",
            ),
        ),
        (
            "kind: DestinationRule\napiVersion: networking.istio.io/v1\n"
            "metadata: {name: a, owner: me}\nspec: {host: a}",
            (
                "metadata.owner",
                "unknown field; expected one of name, namespace, labels, annotations",
            ),
        ),
        (
            "kind: DestinationRule\napiVersion: networking.istio.io/v1\nmetadata: {name: a}\n"
            "spec: {host: a}\nspecs: {}",
            ("specs", "unknown field; expected one of apiVersion, kind, metadata, spec"),
        ),
        (
            "kind: DestinationRule\napiVersion: networking.istio.io/v1\nmetadata: {name: a}\n"
            "spec: [host]",
            ("spec", "expected a mapping, got list"),
        ),
        (
            "kind: DestinationRule\napiVersion: networking.istio.io/v1alpha1\nmetadata: {name: a}"
            "\nspec: {host: a}",
            (
                "apiVersion",
                "unsupported apiVersion for DestinationRule; expected one of "
                "networking.istio.io/v1, networking.istio.io/v1beta1, networking.istio.io/v1alpha3",
            ),
        ),
        (
            "kind: AuthorizationPolicy\napiVersion: networking.istio.io/v1\nmetadata: {name: a}",
            (
                "apiVersion",
                "unsupported apiVersion for AuthorizationPolicy; expected one of "
                "security.istio.io/v1, security.istio.io/v1beta1",
            ),
        ),
        (
            "apiVersion: networking.istio.io/v1\nmetadata: {name: a}",
            ("kind", "is required; expected the resource's kind, like AuthorizationPolicy"),
        ),
        (
            "kind: Deployment\napiVersion: apps/v1\nmetadata: {name: a}",
            (
                "kind",
                "unknown kind; expected one of AuthorizationPolicy, PeerAuthentication, "
                "RequestAuthentication, VirtualService, DestinationRule, ServiceRegistry, RateLimit",
            ),
        ),
        (
            "kind: ServiceEntry\napiVersion: networking.istio.io/v1\nmetadata: {name: a}",
            (
                "kind",
                "unsupported kind ServiceEntry: list external endpoints in a "
                "meshware.dev/v1alpha1 ServiceRegistry",
            ),
        ),
        (
            "- kind: DestinationRule",
            (
                None,
                "expected a resource (a mapping with apiVersion, kind, metadata and spec), got "
                "list",
            ),
        ),
    ],
    ids=[
        "no-metadata",
        "no-name",
        "bad-name",
        "bad-namespace",
        "unknown-metadata",
        "unknown-top-level",
        "spec-not-a-mapping",
        "other-api-version",
        "other-group",
        "no-kind",
        "not-a-mesh-kind",
        "unsupported-kind",
        "not-a-mapping",
    ],
)
def test_document_problems(document: str, problem: tuple[str | None, str]) -> None:
    report = check_config(text=document, name="mesh.yaml")

    assert errors(report) == [problem]
    assert report.resources == ()


def test_the_resource_is_named_in_problems_even_for_an_unknown_kind() -> None:
    report = check_config(
        text="apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {name: ingress}\n",
        name="mesh.yaml",
    )

    assert [str(p) for p in report.errors] == [
        "mesh.yaml: document 1 (Gateway ingress), line 2: kind: unsupported kind Gateway: "
        "meshware has no gateways; it runs inside each service (value: 'Gateway')"
    ]
