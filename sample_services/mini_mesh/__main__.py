"""``make demo``: start the two services, make the calls, print who called whom, stop."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from meshware.identity.ca import LocalCA, ServicePaths

ROOT = Path(__file__).resolve().parents[2]
CERT_DIR = ROOT / ".meshware" / "demo-certs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], name: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{name} exited with status {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    sys.exit(f"{name} did not start listening on 127.0.0.1:{port}")


@contextlib.contextmanager
def services(ports: dict[str, int]) -> Iterator[None]:
    procs: list[subprocess.Popen[bytes]] = []
    peers = {"orders": "users", "users": "orders"}
    try:
        for name, port in ports.items():
            env = {
                **os.environ,
                "MESHWARE_CERT_DIR": str(CERT_DIR),
                "PEER_SERVICE": peers[name],
                "PEER_URL": f"https://127.0.0.1:{ports[peers[name]]}",
            }
            cmd = [
                sys.executable, "-m", "meshware.cli", "serve",
                f"sample_services.mini_mesh.{name}:app",
                "--service", name, "--dir", str(CERT_DIR), "--port", str(port),
                "--mtls", "strict", "--app-dir", str(ROOT),
            ]  # fmt: skip
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True))
            wait_listening(port, procs[-1], name)
        yield
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=15)


def client_for(service: str | None) -> httpx.Client:
    ctx = ssl.create_default_context(cafile=str(CERT_DIR / "bundle.pem"))
    ctx.check_hostname = False
    if service is not None:
        paths = ServicePaths.under(CERT_DIR, service, "default")
        ctx.load_cert_chain(paths.cert, paths.key)
    return httpx.Client(verify=ctx, timeout=10)


def main() -> int:
    ca = LocalCA.init(CERT_DIR, force=True)
    for service in ("orders", "users", "frontend"):
        ca.issue(service)
    print(f"local CA for trust domain {ca.trust_domain} in {CERT_DIR}")
    ports = {"orders": free_port(), "users": free_port()}
    print(f"orders (Starlette on uvicorn)  https://127.0.0.1:{ports['orders']}  STRICT mTLS")
    print(f"users  (Flask on gunicorn)     https://127.0.0.1:{ports['users']}  STRICT mTLS")
    with services(ports), client_for("frontend") as frontend:
        print()
        for name, port in ports.items():
            body = frontend.get(f"https://127.0.0.1:{port}/hello").json()
            print(f"frontend -> {name:<7} {name} saw verified caller {body['caller']}")
        for name, port in ports.items():
            body = frontend.get(f"https://127.0.0.1:{port}/call-peer").json()
            print(
                f"{name:<8} -> {body['server'].rsplit('/', 1)[-1]:<7} "
                f"server proved {body['server']}; it saw verified caller {body['server_saw_caller']}"
            )
        with client_for(None) as anonymous:
            try:
                anonymous.get(f"https://127.0.0.1:{ports['orders']}/hello")
                outcome = "ANSWERED (unexpected)"
            except httpx.TransportError as exc:
                outcome = f"refused: {type(exc).__name__}"
        print(f"no cert  -> orders  {outcome}")
    print("\nboth services stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
