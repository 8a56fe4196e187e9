"""CPU and memory accounting of processes, from the kernel's own bookkeeping.

CPU time is ``utime + stime`` of ``/proc/<pid>/stat`` (every thread of the process, in clock
ticks); memory is ``VmRSS`` of ``/proc/<pid>/status``. Both are read, never estimated, so the
figures include everything a process does: parsing, TLS, logging, background threads.

::

    meter = CpuMeter({"client": pid_a, "server": pid_b})
    ... drive a fixed number of requests ...
    usage = meter.stop()                 # {"client": 1.84, "server": 0.91}  (CPU seconds)
    per_1000 = cpu_ms_per_1000(usage["client"], requests=6000)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CpuMeter",
    "ProcessSample",
    "cpu_ms_per_1000",
    "cpu_seconds",
    "rss_bytes",
    "sample",
]

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PROC = Path("/proc")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) the process ``pid`` has used so far, in seconds.

    Raises:
        ProcessLookupError: there is no such process (it exited).
    """
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except FileNotFoundError:
        raise ProcessLookupError(pid) from None
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = text[text.rindex(")") + 2 :].split()
    # Fields 14 and 15 of the man page are utime and stime; fields[0] here is field 3.
    return (int(fields[11]) + int(fields[12])) / _TICKS


def rss_bytes(pid: int) -> int:
    """Resident memory (``VmRSS``) of the process ``pid`` in bytes.

    Raises:
        ProcessLookupError: there is no such process (it exited).
    """
    try:
        text = (_PROC / str(pid) / "status").read_text()
    except FileNotFoundError:
        raise ProcessLookupError(pid) from None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            value, unit = line.split()[1:3]
            return int(value) * (1024 if unit == "kB" else 1)
    raise ProcessLookupError(pid)  # a zombie has no VmRSS


@dataclass(frozen=True, slots=True)
class ProcessSample:
    """One reading of a process.

    Attributes:
        pid: the process id.
        cpu_s: CPU seconds used so far (user + system).
        rss: resident memory in bytes.
    """

    pid: int
    cpu_s: float
    rss: int


def sample(pid: int) -> ProcessSample:
    """Read the CPU time and resident memory of ``pid`` now."""
    return ProcessSample(pid=pid, cpu_s=cpu_seconds(pid), rss=rss_bytes(pid))


class CpuMeter:
    """CPU seconds used by a set of named processes between construction and :meth:`stop`.

    Args:
        pids: a name for each process (``"client"``, ``"sidecar of the server"``) to its pid.
    """

    def __init__(self, pids: Mapping[str, int]) -> None:
        self._pids = dict(pids)
        self._start = {name: cpu_seconds(pid) for name, pid in self._pids.items()}

    def stop(self) -> dict[str, float]:
        """CPU seconds each process used since the meter was made, by name."""
        return {name: cpu_seconds(pid) - self._start[name] for name, pid in self._pids.items()}


def cpu_ms_per_1000(cpu_s: float, requests: int) -> float:
    """CPU milliseconds per 1000 requests, from CPU seconds spent on ``requests`` requests.

    This is the unit of Istio's "vCPU per 1000 requests per second" times 1000: a process that
    needs 350 ms of CPU per 1000 requests uses 0.35 vCPU at 1000 requests per second.

    Raises:
        ValueError: ``requests`` is not positive.
    """
    if requests <= 0:
        raise ValueError(f"expected a positive number of requests, got {requests}")
    return cpu_s * 1000.0 / requests * 1000.0
