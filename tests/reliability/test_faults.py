"""Faults in ``make test`` (the fast part; ``python -m tests.reliability.soak`` runs the long one).

- injected 503s and delays: retries absorb 5% of 503s; at 60% the retry budget keeps the
  amplification (attempts at the server / requests at the client) under its computed bound;
- graceful shutdown: SIGTERM with ``--drain-seconds`` turns ``/readyz`` to 503 first, and a
  request in flight completes;
- certificate rotation while traffic flows: no request fails.

(The killed-instance scenario, outlier ejection with zero failures and no duplicated
execution, is ``test_kill_instance.py``; the Redis outage is ``test_redis_outage.py`` and the
overload ``test_overload.py``; the soak runs each of them longer.)
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import signal
import ssl
import threading
import time
from pathlib import Path

import httpx
import pytest

from meshware.identity.ca import LocalCA
from meshware.outbound.client import OutboundConfig, mesh_transport
from meshware.outbound.discovery import StaticRegistry
from meshware.outbound.endpoints import Endpoint
from meshware.outbound.retry import RetryPolicy
from meshware.testing import fault_injecting_transport
from tests.reliability import SERVICES
from tests.servers import PROCESSES, client_context, free_port, issue_pki, meshware_serve

BACKEND = "tests.integration.apps:backend"
RATIO = 0.2  # OutboundConfig's default retry budget ratio
FLOOR, WINDOW = 10.0, 10.0  # the budget's minimum retries per second and its window


def amplification_bound(requests: int, seconds: float) -> float:
    """The most attempts per request the budget allows: ``1 + ratio`` plus the floor's share.

    The floor keeps ``FLOOR * WINDOW`` retries available in every window; over a run of
    ``seconds`` at most ``ceil(seconds / WINDOW) + 1`` windows overlap it.
    """
    windows = math.ceil(seconds / WINDOW) + 1
    return 1 + RATIO + FLOOR * WINDOW * windows / requests


async def _storm(abort_percent: float, requests: int) -> tuple[int, int, int, float]:
    """``requests`` GETs through the mesh stack against an upstream failing ``abort_percent``.

    Returns (requests answered 200, other answers or errors, attempts upstream, seconds).
    """
    upstream = httpx.MockTransport(lambda request: httpx.Response(200, json={"ok": True}))
    faults = fault_injecting_transport(
        upstream,
        abort=503,
        abort_percent=abort_percent,
        delay=0.005,
        delay_percent=10,
        rng=random.Random(7),
    )
    config = OutboundConfig(
        service="edge",
        resolver=StaticRegistry({"payments": [Endpoint("127.0.0.1", 9)]}),
        retry=RetryPolicy(attempts=2, retry_on="5xx", backoff_base=0.001, backoff_cap=0.004),
        breaker=None,
    )
    transport = mesh_transport(config, rng=random.Random(11), passthrough=faults)
    ok = failed = 0
    started = time.monotonic()
    async with httpx.AsyncClient(transport=transport) as client:
        for batch in range(0, requests, 50):

            async def one() -> int:
                try:
                    return (await client.get("http://payments/charge")).status_code
                except httpx.HTTPError:
                    return 0

            statuses = await asyncio.gather(*(one() for _ in range(min(50, requests - batch))))
            ok += statuses.count(200)
            failed += len(statuses) - statuses.count(200)
    return ok, failed, faults.calls, time.monotonic() - started


async def test_retries_absorb_five_percent_of_503s() -> None:
    ok, failed, attempts, seconds = await _storm(5.0, 1000)
    assert (ok, failed) == (1000, 0)
    # About 5% of calls retried once: well within the budget.
    assert 1.0 < attempts / 1000 <= amplification_bound(1000, seconds)


async def test_the_budget_stops_a_retry_storm_at_sixty_percent_503s() -> None:
    ok, failed, attempts, seconds = await _storm(60.0, 2000)
    bound = amplification_bound(2000, seconds)
    # attempts=2 alone would allow 3 attempts per request (up to 2.2 here, 1 + 0.6 + 0.36 + ...)
    assert attempts / 2000 <= bound
    assert bound < 1.4
    assert ok + failed == 2000
    assert failed > 0  # callers get the 503s back instead of retrying without end


# -- real servers --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return issue_pki(tmp_path_factory.mktemp("pki"), *SERVICES, "backend")


@pytest.mark.integration
def test_sigterm_drains_readiness_first_and_finishes_in_flight(pki: Path) -> None:
    health = free_port()
    with meshware_serve(
        BACKEND,
        service="backend",
        cert_dir=pki,
        args=["--drain-seconds", "1.5", "--health-port", str(health), "--no-access-log"],
    ) as port:
        assert httpx.get(f"http://127.0.0.1:{health}/readyz", timeout=5).status_code == 200
        results: dict[str, object] = {}

        def slow() -> None:
            with httpx.Client(verify=client_context(pki, "users"), timeout=10) as c:
                try:
                    results["slow"] = c.get(f"https://127.0.0.1:{port}/x?sleep=1.0").status_code
                except httpx.HTTPError as exc:
                    results["slow"] = repr(exc)

        thread = threading.Thread(target=slow)
        thread.start()
        time.sleep(0.3)  # the request is in flight (the test of order, not of timing)
        os.kill(PROCESSES[port].pid, signal.SIGTERM)
        readiness = []
        for _ in range(20):
            try:
                readiness.append(
                    httpx.get(f"http://127.0.0.1:{health}/readyz", timeout=2).status_code
                )
            except httpx.HTTPError:
                break
            if readiness[-1] == 503:
                break
            time.sleep(0.05)
        thread.join(10)
    assert readiness[-1] == 503
    assert results["slow"] == 200


@pytest.mark.integration
def test_certificate_rotation_under_traffic_fails_nothing(pki: Path) -> None:
    ca = LocalCA.load(pki)
    with meshware_serve(BACKEND, service="backend", cert_dir=pki, args=["--no-access-log"]) as port:
        statuses: list[int | str] = []
        stop = threading.Event()

        def traffic() -> None:
            while not stop.is_set():
                try:
                    ctx = client_context(pki, "users")
                except ssl.SSLError:
                    continue  # this client read its own files mid-rotation; not the server's doing
                # A new connection each time: every request runs a fresh handshake.
                with httpx.Client(verify=ctx, timeout=10) as c:
                    try:
                        statuses.append(c.get(f"https://127.0.0.1:{port}/x").status_code)
                    except httpx.HTTPError as exc:
                        statuses.append(repr(exc))

        threads = [threading.Thread(target=traffic) for _ in range(4)]
        for t in threads:
            t.start()
        for _ in range(3):
            time.sleep(0.4)
            for service in ("backend", "users"):
                ca.issue(service)
        time.sleep(1.2)  # the server picks the new files up within a second
        stop.set()
        for t in threads:
            t.join(10)
    assert len(statuses) > 20
    assert [s for s in statuses if s != 200] == []
