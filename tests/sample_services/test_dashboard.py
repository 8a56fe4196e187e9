"""The live dashboard in headless Chromium: the graph of all five services and their edges."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sample_services.shop.dashboard import EXPECTED_EDGES, SERVICES
from tests.servers import ROOT

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def running_demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A quick demo left running (``--keep-running``) until the tests are done."""
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (make system-deps)")
    work = tmp_path_factory.mktemp("shop-dashboard")
    summary = work / "summary.json"
    log = (work / "demo.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sample_services.shop",
            "--quick",
            "--keep-running",
            "--summary-json",
            str(summary),
            "--run-dir",
            str(work / "run"),
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 240
        while not summary.exists():
            assert proc.poll() is None, (work / "demo.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the demo wrote no summary"
            time.sleep(0.2)
        time.sleep(0.2)  # the file is written in one call; let it be complete
        yield {**json.loads(summary.read_text()), "run_dir": work / "run"}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        finally:
            log.close()
    out = (work / "demo.log").read_text()
    assert "stopped 7 processes" in out, out[-2000:]


def chromium(*args: str) -> str:
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_the_api_reports_every_service_and_edge(running_demo: dict[str, Any]) -> None:
    url = running_demo["dashboard"]
    time.sleep(2.5)  # at least one scrape after the traffic
    graph = httpx.get(f"{url}api/graph", timeout=10).json()
    nodes = {node["id"]: node for node in graph["nodes"]}
    assert sorted(nodes) == sorted(SERVICES)
    for name in SERVICES:
        assert nodes[name]["up"] is True
        assert nodes[name]["requests"] > 0
    assert nodes["catalog"]["versions"].keys() == {"v1", "v2"}
    edges = {edge["id"]: edge for edge in graph["edges"]}
    for source, destination in EXPECTED_EDGES:
        assert edges[f"{source}->{destination}"]["requests"] > 0
    assert edges["shipping->payments"]["denied"] == 1
    assert edges["orders->payments"]["health"] in ("degraded", "failing")  # injected 503s


def test_the_page_draws_the_graph_in_chromium(running_demo: dict[str, Any]) -> None:
    url = running_demo["dashboard"]
    dom = html.unescape(chromium("--virtual-time-budget=8000", "--dump-dom", url))
    services = set(re.findall(r'data-service="([a-z-]+)"', dom))
    assert services == {*SERVICES, "frontend"}
    edges = set(re.findall(r'data-edge="([a-z-]+->[a-z-]+)"', dom))
    assert {f"{s}->{d}" for s, d in EXPECTED_EDGES} <= edges
    assert "shipping->payments" in edges
    assert set(re.findall(r'data-signals="([a-z-]+)"', dom)) == set(SERVICES)
    healthy = re.search(r'data-service="users" data-health="([a-z]+)"', dom)
    assert healthy is not None and healthy.group(1) == "healthy"
    assert "refreshes every 2 s" in dom

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    shot.unlink(missing_ok=True)
    chromium(
        "--virtual-time-budget=5000",
        "--hide-scrollbars",
        f"--screenshot={shot}",
        "--window-size=1280,900",
        url,
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 10_000  # docs/img/dashboard.png is a copy of such a shot
