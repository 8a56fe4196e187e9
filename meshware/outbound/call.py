"""What the outbound transports share about one call.

The outbound stack is a chain of httpx transports, outermost first:
telemetry → deadline → routing → retry (with budget) → balancing → breaker → connection.
They talk through ``request.extensions``:

- ``CALL_KEY`` holds the call's :class:`CallPlan`, created by the first meshware transport that
  sees the request (:func:`plan_of`) and filled in by the layers below;
- users may put per-call overrides on a request before sending it (documented in
  ``docs/calling-services.md``): ``RETRY_KEY`` (a ``RetryPolicy``, or ``None`` for no
  retries), ``TIMEOUT_KEY`` (seconds for the whole call), ``RETRYABLE_KEY`` (``True`` marks a
  non-idempotent request safe to repeat), ``HASH_KEY`` (the consistent-hash key).

A request whose host is not a mesh service never gets a plan with a ``destination``; every
layer then passes it through untouched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from meshware.outbound.deadline import Deadline
    from meshware.outbound.endpoints import Endpoint
    from meshware.outbound.retry import RetryPolicy

CALL_KEY = "meshware.call"
RETRY_KEY = "meshware.retry"
TIMEOUT_KEY = "meshware.timeout"
RETRYABLE_KEY = "meshware.retryable"
HASH_KEY = "meshware.hash_key"


@dataclass(slots=True)
class CallPlan:
    """Mutable notes on one outbound call, written by the layer that decides each part.

    Attributes:
        destination: the mesh service called (the request's host), or ``None`` when the host is
            not a mesh service (pass-through).
        route: the name of the matched route, if any (routing layer).
        subset: the destination subset chosen (routing layer; ``None`` = all endpoints).
        retry: the retry policy in force (routing layer, or a per-call override).
        retryable: the route or the caller marked this request safe to repeat.
        deadline: the call's deadline: the inbound request's, tightened by the route timeout.
        hash_key: the consistent-hash key for ring-hash balancing, if any.
        attempt: 0 for the first try, then 1, 2, ... (retry layer).
        tried: endpoint keys already tried, so a retry prefers another (balancing layer).
        endpoint: the endpoint picked for the current attempt (balancing layer).
        choices: how many healthy endpoints that pick was made among (balancing layer); the
            destination's circuit breaker opens only on failures from as many endpoints.
        mirrored: the subset this call was mirrored to, if any (routing layer).
        fault: the fault injected into this call, if any: ``"delay"`` or ``"abort"``.
    """

    destination: str | None = None
    route: str | None = None
    subset: str | None = None
    retry: RetryPolicy | None = None
    retryable: bool = False
    deadline: Deadline | None = None
    hash_key: str | None = None
    attempt: int = 0
    tried: set[str] = field(default_factory=set)
    endpoint: Endpoint | None = None
    choices: int = 1
    mirrored: str | None = None
    fault: str | None = None


def plan_of(request: httpx.Request) -> CallPlan:
    """The request's plan, created empty if no layer has made one yet."""
    plan = request.extensions.get(CALL_KEY)
    if plan is None:
        plan = CallPlan()
        request.extensions[CALL_KEY] = plan
    return plan  # type: ignore[no-any-return,unused-ignore]
