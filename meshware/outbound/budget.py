"""The retry budget: retries as a bounded fraction of traffic, as Finagle and Linkerd do it.

Per-request retry limits (``attempts``) do not stop retry storms: when a destination fails,
every request retries and the load on it multiplies. A budget caps retries for the whole
destination instead. Every original request *deposits* into the budget, every retry
*withdraws* from it, and a retry is only made while the balance covers it.

The arithmetic is Finagle's ``RetryBudget`` (the one Linkerd adopted). With
``ratio`` (Finagle's ``percentCanRetry``), ``min_retries_per_second`` (``minRetriesPerSec``)
and ``window_seconds`` (the ``ttl``), over any window::

    retries allowed  ~  ratio * requests in the window  +  min_retries_per_second * window_seconds

Internally every deposit is worth ``1000`` tokens and every withdrawal costs
``int(1000 / ratio)`` tokens (``1`` token, with no deposits, when ``ratio`` is 0); a fixed
reserve of ``int(min_retries_per_second * window_seconds * cost)`` tokens is always added to
the balance. Deposits and withdrawals expire after the window, which slides in ten steps of
``window_seconds / 10``.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from meshware.exceptions import ConfigurationError

__all__ = ["RetryBudget"]

_SCALE = 1000
_BUCKETS = 10


class RetryBudget:
    """A thread-safe retry budget for one destination (Finagle's ``RetryBudget`` semantics).

    Call :meth:`record_request` once per original request (never for a retry) and
    :meth:`try_withdraw` before each retry; retry only when it returns ``True``. Each call
    is O(1).

    Args:
        ratio: retries allowed per original request in the window (Finagle's
            ``percentCanRetry``; ``0.2`` allows one retry per five requests). Between ``0``
            and ``1000``.
        window_seconds: how long deposits and withdrawals count (Finagle's ``ttl``).
            Between ``1`` and ``60`` seconds.
        min_retries_per_second: a floor of retries that is always allowed, so that a client
            that has just started or sends few requests can still retry. ``0`` or more.
            With both this and ``ratio`` at ``0`` the budget allows no retry at all.
        clock: a monotonic clock returning seconds (default :func:`time.monotonic`).

    Raises:
        ConfigurationError: an argument is out of range (names the argument).
    """

    __slots__ = (
        "_buckets",
        "_clock",
        "_index",
        "_lock",
        "_reserve",
        "_slice",
        "_slice_start",
        "_sum",
        "deposit_amount",
        "min_retries_per_second",
        "ratio",
        "window_seconds",
        "withdrawal_amount",
    )

    def __init__(
        self,
        *,
        ratio: float = 0.2,
        window_seconds: float = 10.0,
        min_retries_per_second: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _check_number(ratio, "ratio", 0.0, float(_SCALE))
        _check_number(window_seconds, "window_seconds", 1.0, 60.0)
        _check_number(min_retries_per_second, "min_retries_per_second", 0.0, math.inf)
        self.ratio = float(ratio)
        self.window_seconds = float(window_seconds)
        self.min_retries_per_second = float(min_retries_per_second)
        #: Tokens one original request deposits.
        self.deposit_amount = _SCALE if ratio > 0 else 0
        #: Tokens one retry costs.
        self.withdrawal_amount = int(_SCALE / ratio) if ratio > 0 else 1
        self._reserve = int(min_retries_per_second * window_seconds * self.withdrawal_amount)
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets = [0] * _BUCKETS
        self._index = 0
        self._sum = 0
        self._slice = window_seconds / _BUCKETS
        self._slice_start = clock()

    def __repr__(self) -> str:
        return (
            f"RetryBudget(ratio={self.ratio}, window_seconds={self.window_seconds}, "
            f"min_retries_per_second={self.min_retries_per_second}, level={self.level()})"
        )

    def record_request(self) -> None:
        """Deposit for one original request. Do not call it for retries."""
        if not self.deposit_amount:
            return
        with self._lock:
            self._advance(self._clock())
            self._buckets[self._index] += self.deposit_amount
            self._sum += self.deposit_amount

    def try_withdraw(self) -> bool:
        """Take one retry from the budget if the balance covers it.

        Returns:
            ``True`` when the retry may be made (and has been paid for); ``False`` when
            the budget is exhausted, in which case nothing is taken.
        """
        cost = self.withdrawal_amount
        with self._lock:
            self._advance(self._clock())
            if self._sum + self._reserve < cost:
                return False
            self._buckets[self._index] -= cost
            self._sum -= cost
            return True

    def level(self) -> int:
        """How many retries the budget would allow right now (never negative)."""
        with self._lock:
            self._advance(self._clock())
            balance = self._sum + self._reserve
        return balance // self.withdrawal_amount if balance > 0 else 0

    def _advance(self, now: float) -> None:
        steps = int((now - self._slice_start) // self._slice)
        if steps <= 0:
            return
        self._slice_start += steps * self._slice
        if steps >= _BUCKETS:
            self._buckets = [0] * _BUCKETS
            self._sum = 0
            return
        buckets = self._buckets
        index = self._index
        for _ in range(steps):
            index = (index + 1) % _BUCKETS
            self._sum -= buckets[index]
            buckets[index] = 0
        self._index = index


def _check_number(value: object, name: str, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError(
            f"expected a number, got {type(value).__name__}", field=name, value=value
        )
    if math.isnan(value) or not low <= value <= high:
        shown_high = "" if math.isinf(high) else f" and at most {high:g}"
        raise ConfigurationError(
            f"expected a number at least {low:g}{shown_high}, got {value!r}",
            field=name,
            value=value,
        )
