"""Errors of outbound calls.

Each subclasses ``httpx.TransportError`` (so ``except httpx.RequestError`` keeps working in
user code) and ``meshware.exceptions.MeshwareError``, and says which destination and why.
"""

from __future__ import annotations

import httpx

from meshware.exceptions import MeshwareError


class OutboundError(httpx.TransportError, MeshwareError):
    """Base class of meshware's outbound errors. ``destination`` names the service called."""

    def __init__(self, message: str, *, destination: str, request: httpx.Request | None = None):
        self.destination = destination
        super().__init__(f"{destination}: {message}", request=request)


class NoHealthyEndpoint(OutboundError):
    """Discovery found no endpoint for the destination, or every endpoint is ejected."""


class CircuitOpen(OutboundError):
    """The destination's circuit breaker is open; the call was not attempted."""


class RetryBudgetExhausted(OutboundError):
    """A retry was wanted but the destination's retry budget has no room for it."""


class DeadlineExceeded(OutboundError, httpx.TimeoutException):
    """The request's deadline passed before (or while) the call was made."""


class PoolOverloaded(OutboundError):
    """Connection-pool limits (maxConnections / maxPendingRequests) shed this call."""
