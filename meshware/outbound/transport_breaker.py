"""The breaker layer: circuit breaker, connection-pool limits and outlier reporting.

Per call to a mesh destination, in its cluster (the destination, or the subset the routing
layer chose):

1. the cluster's :class:`~meshware.outbound.breaker.CircuitBreaker` admits the call or
   refuses it at once with :class:`~meshware.outbound.errors.CircuitOpen`, before any
   network call; half-open, it lets exactly one probe through;
2. the cluster's :class:`~meshware.outbound.pool_limits.ConcurrencyLimiter` (from the
   rule's ``connectionPool``) gives the call a slot, queues it, or sheds it at once with
   :class:`~meshware.outbound.errors.PoolOverloaded`; the slot is held until the response
   body is closed;
3. the connect timeout is capped at the rule's ``connectionPool.tcp.connectTimeout``;
4. the outcome is reported: to the breaker (a failure is a connect failure, a reset, a
   timeout, or a response whose status is in ``failure_statuses``, by default any 5xx; the
   breaker opens only when the failures it counts came from every healthy endpoint the
   balancer chose among, so one dying instance is left to outlier detection) and,
   for the endpoint the balancing layer picked, to the cluster's outlier detector, as Envoy
   classifies it: the status of a response (5xx and gateway errors count), or a
   local-origin failure (connect failure, reset, timeout) when no response came.

Failures that are meshware's own refusals (``DeadlineExceeded``, a cancelled call) say
nothing about the destination: they are reported to neither.
"""

from __future__ import annotations

from collections.abc import Iterable

import httpx

from meshware.exceptions import ConfigurationError
from meshware.outbound.call import CallPlan, plan_of
from meshware.outbound.errors import CircuitOpen
from meshware.outbound.transports import (
    AttemptStamper,
    Cluster,
    OutboundState,
    cap_connect_timeout,
    error_kind,
    observe_async_response,
    observe_response,
    prepare_attempt,
    stamped_below,
)

__all__ = ["AsyncBreakerTransport", "BreakerTransport"]


def _source(plan: CallPlan) -> str | None:
    endpoint = plan.endpoint
    return None if endpoint is None else endpoint.key


class _BreakerCore:
    __slots__ = ("failure_statuses", "stamp", "state")

    def __init__(
        self, state: OutboundState | None, failure_statuses: Iterable[int], stamp: bool
    ) -> None:
        if state is not None and not isinstance(state, OutboundState):
            raise ConfigurationError("expected an OutboundState", field="state", value=state)
        if isinstance(failure_statuses, (str, bytes)):
            raise ConfigurationError(
                "expected HTTP status codes", field="failure_statuses", value=failure_statuses
            )
        statuses = frozenset(failure_statuses)
        for status in statuses:
            if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
                raise ConfigurationError(
                    "expected HTTP status codes from 100 to 599",
                    field="failure_statuses",
                    value=status,
                )
        self.state = state if state is not None else OutboundState()
        self.failure_statuses = statuses
        self.stamp = stamp

    def admit(self, request: httpx.Request, plan: CallPlan) -> Cluster | None:
        destination = plan.destination
        if destination is None:
            return None
        cluster = self.state.cluster(destination, plan.subset)
        if cluster.connect_timeout is not None:
            cap_connect_timeout(request, cluster.connect_timeout)
        breaker = cluster.breaker
        if breaker is not None and not breaker.allow():
            try:
                breaker.before_call()
            except CircuitOpen as exc:
                exc.request = request
                raise
        return cluster

    @staticmethod
    def refused(cluster: Cluster) -> None:
        # The pool refused a call the breaker admitted: give a half-open probe back.
        if cluster.breaker is not None:
            cluster.breaker.release()

    def failed(self, cluster: Cluster, plan: CallPlan, exc: BaseException) -> None:
        limiter = cluster.limiter
        if limiter is not None:
            limiter.release()
        breaker = cluster.breaker
        local_origin = isinstance(exc, Exception) and error_kind(exc) is not None
        if breaker is not None:
            if local_origin:
                breaker.on_failure(_source(plan), sources=plan.choices)
            else:
                breaker.release()
        detector = cluster.detector
        if local_origin and detector is not None and plan.endpoint is not None:
            detector.on_result(plan.endpoint, local_origin_failure=True)

    def responded(self, cluster: Cluster, plan: CallPlan, response: httpx.Response) -> None:
        status = response.status_code
        breaker = cluster.breaker
        if breaker is not None:
            if status in self.failure_statuses:
                breaker.on_failure(_source(plan), sources=plan.choices)
            else:
                breaker.on_success()
        detector = cluster.detector
        if detector is not None and plan.endpoint is not None:
            detector.on_result(plan.endpoint, status=status)


class BreakerTransport(AttemptStamper, httpx.BaseTransport):
    """Guards each cluster with a circuit breaker and connection-pool limits, and reports
    every outcome to outlier detection (see the module docs).

    Args:
        transport: the next transport (the connection).
        state: the client's :class:`~meshware.outbound.transports.OutboundState`; share it
            with the balancing layer, whose picks this layer's reports eject. A new one when
            ``None``.
        failure_statuses: the response statuses the breaker counts as failures (default
            every 5xx).

    Raises:
        ConfigurationError: an argument has the wrong type or range.
    """

    __slots__ = ("_core", "_transport")

    def __init__(
        self,
        transport: httpx.BaseTransport,
        *,
        state: OutboundState | None = None,
        failure_statuses: Iterable[int] = range(500, 600),
    ) -> None:
        self._transport = transport
        self._core = _BreakerCore(state, failure_statuses, not stamped_below(transport))

    @property
    def state(self) -> OutboundState:
        """The state holding the breakers, limiters and detectors."""
        return self._core.state

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` if its cluster's breaker and pool admit it.

        Raises:
            CircuitOpen: the cluster's breaker is open (nothing was sent).
            PoolOverloaded: the cluster's pool and queue are full (nothing was sent).
            DeadlineExceeded: the deadline came while waiting for a pool slot.
        """
        plan = plan_of(request)
        core = self._core
        cluster = core.admit(request, plan)
        if cluster is None:
            return self._transport.handle_request(request)
        limiter = cluster.limiter
        if limiter is not None:
            try:
                limiter.acquire(deadline=plan.deadline)
            except BaseException:
                core.refused(cluster)
                raise
        try:
            if core.stamp:
                prepare_attempt(request, plan)
            response = self._transport.handle_request(request)
        except BaseException as exc:
            core.failed(cluster, plan, exc)
            raise
        core.responded(cluster, plan, response)
        if limiter is not None:
            observe_response(response, lambda _n, _e: limiter.release())
        return response

    def close(self) -> None:
        """Close the next transport."""
        self._transport.close()


class AsyncBreakerTransport(AttemptStamper, httpx.AsyncBaseTransport):
    """The async twin of :class:`BreakerTransport`, with the same arguments."""

    __slots__ = ("_core", "_transport")

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport,
        *,
        state: OutboundState | None = None,
        failure_statuses: Iterable[int] = range(500, 600),
    ) -> None:
        self._transport = transport
        self._core = _BreakerCore(state, failure_statuses, not stamped_below(transport))

    @property
    def state(self) -> OutboundState:
        """The state holding the breakers, limiters and detectors."""
        return self._core.state

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` if its cluster's breaker and pool admit it (see
        :meth:`BreakerTransport.handle_request`)."""
        plan = plan_of(request)
        core = self._core
        cluster = core.admit(request, plan)
        if cluster is None:
            return await self._transport.handle_async_request(request)
        limiter = cluster.limiter
        if limiter is not None:
            try:
                await limiter.acquire_async(deadline=plan.deadline)
            except BaseException:
                core.refused(cluster)
                raise
        try:
            if core.stamp:
                prepare_attempt(request, plan)
            response = await self._transport.handle_async_request(request)
        except BaseException as exc:
            core.failed(cluster, plan, exc)
            raise
        core.responded(cluster, plan, response)
        if limiter is not None:
            observe_async_response(response, lambda _n, _e: limiter.release())
        return response

    async def aclose(self) -> None:
        """Close the next transport."""
        await self._transport.aclose()
