"""A circuit breaker per destination: stop calling a service that keeps failing, then probe it.

States, as in Nygard's *Release It!*:

- **closed**: calls go through; failures are counted. ``failure_threshold`` consecutive
  failures (or, with ``failure_window`` set, that many failures within the window) open it.
- **open**: calls are refused at once with :class:`~meshware.outbound.errors.CircuitOpen`,
  without touching the network, for ``recovery_timeout`` seconds.
- **half-open**: after that, exactly one call (the probe) is let through while every other
  call is still refused. Its success closes the breaker; its failure opens it again for
  another ``recovery_timeout``.

The breaker never hides an error: the call that trips it fails with its own error, and only
later calls get ``CircuitOpen``. It is thread-safe and usable from sync and async code alike:
its methods never block or await, so one breaker can be shared by threads and event loops.

Outcomes are plain method calls (:meth:`CircuitBreaker.on_success`,
:meth:`CircuitBreaker.on_failure`), so a transport can count a 503 response as a failure
although no exception was raised; the context-manager form counts exceptions for you.
"""

from __future__ import annotations

import enum
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from types import TracebackType

from meshware.exceptions import ConfigurationError
from meshware.outbound.errors import CircuitOpen

__all__ = ["BreakerPolicy", "BreakerState", "CircuitBreaker"]


class BreakerState(enum.Enum):
    """The state of a :class:`CircuitBreaker`; ``.value`` is the name used in logs."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


@dataclass(frozen=True, slots=True, kw_only=True)
class BreakerPolicy:
    """When a breaker opens and when it tries again.

    Attributes:
        failure_threshold: failures that open the breaker (default 5).
        failure_window: ``None`` (default) counts *consecutive* failures, a success resets
            the count; a number of seconds counts failures within that sliding window
            instead, successes notwithstanding.
        recovery_timeout: seconds the breaker stays open before it lets one probe call
            through (default 30). A probe that has not reported back after this long is
            presumed lost and another one is allowed.

    Raises:
        ConfigurationError: a value is out of range (names the field).
    """

    failure_threshold: int = 5
    failure_window: float | None = None
    recovery_timeout: float = 30.0

    def __post_init__(self) -> None:
        threshold = self.failure_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
            raise ConfigurationError(
                "expected a whole number of failures, 1 or more",
                field="failure_threshold",
                value=threshold,
            )
        if self.failure_window is not None:
            _check_positive_seconds(self.failure_window, "failure_window")
        _check_positive_seconds(self.recovery_timeout, "recovery_timeout")


_MAX_SOURCES = 1024


def _every_exception(exc: BaseException) -> bool:
    return True


class CircuitBreaker:
    """The circuit breaker of one destination.

    Use it explicitly::

        breaker.before_call()          # raises CircuitOpen when the call must not be made
        try:
            response = send()
        except httpx.TransportError:
            breaker.on_failure()
            raise
        if response.status_code >= 500:
            breaker.on_failure()
        else:
            breaker.on_success()

    or as a context manager (``with breaker:`` / ``async with breaker:``), which calls
    :meth:`before_call` on entry and, on exit, :meth:`on_success` when the block finished,
    :meth:`on_failure` when it raised an exception that ``is_failure`` accepts, and
    :meth:`on_success` for other exceptions (the destination answered; the error is the
    caller's). ``BaseException``\\ s that are not ``Exception``\\ s (task cancellation,
    ``KeyboardInterrupt``) say nothing about the destination: they only :meth:`release` a
    probe. Exceptions always propagate unchanged.

    Args:
        destination: the service this breaker guards, named in :class:`CircuitOpen`.
        policy: thresholds and timeouts (default :class:`BreakerPolicy()`).
        clock: a monotonic clock returning seconds (default :func:`time.monotonic`).
        is_failure: decides which exceptions raised in the ``with`` block count as
            failures (default: every ``Exception``).
        on_state_change: called as ``on_state_change(breaker, old, new)`` on every
            transition, outside the breaker's lock.
    """

    __slots__ = (
        "_clock",
        "_consecutive",
        "_failing",
        "_failures",
        "_is_failure",
        "_lock",
        "_on_state_change",
        "_opened_at",
        "_probe_in_flight",
        "_probe_started",
        "_state",
        "destination",
        "policy",
    )

    def __init__(
        self,
        destination: str,
        policy: BreakerPolicy | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        is_failure: Callable[[BaseException], bool] | None = None,
        on_state_change: Callable[[CircuitBreaker, BreakerState, BreakerState], None] | None = None,
    ) -> None:
        self.destination = destination
        self.policy = policy if policy is not None else BreakerPolicy()
        self._clock = clock
        self._is_failure = is_failure if is_failure is not None else _every_exception
        self._on_state_change = on_state_change
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._opened_at = -math.inf
        self._probe_in_flight = False
        self._probe_started = -math.inf
        self._consecutive = 0
        self._failures: deque[float] = deque(maxlen=self.policy.failure_threshold)
        # When each source (endpoint) failed last, since the last success (consecutive
        # counting) or within the window; bounded by the destination's endpoints.
        self._failing: dict[Hashable, float] = {}

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.destination!r}, state={self.state.value!r})"

    @property
    def state(self) -> BreakerState:
        """The current state. An open breaker whose recovery timeout has passed reports
        ``HALF_OPEN``: the next call will be let through as the probe."""
        state = self._state
        if state is BreakerState.OPEN and (
            self._clock() - self._opened_at >= self.policy.recovery_timeout
        ):
            return BreakerState.HALF_OPEN
        return state

    def allow(self) -> bool:
        """Whether a call may be made now. In half-open, ``True`` reserves the single probe:
        the caller must then report :meth:`on_success`, :meth:`on_failure` or :meth:`release`."""
        if self._state is BreakerState.CLOSED:  # the common case, without the lock
            return True
        return self._allow_locked()

    def _allow_locked(self) -> bool:
        transition = None
        with self._lock:
            state = self._state
            if state is BreakerState.CLOSED:
                return True
            now = self._clock()
            recovery = self.policy.recovery_timeout
            if state is BreakerState.OPEN:
                if now - self._opened_at < recovery:
                    return False
                self._state = BreakerState.HALF_OPEN
                transition = (BreakerState.OPEN, BreakerState.HALF_OPEN)
            elif self._probe_in_flight and now - self._probe_started < recovery:
                return False
            self._probe_in_flight = True
            self._probe_started = now
        self._notify(transition)
        return True

    def before_call(self) -> None:
        """Admit a call or refuse it.

        Raises:
            CircuitOpen: the breaker is open, or half-open with its probe already out.
        """
        if self.allow():
            return
        wait = self.policy.recovery_timeout - (self._clock() - self._opened_at)
        if wait > 0:
            detail = f"circuit breaker is open; next probe in {wait:.1f}s"
        else:
            detail = "circuit breaker is half-open and its probe call is in flight"
        raise CircuitOpen(detail, destination=self.destination)

    def on_success(self) -> None:
        """Report a call that succeeded. In half-open this closes the breaker.

        Results that arrive while the breaker is open (from calls admitted before it
        tripped) are ignored.
        """
        if self._state is BreakerState.CLOSED and not self._consecutive:
            return  # nothing to reset; skip the lock on the hot path
        transition = None
        with self._lock:
            state = self._state
            if state is BreakerState.CLOSED:
                self._consecutive = 0
                if self.policy.failure_window is None:
                    self._failing.clear()
            elif state is BreakerState.HALF_OPEN:
                self._close()
                transition = (BreakerState.HALF_OPEN, BreakerState.CLOSED)
        self._notify(transition)

    def on_failure(self, source: Hashable = None, *, sources: int = 1) -> None:
        """Report a call that failed. It may open the breaker (or re-open a half-open one).

        Args:
            source: what failed, such as the endpoint the call went to.
            sources: how many distinct sources must be among the counted failures for the
                breaker to open (the healthy endpoints the call could have gone to). The
                breaker stands for the whole destination: one bad endpoint among several
                is outlier detection's business, and a burst of calls that were in flight
                on it when it died must not shut the healthy ones off too.
        """
        transition = None
        with self._lock:
            state = self._state
            now = self._clock()
            if state is BreakerState.CLOSED:
                window = self.policy.failure_window
                threshold = self.policy.failure_threshold
                failing = self._failing
                failing[source] = now
                if window is None:
                    self._consecutive += 1
                    tripped = self._consecutive >= threshold and len(failing) >= sources
                else:
                    failures = self._failures
                    failures.append(now)
                    tripped = len(failures) == threshold and now - failures[0] <= window
                    if (tripped and sources > 1) or len(failing) > _MAX_SOURCES:
                        # Only sources that failed within the window count (and are kept:
                        # endpoints come and go).
                        self._failing = failing = {
                            key: at for key, at in failing.items() if now - at <= window
                        }
                        tripped = tripped and len(failing) >= sources
                if tripped:
                    self._open(now)
                    transition = (BreakerState.CLOSED, BreakerState.OPEN)
            elif state is BreakerState.HALF_OPEN:
                self._open(now)
                transition = (BreakerState.HALF_OPEN, BreakerState.OPEN)
        self._notify(transition)

    def release(self) -> None:
        """Give back a half-open probe without a verdict (the call was cancelled, or ended in
        a way that says nothing about the destination). Another probe may then be made."""
        with self._lock:
            self._probe_in_flight = False

    def reset(self) -> None:
        """Close the breaker and forget every failure (an operator's override)."""
        with self._lock:
            old = self._state
            self._close()
        self._notify(None if old is BreakerState.CLOSED else (old, BreakerState.CLOSED))

    def __enter__(self) -> CircuitBreaker:
        self.before_call()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._settle(exc)

    async def __aenter__(self) -> CircuitBreaker:
        self.before_call()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._settle(exc)

    def _settle(self, exc: BaseException | None) -> None:
        if exc is None:
            self.on_success()
        elif not isinstance(exc, Exception):
            self.release()
        elif self._is_failure(exc):
            self.on_failure()
        else:
            self.on_success()

    def _open(self, now: float) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = now
        self._probe_in_flight = False
        self._consecutive = 0
        self._failures.clear()
        self._failing.clear()

    def _close(self) -> None:
        self._state = BreakerState.CLOSED
        self._probe_in_flight = False
        self._consecutive = 0
        self._failures.clear()
        self._failing.clear()

    def _notify(self, transition: tuple[BreakerState, BreakerState] | None) -> None:
        if transition is not None and self._on_state_change is not None:
            self._on_state_change(self, *transition)


def _check_positive_seconds(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError("expected a number of seconds", field=name, value=value)
    if math.isnan(value) or math.isinf(value) or value <= 0:
        raise ConfigurationError(
            "expected a finite number of seconds, more than 0", field=name, value=value
        )
