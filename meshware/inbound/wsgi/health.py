"""The WSGI shell of health and readiness: answers ``/livez`` and ``/readyz`` itself.

The twin of ``meshware.inbound.asgi.health.HealthMiddleware`` with the same name and
arguments. WSGI has no lifespan protocol, so the service is ``READY`` once the middleware is
built (``ready_on_start=True``) and ``DRAINING`` when ``checks.mark_draining()`` is called;
``gunicorn_hooks`` returns gunicorn server hooks that do that when a worker is told to stop.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterable
from http import HTTPStatus
from types import FrameType, TracebackType
from typing import Any, Protocol, TypeAlias

from meshware.inbound.health import HealthChecks, HealthMiddlewareBase

__all__ = ["HealthMiddleware", "gunicorn_hooks"]

_ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


class StartResponse(Protocol):
    """The WSGI ``start_response`` callable."""

    def __call__(
        self,
        status: str,
        headers: list[tuple[str, str]],
        exc_info: _ExcInfo | None = ...,
        /,
    ) -> Callable[[bytes], object]: ...


WSGIApp: TypeAlias = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

_STATUS_LINES = {code: f"{code} {HTTPStatus(code).phrase}" for code in (200, 405, 503)}


class HealthMiddleware(HealthMiddlewareBase[WSGIApp]):
    """WSGI middleware that serves the liveness and readiness endpoints.

    Takes the arguments of :class:`~meshware.inbound.health.HealthMiddlewareBase` (``app``: the
    WSGI application to wrap) and answers the health paths, matched against ``PATH_INFO``, as
    it describes. Every other request goes to ``app`` untouched, after a single set lookup.

    ``ready_on_start`` marks the service ready now, when the middleware is built (the
    application is loaded by then). Pass ``False`` to call ``checks.mark_ready()`` yourself,
    e.g. after warming caches.
    """

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path not in self.paths:
            return self.app(environ, start_response)
        response = self._responder.respond_sync(
            environ.get("REQUEST_METHOD", "GET"), path, environ.get("QUERY_STRING", "")
        )
        start_response(_STATUS_LINES[response.status], list(response.headers))
        return [response.body]


GunicornHook = Callable[..., None]
"""A gunicorn server hook (``worker_int(worker)``, ``on_exit(server)``, ...)."""


def gunicorn_hooks(checks: HealthChecks) -> dict[str, GunicornHook]:
    """Gunicorn server hooks that mark ``checks`` as draining when a worker is told to stop.

    Put them in a gunicorn config file::

        # gunicorn.conf.py
        from meshware.inbound.wsgi.health import gunicorn_hooks
        from myservice.app import checks

        globals().update(gunicorn_hooks(checks))

    or pick single hooks (``worker_int = hooks["worker_int"]``) and call them from your own
    hooks of the same name.

    Args:
        checks: the ``HealthChecks`` the service's ``HealthMiddleware`` uses.

    Returns:
        A dict of hook name to hook function:

        - ``"post_worker_init"(worker)``: in each worker, chains a SIGTERM handler in front
          of gunicorn's own, so a graceful stop (SIGTERM) marks the worker draining before it
          finishes its in-flight requests. Gunicorn has no hook of its own for SIGTERM.
        - ``"worker_int"(worker)``: SIGINT/SIGQUIT in a worker.
        - ``"worker_abort"(worker)``: SIGABRT in a worker (usually a worker timeout).
        - ``"worker_exit"(server, worker)``: a worker is exiting.
        - ``"on_exit"(server)``: gunicorn's arbiter is exiting; this marks the arbiter's own
          copy of ``checks`` (workers are separate processes with their own copies).
    """

    def post_worker_init(worker: Any) -> None:
        previous = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum: int, frame: FrameType | None) -> None:
            checks.mark_draining()
            if callable(previous):
                previous(signum, frame)

        signal.signal(signal.SIGTERM, on_sigterm)
        # signal.signal() makes the signal interrupt system calls again; gunicorn does not
        # want SIGTERM to disturb active requests.
        signal.siginterrupt(signal.SIGTERM, False)

    def worker_int(worker: Any) -> None:
        checks.mark_draining()

    def worker_abort(worker: Any) -> None:
        checks.mark_draining()

    def worker_exit(server: Any, worker: Any) -> None:
        checks.mark_draining()

    def on_exit(server: Any) -> None:
        checks.mark_draining()

    return {
        "post_worker_init": post_worker_init,
        "worker_int": worker_int,
        "worker_abort": worker_abort,
        "worker_exit": worker_exit,
        "on_exit": on_exit,
    }
