"""MeshMetrics, WorkloadInfo and the inbound recorder, without any shell."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import REGISTRY, CollectorRegistry, values
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from meshware.exceptions import ConfigurationError
from meshware.identity.identity import Identity
from meshware.identity.spiffe import SpiffeId
from meshware.inbound.record import RequestRecord
from meshware.telemetry.metrics import (
    ENVOY_DEFAULT_BUCKETS,
    ISTIO_BYTES_BUCKETS,
    ISTIO_DURATION_BUCKETS_MS,
    MeshMetrics,
    WorkloadInfo,
)

WORKLOAD = WorkloadInfo(service="orders")


def identity(path: str) -> Identity:
    return Identity(SpiffeId.parse(f"spiffe://cluster.local/{path}"), "tls")


def samples(metrics: MeshMetrics, name: str) -> list[Sample]:
    body, _ = metrics.exposition()
    return [
        sample
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if sample.name == name
    ]


def observe(metrics: MeshMetrics, **overrides: Any) -> None:
    arguments: dict[str, Any] = {
        "identity": None,
        "method": "GET",
        "route": None,
        "status": 200,
        "duration_s": 0.01,
        "request_bytes": 0,
        "response_bytes": 10,
    }
    arguments.update(overrides)
    metrics.inbound(WORKLOAD).observe(**arguments)


# -- WorkloadInfo -----------------------------------------------------------------------------


def test_workload_destination_labels() -> None:
    workload = WorkloadInfo(
        service="orders",
        namespace="shop",
        version="v3",
        cluster="east",
        trust_domain="example.org",
        workload="orders-v3",
        service_account="orders-sa",
    )

    assert workload.host == "orders.shop.svc.example.org"
    assert workload.spiffe_id == "spiffe://example.org/ns/shop/sa/orders-sa"
    assert workload.destination_labels() == (
        "orders-v3",
        "shop",
        "spiffe://example.org/ns/shop/sa/orders-sa",
        "orders",
        "v3",
        "orders.shop.svc.example.org",
        "orders",
        "v3",
        "orders",
        "shop",
        "east",
    )


def test_workload_defaults_are_istios_unknowns() -> None:
    assert WORKLOAD.destination_labels() == (
        "orders",
        "default",
        "spiffe://cluster.local/ns/default/sa/orders",
        "orders",
        "unknown",
        "orders.default.svc.cluster.local",
        "orders",
        "latest",
        "orders",
        "default",
        "unknown",
    )


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"service": ""}, "workload.service", "expected 1-253 characters from A-Z a-z 0-9 . _ -"),
        ({"service": "a b"}, "workload.service", "expected 1-253 characters"),
        ({"namespace": "x/y"}, "workload.namespace", "expected 1-253 characters"),
        ({"version": ""}, "workload.version", "expected 1-253 characters from A-Z a-z 0-9 . _ - (or None)"),
        ({"cluster": 3}, "workload.cluster", "expected 1-253 characters"),
        ({"trust_domain": "Cluster.Local"}, "workload.trust_domain", "expected a trust domain"),
    ],
)  # fmt: skip
def test_workload_validation(fields: dict[str, Any], field: str, message: str) -> None:
    arguments: dict[str, Any] = {"service": "orders", **fields}

    with pytest.raises(ConfigurationError) as caught:
        WorkloadInfo(**arguments)

    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: {message}")


@given(
    service=st.text(max_size=300),
    namespace=st.text(max_size=20),
    version=st.none() | st.text(max_size=20),
    trust_domain=st.text(max_size=20),
)
def test_workload_accepts_or_raises_configuration_error(
    service: str, namespace: str, version: str | None, trust_domain: str
) -> None:
    try:
        workload = WorkloadInfo(
            service=service, namespace=namespace, version=version, trust_domain=trust_domain
        )
    except ConfigurationError as exc:
        assert exc.field is not None and exc.field.startswith("workload.")
    else:
        assert all(label and " " not in label for label in workload.destination_labels())


# -- MeshMetrics construction -----------------------------------------------------------------


def test_buckets_are_envoys_defaults() -> None:
    assert ISTIO_DURATION_BUCKETS_MS == ISTIO_BYTES_BUCKETS == ENVOY_DEFAULT_BUCKETS
    assert ENVOY_DEFAULT_BUCKETS == (
        0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000,
        600000, 1800000, 3600000,
    )  # fmt: skip
    metrics = MeshMetrics()
    observe(metrics)

    for name in ("istio_request_duration_milliseconds", "istio_request_bytes"):
        bounds = [float(s.labels["le"]) for s in samples(metrics, f"{name}_bucket")]
        assert bounds == [*ENVOY_DEFAULT_BUCKETS, math.inf]


def test_each_instance_has_its_own_registry() -> None:
    first, second = MeshMetrics(), MeshMetrics()
    observe(first)

    assert first.registry is not second.registry
    assert len(samples(first, "istio_requests_total")) == 1
    assert samples(second, "istio_requests_total") == []


def test_same_registry_twice_is_a_configuration_error() -> None:
    registry = CollectorRegistry()
    MeshMetrics(registry=registry)

    with pytest.raises(ConfigurationError) as caught:
        MeshMetrics(registry=registry)

    assert caught.value.field == "registry"
    assert "create one MeshMetrics per process and share it" in str(caught.value)


def test_global_registry_option() -> None:
    metrics = MeshMetrics(use_global_registry=True)
    try:
        assert metrics.registry is REGISTRY
        observe(metrics)
        assert REGISTRY.get_sample_value("istio_requests_total", _labels_of(metrics)) == 1.0
    finally:
        for collector in list(REGISTRY._collector_to_names):
            if "istio_requests_total" in REGISTRY._collector_to_names[collector]:
                REGISTRY.unregister(collector)


def _labels_of(metrics: MeshMetrics) -> dict[str, str]:
    [sample] = samples(metrics, "istio_requests_total")
    return sample.labels


def test_no_created_series_are_exposed() -> None:
    metrics = MeshMetrics()
    observe(metrics)
    metrics.record_authz("allow", "p")

    body, _ = metrics.exposition()

    assert b"_created" not in body


@pytest.mark.parametrize(
    ("arguments", "field", "message"),
    [
        ({"naming": "prom"}, "naming", 'expected "istio" or "otel"'),
        ({"registry": {}}, "registry", "expected a prometheus_client.CollectorRegistry or None"),
        ({"max_label_values": 0}, "max_label_values", "expected a positive integer"),
        ({"max_label_values": True}, "max_label_values", "expected a positive integer"),
        ({"duration_buckets": []}, "duration_buckets", "expected a non-empty sequence"),
        ({"duration_buckets": [1, 1]}, "duration_buckets", "expected strictly increasing bounds"),
        ({"byte_buckets": [1, math.inf]}, "byte_buckets", "expected finite numbers, got inf"),
        ({"byte_buckets": "1,2"}, "byte_buckets", "expected a non-empty sequence"),
    ],
)
def test_construction_validation(arguments: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        MeshMetrics(**arguments)

    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: {message}")


def test_custom_buckets() -> None:
    metrics = MeshMetrics(duration_buckets=[1, 10], byte_buckets=[100])
    observe(metrics, duration_s=0.005, response_bytes=50)

    duration = {
        s.labels["le"]: s.value
        for s in samples(metrics, "istio_request_duration_milliseconds_bucket")
    }
    assert duration == {"1.0": 0.0, "10.0": 1.0, "+Inf": 1.0}
    response = {s.labels["le"]: s.value for s in samples(metrics, "istio_response_bytes_bucket")}
    assert response == {"100.0": 1.0, "+Inf": 1.0}


# -- the inbound recorder ---------------------------------------------------------------------


def test_source_labels_come_from_the_identity() -> None:
    metrics = MeshMetrics()
    observe(metrics, identity=identity("ns/payments/sa/ledger"), status=503)

    [sample] = samples(metrics, "istio_requests_total")
    source = {k: v for k, v in sample.labels.items() if k.startswith("source_")}
    assert source == {
        "source_workload": "ledger",
        "source_canonical_service": "ledger",
        "source_canonical_revision": "latest",
        "source_workload_namespace": "payments",
        "source_principal": "spiffe://cluster.local/ns/payments/sa/ledger",
        "source_app": "ledger",
        "source_version": "unknown",
        "source_cluster": "unknown",
    }
    assert sample.labels["response_code"] == "503"
    assert sample.labels["connection_security_policy"] == "mutual_tls"


def test_non_workload_identity_has_unknown_workload() -> None:
    metrics = MeshMetrics()
    observe(metrics, identity=identity("batch/job"))

    [sample] = samples(metrics, "istio_requests_total")
    assert sample.labels["source_workload"] == "unknown"
    assert sample.labels["source_workload_namespace"] == "unknown"
    assert sample.labels["source_principal"] == "spiffe://cluster.local/batch/job"


def test_label_children_are_resolved_once_per_tuple() -> None:
    metrics = MeshMetrics()
    recorder = metrics.inbound(WORKLOAD)
    caller = identity("ns/shop/sa/checkout")
    for _ in range(50):
        recorder.observe(
            identity=caller, method="GET", route=None, status=200, duration_s=0.001,
            request_bytes=1, response_bytes=1,
        )  # fmt: skip

    assert len(recorder._children) == 1
    [sample] = samples(metrics, "istio_requests_total")
    assert sample.value == 50.0
    assert metrics.inbound(WORKLOAD) is recorder


def test_principals_beyond_the_cap_fold_into_other() -> None:
    metrics = MeshMetrics(max_label_values=2)
    for name in ("a", "b", "c", "d"):
        observe(metrics, identity=identity(f"ns/shop/sa/{name}"))

    by_workload = {
        s.labels["source_workload"]: s.value for s in samples(metrics, "istio_requests_total")
    }
    assert by_workload == {"a": 1.0, "b": 1.0, "other": 2.0}


def test_otel_naming_labels() -> None:
    metrics = MeshMetrics(naming="otel")
    observe(metrics, method="PURGE", route="/r/{id}", status=502, scheme="https", http_version="2")
    observe(metrics, method="GET", route=None, status=200, error_type="TimeoutError")

    rows = sorted(
        tuple(sorted(s.labels.items()))
        for s in samples(metrics, "http_server_request_duration_seconds_count")
    )
    assert rows == [
        (
            ("error_type", "502"),
            ("http_request_method", "_OTHER"),
            ("http_response_status_code", "502"),
            ("http_route", "/r/{id}"),
            ("network_protocol_name", "http"),
            ("network_protocol_version", "2"),
            ("url_scheme", "https"),
        ),
        (
            ("error_type", "TimeoutError"),
            ("http_request_method", "GET"),
            ("http_response_status_code", "200"),
            ("http_route", "unknown"),
            ("network_protocol_name", "http"),
            ("network_protocol_version", "1.1"),
            ("url_scheme", "http"),
        ),
    ]
    assert [s.value for s in samples(metrics, "http_server_request_body_size_bytes_count")] == [
        1.0,
        1.0,
    ]


def test_otel_routes_beyond_the_cap_fold_into_other() -> None:
    metrics = MeshMetrics(naming="otel", max_label_values=3)
    for i in range(10):
        observe(metrics, route=f"/r{i}")

    routes = {
        s.labels["http_route"]: s.value
        for s in samples(metrics, "http_server_request_duration_seconds_count")
    }
    assert routes == {"/r0": 1.0, "/r1": 1.0, "/r2": 1.0, "other": 7.0}


# -- meshware counters ------------------------------------------------------------------------


def test_outcome_counters_from_a_record() -> None:
    metrics = MeshMetrics()
    record = RequestRecord(
        authz_decision="deny",
        authz_policy="deny-external",
        ratelimit="shadow-limited",
        identity_error="untrusted-xfcc",
    )

    metrics.record_outcomes(record)
    metrics.record_outcomes(RequestRecord(authz_decision="allow", ratelimit="backend-error"))

    authz = {
        (s.labels["decision"], s.labels["policy"], s.labels["dry_run"]): s.value
        for s in samples(metrics, "meshware_authz_decisions_total")
    }
    assert authz == {("deny", "deny-external", "false"): 1.0, ("allow", "none", "false"): 1.0}
    ratelimit = {
        (s.labels["rule"], s.labels["outcome"]): s.value
        for s in samples(metrics, "meshware_ratelimit_decisions_total")
    }
    assert ratelimit == {("unknown", "shadow_limited"): 1.0, ("unknown", "backend_error"): 1.0}
    [failure] = samples(metrics, "meshware_identity_failures_total")
    assert (failure.labels, failure.value) == ({"reason": "untrusted-xfcc"}, 1.0)


def test_outcome_counters_are_bounded() -> None:
    metrics = MeshMetrics(max_label_values=2)
    for i in range(5):
        metrics.record_authz("allow", f"policy-{i}")
        metrics.record_ratelimit(f"rule-{i}", "limited")
        metrics.record_identity_failure(f"reason-{i}")
    metrics.record_authz("maybe", None, dry_run=True)
    metrics.record_ratelimit("rule-0", "exploded")

    policies = {
        s.labels["policy"]: s.value for s in samples(metrics, "meshware_authz_decisions_total")
    }
    assert policies == {"policy-0": 1.0, "policy-1": 1.0, "other": 3.0, "none": 1.0}
    unknown = [
        s.labels for s in samples(metrics, "meshware_authz_decisions_total")
        if s.labels["decision"] == "unknown"
    ]  # fmt: skip
    assert unknown == [{"decision": "unknown", "policy": "none", "dry_run": "true"}]
    rules = {
        s.labels["rule"]: s.value for s in samples(metrics, "meshware_ratelimit_decisions_total")
    }
    assert rules == {"rule-0": 1.0, "rule-1": 1.0, "other": 3.0}
    reasons = {
        s.labels["reason"]: s.value for s in samples(metrics, "meshware_identity_failures_total")
    }
    assert reasons == {"reason-0": 1.0, "reason-1": 1.0, "other": 3.0}


# -- exposition -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "content_type"),
    [
        (None, "text/plain; version=0.0.4; charset=utf-8"),
        ("text/plain", "text/plain; version=0.0.4; charset=utf-8"),
        (
            "application/openmetrics-text; version=1.0.0",
            "application/openmetrics-text; version=1.0.0; charset=utf-8; escaping=underscores",
        ),
    ],
)
def test_exposition_content_type(accept: str | None, content_type: str) -> None:
    body, chosen = MeshMetrics().exposition(accept)

    assert chosen == content_type
    assert (
        b"# TYPE istio_requests_total counter" in body or b"# TYPE istio_requests counter" in body
    )


@given(st.text(max_size=200))
def test_exposition_accepts_any_accept_header(accept: str) -> None:
    body, content_type = MeshMetrics().exposition(accept)

    assert content_type.startswith(("text/plain", "application/openmetrics-text"))
    assert b"meshware_authz_decisions" in body


def test_multiprocess_exposition(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    # prometheus-client picks its value class when imported; switch it as a gunicorn worker
    # started with the variable set would have it.
    monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue(lambda: 4242))
    worker = MeshMetrics()
    observe(worker)
    observe(worker)

    scraper = MeshMetrics()  # another process's view: its own registry is empty
    body, _ = scraper.exposition()

    totals = [
        s
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
        if s.name == "istio_requests_total"
    ]
    assert [s.value for s in totals] == [2.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "counter_4242.db",
        "histogram_4242.db",
    ]


# -- the Grafana dashboard --------------------------------------------------------------------

DASHBOARD = Path(__file__).parents[2] / "docs" / "grafana" / "meshware-service-dashboard.json"


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", ())]


def test_dashboard_queries_name_exposed_metrics() -> None:
    metrics = MeshMetrics()
    observe(metrics, identity=identity("ns/shop/sa/web"))
    metrics.record_authz("allow", "p")
    metrics.record_ratelimit("r", "allowed")
    metrics.record_identity_failure("expired")
    body, _ = metrics.exposition()
    exposed = {s.name for f in text_string_to_metric_families(body.decode()) for s in f.samples}

    queries = dashboard_queries()
    referenced = {m for q in queries for m in re.findall(r"\b(?:istio|meshware)_[a-z_]+", q)}

    assert referenced == {
        "istio_requests_total",
        "istio_request_duration_milliseconds_bucket",
        "istio_request_bytes_bucket",
        "istio_response_bytes_bucket",
        "meshware_authz_decisions_total",
        "meshware_ratelimit_decisions_total",
        "meshware_identity_failures_total",
    }
    assert referenced <= exposed
    assert any("histogram_quantile(0.99" in q and "destination_service" in q for q in queries)
    assert any("histogram_quantile(0.5," in q and "source_workload" in q for q in queries)


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (scripts/system-deps.sh installs it)")
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {
                        "record": f"dashboard:query{i}",
                        "expr": q.replace("$__rate_interval", "5m")
                        .replace("$service", ".*")
                        .replace("$source", ".*"),
                    }
                    for i, q in enumerate(dashboard_queries())
                ],
            }
        ]
    }
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML

    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
    )

    assert result.returncode == 0, result.stdout + result.stderr
