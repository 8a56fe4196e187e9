"""The retry layer: try a failed call again when a second try can fix it, within a budget.

Per call, the policy is the caller's ``RETRY_KEY`` override (``None`` for no retries), else
the route's (``CallPlan.retry``, set by the routing layer), else the transport's default.
Each try's outcome is classified with :meth:`RetryPolicy.should_retry
<meshware.outbound.retry.RetryPolicy.should_retry>`: a response by its status, a call that
got no response by what went wrong (:func:`meshware.outbound.transports.error_kind`:
``connect-failure``, ``reset``, ``timeout``). Then:

- the safe-to-repeat rule holds: a ``POST`` is repeated after a connect failure (it never
  reached the server) but not after a 503, unless the route or the call marks it retryable
  (``RETRYABLE_KEY``) or it carries an ``Idempotency-Key``;
- a request whose body cannot be replayed (a generator stream) is never repeated;
- each retry must be paid for from the destination's
  :class:`~meshware.outbound.budget.RetryBudget` (Finagle's: 20 % of requests plus 10 per
  second, by default), and must fit before the deadline;
- the wait is the jittered exponential backoff, or what ``Retry-After`` asks on a 429/503;
- each try may have its own timeout (``perTryTimeout``): httpx's timeouts are capped at it,
  the next hop is told about it, and the async transport also enforces it as a hard limit;
- a retry notes the endpoint that failed in ``CallPlan.tried``, so the balancing layer picks
  another;
- a response that will be retried is read and closed first.

When no retry is made, the last *real* outcome goes to the caller: the last response, or the
last error raised by the layers below, unchanged. When the budget refuses a retry, the
original failure goes through too (Finagle's behaviour): ``RetryBudgetExhausted`` is not
raised; the refusal is counted (``meshware_outbound_retry_budget_exhausted_total``) and
flagged ``URX`` in the call's metrics, as Envoy flags a call whose retries ran out. When a
retry is refused by a local check (the breaker is open, the pool is full, no endpoint is
healthy, the deadline has passed), the previous real outcome goes through as well.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from meshware.exceptions import ConfigurationError
from meshware.outbound.budget import RetryBudget
from meshware.outbound.call import RETRY_KEY, RETRYABLE_KEY, CallPlan, plan_of
from meshware.outbound.discovery import Resolver
from meshware.outbound.errors import OutboundError
from meshware.outbound.retry import RetryPolicy, RetryReason, RetryState
from meshware.outbound.transports import (
    ATTEMPT_DEADLINE_KEY,
    RETRIES_EXHAUSTED_KEY,
    AttemptStamper,
    OutboundState,
    error_kind,
    is_replayable,
    new_attempt_deadline,
    prepare_attempt,
    stamped_below,
)
from meshware.telemetry.metrics import OutboundRecorder

__all__ = ["AsyncRetryTransport", "RetryTransport"]

_DEFAULT_POLICY = RetryPolicy()
# Task.uncancel() (Python 3.11+) tells a cancellation of ours from one asked for by others;
# without it, a try is bounded with wait_for (in a task of its own).
if sys.version_info >= (3, 11):
    _UNCANCEL = True

    def _cancelling(task: asyncio.Task[Any]) -> int:
        return task.cancelling()

    def _uncancel(task: asyncio.Task[Any]) -> int:
        return task.uncancel()

else:
    _UNCANCEL = False

    def _cancelling(task: asyncio.Task[Any]) -> int:
        return 0

    def _uncancel(task: asyncio.Task[Any]) -> int:
        return 0


class _Expiry:
    """The hard time limit of one try: cancels the task when it fires."""

    __slots__ = ("cancelling", "fired", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.cancelling = _cancelling(task)
        self.fired = False

    def fire(self) -> None:
        self.fired = True
        self.task.cancel()


_GAVE_UP = frozenset({RetryReason.ATTEMPTS_EXHAUSTED, RetryReason.BUDGET_EXHAUSTED})


class _Call:
    """One call's progress through its tries: the sans-I/O heart of both shells."""

    __slots__ = (
        "budget",
        "clock",
        "destination",
        "last_error",
        "last_response",
        "plan",
        "recorder",
        "replayable",
        "request",
        "retryable",
        "stamp",
        "state",
        "timeouts",
    )

    def __init__(
        self,
        request: httpx.Request,
        plan: CallPlan,
        policy: RetryPolicy,
        budget: RetryBudget,
        clock: Callable[[], float],
        rng: random.Random,
        wall_clock: Callable[[], float],
        recorder: OutboundRecorder | None,
        stamp: bool,
    ) -> None:
        self.request = request
        self.stamp = stamp
        self.plan = plan
        self.destination: str = plan.destination or ""
        self.budget = budget
        self.clock = clock
        self.recorder = recorder
        self.replayable = is_replayable(request)
        self.retryable = plan.retryable or request.extensions.get(RETRYABLE_KEY) is True
        self.state: RetryState = policy.new_state(uniform=rng.uniform, wall_clock=wall_clock)
        self.last_response: httpx.Response | None = None
        self.last_error: BaseException | None = None
        # Each try starts from the caller's timeouts; the layers below only ever shorten them.
        self.timeouts = request.extensions.get("timeout")
        budget.record_request()

    def start(self) -> float | None:
        """Prepare the next try; returns its hard time limit in seconds, if any."""
        plan = self.plan
        plan.attempt = self.state.retries
        plan.endpoint = None
        deadline = new_attempt_deadline(plan, self.state.policy.per_try_timeout, self.clock)
        extensions = self.request.extensions
        extensions[ATTEMPT_DEADLINE_KEY] = deadline
        if self.timeouts is not None:
            extensions["timeout"] = self.timeouts
        if self.stamp:
            prepare_attempt(self.request, plan)
        return None if deadline is None else deadline.remaining()

    def after_response(self, response: httpx.Response) -> float | None:
        """The wait before a retry, or ``None`` to deliver ``response``."""
        if not self.replayable or not self.state.policy.matches_status(response.status_code):
            return None  # most responses: no retryOn condition, nothing else to decide
        request = self.request
        state = self.state.increment(
            method=request.method,
            request_headers=request.headers,
            response_status=response.status_code,
            retry_after=response.headers.get("retry-after"),
            route_retryable=self.retryable,
            budget=self.budget,
            deadline=self.plan.deadline,
        )
        return self._decide(state)

    def after_error(self, exc: Exception) -> float | httpx.Response | BaseException:
        """The wait before a retry, the earlier response to deliver, or the error to raise
        (``exc`` itself, or an earlier real error when ``exc`` is a local refusal)."""
        kind = error_kind(exc)
        if kind is None:
            if isinstance(exc, OutboundError) and self.state.retries:
                # A local refusal of a retry: the previous real outcome goes through.
                if self.last_response is not None:
                    return self.last_response
                if self.last_error is not None:
                    return self.last_error
            return exc
        if not self.replayable:
            return exc
        request = self.request
        state = self.state.increment(
            method=request.method,
            request_headers=request.headers,
            error_kind=kind,
            route_retryable=self.retryable,
            budget=self.budget,
            deadline=self.plan.deadline,
        )
        delay = self._decide(state)
        if delay is None:
            return exc
        self.last_error = exc
        self.last_response = None
        return delay

    def _decide(self, state: RetryState) -> float | None:
        self.state = state
        verdict = state.verdict
        if verdict is None or not verdict.retry:
            if verdict is not None and verdict.reason in _GAVE_UP:
                self.request.extensions[RETRIES_EXHAUSTED_KEY] = True
                if verdict.reason == RetryReason.BUDGET_EXHAUSTED and self.recorder is not None:
                    self.recorder.record_budget_exhausted(self.destination)
            return None
        plan = self.plan
        if plan.endpoint is not None:
            plan.tried.add(plan.endpoint.key)
        if self.recorder is not None:
            self.recorder.record_retry(self.destination, verdict.condition)
        return state.delay

    def kept(self, response: httpx.Response | None) -> None:
        """Remember the (read and closed) response of a try that is being retried."""
        self.last_response = response
        self.last_error = None

    def per_try_expired(self, limit: float) -> BaseException:
        """The error of a try cut short by its hard time limit."""
        return httpx.ReadTimeout(f"per-try time limit of {limit:.3f}s exceeded")


class _RetryCore:
    __slots__ = ("_policy", "_resolver", "_state", "rng", "stamp", "wall_clock")

    def __init__(
        self,
        policy: RetryPolicy | None,
        resolver: Resolver | None,
        state: OutboundState | None,
        rng: random.Random | None,
        wall_clock: Callable[[], float],
        stamp: bool,
    ) -> None:
        if policy is not None and not isinstance(policy, RetryPolicy):
            raise ConfigurationError("expected a RetryPolicy or None", field="policy", value=policy)
        if resolver is not None and not isinstance(resolver, Resolver):
            raise ConfigurationError(
                "expected a Resolver (resolve and resolve_async) or None",
                field="resolver",
                value=resolver,
            )
        if state is not None and not isinstance(state, OutboundState):
            raise ConfigurationError("expected an OutboundState", field="state", value=state)
        self._policy = policy
        self._resolver = resolver
        self._state = state if state is not None else OutboundState()
        self.rng = rng if rng is not None else random.Random()
        self.wall_clock = wall_clock
        self.stamp = stamp

    @property
    def resolver(self) -> Resolver | None:
        return self._resolver

    def policy_for(self, request: httpx.Request, plan: CallPlan) -> RetryPolicy | None:
        extensions = request.extensions
        if RETRY_KEY in extensions:
            override = extensions[RETRY_KEY]
            if override is None or isinstance(override, RetryPolicy):
                return override
            raise ConfigurationError(
                "expected a RetryPolicy, or None for no retries",
                field=f"extensions[{RETRY_KEY!r}]",
                value=override,
            )
        return plan.retry or self._policy

    def begin(self, request: httpx.Request, plan: CallPlan) -> _Call | None:
        """The call's retry state, or ``None`` when it is sent once as it is."""
        policy = self.policy_for(request, plan)
        destination = plan.destination
        if destination is None:
            return None
        if policy is None:
            if self.stamp:
                prepare_attempt(request, plan)
            return None
        state = self._state
        return _Call(
            request,
            plan,
            policy,
            state.budget(destination),
            state.clock,
            self.rng,
            self.wall_clock,
            state.recorder,
            self.stamp,
        )


class RetryTransport(AttemptStamper, httpx.BaseTransport):
    """Retries failed calls to mesh destinations (see the module docs for the rules).

    A call's destination is ``CallPlan.destination`` (set by the routing layer); without it,
    the request's host when ``resolver`` knows it. Calls to other hosts are sent once,
    untouched.

    Args:
        transport: the next transport (balancing, breaker, ... or a plain one).
        policy: the retry policy of calls without a route's or a per-call policy (default
            Istio's: 2 retries on ``connect-failure,refused-stream,503``); ``None`` for no
            retries unless a route or call asks.
        resolver: discovery, to recognise mesh hosts when no routing layer set the plan.
        state: the client's :class:`~meshware.outbound.transports.OutboundState`, which
            holds the per-destination retry budgets (and the clock and metrics recorder);
            a new one when ``None``.
        sleep: waits between tries (default :func:`time.sleep`; tests pass a fake).
        rng: the random source of the backoff jitter; seed it for reproducible waits.
        wall_clock: the wall clock, to read ``Retry-After`` dates (default
            :func:`time.time`).

    Raises:
        ConfigurationError: at construction for an argument of the wrong type; per call for
            a ``RETRY_KEY`` that is neither a ``RetryPolicy`` nor ``None``.
    """

    __slots__ = ("_core", "_sleep", "_transport")

    def __init__(
        self,
        transport: httpx.BaseTransport,
        *,
        policy: RetryPolicy | None = _DEFAULT_POLICY,
        resolver: Resolver | None = None,
        state: OutboundState | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._transport = transport
        self._core = _RetryCore(
            policy, resolver, state, rng, wall_clock, not stamped_below(transport)
        )
        self._sleep = sleep

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request``, retrying as the policy allows; returns the last response."""
        plan = plan_of(request)
        if plan.destination is None:
            resolver = self._core.resolver
            host = request.url.host
            if resolver is not None and resolver.resolve(host) is not None:
                plan.destination = host
        call = self._core.begin(request, plan)
        if call is None:
            return self._transport.handle_request(request)
        while True:
            try:
                call.start()
                response = self._transport.handle_request(request)
            except Exception as exc:
                outcome = call.after_error(exc)
                if outcome is exc:
                    raise
                if isinstance(outcome, BaseException):
                    # The earlier real error, with its own cause; exc stays its context.
                    raise outcome from outcome.__cause__
                if isinstance(outcome, httpx.Response):
                    return outcome
                delay = outcome
            else:
                delay_or_none = call.after_response(response)
                if delay_or_none is None:
                    return response
                try:
                    response.read()  # also closes it, freeing its connection
                except httpx.HTTPError:
                    response.close()
                    call.kept(None)
                else:
                    call.kept(response)
                delay = delay_or_none
            if delay > 0:
                self._sleep(delay)

    def close(self) -> None:
        """Close the next transport."""
        self._transport.close()


class AsyncRetryTransport(AttemptStamper, httpx.AsyncBaseTransport):
    """The async twin of :class:`RetryTransport`, with the same arguments; ``sleep``
    defaults to :func:`asyncio.sleep`. The per-try timeout (and the deadline) is also
    enforced as a hard limit on each try."""

    __slots__ = ("_core", "_sleep", "_transport")

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport,
        *,
        policy: RetryPolicy | None = _DEFAULT_POLICY,
        resolver: Resolver | None = None,
        state: OutboundState | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._transport = transport
        self._core = _RetryCore(
            policy, resolver, state, rng, wall_clock, not stamped_below(transport)
        )
        self._sleep = sleep

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send ``request``, retrying as the policy allows; returns the last response."""
        plan = plan_of(request)
        if plan.destination is None:
            resolver = self._core.resolver
            host = request.url.host
            if resolver is not None and await resolver.resolve_async(host) is not None:
                plan.destination = host
        call = self._core.begin(request, plan)
        if call is None:
            return await self._transport.handle_async_request(request)
        while True:
            try:
                limit = call.start()
                response = await self._try(request, call, limit)
            except Exception as exc:
                outcome = call.after_error(exc)
                if outcome is exc:
                    raise
                if isinstance(outcome, BaseException):
                    # The earlier real error, with its own cause; exc stays its context.
                    raise outcome from outcome.__cause__
                if isinstance(outcome, httpx.Response):
                    return outcome
                delay = outcome
            else:
                delay_or_none = call.after_response(response)
                if delay_or_none is None:
                    return response
                try:
                    await response.aread()  # also closes it, freeing its connection
                except httpx.HTTPError:
                    await response.aclose()
                    call.kept(None)
                else:
                    call.kept(response)
                delay = delay_or_none
            if delay > 0:
                await self._sleep(delay)

    async def _try(
        self, request: httpx.Request, call: _Call, limit: float | None
    ) -> httpx.Response:
        if limit is None:
            return await self._transport.handle_async_request(request)
        task = asyncio.current_task()
        if task is None or not _UNCANCEL:
            try:
                return await asyncio.wait_for(self._transport.handle_async_request(request), limit)
            except asyncio.TimeoutError as exc:
                raise call.per_try_expired(limit) from exc
        # What asyncio.timeout() does, with one timer and no other object: this runs on
        # every call that has a deadline. No task per try either, unlike wait_for.
        loop = asyncio.get_running_loop()
        expiry = _Expiry(task)
        handle = loop.call_at(loop.time() + limit, expiry.fire)
        try:
            response = await self._transport.handle_async_request(request)
        except asyncio.CancelledError as exc:
            handle.cancel()
            # Ours only if no other cancellation was asked for meanwhile.
            if expiry.fired and _uncancel(task) <= expiry.cancelling:
                raise call.per_try_expired(limit) from exc
            raise
        except BaseException:
            handle.cancel()
            if expiry.fired:
                _uncancel(task)
            raise
        handle.cancel()
        if expiry.fired:
            _uncancel(task)
        return response

    async def aclose(self) -> None:
        """Close the next transport."""
        await self._transport.aclose()
