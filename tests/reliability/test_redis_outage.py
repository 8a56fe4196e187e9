"""Redis stopped while a shared rate limit is in use, for both failure modes.

A real redis-server (``tests/redis_server.py``) holds the buckets of a real ``meshware serve``
process (uvicorn, STRICT mTLS) configured by a mesh file, as a user would write it: a
``RateLimit`` of 5 a minute per shopper on ``/api/``, ``backend: redis://...``, and
``failureMode: open`` or ``closed``. Before the outage the limit holds; while Redis is down
the failure mode decides (fail-open admits, fail-closed answers 503 on the limited paths
only), each decision is counted (``meshware_ratelimit_decisions_total{outcome=
"backend_error"}``) and the outage is logged; once Redis runs again the limit holds again.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.redis_server import RedisServer
from tests.servers import client_context, issue_pki, meshware_serve

BACKEND = "tests.integration.apps:backend"
LIMIT = 5  # per shopper per minute
BURST = LIMIT + 2  # requests per phase: the limit, then two more
LOG_LINE = "rate limit backend unavailable"

MESH_FILE = """\
apiVersion: meshware.dev/v1alpha1
kind: RateLimit
metadata: {{name: catalog}}
spec:
  backend: {url}
  failureMode: {mode}
  rules:
  - name: per-shopper
    rate: {limit}/minute
    key: "header:x-shopper"
    match: {{pathPrefixes: [/api/]}}
"""


@dataclass
class Outage:
    """The statuses of each phase of one :func:`redis_outage` run, and what was counted."""

    mode: str
    before: list[int] = field(default_factory=list)
    during: list[int] = field(default_factory=list)
    unlimited_during: list[int] = field(default_factory=list)
    refusals: set[str] = field(default_factory=set)
    """The bodies of the refused requests while Redis was down."""
    after: list[int] = field(default_factory=list)
    backend_errors: float = 0.0
    """``backend_error`` decisions counted while Redis was down."""
    log_lines: list[str] = field(default_factory=list)
    """The server's log lines reporting the outage."""
    probes: int = 0
    """Requests it took, once Redis ran again, until the limit was decided by Redis again."""

    @property
    def sent(self) -> int:
        phases = (self.before, self.during, self.unlimited_during, self.after)
        return sum(len(p) for p in phases) + self.probes

    @property
    def expected_during(self) -> list[int]:
        return [200 if self.mode == "open" else 503] * BURST


def backend_errors(metrics: str) -> float:
    """The sum of ``meshware_ratelimit_decisions_total`` with ``outcome="backend_error"``."""
    pattern = r'meshware_ratelimit_decisions_total\{[^}]*outcome="backend_error"[^}]*\} (\S+)'
    return sum(float(value) for value in re.findall(pattern, metrics))


def redis_outage(pki: Path, work: Path, mode: str, *, burst: int = BURST) -> Outage:
    """Run the three phases against a new redis-server and ``meshware serve``.

    ``pki`` must hold the certificates of ``catalog`` (the server) and ``users`` (the caller).
    """
    outcome = Outage(mode)
    redis = RedisServer(work)
    redis.start()
    config = work / f"mesh-{mode}.yaml"
    config.write_text(MESH_FILE.format(url=redis.url, mode=mode, limit=LIMIT))
    log = work / f"serve-redis-{mode}.log"
    try:
        with (
            meshware_serve(
                BACKEND,
                service="catalog",
                cert_dir=pki,
                args=["--config", str(config), "--no-access-log"],
                log=log,
            ) as port,
            httpx.Client(verify=client_context(pki, "users"), timeout=10) as client,
        ):
            base = f"https://127.0.0.1:{port}"

            def burst_of(shopper: str, n: int = burst, path: str = "/api/items") -> list[int]:
                statuses = []
                for _ in range(n):
                    response = client.get(base + path, headers={"x-shopper": shopper})
                    statuses.append(response.status_code)
                    if response.status_code == 503:
                        outcome.refusals.add(response.text)
                return statuses

            outcome.before = burst_of("before")
            counted_before = backend_errors(client.get(base + "/metrics").text)
            redis.stop()
            outcome.during = burst_of("during")
            # A path no rule matches never asks the backend.
            outcome.unlimited_during = burst_of("during", 2, "/health-free/items")
            outcome.backend_errors = (
                backend_errors(client.get(base + "/metrics").text) - counted_before
            )
            redis.start()
            # Redis is back, empty. Each probe is a shopper of its own, so probing spends
            # nobody's quota; the first one that carries rate-limit headers was decided by
            # Redis (a backend-error decision carries none).
            deadline = time.monotonic() + 20
            while True:
                outcome.probes += 1
                probe = client.get(
                    base + "/api/items", headers={"x-shopper": f"probe-{outcome.probes}"}
                )
                if "ratelimit" in probe.headers or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            outcome.after = burst_of("after")
    finally:
        redis.stop()
    outcome.log_lines = [line for line in log.read_text().splitlines() if LOG_LINE in line]
    return outcome


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return issue_pki(tmp_path_factory.mktemp("pki"), "catalog", "users")


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["open", "closed"])
def test_a_redis_outage_follows_the_failure_mode_and_recovers(
    pki: Path, tmp_path: Path, mode: str
) -> None:
    outage = redis_outage(pki, tmp_path, mode)

    limited = [200] * LIMIT + [429] * (BURST - LIMIT)
    assert outage.before == limited  # the limit holds
    # fail-open admits every request, fail-closed refuses every one with 503 ...
    assert outage.during == outage.expected_during
    if mode == "closed":  # with a clear reason
        (body,) = outage.refusals
        assert json.loads(body) == {
            "status": 503,
            "error": "service_unavailable",
            "detail": "rate limit backend unavailable",
        }
    # ... on the limited paths only.
    assert outage.unlimited_during == [200, 200]
    assert outage.backend_errors == BURST  # each decision counted
    (line,) = outage.log_lines  # logged once (the log is paced), saying how it failed
    assert f"failing {mode}" in line
    assert outage.after == limited  # and the limit holds again
