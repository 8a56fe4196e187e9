"""``DeadlineMiddleware`` for ASGI: the request's deadline, for every call made on its behalf.

A caller sends the time it still has in ``x-meshware-timeout`` (grpc-timeout encoding,
``"2500m"``). This layer turns it into a :class:`~meshware.outbound.deadline.Deadline` on this
host's monotonic clock and runs the application inside
:func:`~meshware.outbound.deadline.deadline_scope`, so that outbound calls made while serving
the request see :func:`~meshware.outbound.deadline.current_deadline` and never wait longer
than the caller will. :class:`DeadlineCore` holds what the ASGI and WSGI shells share. See
``docs/retries-and-deadlines.md``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Final

from meshware.exceptions import ConfigurationError
from meshware.inbound.record import RequestRecord, record_of
from meshware.inbound.responses import json_body, send_json
from meshware.outbound.deadline import (
    TIMEOUT_HEADER,
    Deadline,
    InvalidTimeoutHeader,
    deadline_scope,
    parse_timeout,
)
from meshware.types import ASGIApp, Receive, Scope, Send

__all__ = ["DEADLINE_ERROR_FIELD", "TIMEOUT_HEADER_BYTES", "DeadlineCore", "DeadlineMiddleware"]

DEADLINE_ERROR_FIELD: Final = "deadline_error"
"""The ``RequestRecord.extra`` key (and access-log field) of a malformed header's reason."""

TIMEOUT_HEADER_BYTES: Final = TIMEOUT_HEADER.encode("ascii")
"""The deadline header's name as ASGI spells header names."""


def _seconds(value: object, name: str) -> float | None:
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigurationError(
            "expected a positive, finite number of seconds or None", field=name, value=value
        )
    return float(value)


class DeadlineCore:
    """What both deadline shells share; the arguments are the middleware's.

    Raises:
        ConfigurationError: see :class:`DeadlineMiddleware`.
    """

    __slots__ = ("clock", "default_timeout", "max_timeout")

    def __init__(
        self,
        default_timeout: float | None,
        max_timeout: float | None,
        clock: Callable[[], float],
    ) -> None:
        self.default_timeout = _seconds(default_timeout, "default_timeout")
        self.max_timeout = _seconds(max_timeout, "max_timeout")
        if (
            self.default_timeout is not None
            and self.max_timeout is not None
            and self.default_timeout > self.max_timeout
        ):
            raise ConfigurationError(
                f"expected at most max_timeout ({self.max_timeout:g} s)",
                field="default_timeout",
                value=default_timeout,
            )
        if not callable(clock):
            raise ConfigurationError(
                "expected a callable returning monotonic seconds", field="clock", value=clock
            )
        self.clock = clock

    def deadline(self, header: str | bytes | None) -> Deadline | None:
        """The deadline of a request with this header value (``None``: no header).

        Raises:
            InvalidTimeoutHeader: the value is malformed.
        """
        if header is None:
            seconds = self.default_timeout
            if seconds is None:
                return None
        else:
            seconds = parse_timeout(header)
            limit = self.max_timeout
            if limit is not None and seconds > limit:
                seconds = limit
        return Deadline(at=self.clock() + seconds, clock=self.clock)

    @staticmethod
    def malformed(record: RequestRecord, exc: InvalidTimeoutHeader) -> bytes:
        """Note a malformed header on the record; return the 400 body."""
        extra = record.extra
        if extra is None:
            extra = record.extra = {}
        extra[DEADLINE_ERROR_FIELD] = exc.reason
        return json_body(400, "bad_request", str(exc), reason=exc.reason)


class DeadlineMiddleware:
    """Pure-ASGI deadline propagation: reads ``x-meshware-timeout`` and sets the deadline.

    For each ``http`` request:

    - a well-formed header: the deadline is that much time from now, at most ``max_timeout``;
    - no header: ``default_timeout`` from now, or no deadline when that is ``None``;
    - a malformed header (the first one, when repeated): ``400`` with ``{"status": 400,
      "error": "bad_request", "detail": ..., "reason": <code>}``, the code being
      :class:`~meshware.outbound.deadline.InvalidTimeoutHeader`'s (``"missing-unit"``, ...).

    The application runs inside :func:`~meshware.outbound.deadline.deadline_scope`; the
    context variable is set for the request's task only (asyncio tasks started from it copy
    it), so concurrent requests never see each other's deadline. The layer does not cut the
    request off when the deadline passes: it bounds what the request waits for downstream.
    Lifespan and websocket connections pass through untouched.

    Args:
        app: the ASGI application to wrap.
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
        app: ASGIApp,
        *,
        default_timeout: float | None = None,
        max_timeout: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.app = app
        self._core = DeadlineCore(default_timeout, max_timeout, clock)

    @property
    def core(self) -> DeadlineCore:
        """The shell-neutral part, shared with the fused stack path."""
        return self._core

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = None
        for name, value in scope["headers"]:
            if name == TIMEOUT_HEADER_BYTES:
                header = value
                break
        core = self._core
        if header is None and core.default_timeout is None:
            await self.app(scope, receive, send)  # no deadline (what deadline() answers)
            return
        try:
            deadline = core.deadline(header)
        except InvalidTimeoutHeader as exc:
            await send_json(send, 400, DeadlineCore.malformed(record_of(scope), exc))
            return
        if deadline is None:
            await self.app(scope, receive, send)
            return
        with deadline_scope(deadline):
            await self.app(scope, receive, send)
