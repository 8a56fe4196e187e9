"""The deadline layer: an outbound call gets no more time than the request that made it.

The call's deadline (``CallPlan.deadline``) is the inbound request's deadline
(:func:`~meshware.outbound.deadline.current_deadline`, set by the inbound deadline layer from
``x-meshware-timeout``), tightened by a per-call ``TIMEOUT_KEY`` override::

    client.get("http://payments/api", extensions={TIMEOUT_KEY: 0.5})

A call with no time left fails at once with
:class:`~meshware.outbound.errors.DeadlineExceeded`, without touching the network. Otherwise
httpx's own timeouts are capped at the time left, and a timeout that fires after the
deadline has passed is reported as ``DeadlineExceeded`` (chained from httpx's error). The
``x-meshware-timeout`` header is written per attempt by the innermost meshware layer (see
:func:`meshware.outbound.transports.prepare_attempt`), so the next hop gets what is left.

The deadline applies to every call, mesh service or not: a call to an external API must not
outlive the request it serves either. The header goes to mesh services only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import httpx

from meshware.exceptions import ConfigurationError
from meshware.outbound.call import TIMEOUT_KEY, CallPlan, plan_of
from meshware.outbound.deadline import Deadline, check_deadline, current_deadline
from meshware.outbound.errors import DeadlineExceeded
from meshware.outbound.transports import (
    cap_timeouts,
    destination_of,
    prepare_attempt,
    stamped_below,
)

__all__ = ["AsyncDeadlineTransport", "DeadlineTransport"]


class _DeadlineCore:
    __slots__ = ("clock", "stamp")

    def __init__(self, clock: Callable[[], float], stamp: bool) -> None:
        if not callable(clock):
            raise ConfigurationError("expected a callable returning seconds", field="clock")
        self.clock = clock
        self.stamp = stamp

    def begin(self, request: httpx.Request) -> CallPlan:
        plan = plan_of(request)
        deadline = plan.deadline
        inbound = current_deadline()
        if inbound is not None:
            deadline = inbound.earliest(deadline)
        override = request.extensions.get(TIMEOUT_KEY)
        if override is not None:
            if (
                isinstance(override, bool)
                or not isinstance(override, (int, float))
                or math.isnan(override)
                or override <= 0
            ):
                raise ConfigurationError(
                    "expected a number of seconds, more than 0",
                    field=f"extensions[{TIMEOUT_KEY!r}]",
                    value=override,
                )
            deadline = Deadline.after(float(override), clock=self.clock).earliest(deadline)
        plan.deadline = deadline
        if deadline is not None:
            left = check_deadline(destination_of(request, plan), deadline, request=request)
            if self.stamp:
                prepare_attempt(request, plan)
            elif left is not None:
                # The layers below stamp mesh calls; calls to other hosts are capped here.
                cap_timeouts(request, left)
        return plan

    @staticmethod
    def exceeded(
        request: httpx.Request, plan: CallPlan, exc: httpx.TimeoutException
    ) -> DeadlineExceeded | None:
        deadline = plan.deadline
        if isinstance(exc, DeadlineExceeded) or deadline is None or not deadline.expired():
            return None
        return DeadlineExceeded(
            f"deadline exceeded during the call ({type(exc).__name__}: {exc})",
            destination=destination_of(request, plan),
            request=request,
        )


class DeadlineTransport(httpx.BaseTransport):
    """Bounds every call by the inbound request's deadline (and a per-call timeout).

    Args:
        transport: the next transport (routing, retry, ... or a plain one).
        clock: the monotonic clock ``TIMEOUT_KEY`` deadlines are measured on; use the one
            the inbound deadlines use (the default, :func:`time.monotonic`, or a test's fake).

    Raises:
        ConfigurationError: at construction for a bad ``clock``; per call for a
            ``TIMEOUT_KEY`` that is not a positive number of seconds.
        DeadlineExceeded: per call, when the deadline has passed (before anything is sent)
            or passes during the call.
    """

    __slots__ = ("_core", "_transport")

    def __init__(
        self, transport: httpx.BaseTransport, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._transport = transport
        self._core = _DeadlineCore(clock, not stamped_below(transport))

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` through the next transport within the call's deadline."""
        plan = self._core.begin(request)
        try:
            return self._transport.handle_request(request)
        except httpx.TimeoutException as exc:
            error = self._core.exceeded(request, plan, exc)
            if error is None:
                raise
            raise error from exc

    def close(self) -> None:
        """Close the next transport."""
        self._transport.close()


class AsyncDeadlineTransport(httpx.AsyncBaseTransport):
    """The async twin of :class:`DeadlineTransport`, with the same arguments."""

    __slots__ = ("_core", "_transport")

    def __init__(
        self, transport: httpx.AsyncBaseTransport, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._transport = transport
        self._core = _DeadlineCore(clock, not stamped_below(transport))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` through the next transport within the call's deadline."""
        plan = self._core.begin(request)
        try:
            return await self._transport.handle_async_request(request)
        except httpx.TimeoutException as exc:
            error = self._core.exceeded(request, plan, exc)
            if error is None:
                raise
            raise error from exc

    async def aclose(self) -> None:
        """Close the next transport."""
        await self._transport.aclose()
