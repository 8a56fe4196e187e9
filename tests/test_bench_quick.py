"""The benchmark harness (``make bench-quick``): every benchmark runs end to end and reports
well-formed figures. Nothing here asserts on speed: the figures only have to exist, be
consistent and be positive."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

import bench.inbound_apps as apps
from bench import sidecar
from bench.haproxy import ProxySettings, combined_pem, haproxy_binary, inbound_config
from bench.plots import parse_markdown_tables
from bench.resources import CpuMeter, cpu_ms_per_1000, cpu_seconds, rss_bytes
from meshware.exceptions import ConfigurationError
from tests.servers import ROOT

SETUPS = ("plain", "meshware", "haproxy", "peer")
BENCH_MODULES = (
    "matplotlib",
    "tenacity",
    "purgatory",
    "slowapi",
    "prometheus_fastapi_instrumentator",
    "opentelemetry.instrumentation.httpx",
)


def _missing() -> list[str]:
    missing = [] if shutil.which("wrk") else ["wrk"]
    if haproxy_binary() is None:
        missing.append("haproxy")
    for module in BENCH_MODULES:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            missing.append(module)
    return missing


# --- the quick run, end to end -------------------------------------------------------------


@pytest.fixture(scope="module")
def quick(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any], Path, str]:
    missing = _missing()
    if missing:
        pytest.skip(f"benchmark tools not installed (make bench-quick installs them): {missing}")
    out = tmp_path_factory.mktemp("bench")
    doc = ROOT / "docs" / "benchmarks.md"
    before = hashlib.sha256(doc.read_bytes()).hexdigest()
    cmd = [sys.executable, "-m", "bench.run_all", "--quick", "--no-write"]
    cmd += ["--json", str(out / "results.json"), "--img-dir", str(out / "img")]
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,  # a hang guard, not a speed requirement
        check=False,
    )
    assert (out / "results.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    return proc, results, out, before


@pytest.mark.integration
def test_quick_run_succeeds_without_errors(quick: Any) -> None:
    proc, results, _, _ = quick
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert results["errors"] == []
    assert "ERROR" not in proc.stderr
    for run in results["benchmarks"]:
        assert run["name"] in ("inbound_stack", "outbound_client")
        assert run["status"] in ("ok", "absent"), run["output"][-2000:]
        if run["status"] == "ok":
            assert run["command"][2] == f"bench.{run['name']}"
            assert "--write" not in run["command"]  # --no-write reaches the benchmarks
            assert "|" in run["output"]  # it printed its table


@pytest.mark.integration
def test_quick_run_measures_every_setup(quick: Any) -> None:
    _, results, _, _ = quick
    data = results["sidecar"]
    assert tuple(data["setups"]) == SETUPS
    rate, seconds = data["options"]["rate"], data["options"]["seconds"]
    for setup in SETUPS:
        measured = data["setups"][setup]
        (fixed,) = measured["fixed_rate"]
        assert fixed["requests"] == round(rate * seconds)
        assert fixed["errors"] == 0, fixed["failures"]
        assert 0 < fixed["p50_ms"] <= fixed["p90_ms"] <= fixed["p99_ms"] <= fixed["max_ms"]
        assert fixed["achieved_rate"] > 0
        qs = [q for q, _ in fixed["percentiles_ms"]]
        values = [ms for _, ms in fixed["percentiles_ms"]]
        assert qs == list(sidecar.PERCENTILES)
        assert values == sorted(values)
        roles = {"A", "B"} | ({"A's sidecar", "B's sidecar"} if setup == "haproxy" else set())
        assert set(fixed["cpu_ms_per_1000"]) == roles
        assert all(v > 0 for v in fixed["cpu_ms_per_1000"].values())
        assert set(measured["rss_mb"]) == roles
        assert all(v > 1 for v in measured["rss_mb"].values())
        (closed,) = measured["closed_loop"]
        assert closed["rps"] > 0
        assert closed["errors"] == 0
        assert 0 < closed["p50_ms"] <= closed["p99_ms"]


@pytest.mark.integration
def test_quick_run_checks_what_each_setup_enforces(quick: Any) -> None:
    _, results, _, _ = quick
    setups = results["sidecar"]["setups"]
    assert setups["plain"]["checks"] == {}
    everything = {
        "no_cert_refused": True,
        "other_identity_refused": True,
        "caller_allowed": True,
        "server_metrics": True,
        "client_metrics": True,
        "access_log": True,
    }
    assert setups["meshware"]["checks"] == everything
    assert setups["haproxy"]["checks"] == everything
    # uvicorn's mTLS verifies the chain only, and no setup turns uvicorn's access log on.
    assert setups["peer"]["checks"] == {
        **everything,
        "other_identity_refused": False,
        "access_log": False,
    }


@pytest.mark.integration
def test_quick_run_summary_and_report(quick: Any) -> None:
    _, results, _, _ = quick
    data = results["sidecar"]
    summary = data["summary"]
    assert summary["plain"]["added_p50_ms"] == [0.0, 0.0, 0.0]
    assert summary["plain"]["added_cpu_total"] == 0.0
    for setup in SETUPS:
        row = summary[setup]
        fixed = data["setups"][setup]["fixed_rate"][0]
        assert row["p50_ms"][0] == fixed["p50_ms"]
        assert row["added_p50_ms"][0] == pytest.approx(
            fixed["p50_ms"] - data["setups"]["plain"]["fixed_rate"][0]["p50_ms"]
        )
        assert row["max_rps"][0] == data["setups"][setup]["closed_loop"][0]["rps"]
    targets = summary["targets"]
    assert set(targets) == {
        "latency_ratio_p50",
        "latency_ratio_p99",
        "latency_met",
        "memory_added_mb",
        "memory_met",
    }
    assert targets["memory_added_mb"] == {
        "A": pytest.approx(
            data["setups"]["meshware"]["rss_mb"]["A"] - data["setups"]["plain"]["rss_mb"]["A"]
        ),
        "B": pytest.approx(
            data["setups"]["meshware"]["rss_mb"]["B"] - data["setups"]["plain"]["rss_mb"]["B"]
        ),
    }
    assert targets["memory_met"] == all(v <= 15.0 for v in targets["memory_added_mb"].values())
    sections = sidecar.render(data)
    assert set(sections) == {"sidecar", "sidecar-profile"}
    text = sections["sidecar"]
    assert text.startswith(f"Run of **{data['date']}**. Machine: {data['machine']}")
    for description in sidecar.SETUPS.values():
        rows = [line for line in text.splitlines() if line.startswith(f"| {description} |")]
        assert len(rows) == 4  # latency, throughput, CPU, memory
    assert "meshware's added memory per service ≤ 15 MB" in text


@pytest.mark.integration
def test_quick_run_draws_the_plots_and_leaves_docs_alone(quick: Any) -> None:
    _, results, out, before = quick
    names = {Path(p).name for paths in results["plots"].values() for p in paths}
    assert {
        "sidecar-latency.png",
        "sidecar-distribution.png",
        "sidecar-throughput.png",
        "sidecar-cpu.png",
        "sidecar-memory.png",
    } <= names
    for paths in results["plots"].values():
        for path in paths:
            assert Path(path).parent == out / "img"
            assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = ROOT / "docs" / "benchmarks.md"
    assert hashlib.sha256(doc.read_bytes()).hexdigest() == before


@pytest.mark.integration
def test_quick_run_renders_the_summary_section(quick: Any) -> None:
    from bench import run_all

    _, results, _, _ = quick
    runs = [run_all.BenchmarkRun(**run) for run in results["benchmarks"]]
    data = {**results["sidecar"], "elapsed_s": 30.0}
    plots = {name: [Path(p) for p in paths] for name, paths in results["plots"].items()}
    text = run_all.render_summary(
        runs, data, plots, command="make bench", started="2026-01-01 00:00 UTC", load=(0.5, 2.25)
    )
    lines = text.splitlines()
    assert lines[0].startswith("Last full run: **2026-01-01 00:00 UTC**, `make bench`. Machine: ")
    assert lines[2].startswith("Load average (1 minute) of the machine: 0.50 at the start, 2.25")
    assert "| Service to service (sidecar) | ok | 30 s |" in lines
    mesh = data["summary"]["meshware"]
    assert any(
        line.startswith(f"- **meshware on both sides**: {mesh['added_p50_ms'][0]:+.2f} ms p50")
        for line in lines
    )
    for run in runs:
        if run.status == "ok":
            image = f"{run.name.replace('_', '-')}.png"
            assert any(line.startswith("![") and line.endswith(f"{image})") for line in lines)


# --- the pieces, without servers ------------------------------------------------------------


def test_cpu_and_memory_of_this_process() -> None:
    import os

    pid = os.getpid()
    meter = CpuMeter({"me": pid})
    sum(i * i for i in range(200_000))  # some CPU work; its amount is not asserted
    used = meter.stop()
    assert set(used) == {"me"}
    assert used["me"] >= 0.0
    assert cpu_seconds(pid) > 0
    assert rss_bytes(pid) > 1 << 20
    assert cpu_ms_per_1000(0.35, 1000) == pytest.approx(350.0)
    assert cpu_ms_per_1000(1.0, 2000) == pytest.approx(500.0)
    with pytest.raises(ValueError, match="expected a positive number of requests, got 0"):
        cpu_ms_per_1000(1.0, 0)


def test_a_process_that_is_gone() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    with pytest.raises(ProcessLookupError):
        cpu_seconds(proc.pid)
    with pytest.raises(ProcessLookupError):
        rss_bytes(proc.pid)


def test_percentiles_are_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert sidecar._percentile(values, 50) == 50.0
    assert sidecar._percentile(values, 99) == 99.0
    assert sidecar._percentile(values, 99.9) == 100.0
    assert sidecar._percentile(values, 100) == 100.0
    assert sidecar._percentile([7.0], 50) == 7.0
    assert math.isnan(sidecar._percentile([], 50))


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"rounds": 0}, "rounds", "rounds: expected at least 1"),
        ({"rate": 0.0}, "rate", "rate: expected a positive number"),
        (
            {"wrk_seconds": 0.5},
            "wrk_seconds",
            "wrk_seconds: expected at least 1 (wrk runs whole seconds)",
        ),
        (
            {"setups": ("plain", "envoy")},
            "setups",
            "setups: expected setups from plain, meshware, haproxy, peer",
        ),
    ],
)
def test_options_are_validated(overrides: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        sidecar.Options(**overrides)
    assert info.value.field == field
    assert str(info.value) == message


def test_inbound_sidecar_config(tmp_path: Path) -> None:
    from meshware.identity.ca import LocalCA

    ca = LocalCA.init(tmp_path / "certs")
    pem = combined_pem(ca.issue("catalog"), tmp_path / "haproxy")
    assert pem == tmp_path / "haproxy" / "catalog.pem"
    assert pem.stat().st_mode & 0o777 == 0o600
    text = pem.read_text()
    assert text.index("BEGIN CERTIFICATE") < text.index("BEGIN PRIVATE KEY")
    config = inbound_config(
        listen_port=8443,
        app_port=8080,
        server_pem=pem,
        ca_file=tmp_path / "certs" / "bundle.pem",
        allowed_callers=["orders", "users"],
        stats_port=9100,
    )
    assert (
        f"    bind 127.0.0.1:8443 ssl crt {pem} ca-file {tmp_path / 'certs' / 'bundle.pem'} "
        "verify required alpn http/1.1"
    ) in config.splitlines()
    assert "    acl allowed_caller ssl_c_s_dn(CN) -m str orders users" in config.splitlines()
    assert "    http-request deny deny_status 403 unless allowed_caller" in config.splitlines()
    assert "    server app-1 127.0.0.1:8080" in config.splitlines()
    assert "    http-request use-service prometheus-exporter if { path /metrics }" in config
    binary = haproxy_binary()
    if binary is not None:
        (tmp_path / "inbound.cfg").write_text(config)
        check = subprocess.run(
            [binary, "-c", "-q", "-f", str(tmp_path / "inbound.cfg")], check=False
        )
        assert check.returncode == 0


def test_sidecar_settings_are_validated() -> None:
    with pytest.raises(ConfigurationError) as info:
        ProxySettings(threads=0)
    assert (info.value.field, str(info.value)) == ("threads", "threads: expected at least 1")
    with pytest.raises(ConfigurationError) as info:
        inbound_config(
            listen_port=1,
            app_port=2,
            server_pem=Path("x.pem"),
            ca_file=Path("ca.pem"),
            allowed_callers=[],
            stats_port=3,
        )
    assert info.value.field == "allowed_callers"


RAW_PROFILE = """\
run (uvicorn/server.py:60);_run (asyncio/base_events.py:1922);handle (/srv/meshware/inbound/asgi/authz.py:80) 30
run (uvicorn/server.py:60);_run (asyncio/base_events.py:1922);read (/usr/lib/python3.11/ssl.py:920) 50
run (uvicorn/server.py:60);select (/usr/lib/python3.11/selectors.py:468) 20
"""


def test_profile_summary() -> None:
    summary = sidecar.summarize_profile(RAW_PROFILE)
    assert summary["samples"] == 100
    assert summary["busy"] == 80
    assert summary["idle"] == 20.0
    assert summary["categories"] == {"TLS (ssl, asyncio sslproto)": 62.5, "meshware": 37.5}
    assert summary["functions"] == [["read (ssl.py)", 62.5], ["handle (authz.py)", 37.5]]
    assert sidecar.summarize_profile("not a profile\n")["samples"] == 0


@given(st.text())
def test_profile_summary_never_fails(raw: str) -> None:
    summary = sidecar.summarize_profile(raw)
    assert summary["busy"] <= summary["samples"]
    if summary["busy"]:
        assert sum(summary["categories"].values()) == pytest.approx(100.0)


def test_markdown_tables() -> None:
    text = "Command: `x`\n\n**mTLS**:\n\n| c | req/s |\n|---|---|\n| 1 | 300 [290-310] |\n| 20 | 250 |\n\nprose\n| a |\n|---|\n"
    tables = parse_markdown_tables(text)
    assert tables == [("mTLS", [{"c": "1", "req/s": "300 [290-310]"}, {"c": "20", "req/s": "250"}])]


@given(st.text(alphabet=st.sampled_from("|-* \nab1.:")))
def test_markdown_tables_never_fail(text: str) -> None:
    for title, rows in parse_markdown_tables(text):
        assert isinstance(title, str)
        assert rows and all(list(row) == list(rows[0]) for row in rows)


# --- the inbound benchmark's lower bound does what the meshware stack does --------------------


@pytest.mark.parametrize("caller", ["orders", "shipping"])
def test_inbound_floor_answers_as_the_meshware_stack(caller: str) -> None:
    """The hand-fused floor is only a fair lower bound while it does the same observable
    work: the same status, the request id echoed, the RateLimit fields of the same rule."""
    xfcc = f"URI=spiffe://cluster.local/ns/default/sa/{caller}"

    async def call(app: Any) -> httpx.Response:
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 5555))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return await client.get("/api/items/1", headers={"x-forwarded-client-cert": xfcc})

    meshware, floor = (asyncio.run(call(app)) for app in (apps.meshware, apps.floor))
    assert floor.status_code == meshware.status_code == (200 if caller == "orders" else 403)
    if caller == "orders":
        assert floor.json() == meshware.json()
        for response in (floor, meshware):
            assert len(response.headers["x-request-id"]) == 32
            assert response.headers["ratelimit-policy"] == '"per-caller";q=1000000;w=1'
            assert response.headers["ratelimit"].startswith('"per-caller";r=')
