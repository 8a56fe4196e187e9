"""Shared benchmark plumbing: start servers, drive them with wrk, take medians, write docs.

Rules: every variant runs on the same machine in the same run, runs are interleaved
(round-robin over variants, several rounds) and the median is reported with the range; the
server and the load generator are pinned to different cores when the machine has two or more.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(cmd: Sequence[str], core: int) -> list[str]:
    """Prefix ``cmd`` with ``taskset`` to one core, when there are at least two cores."""
    if (os.cpu_count() or 1) >= 2 and shutil.which("taskset"):
        return ["taskset", "-c", str(core), *cmd]
    return list(cmd)


@contextlib.contextmanager
def server(cmd: Sequence[str], port: int, *, env: dict[str, str] | None = None) -> Iterator[int]:
    """Run a server command on core 0 until the block ends; yield its port once it listens."""
    proc = subprocess.Popen(
        pinned(cmd, 0),
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:

        def errors() -> str:
            return proc.stderr.read().decode() if proc.stderr else ""

        wait_listening(" ".join(cmd), port, proc, errors, timeout=30.0)
        yield port
    finally:
        stop_group(proc, timeout=15.0)
        if proc.stderr:
            proc.stderr.close()


def wait_listening(
    name: str,
    port: int,
    proc: subprocess.Popen[bytes],
    output: Callable[[], str],
    *,
    timeout: float,
) -> None:
    """Return once something accepts connections on ``port`` of 127.0.0.1.

    Raises:
        RuntimeError: ``proc`` exited first (the message ends with ``output()``).
        TimeoutError: nothing listened within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{output()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} did not listen on {port} within {timeout:g} s")
        time.sleep(0.05)


def stop_group(proc: subprocess.Popen[bytes], *, timeout: float) -> None:
    """Stop a process started in a session of its own, and its children: SIGTERM to the
    group, then SIGKILL after ``timeout`` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not match:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def wrk(
    url: str,
    *,
    seconds: float,
    connections: int,
    headers: Sequence[str] = (),
    rate: int | None = None,
) -> WrkResult:
    """One wrk run on core 1; parses throughput and the 50th/99th percentile latencies."""
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency"]
    for header in headers:
        cmd += ["-H", header]
    cmd.append(url)
    out = subprocess.run(pinned(cmd, 1), capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    errors = 0
    for match in re.finditer(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out):
        if match.group(1):
            errors += int(match.group(1))
        else:
            errors += sum(int(n) for n in re.findall(r"\d+", match.group(2)))
    return WrkResult(rps=rps, p50_ms=p50, p99_ms=p99, errors=errors)


@dataclass
class Series:
    """All runs of one variant."""

    name: str
    runs: list[WrkResult] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in self.runs)

    def spread(self, attr: str) -> tuple[float, float]:
        values = [getattr(r, attr) for r in self.runs]
        return min(values), max(values)


def machine_summary() -> str:
    import importlib.metadata as md

    versions = []
    for dist in ("meshware", "starlette", "uvicorn", "httptools", "httpx"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions.append(f"{dist} {md.version(dist)}")
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[
        0
    ]
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, Linux {platform.release()}, "
        f"Python {platform.python_version()}; {', '.join(versions)}; {wrk_version.strip()}"
    )


def replace_section(path: Path, name: str, body: str) -> None:
    """Replace the text between ``<!-- name:begin -->`` and ``<!-- name:end -->`` in ``path``."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else ""
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        before = text.split(begin, 1)[0]
        after = text.split(end, 1)[1]
        text = before + block + after
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def python() -> str:
    return sys.executable
