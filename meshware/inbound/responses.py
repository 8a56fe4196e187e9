"""Small JSON error responses shared by the ASGI and WSGI shells."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from http import HTTPStatus
from typing import Any

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
StartResponse = Callable[..., Any]


def json_body(status: int, error: str, detail: str | None = None, **extra: Any) -> bytes:
    """``{"status": 403, "error": "forbidden", "detail": "..."}`` as compact UTF-8 JSON."""
    body: dict[str, Any] = {"status": status, "error": error}
    if detail is not None:
        body["detail"] = detail
    body.update(extra)
    return json.dumps(body, separators=(",", ":")).encode()


async def send_json(
    send: Send, status: int, body: bytes, headers: Iterable[tuple[str, str]] = ()
) -> None:
    """Send a complete JSON response on an ASGI ``send``."""
    raw = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.encode("latin-1"), v.encode("latin-1")) for k, v in headers),
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def start_json(
    start_response: StartResponse,
    status: int,
    body: bytes,
    headers: Iterable[tuple[str, str]] = (),
) -> list[bytes]:
    """Start a complete JSON response on a WSGI ``start_response``; return the body iterable."""
    phrase = HTTPStatus(status).phrase
    start_response(
        f"{status} {phrase}",
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            *headers,
        ],
    )
    return [body]
