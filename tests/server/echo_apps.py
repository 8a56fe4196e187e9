"""Apps served by the integration tests: they echo the caller's verified principal."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tests.servers import answer_lifespan


def _principal(identity: Any) -> bytes:
    return (identity.principal if identity is not None else "anonymous").encode()


async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await answer_lifespan(receive, send)
        return
    if scope["path"] == "/slow":
        await asyncio.sleep(1.5)
    body = _principal(scope.get("meshware.identity")) + b" " + scope["scheme"].encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain")],
        }
    )
    await send({"type": "http.response.body", "body": body})


def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    if environ["PATH_INFO"] == "/slow":
        time.sleep(1.5)
    body = _principal(environ.get("meshware.identity")) + b" " + environ["wsgi.url_scheme"].encode()
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body]
