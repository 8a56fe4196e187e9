"""The sample shop end to end: a shortened ``make demo`` and the numbers of its summary."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.servers import ROOT

pytestmark = pytest.mark.integration

SERVICES = ["catalog", "orders", "payments", "shipping", "users"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, Path]:
    work = tmp_path_factory.mktemp("shop")
    summary = work / "summary.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sample_services.shop",
            "--quick",
            "--summary-json",
            str(summary),
            "--run-dir",
            str(work / "run"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(summary.read_text()), result.stdout, work / "run"


def test_every_service_is_reached_over_its_edges(demo: tuple[dict[str, Any], str, Path]) -> None:
    summary, _, _ = demo
    assert summary["reached"] == SERVICES
    for edge in ("frontend->orders", "frontend->catalog", "orders->users", "orders->catalog"):
        assert summary["edges"][edge]["requests"] > 0, edge
    for edge in ("orders->shipping", "orders->payments"):
        assert summary["edges"][edge]["requests"] > 0, edge
    # Every order went through users, shipping and (at least once) payments.
    placed = summary["edge"]["orders"]["placed"]
    assert placed > 0
    assert summary["edges"]["orders->users"]["requests"] >= placed
    assert summary["edges"]["orders->payments"]["requests"] >= placed


def test_canary_split_is_90_10(demo: tuple[dict[str, Any], str, Path]) -> None:
    # Each weighted call is one independent draw with p(v2) = 0.10, so the observed share has
    # a standard deviation of sqrt(0.09 / n). With at least 500 calls that is at most 1.34
    # points; 5.5 points is more than 4 standard deviations (a false failure about once in
    # 30,000 runs) and still tells 90/10 from, say, 80/20 or 100/0.
    canary = summary_of(demo)["canary"]
    calls = canary["calls"]
    assert calls >= 500
    assert calls == canary["subsets"]["v1"] + canary["subsets"]["v2"]
    tolerance = max(0.055, 4 * math.sqrt(0.09 / calls))
    assert abs(canary["v2_share"] - 0.10) <= tolerance
    # The test user is routed by header, never by weight.
    assert set(canary["test_user"]) == {"v2"}
    assert canary["test_user"]["v2"] > 0
    # Both versions really served (as catalog's own metrics count them), and v2 got mirrors.
    assert summary_of(demo)["versions"]["catalog"]["v1"] > 0
    assert summary_of(demo)["versions"]["catalog"]["v2"] > 0
    assert summary_of(demo)["mirrored_to_v2"] > 0


def test_injected_failures_are_absorbed_by_retries(demo: tuple[dict[str, Any], str, Path]) -> None:
    summary = summary_of(demo)
    # payments answers 10 % of first charges with 503; orders retries them (Idempotency-Key).
    assert summary["edges"]["orders->payments"]["errors"] > 0
    assert summary["retries"]["payments"] >= summary["edges"]["orders->payments"]["errors"]
    assert summary["edge"]["orders_failed"] == 0, summary["edge"]["order_failures"]
    assert summary["services"]["orders"]["errors"] == 0


def test_shipping_cannot_charge_and_the_rule_is_named(
    demo: tuple[dict[str, Any], str, Path],
) -> None:
    summary, out, _ = demo
    charge = summary["misuse"]["shipping_charge"]
    assert charge["status"] == 403
    assert charge["policy"] == "charge-only-from-orders"
    assert charge["reason"] == 'denied by DENY policy "charge-only-from-orders" rule 0'
    assert summary["denials"]["charge-only-from-orders"] == {
        "count": 1,
        "reason": 'denied by DENY policy "charge-only-from-orders" rule 0',
    }
    assert summary["edges"]["shipping->payments"]["denied"] == 1
    assert (
        "shipping -> POST payments/api/charge: 403 policy=charge-only-from-orders "
        'reason=denied by DENY policy "charge-only-from-orders" rule 0'
    ) in out


def test_a_call_without_a_certificate_is_refused(demo: tuple[dict[str, Any], str, Path]) -> None:
    summary, out, _ = demo
    assert summary["misuse"]["no_certificate"]["refused"] is True
    assert "no certificate -> payments: refused (" in out


def test_admin_endpoint_needs_the_jwt(demo: tuple[dict[str, Any], str, Path]) -> None:
    summary = summary_of(demo)
    assert summary["misuse"]["admin_jwt"] == {
        "without_token": 403,
        "with_token": 200,
        "users": ["alice", "bob", "chen", "dana", "tester"],
    }
    assert summary["denials"]["admin-needs-jwt"]["count"] == 1


def test_the_crawler_is_rate_limited(demo: tuple[dict[str, Any], str, Path]) -> None:
    summary = summary_of(demo)
    limited = summary["rate_limited"]["browse-per-shopper"]
    assert limited > 0
    assert summary["services"]["catalog"]["rate_limited"] == limited
    assert summary["edge"]["catalog_reads"]["429"] <= limited  # mirrored copies count too


def test_everything_stopped(demo: tuple[dict[str, Any], str, Path]) -> None:
    _, out, run_dir = demo
    assert "stopped 7 processes: catalog-v1, catalog-v2, dashboard, orders, payments, " in out
    assert not (run_dir / "pids.json").exists()
    state = json.loads((run_dir / "state.json").read_text())
    ports = [i["port"] for i in state["instances"]] + [i["health_port"] for i in state["instances"]]
    for port in ports:  # freed: nothing listens there any more (TIME_WAIT aside)
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen()


def summary_of(demo: tuple[dict[str, Any], str, Path]) -> dict[str, Any]:
    return demo[0]
