"""Reliability suites: hostile input, faults and load against real ``meshware serve`` servers.

This package also holds the protected service those suites attack, as a Starlette app under
:func:`~meshware.inbound.asgi.stack.build_asgi_stack` (served by uvicorn) and a Flask app under
:func:`~meshware.inbound.wsgi.stack.build_wsgi_stack` (served by gunicorn), configured through
environment variables so that ``meshware serve tests.reliability:asgi_stack`` can import it in
another process:

- ``MESH_REL_BUNDLE``: the trust bundle file (required);
- ``MESH_REL_LOG``: a file every handler appends one JSON line to each time it runs
  (``{"handler": ..., "path": ..., "principal": ..., "pid": ...}``), so a test can prove a
  protected handler never ran;
- ``MESH_REL_JWKS``: a JWKS file; when set, tokens of issuer ``MESH_REL_ISSUER`` with audience
  ``MESH_REL_AUDIENCE`` are verified (Istio's RequestAuthentication);
- ``MESH_REL_PROXY``: a trusted proxy (address, network or SPIFFE id) allowed to send XFCC.

The policies, as a user would write them:

- ``public``: ALLOW ``/public/*`` and ``/echo`` to everyone;
- ``admins``: ALLOW ``/admin*`` and ``/internal/*`` to ``cluster.local/ns/default/sa/admin``;
- ``internal``: DENY ``/internal/*`` to everyone (so even the admin never reaches it).
"""

from __future__ import annotations

import json
import os
from typing import Any

from flask import Flask, request
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from meshware.inbound.asgi.stack import build_asgi_stack
from meshware.inbound.record import record_of
from meshware.inbound.routes import FlaskRoutes, StarletteRoutes
from meshware.inbound.stack import InboundConfig
from meshware.inbound.wsgi.stack import build_wsgi_stack
from meshware.policy.authz import AuthorizationPolicy
from meshware.policy.jwt import JwtRule

ADMIN = "cluster.local/ns/default/sa/admin"
PROTECTED = frozenset({"admin", "internal"})
"""Handlers that only ``ADMIN`` (``admin``) or nobody (``internal``) may reach."""

POLICIES = (
    AuthorizationPolicy.from_mapping(
        "public",
        {"action": "ALLOW", "rules": [{"to": [{"operation": {"paths": ["/public/*", "/echo"]}}]}]},
    ),
    AuthorizationPolicy.from_mapping(
        "admins",
        {
            "action": "ALLOW",
            "rules": [
                {
                    "from": [{"source": {"principals": [ADMIN]}}],
                    "to": [{"operation": {"paths": ["/admin*", "/internal/*"]}}],
                }
            ],
        },
    ),
    AuthorizationPolicy.from_mapping(
        "internal",
        {"action": "DENY", "rules": [{"to": [{"operation": {"paths": ["/internal/*"]}}]}]},
    ),
)


def _note(handler: str, path: str, principal: str | None, request_principal: str | None) -> None:
    log = os.environ.get("MESH_REL_LOG")
    if log:
        line = {
            "handler": handler,
            "path": path,
            "principal": principal,
            "request_principal": request_principal,
            "pid": os.getpid(),
        }
        # One write per line on an O_APPEND descriptor: lines of concurrent handlers never mix.
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(line) + "\n").encode())
        finally:
            os.close(fd)


def _config(routes: Any) -> InboundConfig:
    jwks = os.environ.get("MESH_REL_JWKS")
    rules: tuple[JwtRule, ...] = ()
    if jwks:
        rules = (
            JwtRule(
                issuer=os.environ.get("MESH_REL_ISSUER", "https://issuer.example"),
                audiences=(os.environ.get("MESH_REL_AUDIENCE", "shop"),),
                jwks_file=jwks,
            ),
        )
    proxy = os.environ.get("MESH_REL_PROXY")
    return InboundConfig(
        service="vault",
        bundle=os.environ["MESH_REL_BUNDLE"],
        trusted_proxies=(proxy,) if proxy else (),
        jwt_rules=rules,
        policies=POLICIES,
        routes=routes,
    )


def _starlette_handler(name: str) -> Any:
    async def handler(req: Request) -> JSONResponse:
        identity = req.scope.get("meshware.identity")
        principal = getattr(identity, "principal", None)
        request_principal = record_of(req.scope).request_principal
        _note(name, req.url.path, principal, request_principal)
        return JSONResponse(
            {"handler": name, "principal": principal, "request_principal": request_principal}
        )

    return handler


_starlette = Starlette(
    routes=[
        Route("/public/{rest:path}", _starlette_handler("public")),
        Route("/echo", _starlette_handler("echo")),
        Route("/admin", _starlette_handler("admin")),
        Route("/admin/{rest:path}", _starlette_handler("admin")),
        Route("/internal/{rest:path}", _starlette_handler("internal")),
    ]
)

_flask = Flask(__name__)


def _flask_reply(name: str) -> dict[str, Any]:
    identity = request.environ.get("meshware.identity")
    principal = getattr(identity, "principal", None)
    record = request.environ.get("meshware.record")
    request_principal = getattr(record, "request_principal", None)
    _note(name, request.path, principal, request_principal)
    return {"handler": name, "principal": principal, "request_principal": request_principal}


@_flask.get("/public/<path:rest>")
def flask_public(rest: str) -> dict[str, Any]:
    return _flask_reply("public")


@_flask.get("/echo")
def flask_echo() -> dict[str, Any]:
    return _flask_reply("echo")


@_flask.get("/admin")
@_flask.get("/admin/<path:rest>")
def flask_admin(rest: str = "") -> dict[str, Any]:
    return _flask_reply("admin")


@_flask.get("/internal/<path:rest>")
def flask_internal(rest: str) -> dict[str, Any]:
    return _flask_reply("internal")


_STACKS: dict[str, Any] = {}


def __getattr__(name: str) -> Any:
    # The stacks read the environment, so they are built when a server imports them, not when
    # the test suites import this package.
    if name not in ("asgi_stack", "wsgi_stack"):
        raise AttributeError(name)
    if name not in _STACKS:
        if name == "asgi_stack":
            _STACKS[name] = build_asgi_stack(_starlette, _config(StarletteRoutes(_starlette)))
        else:
            _STACKS[name] = build_wsgi_stack(_flask, _config(FlaskRoutes(_flask)))
    return _STACKS[name]


# -- helpers the suites share ------------------------------------------------------------------

SERVICES = ("vault", "users", "admin", "gateway")


def raw_request(
    port: int, ctx: Any, head: bytes, *, timeout: float = 10.0
) -> tuple[int | None, bytes]:
    """Send ``head`` (a request, bytes as they are) over TLS (``ctx``) or plaintext (``None``).

    Returns the response status (``None`` when the server closed or reset the connection
    without an answer, or refused the handshake) and the raw response.
    """
    import socket
    import ssl

    chunks: list[bytes] = []
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as plain:
            sock = ctx.wrap_socket(plain, server_hostname="localhost") if ctx else plain
            with sock:
                sock.sendall(head)
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
    except (ssl.SSLError, ConnectionError, TimeoutError, OSError):
        if not chunks:
            return None, b""
    data = b"".join(chunks)
    if not data.startswith(b"HTTP/1."):
        return None, data
    return int(data.split(b" ", 2)[1]), data


def get(path: bytes, *headers: bytes) -> bytes:
    """A ``GET`` request for ``path`` (bytes, unchanged) with ``Connection: close``."""
    lines = [b"GET " + path + b" HTTP/1.1", b"Host: localhost", *headers, b"Connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def executions(log: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The handler executions ``MESH_REL_LOG`` recorded, oldest first."""
    try:
        with open(log, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []
