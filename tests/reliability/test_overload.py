"""Several times capacity against a rate-limited service: it sheds, stays live, stays small.

A ``meshware serve`` process (uvicorn, STRICT mTLS) of ``tests.server.mesh_apps:asgi_stack``
with a per-caller limit, its capacity; callers on as many threads as it takes to offer
several times that, for a few seconds. Meanwhile ``/livez`` on the plaintext health port is
probed every 100 ms and the server's RSS sampled. The promise is "does not collapse", not a
latency figure: every call is answered (200 or shed with 429/503), no more are served than
the limit allows, every probe answers 200 within a generous bound, and memory stays bounded.
``python -m tests.reliability.soak`` runs the same for longer with more callers.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.servers import PROCESSES, client_context, free_port, issue_pki, meshware_serve

RATE_APP = "tests.server.mesh_apps:asgi_stack"
PROBE_TIMEOUT = 2.0  # "did not collapse": far above any probe of a live server


def rss_kib(pid: int) -> int:
    """The resident set size of process ``pid``, in KiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


@dataclass
class Overload:
    """What one :func:`overload` run saw."""

    rate: int
    """The limit, per second (its burst is the same number)."""
    codes: Counter[int] = field(default_factory=Counter)
    """The answers to the callers, by status."""
    errors: list[str] = field(default_factory=list)
    """Calls that got no answer."""
    probes: list[tuple[int | str, float]] = field(default_factory=list)
    """Each ``/livez`` probe: its status (or error) and how long it took, in seconds."""
    rss_start: int = 0
    rss_peak: int = 0
    seconds: float = 0.0

    @property
    def sent(self) -> int:
        return sum(self.codes.values()) + len(self.errors)

    @property
    def capacity(self) -> float:
        """The most the limit lets through over the run: the rate, plus one burst."""
        return self.rate * self.seconds + self.rate

    @property
    def shed(self) -> int:
        return self.codes[429] + self.codes[503]

    def summary(self) -> str:
        latencies = sorted(seconds for _, seconds in self.probes)
        p99 = latencies[max(0, int(len(latencies) * 0.99) - 1)] if latencies else float("nan")
        return (
            f"{self.codes[200]} served (cap {self.capacity:.0f}), {self.shed} shed with "
            f"429/503, {self.sent / self.capacity:.1f}x capacity offered; /livez "
            f"{len(self.probes)} probes, p99 {p99 * 1000:.0f} ms, max "
            f"{max(latencies, default=float('nan')) * 1000:.0f} ms; RSS "
            f"{self.rss_start // 1024}->{self.rss_peak // 1024} MiB"
        )


def overload(pki: Path, *, seconds: float, callers: int, rate: int) -> Overload:
    """``callers`` threads call as fast as they can for ``seconds`` against a ``rate``/second
    limit (burst ``rate``) while ``/livez`` is probed. ``pki`` must hold ``catalog`` (the
    server) and ``users`` (the callers, one principal: one bucket)."""
    outcome = Overload(rate)
    health = free_port()
    env = {"MESH_TEST_BUNDLE": str(pki / "bundle.pem"), "MESH_TEST_RATE": f"{rate}/second"}
    args = ["--health-port", str(health), "--no-access-log"]
    with meshware_serve(RATE_APP, service="catalog", cert_dir=pki, env=env, args=args) as port:
        pid = PROCESSES[port].pid
        url = f"https://127.0.0.1:{port}/api/items/1"
        began = time.monotonic()  # the limit's capacity counts from the first call
        # One call first: the server has imported and built everything it will use.
        with httpx.Client(verify=client_context(pki, "users"), timeout=10) as warm:
            outcome.codes[warm.get(url).status_code] += 1
        outcome.rss_start = outcome.rss_peak = rss_kib(pid)
        stop = threading.Event()
        lock = threading.Lock()

        def caller() -> None:
            with httpx.Client(verify=client_context(pki, "users"), timeout=10) as client:
                while not stop.is_set():
                    try:
                        code = client.get(url).status_code
                    except httpx.HTTPError as exc:
                        with lock:
                            outcome.errors.append(f"{type(exc).__name__}: {exc}")
                        continue
                    with lock:
                        outcome.codes[code] += 1

        threads = [threading.Thread(target=caller) for _ in range(callers)]
        for thread in threads:
            thread.start()
        try:
            with httpx.Client(timeout=PROBE_TIMEOUT) as probe:
                while time.monotonic() - began < seconds:
                    started = time.monotonic()
                    status: int | str
                    try:
                        status = probe.get(f"http://127.0.0.1:{health}/livez").status_code
                    except httpx.HTTPError as exc:
                        status = f"{type(exc).__name__}: {exc}"
                    outcome.probes.append((status, time.monotonic() - started))
                    with contextlib.suppress(OSError):
                        outcome.rss_peak = max(outcome.rss_peak, rss_kib(pid))
                    time.sleep(0.1)
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        outcome.seconds = time.monotonic() - began
        outcome.rss_peak = max(outcome.rss_peak, rss_kib(pid))
    return outcome


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return issue_pki(tmp_path_factory.mktemp("pki"), "catalog", "users")


@pytest.mark.integration
def test_overload_is_shed_while_livez_answers_and_memory_stays_bounded(pki: Path) -> None:
    outcome = overload(pki, seconds=3.0, callers=12, rate=40)
    print(f"\n{outcome.sent} sent: {outcome.summary()}")

    assert outcome.sent > 3 * outcome.capacity  # several times capacity was offered
    assert outcome.errors == []  # every call was answered ...
    assert set(outcome.codes) <= {200, 429, 503}
    assert outcome.shed > 0  # ... the excess shed ...
    assert outcome.codes[200] <= outcome.capacity  # ... and no more served than the limit
    # /livez kept answering, each probe within the bound (the client's timeout).
    assert len(outcome.probes) >= 10
    assert [status for status, _ in outcome.probes] == [200] * len(outcome.probes)
    assert max(seconds for _, seconds in outcome.probes) < PROBE_TIMEOUT
    assert outcome.rss_peak < 2 * outcome.rss_start
