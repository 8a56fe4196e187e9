"""``orders``: a Starlette service (ASGI, served by uvicorn)."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sample_services.mini_mesh.peer import call_peer


async def hello(request: Request) -> JSONResponse:
    identity = request.scope.get("meshware.identity")
    return JSONResponse(
        {
            "service": "orders",
            "caller": identity.principal if identity else None,
            "established_by": identity.source if identity else None,
        }
    )


async def peer(request: Request) -> JSONResponse:
    return JSONResponse(await run_in_threadpool(call_peer, "orders"))


app = Starlette(routes=[Route("/hello", hello), Route("/call-peer", peer)])
