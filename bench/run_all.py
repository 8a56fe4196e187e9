"""Every benchmark in one run: what ``make bench`` (and ``make bench-quick``) runs.

    python -m bench.run_all [--quick] [--no-write] [--json PATH] [--img-dir DIR] [--keep-work]

In order: ``bench.inbound_stack`` and ``bench.outbound_client`` (each in its own process, with
``--write`` so that it fills its own section of docs/benchmarks.md), the service-to-service
comparison of :mod:`bench.sidecar`, the plots (:mod:`bench.plots`, into ``docs/img/``), and
last the summary section of docs/benchmarks.md.

``--quick`` runs every benchmark as briefly as it allows (one round, one- to three-second runs):
a check that the harness works end to end in under a minute, not a measurement.
``--no-write`` leaves docs/ alone (the plots go to a temporary directory unless ``--img-dir``
says where). The exit status is 0 only when every benchmark ran and every check passed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import sidecar
from bench.harness import ROOT, machine_summary, python, replace_section

DOC = ROOT / "docs" / "benchmarks.md"
IMG = ROOT / "docs" / "img"

SUBPROCESS_BENCHMARKS = {
    "inbound_stack": "Inbound stack",
    "outbound_client": "Outbound client",
}
"""The benchmarks run as their own processes, with their titles in the summary."""

_QUICK_FLAGS = (("--seconds", "1"), ("--rounds", "1"), ("--requests", "200"))


@dataclass
class BenchmarkRun:
    """How one benchmark process went.

    Attributes:
        name: the module under ``bench/``.
        status: ``"ok"``, ``"failed"`` or ``"absent"`` (no such module yet).
        command: the command line.
        seconds: how long it took.
        output: what it printed (its tables).
    """

    name: str
    status: str
    command: list[str] = field(default_factory=list)
    seconds: float = 0.0
    output: str = ""


def _quick_args(module: str) -> list[str]:
    """The shortest run a benchmark offers, read from its ``--help``."""
    help_text = subprocess.run(
        [python(), "-m", f"bench.{module}", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    if "--quick" in help_text:
        return ["--quick"]
    args: list[str] = []
    for flag, value in _QUICK_FLAGS:
        if flag in help_text:
            args += [flag, value]
    return args


def run_module(module: str, *, write: bool, quick: bool, timeout: float) -> BenchmarkRun:
    """Run ``python -m bench.<module>`` (with ``--write`` when ``write``), echoing its output."""
    if not (ROOT / "bench" / f"{module}.py").exists():
        return BenchmarkRun(name=module, status="absent")
    cmd = [python(), "-m", f"bench.{module}"]
    if write:
        cmd.append("--write")
    if quick:
        cmd += _quick_args(module)
    print(f"\n$ {' '.join(cmd[1:])}", flush=True)
    start = time.monotonic()
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            timeout=timeout,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout if isinstance(exc.stdout, str) else (exc.stdout or b"").decode()
        return BenchmarkRun(
            name=module,
            status="failed",
            command=cmd,
            seconds=time.monotonic() - start,
            output=out + f"\n(timed out after {timeout:g} s)",
        )
    print(proc.stdout, end="", flush=True)
    return BenchmarkRun(
        name=module,
        status="ok" if proc.returncode == 0 else "failed",
        command=cmd,
        seconds=time.monotonic() - start,
        output=proc.stdout,
    )


def _doc_link(path: Path) -> str:
    return os.path.relpath(path, DOC.parent)


def render_summary(
    runs: Sequence[BenchmarkRun],
    results: dict[str, Any] | None,
    plots: dict[str, list[Path]],
    *,
    command: str,
    started: str,
    load: tuple[float, float] | None = None,
) -> str:
    """The summary section of docs/benchmarks.md for this run (``load``: the machine's
    one-minute load average at the start and at the end)."""
    lines = [
        f"Last full run: **{started}**, `{command}`. Machine: {machine_summary()}.",
        "",
    ]
    if load:
        lines += [
            f"Load average (1 minute) of the machine: {load[0]:.2f} at the start, "
            f"{load[1]:.2f} at the end, on {os.cpu_count()} cores (the benchmarks' own load "
            "included; anything near or above the core count means other work competed).",
            "",
        ]
    lines += [
        "| benchmark | status | time |",
        "|---|---|---|",
    ]
    for run in runs:
        title = SUBPROCESS_BENCHMARKS.get(run.name, run.name)
        lines.append(f"| {title} | {run.status} | {run.seconds:.0f} s |")
    if results is not None:
        lines.append(f"| Service to service (sidecar) | ok | {results['elapsed_s']:.0f} s |")
        summary = results["summary"]
        targets = summary["targets"]
        rate = results["options"]["rate"]
        lines += ["", f"Service to service at {rate:g} requests/s (medians):", ""]
        for setup in results["setups"]:
            if setup == "plain":
                continue
            row = summary[setup]
            lines.append(
                f"- **{sidecar.SETUPS[setup]}**: {row['added_p50_ms'][0]:+.2f} ms p50 and "
                f"{row['added_p99_ms'][0]:+.2f} ms p99 per call over plain HTTP; "
                f"{row['max_rps'][0]:.0f} req/s max "
                f"({row['max_rps'][0] / summary['plain']['max_rps'][0]:.2f}x plain); "
                f"{row['added_cpu_total']:+.0f} ms CPU per 1000 requests."
            )
        if "latency_met" in targets:
            ratios = [
                "none" if targets[f"latency_ratio_{q}"] is None
                else f"{targets[f'latency_ratio_{q}']:.2f}"
                for q in ("p50", "p99")
            ]  # fmt: skip
            lines.append(
                f"- Target *meshware adds ≤ 0.5 x the HAProxy pair's latency*: "
                f"{'met' if targets['latency_met'] else '**missed**'} (ratio {ratios[0]} at "
                f"p50, {ratios[1]} at p99)."
            )
        if "memory_met" in targets:
            mem = targets["memory_added_mb"]
            lines.append(
                f"- Target *meshware adds ≤ 15 MB per service*: "
                f"{'met' if targets['memory_met'] else '**missed**'} (A {mem['A']:+.1f} MB, "
                f"B {mem['B']:+.1f} MB)."
            )
    for name, paths in plots.items():
        if name == "sidecar" or not paths:
            continue
        title = SUBPROCESS_BENCHMARKS.get(name, name)
        lines += ["", *[f"![{title}]({_doc_link(p)})" for p in paths]]
    return "\n".join(lines)


def render_plots(paths: Sequence[Path]) -> str:
    """The sidecar plots section: one image per PNG."""
    captions = {
        "sidecar-latency.png": "Latency added per call over plain HTTP",
        "sidecar-distribution.png": "Latency distribution at the fixed rate",
        "sidecar-throughput.png": "Maximum throughput",
        "sidecar-cpu.png": "CPU per 1000 requests",
        "sidecar-memory.png": "Resident memory",
    }
    return "\n\n".join(f"![{captions.get(p.name, p.stem)}]({_doc_link(p)})" for p in paths)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.run_all``: see the module docs. Returns the exit status."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run, not a measurement")
    parser.add_argument("--no-write", action="store_true", help="leave docs/ alone")
    parser.add_argument("--json", type=Path, help="write every result as JSON here")
    parser.add_argument("--img-dir", type=Path, help="where the PNGs go (default: docs/img)")
    parser.add_argument("--keep-work", action="store_true", help="keep logs and profiles")
    parser.add_argument(
        "--only", action="append", choices=[*SUBPROCESS_BENCHMARKS, "sidecar"],
        help="run only these benchmarks (repeatable)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    write = not args.no_write
    selected = args.only or [*SUBPROCESS_BENCHMARKS, "sidecar"]
    started_at = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    command = "make bench-quick" if args.quick else "make bench"
    if args.img_dir is not None:
        img_dir = args.img_dir
    elif write:
        img_dir = IMG
    else:
        img_dir = Path(tempfile.mkdtemp(prefix="meshware-bench-img-"))
    errors: list[str] = []
    load_start = os.getloadavg()[0]
    print(f"Machine: {machine_summary()}; load average {load_start:.2f}", flush=True)

    runs = []
    for module in SUBPROCESS_BENCHMARKS:
        if module not in selected:
            continue
        run = run_module(module, write=write, quick=args.quick, timeout=300 if args.quick else 3600)
        runs.append(run)
        if run.status == "failed":
            errors.append(f"bench.{module} failed")
        elif run.status == "absent":
            print(f"\n(bench/{module}.py does not exist yet: skipped)", flush=True)

    results: dict[str, Any] | None = None
    plots: dict[str, list[Path]] = {}
    if "sidecar" in selected:
        work = Path(tempfile.mkdtemp(prefix="meshware-sidecar-"))
        options = sidecar.QUICK if args.quick else sidecar.Options()
        print(f"\n$ {options.command()}", flush=True)
        start = time.monotonic()
        try:
            results = sidecar.run(options, work_dir=work)
        except Exception as exc:  # reported below, and the run fails
            errors.append(f"bench.sidecar failed: {type(exc).__name__}: {exc}")
        finally:
            if args.keep_work:
                print(f"logs and profiles kept in {work}", flush=True)
            else:
                shutil.rmtree(work, ignore_errors=True)
        if results is not None:
            results["elapsed_s"] = time.monotonic() - start
            sections = sidecar.render(results)
            print("\n" + sections["sidecar"], flush=True)
            for setup, data in results["setups"].items():
                failed = [name for name, ok in data["checks"].items() if not ok]
                expected = {"peer": {"other_identity_refused", "access_log"}}.get(setup, set())
                if set(failed) - expected:
                    errors.append(f"{setup}: checks failed: {sorted(set(failed) - expected)}")
                if results["summary"][setup]["errors"]:
                    errors.append(f"{setup}: {results['summary'][setup]['errors']} failed requests")
            if write:
                sidecar.write(results, DOC)

    try:
        from bench import plots as plotting

        if results is not None:
            plots["sidecar"] = plotting.sidecar_plots(results, img_dir)
        for run in runs:
            if run.status == "ok":
                path = plotting.table_plot(
                    run.name.replace("_", "-"),
                    SUBPROCESS_BENCHMARKS[run.name],
                    run.output,
                    img_dir,
                    subtitle=started_at,
                )
                plots[run.name] = [path] if path else []
    except ImportError as exc:
        errors.append(f"plots: {exc} (pip install -e '.[bench]')")
    if plots:
        print(f"\nplots: {', '.join(str(p) for paths in plots.values() for p in paths)}")

    if write:
        if plots.get("sidecar"):
            replace_section(DOC, "sidecar-plots", render_plots(plots["sidecar"]))
        replace_section(
            DOC,
            "summary",
            render_summary(
                runs,
                results,
                plots,
                command=command,
                started=started_at,
                load=(load_start, os.getloadavg()[0]),
            ),
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "benchmarks": [asdict(r) for r in runs],
                    "sidecar": results,
                    "plots": {k: [str(p) for p in v] for k, v in plots.items()},
                    "errors": errors,
                },
                indent=1,
            )
        )
    for error in errors:
        print(f"ERROR: {error}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
