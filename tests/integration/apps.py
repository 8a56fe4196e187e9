"""Small services for the outbound integration tests, served by ``meshware serve`` in their own
processes and configured through environment variables.

``backend`` (a plain Starlette app: ``meshware serve`` puts its default inbound stack around it)
answers every path with who it is and what it received::

    {"service", "instance", "version", "pid", "host", "request_id", "timeout", "count"}

``timeout`` is the ``x-meshware-timeout`` header it received and ``count`` how many requests
with this ``x-request-id`` this instance has served. Query parameters: ``sleep=<s>`` waits that
long before answering; ``status=<code>`` answers with that status (a failure on demand).

``middle`` is a Starlette app under the inbound stack built by ``build_asgi_stack`` (deadlines
on): it calls ``MESH_TEST_NEXT`` through a mesh client, with the same path, and answers
``{"service", "instance", "timeout", "next": <the next hop's JSON>}``; when the call fails with
a meshware error it answers 504 (``DeadlineExceeded``) or 503 with ``{"error": <class name>,
"destination": ...}``. ``spend=<s>`` waits that long before calling (to use up the deadline).

Every request is appended at once, before anything else is done, as one JSON line to the file
``MESH_TEST_LOG``: the file survives the process, so a test can count what an instance that
it killed had executed.

Environment:

- ``MESH_TEST_SERVICE``: the service name (as given to ``meshware serve --service``);
- ``MESH_TEST_INSTANCE``: this instance's name (default: its process id);
- ``MESH_TEST_VERSION``: its ``version`` label (default ``v1``);
- ``MESH_TEST_LOG``: the request log file (none when unset);
- ``MESH_TEST_DELAY``: seconds every request waits before answering (default 0);
- ``MESH_TEST_NEXT`` (``middle``): the service it calls, found by the mesh client's
  ``EnvResolver`` (``MESHWARE_SERVICE_<NAME>=127.0.0.1:<port>``);
- ``MESH_TEST_CERT_DIR`` (``middle``): the certificate directory of its mesh client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from meshware.exceptions import MeshwareError
from meshware.inbound.asgi.stack import build_asgi_stack
from meshware.inbound.stack import InboundConfig
from meshware.outbound.client import OutboundConfig, mesh_client
from meshware.outbound.errors import DeadlineExceeded, OutboundError

TIMEOUT_HEADER = "x-meshware-timeout"


class _Instance:
    """Who this process is, and its request log."""

    def __init__(self) -> None:
        self.service = os.environ.get("MESH_TEST_SERVICE", "unknown")
        self.name = os.environ.get("MESH_TEST_INSTANCE", str(os.getpid()))
        self.version = os.environ.get("MESH_TEST_VERSION", "v1")
        self.delay = float(os.environ.get("MESH_TEST_DELAY", "0"))
        self.counts: Counter[str] = Counter()
        log = os.environ.get("MESH_TEST_LOG")
        # O_APPEND: each line is one write(2), whole even when the process is killed after it.
        self._fd = None if log is None else os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def record(self, request: Request) -> dict[str, Any]:
        request_id = request.headers.get("x-request-id", "")
        self.counts[request_id] += 1
        entry = {
            "service": self.service,
            "instance": self.name,
            "version": self.version,
            "pid": os.getpid(),
            "method": request.method,
            "path": request.url.path,
            "host": request.headers.get("host"),
            "request_id": request_id,
            "timeout": request.headers.get(TIMEOUT_HEADER),
        }
        if self._fd is not None:
            os.write(self._fd, json.dumps(entry).encode() + b"\n")
        return {**entry, "count": self.counts[request_id]}


_me = _Instance()


async def _wait(request: Request, parameter: str) -> None:
    seconds = float(request.query_params.get(parameter, "0")) + (
        _me.delay if parameter == "sleep" else 0.0
    )
    if seconds > 0:
        await asyncio.sleep(seconds)


async def _answer(request: Request) -> JSONResponse:
    entry = _me.record(request)
    await _wait(request, "sleep")
    status = int(request.query_params.get("status", "200"))
    return JSONResponse(entry, status_code=status)


backend = Starlette(
    routes=[Route("/{path:path}", _answer, methods=["GET", "POST", "PUT", "DELETE"])]
)


def _build_middle() -> Any:
    next_hop = os.environ["MESH_TEST_NEXT"]
    config = OutboundConfig(service=_me.service, cert_dir=os.environ["MESH_TEST_CERT_DIR"])

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with mesh_client(config) as client:
            app.state.client = client
            yield

    async def forward(request: Request) -> JSONResponse:
        entry = _me.record(request)
        await _wait(request, "spend")
        client: httpx.AsyncClient = request.app.state.client
        mine = {"service": _me.service, "instance": _me.name, "timeout": entry["timeout"]}
        try:
            response = await client.get(f"http://{next_hop}{request.url.path}")
        except OutboundError as exc:
            status = 504 if isinstance(exc, DeadlineExceeded) else 503
            body = {**mine, "error": type(exc).__name__, "destination": exc.destination}
            return JSONResponse(body, status_code=status)
        except (httpx.HTTPError, MeshwareError) as exc:
            return JSONResponse({**mine, "error": type(exc).__name__}, status_code=502)
        return JSONResponse({**mine, "next": response.json()}, status_code=response.status_code)

    app = Starlette(routes=[Route("/{path:path}", forward)], lifespan=lifespan)
    return build_asgi_stack(app, InboundConfig(service=_me.service, deadlines=True))


_built: dict[str, Any] = {}


def __getattr__(name: str) -> Any:
    # ``middle`` needs its environment; it is built when ``meshware serve`` imports it.
    if name == "middle":
        if name not in _built:
            _built[name] = _build_middle()
        return _built[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
