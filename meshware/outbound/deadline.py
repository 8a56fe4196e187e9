"""Deadlines: how much time a request has left, carried from call to call and host to host.

A request that arrives with 2.5 s left must not call another service with a 10 s timeout:
whatever the callee does after 2.5 s is wasted work nobody waits for. meshware carries the
remaining time in one header, ``x-meshware-timeout``, and in one context variable, so every
outbound call made while serving a request is bounded by what is left of it.

The header value uses the ``grpc-timeout`` encoding: 1 to 8 ASCII digits followed by one unit
letter, ``H`` (hours), ``M`` (minutes), ``S`` (seconds), ``m`` (milliseconds), ``u``
(microseconds) or ``n`` (nanoseconds); ``"2500m"`` is two and a half seconds. The value is
*relative* (time left, not a wall-clock instant), so clocks that disagree between hosts do
not matter; each hop turns it into an absolute :class:`Deadline` on its own monotonic clock.

This module also holds :func:`parse_duration`, the reader of Istio-style duration strings
(``"30s"``, ``"500ms"``, ``"1m30s"``) that the outbound policies share.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from dataclasses import field as _field

import httpx

from meshware.exceptions import ConfigurationError, MeshwareError
from meshware.outbound.errors import DeadlineExceeded

__all__ = [
    "TIMEOUT_HEADER",
    "Deadline",
    "InvalidTimeoutHeader",
    "check_deadline",
    "current_deadline",
    "deadline_scope",
    "effective_timeout",
    "format_timeout",
    "parse_duration",
    "parse_timeout",
]

Clock = Callable[[], float]

#: The header that carries the remaining time of a request (grpc-timeout encoding).
TIMEOUT_HEADER = "x-meshware-timeout"

_MAX_DIGITS = 8
_MAX_VALUE = 99_999_999
_NANOS = {
    "H": 3_600_000_000_000,
    "M": 60_000_000_000,
    "S": 1_000_000_000,
    "m": 1_000_000,
    "u": 1_000,
    "n": 1,
}
_COARSE_TO_FINE = ("H", "M", "S", "m", "u", "n")
_FINE_TO_COARSE = ("n", "u", "m", "S", "M", "H")
_MAX_SECONDS = _MAX_VALUE * 3600.0
_EXPECTED = "expected 1-8 ASCII digits followed by a unit H, M, S, m, u or n (e.g. '2500m')"


class InvalidTimeoutHeader(MeshwareError, ValueError):
    """An ``x-meshware-timeout`` header value is malformed.

    The inbound side answers such a request with ``400 Bad Request``. ``value`` is the
    header value as received and ``reason`` a stable short code: ``"empty"``,
    ``"missing-unit"``, ``"bad-unit"``, ``"missing-digits"``, ``"too-many-digits"`` or
    ``"not-digits"``.
    """

    def __init__(self, value: str, reason: str, detail: str) -> None:
        self.value = value
        self.reason = reason
        shown = value if len(value) <= 40 else value[:37] + "..."
        super().__init__(f"invalid {TIMEOUT_HEADER} header {shown!r}: {detail} [{reason}]")


def parse_timeout(value: str | bytes) -> float:
    """Parse an ``x-meshware-timeout`` value into seconds.

    Args:
        value: the header value, as ``str`` or as the raw ``bytes`` an ASGI server hands
            over. Surrounding spaces and tabs are ignored (they are not part of an HTTP
            field value); anything else must match the grpc-timeout grammar exactly.

    Returns:
        The remaining time in seconds (``0.0`` for ``"0n"``: no time left).

    Raises:
        InvalidTimeoutHeader: the value does not match ``1*8DIGIT unit``.
    """
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    stripped = text.strip(" \t")
    if not stripped:
        raise InvalidTimeoutHeader(text, "empty", _EXPECTED)
    unit = stripped[-1]
    scale = _NANOS.get(unit)
    if scale is None:
        if unit.isascii() and unit.isdigit():
            raise InvalidTimeoutHeader(text, "missing-unit", _EXPECTED)
        raise InvalidTimeoutHeader(
            text, "bad-unit", f"unit {unit!r} is not one of H, M, S, m, u, n; {_EXPECTED}"
        )
    digits = stripped[:-1]
    if not digits:
        raise InvalidTimeoutHeader(text, "missing-digits", _EXPECTED)
    if not (digits.isascii() and digits.isdigit()):
        raise InvalidTimeoutHeader(text, "not-digits", _EXPECTED)
    if len(digits) > _MAX_DIGITS:
        raise InvalidTimeoutHeader(
            text, "too-many-digits", f"{len(digits)} digits, at most {_MAX_DIGITS} allowed"
        )
    # Integer nanoseconds divided once: the float is the correctly rounded value.
    return int(digits) * scale / 1_000_000_000


def format_timeout(seconds: float) -> str:
    """Encode a remaining time as an ``x-meshware-timeout`` value.

    The coarsest unit that represents the value exactly in at most 8 digits is used
    (2.5 s gives ``"2500m"``); a value no unit represents exactly is rounded *up* in the
    finest unit that fits, as gRPC does, so a callee never sees less time than was left.
    Zero or negative times give ``"0n"``; times beyond the format's range (about 11,400
    years) give ``"99999999H"``.

    Args:
        seconds: the remaining time in seconds.

    Raises:
        ConfigurationError: ``seconds`` is NaN.
    """
    if math.isnan(seconds):
        raise ConfigurationError("expected a number of seconds, got NaN", field="seconds")
    if seconds <= 0.0:
        return "0n"
    if seconds >= _MAX_SECONDS:
        return "99999999H"
    nanos = max(1, round(seconds * 1e9))
    if nanos % 1000:
        # Not a whole microsecond, the usual case (the time left on a clock): no coarser unit
        # is exact, so it is nanoseconds if they fit, else microseconds rounded up if they do.
        if nanos <= _MAX_VALUE:
            return f"{nanos}n"
        micros = -(-nanos // 1000)
        if micros <= _MAX_VALUE:
            return f"{micros}u"
    for unit in _COARSE_TO_FINE:
        scale = _NANOS[unit]
        if nanos % scale == 0 and nanos // scale <= _MAX_VALUE:
            return f"{nanos // scale}{unit}"
    for unit in _FINE_TO_COARSE:
        value = -(-nanos // _NANOS[unit])
        if value <= _MAX_VALUE:
            return f"{value}{unit}"
    return "99999999H"  # pragma: no cover - excluded by the range check above


@dataclass(frozen=True, slots=True, kw_only=True)
class Deadline:
    """An absolute point in time, on a monotonic clock, by which a request must be done.

    Build one with :meth:`after` or :meth:`from_header` rather than by hand.

    Attributes:
        at: the deadline as a reading of ``clock``.
        clock: the monotonic clock ``at`` refers to (default :func:`time.monotonic`);
            tests pass a fake clock.
    """

    at: float
    clock: Clock = _field(default=time.monotonic, compare=False, repr=False)

    def __post_init__(self) -> None:
        if math.isnan(self.at):
            raise ConfigurationError("expected a clock reading, got NaN", field="at")

    @classmethod
    def after(cls, seconds: float, *, clock: Clock = time.monotonic) -> Deadline:
        """The deadline ``seconds`` from now on ``clock``.

        Raises:
            ConfigurationError: ``seconds`` is NaN or negative.
        """
        if math.isnan(seconds) or seconds < 0:
            raise ConfigurationError(
                "expected a non-negative number of seconds", field="seconds", value=seconds
            )
        return cls(at=clock() + seconds, clock=clock)

    @classmethod
    def from_header(cls, value: str | bytes, *, clock: Clock = time.monotonic) -> Deadline:
        """The deadline an inbound ``x-meshware-timeout`` value describes.

        Raises:
            InvalidTimeoutHeader: the value is malformed (see :func:`parse_timeout`).
        """
        return cls(at=clock() + parse_timeout(value), clock=clock)

    def remaining(self) -> float:
        """Seconds left before the deadline; ``0.0`` once it has passed."""
        left = self.at - self.clock()
        return left if left > 0.0 else 0.0

    def expired(self) -> bool:
        """Whether the deadline has passed (no time is left)."""
        return self.clock() >= self.at

    def to_header(self) -> str:
        """The remaining time encoded for the ``x-meshware-timeout`` header."""
        return format_timeout(self.remaining())

    def earliest(self, other: Deadline | None) -> Deadline:
        """Whichever of this deadline and ``other`` comes first (``self`` if ``other`` is None).

        Both must use the same clock for the comparison to mean anything.
        """
        if other is None or self.at <= other.at:
            return self
        return other


_current: ContextVar[Deadline | None] = ContextVar("meshware_deadline", default=None)


def current_deadline() -> Deadline | None:
    """The deadline of the request being served in this context, or ``None``."""
    return _current.get()


@contextmanager
def deadline_scope(deadline: Deadline | None) -> Iterator[Deadline | None]:
    """Make ``deadline`` the current deadline inside the ``with`` block, then restore the old one.

    The value lives in a :class:`contextvars.ContextVar`. asyncio tasks started inside the
    block copy the context and so see the deadline; so do threads started through
    :func:`asyncio.to_thread` or asgiref's ``sync_to_async``. A plain
    :class:`threading.Thread` or executor job starts with an empty context: run it through
    :func:`contextvars.copy_context` to pass the deadline on. A task or thread that opens its
    own scope does not change the caller's deadline.

    To *shorten* the deadline for a part of the work, pass
    ``mine.earliest(current_deadline())``; this function sets exactly what it is given.

    Args:
        deadline: the deadline to set, or ``None`` to run the block without one.

    Yields:
        The deadline that was set.
    """
    token = _current.set(deadline)
    try:
        yield deadline
    finally:
        _current.reset(token)


def effective_timeout(
    route_timeout: float | None,
    per_try_timeout: float | None,
    deadline: Deadline | None,
) -> float | None:
    """The timeout to give one attempt: the smallest of the limits that apply.

    Args:
        route_timeout: the route's overall timeout in seconds, or ``None``.
        per_try_timeout: the retry policy's per-try timeout in seconds, or ``None``.
        deadline: the request's deadline (usually :func:`current_deadline`), or ``None``.

    Returns:
        The smallest of the given limits in seconds (``0.0`` when the deadline has passed),
        or ``None`` when no limit applies.
    """
    best = route_timeout
    if per_try_timeout is not None and (best is None or per_try_timeout < best):
        best = per_try_timeout
    if deadline is not None:
        left = deadline.remaining()
        if best is None or left < best:
            best = left
    return best


def check_deadline(
    destination: str,
    deadline: Deadline | None = None,
    *,
    request: httpx.Request | None = None,
) -> float | None:
    """Fail fast when a call has no time left; otherwise return how much it has.

    Args:
        destination: the service about to be called, named in the error.
        deadline: the deadline to check; the current one (:func:`current_deadline`) when
            omitted.
        request: the outbound request, attached to the error when given.

    Returns:
        The seconds left, or ``None`` when there is no deadline.

    Raises:
        DeadlineExceeded: the deadline has passed; the call must not be made.
    """
    if deadline is None:
        deadline = _current.get()
        if deadline is None:
            return None
    left = deadline.at - deadline.clock()
    if left <= 0.0:
        raise DeadlineExceeded(
            f"deadline exceeded {-left:.3f}s before the call was made",
            destination=destination,
            request=request,
        )
    return left


_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
_DURATION = re.compile(r"(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:ns|us|µs|μs|ms|s|m|h))+")
_DURATION_UNITS = {
    "h": 3600.0,
    "m": 60.0,
    "s": 1.0,
    "ms": 1e-3,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ns": 1e-9,
}


def parse_duration(value: object, *, field: str) -> float:
    """Read a duration as Istio writes it and return seconds.

    Accepted: a string of one or more ``<number><unit>`` parts with units ``h``, ``m``,
    ``s``, ``ms``, ``us`` (or ``µs``) and ``ns`` (``"30s"``, ``"1m"``, ``"500ms"``,
    ``"1.5s"``, ``"1h30m"``), the string ``"0"``, or a non-negative ``int``/``float`` of
    seconds (for settings written in Python).

    Args:
        value: the setting as found in the configuration.
        field: the dotted name of the setting, used in the error.

    Raises:
        ConfigurationError: the value is not a duration (names ``field`` and the value).
    """
    if isinstance(value, bool):
        raise ConfigurationError(
            "expected a duration such as '30s', '500ms' or '1m', got a boolean",
            field=field,
            value=value,
        )
    if isinstance(value, (int, float)):
        seconds = float(value)
        if math.isnan(seconds) or math.isinf(seconds) or seconds < 0:
            raise ConfigurationError(
                "expected a finite, non-negative number of seconds", field=field, value=value
            )
        return seconds
    if not isinstance(value, str):
        raise ConfigurationError(
            f"expected a duration such as '30s', '500ms' or '1m', got {type(value).__name__}",
            field=field,
            value=value,
        )
    text = value.strip()
    if text == "0":
        return 0.0
    if not _DURATION.fullmatch(text):
        raise ConfigurationError(
            f"expected a duration such as '30s', '500ms' or '1m' (units h, m, s, ms, us, ns), "
            f"got {value!r}",
            field=field,
            value=value,
        )
    total = 0.0
    for number, unit in _DURATION_PART.findall(text):
        total += float(number) * _DURATION_UNITS[unit]
    if math.isinf(total):
        raise ConfigurationError("duration is too large", field=field, value=value)
    return total
