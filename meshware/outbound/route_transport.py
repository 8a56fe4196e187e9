"""The routing layer of the outbound stack: VirtualService routes, faults and mirrors on httpx.

Two classes, as httpx splits its own transports (``HTTPTransport`` / ``AsyncHTTPTransport``):
:class:`RoutingTransport` wraps an ``httpx.BaseTransport`` for ``httpx.Client``, and
:class:`AsyncRoutingTransport` wraps an ``httpx.AsyncBaseTransport`` for
``httpx.AsyncClient``. They take the same arguments and route the same way.

In the outbound stack (telemetry → deadline → routing → retry → balancing → breaker →
connection) the routing layer sits under the deadline layer. For each call to a mesh service
it fills in the call's :class:`~meshware.outbound.call.CallPlan` — ``destination``, ``route``,
``subset``, ``retry``, ``retryable``, ``deadline``, ``hash_key``, ``fault``, ``mirrored`` —
and then, as Envoy's fault filter and router do:

1. waits out an injected delay (which counts against the call's deadline),
2. answers an injected abort itself, without calling the layers below,
3. bounds the call by its deadline (httpx timeouts and ``x-meshware-timeout``, through
   :func:`~meshware.outbound.transports.prepare_attempt`) — unless the next layer is a
   meshware layer below which each attempt is bounded anyway (the retry layer of the full
   stack), so that this is done once per attempt,
4. sends a copy of the call to the route's mirror, fire-and-forget,
5. passes the call to the next layer.

``plan.retry`` is the caller's ``RETRY_KEY`` override if there is one, else the route's
``retries`` — ``None`` when the route has none, which leaves the retry layer's default policy
in force. ``plan.deadline`` is the deadline in force (the outer layer's, or the inbound
request's) tightened by the route's ``timeout``; a per-call ``TIMEOUT_KEY`` replaces the
route's timeout, as Envoy's ``x-envoy-upstream-rq-timeout-ms`` header does.

A call whose host the resolver does not know (``resolve()`` returns ``None``) is not a mesh
call: it passes through untouched, without a plan.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import math
import random
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor

import httpx

from meshware.exceptions import ConfigurationError
from meshware.outbound.call import (
    CALL_KEY,
    HASH_KEY,
    RETRY_KEY,
    RETRYABLE_KEY,
    TIMEOUT_KEY,
    CallPlan,
    plan_of,
)
from meshware.outbound.deadline import Deadline, current_deadline
from meshware.outbound.discovery import Resolver
from meshware.outbound.errors import DeadlineExceeded
from meshware.outbound.faults import NO_FAULT, FaultDecision, RandomSource, abort_response
from meshware.outbound.mirror import MirrorObserver, MirrorOutcome, shadow_request
from meshware.outbound.retry import RetryPolicy
from meshware.outbound.routing import RouteSelection, RouteTable
from meshware.outbound.transports import prepare_attempt, stamped_below

__all__ = ["AsyncRoutingTransport", "RoutingTransport"]

Clock = Callable[[], float]


class _Router:
    """What the sync and async transports share: the routing decision and the mirror copy."""

    __slots__ = ("_calls", "_clock", "_max_pending", "_observer", "_resolver", "_rng", "_routes")

    def __init__(
        self,
        routes: RouteTable,
        resolver: Resolver,
        rng: RandomSource | None,
        mirror_observer: MirrorObserver | None,
        clock: Clock,
        max_pending_mirrors: int,
    ) -> None:
        if not isinstance(routes, RouteTable):
            raise ConfigurationError("expected a RouteTable", field="routes", value=routes)
        if not isinstance(resolver, Resolver):
            raise ConfigurationError(
                "expected a Resolver (an object with resolve() and resolve_async())",
                field="resolver",
                value=resolver,
            )
        if mirror_observer is not None and not isinstance(mirror_observer, MirrorObserver):
            raise ConfigurationError(
                "expected a MirrorObserver", field="mirror_observer", value=mirror_observer
            )
        if (
            isinstance(max_pending_mirrors, bool)
            or not isinstance(max_pending_mirrors, int)
            or max_pending_mirrors < 1
        ):
            raise ConfigurationError(
                "expected a whole number of at least 1",
                field="max_pending_mirrors",
                value=max_pending_mirrors,
            )
        self._routes = routes
        self._resolver = resolver
        self._rng: RandomSource = rng if rng is not None else random.Random()
        self._observer = mirror_observer if mirror_observer is not None else MirrorObserver()
        self._clock = clock
        self._max_pending = max_pending_mirrors
        self._calls = itertools.count(1)

    def route(self, request: httpx.Request, plan: CallPlan) -> tuple[RouteSelection, FaultDecision]:
        url = request.url
        path, _, query = url.raw_path.partition(b"?")
        selection = self._routes.select(
            url.host,
            request.method,
            path.decode("latin-1"),
            query.decode("latin-1"),
            request.headers,
            self._rng,
        )
        route = selection.http_route
        destination = selection.destination
        plan.destination = destination.host
        plan.route = selection.name
        plan.subset = destination.subset

        extensions = request.extensions
        if RETRY_KEY in extensions:
            retry = extensions[RETRY_KEY]
            if retry is not None and not isinstance(retry, RetryPolicy):
                raise ConfigurationError(
                    "expected a RetryPolicy, or None for no retries",
                    field=f"extensions[{RETRY_KEY!r}]",
                    value=retry,
                )
            plan.retry = retry
        else:
            # None leaves the choice to the retry layer's default policy.
            plan.retry = route.retries
        if route.retryable or extensions.get(RETRYABLE_KEY) is True:
            plan.retryable = True
        hash_key = extensions.get(HASH_KEY)
        if hash_key is not None:
            if not isinstance(hash_key, str):
                raise ConfigurationError(
                    "expected a string", field=f"extensions[{HASH_KEY!r}]", value=hash_key
                )
            plan.hash_key = hash_key

        # A per-call timeout replaces the route's, as Envoy's x-envoy-upstream-rq-timeout-ms
        # does; the inbound deadline bounds both.
        timeout = route.timeout
        override = extensions.get(TIMEOUT_KEY)
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
            timeout = float(override)
        deadline = plan.deadline if plan.deadline is not None else current_deadline()
        if timeout is not None:
            clock = deadline.clock if deadline is not None else self._clock
            deadline = Deadline(at=clock() + timeout, clock=clock).earliest(deadline)
        plan.deadline = deadline

        fault = route.fault.decide(self._rng) if route.fault is not None else NO_FAULT
        plan.fault = fault.kind
        return selection, fault

    def delay_budget(self, seconds: float, plan: CallPlan) -> tuple[float, float | None]:
        """How long to sleep, and the time that was left when the delay outlasts the deadline."""
        deadline = plan.deadline
        if deadline is not None:
            left = deadline.remaining()
            if seconds >= left:
                return left, left
        return seconds, None

    def deadline_error(
        self, seconds: float, left: float, plan: CallPlan, request: httpx.Request
    ) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"the injected delay of {seconds:.3f}s outlasts the {left:.3f}s left before the "
            f"deadline",
            destination=plan.destination or request.url.host,
            request=request,
        )

    def shadow(
        self, request: httpx.Request, plan: CallPlan, selection: RouteSelection
    ) -> httpx.Request | None:
        route = selection.http_route
        mirror = route.mirror
        if mirror is None or not route.should_mirror(self._rng):
            return None
        mirror_plan = CallPlan(
            destination=mirror.host,
            route=plan.route,
            subset=mirror.subset,
            retry=None,
            deadline=plan.deadline,
            hash_key=plan.hash_key,
        )
        copy = shadow_request(request, mirror_plan)
        if copy is None:
            self._observer._count("skipped_streaming")
        return copy

    def dispatched(self, plan: CallPlan, copy: httpx.Request) -> None:
        mirror_plan: CallPlan = copy.extensions[CALL_KEY]
        plan.mirrored = mirror_plan.subset or mirror_plan.destination
        self._observer._count("mirrored")

    def record(
        self,
        call_id: int,
        role: str,
        plan: CallPlan,
        start: float,
        response: httpx.Response | None,
        error: Exception | None,
    ) -> None:
        self._observer.record(
            MirrorOutcome(
                call_id=call_id,
                role=role,
                route=plan.route,
                destination=plan.destination or "",
                subset=plan.subset,
                status=None if response is None else response.status_code,
                error=error,
                latency_s=self._clock() - start,
            )
        )


class RoutingTransport(httpx.BaseTransport):
    """Routes ``httpx.Client`` calls by VirtualService rules; injects faults; mirrors.

    ::

        transport = RoutingTransport(
            httpx.HTTPTransport(), routes=RouteTable.from_yaml(text), resolver=registry
        )
        client = httpx.Client(transport=transport)

    Copies for mirrors are sent from a small thread pool (``mirror_workers`` threads, started
    on the first mirrored call), each in a copy of the caller's context. :meth:`close` waits
    for the copies already accepted (threads cannot be cancelled; each copy is bounded by the
    call's deadline and httpx timeouts), then closes ``inner``.

    Args:
        inner: the next transport of the stack (retry, balancing, ... or a plain httpx
            transport).
        routes: the :class:`~meshware.outbound.routing.RouteTable` to route by.
        resolver: discovery; it decides which hosts are mesh services (``None`` means pass
            the call through untouched).
        rng: the random source of weighted choices and of fault and mirror percentages (a
            ``random.Random``; tests pass a seeded one). A new ``random.Random()`` by default.
        sleep: waits out injected delays; :func:`time.sleep` by default. Tests pass a fake
            that records the delay (and advances a fake clock).
        mirror_observer: receives mirror outcomes and keeps the counters; the transport makes
            its own :class:`~meshware.outbound.mirror.MirrorObserver` when none is given
            (read it from :attr:`mirror_observer`).
        clock: the monotonic clock of route timeouts (when no deadline is in force) and of
            mirror latencies (default :func:`time.monotonic`).
        max_pending_mirrors: the most copies in flight at once (default 64); more are
            dropped and counted in ``MirrorObserver.dropped``.
        mirror_workers: the threads that send copies (default 4).

    Raises:
        ConfigurationError: an argument has the wrong type or range; when routing a call, a
            per-call override in ``request.extensions`` has the wrong type.
        DeadlineExceeded: (from a call) an injected delay outlasts the call's deadline; it is
            raised at the deadline.
    """

    def __init__(
        self,
        inner: httpx.BaseTransport,
        *,
        routes: RouteTable,
        resolver: Resolver,
        rng: RandomSource | None = None,
        sleep: Callable[[float], None] | None = None,
        mirror_observer: MirrorObserver | None = None,
        clock: Clock = time.monotonic,
        max_pending_mirrors: int = 64,
        mirror_workers: int = 4,
    ) -> None:
        if not isinstance(inner, httpx.BaseTransport):
            raise ConfigurationError(
                "expected an httpx.BaseTransport (use AsyncRoutingTransport for httpx.AsyncClient)",
                field="inner",
                value=inner,
            )
        if (
            isinstance(mirror_workers, bool)
            or not isinstance(mirror_workers, int)
            or (mirror_workers < 1)
        ):
            raise ConfigurationError(
                "expected a whole number of at least 1",
                field="mirror_workers",
                value=mirror_workers,
            )
        self._router = _Router(routes, resolver, rng, mirror_observer, clock, max_pending_mirrors)
        self._inner = inner
        # Below the routing layer of a full stack, the innermost layer bounds each attempt.
        self._stamp = not stamped_below(inner)
        self._sleep = sleep if sleep is not None else time.sleep
        self._workers = mirror_workers
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pending = 0
        self._closed = False

    @property
    def mirror_observer(self) -> MirrorObserver:
        """The observer that counts this transport's mirrored calls."""
        return self._router._observer

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Route one call and pass it on (see the module documentation for the steps)."""
        router = self._router
        if router._resolver.resolve(request.url.host) is None:
            return self._inner.handle_request(request)
        plan = plan_of(request)
        selection, fault = router.route(request, plan)
        if fault:
            if fault.delay_s:
                seconds, left = router.delay_budget(fault.delay_s, plan)
                if seconds > 0.0:
                    self._sleep(seconds)
                if left is not None:
                    raise router.deadline_error(fault.delay_s, left, plan, request)
            if fault.abort_status is not None:
                return abort_response(fault.abort_status, request)
        if self._stamp and plan.deadline is not None:
            prepare_attempt(request, plan)
        copy = router.shadow(request, plan, selection)
        if copy is None:
            return self._inner.handle_request(request)
        call_id = next(router._calls)
        if not self._submit(copy, call_id, plan):
            return self._inner.handle_request(request)
        return self._primary(request, plan, call_id)

    def _primary(self, request: httpx.Request, plan: CallPlan, call_id: int) -> httpx.Response:
        router = self._router
        start = router._clock()
        try:
            response = self._inner.handle_request(request)
        except Exception as exc:
            router.record(call_id, "primary", plan, start, None, exc)
            raise
        router.record(call_id, "primary", plan, start, response, None)
        return response

    def _submit(self, copy: httpx.Request, call_id: int, plan: CallPlan) -> bool:
        context = contextvars.copy_context()
        # Submitting under the lock keeps close() from shutting the pool down in between.
        with self._lock:
            if self._closed or self._pending >= self._router._max_pending:
                self._router._observer._count("dropped")
                return False
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=self._workers, thread_name_prefix="meshware-mirror"
                )
            self._pending += 1
            self._router.dispatched(plan, copy)
            future = self._pool.submit(context.run, self._send_copy, copy, call_id)
        future.add_done_callback(self._copy_done)
        return True

    def _send_copy(self, copy: httpx.Request, call_id: int) -> None:
        router = self._router
        plan: CallPlan = copy.extensions[CALL_KEY]
        start = router._clock()
        try:
            response = self._inner.handle_request(copy)
        except Exception as exc:
            router.record(call_id, "mirror", plan, start, None, exc)
            return
        try:
            router.record(call_id, "mirror", plan, start, response, None)
            response.read()
        except Exception:  # a body that fails to arrive changes nothing for the real call
            pass
        finally:
            response.close()

    def _copy_done(self, future: Future[None]) -> None:
        with self._lock:
            self._pending -= 1

    def close(self) -> None:
        """Wait for the copies already accepted (queued or running), then close ``inner``.

        Later mirrored calls still go out; their copies are dropped and counted.
        """
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        self._inner.close()


class AsyncRoutingTransport(httpx.AsyncBaseTransport):
    """Routes ``httpx.AsyncClient`` calls by VirtualService rules; injects faults; mirrors.

    ::

        transport = AsyncRoutingTransport(
            httpx.AsyncHTTPTransport(), routes=RouteTable.from_yaml(text), resolver=registry
        )
        client = httpx.AsyncClient(transport=transport)

    Copies for mirrors are sent from background tasks on the running event loop; the
    transport keeps a reference to each until it finishes, and swallows (and counts) their
    errors. :meth:`aclose` cancels the copies still in flight, waits for them to end, then
    closes ``inner``.

    Args:
        inner: the next transport of the stack (retry, balancing, ... or a plain httpx
            transport).
        routes: the :class:`~meshware.outbound.routing.RouteTable` to route by.
        resolver: discovery; it decides which hosts are mesh services (``None`` means pass
            the call through untouched).
        rng: the random source of weighted choices and of fault and mirror percentages (a
            ``random.Random``; tests pass a seeded one). A new ``random.Random()`` by default.
        sleep: waits out injected delays; :func:`asyncio.sleep` by default. Tests pass a fake
            that records the delay (and advances a fake clock).
        mirror_observer: receives mirror outcomes and keeps the counters; the transport makes
            its own :class:`~meshware.outbound.mirror.MirrorObserver` when none is given
            (read it from :attr:`mirror_observer`).
        clock: the monotonic clock of route timeouts (when no deadline is in force) and of
            mirror latencies (default :func:`time.monotonic`).
        max_pending_mirrors: the most copies in flight at once (default 64); more are
            dropped and counted in ``MirrorObserver.dropped``.

    Raises:
        ConfigurationError: an argument has the wrong type or range; when routing a call, a
            per-call override in ``request.extensions`` has the wrong type.
        DeadlineExceeded: (from a call) an injected delay outlasts the call's deadline; it is
            raised at the deadline.
    """

    def __init__(
        self,
        inner: httpx.AsyncBaseTransport,
        *,
        routes: RouteTable,
        resolver: Resolver,
        rng: RandomSource | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        mirror_observer: MirrorObserver | None = None,
        clock: Clock = time.monotonic,
        max_pending_mirrors: int = 64,
    ) -> None:
        if not isinstance(inner, httpx.AsyncBaseTransport):
            raise ConfigurationError(
                "expected an httpx.AsyncBaseTransport (use RoutingTransport for httpx.Client)",
                field="inner",
                value=inner,
            )
        self._router = _Router(routes, resolver, rng, mirror_observer, clock, max_pending_mirrors)
        self._inner = inner
        # Below the routing layer of a full stack, the innermost layer bounds each attempt.
        self._stamp = not stamped_below(inner)
        self._sleep = sleep if sleep is not None else asyncio.sleep
        self._tasks: set[asyncio.Task[None]] = set()
        # Copies whose outcome is already counted (a response, then reading its body).
        self._answered: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def mirror_observer(self) -> MirrorObserver:
        """The observer that counts this transport's mirrored calls."""
        return self._router._observer

    @property
    def pending_mirrors(self) -> int:
        """Copies in flight now."""
        return len(self._tasks)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Route one call and pass it on (see the module documentation for the steps)."""
        router = self._router
        if await router._resolver.resolve_async(request.url.host) is None:
            return await self._inner.handle_async_request(request)
        plan = plan_of(request)
        selection, fault = router.route(request, plan)
        if fault:
            if fault.delay_s:
                seconds, left = router.delay_budget(fault.delay_s, plan)
                if seconds > 0.0:
                    await self._sleep(seconds)
                if left is not None:
                    raise router.deadline_error(fault.delay_s, left, plan, request)
            if fault.abort_status is not None:
                return abort_response(fault.abort_status, request)
        if self._stamp and plan.deadline is not None:
            prepare_attempt(request, plan)
        copy = router.shadow(request, plan, selection)
        if copy is None:
            return await self._inner.handle_async_request(request)
        if self._closed or len(self._tasks) >= router._max_pending:
            router._observer._count("dropped")
            return await self._inner.handle_async_request(request)
        call_id = next(router._calls)
        router.dispatched(plan, copy)
        task = asyncio.get_running_loop().create_task(self._send_copy(copy, call_id))
        self._tasks.add(task)
        task.add_done_callback(self._copy_done)
        start = router._clock()
        try:
            response = await self._inner.handle_async_request(request)
        except Exception as exc:
            router.record(call_id, "primary", plan, start, None, exc)
            raise
        router.record(call_id, "primary", plan, start, response, None)
        return response

    async def _send_copy(self, copy: httpx.Request, call_id: int) -> None:
        router = self._router
        plan: CallPlan = copy.extensions[CALL_KEY]
        start = router._clock()
        try:
            response = await self._inner.handle_async_request(copy)
        except Exception as exc:
            router.record(call_id, "mirror", plan, start, None, exc)
            return
        try:
            router.record(call_id, "mirror", plan, start, response, None)
            task = asyncio.current_task()
            if task is not None:
                self._answered.add(task)
            await response.aread()
        except Exception:  # a body that fails to arrive changes nothing for the real call
            pass
        finally:
            await response.aclose()

    def _copy_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task in self._answered:
            # Cancelled while reading a body: already counted among the responses.
            self._answered.discard(task)
        elif task.cancelled():
            self._router._observer._count("cancelled")

    async def aclose(self) -> None:
        """Cancel the copies still in flight, wait for them to end, then close ``inner``."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self._inner.aclose()
