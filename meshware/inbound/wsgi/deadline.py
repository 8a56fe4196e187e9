"""``DeadlineMiddleware`` for WSGI: the twin of ``meshware.inbound.asgi.deadline``."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from typing import Any, Final

from meshware.inbound.asgi.deadline import DeadlineCore
from meshware.inbound.record import record_of
from meshware.inbound.responses import start_json
from meshware.outbound.deadline import (
    TIMEOUT_HEADER,
    Deadline,
    InvalidTimeoutHeader,
    deadline_scope,
)
from meshware.types import Environ, StartResponse, WSGIApp

__all__ = ["DeadlineMiddleware"]

_ENVIRON_KEY: Final = "HTTP_" + TIMEOUT_HEADER.upper().replace("-", "_")


class _ScopedBody:
    """The application's response, with the deadline kept set until the server closes it."""

    __slots__ = ("_inner", "_scope")

    def __init__(
        self, inner: Iterable[bytes], scope: AbstractContextManager[Deadline | None]
    ) -> None:
        self._inner = inner
        self._scope: AbstractContextManager[Deadline | None] | None = scope

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._inner)

    def close(self) -> None:
        try:
            close = getattr(self._inner, "close", None)
            if close is not None:
                close()
        finally:
            scope, self._scope = self._scope, None
            if scope is not None:
                _leave(scope)


def _leave(scope: AbstractContextManager[Deadline | None]) -> None:
    # ValueError: the server closed the response from another thread's context; that context
    # never saw the deadline, and the next request on this thread sets its own.
    with contextlib.suppress(ValueError):
        scope.__exit__(None, None, None)


class DeadlineMiddleware:
    """WSGI deadline propagation: reads ``x-meshware-timeout`` and sets the deadline.

    The WSGI twin of :class:`meshware.inbound.asgi.DeadlineMiddleware`, with the same
    arguments and behaviour. The deadline is set in the serving thread's context before the
    application is called and stays set while the server iterates the response, so a
    streaming response that calls other services while it streams sees it too; it is reset
    when the server closes the response. Every request sets the variable (to ``None`` when it
    has no deadline), so a thread never carries one request's deadline into the next.

    Args:
        app: the WSGI application to wrap.
        default_timeout: seconds a request without the header may take, or ``None``.
        max_timeout: the most seconds a caller may ask for; longer values are clamped.
        clock: the monotonic clock deadlines are measured on (for tests).

    Raises:
        ConfigurationError: a timeout that is not a positive number or ``None``, or a
            ``default_timeout`` above ``max_timeout``.
    """

    __slots__ = ("_core", "app")

    def __init__(
        self,
        app: WSGIApp,
        *,
        default_timeout: float | None = None,
        max_timeout: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.app = app
        self._core = DeadlineCore(default_timeout, max_timeout, clock)

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        value: Any = environ.get(_ENVIRON_KEY)
        # The server joined repeated fields with commas; the first one counts, as in ASGI.
        header = value.split(",", 1)[0] if isinstance(value, str) else None
        try:
            deadline = self._core.deadline(header)
        except InvalidTimeoutHeader as exc:
            return start_json(start_response, 400, DeadlineCore.malformed(record_of(environ), exc))
        scope = deadline_scope(deadline)
        scope.__enter__()
        try:
            body = self.app(environ, start_response)
        except BaseException:
            _leave(scope)
            raise
        return _ScopedBody(body, scope)
