"""Starting and stopping the shop's processes; the pid file that ``make demo-stop`` reads."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
RUN_DIR = ROOT / ".meshware" / "shop"
"""Everything a run writes: certificates, logs, data, ``state.json`` and ``pids.json``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Instance:
    """One process of the mesh: a service (and version) on a port, with its health port."""

    name: str
    service: str
    app: str
    framework: str
    port: int
    health_port: int
    version: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "service": self.service,
            "app": self.app,
            "framework": self.framework,
            "port": self.port,
            "health_port": self.health_port,
            "version": self.version,
        }


def pid_file(run_dir: Path) -> Path:
    return run_dir / "pids.json"


def record_pid(run_dir: Path, name: str, pid: int) -> None:
    """Add a started process to the pid file (written at once, so a crash leaves it right)."""
    path = pid_file(run_dir)
    pids = json.loads(path.read_text()) if path.exists() else {}
    pids[name] = pid
    path.write_text(json.dumps(pids, indent=2))


def start(
    cmd: list[str], *, name: str, run_dir: Path, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own process group, its output in ``logs/<name>.log``."""
    log = (run_dir / "logs" / f"{name}.log").open("wb")
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        start_new_session=True,
    )
    log.close()
    record_pid(run_dir, name, proc.pid)
    return proc


def serve_command(instance: Instance, cert_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "meshware.cli", "serve", instance.app,
        "--service", instance.service, "--dir", str(cert_dir),
        "--port", str(instance.port), "--health-port", str(instance.health_port),
        "--mtls", "strict", "--app-dir", str(ROOT), "--threads", "16",
    ]  # fmt: skip


def wait_ready(
    instances: list[Instance], procs: dict[str, subprocess.Popen[bytes]], timeout: float = 60
) -> None:
    """Wait until every instance's ``/readyz`` (on its plaintext health port) answers 200."""
    pending = {instance.name: instance for instance in instances}
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=1) as client:
        while pending:
            for name, instance in list(pending.items()):
                proc = procs[name]
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with status {proc.returncode}")
                with contextlib.suppress(httpx.HTTPError):
                    url = f"http://127.0.0.1:{instance.health_port}/readyz"
                    if client.get(url).status_code == 200:
                        del pending[name]
            if pending and time.monotonic() > deadline:
                raise TimeoutError(f"not ready after {timeout:.0f}s: {', '.join(pending)}")
            time.sleep(0.1)


def stop_all(run_dir: Path, timeout: float = 15) -> list[str]:
    """Stop every process of the pid file (SIGTERM, then SIGKILL); the names stopped."""
    path = pid_file(run_dir)
    if not path.exists():
        return []
    pids: dict[str, int] = json.loads(path.read_text())
    for pid in pids.values():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for pid in pids.values():
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
    path.unlink(missing_ok=True)
    return sorted(pids)


def _alive(pid: int) -> bool:
    try:
        finished, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child (demo-stop): ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return not _zombie(pid)
    return finished == 0


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return False
