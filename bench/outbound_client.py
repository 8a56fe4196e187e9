"""Outbound client benchmark: plain ``httpx.AsyncClient`` vs meshware's ``mesh_client`` with
every feature configured, side by side in one run.

    python -m bench.outbound_client [--requests 3000] [--rounds 5] [--no-mtls] [--write]
    python -m bench.outbound_client [...] --instructions   # also instructions per call
    python -m bench.outbound_client --profile [--requests 3000]

One uvicorn server (httptools, one process, no access log) pinned to core 0 serves a tiny raw
ASGI app; this process, the client, pins itself to core 1. Each measurement sends
``--requests`` GETs through one client with ``asyncio.gather`` over a semaphore of the given
concurrency (1, 20, 100) and reports requests per second. Rounds are interleaved over the
clients and concurrencies (the order of the two clients alternates between rounds), and the
median of the rounds is reported with the range.

The first table is plaintext for both clients, so that the comparison is of meshware's own
work: routing, retries and their budget, balancing, outlier detection, pool limits, the
breaker, deadlines and telemetry. The second (unless ``--no-mtls``) puts mTLS under both:
the plain client presents a certificate and checks the server's against the mesh bundle; the
mesh client also checks the server's SPIFFE id.

Both clients keep up to 100 connections alive. The mesh client is configured as in
production: a ``StaticRegistry``, a ``RouteTable`` with one route (a 60 s timeout, retries
with a 30 s per-try timeout), a DestinationRule with outlier detection and pool limits, the
retry budget (20 %), the circuit breaker, Istio metrics and tracing with a 1 % sampler.
No fault, mirror or retry fires. ``--profile`` prints a cProfile of the mesh client instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import importlib.util
import os
import pstats
import re
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.harness import (
    ROOT,
    free_port,
    machine_summary,
    pinned,
    python,
    replace_section,
    server,
)

CONCURRENCY = (1, 20, 100)
PATH = "/api/items/1"
BODY = b'{"id":"1","name":"widget","stock":3}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The upstream service: the smallest ASGI app that answers like a JSON endpoint."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


ROUTES = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: catalog}
spec:
  hosts: [catalog]
  http:
  - name: catalog
    route:
    - destination: {host: catalog}
    timeout: 60s
    retries: {attempts: 2, perTryTimeout: 30s, retryOn: "connect-failure,refused-stream,503"}
"""

RULE = {
    "host": "catalog",
    "trafficPolicy": {
        "loadBalancer": {"simple": "ROUND_ROBIN"},
        "connectionPool": {
            "tcp": {"maxConnections": 1000, "connectTimeout": "2s"},
            "http": {"http1MaxPendingRequests": 1000},
        },
        "outlierDetection": {
            "consecutive5xxErrors": 5,
            "interval": "10s",
            "baseEjectionTime": "30s",
            "maxEjectionPercent": 50,
        },
    },
}


# Both clients keep every connection they open: at concurrency 100, httpx's default of 20
# kept-alive connections would open and close most connections per call, in both clients.
LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=100)
# At concurrency 100 httpcore serves some calls seconds after others (for both clients): the
# timeouts are generous so that a slow call is measured, not failed.
TIMEOUT = 30.0


def plain_client(port: int, tls: ssl.SSLContext | None) -> tuple[httpx.AsyncClient, str]:
    if tls is None:
        return httpx.AsyncClient(timeout=TIMEOUT, limits=LIMITS), f"http://127.0.0.1:{port}{PATH}"
    client = httpx.AsyncClient(timeout=TIMEOUT, limits=LIMITS, verify=tls)
    return client, f"https://127.0.0.1:{port}{PATH}"


def mesh(port: int, cert_dir: Path | None) -> tuple[httpx.AsyncClient, str]:
    from meshware.outbound.client import OutboundConfig, mesh_client
    from meshware.outbound.destination import DestinationRule
    from meshware.outbound.discovery import StaticRegistry
    from meshware.outbound.endpoints import Endpoint
    from meshware.outbound.routing import RouteTable
    from meshware.telemetry.metrics import MeshMetrics
    from meshware.telemetry.tracing import TracingConfig, configure_tracing

    rule = dict(RULE)
    if cert_dir is None:
        rule["trafficPolicy"] = {**RULE["trafficPolicy"], "tls": {"mode": "DISABLE"}}  # type: ignore[dict-item]
    config = OutboundConfig(
        service="orders",
        cert_dir=cert_dir,
        resolver=StaticRegistry(
            {"catalog": [Endpoint("127.0.0.1", port, labels={"version": "v1"})]}
        ),
        routes=RouteTable.from_yaml(ROUTES),
        destinations=(DestinationRule.from_mapping(rule),),
        metrics=MeshMetrics(),
        tracer_provider=configure_tracing(
            TracingConfig(service_name="orders", sampler_ratio=0.01, exporter="none")
        ),
        limits=LIMITS,
        timeout=TIMEOUT,
    )
    return mesh_client(config), f"http://catalog{PATH}"


async def run(client: httpx.AsyncClient, url: str, requests: int, concurrency: int) -> float:
    """Send ``requests`` GETs, at most ``concurrency`` at once; return requests per second."""
    semaphore = asyncio.Semaphore(concurrency)
    failures = 0

    async def one() -> None:
        nonlocal failures
        async with semaphore:
            response = await client.get(url)
            if response.status_code != 200:
                failures += 1

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(requests)))
    elapsed = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"{failures} of {requests} calls failed")
    return requests / elapsed


@dataclass
class Series:
    runs: dict[int, list[float]] = field(default_factory=dict)

    def add(self, concurrency: int, rps: float) -> None:
        self.runs.setdefault(concurrency, []).append(rps)

    def median(self, concurrency: int) -> float:
        return statistics.median(self.runs[concurrency])

    def spread(self, concurrency: int) -> tuple[float, float]:
        return min(self.runs[concurrency]), max(self.runs[concurrency])


async def compare(
    port: int, requests: int, rounds: int, cert_dir: Path | None, tls: ssl.SSLContext | None
) -> dict[str, Series]:
    clients = {"plain httpx": plain_client(port, tls), "mesh_client": mesh(port, cert_dir)}
    series = {name: Series() for name in clients}
    try:
        for client, url in clients.values():  # warm up: connections, caches, code paths
            for concurrency in CONCURRENCY:
                await run(client, url, max(200, requests // 5), concurrency)
        names = list(clients)
        for round_no in range(rounds):
            for concurrency in CONCURRENCY:
                for name in names if round_no % 2 == 0 else names[::-1]:
                    client, url = clients[name]
                    rps = await run(client, url, requests, concurrency)
                    series[name].add(concurrency, rps)
                    print(
                        f"round {round_no + 1}/{rounds} c={concurrency:<3} {name:<12} "
                        f"{rps:8.0f} req/s",
                        flush=True,
                    )
    finally:
        for client, _ in clients.values():
            await client.aclose()
    return series


async def profile(port: int, requests: int) -> None:
    """Print where the mesh client's time goes: a cProfile of ``requests`` calls."""
    client, url = mesh(port, None)
    try:
        await run(client, url, max(200, requests // 5), 20)
        profiler = cProfile.Profile()
        profiler.enable()
        await run(client, url, requests, 20)
        profiler.disable()
    finally:
        await client.aclose()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(30)


CLIENTS = ("plain", "mesh")
# Calls counted under valgrind: the difference of two runs cancels start-up and warm-up.
FEW, MANY = 200, 1200


async def client_only(which: str, port: int, requests: int, concurrency: int) -> None:
    client, url = plain_client(port, None) if which == "plain" else mesh(port, None)
    try:
        await run(client, url, requests, concurrency)
    finally:
        await client.aclose()


def instructions(which: str, port: int, requests: int, concurrency: int) -> int:
    """The instructions the client process runs in user space for ``requests`` calls."""
    cmd = [
        "valgrind", "--tool=callgrind", "--cache-sim=no", "--callgrind-out-file=/dev/null",
        python(), "-m", "bench.outbound_client", "--client-only", which, "--port", str(port),
        "--requests", str(requests), "--concurrency", str(concurrency),
    ]  # fmt: skip
    done = subprocess.run(pinned(cmd, 1), cwd=ROOT, capture_output=True, text=True, check=True)
    match = re.search(r"Collected : (\d+)", done.stderr)
    if match is None:
        raise RuntimeError(f"no instruction count from valgrind:\n{done.stderr[-2000:]}")
    return int(match.group(1))


def instruction_table() -> list[str]:
    """Instructions per call of each client (plaintext, concurrency 1 and 20), counted by
    valgrind's callgrind: a measure of the client's own CPU work that other processes on the
    machine do not disturb (system calls, the same for both clients, are not counted)."""
    if shutil.which("valgrind") is None:
        return ["(valgrind is not installed: no instruction counts)"]
    lines = [
        f"**Instructions per call** of the client process (plaintext; user space, counted by "
        f"valgrind's callgrind over {MANY - FEW} calls: a run of {MANY} calls minus one of "
        f"{FEW}):",
        "",
        "| concurrency | plain httpx | mesh_client | plain / mesh |",
        "|---|---|---|---|",
    ]
    with upstream(None) as port:
        for concurrency in (1, 20):
            per_call = {}
            for which in CLIENTS:
                many = instructions(which, port, MANY, concurrency)
                few = instructions(which, port, FEW, concurrency)
                per_call[which] = (many - few) / (MANY - FEW)
                print(f"c={concurrency} {which}: {per_call[which]:,.0f} instructions per call")
            plain, meshed = per_call["plain"], per_call["mesh"]
            lines.append(
                f"| {concurrency} | {plain / 1000:,.0f} k | {meshed / 1000:,.0f} k | "
                f"{plain / meshed:.2f} |"
            )
    return lines


def table(series: dict[str, Series]) -> list[str]:
    plain, meshed = series["plain httpx"], series["mesh_client"]
    lines = [
        "| concurrency | plain httpx req/s | mesh_client req/s | mesh / plain |",
        "|---|---|---|---|",
    ]
    for concurrency in CONCURRENCY:
        (plo, phi), (mlo, mhi) = plain.spread(concurrency), meshed.spread(concurrency)
        runs = zip(plain.runs[concurrency], meshed.runs[concurrency], strict=True)
        ratios = [m / p for p, m in runs]
        lines.append(
            f"| {concurrency} | {plain.median(concurrency):.0f} [{plo:.0f}-{phi:.0f}] | "
            f"{meshed.median(concurrency):.0f} [{mlo:.0f}-{mhi:.0f}] | "
            f"{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}] |"
        )
    return lines


@contextlib.contextmanager
def upstream(cert_dir: Path | None) -> Iterator[int]:
    port = free_port()
    cmd = [
        python(), "-m", "uvicorn", "bench.outbound_client:app",
        "--port", str(port), "--http", "httptools", "--loop", "asyncio",
        "--no-access-log", "--log-level", "warning", "--lifespan", "on",
        # Longer than both clients keep an idle connection (httpx: 5 s), so that the client
        # retires it first: with equal timeouts a reused connection can meet the server's
        # close ("Server disconnected without sending a response") after a pause between runs.
        "--timeout-keep-alive", "60",
    ]  # fmt: skip
    if cert_dir is not None:
        from meshware.identity.ca import ServicePaths

        paths = ServicePaths.under(cert_dir, "catalog", "default")
        cmd += [
            "--ssl-certfile", str(paths.cert), "--ssl-keyfile", str(paths.key),
            "--ssl-ca-certs", str(paths.bundle), "--ssl-cert-reqs", str(int(ssl.CERT_REQUIRED)),
        ]  # fmt: skip
    with server(cmd, port) as ready:
        yield ready


def client_tls(cert_dir: Path) -> ssl.SSLContext:
    from meshware.identity.ca import ServicePaths

    paths = ServicePaths.under(cert_dir, "orders", "default")
    context = ssl.create_default_context(cafile=str(paths.bundle))
    context.check_hostname = False  # the server's certificate names a SPIFFE id, not 127.0.0.1
    context.load_cert_chain(paths.cert, paths.key)
    return context


def without_sniffio_lookups() -> None:
    """httpcore looks for sniffio before it takes each of its locks (four times a call); when
    sniffio is not installed (anyio 4 no longer needs it), each failed import searches
    ``sys.path`` again, for a good part of a millisecond a call, in both clients alike. A
    ``None`` entry in ``sys.modules`` fails the import at once, which is what an installed
    sniffio amounts to under asyncio."""
    if importlib.util.find_spec("sniffio") is None:
        sys.modules.setdefault("sniffio", None)  # type: ignore[arg-type]


def pin_to_core_1() -> None:
    if (os.cpu_count() or 1) >= 2 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {1})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-mtls", action="store_true", help="skip the mTLS table")
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead, profile the mesh client (plaintext, concurrency 20) with cProfile",
    )
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="also count the client's instructions per call under valgrind (plaintext)",
    )
    parser.add_argument("--client-only", choices=CLIENTS, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    without_sniffio_lookups()
    if args.client_only:  # one client's calls, as the --instructions runs measure them
        asyncio.run(client_only(args.client_only, args.port, args.requests, args.concurrency))
        return 0
    pin_to_core_1()
    if args.profile:
        with upstream(None) as port:
            asyncio.run(profile(port, args.requests))
        return 0

    results: dict[str, dict[str, Series]] = {}
    with upstream(None) as port:
        results["plaintext"] = asyncio.run(compare(port, args.requests, args.rounds, None, None))
    if not args.no_mtls:
        from meshware.identity.ca import LocalCA

        with tempfile.TemporaryDirectory(prefix="meshware-bench-") as directory:
            cert_dir = Path(directory)
            ca = LocalCA.init(cert_dir)
            ca.issue("orders")
            ca.issue("catalog")
            with upstream(cert_dir) as port:
                results["mTLS"] = asyncio.run(
                    compare(port, args.requests, args.rounds, cert_dir, client_tls(cert_dir))
                )

    flags = f"--requests {args.requests} --rounds {args.rounds}"
    flags += " --no-mtls" * args.no_mtls + " --instructions" * args.instructions
    lines = [
        f"Machine: {machine_summary()}.",
        "",
        f"Command: `python -m bench.outbound_client {flags}` ({args.rounds} interleaved rounds "
        f"of {args.requests} requests per client and concurrency; medians, ranges in brackets; "
        "the ratio is the median of the per-round ratios).",
    ]
    for name, series in results.items():
        lines += ["", f"**{name}** (both clients):", "", *table(series)]
    if args.instructions:
        lines += ["", *instruction_table()]
    text = "\n".join(lines)
    print()
    print(text)
    if args.write:
        replace_section(ROOT / "docs" / "benchmarks.md", "outbound", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
