"""The interface every rate-limit state backend implements, and its one error.

A backend keeps one GCRA bucket (a theoretical arrival time) per key and charges requests
against it atomically. ``meshware.state.memory.MemoryBackend`` keeps buckets in the process;
``meshware.state.redis.RedisBackend`` keeps them in Redis, shared by every replica.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, TypeAlias, runtime_checkable

from meshware.exceptions import MeshwareError

if TYPE_CHECKING:
    from meshware.policy.ratelimit import GcraResult, Rate

__all__ = ["Acquisition", "BackendUnavailable", "RateLimitBackend"]

Acquisition: TypeAlias = "tuple[str, Rate, int]"
"""One charge: ``(bucket key, rate, cost)``."""


class BackendUnavailable(MeshwareError):
    """The state backend could not be reached or did not answer in time.

    Raised by backends (chained to the client library's error); ``RateLimiter`` turns it into
    its failure-mode decision. ``backend`` names the backend (its URL without credentials).
    """

    def __init__(self, message: str, *, backend: str) -> None:
        self.backend = backend
        super().__init__(f"{backend}: {message}")


@runtime_checkable
class RateLimitBackend(Protocol):
    """Keeps GCRA buckets and charges requests against them atomically.

    Every method charges with the arithmetic of :func:`meshware.policy.ratelimit.gcra`, so
    all backends decide alike. Implementations must be safe to call from several threads
    (WSGI) and from an event loop (ASGI).
    """

    def acquire(self, key: str, rate: Rate, cost: int, now: float) -> GcraResult:
        """Charge ``cost`` tokens to bucket ``key`` under ``rate``.

        Args:
            key: the bucket's full key (prefix, rule name and key value).
            rate: the limit of that bucket.
            cost: tokens to take, 1 to ``rate.burst``.
            now: the caller's clock reading; backends with their own clock (Redis) ignore it.

        Returns:
            The GCRA result for the bucket.

        Raises:
            BackendUnavailable: the backend failed; nothing is known about the bucket.
            ConfigurationError: ``cost`` is out of range.
        """
        ...

    async def acquire_async(self, key: str, rate: Rate, cost: int, now: float) -> GcraResult:
        """The awaitable twin of :meth:`acquire`."""
        ...

    def acquire_many(self, requests: Sequence[Acquisition], now: float) -> list[GcraResult]:
        """Charge several buckets at once (one round trip where the backend is remote).

        Each bucket is decided on its own, exactly as by :meth:`acquire`, and results come in
        the order of ``requests``.

        Raises:
            BackendUnavailable: the backend failed; no bucket was charged.
            ConfigurationError: a cost is out of range.
        """
        ...

    async def acquire_many_async(
        self, requests: Sequence[Acquisition], now: float
    ) -> list[GcraResult]:
        """The awaitable twin of :meth:`acquire_many`."""
        ...

    def close(self) -> None:
        """Release connections and state; the backend is not used afterwards."""
        ...

    async def aclose(self) -> None:
        """Like :meth:`close`, also releasing connections owned by the running event loop."""
        ...
