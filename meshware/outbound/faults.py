"""Fault injection: Istio's VirtualService ``fault`` block, decided without I/O.

A route may delay some of its calls, abort some with an HTTP status, or both, to test how
callers cope with a slow or failing dependency::

    fault:
      delay:
        fixedDelay: 7s
        percentage: {value: 10}
      abort:
        httpStatus: 503
        percentage: {value: 1}

:meth:`FaultInjection.decide` draws the dice (from an injectable random source) and returns a
:class:`FaultDecision`; the routing transport (:mod:`meshware.outbound.route_transport`) applies
it the way Envoy's fault filter does: first the delay, then the abort. An aborted call never
reaches the network and is answered by :func:`abort_response`. The two faults are independent:
with both configured, a call may be delayed, aborted, both, or neither.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol

import httpx

from meshware.exceptions import ConfigurationError
from meshware.outbound.deadline import parse_duration

__all__ = [
    "ABORT_BODY",
    "FAULT_HEADER",
    "NO_FAULT",
    "FaultAbort",
    "FaultDecision",
    "FaultDelay",
    "FaultInjection",
    "RandomSource",
    "abort_response",
]

#: The body of an aborted call's response, as Envoy's fault filter writes it.
ABORT_BODY: Final = b"fault filter abort"
#: The response header that marks a synthesized (injected) response.
FAULT_HEADER: Final = "x-meshware-fault"

_MIN_DELAY = 0.001  # Istio rejects fixedDelay below 1ms.


class RandomSource(Protocol):
    """Anything with a ``random()`` method returning a float in ``[0.0, 1.0)``.

    :class:`random.Random` is one; tests pass a seeded instance.
    """

    def random(self) -> float:
        """A float in ``[0.0, 1.0)``."""
        ...


def _check_percentage(value: object, field: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or math.isnan(value)
        or not 0.0 <= value <= 100.0
    ):
        raise ConfigurationError("expected a percentage from 0 to 100", field=field, value=value)
    return float(value)


def _hit(percentage: float, rng: RandomSource) -> bool:
    # 0 and 100 need no draw, which keeps seeded sequences stable when faults are toggled.
    if percentage >= 100.0:
        return True
    if percentage <= 0.0:
        return False
    return rng.random() * 100.0 < percentage


def _reject_unknown(
    spec: Mapping[object, object], allowed: tuple[str, ...], unsupported: Mapping[str, str], at: str
) -> None:
    for key in spec:
        if isinstance(key, str) and key in unsupported:
            raise ConfigurationError(
                f"is not supported: {unsupported[key]}", field=f"{at}.{key}", value=spec[key]
            )
        if key not in allowed:
            raise ConfigurationError(
                f"unknown field; expected one of {', '.join(allowed)}",
                field=f"{at}.{key}",
                value=spec[key],
            )


def _mapping(value: object, field: str) -> Mapping[object, object]:
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            f"expected a mapping, got {type(value).__name__}", field=field, value=value
        )
    return value


def _percentage_block(value: object, field: str) -> float:
    block = _mapping(value, field)
    _reject_unknown(block, ("value",), {}, field)
    if "value" not in block:
        raise ConfigurationError("expected 'value', a percentage from 0 to 100", field=field)
    return _check_percentage(block["value"], f"{field}.value")


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultDelay:
    """Delay some calls before they are sent (Istio's ``fault.delay``).

    Args:
        fixed_delay: how long to wait, in seconds (Istio's ``fixedDelay``); at least 1 ms.
        percentage: the share of calls to delay, from 0 to 100 (default 100: every call, as
            Istio does when ``percentage`` is left out).

    Raises:
        ConfigurationError: ``fixed_delay`` is not a finite number of at least 0.001, or
            ``percentage`` is outside 0-100.
    """

    fixed_delay: float
    percentage: float = 100.0

    def __post_init__(self) -> None:
        delay = self.fixed_delay
        if (
            isinstance(delay, bool)
            or not isinstance(delay, (int, float))
            or not math.isfinite(delay)
            or delay < _MIN_DELAY
        ):
            raise ConfigurationError(
                "expected a finite delay of at least 0.001 seconds (1ms)",
                field="fault.delay.fixedDelay",
                value=delay,
            )
        object.__setattr__(self, "fixed_delay", float(delay))
        object.__setattr__(
            self, "percentage", _check_percentage(self.percentage, "fault.delay.percentage")
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultAbort:
    """Answer some calls with an error status instead of sending them (Istio's
    ``fault.abort``).

    Args:
        http_status: the status to answer with (Istio's ``httpStatus``), from 200 to 599.
        percentage: the share of calls to abort, from 0 to 100 (default 100: every call, as
            Istio does when ``percentage`` is left out).

    Raises:
        ConfigurationError: ``http_status`` is not an integer from 200 to 599, or
            ``percentage`` is outside 0-100.
    """

    http_status: int
    percentage: float = 100.0

    def __post_init__(self) -> None:
        status = self.http_status
        if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599:
            raise ConfigurationError(
                "expected an HTTP status from 200 to 599",
                field="fault.abort.httpStatus",
                value=status,
            )
        object.__setattr__(
            self, "percentage", _check_percentage(self.percentage, "fault.abort.percentage")
        )


@dataclass(frozen=True, slots=True)
class FaultDecision:
    """What to do to one call.

    A decision is truthy when it injects anything.

    Attributes:
        delay_s: seconds to wait before sending the call (``0.0`` for no delay).
        abort_status: the status to answer with instead of sending the call, or ``None``.
    """

    delay_s: float = 0.0
    abort_status: int | None = None

    def __bool__(self) -> bool:
        return self.delay_s > 0.0 or self.abort_status is not None

    @property
    def kind(self) -> str | None:
        """``"abort"`` when the call is aborted (delayed first or not), ``"delay"`` when it is
        only delayed, ``None`` when nothing is injected. This is what ``CallPlan.fault`` holds.
        """
        if self.abort_status is not None:
            return "abort"
        return "delay" if self.delay_s > 0.0 else None


#: The decision that injects nothing.
NO_FAULT: Final = FaultDecision()


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultInjection:
    """The faults of one route (Istio's ``HTTPFaultInjection``): a delay, an abort, or both.

    Args:
        delay: the delay to inject, or ``None``.
        abort: the abort to inject, or ``None``.

    Raises:
        ConfigurationError: neither ``delay`` nor ``abort`` is given, or one has the wrong type.
    """

    delay: FaultDelay | None = None
    abort: FaultAbort | None = None
    # The four possible decisions, built once so deciding allocates nothing.
    _both: FaultDecision = field(init=False, repr=False, compare=False)
    _delayed: FaultDecision = field(init=False, repr=False, compare=False)
    _aborted: FaultDecision = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.delay is None and self.abort is None:
            raise ConfigurationError(
                "expected a delay, an abort, or both", field="fault", value=None
            )
        if self.delay is not None and not isinstance(self.delay, FaultDelay):
            raise ConfigurationError("expected a FaultDelay", field="fault.delay", value=self.delay)
        if self.abort is not None and not isinstance(self.abort, FaultAbort):
            raise ConfigurationError("expected a FaultAbort", field="fault.abort", value=self.abort)
        delay_s = self.delay.fixed_delay if self.delay is not None else 0.0
        status = self.abort.http_status if self.abort is not None else None
        object.__setattr__(self, "_both", FaultDecision(delay_s, status))
        object.__setattr__(self, "_delayed", FaultDecision(delay_s, None))
        object.__setattr__(self, "_aborted", FaultDecision(0.0, status))

    @classmethod
    def from_mapping(cls, spec: Mapping[str, object], *, field: str = "fault") -> FaultInjection:
        """Build the faults from an Istio VirtualService ``fault`` block.

        Accepted: ``delay.fixedDelay`` (a duration such as ``"5s"``), ``delay.percentage.value``
        (or the legacy integer ``delay.percent``), ``abort.httpStatus`` and
        ``abort.percentage.value``. A left-out percentage means 100 (every call), as Istio
        documents.

        Args:
            spec: the ``fault`` mapping, with Istio's camelCase keys.
            field: the dotted path of the block, used to name fields in errors.

        Raises:
            ConfigurationError: a key is unknown or unsupported (``delay.exponentialDelay``,
                ``abort.grpcStatus``, ``abort.http2Error``), or a value is invalid; ``field``
                is the full path (``"http[0].fault.abort.httpStatus"``).
        """
        block = _mapping(spec, field)
        _reject_unknown(block, ("delay", "abort"), {}, field)
        delay: FaultDelay | None = None
        abort: FaultAbort | None = None
        if "delay" in block:
            delay = _delay_from_mapping(block["delay"], f"{field}.delay")
        if "abort" in block:
            abort = _abort_from_mapping(block["abort"], f"{field}.abort")
        if delay is None and abort is None:
            raise ConfigurationError("expected 'delay', 'abort' or both", field=field, value=spec)
        return cls(delay=delay, abort=abort)

    def decide(self, rng: RandomSource) -> FaultDecision:
        """Decide the faults of one call.

        The delay and the abort are drawn independently (one draw each, none for a share of
        0 or 100 %), in that order.

        Args:
            rng: the random source (``random.Random`` or anything with ``random()``).

        Returns:
            The :class:`FaultDecision`; :data:`NO_FAULT` when nothing is injected.
        """
        delayed = self.delay is not None and _hit(self.delay.percentage, rng)
        aborted = self.abort is not None and _hit(self.abort.percentage, rng)
        if delayed:
            return self._both if aborted else self._delayed
        return self._aborted if aborted else NO_FAULT


def _delay_from_mapping(value: object, at: str) -> FaultDelay:
    block = _mapping(value, at)
    _reject_unknown(
        block,
        ("fixedDelay", "percentage", "percent"),
        {"exponentialDelay": "only fixedDelay is supported (Istio does not support it either)"},
        at,
    )
    if "fixedDelay" not in block:
        raise ConfigurationError("expected 'fixedDelay', a duration such as '5s'", field=at)
    seconds = parse_duration(block["fixedDelay"], field=f"{at}.fixedDelay")
    if seconds < _MIN_DELAY:
        raise ConfigurationError(
            "expected a delay of at least 1ms", field=f"{at}.fixedDelay", value=block["fixedDelay"]
        )
    percentage = 100.0
    if "percentage" in block and "percent" in block:
        raise ConfigurationError(
            "give 'percentage' or the legacy 'percent', not both",
            field=f"{at}.percent",
            value=block["percent"],
        )
    if "percentage" in block:
        percentage = _percentage_block(block["percentage"], f"{at}.percentage")
    elif "percent" in block:
        legacy = block["percent"]
        if isinstance(legacy, bool) or not isinstance(legacy, int) or not 0 <= legacy <= 100:
            raise ConfigurationError(
                "expected a whole percentage from 0 to 100", field=f"{at}.percent", value=legacy
            )
        percentage = float(legacy)
    return FaultDelay(fixed_delay=seconds, percentage=percentage)


def _abort_from_mapping(value: object, at: str) -> FaultAbort:
    block = _mapping(value, at)
    _reject_unknown(
        block,
        ("httpStatus", "percentage"),
        {
            "grpcStatus": "meshware's outbound calls are HTTP; abort with httpStatus",
            "http2Error": "aborts answer with an HTTP status; use httpStatus",
        },
        at,
    )
    if "httpStatus" not in block:
        raise ConfigurationError("expected 'httpStatus', an HTTP status from 200 to 599", field=at)
    status = block["httpStatus"]
    if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599:
        raise ConfigurationError(
            "expected an HTTP status from 200 to 599", field=f"{at}.httpStatus", value=status
        )
    percentage = 100.0
    if "percentage" in block:
        percentage = _percentage_block(block["percentage"], f"{at}.percentage")
    return FaultAbort(http_status=status, percentage=percentage)


def abort_response(status: int, request: httpx.Request) -> httpx.Response:
    """The response an aborted call gets, built without touching the network.

    It has Envoy's body, ``fault filter abort`` (``text/plain``), and the header
    ``x-meshware-fault: abort`` so that callers and tests can tell it from a real answer.

    Args:
        status: the HTTP status to answer with.
        request: the call being aborted (set as the response's request).
    """
    return httpx.Response(
        status,
        headers=[("content-type", "text/plain"), (FAULT_HEADER, "abort")],
        content=ABORT_BODY,
        request=request,
    )
