"""``memory://``: rate-limit buckets in this process.

Each process (each gunicorn worker, each replica) counts on its own, so a limit of 100/second
with four workers admits up to 400/second in total; use ``redis://`` for a shared limit.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

from meshware.exceptions import ConfigurationError
from meshware.policy.ratelimit import GcraResult, Rate, check_cost, gcra
from meshware.state.base import Acquisition

__all__ = ["DEFAULT_MAX_KEYS", "MemoryBackend"]

DEFAULT_MAX_KEYS = 100_000
"""Default bound on the number of buckets a ``MemoryBackend`` keeps (about 25 MB)."""

# Expired buckets removed per charge: more than the one bucket a charge can add, so the
# table shrinks back once a flood of keys has passed.
_SWEEP = 2
_SWEEPS = range(_SWEEP)


class MemoryBackend:
    """Buckets in a dictionary, for one process. Thread-safe; bounded.

    Memory stays bounded under floods of distinct keys (for example one bucket per client
    IP): a bucket whose TAT has passed is full, holds no information and is dropped, and
    when ``max_keys`` buckets exist the least recently used one is evicted (its next
    request starts with a full bucket).

    Args:
        max_keys: the most buckets kept at once (at least 1; default 100 000). In a URL:
            ``memory://?max_keys=10000``.

    Raises:
        ConfigurationError: ``max_keys`` is not a positive integer.
    """

    def __init__(self, *, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        if not isinstance(max_keys, int) or isinstance(max_keys, bool) or max_keys < 1:
            raise ConfigurationError(
                "expected a positive integer number of keys", field="max_keys", value=max_keys
            )
        self.max_keys = max_keys
        # Least recently charged first; a dict of key -> TAT.
        self._tats: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """The number of buckets currently kept."""
        return len(self._tats)

    def acquire(self, key: str, rate: Rate, cost: int, now: float) -> GcraResult:
        """Charge one bucket; see :class:`~meshware.state.base.RateLimitBackend`."""
        with self._lock:
            return self._charge(key, rate, cost, now)

    async def acquire_async(self, key: str, rate: Rate, cost: int, now: float) -> GcraResult:
        """Charge one bucket; the lock is held for microseconds, so this does not block."""
        with self._lock:
            return self._charge(key, rate, cost, now)

    def acquire_many(self, requests: Sequence[Acquisition], now: float) -> list[GcraResult]:
        """Charge several buckets under one lock; results in the order of ``requests``."""
        if len(requests) == 1:  # the common case, without the loops
            key, rate, cost = requests[0]
            if cost < 1 or cost > rate.burst:
                check_cost(rate, cost)
            with self._lock:
                return [self._charge(key, rate, cost, now)]
        for _, rate, cost in requests:
            if cost < 1 or cost > rate.burst:
                check_cost(rate, cost)
        with self._lock:
            return [self._charge(key, rate, cost, now) for key, rate, cost in requests]

    async def acquire_many_async(
        self, requests: Sequence[Acquisition], now: float
    ) -> list[GcraResult]:
        """The awaitable twin of :meth:`acquire_many`."""
        return self.acquire_many(requests, now)

    def _charge(self, key: str, rate: Rate, cost: int, now: float) -> GcraResult:
        tats = self._tats
        tat = tats.get(key)
        result = gcra(tat, now, rate, cost)
        tats[key] = result[1]
        if tat is None:
            if len(tats) > self.max_keys:
                tats.popitem(last=False)
        else:
            tats.move_to_end(key)
        # The charged bucket is now the newest; with no other bucket there is nothing to sweep.
        if len(tats) > 1:
            for _ in _SWEEPS:
                oldest_key = next(iter(tats))
                if oldest_key == key or tats[oldest_key] > now:
                    break
                del tats[oldest_key]
        return result

    def close(self) -> None:
        """Forget every bucket."""
        with self._lock:
            self._tats.clear()

    async def aclose(self) -> None:
        """Forget every bucket."""
        self.close()
