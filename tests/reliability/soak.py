"""The slow reliability scenarios: ``python -m tests.reliability.soak [--write] [--scale N]``.

Each scenario runs against real ``meshware serve`` processes (or, for the retry storm, the
full outbound stack over an injected-fault upstream), prints one result row, and fails the
run (exit status 1) when a promise is broken. ``--write`` replaces the table between the
markers in ``docs/reliability.md`` with the rows of this run. ``--scale`` multiplies the
request counts and durations (``0.2`` for a quick look).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from meshware.identity.ca import LocalCA
from tests.redis_server import RedisServer
from tests.reliability import SERVICES, client_context
from tests.reliability.test_faults import _storm, amplification_bound
from tests.servers import PROCESSES, ROOT, free_port, meshware_serve

DOC = ROOT / "docs" / "reliability.md"
BEGIN, END = "<!-- soak:begin -->", "<!-- soak:end -->"
RATE_APP = "tests.server.mesh_apps:asgi_stack"
BACKEND = "tests.integration.apps:backend"


@dataclass
class Row:
    """One scenario's measured outcome."""

    scenario: str
    sent: int
    failed: int
    duplicated: int
    let_in: int
    outcome: str
    ok: bool


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def storm(scale: float, abort_percent: float) -> Row:
    requests = int(20_000 * scale)
    _ok, failed, attempts, seconds = asyncio.run(_storm(abort_percent, requests))
    bound = amplification_bound(requests, seconds)
    amplification = attempts / requests
    expected_failed = 0 if abort_percent <= 5 else failed
    return Row(
        f"{abort_percent:g}% 503s + 10% delays, retries with budget",
        requests,
        failed,
        0,
        0,
        f"amplification {amplification:.3f} (bound {bound:.3f}), {seconds:.1f} s",
        amplification <= bound and failed == expected_failed,
    )


def rotation(scale: float, pki: Path) -> Row:
    ca = LocalCA.load(pki)
    statuses: list[object] = []
    with meshware_serve(BACKEND, service="backend", cert_dir=pki, args=["--no-access-log"]) as port:
        stop = threading.Event()

        def traffic() -> None:
            while not stop.is_set():
                try:
                    ctx = client_context(pki, "users")
                except ssl.SSLError:
                    continue
                with httpx.Client(verify=ctx, timeout=10) as client:
                    try:
                        statuses.append(client.get(f"https://127.0.0.1:{port}/x").status_code)
                    except httpx.HTTPError as exc:
                        statuses.append(repr(exc))

        threads = [threading.Thread(target=traffic) for _ in range(8)]
        for t in threads:
            t.start()
        rounds = max(3, int(30 * scale))
        for _ in range(rounds):
            time.sleep(0.5)
            for service in ("backend", "users"):
                ca.issue(service)
        time.sleep(1.5)
        stop.set()
        for t in threads:
            t.join(10)
    failed = sum(1 for s in statuses if s != 200)
    return Row(
        f"rotate every certificate {rounds} times under traffic",
        len(statuses),
        failed,
        0,
        0,
        f"{failed} failed",
        failed == 0,
    )


def drain(scale: float, pki: Path) -> Row:
    sent = failed = 0
    ready_first = True
    for _ in range(max(2, int(10 * scale))):
        health = free_port()
        args = ["--drain-seconds", "1", "--health-port", str(health), "--no-access-log"]
        with meshware_serve(BACKEND, service="backend", cert_dir=pki, args=args) as port:
            results: list[object] = []

            def slow(port: int = port, results: list[object] = results) -> None:
                with httpx.Client(verify=client_context(pki, "users"), timeout=10) as c:
                    try:
                        results.append(c.get(f"https://127.0.0.1:{port}/x?sleep=0.8").status_code)
                    except httpx.HTTPError as exc:
                        results.append(repr(exc))

            threads = [threading.Thread(target=slow) for _ in range(8)]
            for t in threads:
                t.start()
            time.sleep(0.2)
            os.kill(PROCESSES[port].pid, 15)
            time.sleep(0.1)
            with contextlib.suppress(httpx.HTTPError):
                status = httpx.get(f"http://127.0.0.1:{health}/readyz", timeout=2).status_code
                ready_first = ready_first and status == 503
            for t in threads:
                t.join(10)
        sent += len(threads)
        failed += sum(1 for r in results if r != 200) + len(threads) - len(results)
    return Row(
        "SIGTERM with --drain-seconds 1 during requests",
        sent,
        failed,
        0,
        0,
        f"readiness 503 first: {ready_first}; {failed} cut",
        failed == 0 and ready_first,
    )


def overload(scale: float, pki: Path) -> Row:
    health = free_port()
    env = {"MESH_TEST_BUNDLE": str(pki / "bundle.pem"), "MESH_TEST_RATE": "100/second"}
    args = ["--health-port", str(health), "--no-access-log"]
    seconds = max(3.0, 30 * scale)
    codes: dict[int, int] = {}
    errors = 0
    probes: list[float] = []
    with meshware_serve(RATE_APP, service="catalog", cert_dir=pki, env=env, args=args) as port:
        pid = PROCESSES[port].pid
        rss_start = _rss_kib(pid)
        stop = threading.Event()
        lock = threading.Lock()

        def client() -> None:
            nonlocal errors
            with httpx.Client(verify=client_context(pki, "users"), timeout=10) as c:
                while not stop.is_set():
                    try:
                        code = c.get(f"https://127.0.0.1:{port}/api/items/1").status_code
                    except httpx.HTTPError:
                        with lock:
                            errors += 1
                        continue
                    with lock:
                        codes[code] = codes.get(code, 0) + 1

        threads = [threading.Thread(target=client) for _ in range(32)]
        began = time.monotonic()
        for t in threads:
            t.start()
        end = time.monotonic() + seconds
        rss_peak = rss_start
        while time.monotonic() < end:
            started = time.monotonic()
            with contextlib.suppress(httpx.HTTPError):
                httpx.get(f"http://127.0.0.1:{health}/livez", timeout=5)
            probes.append(time.monotonic() - started)
            rss_peak = max(rss_peak, _rss_kib(pid))
            time.sleep(0.2)
        stop.set()
        for t in threads:
            t.join(10)
        elapsed = time.monotonic() - began
    sent = sum(codes.values()) + errors
    probes.sort()
    p99 = probes[int(len(probes) * 0.99) - 1] if probes else float("inf")
    allowed = codes.get(200, 0)
    capacity = 100 * elapsed + 100  # the rate over the run plus one burst
    return Row(
        "32 clients against a 100/s limit",
        sent,
        errors,
        0,
        0,
        f"{allowed} served (cap {capacity:.0f}), {codes.get(429, 0)} shed with 429; "
        f"/livez p99 {p99 * 1000:.0f} ms; RSS {rss_start // 1024}->{rss_peak // 1024} MiB",
        errors == 0 and allowed <= capacity and p99 < 0.5 and rss_peak < rss_start * 2,
    )


def redis_outage(scale: float, pki: Path, work: Path) -> Row:
    redis = RedisServer(work)
    redis.start()
    env = {
        "MESH_TEST_BUNDLE": str(pki / "bundle.pem"),
        "MESH_TEST_RATE": "5/minute",
        "MESH_TEST_BACKEND": redis.url,
    }
    try:
        with (
            meshware_serve(RATE_APP, service="catalog", cert_dir=pki, env=env) as port,
            httpx.Client(verify=client_context(pki, "users"), timeout=10) as c,
        ):

            def burst(n: int) -> list[int]:
                return [
                    c.get(f"https://127.0.0.1:{port}/api/items/1").status_code for _ in range(n)
                ]

            before = burst(7)
            redis.stop()
            during = burst(7)
            metrics = c.get(f"https://127.0.0.1:{port}/metrics").text
            redis.start()
            time.sleep(0.5)
            after = burst(7)
    finally:
        redis.stop()
    match = re.search(
        r'meshware_ratelimit_decisions_total\{[^}]*outcome="backend_error"[^}]*\} (\S+)', metrics
    )
    counted = float(match.group(1)) if match else 0.0
    ok = (
        before == [200] * 5 + [429] * 2
        and during == [200] * 7  # fail-open, the default
        and counted >= 7
        and after.count(429) >= 2
    )
    return Row(
        "stop Redis under a shared 5/minute limit (fail-open)",
        21,
        sum(1 for s in during if s != 200),
        0,
        0,
        f"before {before.count(429)}x429; during {during.count(200)}x200, "
        f"{counted:.0f} backend_error counted; after restart {after.count(429)}x429",
        ok,
    )


def _write(rows: list[Row], scale: float) -> None:
    table = [
        "| scenario | sent | failed | duplicated | let in | outcome | passed |",
        "|---|---:|---:|---:|---:|---|---|",
        *[
            f"| {r.scenario} | {r.sent} | {r.failed} | {r.duplicated} | {r.let_in} | "
            f"{r.outcome} | {'yes' if r.ok else 'NO'} |"
            for r in rows
        ],
    ]
    text = DOC.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    stamp = time.strftime("%Y-%m-%d")
    DOC.write_text(
        f"{head}{BEGIN}\n_Last run: {stamp}, scale {scale:g}._\n\n"
        + "\n".join(table)
        + f"\n{END}{tail}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.reliability.soak")
    parser.add_argument("--write", action="store_true", help="update docs/reliability.md")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply counts and durations")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="meshware-soak-") as tmp:
        work = Path(tmp)
        pki = work / "pki"
        ca = LocalCA.init(pki)
        for service in (*SERVICES, "backend", "catalog"):
            ca.issue(service)
        scenarios: list[Callable[[], Row]] = [
            lambda: storm(args.scale, 5.0),
            lambda: storm(args.scale, 60.0),
            lambda: rotation(args.scale, pki),
            lambda: drain(args.scale, pki),
            lambda: overload(args.scale, pki),
            lambda: redis_outage(args.scale, pki, work),
        ]
        rows = []
        for scenario in scenarios:
            row = scenario()
            rows.append(row)
            print(json.dumps(row.__dict__), flush=True)
    if args.write:
        _write(rows, args.scale)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
