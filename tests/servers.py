"""Starting real servers for integration tests: ``meshware serve`` in a subprocess."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MESHWARE = [sys.executable, "-m", "meshware.cli"]


PROCESSES: dict[int, subprocess.Popen[bytes]] = {}
"""The running ``meshware serve`` processes, by port (for tests that signal them)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(
    port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 20.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@contextlib.contextmanager
def meshware_serve(
    app: str,
    *,
    service: str,
    cert_dir: Path,
    args: Sequence[str] = (),
    port: int | None = None,
    log: Path | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[int]:
    """Run ``meshware serve APP`` on a free loopback port; yield the port; stop it cleanly.

    The server's output (its access log included) goes to ``log``, a file, never a pipe that
    nobody reads (a full pipe would stall the server).
    """
    port = port or free_port()
    log = log or cert_dir.parent / f"serve-{service}-{port}.log"
    cmd = [
        *MESHWARE,
        "serve",
        app,
        "--service",
        service,
        "--dir",
        str(cert_dir),
        "--port",
        str(port),
        "--app-dir",
        str(ROOT),
        *args,
    ]
    out = log.open("wb")
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=out,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        start_new_session=True,
    )
    try:
        wait_for_port(port, proc, log)
        PROCESSES[port] = proc
        yield port
    finally:
        PROCESSES.pop(port, None)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.close()


def kill_server(pid: int, port: int) -> None:
    """SIGKILL a server's process group; return once its port refuses connections (its
    sockets are closed, so a client's pooled connections to it have seen the end)."""
    os.killpg(os.getpgid(pid), signal.SIGKILL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
        except OSError:
            return
        time.sleep(0.02)
    raise TimeoutError(f"127.0.0.1:{port} still accepts connections after SIGKILL")


def issue_pki(directory: Path, *services: str) -> Path:
    """A new CA in ``directory`` with a certificate for each service; returns ``directory``."""
    from meshware.identity.ca import LocalCA

    ca = LocalCA.init(directory)
    for service in services:
        ca.issue(service)
    return directory


def client_context(pki: str | os.PathLike[str], service: str | None) -> ssl.SSLContext:
    """An ``ssl.SSLContext`` trusting ``pki``'s bundle, with ``service``'s certificate (if any)."""
    from meshware.identity.ca import ServicePaths

    ctx = ssl.create_default_context(cafile=os.path.join(pki, "bundle.pem"))
    if service is not None:
        paths = ServicePaths.under(pki, service, "default")
        ctx.load_cert_chain(paths.cert, paths.key)
    return ctx


async def answer_lifespan(
    receive: Callable[[], Awaitable[dict[str, Any]]],
    send: Callable[[dict[str, Any]], Awaitable[None]],
) -> None:
    """Speak the ASGI lifespan protocol for a test app that has nothing to start or stop."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
