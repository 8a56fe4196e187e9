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
import math
import os
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
from tests.reliability import SERVICES
from tests.reliability.mesh_instances import kill_under_load
from tests.reliability.test_faults import _storm, amplification_bound
from tests.reliability.test_overload import overload as run_overload
from tests.reliability.test_redis_outage import LIMIT
from tests.reliability.test_redis_outage import redis_outage as run_redis_outage
from tests.servers import PROCESSES, ROOT, client_context, free_port, meshware_serve

DOC = ROOT / "docs" / "reliability.md"
BEGIN, END = "<!-- soak:begin -->", "<!-- soak:end -->"
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


TRIES = 3  # _storm's RetryPolicy(attempts=2): a request is tried at most three times


def storm(scale: float, abort_percent: float) -> Row:
    requests = int(20_000 * scale)
    _ok, failed, attempts, seconds = asyncio.run(_storm(abort_percent, requests))
    bound = amplification_bound(requests, seconds)
    amplification = attempts / requests
    # Absorbed does not mean none left: a request fails when all its tries draw a 503, one in
    # (1/p)**TRIES. Under the budget nothing else fails, so at 5 % the failures stay within
    # a few standard deviations of that (Poisson) expectation.
    unlucky = requests * (abort_percent / 100) ** TRIES
    allowed = math.floor(unlucky + 4 * math.sqrt(unlucky) + 1)
    absorbing = abort_percent <= 5
    outcome = f"amplification {amplification:.3f} (bound {bound:.3f}), {seconds:.1f} s"
    if absorbing:
        outcome += (
            f"; {failed} failed, {unlucky:.1f} expected from all {TRIES} tries drawing a 503 "
            f"(allowed {allowed})"
        )
    return Row(
        f"{abort_percent:g}% 503s + 10% delays, retries with budget",
        requests,
        failed,
        0,
        0,
        outcome,
        amplification <= bound and (failed <= allowed if absorbing else failed > 0),
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


def kill_instance(scale: float, pki: Path) -> Row:
    requests = max(800, int(10_000 * scale))
    out = asyncio.run(kill_under_load(pki, requests=requests, workers=16, kill_after=requests // 3))
    failed = {kind: len(lines) for kind, lines in out.failures.items()}
    cut = [line.split(":")[0] for line in out.failures["unkeyed"]]
    duplicated = out.repeated("unkeyed")
    ok = (
        failed["get"] == failed["keyed"] == 0
        and duplicated == []
        and all(out.executions[rid] <= 1 for rid in cut)
        and out.lost() == []
        and out.ejected == [out.victim]
    )
    retries = ", ".join(f"{n:g} {condition}" for condition, n in sorted(out.retries.items()))
    return Row(
        "SIGKILL 1 of 3 instances under 16 callers (GET, POST with and without Idempotency-Key)",
        sum(out.sent.values()),
        sum(failed.values()),
        len(duplicated),
        0,
        f"killed after {out.killed_at}; {failed['get']} of {out.sent['get']} GETs and "
        f"{failed['keyed']} of {out.sent['keyed']} keyed POSTs failed, "
        f"{len(out.repeated('keyed'))} keyed POSTs repeated (safe); {len(cut)} unkeyed POSTs "
        f"cut by the kill, executed {sum(out.executions[rid] for rid in cut)} times in all; "
        f"ejected {'the victim' if out.ejected == [out.victim] else out.ejected}; "
        f"retries: {retries or 'none'}; {out.seconds:.1f} s",
        ok,
    )


def overload(scale: float, pki: Path) -> Row:
    out = run_overload(pki, seconds=max(3.0, 30 * scale), callers=32, rate=100)
    probes_ok = all(status == 200 for status, _ in out.probes)
    latencies = sorted(seconds for _, seconds in out.probes)
    p99 = latencies[max(0, int(len(latencies) * 0.99) - 1)] if latencies else float("inf")
    return Row(
        "32 clients against a 100/s limit",
        out.sent,
        len(out.errors),
        0,
        0,
        out.summary(),
        out.errors == []
        and out.shed > 0
        and out.codes[200] <= out.capacity
        and probes_ok
        and p99 < 0.5
        and out.rss_peak < out.rss_start * 2,
    )


def redis_outage(pki: Path, work: Path, mode: str) -> Row:
    directory = work / f"redis-{mode}"
    directory.mkdir()
    out = run_redis_outage(pki, directory, mode)
    limited = [200] * LIMIT + [429] * (len(out.before) - LIMIT)
    ok = (
        out.before == limited
        and out.during == out.expected_during
        and len(out.refusals) == (1 if mode == "closed" else 0)
        and out.unlimited_during == [200] * len(out.unlimited_during)
        and out.backend_errors == len(out.during)
        and len(out.log_lines) == 1
        and f"failing {mode}" in out.log_lines[0]
        and out.after == limited
    )
    during = (
        f"{out.during.count(200)}x200 (admitted unlimited)"
        if mode == "open"
        else f"{out.during.count(503)}x503 on /api/, unlimited paths {out.unlimited_during.count(200)}x200"
    )
    return Row(
        f"stop Redis under a shared {LIMIT}/minute limit (fail-{mode})",
        out.sent,
        sum(1 for s in out.during if s != 200),
        0,
        out.during.count(200) if mode == "closed" else 0,
        f"before {out.before.count(429)}x429; during {during}, {out.backend_errors:.0f} "
        f"backend_error counted, {len(out.log_lines)} log line; after restart "
        f"{out.after.count(429)}x429 (recovered after {out.probes} probe)",
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
        for service in (*SERVICES, "backend", "catalog", "frontend"):
            ca.issue(service)
        scenarios: list[Callable[[], Row]] = [
            lambda: storm(args.scale, 5.0),
            lambda: storm(args.scale, 60.0),
            lambda: rotation(args.scale, pki),
            lambda: drain(args.scale, pki),
            lambda: kill_instance(args.scale, pki),
            lambda: overload(args.scale, pki),
            lambda: redis_outage(pki, work, "open"),
            lambda: redis_outage(pki, work, "closed"),
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
