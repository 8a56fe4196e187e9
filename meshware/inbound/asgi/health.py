"""The ASGI shell of health and readiness: answers ``/livez`` and ``/readyz`` itself.

Health requests are answered here and never reach the layers inside (identity, authorization,
rate limiting, the application), so probes need no credentials and use no rate budget. The
middleware also watches the ASGI lifespan protocol to drive the readiness state: ``READY``
once the application has started, ``DRAINING`` as soon as the server asks it to shut down.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from meshware.inbound.health import HealthMiddlewareBase, HealthResponse

__all__ = ["HealthMiddleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

logger = logging.getLogger("meshware.health")


class HealthMiddleware(HealthMiddlewareBase[ASGIApp]):
    """Pure-ASGI middleware that serves the liveness and readiness endpoints.

    Takes the arguments of :class:`~meshware.inbound.health.HealthMiddlewareBase` (``app``: the
    ASGI application to wrap) and answers the health paths as it describes. Every other
    request, and every websocket, goes to ``app`` untouched.

    Readiness follows the ASGI lifespan protocol: the state becomes ``READY`` when ``app``
    sends ``lifespan.startup.complete``, and ``DRAINING`` when the server sends
    ``lifespan.shutdown`` (before ``app`` sees it). If ``app`` does not support lifespan (it
    raises or returns before reading the first lifespan message), the middleware marks the
    service ready and completes the lifespan protocol on its behalf, so draining still
    works. If the server never runs lifespan at all (``uvicorn --lifespan off``), the
    service becomes ready with the first request. With ``ready_on_start=False`` none of this
    marks it ready: call ``checks.mark_ready()`` yourself; draining still follows lifespan.
    """

    def _apply_ready_on_start(self, ready_on_start: bool) -> None:
        self._ready_on_start = ready_on_start
        # True until the first lifespan scope or request: a server without lifespan support
        # sends a request first, and serving requests means it has started.
        self._first_call = ready_on_start

    @property
    def awaiting_first_request(self) -> bool:
        """Whether the next request marks the service ready (no lifespan seen yet): such a
        request must pass through this layer, not around it."""
        return self._first_call

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope_type = scope["type"]
        if scope_type == "http":
            if self._first_call:
                self._first_call = False
                self.checks.mark_ready()
            if scope["path"] in self.paths:
                await self._answer(scope, send)
                return
        elif scope_type == "lifespan":
            self._first_call = False
            await self._lifespan(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _answer(self, scope: Scope, send: Send) -> None:
        query = scope.get("query_string", b"")
        response = await self._responder.respond(
            scope["method"], scope["path"], query.decode("latin-1") if query else ""
        )
        await _write(response, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        checks = self.checks
        ready_on_start = self._ready_on_start
        seen: set[str] = set()  # lifespan message types received and sent so far

        async def watch_receive() -> Message:
            message = await receive()
            seen.add(message["type"])
            if message["type"] == "lifespan.shutdown":
                checks.mark_draining()
            return message

        async def watch_send(message: Message) -> None:
            seen.add(message["type"])
            if message["type"] == "lifespan.startup.complete" and ready_on_start:
                checks.mark_ready()
            await send(message)

        try:
            await self.app(scope, watch_receive, watch_send)
        except Exception:
            if _ANSWERS.isdisjoint(seen) and ready_on_start:
                checks.mark_ready()
            if seen:
                # The app took part in lifespan and failed: the server decides what follows.
                raise
            logger.debug("health: the application does not support lifespan", exc_info=True)
        if not _ANSWERS.isdisjoint(seen):
            return
        # The app does not speak lifespan: speak it for the app, so that shutdown still drains.
        if ready_on_start:
            checks.mark_ready()
        if "lifespan.startup" not in seen:
            await watch_receive()
        await send({"type": "lifespan.startup.complete"})
        while "lifespan.shutdown" not in seen:
            await watch_receive()
        await send({"type": "lifespan.shutdown.complete"})


_ANSWERS = frozenset({"lifespan.startup.complete", "lifespan.startup.failed"})


async def _write(response: HealthResponse, send: Send) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": response.status,
            "headers": [(name.encode(), value.encode()) for name, value in response.headers],
        }
    )
    await send({"type": "http.response.body", "body": response.body})
