"""Traffic mirroring (shadowing): a copy of some calls goes to another destination too.

A route with ``mirror`` (and ``mirrorPercentage``) sends a copy of the chosen share of its
calls to the mirror destination, fire-and-forget, as Envoy's request mirroring does: the copy
has the same method, URL, headers and body, its ``Host`` header carries the ``-shadow`` suffix
(``reviews`` becomes ``reviews-shadow``, ``reviews:9080`` becomes ``reviews-shadow:9080``) so
the receiving side can tell shadow traffic apart, and its response is read and dropped. The
mirror never delays or fails the real call.

Only bodies already in memory are mirrored (``content=``, ``json=``, ``data=`` bodies): a
streaming body can be read once, and it belongs to the real call. Such calls are counted in
:attr:`MirrorObserver.skipped_streaming`, not mirrored.

This module builds the copy (:func:`shadow_request`) and records what happened
(:class:`MirrorObserver`); :mod:`meshware.outbound.route_transport` sends the copies.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import httpx

from meshware.outbound.call import (
    CALL_KEY,
    HASH_KEY,
    RETRY_KEY,
    RETRYABLE_KEY,
    TIMEOUT_KEY,
    CallPlan,
)

__all__ = [
    "SHADOW_SUFFIX",
    "MirrorObserver",
    "MirrorOutcome",
    "shadow_host",
    "shadow_request",
]

logger = logging.getLogger("meshware.outbound.mirror")

#: What Envoy appends to the host of a mirrored request.
SHADOW_SUFFIX: Final = "-shadow"

# Per-call overrides meant for the real call; the copy gets its own plan instead.
_PRIVATE_KEYS = frozenset({CALL_KEY, RETRY_KEY, TIMEOUT_KEY, RETRYABLE_KEY, HASH_KEY})


def shadow_host(host: str) -> str:
    """The ``Host`` header of a mirrored request: ``-shadow`` appended to the host name,
    before any port (``"reviews:9080"`` becomes ``"reviews-shadow:9080"``).

    Args:
        host: the original ``Host`` header value.
    """
    if host.startswith("["):  # an IPv6 literal: the port follows the bracket
        end = host.find("]")
        if end != -1:
            return f"{host[: end + 1]}{SHADOW_SUFFIX}{host[end + 1 :]}"
    name, colon, port = host.rpartition(":")
    if colon and port.isdigit() and ":" not in name:
        return f"{name}{SHADOW_SUFFIX}:{port}"
    return host + SHADOW_SUFFIX


def shadow_request(request: httpx.Request, plan: CallPlan) -> httpx.Request | None:
    """A copy of ``request`` for the mirror, or ``None`` when its body is a stream.

    The copy has the same method, URL, headers (with the ``Host`` header suffixed, see
    :func:`shadow_host`) and body, the original's extensions without meshware's per-call
    overrides, ``plan`` as its :class:`~meshware.outbound.call.CallPlan`, and the per-call
    override ``RETRY_KEY: None``: a copy is sent once, never retried.

    Args:
        request: the real call.
        plan: the copy's plan (destination, subset, ``retry=None``, deadline).
    """
    try:
        body = request.content
    except httpx.RequestNotRead:
        return None
    headers = request.headers.copy()
    host = headers.get("host")
    if host is None:
        host = request.url.netloc.decode("ascii")
    headers["host"] = shadow_host(host)
    extensions = {k: v for k, v in request.extensions.items() if k not in _PRIVATE_KEYS}
    extensions[CALL_KEY] = plan
    extensions[RETRY_KEY] = None  # a copy is sent once
    return httpx.Request(
        request.method, request.url, headers=headers, content=body, extensions=extensions
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class MirrorOutcome:
    """What happened to one side of a mirrored call.

    For every mirrored call the observer receives two outcomes with the same ``call_id``:
    the real call's (``role="primary"``) and the copy's (``role="mirror"``), in whichever
    order they finish, so metrics can compare the two sides call by call.

    Attributes:
        call_id: pairs the primary and the mirror of one call.
        role: ``"primary"`` or ``"mirror"``.
        route: the route's name (``CallPlan.route``), or ``None``.
        destination: the service this side was sent to.
        subset: the subset this side was sent to, or ``None``.
        status: the response status, or ``None`` when the call raised.
        error: the exception the call raised, or ``None``.
        latency_s: seconds from sending to the response headers (or the error).
    """

    call_id: int
    role: str
    route: str | None
    destination: str
    subset: str | None
    status: int | None
    error: Exception | None
    latency_s: float


class MirrorObserver:
    """Counts what mirroring did and hands each outcome to a callback.

    Pass one to the routing transport (``mirror_observer=``) to read the counters or feed
    your metrics; the transport makes its own when none is given. All methods are
    thread-safe.

    Args:
        on_outcome: called with every :class:`MirrorOutcome` (primary and mirror sides),
            from the thread or task that finished the call. Exceptions it raises are logged
            (logger ``meshware.outbound.mirror``) and swallowed: observing never fails a call.
    """

    def __init__(self, on_outcome: Callable[[MirrorOutcome], None] | None = None) -> None:
        self._on_outcome = on_outcome
        self._lock = threading.Lock()
        self._counts = {
            "mirrored": 0,
            "responses": 0,
            "errors": 0,
            "dropped": 0,
            "cancelled": 0,
            "skipped_streaming": 0,
            "primary_responses": 0,
            "primary_errors": 0,
        }
        self._mirror_statuses: dict[int, int] = {}
        self._primary_statuses: dict[int, int] = {}

    @property
    def mirrored(self) -> int:
        """Copies sent (started) to a mirror."""
        return self._counts["mirrored"]

    @property
    def responses(self) -> int:
        """Copies that got a response (of any status)."""
        return self._counts["responses"]

    @property
    def errors(self) -> int:
        """Copies that raised instead (connection errors, deadlines, ...)."""
        return self._counts["errors"]

    @property
    def dropped(self) -> int:
        """Copies not sent because too many were already in flight."""
        return self._counts["dropped"]

    @property
    def cancelled(self) -> int:
        """Copies cancelled because the (async) transport was closed before they finished."""
        return self._counts["cancelled"]

    @property
    def skipped_streaming(self) -> int:
        """Calls chosen for mirroring whose body was a stream, so they were not mirrored."""
        return self._counts["skipped_streaming"]

    @property
    def primary_responses(self) -> int:
        """Mirrored calls whose real (primary) side got a response."""
        return self._counts["primary_responses"]

    @property
    def primary_errors(self) -> int:
        """Mirrored calls whose real (primary) side raised."""
        return self._counts["primary_errors"]

    @property
    def mirror_statuses(self) -> dict[int, int]:
        """A copy of the mirror responses counted by status code."""
        with self._lock:
            return dict(self._mirror_statuses)

    @property
    def primary_statuses(self) -> dict[int, int]:
        """A copy of the primary responses of mirrored calls, counted by status code."""
        with self._lock:
            return dict(self._primary_statuses)

    def snapshot(self) -> dict[str, int]:
        """All counters at once, by the names of the properties."""
        with self._lock:
            return dict(self._counts)

    def record(self, outcome: MirrorOutcome) -> None:
        """Count one outcome and pass it to ``on_outcome``.

        The routing transport calls this; subclasses may extend it (call ``super()``).
        """
        primary = outcome.role == "primary"
        with self._lock:
            if outcome.status is not None:
                self._counts["primary_responses" if primary else "responses"] += 1
                statuses = self._primary_statuses if primary else self._mirror_statuses
                statuses[outcome.status] = statuses.get(outcome.status, 0) + 1
            else:
                self._counts["primary_errors" if primary else "errors"] += 1
        if self._on_outcome is not None:
            try:
                self._on_outcome(outcome)
            except Exception:
                logger.exception("the mirror observer's on_outcome callback failed")

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1
