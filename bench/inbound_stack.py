"""Inbound stack benchmark: a bare Starlette app vs the same app under meshware's full inbound
stack vs under the usual hand-assembled peer stack, side by side in one run.

    python -m bench.inbound_stack [--seconds 5] [--rounds 5] [--connections 32] [--write]

Each variant is served by uvicorn (httptools, one process, no uvicorn access log) pinned to one
core; wrk runs on the other core against ``GET /api/items/1`` carrying an
``x-forwarded-client-cert`` header (the meshware stack trusts 127.0.0.1 as its proxy). Rounds are
interleaved over the variants and medians reported with ranges.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from bench.harness import (
    ROOT,
    Series,
    free_port,
    machine_summary,
    python,
    replace_section,
    server,
    wrk,
)
from bench.inbound_apps import XFCC

VARIANTS = {
    "bare Starlette": "bare",
    "meshware stack": "meshware",
    "hand-fused floor (lower bound, see bench/inbound_floor.py)": "floor",
    "peer stack (otel + instrumentator + slowapi)": "peer",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    args = parser.parse_args(argv)

    series = {name: Series(name) for name in VARIANTS}
    with contextlib.ExitStack() as stack:
        ports = {}
        for name, attr in VARIANTS.items():
            port = free_port()
            cmd = [
                python(), "-m", "uvicorn", f"bench.inbound_apps:{attr}",
                "--port", str(port), "--http", "httptools", "--loop", "asyncio",
                "--no-access-log", "--log-level", "warning", "--lifespan", "on",
            ]  # fmt: skip
            ports[name] = stack.enter_context(server(cmd, port))
        urls = {name: f"http://127.0.0.1:{port}/api/items/1" for name, port in ports.items()}
        for url in urls.values():  # warm up
            wrk(url, seconds=1, connections=args.connections, headers=[XFCC])
        for round_no in range(args.rounds):
            for name, url in urls.items():
                result = wrk(
                    url, seconds=args.seconds, connections=args.connections, headers=[XFCC]
                )
                series[name].runs.append(result)
                print(
                    f"round {round_no + 1}/{args.rounds} {name:<46} {result.rps:9.0f} req/s "
                    f"p50 {result.p50_ms:6.2f} ms p99 {result.p99_ms:6.2f} ms "
                    f"errors {result.errors}",
                    flush=True,
                )

    bare = series["bare Starlette"].median("rps")
    lines = [
        f"Machine: {machine_summary()}.",
        "",
        f"Command: `python -m bench.inbound_stack --seconds {args.seconds:g} --rounds {args.rounds} "
        f"--connections {args.connections}` ({args.rounds} interleaved rounds, medians; ranges in "
        "brackets).",
        "",
        "| variant | req/s | x bare | p50 ms | p99 ms | non-2xx/errors |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in series.items():
        lo, hi = s.spread("rps")
        lines.append(
            f"| {name} | {s.median('rps'):.0f} [{lo:.0f}-{hi:.0f}] | "
            f"{s.median('rps') / bare:.2f} | {s.median('p50_ms'):.2f} | {s.median('p99_ms'):.2f} | "
            f"{sum(r.errors for r in s.runs)} |"
        )
    table = "\n".join(lines)
    print()
    print(table)
    if args.write:
        replace_section(ROOT / "docs" / "benchmarks.md", "inbound", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
