"""Outlier detection: take failing endpoints out of rotation for a while (Istio/Envoy).

:class:`OutlierDetection` is Istio's DestinationRule ``outlierDetection`` block;
:class:`OutlierDetector` applies it to the endpoints of one destination. It follows Envoy's
consecutive-error detector:

- Every result is counted per endpoint. With ``split_external_local_origin_errors`` off (the
  default) a local-origin failure (connect failure, reset, timeout) counts as a 503, as Envoy
  maps it; with it on, local-origin failures are counted apart, against
  ``consecutive_local_origin_failures``, and only real responses count as 5xx.
- When an endpoint reaches ``consecutive_5xx_errors`` consecutive 5xx (or
  ``consecutive_gateway_errors`` consecutive 502/503/504, or
  ``consecutive_local_origin_failures``), it is ejected, unless that would take the share of
  ejected endpoints above ``max_ejection_percent``: the check is
  ``100 * (ejected + 1) / endpoints <= max_ejection_percent``. With the default 10 % this
  means that a destination with fewer than 10 endpoints never has one ejected, exactly as in
  Envoy (which ejects one anyway only when ``always_eject_one_host`` is set). The counter that
  fired is reset either way.
- An ejected endpoint stays out for ``base_ejection_time`` times its ejection multiplier,
  capped by ``max_ejection_time``. The multiplier grows by one at each ejection and shrinks by
  one for every full ``interval`` the endpoint then spends back in service, so an endpoint
  that keeps failing stays out longer each time and one that recovers is forgiven.
- When the ejection time is up the endpoint is back, with its counters reset.
- ``min_health_percent`` (Istio's field, Envoy's panic threshold): when fewer than this share
  of the endpoints are healthy, ejections are ignored and every endpoint is used.

Envoy sweeps ejections back on its ``interval`` timer; meshware un-ejects an endpoint at the
exact moment its time is up, checked lazily on the next call.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from meshware.exceptions import ConfigurationError
from meshware.outbound.deadline import parse_duration

__all__ = ["OutlierDetection", "OutlierDetector", "OutlierEvent"]

_K = TypeVar("_K", bound=Hashable)

#: Reason codes of ejections.
CONSECUTIVE_5XX: Final = "consecutive-5xx"
CONSECUTIVE_GATEWAY_ERRORS: Final = "consecutive-gateway-errors"
CONSECUTIVE_LOCAL_ORIGIN_FAILURES: Final = "consecutive-local-origin-failures"

_DEFAULT_MAX_EJECTION_TIME = 300.0
_GATEWAY = frozenset({502, 503, 504})

_ISTIO_KEYS = {
    "consecutive5xxErrors": "consecutive_5xx_errors",
    "consecutiveGatewayErrors": "consecutive_gateway_errors",
    "consecutiveLocalOriginFailures": "consecutive_local_origin_failures",
    "splitExternalLocalOriginErrors": "split_external_local_origin_errors",
    "interval": "interval",
    "baseEjectionTime": "base_ejection_time",
    "maxEjectionPercent": "max_ejection_percent",
    "minHealthPercent": "min_health_percent",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class OutlierDetection:
    """Istio's ``outlierDetection`` settings, with Istio's defaults.

    Attributes:
        consecutive_5xx_errors: consecutive 5xx responses (and, unless split, local-origin
            failures) that eject an endpoint (Istio's ``consecutive5xxErrors``, default 5).
            ``None`` or ``0`` turns the check off.
        consecutive_gateway_errors: consecutive 502/503/504 that eject an endpoint
            (``consecutiveGatewayErrors``). Off by default (Istio's 0); ``0`` means off.
        consecutive_local_origin_failures: consecutive local-origin failures that eject an
            endpoint when ``split_external_local_origin_errors`` is on
            (``consecutiveLocalOriginFailures``, default 5). ``None`` or ``0`` turns it off.
        split_external_local_origin_errors: count local-origin failures (the connection
            could not be made, was reset, timed out) apart from the server's 5xx
            (``splitExternalLocalOriginErrors``, default off).
        interval: seconds of good service that take one step off an endpoint's ejection
            multiplier (``interval``, default 10 s).
        base_ejection_time: seconds an endpoint is ejected the first time
            (``baseEjectionTime``, default 30 s).
        max_ejection_time: the longest ejection in seconds (Envoy's ``max_ejection_time``;
            Istio does not expose it). ``None`` means Envoy's default: 300 s, or
            ``base_ejection_time`` if that is longer.
        max_ejection_percent: the largest share of endpoints that may be ejected at once
            (``maxEjectionPercent``, default 10), 0-100.
        min_health_percent: below this share of healthy endpoints, ejections are ignored
            and all endpoints are used (``minHealthPercent``, default 0: never), 0-100.
        always_eject_one_host: eject one endpoint even when ``max_ejection_percent`` would
            not allow it (Envoy's ``always_eject_one_host``; Istio does not expose it).

    Raises:
        ConfigurationError: a value is out of range (names the field).
    """

    consecutive_5xx_errors: int | None = 5
    consecutive_gateway_errors: int | None = None
    consecutive_local_origin_failures: int | None = 5
    split_external_local_origin_errors: bool = False
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_time: float | None = None
    max_ejection_percent: int = 10
    min_health_percent: int = 0
    always_eject_one_host: bool = False

    def __post_init__(self) -> None:
        for name in (
            "consecutive_5xx_errors",
            "consecutive_gateway_errors",
            "consecutive_local_origin_failures",
        ):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigurationError(
                    "expected a whole number of errors (0 or None: off)", field=name, value=value
                )
            if value == 0:
                object.__setattr__(self, name, None)
        for name in ("split_external_local_origin_errors", "always_eject_one_host"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigurationError(
                    "expected True or False", field=name, value=getattr(self, name)
                )
        for name in ("interval", "base_ejection_time"):
            _check_positive_seconds(getattr(self, name), name)
        if self.max_ejection_time is not None:
            _check_positive_seconds(self.max_ejection_time, "max_ejection_time")
            if self.max_ejection_time < self.base_ejection_time:
                raise ConfigurationError(
                    f"expected at least base_ejection_time ({self.base_ejection_time}s)",
                    field="max_ejection_time",
                    value=self.max_ejection_time,
                )
        for name in ("max_ejection_percent", "min_health_percent"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
                raise ConfigurationError(
                    "expected a whole percentage, 0-100", field=name, value=value
                )

    @property
    def effective_max_ejection_time(self) -> float:
        """The ejection cap in force: ``max_ejection_time`` or Envoy's default."""
        if self.max_ejection_time is not None:
            return self.max_ejection_time
        return max(_DEFAULT_MAX_EJECTION_TIME, self.base_ejection_time)

    @classmethod
    def from_mapping(
        cls, spec: Mapping[str, object], *, prefix: str = "outlierDetection"
    ) -> OutlierDetection:
        """Build the settings from a DestinationRule ``outlierDetection`` block.

        Keys are Istio's camelCase names (``consecutive5xxErrors``, ``interval``,
        ``baseEjectionTime``, ``maxEjectionPercent``, ...); durations are strings such as
        ``"30s"``, ``"1m"`` or ``"500ms"`` (at least 1 ms, as Istio requires).

        Args:
            spec: the ``outlierDetection`` mapping.
            prefix: the dotted path of the block, used to name fields in errors.

        Raises:
            ConfigurationError: a key is unknown or a value invalid; ``field`` is the dotted
                path (``"outlierDetection.baseEjectionTime"``).
        """
        if not isinstance(spec, Mapping):
            raise ConfigurationError(
                f"expected a mapping, got {type(spec).__name__}", field=prefix, value=spec
            )
        values: dict[str, Any] = {}
        for key, value in spec.items():
            path = f"{prefix}.{key}"
            if key == "consecutiveErrors":
                raise ConfigurationError(
                    "was removed from Istio; use consecutive5xxErrors (or "
                    "consecutiveGatewayErrors for 502/503/504 only)",
                    field=path,
                    value=value,
                )
            name = _ISTIO_KEYS.get(key)
            if name is None:
                raise ConfigurationError(
                    f"unknown key; expected one of {', '.join(_ISTIO_KEYS)}", field=path, value=key
                )
            if name in ("interval", "base_ejection_time"):
                seconds = parse_duration(value, field=path)
                if seconds < 0.001:
                    raise ConfigurationError("expected at least 1ms", field=path, value=value)
                values[name] = seconds
            elif name == "split_external_local_origin_errors":
                if not isinstance(value, bool):
                    raise ConfigurationError("expected true or false", field=path, value=value)
                values[name] = value
            else:
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ConfigurationError(
                        "expected a whole number, 0 or more", field=path, value=value
                    )
                if name.endswith("_percent") and value > 100:
                    raise ConfigurationError(
                        "expected a percentage, 0-100", field=path, value=value
                    )
                values[name] = value
        return cls(**values)


@dataclass(frozen=True, slots=True, kw_only=True)
class OutlierEvent:
    """Something the detector did, for logs and metrics.

    Attributes:
        action: ``"eject"``, ``"uneject"``, or ``"overflow"`` (an ejection was due but
            ``max_ejection_percent`` did not allow it).
        endpoint: the endpoint's key.
        reason: why it was (or would have been) ejected: ``"consecutive-5xx"``,
            ``"consecutive-gateway-errors"`` or ``"consecutive-local-origin-failures"``;
            ``None`` for ``"uneject"``.
        at: the clock reading when it happened (for ``"uneject"``, when the time was up).
        ejection_time: for ``"eject"``, how long the endpoint is out, in seconds.
        times_ejected: how many times the endpoint has been ejected in all.
    """

    action: str
    endpoint: Hashable
    reason: str | None
    at: float
    ejection_time: float | None = None
    times_ejected: int = 0


class _Host:
    __slots__ = (
        "backoff",
        "consecutive_5xx",
        "consecutive_gateway",
        "consecutive_local",
        "ejected_until",
        "last_unejection",
        "times_ejected",
    )

    def __init__(self) -> None:
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        self.consecutive_local = 0
        self.ejected_until: float | None = None
        self.last_unejection: float | None = None
        self.backoff = 0
        self.times_ejected = 0


class OutlierDetector:
    """Tracks the endpoints of one destination and ejects the ones that keep failing.

    Thread-safe; every method is O(1) except :meth:`healthy` (O(endpoints)) and
    :meth:`set_endpoints`. Endpoints are any hashable keys (``"10.0.0.7:8080"``, a tuple,
    an endpoint object); they are registered when first seen by :meth:`healthy` or
    :meth:`on_result`, and forgotten by :meth:`set_endpoints`.

    Args:
        config: the outlier detection settings.
        clock: a monotonic clock returning seconds (default :func:`time.monotonic`).
        on_event: called with an :class:`OutlierEvent` for each ejection, un-ejection and
            overflow, outside the detector's lock (so it may call the detector).
    """

    def __init__(
        self,
        config: OutlierDetection | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_event: Callable[[OutlierEvent], None] | None = None,
    ) -> None:
        self.config = config if config is not None else OutlierDetection()
        cfg = self.config
        self._clock = clock
        self._on_event = on_event
        self._lock = threading.Lock()
        self._hosts: dict[Hashable, _Host] = {}
        self._ejected: set[Hashable] = set()
        self._next_unejection = math.inf
        self._events: list[OutlierEvent] = []
        self._t5xx = cfg.consecutive_5xx_errors
        self._tgateway = cfg.consecutive_gateway_errors
        self._tlocal = cfg.consecutive_local_origin_failures
        self._split = cfg.split_external_local_origin_errors
        self._base = cfg.base_ejection_time
        self._max_time = cfg.effective_max_ejection_time
        self._ejections_total = 0
        self._overflow_total = 0

    @property
    def ejections_total(self) -> int:
        """Ejections made since the detector was created (Envoy's ``ejections_enforced_total``)."""
        return self._ejections_total

    @property
    def ejections_overflow(self) -> int:
        """Ejections that were due but refused by ``max_ejection_percent``."""
        return self._overflow_total

    @property
    def ejections_active(self) -> int:
        """Endpoints ejected right now."""
        with self._lock:
            self._expire(self._clock())
            events = self._take_events()
            active = len(self._ejected)
        self._emit(events)
        return active

    def ejected_until(self, now: float) -> dict[Hashable, float]:
        """The endpoints ejected at ``now`` (the detector's clock), with when each returns."""
        with self._lock:
            return {
                key: host.ejected_until
                for key, host in self._hosts.items()
                if host.ejected_until is not None and host.ejected_until > now
            }

    def on_result(
        self, endpoint: Hashable, *, status: int | None = None, local_origin_failure: bool = False
    ) -> bool:
        """Count the result of one call to ``endpoint``.

        Args:
            endpoint: the endpoint's key.
            status: the HTTP status of the response, when one came.
            local_origin_failure: ``True`` when no response came because of a local-origin
                failure (connect failure, reset, timeout). With ``status`` ``None`` and this
                ``False``, the call reports only that a connection was made: it clears the
                local-origin count in split mode and is ignored otherwise.

        Returns:
            Whether this result ejected the endpoint.

        Raises:
            ConfigurationError: both a ``status`` and ``local_origin_failure`` were given.
        """
        if status is not None and local_origin_failure:
            raise ConfigurationError(
                "a call has a response status or a local-origin failure, not both",
                field="local_origin_failure",
                value=local_origin_failure,
            )
        with self._lock:
            now = self._clock()
            if now >= self._next_unejection:
                self._expire(now)
            host = self._hosts.get(endpoint)
            if host is None:
                host = self._hosts[endpoint] = _Host()
            if status is not None:
                if self._split:
                    host.consecutive_local = 0
                ejected = self._count_status(endpoint, host, status, now)
            elif local_origin_failure:
                if self._split:
                    ejected = self._count_local_failure(endpoint, host, now)
                else:
                    ejected = self._count_status(endpoint, host, 503, now)
            else:
                if self._split:
                    host.consecutive_local = 0
                ejected = False
            events = self._take_events()
        self._emit(events)
        return ejected

    def is_ejected(self, endpoint: Hashable, now: float | None = None) -> bool:
        """Whether ``endpoint`` is ejected at ``now`` (default: the detector's clock)."""
        with self._lock:
            if now is None:
                now = self._clock()
            if now >= self._next_unejection:
                self._expire(now)
            host = self._hosts.get(endpoint)
            ejected = host is not None and host.ejected_until is not None
            events = self._take_events()
        self._emit(events)
        return ejected

    def healthy(self, endpoints: Sequence[_K]) -> list[_K]:
        """The endpoints a balancer may pick from, in their given order.

        Ejected endpoints are left out, unless fewer than ``min_health_percent`` of the
        endpoints would remain (panic mode: then all are returned, as Envoy does). Unknown
        endpoints are registered, so they count towards ``max_ejection_percent``.
        """
        with self._lock:
            now = self._clock()
            if now >= self._next_unejection:
                self._expire(now)
            hosts = self._hosts
            if not self._ejected:
                for endpoint in endpoints:
                    if endpoint not in hosts:
                        hosts[endpoint] = _Host()
                chosen = list(endpoints)
            else:
                chosen = []
                for endpoint in endpoints:
                    host = hosts.get(endpoint)
                    if host is None:
                        hosts[endpoint] = _Host()
                        chosen.append(endpoint)
                    elif host.ejected_until is None:
                        chosen.append(endpoint)
                panic = self.config.min_health_percent
                if panic and len(chosen) * 100 < panic * len(endpoints):
                    chosen = list(endpoints)
            events = self._take_events()
        self._emit(events)
        return chosen

    def set_endpoints(self, endpoints: Iterable[Hashable]) -> None:
        """Make ``endpoints`` the destination's whole set: forget the others, add new ones."""
        wanted = set(endpoints)
        with self._lock:
            for key in [k for k in self._hosts if k not in wanted]:
                del self._hosts[key]
                self._ejected.discard(key)
            for key in wanted:
                if key not in self._hosts:
                    self._hosts[key] = _Host()
            self._next_unejection = min(
                (self._hosts[k].ejected_until or math.inf for k in self._ejected), default=math.inf
            )

    def _count_status(self, endpoint: Hashable, host: _Host, status: int, now: float) -> bool:
        if not 500 <= status <= 599:
            host.consecutive_5xx = 0
            host.consecutive_gateway = 0
            return False
        ejected = False
        if status in _GATEWAY:
            host.consecutive_gateway += 1
            if self._tgateway is not None and host.consecutive_gateway >= self._tgateway:
                ejected = self._eject(endpoint, host, CONSECUTIVE_GATEWAY_ERRORS, now)
                host.consecutive_gateway = 0
        else:
            host.consecutive_gateway = 0
        host.consecutive_5xx += 1
        if self._t5xx is not None and host.consecutive_5xx >= self._t5xx:
            ejected = self._eject(endpoint, host, CONSECUTIVE_5XX, now) or ejected
            host.consecutive_5xx = 0
        return ejected

    def _count_local_failure(self, endpoint: Hashable, host: _Host, now: float) -> bool:
        host.consecutive_local += 1
        if self._tlocal is not None and host.consecutive_local >= self._tlocal:
            host.consecutive_local = 0
            return self._eject(endpoint, host, CONSECUTIVE_LOCAL_ORIGIN_FAILURES, now)
        return False

    def _eject(self, endpoint: Hashable, host: _Host, reason: str, now: float) -> bool:
        if host.ejected_until is not None:
            return False
        cfg = self.config
        active = len(self._ejected)
        allowed = 100.0 * (active + 1) / len(self._hosts) <= cfg.max_ejection_percent
        if not allowed and not (cfg.always_eject_one_host and active == 0):
            self._overflow_total += 1
            self._events.append(
                OutlierEvent(
                    action="overflow",
                    endpoint=endpoint,
                    reason=reason,
                    at=now,
                    times_ejected=host.times_ejected,
                )
            )
            return False
        if host.last_unejection is not None and host.backoff:
            # One step off the multiplier per full interval spent back in service.
            steps = int((now - host.last_unejection) // cfg.interval)
            host.backoff = max(0, host.backoff - steps)
        if host.backoff * self._base < self._max_time + self._base:
            host.backoff += 1
        duration = min(self._base * host.backoff, self._max_time)
        host.ejected_until = now + duration
        host.times_ejected += 1
        self._ejected.add(endpoint)
        self._ejections_total += 1
        if host.ejected_until < self._next_unejection:
            self._next_unejection = host.ejected_until
        self._events.append(
            OutlierEvent(
                action="eject",
                endpoint=endpoint,
                reason=reason,
                at=now,
                ejection_time=duration,
                times_ejected=host.times_ejected,
            )
        )
        return True

    def _expire(self, now: float) -> None:
        upcoming = math.inf
        for key in list(self._ejected):
            host = self._hosts[key]
            until = host.ejected_until
            if until is None:
                continue
            if until <= now:
                self._ejected.discard(key)
                host.ejected_until = None
                host.last_unejection = until
                host.consecutive_5xx = 0
                host.consecutive_gateway = 0
                host.consecutive_local = 0
                self._events.append(
                    OutlierEvent(
                        action="uneject",
                        endpoint=key,
                        reason=None,
                        at=until,
                        times_ejected=host.times_ejected,
                    )
                )
            elif until < upcoming:
                upcoming = until
        self._next_unejection = upcoming

    def _take_events(self) -> list[OutlierEvent]:
        if not self._events:
            return _NO_EVENTS
        events, self._events = self._events, []
        return events

    def _emit(self, events: list[OutlierEvent]) -> None:
        if events and self._on_event is not None:
            for event in events:
                self._on_event(event)


_NO_EVENTS: list[OutlierEvent] = []


def _check_positive_seconds(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigurationError("expected a number of seconds", field=name, value=value)
    if math.isnan(value) or math.isinf(value) or value <= 0:
        raise ConfigurationError(
            "expected a finite number of seconds, more than 0", field=name, value=value
        )
