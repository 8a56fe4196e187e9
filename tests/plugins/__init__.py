"""Shared helpers of the plugin tests: certificates, a pretend TLS server, an echo server.

Fixtures defined here are imported by the test modules that use them (this package has no
conftest of its own).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from meshware.identity.ca import LocalCA, ServicePaths

FRONTEND = "cluster.local/ns/default/sa/frontend"
INTRUDER = "cluster.local/ns/default/sa/intruder"
PROXY_IP = "10.9.8.7"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"

SERVICES = ("orders", "payments", "inventory", "frontend", "intruder", "ingress")


@dataclass(frozen=True)
class Pki:
    """A local CA with a certificate for each of :data:`SERVICES` (namespace ``default``)."""

    root: Path

    @property
    def bundle(self) -> Path:
        return self.root / "bundle.pem"

    def paths(self, service: str) -> ServicePaths:
        return ServicePaths.under(self.root, service, "default")

    def pem(self, service: str) -> str:
        return self.paths(service).cert.read_text()

    def xfcc(self, service: str, *, with_cert: bool = True) -> str:
        """The ``x-forwarded-client-cert`` element an Envoy proxy would send for ``service``."""
        element = f"By=spiffe://cluster.local/ns/default/sa/ingress;URI=spiffe://{self.id(service)}"
        if with_cert:
            element += f';Cert="{quote(self.pem(service), safe="")}"'
        return element

    @staticmethod
    def id(service: str) -> str:
        return f"cluster.local/ns/default/sa/{service}"


def make_pki(root: Path) -> Pki:
    ca = LocalCA.init(root)
    for service in SERVICES:
        ca.issue(service)
    return Pki(root)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


class TlsServer:
    """Plays the ASGI server's part: puts the connection's client certificate in
    ``scope["extensions"]["tls"]`` as ``meshware serve`` does on uvicorn."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.peer: str | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.peer is not None:
            scope["extensions"] = {
                **(scope.get("extensions") or {}),
                "tls": {"server_cert": None, "client_cert_chain": [self.peer], "tls_version": 772},
            }
        await self.app(scope, receive, send)


class _Echo(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"path": self.path, "headers": dict(self.headers.items())}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def echo_port() -> Iterator[int]:
    """A plaintext HTTP server on loopback answering every GET with the request's headers."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def lower_headers(echoed: dict[str, Any]) -> dict[str, str]:
    return {name.lower(): value for name, value in echoed["headers"].items()}
