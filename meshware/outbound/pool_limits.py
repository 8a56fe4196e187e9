"""Connection-pool limits: bound the calls in flight to a destination, and the queue behind them.

:class:`ConnectionPoolLimits` is Istio's DestinationRule ``trafficPolicy.connectionPool``
block; :class:`ConcurrencyLimiter` enforces it in process, the way Envoy's circuit-breaking
thresholds do:

- up to ``max_connections`` calls run at once (``tcp.maxConnections``; one HTTP/1.1
  connection carries one request at a time);
- up to ``max_pending_requests`` more wait, first come first served
  (``http.http1MaxPendingRequests``);
- any call beyond that is shed at once with :class:`~meshware.outbound.errors.PoolOverloaded`.
  The queue is never unbounded;
- a waiting call gives up with :class:`~meshware.outbound.errors.DeadlineExceeded` when its
  deadline (or timeout) comes.

One limiter may be shared by threads and event loops: sync callers block on a thread event,
async callers await a future, and a slot freed by either kind is handed to the next waiter
of either kind.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import httpx

from meshware.exceptions import ConfigurationError
from meshware.outbound.deadline import Deadline, current_deadline, parse_duration
from meshware.outbound.errors import DeadlineExceeded, PoolOverloaded

__all__ = ["UNLIMITED", "ConcurrencyLimiter", "ConnectionPoolLimits"]

#: Istio's "no limit" for connection-pool counts (2^32 - 1).
UNLIMITED: Final = 2**32 - 1

_TCP_KEYS = {"maxConnections": "max_connections", "connectTimeout": "connect_timeout"}
_HTTP_KEYS = {
    "http1MaxPendingRequests": "max_pending_requests",
    "maxRequestsPerConnection": "max_requests_per_connection",
    "idleTimeout": "idle_timeout",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionPoolLimits:
    """Istio's ``connectionPool`` limits, with Istio's defaults.

    Attributes:
        max_connections: calls in flight at once (``tcp.maxConnections``; default
            :data:`UNLIMITED`). At least 1.
        max_pending_requests: calls that may wait for a free slot
            (``http.http1MaxPendingRequests``; default :data:`UNLIMITED`). ``0`` means no
            queue: a call that finds no free slot is shed at once.
        max_requests_per_connection: requests one connection may carry before it is closed
            and the next call opens a new one (``http.maxRequestsPerConnection``; ``1``
            turns keep-alive off); ``None`` (or ``0``) for no limit. Applied by the
            connection layer (:mod:`meshware.outbound.transport_connection`), not by the
            limiter.
        connect_timeout: seconds allowed to open a connection (``tcp.connectTimeout``,
            default 10 s).
        idle_timeout: seconds an idle connection is kept (``http.idleTimeout``), applied by
            the connection layer; ``None`` keeps the transport's own keep-alive expiry
            (httpx's 5 s by default) rather than Istio's 1 h, because servers close idle
            connections well before an hour.

    Raises:
        ConfigurationError: a value is out of range (names the field).
    """

    max_connections: int = UNLIMITED
    max_pending_requests: int = UNLIMITED
    max_requests_per_connection: int | None = None
    connect_timeout: float = 10.0
    idle_timeout: float | None = None

    def __post_init__(self) -> None:
        _check_count(self.max_connections, "max_connections", minimum=1)
        _check_count(self.max_pending_requests, "max_pending_requests", minimum=0)
        if self.max_requests_per_connection is not None:
            _check_count(self.max_requests_per_connection, "max_requests_per_connection", 0)
            if self.max_requests_per_connection == 0:
                object.__setattr__(self, "max_requests_per_connection", None)
        _check_seconds(self.connect_timeout, "connect_timeout")
        if self.idle_timeout is not None:
            _check_seconds(self.idle_timeout, "idle_timeout")

    @classmethod
    def from_mapping(
        cls, spec: Mapping[str, object], *, prefix: str = "connectionPool"
    ) -> ConnectionPoolLimits:
        """Build the limits from a DestinationRule ``connectionPool`` block.

        Understood: ``tcp.maxConnections``, ``tcp.connectTimeout``,
        ``http.http1MaxPendingRequests``, ``http.maxRequestsPerConnection`` and
        ``http.idleTimeout``. As in Istio, a count of ``0`` means "not set" (no limit).
        Other Istio keys are refused by name rather than silently ignored.

        Args:
            spec: the ``connectionPool`` mapping, with ``tcp`` and ``http`` sub-blocks.
            prefix: the dotted path of the block, used to name fields in errors.

        Raises:
            ConfigurationError: a key is unknown or unsupported, or a value is invalid;
                ``field`` is the dotted path (``"connectionPool.tcp.maxConnections"``).
        """
        _require_mapping(spec, prefix)
        values: dict[str, Any] = {}
        for section, keys in (("tcp", _TCP_KEYS), ("http", _HTTP_KEYS)):
            block = spec.get(section)
            if block is None:
                continue
            if not isinstance(block, Mapping):
                raise ConfigurationError(
                    f"expected a mapping, got {type(block).__name__}",
                    field=f"{prefix}.{section}",
                    value=block,
                )
            for key, value in block.items():
                path = f"{prefix}.{section}.{key}"
                name = keys.get(key)
                if name is None:
                    raise ConfigurationError(
                        f"is not supported; understood keys are {', '.join(keys)}",
                        field=path,
                        value=value,
                    )
                if name in ("connect_timeout", "idle_timeout"):
                    seconds = parse_duration(value, field=path)
                    if seconds < 0.001:
                        raise ConfigurationError("expected at least 1ms", field=path, value=value)
                    values[name] = seconds
                    continue
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ConfigurationError(
                        "expected a whole number, 0 or more (0: no limit)", field=path, value=value
                    )
                if value == 0:
                    continue  # Istio: 0 leaves the default (no limit)
                values[name] = value
        for key in spec:
            if key not in ("tcp", "http"):
                raise ConfigurationError(
                    "unknown key; expected tcp or http", field=f"{prefix}.{key}", value=key
                )
        return cls(**values)

    @property
    def per_connection(self) -> tuple[int | None, float | None] | None:
        """``(max_requests_per_connection, idle_timeout)``, the settings that shape each
        connection rather than the calls in flight; ``None`` when neither is set."""
        if self.max_requests_per_connection is None and self.idle_timeout is None:
            return None
        return (self.max_requests_per_connection, self.idle_timeout)

    def httpx_limits(self) -> httpx.Limits:
        """The matching :class:`httpx.Limits`, for an httpx transport of your own
        (``max_connections`` and ``idle_timeout``; httpx has no per-connection request limit,
        which meshware's connection layer applies itself)."""
        max_connections = None if self.max_connections == UNLIMITED else self.max_connections
        if self.idle_timeout is None:
            return httpx.Limits(max_connections=max_connections)
        return httpx.Limits(max_connections=max_connections, keepalive_expiry=self.idle_timeout)


class _Waiter:
    __slots__ = ("cancelled", "granted")

    def __init__(self) -> None:
        self.granted = False
        self.cancelled = False

    def wake(self) -> bool:
        raise NotImplementedError


class _ThreadWaiter(_Waiter):
    __slots__ = ("event",)

    def __init__(self) -> None:
        super().__init__()
        self.event = threading.Event()

    def wake(self) -> bool:
        self.event.set()
        return True


class _TaskWaiter(_Waiter):
    __slots__ = ("future", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()

    def wake(self) -> bool:
        try:
            self.loop.call_soon_threadsafe(_resolve, self.future)
        except RuntimeError:  # its loop is closed: the waiter is gone
            return False
        return True


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


_W = TypeVar("_W", bound=_Waiter)


class ConcurrencyLimiter:
    """Admits calls to one destination within :class:`ConnectionPoolLimits`.

    Use :meth:`slot` (sync) or :meth:`slot_async` (async) around a call, or
    :meth:`acquire`/:meth:`acquire_async` and :meth:`release` by hand::

        async with limiter.slot_async():
            response = await send(request)

    Args:
        destination: the service the limits apply to, named in errors.
        limits: the limits to enforce.
    """

    __slots__ = (
        "_in_flight",
        "_lock",
        "_max",
        "_max_pending",
        "_pending",
        "_shed_total",
        "_timed_out_total",
        "_waiters",
        "destination",
        "limits",
    )

    def __init__(self, destination: str, limits: ConnectionPoolLimits) -> None:
        self.destination = destination
        self.limits = limits
        self._max = limits.max_connections
        self._max_pending = limits.max_pending_requests
        self._lock = threading.Lock()
        self._in_flight = 0
        self._pending = 0
        self._waiters: deque[_Waiter] = deque()
        self._shed_total = 0
        self._timed_out_total = 0

    @property
    def in_flight(self) -> int:
        """Calls admitted and not yet released."""
        return self._in_flight

    @property
    def pending(self) -> int:
        """Calls waiting for a slot."""
        return self._pending

    @property
    def shed_total(self) -> int:
        """Calls refused with :class:`PoolOverloaded` since the limiter was created."""
        return self._shed_total

    @property
    def timed_out_total(self) -> int:
        """Waiting calls that gave up at their deadline since the limiter was created."""
        return self._timed_out_total

    def acquire(self, *, deadline: Deadline | None = None, timeout: float | None = None) -> None:
        """Take a slot, waiting in line if need be (blocks the calling thread).

        Do not call it on an event loop's thread; use :meth:`acquire_async` there.

        Args:
            deadline: the request's deadline; the current one (see
                :func:`~meshware.outbound.deadline.current_deadline`) when omitted.
            timeout: the longest wait in seconds, on top of the deadline.

        Raises:
            PoolOverloaded: the queue is full; the call is shed without waiting.
            DeadlineExceeded: the deadline (or timeout) came while waiting in line.
        """
        wait = _wait_limit(deadline, timeout)
        waiter = self._admit(wait, _ThreadWaiter)
        if waiter is None:
            return
        if waiter.event.wait(wait):
            return
        self._give_up(waiter)

    async def acquire_async(
        self, *, deadline: Deadline | None = None, timeout: float | None = None
    ) -> None:
        """Take a slot, waiting in line if need be (without blocking the event loop).

        Arguments and errors are those of :meth:`acquire`. If the waiting task is
        cancelled, its place in line (or a slot just handed to it) is given back.
        """
        wait = _wait_limit(deadline, timeout)
        loop = asyncio.get_running_loop()
        waiter = self._admit(wait, lambda: _TaskWaiter(loop))
        if waiter is None:
            return
        try:
            if wait is None:
                await waiter.future
            else:
                await asyncio.wait_for(waiter.future, wait)
        except asyncio.TimeoutError:
            self._give_up(waiter)
        except BaseException:
            with self._lock:
                owned = waiter.granted
                if not owned:
                    waiter.cancelled = True
                    self._pending -= 1
            if owned:
                self.release()
            raise

    def release(self) -> None:
        """Give a slot back; the next waiter in line, if any, gets it."""
        with self._lock:
            waiters = self._waiters
            while waiters:
                waiter = waiters.popleft()
                if waiter.cancelled:
                    continue
                waiter.granted = True
                self._pending -= 1
                if waiter.wake():
                    return
            if self._in_flight > 0:
                self._in_flight -= 1

    @contextmanager
    def slot(
        self, *, deadline: Deadline | None = None, timeout: float | None = None
    ) -> Iterator[None]:
        """Hold a slot for the ``with`` block (see :meth:`acquire`)."""
        self.acquire(deadline=deadline, timeout=timeout)
        try:
            yield
        finally:
            self.release()

    @asynccontextmanager
    async def slot_async(
        self, *, deadline: Deadline | None = None, timeout: float | None = None
    ) -> AsyncIterator[None]:
        """Hold a slot for the ``async with`` block (see :meth:`acquire_async`)."""
        await self.acquire_async(deadline=deadline, timeout=timeout)
        try:
            yield
        finally:
            self.release()

    def _admit(self, wait: float | None, make_waiter: Callable[[], _W]) -> _W | None:
        with self._lock:
            if self._in_flight < self._max:
                self._in_flight += 1
                return None
            if self._pending >= self._max_pending:
                self._shed_total += 1
                in_flight, pending = self._in_flight, self._pending
                overloaded = True
            else:
                overloaded = False
                if wait is not None and wait <= 0.0:
                    self._timed_out_total += 1
                    in_flight, pending = self._in_flight, self._pending
                else:
                    waiter = make_waiter()
                    self._waiters.append(waiter)
                    self._pending += 1
                    return waiter
        if overloaded:
            raise PoolOverloaded(
                f"connection pool is full: {in_flight} in flight (maxConnections "
                f"{self._max}), {pending} waiting (http1MaxPendingRequests "
                f"{self._max_pending}); call shed",
                destination=self.destination,
            )
        raise DeadlineExceeded(
            f"no time left to wait for a connection-pool slot ({in_flight} in flight)",
            destination=self.destination,
        )

    def _give_up(self, waiter: _Waiter) -> None:
        with self._lock:
            if waiter.granted:
                return  # the slot arrived just as the wait ended: keep it
            waiter.cancelled = True
            self._pending -= 1
            self._timed_out_total += 1
            in_flight = self._in_flight
        raise DeadlineExceeded(
            f"deadline reached while waiting for a connection-pool slot ({in_flight} in flight)",
            destination=self.destination,
        )


def _wait_limit(deadline: Deadline | None, timeout: float | None) -> float | None:
    if deadline is None:
        deadline = current_deadline()
    if deadline is None:
        return timeout
    left = deadline.remaining()
    return left if timeout is None or left < timeout else timeout


def _require_mapping(value: object, path: str) -> None:
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            f"expected a mapping, got {type(value).__name__}", field=path, value=value
        )


def _check_count(value: object, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(
            f"expected a whole number, {minimum} or more", field=name, value=value
        )


def _check_seconds(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError("expected a number of seconds", field=name, value=value)
    if math.isnan(value) or math.isinf(value) or value <= 0:
        raise ConfigurationError(
            "expected a finite number of seconds, more than 0", field=name, value=value
        )
