"""Loading: files, documents, line numbers, problems across documents, and MeshConfig."""

from __future__ import annotations

import logging
import os
import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from meshware.config import (
    ConfigProblem,
    ConfigSource,
    MeshConfig,
    MeshConfigError,
    check_config,
    load_config,
)
from meshware.config.loader import _Locator
from meshware.exceptions import ConfigurationError
from meshware.inbound.stack import InboundConfig
from meshware.outbound.client import OutboundConfig
from meshware.outbound.endpoints import Endpoint
from meshware.policy.ratelimit import RateLimitPolicy
from meshware.server.tls import MtlsMode
from meshware.testing import default_ca


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


def ap(
    name: str, *, namespace: str | None = None, app: str | None = None, rules: str = "[{}]"
) -> str:
    ns = f", namespace: {namespace}" if namespace else ""
    selector = f"\n  selector: {{matchLabels: {{app: {app}}}}}" if app else ""
    return (
        f"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        f"metadata: {{name: {name}{ns}}}\nspec:{selector}\n  rules: {rules}\n"
    )


def pa(name: str, mode: str, *, namespace: str | None = None, app: str | None = None) -> str:
    ns = f", namespace: {namespace}" if namespace else ""
    selector = f"\n  selector: {{matchLabels: {{app: {app}}}}}" if app else ""
    return (
        f"apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        f"metadata: {{name: {name}{ns}}}\nspec:{selector}\n  mtls: {{mode: {mode}}}\n"
    )


def join(*documents: str) -> str:
    return "---\n".join(documents)


VS_TYPO = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts: [reviews]
  http:
  - route:
    - destination:
        host: reviews
        subsett: v2
"""


# -- files and documents -----------------------------------------------------------------------


def test_every_error_of_every_file_is_reported_with_file_document_line_field_and_value(
    tmp_path: Path,
) -> None:
    mesh = write(tmp_path, "mesh.yaml", join(ap("ok"), ap("ok-too"), VS_TYPO))
    other = write(tmp_path, "other.yaml", pa("default", "strict"))

    report = check_config([mesh, other])

    assert [str(p) for p in report.errors] == [
        f"{mesh}: document 3 (VirtualService reviews), line 23: "
        "spec.http[0].route[0].destination.subsett: unknown field; expected one of host, "
        "subset, port (value: 'v2')",
        f"{other}: document 1 (PeerAuthentication default), line 5: spec.mtls.mode: expected one "
        "of STRICT, PERMISSIVE, DISABLE, UNSET (value: 'strict')",
    ]
    assert report.documents == 4
    assert [r.name for r in report.resources] == ["ok", "ok-too"]


def test_file_names_are_shown_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "mesh.yaml", VS_TYPO)
    monkeypatch.chdir(tmp_path)

    report = check_config("mesh.yaml")

    assert report.errors[0].location == "mesh.yaml: document 1 (VirtualService reviews), line 11"


def test_load_config_raises_every_problem_at_once() -> None:
    with pytest.raises(MeshConfigError) as caught:
        load_config(text=join(VS_TYPO, pa("a", "STRICTLY")), name="mesh.yaml")

    error = caught.value
    assert len(error.problems) == 2
    assert str(error) == (
        "2 errors in the mesh configuration:\n"
        "  mesh.yaml: document 1 (VirtualService reviews), line 11: "
        "spec.http[0].route[0].destination.subsett: unknown field; expected one of host, subset, "
        "port (value: 'v2')\n"
        "  mesh.yaml: document 2 (PeerAuthentication a), line 17: spec.mtls.mode: expected one of "
        "STRICT, PERMISSIVE, DISABLE, UNSET (value: 'STRICTLY')"
    )
    assert (error.field, error.value) == ("spec.http[0].route[0].destination.subsett", "v2")
    assert isinstance(error, ConfigurationError)


def test_a_single_problem_is_the_whole_message() -> None:
    with pytest.raises(MeshConfigError) as caught:
        load_config(text=pa("a", "OFF"), name="pa.yaml")

    # YAML 1.1 reads an unquoted OFF as false; the value shown is what the file says to YAML.
    assert str(caught.value) == (
        "pa.yaml: document 1 (PeerAuthentication a), line 5: spec.mtls.mode: expected one of "
        "STRICT, PERMISSIVE, DISABLE, UNSET (value: False)"
    )


def test_invalid_yaml_stops_the_file_but_earlier_documents_count(tmp_path: Path) -> None:
    path = write(tmp_path, "mesh.yaml", join(pa("a", "STRICTER"), "kind: [unclosed\n"))

    report = check_config(path)

    assert [(p.document, p.line, p.field) for p in report.errors] == [
        (1, 5, "spec.mtls.mode"),
        (2, 8, None),
    ]
    assert report.errors[1].message.startswith("invalid YAML: ")
    assert report.documents == 1


def test_duplicate_keys_are_errors_not_last_one_wins() -> None:
    report = check_config(
        text="apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        "metadata: {name: a}\nspec:\n  action: ALLOW\n  action: DENY\n",
        name="mesh.yaml",
    )

    assert [str(p) for p in report.errors] == [
        "mesh.yaml: document 1, line 6: spec.action: duplicate key; YAML keeps only the last value"
    ]


def test_empty_documents_are_skipped_and_not_counted() -> None:
    report = check_config(text="---\n---\n" + pa("a", "STRICT") + "---\n---\n", name="m.yaml")

    assert (report.documents, report.errors, len(report.resources)) == (1, (), 1)
    assert report.resources[0].document == 2


def test_unreadable_inputs(tmp_path: Path) -> None:
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe")
    (tmp_path / "empty").mkdir()

    report = check_config([tmp_path / "missing.yaml", tmp_path / "binary.yaml", tmp_path / "empty"])

    assert [str(p) for p in report.errors] == [
        f"{tmp_path / 'missing.yaml'}: cannot read: No such file or directory",
        f"{tmp_path / 'binary.yaml'}: not UTF-8 text: invalid start byte",
        f"{tmp_path / 'empty'}: no .yaml or .yml files in this directory",
    ]


def test_a_directory_is_read_in_name_order(tmp_path: Path) -> None:
    write(tmp_path, "b.yml", ap("second"))
    write(tmp_path, "a.yaml", ap("first"))
    write(tmp_path, "notes.txt", "not yaml: [")

    report = check_config(tmp_path)

    assert [(r.name, r.file) for r in report.resources] == [
        ("first", os.path.join(str(tmp_path), "a.yaml")),
        ("second", os.path.join(str(tmp_path), "b.yml")),
    ]


def test_a_kubectl_list_counts_each_item() -> None:
    text = textwrap.dedent(
        """\
        apiVersion: v1
        kind: List
        metadata: {resourceVersion: ""}
        items:
        - apiVersion: security.istio.io/v1
          kind: PeerAuthentication
          metadata: {name: default}
          spec: {mtls: {mode: STRICT}}
        - apiVersion: security.istio.io/v1
          kind: PeerAuthentication
          metadata: {name: other}
          spec: {mtls: {mode: SOMETIMES}}
        """
    )

    report = check_config(text=text, name="list.yaml")

    assert report.documents == 2
    assert [(r.name, r.item, r.line, r.where) for r in report.resources] == [
        ("default", 0, 5, "list.yaml: document 1, items[0]")
    ]
    assert [str(p) for p in report.errors] == [
        "list.yaml: document 1 (PeerAuthentication other), line 12: items[1].spec.mtls.mode: "
        "expected one of STRICT, PERMISSIVE, DISABLE, UNSET (value: 'SOMETIMES')"
    ]
    assert [str(p) for p in report.warnings] == [
        "list.yaml: document 1 (List), line 3: metadata: ignored: list metadata carries nothing "
        "meshware reads"
    ]


def test_check_config_needs_something_to_read() -> None:
    with pytest.raises(ConfigurationError, match="give files"):
        check_config()
    with pytest.raises(ConfigurationError) as caught:
        check_config([Path("a.yaml"), 3])  # type: ignore[list-item]
    assert str(caught.value) == "sources: expected a file or directory path"
    with pytest.raises(ConfigurationError, match="sources: expected a file, a directory"):
        check_config(3)  # type: ignore[arg-type]


# -- problems between documents ----------------------------------------------------------------


def test_names_are_unique_per_kind_and_namespace() -> None:
    report = check_config(
        text=join(ap("a"), ap("a", namespace="other"), pa("a", "STRICT"), ap("a")), name="m.yaml"
    )

    assert [str(p) for p in report.errors] == [
        "m.yaml: document 4 (AuthorizationPolicy a), line 21: metadata.name: another "
        "AuthorizationPolicy of this name in namespace default is in m.yaml: document 1; names "
        "are unique per kind and namespace (value: 'a')"
    ]
    assert [(r.kind, r.namespace) for r in report.resources] == [
        ("AuthorizationPolicy", "default"),
        ("AuthorizationPolicy", "other"),
        ("PeerAuthentication", "default"),
    ]


def vs(name: str, *hosts: str) -> str:
    return (
        f"apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}}}\n"
        f"spec:\n  hosts: [{', '.join(hosts)}]\n  http:\n  - route: [{{destination: {{host: x}}}}]\n"
    )


def dr(name: str, host: str, *subsets: str) -> str:
    items = ", ".join(f"{{name: {s}, labels: {{version: {s}}}}}" for s in subsets)
    return (
        f"apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}}}\n"
        f"spec:\n  host: {host}\n  subsets: [{items}]\n"
    )


def test_a_host_is_routed_and_ruled_by_one_resource_each() -> None:
    report = check_config(
        text=join(vs("a", "reviews"), vs("b", "ratings", "reviews"), dr("c", "x"), dr("d", "x")),
        name="m.yaml",
    )

    assert [str(p) for p in report.errors] == [
        "m.yaml: document 2 (VirtualService b), line 13: spec.hosts[1]: this host is routed by "
        "VirtualService a too (m.yaml: document 1); merge their routes into one (value: 'reviews')",
        "m.yaml: document 4 (DestinationRule d), line 28: spec.host: DestinationRule c (m.yaml: "
        "document 3) has this host too; one rule per host (value: 'x')",
    ]


def test_a_service_is_listed_by_one_registry() -> None:
    registry = (
        "apiVersion: meshware.dev/v1alpha1\nkind: ServiceRegistry\nmetadata: {{name: {}}}\n"
        "spec:\n  services:\n    payments: {{endpoints: ['{}:8443']}}\n"
    )
    report = check_config(
        text=join(registry.format("a", "10.0.0.1"), registry.format("b", "10.0.0.2")), name="m.yaml"
    )

    assert [str(p) for p in report.errors] == [
        "m.yaml: document 2 (ServiceRegistry b), line 13: spec.services.payments: ServiceRegistry a "
        "(m.yaml: document 1) lists this service too; list each service once (value: 'payments')"
    ]


@pytest.mark.parametrize(
    ("documents", "scope"),
    [
        ((pa("a", "STRICT"), pa("b", "PERMISSIVE")), "namespace default"),
        ((pa("a", "STRICT", app="orders"), pa("b", "DISABLE", app="orders")), "service orders"),
        (
            (
                pa("a", "STRICT", app="orders", namespace="istio-system"),
                pa("b", "DISABLE", app="orders"),
            ),
            "service orders",
        ),
    ],
    ids=["namespace-wide", "same-service", "root-and-namespace-selector"],
)
def test_two_peer_authentications_at_one_level_conflict(
    documents: tuple[str, str], scope: str
) -> None:
    report = check_config(text=join(*documents), name="m.yaml")

    assert [(p.field, p.message) for p in report.errors] == [
        (
            "metadata.name",
            f"PeerAuthentication a (m.yaml: document 1) applies to {scope} at the same level; "
            "which one wins would be arbitrary, so keep one",
        )
    ]


def test_peer_authentications_at_different_levels_do_not_conflict() -> None:
    report = check_config(
        text=join(
            pa("mesh", "STRICT", namespace="istio-system"),
            pa("ns", "PERMISSIVE"),
            pa("orders", "DISABLE", app="orders"),
            pa("cart", "DISABLE", app="cart"),
            pa("elsewhere", "DISABLE", namespace="shop"),
        ),
        name="m.yaml",
    )

    assert report.errors == ()


def ra(name: str, issuer: str, *, app: str | None = None, namespace: str | None = None) -> str:
    ns = f", namespace: {namespace}" if namespace else ""
    selector = f"\n  selector: {{matchLabels: {{app: {app}}}}}" if app else ""
    return (
        f"apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n"
        f"metadata: {{name: {name}{ns}}}\nspec:{selector}\n  jwtRules:\n"
        f"  - {{issuer: {issuer}, jwksUri: 'https://keys.example.com/{name}'}}\n"
    )


def test_one_issuer_per_workload_across_request_authentications() -> None:
    report = check_config(
        text=join(
            ra("a", "https://issuer", app="orders"),
            ra("b", "https://issuer", app="cart"),
            ra("c", "https://issuer", namespace="shop"),
            ra("d", "https://issuer"),
        ),
        name="m.yaml",
    )

    assert [str(p) for p in report.errors] == [
        "m.yaml: document 4 (RequestAuthentication d), line 29: spec.jwtRules[0].issuer: "
        "RequestAuthentication a (m.yaml: document 1) accepts this issuer for the same workloads; "
        "each issuer needs exactly one rule (value: 'https://issuer')"
    ]


def test_routes_to_unknown_subsets_are_warned_about() -> None:
    route = (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\n"
        "spec:\n  hosts: [reviews]\n  http:\n  - route:\n"
        "    - {destination: {host: reviews, subset: v1}, weight: 50}\n"
        "    - {destination: {host: reviews, subset: v9}, weight: 50}\n"
        "    mirror: {host: ratings, subset: v2}\n"
    )

    report = check_config(text=join(route, dr("reviews", "reviews", "v1", "v2")), name="m.yaml")

    assert report.errors == ()
    assert [str(p) for p in report.warnings] == [
        "m.yaml: document 1 (VirtualService r), line 9: spec.http[0].route[1].destination.subset: "
        "DestinationRule reviews for reviews has no such subset (subsets: v1, v2); calls routed "
        "here will fail (value: 'v9')",
        "m.yaml: document 1 (VirtualService r), line 10: spec.http[0].mirror.subset: no "
        "DestinationRule defines the subsets of ratings; calls routed here will fail (value: 'v2')",
    ]


# -- MeshConfig --------------------------------------------------------------------------------

SHOP = join(
    ap("mesh-deny", namespace="istio-system", rules='[{to: [{operation: {paths: ["/admin"]}}]}]'),
    ap("ns-allow"),
    ap("orders-allow", app="orders"),
    ap("cart-allow", app="cart"),
    ap("shop-allow", namespace="shop"),
    pa("mesh", "STRICT", namespace="istio-system"),
    pa("ns", "UNSET"),
    pa("cart", "DISABLE", app="cart"),
    ra("ns-jwt", "https://ns"),
    ra("orders-jwt", "https://orders", app="orders"),
)


def test_for_service_selects_what_applies() -> None:
    config = load_config(text=SHOP, service="orders")

    assert [p.name for p in config.policies] == [
        "istio-system/mesh-deny",
        "ns-allow",
        "orders-allow",
    ]
    assert [r.issuer for r in config.jwt_rules] == ["https://ns", "https://orders"]
    assert config.mtls_mode is MtlsMode.STRICT  # UNSET in the namespace inherits the mesh's
    assert len(config.resources) == 10

    cart = config.for_service("cart")
    assert [p.name for p in cart.policies] == ["istio-system/mesh-deny", "ns-allow", "cart-allow"]
    assert [r.issuer for r in cart.jwt_rules] == ["https://ns"]
    assert cart.mtls_mode is MtlsMode.DISABLE
    assert cart.resources is config.resources

    shop = config.for_service("orders", namespace="shop")
    assert [p.name for p in shop.policies] == ["istio-system/mesh-deny", "shop/shop-allow"]
    assert shop.mtls_mode is MtlsMode.STRICT


def test_without_a_service_only_namespace_wide_resources_apply() -> None:
    config = load_config(text=SHOP)

    assert config.service is None
    assert [p.name for p in config.policies] == ["istio-system/mesh-deny", "ns-allow"]
    assert [r.issuer for r in config.jwt_rules] == ["https://ns"]


def test_no_peer_authentication_leaves_the_mode_unset() -> None:
    assert load_config(text=ap("a"), service="orders").mtls_mode is None
    assert load_config(text=pa("a", "UNSET"), service="orders").mtls_mode is None


def limit(name: str, rule: str, *, app: str | None = None, namespace: str | None = None) -> str:
    ns = f", namespace: {namespace}" if namespace else ""
    selector = f"\n  selector: {{matchLabels: {{app: {app}}}}}" if app else ""
    return (
        f"apiVersion: meshware.dev/v1alpha1\nkind: RateLimit\nmetadata: {{name: {name}{ns}}}\n"
        f"spec:{selector}\n  rules: [{{name: {rule}, rate: 1/s}}]\n"
    )


def test_the_most_specific_rate_limit_applies() -> None:
    text = join(
        limit("mesh", "mesh-rule", namespace="istio-system"),
        limit("ns", "ns-rule"),
        limit("orders", "orders-rule", app="orders"),
    )

    def rule_of(config: MeshConfig) -> str:
        assert isinstance(config.rate_limit, RateLimitPolicy)
        return config.rate_limit.rules[0].name

    config = load_config(text=text, service="orders")
    assert rule_of(config) == "orders-rule"
    assert rule_of(config.for_service("cart")) == "ns-rule"
    assert rule_of(config.for_service("cart", namespace="shop")) == "mesh-rule"
    assert load_config(text=ap("a"), service="orders").rate_limit is None


def test_registries_merge_and_everything_outbound_is_kept() -> None:
    registry = (
        "apiVersion: meshware.dev/v1alpha1\nkind: ServiceRegistry\nmetadata: {{name: {}}}\n"
        "spec:\n  services:\n    {}: {{endpoints: ['{}:8443']}}\n"
    )
    config = load_config(
        text=join(
            registry.format("a", "payments", "10.0.0.1"),
            registry.format("b", "ledger", "10.0.0.2"),
            vs("reviews", "reviews"),
            dr("reviews", "reviews", "v1"),
        ),
        service="orders",
    )

    assert config.registry is not None
    assert config.registry.services == frozenset({"payments", "ledger"})
    assert config.registry.resolve("ledger") == (Endpoint("10.0.0.2", 8443),)
    assert [v.name for v in config.routes.virtual_services] == ["reviews"]
    assert [r.host for r in config.destination_rules] == ["reviews"]


def test_inbound_config() -> None:
    config = load_config(text=SHOP, service="orders")

    inbound = config.inbound_config(metrics=None)

    assert isinstance(inbound, InboundConfig)
    assert (inbound.service, inbound.namespace, inbound.require_identity) == (
        "orders",
        "default",
        False,
    )
    assert inbound.policies == config.policies
    assert inbound.jwt_rules == config.jwt_rules
    assert inbound.layers() == ("telemetry", "health", "deadline", "jwt", "authz")


def test_strict_mtls_requires_an_identity_when_identities_are_verified() -> None:
    config = load_config(text=SHOP, service="orders")
    bundle = default_ca().bundle_path

    assert config.inbound_config(bundle=bundle, metrics=None).require_identity is True
    assert (
        config.inbound_config(bundle=bundle, metrics=None, require_identity=False).require_identity
        is False
    )
    cart = config.inbound_config(service="cart", bundle=bundle, metrics=None)
    assert (cart.service, cart.require_identity) == ("cart", False)  # DISABLE for cart
    assert [p.name for p in cart.policies] == ["istio-system/mesh-deny", "ns-allow", "cart-allow"]


def test_a_view_without_a_service_cannot_configure_one() -> None:
    config = load_config(text=SHOP)

    with pytest.raises(ConfigurationError) as caught:
        config.inbound_config()
    assert str(caught.value) == (
        "service: no service: load with service=..., call for_service(name), or pass service="
    )
    assert config.inbound_config(service="orders", metrics=None).service == "orders"


def test_outbound_config() -> None:
    config = load_config(
        text=join(vs("reviews", "reviews"), dr("reviews", "reviews", "v1")), service="orders"
    )

    outbound = config.outbound_config(timeout=3.0)

    assert isinstance(outbound, OutboundConfig)
    assert (outbound.service, outbound.timeout, outbound.routes) == ("orders", 3.0, config.routes)
    assert tuple(outbound.destinations) == config.destination_rules
    assert outbound.resolver is None  # no ServiceRegistry: the client's default resolver
    bare = load_config(text=ap("a"), service="orders").outbound_config()
    assert (bare.routes, tuple(bare.destinations)) == (None, ())


def test_warnings_are_logged_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    text = pa("a", "STRICT").replace("metadata: {name: a}", "metadata: {name: a, labels: {x: y}}")

    with caplog.at_level(logging.WARNING, logger="meshware.config"):
        config = load_config(text=text, name="m.yaml")

    expected = (
        "m.yaml: document 1 (PeerAuthentication a), line 3: metadata.labels: ignored: labels "
        "select nothing in meshware"
    )
    assert [str(w) for w in config.warnings] == [expected]
    assert [r.getMessage() for r in caplog.records] == [expected]


def test_the_source_tells_whether_files_changed(tmp_path: Path) -> None:
    path = write(tmp_path, "mesh.yaml", ap("a"))
    first = load_config(path).source
    second = load_config(path).source

    assert first.digest == second.digest
    assert [(f.path, f.size, f.absolute) for f in first.files] == [
        (str(path), len(ap("a")), str(path.resolve()))
    ]
    assert first.changed() is False

    path.write_text(ap("b") + "# longer\n")
    assert first.changed() is True
    assert load_config(path).source.digest != first.digest
    path.unlink()
    assert first.changed() is True
    assert load_config(text=ap("a")).source.changed() is False


def test_meshconfig_validates_its_fields() -> None:
    with pytest.raises(ConfigurationError) as caught:
        MeshConfig(policies=["not a policy"])  # type: ignore[list-item]
    assert str(caught.value) == "policies[0]: expected AuthorizationPolicy, got str"
    with pytest.raises(ConfigurationError, match="mtls_mode: expected an MtlsMode, got str"):
        MeshConfig(mtls_mode="STRICT")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="namespace: expected a namespace name"):
        MeshConfig(namespace="")
    assert MeshConfig().source == ConfigSource()


def test_for_service_refuses_two_resources_at_one_level_built_by_hand() -> None:
    report = check_config(text=join(pa("a", "STRICT", app="orders"), pa("b", "STRICT", app="cart")))
    a, b = report.resources
    clash = type(b)(**{**{f: getattr(b, f) for f in b.__dataclass_fields__}, "target": a.target})

    with pytest.raises(MeshConfigError, match="two PeerAuthentications apply to orders"):
        MeshConfig(resources=(a, clash)).for_service("orders")


def test_problem_text_without_a_file() -> None:
    problem = ConfigProblem(message="broken", field="spec.x", value={"a": 1}, line=3)

    assert str(problem) == "line 3: spec.x: broken (value: {'a': 1})"
    assert str(ConfigProblem(message="broken")) == "broken"
    long = ConfigProblem(message="m", value="x" * 200)
    assert str(long) == "m (value: '" + "x" * 76 + "...)"


# -- properties --------------------------------------------------------------------------------

yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
KINDS = [
    ("security.istio.io/v1", "AuthorizationPolicy"),
    ("security.istio.io/v1", "PeerAuthentication"),
    ("security.istio.io/v1", "RequestAuthentication"),
    ("networking.istio.io/v1", "VirtualService"),
    ("networking.istio.io/v1", "DestinationRule"),
    ("meshware.dev/v1alpha1", "ServiceRegistry"),
    ("meshware.dev/v1alpha1", "RateLimit"),
]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_any_text_gives_a_report_never_an_exception(text: str) -> None:
    report = check_config(text=text)

    assert all(isinstance(p, ConfigProblem) for p in report.errors + report.warnings)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(KINDS), yaml_values, yaml_values)
def test_any_spec_of_any_kind_gives_a_report_never_an_exception(
    kind: tuple[str, str], metadata: object, spec: object
) -> None:
    document = {"apiVersion": kind[0], "kind": kind[1], "metadata": metadata, "spec": spec}

    report = check_config(text=yaml.safe_dump(document))

    assert report.documents == 1
    assert len(report.resources) + bool(report.errors) >= 1


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(KINDS),
    st.dictionaries(
        st.sampled_from(
            [
                "rules",
                "selector",
                "mtls",
                "jwtRules",
                "hosts",
                "http",
                "host",
                "subsets",
                "services",
                "targetRef",
                "backend",
                "portLevelMtls",
            ]
        ),
        yaml_values,
        max_size=4,
    ),
)
def test_known_fields_with_any_values_give_a_report(
    kind: tuple[str, str], spec: dict[str, object]
) -> None:
    document = {"apiVersion": kind[0], "kind": kind[1], "metadata": {"name": "x"}, "spec": spec}

    report = check_config(text=yaml.safe_dump(document))

    assert all(p.line is not None for p in report.errors)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_the_locator_answers_any_path(path: str) -> None:
    node = yaml.compose("a:\n  b: [1, {c: 2}]\n'x.y': 3\n")
    line = _Locator(node)(path)

    assert line is not None and 1 <= line <= 3


def test_the_locator_points_at_keys_items_and_quoted_keys() -> None:
    node = yaml.compose("a:\n  b:\n  - 1\n  - c: 2\nannotations:\n  istio.io/dry-run: 'x'\n")
    locate = _Locator(node)

    assert [
        locate(p)
        for p in ["", "a", "a.b", "a.b[1]", "a.b[1].c", "a.b[7]", 'annotations["istio.io/dry-run"]']
    ] == [1, 1, 2, 4, 4, 3, 6]


def test_a_recursive_alias_is_an_error_not_a_crash() -> None:
    text = (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: a}\n"
        "spec: &x {hosts: [a], http: [*x]}\n"
    )

    report = check_config(text=join(text, ap("fine")), name="m.yaml")

    assert [str(p) for p in report.errors] == [
        "m.yaml: document 1, line 4: spec.http[0]: a YAML alias refers to a node that contains "
        "it; the document would be infinitely deep"
    ]
    assert (report.documents, [r.name for r in report.resources]) == (2, ["fine"])


def test_a_shared_alias_is_checked_once() -> None:
    report = check_config(text="a: &x [1, {b: 2, b: 3}]\nc: [*x, *x]\n", name="m.yaml")

    duplicates = [p.field for p in report.errors if p.message.startswith("duplicate key")]
    assert duplicates == ["a[1].b"]


def test_the_configuration_page_example_prints_what_the_page_says(
    capsys: pytest.CaptureFixture[str],
) -> None:
    page = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    code = page.split("```python\n", 1)[1].split("```", 1)[0]
    printed = page.split("It prints:\n\n```text\n", 1)[1].split("```", 1)[0]

    exec(compile(code, "configuration.md", "exec"), {})

    assert capsys.readouterr().out == printed


def test_a_policy_for_the_service_in_another_namespace_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    text = join(ap("orders-only", namespace="shop", app="orders"), ap("mine", app="orders"))

    with caplog.at_level(logging.WARNING, logger="meshware.config"):
        config = load_config(text=text, service="orders", name="m.yaml")

    expected = (
        "m.yaml: document 1 (AuthorizationPolicy orders-only), line 1: metadata.namespace: "
        "selects service orders, but is in namespace shop and the service in default, so it "
        "does not apply (is the namespace right?) (value: 'shop')"
    )
    assert [p.name for p in config.policies] == ["mine"]
    assert [str(w) for w in config.scope_warnings] == [expected]
    assert [r.getMessage() for r in caplog.records] == [expected]
    assert config.warnings == ()
    shop = config.for_service("orders", namespace="shop")
    assert [(w.resource, w.value) for w in shop.scope_warnings] == [
        ("AuthorizationPolicy mine", "default")
    ]
    assert config.for_service("cart").scope_warnings == ()
