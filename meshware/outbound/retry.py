"""Retries: which failed calls to try again, and how long to wait first.

The conditions are Envoy's ``retryOn`` tokens, as Istio's VirtualService ``retries`` passes
them through, with Envoy's exact meaning:

=========================  =====================================================================
``5xx``                    any 5xx response, and any call that got no response at all: a
                           reset, a connect failure, a refused stream, a per-try timeout
``gateway-error``          a 502, 503 or 504 response, and (as in Envoy, which answers such
                           calls with 503 or 504 itself) any call that got no response
``reset``                  no response at all: reset, connect failure, refused stream, per-try
                           timeout
``reset-before-request``   a connect failure (nothing was sent)
``connect-failure``        the connection could not be made
``refused-stream``         the server refused the HTTP/2 stream (``REFUSED_STREAM``)
``retriable-4xx``          a 409 response
``retriable-status-codes`` the status codes listed in the same string
``503``, ``429``, ...      that status code; as Istio does, listing a code enables
                           ``retriable-status-codes`` for it
=========================  =====================================================================

The safe-to-repeat rule: a request is only sent again when repeating it is safe, that is
when its method is idempotent (``GET``, ``HEAD``, ``OPTIONS``, ``PUT``, ``DELETE``,
``TRACE``), when it carries an ``Idempotency-Key`` header, or when the route or policy is
explicitly marked retryable. Connect failures and refused streams are the exception: the
request never reached the server's application, so repeating it cannot do anything twice,
and they are retried for any method. This is how Envoy and gRPC reason about
transparent retries.

Progress is immutable: :meth:`RetryState.increment` returns a new state, as urllib3's
``Retry.increment()`` does.
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timezone
from typing import Final

import httpx

from meshware.exceptions import ConfigurationError
from meshware.outbound.budget import RetryBudget
from meshware.outbound.deadline import Deadline, parse_duration

__all__ = [
    "DEFAULT_RETRY_ON",
    "ERROR_KINDS",
    "IDEMPOTENT_METHODS",
    "RETRY_ON_CONDITIONS",
    "RetryPolicy",
    "RetryReason",
    "RetryState",
    "RetryVerdict",
    "parse_retry_after",
    "parse_retry_on",
]

#: The named ``retryOn`` conditions meshware understands (status codes are accepted too).
RETRY_ON_CONDITIONS: Final = frozenset(
    {
        "5xx",
        "gateway-error",
        "reset",
        "reset-before-request",
        "connect-failure",
        "retriable-4xx",
        "refused-stream",
        "retriable-status-codes",
    }
)

#: What can go wrong with a call that got no response (``error_kind``).
ERROR_KINDS: Final = frozenset({"reset", "connect-failure", "refused-stream", "timeout"})

#: Methods RFC 9110 defines as idempotent: repeating them has the effect of doing them once.
IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

#: Istio's default ``retryOn`` for HTTP (its gRPC-only ``unavailable,cancelled`` left out).
DEFAULT_RETRY_ON: Final = frozenset({"connect-failure", "refused-stream", "503"})

# Conditions Envoy knows that meshware does not evaluate, and why.
_UNSUPPORTED = {
    "envoy-ratelimited": "it reacts to Envoy's x-envoy-ratelimited header",
    "retriable-headers": "it needs response header matchers",
    "http3-post-connect-failure": "meshware's outbound calls do not use HTTP/3",
    "cancelled": "it is a gRPC status condition",
    "deadline-exceeded": "it is a gRPC status condition",
    "internal": "it is a gRPC status condition",
    "resource-exhausted": "it is a gRPC status condition",
    "unavailable": "it is a gRPC status condition",
}

# Kinds of failure where the request provably never reached the application.
_NEVER_DELIVERED = frozenset({"connect-failure", "refused-stream"})
_RETRY_AFTER_STATUSES = frozenset({429, 503})
_GATEWAY_STATUSES = frozenset({502, 503, 504})
_HEADER = "idempotency-key"

# Per failure kind, the conditions that cover it, in Envoy's order of evaluation.
_ERROR_COVERED_BY: dict[str, tuple[str, ...]] = {
    "connect-failure": (
        "connect-failure",
        "reset-before-request",
        "reset",
        "5xx",
        "gateway-error",
    ),
    "refused-stream": ("reset", "5xx", "gateway-error", "refused-stream"),
    "reset": ("reset", "5xx", "gateway-error"),
    "timeout": ("reset", "5xx", "gateway-error"),
}


class RetryReason:
    """The reason codes a :class:`RetryVerdict` carries (stable strings, safe to log)."""

    #: Try again.
    RETRY: Final = "retry"
    #: The outcome matches no ``retryOn`` condition (this includes success).
    NOT_RETRYABLE: Final = "not-retryable"
    #: The outcome matches, but repeating the request is not known to be safe.
    UNSAFE_METHOD: Final = "unsafe-method"
    #: The policy's ``attempts`` are used up.
    ATTEMPTS_EXHAUSTED: Final = "attempts-exhausted"
    #: The destination's :class:`~meshware.outbound.budget.RetryBudget` has no room.
    BUDGET_EXHAUSTED: Final = "budget-exhausted"
    #: The request's deadline would pass before the next try could start.
    DEADLINE_EXCEEDED: Final = "deadline-exceeded"


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryVerdict:
    """Whether to try again, and why.

    A verdict is truthy exactly when ``retry`` is true.

    Attributes:
        retry: whether the request should be tried again.
        reason: one of the :class:`RetryReason` codes.
        condition: the ``retryOn`` condition the outcome matched (``"5xx"``, ``"503"``,
            ``"connect-failure"``...), or ``None`` when it matched none.
    """

    retry: bool
    reason: str
    condition: str | None = None

    def __bool__(self) -> bool:
        return self.retry


_NO_MATCH = RetryVerdict(retry=False, reason=RetryReason.NOT_RETRYABLE)


def parse_retry_on(value: str | Iterable[str], *, field: str = "retry_on") -> frozenset[str]:
    """Parse an Envoy/Istio ``retryOn`` value into a set of conditions.

    Args:
        value: a comma-separated string (``"5xx,reset,503"``) or an iterable of conditions.
            Spaces around entries and empty entries are ignored. Status codes (100-599) are
            kept as their decimal string (``"503"``).
        field: the setting's name, used in errors.

    Returns:
        The conditions, as a frozenset of strings.

    Raises:
        ConfigurationError: an entry is not a known condition or status code, or is a
            condition meshware does not evaluate (the message says which and why).
    """
    entries: Iterable[object] = value.split(",") if isinstance(value, str) else value
    if isinstance(entries, (bytes, Mapping)):
        raise ConfigurationError(
            "expected a comma-separated string or a set of retryOn conditions",
            field=field,
            value=value,
        )
    found: set[str] = set()
    for entry in entries:
        if not isinstance(entry, str):
            raise ConfigurationError(
                f"expected retryOn conditions as strings, got {type(entry).__name__}",
                field=field,
                value=entry,
            )
        token = entry.strip()
        if not token:
            continue
        if token.isascii() and token.isdigit():
            code = int(token)
            if not 100 <= code <= 599:
                raise ConfigurationError(
                    f"status code {token} is outside 100-599", field=field, value=token
                )
            found.add(str(code))
        elif token in RETRY_ON_CONDITIONS:
            found.add(token)
        elif token in _UNSUPPORTED:
            raise ConfigurationError(
                f"retryOn condition {token!r} is not supported: {_UNSUPPORTED[token]}",
                field=field,
                value=token,
            )
        else:
            hint = " (conditions are lower-case)" if token.lower() in RETRY_ON_CONDITIONS else ""
            known = ", ".join(sorted(RETRY_ON_CONDITIONS))
            raise ConfigurationError(
                f"unknown retryOn condition {token!r}{hint}; expected one of {known} "
                f"or an HTTP status code",
                field=field,
                value=token,
            )
    return frozenset(found)


def parse_retry_after(value: str, *, now: float | None = None) -> float | None:
    """Read a ``Retry-After`` header value as a delay in seconds.

    Args:
        value: the header value: delay-seconds (``"120"``) or an HTTP-date
            (``"Wed, 21 Oct 2015 07:28:00 GMT"``).
        now: the current wall-clock time as a POSIX timestamp, used for HTTP-dates
            (default :func:`time.time`).

    Returns:
        The delay in seconds (``0.0`` for a date in the past), or ``None`` when the value
        is neither form. Garbage is ignored, never raised.
    """
    text = value.strip()
    if not text:
        return None
    if text.isascii() and text.isdigit():
        return float(text)  # float() has no digit limit; absurd values become inf
    try:
        when = email.utils.parsedate_to_datetime(text)
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        delay = when.timestamp() - (time.time() if now is None else now)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return delay if delay > 0.0 else 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """When and how to retry a call to a destination (Istio's VirtualService ``retries``).

    Attributes:
        attempts: retries allowed after the first try (Istio's ``attempts``; default 2,
            Istio's default). ``0`` disables retries.
        per_try_timeout: the timeout of each try in seconds (Istio's ``perTryTimeout``), or
            ``None`` for no per-try limit. A try that runs out counts as ``error_kind``
            ``"timeout"``.
        retry_on: the conditions to retry on: a comma-separated ``retryOn`` string or a set
            of conditions; stored as a frozenset (see :func:`parse_retry_on`). The default
            is Istio's HTTP default, ``connect-failure,refused-stream,503``.
        backoff_base: the base of the exponential backoff in seconds (Envoy's 25 ms).
        backoff_cap: the longest backoff in seconds (Envoy's default, 10 * the base).
        retryable_methods: methods that are safe to repeat (upper-case; default the
            idempotent methods of RFC 9110).
        retry_non_idempotent: repeat every method, as if each request were marked safe.
            Only for destinations whose handlers are idempotent by design.
        respect_retry_after: on a 429 or 503 carrying ``Retry-After``, wait what the
            server asks instead of the backoff (clamped to ``max_retry_after``).
        max_retry_after: the longest ``Retry-After`` wait honoured, in seconds.
    """

    attempts: int = 2
    per_try_timeout: float | None = None
    retry_on: frozenset[str] | str = DEFAULT_RETRY_ON
    backoff_base: float = 0.025
    backoff_cap: float = 0.25
    retryable_methods: frozenset[str] = IDEMPOTENT_METHODS
    retry_non_idempotent: bool = False
    respect_retry_after: bool = True
    max_retry_after: float = 10.0
    _status_conditions: dict[int, str] = field(init=False, repr=False, compare=False)
    _error_conditions: dict[str, str | None] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise ConfigurationError(
                "expected a whole number of retries", field="attempts", value=self.attempts
            )
        if self.attempts < 0:
            raise ConfigurationError(
                "expected 0 or more retries", field="attempts", value=self.attempts
            )
        if self.per_try_timeout is not None:
            _check_seconds(self.per_try_timeout, "per_try_timeout", allow_zero=False)
        _check_seconds(self.backoff_base, "backoff_base", allow_zero=True)
        _check_seconds(self.backoff_cap, "backoff_cap", allow_zero=True)
        if self.backoff_cap < self.backoff_base:
            raise ConfigurationError(
                f"expected a cap at least backoff_base ({self.backoff_base})",
                field="backoff_cap",
                value=self.backoff_cap,
            )
        _check_seconds(self.max_retry_after, "max_retry_after", allow_zero=True)
        for name in ("retry_non_idempotent", "respect_retry_after"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigurationError(
                    "expected True or False", field=name, value=getattr(self, name)
                )
        conditions = parse_retry_on(self.retry_on, field="retry_on")
        object.__setattr__(self, "retry_on", conditions)
        methods = self.retryable_methods
        if isinstance(methods, str) or not all(isinstance(m, str) for m in methods):
            raise ConfigurationError(
                "expected a set of HTTP method names", field="retryable_methods", value=methods
            )
        object.__setattr__(self, "retryable_methods", frozenset(m.upper() for m in methods))

        statuses: dict[int, str] = {}
        for code in range(100, 600):
            if "5xx" in conditions and code >= 500:
                statuses[code] = "5xx"
            elif "gateway-error" in conditions and code in _GATEWAY_STATUSES:
                statuses[code] = "gateway-error"
            elif "retriable-4xx" in conditions and code == 409:
                statuses[code] = "retriable-4xx"
            elif str(code) in conditions:
                statuses[code] = str(code)
        errors: dict[str, str | None] = {}
        for kind, covered_by in _ERROR_COVERED_BY.items():
            errors[kind] = next((c for c in covered_by if c in conditions), None)
        object.__setattr__(self, "_status_conditions", statuses)
        object.__setattr__(self, "_error_conditions", errors)

    @classmethod
    def from_mapping(cls, spec: Mapping[str, object], *, prefix: str = "retries") -> RetryPolicy:
        """Build a policy from an Istio VirtualService ``retries`` block.

        Accepted keys: ``attempts``, ``perTryTimeout`` (a duration such as ``"2s"``),
        ``retryOn``, ``backoff`` (Istio's base interval; the cap becomes 10 * it, as in
        Envoy) and ``retryRemoteLocalities`` (only ``false``: meshware has no
        locality-aware failover). As in Istio, a block without ``attempts`` (or with
        ``attempts: 0``) disables retries, and an empty or absent ``retryOn`` keeps the
        default conditions. Settings Istio does not have keep their defaults; change them
        with :func:`dataclasses.replace`.

        Args:
            spec: the ``retries`` mapping, with Istio's camelCase keys.
            prefix: the dotted path of the block, used to name fields in errors.

        Raises:
            ConfigurationError: a key is unknown or unsupported, or a value is invalid;
                ``field`` is the dotted path (``"retries.perTryTimeout"``).
        """
        if not isinstance(spec, Mapping):
            raise ConfigurationError(
                f"expected a mapping, got {type(spec).__name__}", field=prefix, value=spec
            )
        allowed = ("attempts", "perTryTimeout", "retryOn", "backoff", "retryRemoteLocalities")
        for key in spec:
            if key == "retryIgnorePreviousHosts":
                raise ConfigurationError(
                    "is not supported here: which endpoint a retry goes to is the "
                    "balancer's choice",
                    field=f"{prefix}.{key}",
                    value=spec[key],
                )
            if key not in allowed:
                raise ConfigurationError(
                    f"unknown key; expected one of {', '.join(allowed)}",
                    field=f"{prefix}.{key}",
                    value=key,
                )
        attempts = spec.get("attempts", 0)
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 0:
            raise ConfigurationError(
                "expected a whole number of retries, 0 or more",
                field=f"{prefix}.attempts",
                value=attempts,
            )
        per_try_timeout: float | None = None
        if "perTryTimeout" in spec:
            per_try_timeout = parse_duration(spec["perTryTimeout"], field=f"{prefix}.perTryTimeout")
            if per_try_timeout < 0.001:
                raise ConfigurationError(
                    "expected at least 1ms",
                    field=f"{prefix}.perTryTimeout",
                    value=spec["perTryTimeout"],
                )
        conditions: frozenset[str] = DEFAULT_RETRY_ON
        retry_on = spec.get("retryOn")
        if retry_on is not None and retry_on != "":
            if not isinstance(retry_on, str):
                raise ConfigurationError(
                    "expected a comma-separated string such as '5xx,reset,503'",
                    field=f"{prefix}.retryOn",
                    value=retry_on,
                )
            conditions = parse_retry_on(retry_on, field=f"{prefix}.retryOn")
        base, cap = 0.025, 0.25
        if "backoff" in spec:
            base = parse_duration(spec["backoff"], field=f"{prefix}.backoff")
            if base <= 0:
                raise ConfigurationError(
                    "expected a positive duration", field=f"{prefix}.backoff", value=spec["backoff"]
                )
            cap = base * 10
        if "retryRemoteLocalities" in spec:
            remote = spec["retryRemoteLocalities"]
            if not isinstance(remote, bool):
                raise ConfigurationError(
                    "expected true or false",
                    field=f"{prefix}.retryRemoteLocalities",
                    value=remote,
                )
            if remote:
                raise ConfigurationError(
                    "is not supported: meshware has no locality-aware failover; "
                    "remove it or set it to false",
                    field=f"{prefix}.retryRemoteLocalities",
                    value=remote,
                )
        return cls(
            attempts=attempts,
            per_try_timeout=per_try_timeout,
            retry_on=conditions,
            backoff_base=base,
            backoff_cap=cap,
        )

    def should_retry(
        self,
        attempt: int,
        *,
        method: str,
        request_headers: Mapping[str, str] | None = None,
        response_status: int | None = None,
        error_kind: str | None = None,
        route_retryable: bool = False,
    ) -> RetryVerdict:
        """Classify the outcome of one try.

        Exactly one of ``response_status`` and ``error_kind`` describes the outcome. The
        checks run in this order: does a ``retryOn`` condition match; is the request safe
        to repeat; are attempts left.

        Args:
            attempt: the number of the try that just ended, ``1`` for the original request.
            method: the request's HTTP method.
            request_headers: the request's headers; only ``Idempotency-Key`` is looked at
                (case-insensitively).
            response_status: the status of the response received.
            error_kind: what went wrong when no response came: ``"reset"``,
                ``"connect-failure"``, ``"refused-stream"`` or ``"timeout"`` (the per-try
                timeout).
            route_retryable: the route is explicitly marked safe to retry for any method.

        Returns:
            A :class:`RetryVerdict`; its ``reason`` is ``"retry"``, ``"not-retryable"``,
            ``"unsafe-method"`` or ``"attempts-exhausted"``.

        Raises:
            ConfigurationError: neither or both of ``response_status`` and ``error_kind``
                were given, ``error_kind`` is unknown, or ``attempt`` is below 1.
        """
        if error_kind is not None:
            if response_status is not None:
                raise ConfigurationError(
                    "give response_status or error_kind, not both", field="error_kind"
                )
            try:
                condition = self._error_conditions[error_kind]
            except KeyError:
                raise ConfigurationError(
                    f"expected one of {', '.join(sorted(ERROR_KINDS))}",
                    field="error_kind",
                    value=error_kind,
                ) from None
        elif response_status is not None:
            condition = self._status_conditions.get(response_status)
        else:
            raise ConfigurationError(
                "give the response_status or the error_kind of the try", field="response_status"
            )
        if attempt < 1:
            raise ConfigurationError(
                "expected the number of the try that ended, 1 or more",
                field="attempt",
                value=attempt,
            )
        if condition is None:
            return _NO_MATCH
        if error_kind not in _NEVER_DELIVERED and not self.is_safe_to_repeat(
            method, request_headers, route_retryable=route_retryable
        ):
            return RetryVerdict(retry=False, reason=RetryReason.UNSAFE_METHOD, condition=condition)
        if attempt > self.attempts:
            return RetryVerdict(
                retry=False, reason=RetryReason.ATTEMPTS_EXHAUSTED, condition=condition
            )
        return RetryVerdict(retry=True, reason=RetryReason.RETRY, condition=condition)

    def matches_status(self, status: int) -> bool:
        """Whether a response of ``status`` meets a ``retryOn`` condition, so that
        :meth:`should_retry` may say retry (the cheap first check of every response)."""
        return status in self._status_conditions

    def is_safe_to_repeat(
        self,
        method: str,
        request_headers: Mapping[str, str] | None = None,
        *,
        route_retryable: bool = False,
    ) -> bool:
        """Whether a request that may have reached the server can be sent again.

        True when the method is in ``retryable_methods``, the route or the policy is marked
        retryable, or the request carries a non-empty ``Idempotency-Key`` header.
        """
        if method.upper() in self.retryable_methods:
            return True
        if route_retryable or self.retry_non_idempotent:
            return True
        return _has_idempotency_key(request_headers)

    def backoff(self, retries_done: int, *, uniform: Callable[[float, float], float]) -> float:
        """The fully jittered exponential backoff before a retry, in seconds.

        ``uniform(0, min(backoff_cap, backoff_base * 2**retries_done))``.

        Args:
            retries_done: retries already made before this one (``0`` before the first).
            uniform: the random source, ``random.uniform`` or a seeded
                ``random.Random(...).uniform``.
        """
        exponent = retries_done if retries_done < 62 else 62
        ceiling = self.backoff_base * (1 << exponent) if exponent >= 0 else self.backoff_base
        return uniform(0.0, ceiling if ceiling < self.backoff_cap else self.backoff_cap)

    def delay(
        self,
        retries_done: int,
        *,
        response_status: int | None = None,
        retry_after: str | None = None,
        uniform: Callable[[float, float], float] = random.uniform,
        wall_clock: Callable[[], float] = time.time,
    ) -> float:
        """How long to wait before the next try, in seconds.

        A usable ``Retry-After`` on a 429 or 503 wins (clamped to ``max_retry_after``) when
        ``respect_retry_after`` is set; otherwise the jittered :meth:`backoff`.

        Args:
            retries_done: retries already made before this one.
            response_status: the status of the response that is being retried, if any.
            retry_after: that response's ``Retry-After`` header value, if any.
            uniform: the random source for the backoff.
            wall_clock: the wall clock, to read ``Retry-After`` HTTP-dates.
        """
        if (
            retry_after is not None
            and self.respect_retry_after
            and response_status in _RETRY_AFTER_STATUSES
        ):
            asked = parse_retry_after(retry_after, now=wall_clock())
            if asked is not None:
                return asked if asked < self.max_retry_after else self.max_retry_after
        return self.backoff(retries_done, uniform=uniform)

    def new_state(
        self,
        *,
        uniform: Callable[[float, float], float] = random.uniform,
        wall_clock: Callable[[], float] = time.time,
    ) -> RetryState:
        """A fresh :class:`RetryState` for one request under this policy."""
        return RetryState(policy=self, uniform=uniform, wall_clock=wall_clock)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryState:
    """Where one request stands in its retries. Immutable: :meth:`increment` makes the next one.

    Attributes:
        policy: the policy in force.
        retries: retries granted so far.
        verdict: the verdict on the last try, ``None`` before any.
        delay: seconds to wait before the next try (``0.0`` unless ``verdict`` is a retry).
        history: every verdict so far, oldest first.
        uniform: the random source for the backoff (seed it in tests).
        wall_clock: the wall clock used to read ``Retry-After`` dates.
    """

    policy: RetryPolicy = field(default_factory=RetryPolicy)
    retries: int = 0
    verdict: RetryVerdict | None = None
    delay: float = 0.0
    history: tuple[RetryVerdict, ...] = ()
    uniform: Callable[[float, float], float] = field(
        default=random.uniform, compare=False, repr=False
    )
    wall_clock: Callable[[], float] = field(default=time.time, compare=False, repr=False)

    @property
    def attempt(self) -> int:
        """The number of the try in progress: ``1`` for the original request."""
        return self.retries + 1

    def increment(
        self,
        *,
        method: str,
        request_headers: Mapping[str, str] | None = None,
        response_status: int | None = None,
        error_kind: str | None = None,
        retry_after: str | None = None,
        route_retryable: bool = False,
        budget: RetryBudget | None = None,
        deadline: Deadline | None = None,
    ) -> RetryState:
        """Record the outcome of the try in progress and decide about the next one.

        The arguments describing the try are those of :meth:`RetryPolicy.should_retry`;
        ``retry_after`` is the response's ``Retry-After`` header value, if any. When the
        policy says retry, two more checks may still refuse: the ``deadline`` (the wait
        would use up the time left: ``"deadline-exceeded"``) and then the ``budget`` (no
        room: ``"budget-exhausted"``; a retry that goes ahead is withdrawn from it).

        Returns:
            The next state. Retry when ``state.verdict.retry`` is true, after sleeping
            ``state.delay`` seconds; otherwise deliver the last response or error.

        Raises:
            ConfigurationError: as :meth:`RetryPolicy.should_retry`.
        """
        policy = self.policy
        verdict = policy.should_retry(
            self.retries + 1,
            method=method,
            request_headers=request_headers,
            response_status=response_status,
            error_kind=error_kind,
            route_retryable=route_retryable,
        )
        if not verdict.retry:
            return RetryState(
                policy=policy,
                retries=self.retries,
                verdict=verdict,
                delay=0.0,
                history=(*self.history, verdict),
                uniform=self.uniform,
                wall_clock=self.wall_clock,
            )
        delay = policy.delay(
            self.retries,
            response_status=response_status,
            retry_after=retry_after,
            uniform=self.uniform,
            wall_clock=self.wall_clock,
        )
        refusal = None
        if deadline is not None and delay >= deadline.remaining():
            refusal = RetryReason.DEADLINE_EXCEEDED
        elif budget is not None and not budget.try_withdraw():
            refusal = RetryReason.BUDGET_EXHAUSTED
        if refusal is not None:
            verdict = RetryVerdict(retry=False, reason=refusal, condition=verdict.condition)
            return RetryState(
                policy=policy,
                retries=self.retries,
                verdict=verdict,
                delay=0.0,
                history=(*self.history, verdict),
                uniform=self.uniform,
                wall_clock=self.wall_clock,
            )
        return RetryState(
            policy=policy,
            retries=self.retries + 1,
            verdict=verdict,
            delay=delay,
            history=(*self.history, verdict),
            uniform=self.uniform,
            wall_clock=self.wall_clock,
        )


def _has_idempotency_key(headers: Mapping[str, str] | None) -> bool:
    if not headers:
        return False
    value = headers.get(_HEADER)
    if value is None and not isinstance(headers, httpx.Headers):
        for name, candidate in headers.items():
            if name.lower() == _HEADER:
                value = candidate
                break
    return bool(value and value.strip())


def _check_seconds(value: object, name: str, *, allow_zero: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError("expected a number of seconds", field=name, value=value)
    if math.isnan(value) or math.isinf(value) or value < 0 or (value == 0 and not allow_zero):
        expected = "0 or more" if allow_zero else "more than 0"
        raise ConfigurationError(
            f"expected a finite number of seconds, {expected}", field=name, value=value
        )
