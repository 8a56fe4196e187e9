"""Inbound series counted by meshware expose exactly what prometheus-client's would."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import values

from meshware.identity.identity import Identity
from meshware.identity.spiffe import SpiffeId
from meshware.telemetry.metrics import MeshMetrics, WorkloadInfo

WORKLOAD = WorkloadInfo(service="orders")
CALLERS = [None] + [
    Identity(SpiffeId.parse(f"spiffe://cluster.local/ns/shop/sa/s{i}"), "xfcc") for i in range(4)
]
amounts = st.floats(allow_nan=True, allow_infinity=True) | st.floats(0, 10) | st.integers(0, 10**8)
observations = st.tuples(
    st.sampled_from(range(len(CALLERS))),
    st.sampled_from([200, 404, 503, 0]),
    amounts,
    amounts,
    amounts,
    st.booleans(),
    st.sampled_from(["-", "RL", "DC"]),
)


def lines(metrics: MeshMetrics, accept: str | None = None) -> list[str]:
    return sorted(metrics.exposition(accept)[0].decode().splitlines())


def counted_by_prometheus(metrics: MeshMetrics) -> MeshMetrics:
    metrics.inbound(WORKLOAD)._tally = False
    metrics._counts = None
    return metrics


@settings(max_examples=150, deadline=None)
@given(st.lists(observations, max_size=25), st.integers(1, 3))
def test_the_exposition_is_the_same(seq: list[tuple[Any, ...]], cap: int) -> None:
    tallied = MeshMetrics(max_label_values=cap)
    reference = counted_by_prometheus(MeshMetrics(max_label_values=cap))
    assert tallied.inbound(WORKLOAD)._tally
    for metrics in (tallied, reference):
        inbound, outbound = metrics.inbound(WORKLOAD), metrics.outbound(WORKLOAD)
        for caller, status, duration, sent, received, grpc, flags in seq:
            inbound.observe(
                identity=CALLERS[caller],
                method="GET",
                route=None,
                status=status,
                duration_s=duration,
                request_bytes=sent,
                response_bytes=received,
                grpc=grpc,
                grpc_status="0" if grpc else None,
                response_flags=flags,
            )
            outbound.observe(
                destination="payments",
                host="payments",
                method="GET",
                status=status,
                duration_s=duration,
                request_bytes=sent,
                response_bytes=received,
            )
            metrics.record_authz("allow" if status == 200 else "deny", f"p{caller}")
            metrics.record_ratelimit(f"r{caller}", "limited" if flags == "RL" else "allowed")
            metrics.record_identity_failure(f"reason{caller}")

    assert lines(tallied) == lines(reference)
    openmetrics = "application/openmetrics-text"
    assert lines(tallied, openmetrics) == lines(reference, openmetrics)


def test_a_nan_is_summed_but_falls_in_no_bucket() -> None:
    metrics = MeshMetrics()
    metrics.inbound(WORKLOAD).observe(
        identity=None,
        method="GET",
        route=None,
        status=200,
        duration_s=math.nan,
        request_bytes=0,
        response_bytes=0,
    )

    exposed = lines(metrics)
    [count] = [x for x in exposed if x.startswith("istio_request_duration_milliseconds_count{")]
    [total] = [x for x in exposed if x.startswith("istio_request_duration_milliseconds_sum{")]
    assert count.endswith(" 0.0")
    assert total.endswith(" NaN")


def test_labels_folded_into_other_share_a_series() -> None:
    metrics = MeshMetrics(max_label_values=1)
    recorder = metrics.inbound(WORKLOAD)
    for caller in CALLERS[1:]:
        recorder.observe(
            identity=caller,
            method="GET",
            route=None,
            status=200,
            duration_s=0.001,
            request_bytes=1,
            response_bytes=1,
        )

    totals = [line for line in lines(metrics) if line.startswith("istio_requests_total{")]
    assert len(totals) == 2
    assert sum(float(line.rsplit(" ", 1)[1]) for line in totals) == 4.0
    assert len(recorder._tallies) == 2
    assert len(recorder._children) == 4


def test_with_shared_files_prometheus_client_counts(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(values, "ValueClass", values.MultiProcessValue(lambda: 7))
    metrics = MeshMetrics()

    assert metrics.inbound(WORKLOAD)._tally is False
    assert metrics._counts is None
