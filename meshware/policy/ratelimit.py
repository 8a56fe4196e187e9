"""Rate limiting: limit specs, the GCRA maths, rules, and the ``RateLimiter`` decision core.

A rule says *how fast* (a :class:`Rate` such as ``"100/second burst 20"``), *per what* (a
:class:`RateLimitKey`: the caller's principal, its IP, a header, ...) and *where* (an optional
:class:`RateLimitMatch`). A :class:`RateLimitPolicy` groups the service-wide rules with the
backend that keeps the buckets (``memory://`` or ``redis://``), and :class:`RateLimiter` turns a
request's :class:`~meshware.policy.facts.RequestFacts` into a :class:`RateLimitDecision` that
the inbound shells (``RateLimitMiddleware`` in ``meshware.inbound.asgi`` / ``.wsgi``) apply::

    policy = RateLimitPolicy(rules=[RateLimitRule(name="per-caller", rate="100/second burst 20")])
    limiter = RateLimiter(policy)
    decision = limiter.decide(RequestFacts(method="GET", path="/", source_ip="10.0.0.7"))
    decision.allowed, decision.status, decision.headers()

The algorithm is GCRA (the generic cell rate algorithm): one float per bucket, the
*theoretical arrival time* (TAT). It behaves exactly like a token bucket holding ``burst``
tokens that refills ``count`` tokens per ``period``; :func:`gcra` is the whole algorithm and
the Redis backend runs the same arithmetic in a Lua script.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from hashlib import blake2b
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple, TypeAlias, TypeVar
from urllib.parse import unquote, urlsplit

from meshware.exceptions import ConfigurationError
from meshware.policy.facts import RequestFacts
from meshware.state.base import BackendUnavailable

if TYPE_CHECKING:
    from meshware.state.base import Acquisition, RateLimitBackend

__all__ = [
    "ROUTE_ATTRIBUTE",
    "FailureMode",
    "GcraResult",
    "HeaderMode",
    "KeyPart",
    "KeySpec",
    "Rate",
    "RateLimitCharges",
    "RateLimitDecision",
    "RateLimitKey",
    "RateLimitMatch",
    "RateLimitPolicy",
    "RateLimitRule",
    "RateLimiter",
    "check_cost",
    "gcra",
    "rate_limit",
    "route_rate_limits",
]

logger = logging.getLogger("meshware.ratelimit")

HeaderMode = Literal["ietf", "ietf+legacy", "none"]
"""Which response fields a decision produces; see :meth:`RateLimitDecision.headers`."""

FailureMode = Literal["open", "closed"]
"""What to do when the backend fails: ``"open"`` allows, ``"closed"`` denies with 503."""

KeyPart: TypeAlias = "str | Callable[[RequestFacts], str | None]"
"""One part of a bucket key: a kind name (``"principal"``, ``"header:x-api-key"``, ...) or a
function of the request facts returning a string, or ``None`` when it has no value."""

KeySpec: TypeAlias = "KeyPart | tuple[KeyPart, ...]"
"""A key part, or a tuple of parts combined into one key."""

ROUTE_ATTRIBUTE = "__meshware_ratelimit__"
"""Attribute under which :func:`rate_limit` stores a handler's rules (a tuple)."""

# Decisions tolerate this fraction of one emission interval of float rounding, so that a
# request arriving exactly on a boundary is judged the same way by Python and by Lua.
_TOLERANCE = 1e-4
_MIN_INTERVAL = 1e-6
_MAX_COUNT = 1_000_000_000
_MAX_PERIOD = 366 * 86400.0

_UNITS: dict[str, float] = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "seconds": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "minutes": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "hours": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
    "days": 86400.0,
}
_UNIT_NAMES = {1.0: "second", 60.0: "minute", 3600.0: "hour", 86400.0: "day"}
_SPEC_RE = re.compile(
    r"\s*([0-9]{1,15})\s*/\s*([0-9]{1,9}(?:\.[0-9]{1,9})?)?\s*([a-z]{1,10})"
    r"(?:\s+burst\s+([0-9]{1,15}))?\s*",
    re.IGNORECASE | re.ASCII,
)
_SPEC_HELP = (
    "expected '<count>/[<n>]<unit>[ burst <b>]' such as '100/second burst 20', '5/minute' "
    "or '2/5s', with unit second|s|minute|m|min|hour|h|day|d"
)
# sf-string characters that never need escaping: printable ASCII without space, '"' and '\'.
_NAME_RE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]{1,128}")
_NAME_UNSAFE = re.compile(r"[^\x21\x23-\x5b\x5d-\x7e]")
_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]{1,64}")
_METHOD_RE = re.compile(r"[A-Z]{1,20}")
_PREFIX_RE = re.compile(r"[\x21-\x7e]{1,128}")
_MAX_KEY_VALUE = 128


# ---------------------------------------------------------------------------------------------
# Rates


@dataclass(frozen=True, slots=True, kw_only=True)
class Rate:
    """A limit: ``count`` requests per ``period_seconds``, with bursts of up to ``burst``.

    Equivalent to a token bucket that holds ``burst`` tokens and refills ``count`` tokens every
    ``period_seconds``, one token every ``period_seconds / count`` seconds. Usually built from
    a spec string with :meth:`parse`.

    Args:
        count: requests admitted per period, sustained (1 to 10**9).
        period_seconds: length of the period in seconds (more than 0, at most 366 days).
        burst: how many requests may arrive at once after an idle spell (the bucket size,
            1 to 10**9). ``0`` (the default) means equal to ``count``.

    Raises:
        ConfigurationError: a value is out of range, or the rate is finer than one request per
            microsecond.
    """

    count: int
    period_seconds: float
    burst: int = 0
    emission_interval: float = field(init=False, repr=False, compare=False)
    """Seconds between two requests at the sustained rate (``period_seconds / count``)."""
    window_seconds: int = field(init=False, repr=False, compare=False)
    """Seconds in which the bucket refills completely, rounded up (the header's ``w``)."""

    def __post_init__(self) -> None:
        if not isinstance(self.count, int) or isinstance(self.count, bool):
            raise ConfigurationError(
                "expected an integer count of requests", field="count", value=self.count
            )
        if not 1 <= self.count <= _MAX_COUNT:
            raise ConfigurationError(
                f"expected a count from 1 to {_MAX_COUNT}", field="count", value=self.count
            )
        period = self.period_seconds
        if (
            isinstance(period, bool)
            or not isinstance(period, (int, float))
            or not math.isfinite(period)
            or not 0 < period <= _MAX_PERIOD
        ):
            raise ConfigurationError(
                "expected a period of more than 0 and at most 366 days, in seconds",
                field="period_seconds",
                value=period,
            )
        burst = self.burst
        if not isinstance(burst, int) or isinstance(burst, bool):
            raise ConfigurationError("expected an integer burst", field="burst", value=burst)
        if burst == 0:
            burst = self.count
            object.__setattr__(self, "burst", burst)
        if not 1 <= burst <= _MAX_COUNT:
            raise ConfigurationError(
                f"expected a burst from 1 to {_MAX_COUNT} (0 means equal to count)",
                field="burst",
                value=burst,
            )
        interval = float(period) / self.count
        if interval < _MIN_INTERVAL:
            raise ConfigurationError(
                "expected at most one request per microsecond (count / period_seconds <= 1000000)",
                field="count",
                value=self.count,
            )
        object.__setattr__(self, "period_seconds", float(period))
        object.__setattr__(self, "emission_interval", interval)
        window = burst * float(period) / self.count
        object.__setattr__(self, "window_seconds", max(1, math.ceil(window - 1e-9)))

    @classmethod
    def parse(cls, text: str, *, field: str = "rate") -> Rate:
        """Parse a limit spec.

        The grammar is ``<count>/[<n>]<unit>[ burst <b>]``, case-insensitive, where unit is
        ``second``/``s``, ``minute``/``m``/``min``, ``hour``/``h`` or ``day``/``d`` (plurals
        accepted) and ``<n>`` optionally multiplies the unit::

            Rate.parse("100/second burst 20")   # 100 per second, bursts of 20
            Rate.parse("5/minute")              # 5 per minute, bursts of 5
            Rate.parse("2/5s")                  # 2 per 5 seconds

        Args:
            text: the spec.
            field: the setting's name, used in the error.

        Returns:
            The rate; ``burst`` defaults to the count.

        Raises:
            ConfigurationError: the text does not follow the grammar or a number is out of
                range; the message quotes the text and says what was expected.
        """
        if not isinstance(text, str):
            raise ConfigurationError(
                f"expected a rate spec string, {_SPEC_HELP}", field=field, value=text
            )
        m = _SPEC_RE.fullmatch(text)
        if m is None:
            raise ConfigurationError(
                f"invalid rate {text!r}: {_SPEC_HELP}", field=field, value=text
            )
        count, multiple, unit, burst = m.groups()
        seconds = _UNITS.get(unit.lower())
        if seconds is None:
            raise ConfigurationError(
                f"invalid rate {text!r}: unknown unit {unit!r}; {_SPEC_HELP}",
                field=field,
                value=text,
            )
        period = seconds * (float(multiple) if multiple is not None else 1.0)
        try:
            if burst is not None and int(burst) == 0:
                raise ConfigurationError(
                    f"expected a burst from 1 to {_MAX_COUNT}", field="burst", value=0
                )
            return cls(
                count=int(count),
                period_seconds=period,
                burst=int(burst) if burst is not None else 0,
            )
        except ConfigurationError as exc:
            raise ConfigurationError(
                f"invalid rate {text!r}: {exc}", field=field, value=text
            ) from exc

    def __str__(self) -> str:
        """The rate as a spec (``"100/second burst 20"``); :meth:`parse` reads it back when the
        period is a whole number of seconds."""
        period = self.period_seconds
        unit = _UNIT_NAMES.get(period)
        if unit is None:
            unit = f"{int(period)}s" if period.is_integer() else f"{period!r}s"
        burst = "" if self.burst == self.count else f" burst {self.burst}"
        return f"{self.count}/{unit}{burst}"


# ---------------------------------------------------------------------------------------------
# GCRA


class GcraResult(NamedTuple):
    """The outcome of charging one bucket.

    Attributes:
        allowed: whether the request fits in the bucket (and was charged).
        tat: the bucket's theoretical arrival time after this request (store it).
        remaining: whole requests that would still be admitted right now.
        reset_after: seconds until the bucket is completely full again.
        retry_after: seconds until this request would be admitted (``0.0`` when allowed).
    """

    allowed: bool
    tat: float
    remaining: int
    reset_after: float
    retry_after: float


def check_cost(rate: Rate, cost: int) -> None:
    """Raise ``ConfigurationError`` unless ``1 <= cost <= rate.burst``."""
    if not 1 <= cost <= rate.burst:
        raise ConfigurationError(
            f"expected a cost from 1 to the burst ({rate.burst}); a larger cost could never "
            "be admitted",
            field="cost",
            value=cost,
        )


def gcra(tat: float | None, now: float, rate: Rate, cost: int = 1) -> GcraResult:
    """Decide one request against one bucket with GCRA.

    With ``T = rate.emission_interval`` and the bucket's stored theoretical arrival time
    ``tat``, the request is admitted when ``max(tat, now) + cost*T - now <= burst*T``; then the
    new TAT is ``max(tat, now) + cost*T``. A denied request leaves the TAT unchanged. The
    comparison allows 1/10000 of ``T`` of float rounding, so a request arriving exactly on a
    boundary is admitted whatever the rounding of earlier sums. This is
    exactly a token bucket of ``burst`` tokens refilled one token every ``T`` seconds: after an
    idle spell ``burst`` requests pass at once, then one every ``T``. The Redis backend's Lua
    script performs the same operations in the same order.

    Args:
        tat: the stored TAT, or ``None`` for a bucket never seen (or expired).
        now: the current time, in the same clock as ``tat``.
        rate: the limit.
        cost: how many tokens the request takes (1 to ``rate.burst``).

    Returns:
        The decision, the TAT to store, and the remaining / reset / retry figures.

    Raises:
        ConfigurationError: ``cost`` is below 1 or above ``rate.burst``.
    """
    burst = rate.burst
    if cost < 1 or cost > burst:
        check_cost(rate, cost)
    interval = rate.emission_interval
    base = tat if tat is not None and tat > now else now
    backlog = (base - now) / interval
    if backlog + cost <= burst + _TOLERANCE:
        new_tat = base + cost * interval
        # tuple.__new__ straight away: GcraResult(...) adds a Python-level call.
        return _new_result(
            GcraResult,
            (True, new_tat, _floor(burst - backlog - cost + _TOLERANCE), new_tat - now, 0.0),
        )
    return _new_result(
        GcraResult,
        (
            False,
            base,
            max(0, _floor(burst - backlog + _TOLERANCE)),
            base - now,
            (backlog + cost - burst) * interval,
        ),
    )


_new_result: Final = tuple.__new__
_floor: Final = math.floor


# ---------------------------------------------------------------------------------------------
# Keys


def _escape(value: str) -> str:
    # Bounded and unambiguous: long values are hashed ('%' never survives escaping, so the
    # '%H' form cannot be forged), '|' separates parts.
    if len(value) > _MAX_KEY_VALUE:
        digest = blake2b(value.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
        return "%H" + digest
    if "%" in value or "|" in value:
        return value.replace("%", "%25").replace("|", "%7C")
    return value


def _header_getter(name: str) -> Callable[[RequestFacts], str | None]:
    def get(facts: RequestFacts) -> str | None:
        return facts.headers.get(name)

    return get


def _normal_path(facts: RequestFacts) -> str:
    path = facts.path
    return unquote(path) if "%" in path else path


def _ip_piece(facts: RequestFacts) -> str:
    ip = facts.source_ip
    return "ip=" + _escape(ip) if ip else "ip=unknown"


_KINDS: dict[str, tuple[str, Callable[[RequestFacts], str | None]]] = {
    # attrgetter reads the field without a Python-level call.
    "principal": ("p=", attrgetter("source_principal")),
    "request_principal": ("rp=", attrgetter("request_principal")),
    "client_ip": ("ip=", attrgetter("source_ip")),
    "route": ("route=", attrgetter("route")),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimitKey:
    """What a bucket is kept per: one or more parts combined into one string.

    Each part is one of:

    - ``"principal"``: the caller's verified mTLS principal
      (``cluster.local/ns/default/sa/orders``);
    - ``"request_principal"``: ``<iss>/<sub>`` of the caller's validated JWT;
    - ``"client_ip"``: the direct peer's IP address;
    - ``"route"``: the route template (``/api/users/{id}``), so one bucket per endpoint;
    - ``"header:<name>"``: the value of a request header (``"header:x-api-key"``);
    - a function ``(RequestFacts) -> str | None``.

    **Fallback.** A part without a value does not put every such request into one shared
    bucket: ``principal``, ``request_principal``, ``header:...`` and function parts fall back
    to the client IP (``ip=<address>``), ``route`` falls back to the request path
    (``path=<path>``), and a missing client IP is ``ip=unknown``. Each part is tagged with its
    kind (``p=``, ``rp=``, ``ip=``, ``route=``, ``h:<name>=``, ``fn<i>=``), so a header that
    happens to carry an IP address never shares a bucket with that IP's fallback.

    Args:
        parts: the parts, in order; combined with ``|``. Usually built with :meth:`of`.

    Raises:
        ConfigurationError: a part is not one of the kinds above.
    """

    parts: tuple[KeyPart, ...]
    _getters: tuple[tuple[str, Callable[[RequestFacts], str | None], bool], ...] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        parts = self.parts
        if isinstance(parts, (str, bytes)) or callable(parts):
            raise ConfigurationError(
                "expected a tuple of key parts (use RateLimitKey.of for a single part)",
                field="key",
                value=parts,
            )
        parts = tuple(parts)
        if not parts:
            raise ConfigurationError("expected at least one key part", field="key", value=parts)
        getters: list[tuple[str, Callable[[RequestFacts], str | None], bool]] = []
        for index, part in enumerate(parts):
            if isinstance(part, str):
                getters.append(self._compile_kind(part))
            elif callable(part):
                getters.append((f"fn{index}=", part, False))
            else:
                raise ConfigurationError(
                    "expected 'principal', 'request_principal', 'client_ip', 'route', "
                    "'header:<name>' or a callable(RequestFacts) -> str | None",
                    field="key",
                    value=part,
                )
        object.__setattr__(self, "parts", parts)
        object.__setattr__(self, "_getters", tuple(getters))

    @staticmethod
    def _compile_kind(part: str) -> tuple[str, Callable[[RequestFacts], str | None], bool]:
        known = _KINDS.get(part)
        if known is not None:
            return known[0], known[1], part == "route"
        if part.lower().startswith("header:"):
            name = part[7:].strip().lower()
            if _TOKEN_RE.fullmatch(name) is None:
                raise ConfigurationError(
                    "expected a header name after 'header:' (letters, digits and -_.)",
                    field="key",
                    value=part,
                )
            return f"h:{name}=", _header_getter(name), False
        raise ConfigurationError(
            f"unknown key kind {part!r}; expected 'principal', 'request_principal', "
            "'client_ip', 'route', 'header:<name>' or a callable",
            field="key",
            value=part,
        )

    @classmethod
    def of(cls, spec: KeySpec | RateLimitKey) -> RateLimitKey:
        """Build a key from a part, a tuple of parts, or return a ``RateLimitKey`` unchanged.

        Raises:
            ConfigurationError: a part is not a known kind or a callable.
        """
        if isinstance(spec, RateLimitKey):
            return spec
        if isinstance(spec, tuple):
            return cls(parts=spec)
        if isinstance(spec, list):
            return cls(parts=tuple(spec))
        return cls(parts=(spec,))

    def build(self, facts: RequestFacts) -> str:
        """Return the key string of one request (the part after the rule's name).

        Never fails on missing values: see the fallback rules in the class description.
        """
        getters = self._getters
        if len(getters) == 1:
            tag, get, is_route = getters[0]
            value = get(facts)
            if value:
                if len(value) <= _MAX_KEY_VALUE and "%" not in value and "|" not in value:
                    return tag + value  # _escape() would return it as it is
                return tag + _escape(value)
            return "path=" + _escape(_normal_path(facts)) if is_route else _ip_piece(facts)
        pieces = []
        for tag, get, is_route in getters:
            value = get(facts)
            if value:
                pieces.append(tag + _escape(value))
            elif is_route:
                pieces.append("path=" + _escape(_normal_path(facts)))
            else:
                pieces.append(_ip_piece(facts))
        return "|".join(pieces)


# ---------------------------------------------------------------------------------------------
# Matching


def _str_tuple(value: object, name: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ConfigurationError(
            "expected a list of strings (not a single string)", field=name, value=value
        )
    items = tuple(value)
    for item in items:
        if not isinstance(item, str):
            raise ConfigurationError("expected a list of strings", field=name, value=item)
    return items


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimitMatch:
    """Which requests a rule applies to. Every non-empty criterion must match (AND); within a
    criterion any entry may match (OR). All empty matches every request.

    Paths are compared after percent-decoding, so ``/api/%6Cogin`` cannot dodge a rule on
    ``/api/login``.

    Args:
        methods: HTTP methods, upper-case (``["POST", "PUT"]``).
        path_prefixes: path prefixes, each starting with ``/``. A prefix matches whole
            segments: ``/api`` matches ``/api`` and ``/api/users`` but not ``/apiary``; a
            prefix ending in ``/`` (``/static/``) matches anything below it.
        routes: route templates as the framework names them (``/api/users/{id}``).

    Raises:
        ConfigurationError: a method is not upper-case letters, or a path or route does not
            start with ``/``.
    """

    methods: tuple[str, ...] = ()
    path_prefixes: tuple[str, ...] = ()
    routes: tuple[str, ...] = ()
    _methods: frozenset[str] = field(init=False, repr=False, compare=False)
    _exact: frozenset[str] = field(init=False, repr=False, compare=False)
    _prefixes: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _routes: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        methods = _str_tuple(self.methods, "match.methods")
        for method in methods:
            if _METHOD_RE.fullmatch(method) is None:
                raise ConfigurationError(
                    "expected an upper-case HTTP method such as 'GET'",
                    field="match.methods",
                    value=method,
                )
        prefixes = _str_tuple(self.path_prefixes, "match.path_prefixes")
        routes = _str_tuple(self.routes, "match.routes")
        for name, values in (("match.path_prefixes", prefixes), ("match.routes", routes)):
            for value in values:
                if not value.startswith("/") or _PREFIX_RE.fullmatch(value) is None:
                    raise ConfigurationError(
                        "expected a path starting with '/' (printable, no spaces)",
                        field=name,
                        value=value,
                    )
        object.__setattr__(self, "methods", methods)
        object.__setattr__(self, "path_prefixes", prefixes)
        object.__setattr__(self, "routes", routes)
        object.__setattr__(self, "_methods", frozenset(methods))
        object.__setattr__(self, "_exact", frozenset(p for p in prefixes if not p.endswith("/")))
        object.__setattr__(
            self, "_prefixes", tuple(p if p.endswith("/") else p + "/" for p in prefixes)
        )
        object.__setattr__(self, "_routes", frozenset(routes))

    def matches(self, facts: RequestFacts) -> bool:
        """Return whether the request meets every criterion."""
        if self._methods and facts.method not in self._methods:
            return False
        if self._prefixes:
            path = facts.path
            if "%" in path:
                path = unquote(path)
            if path not in self._exact and not path.startswith(self._prefixes):
                return False
        return not self._routes or facts.route in self._routes


# ---------------------------------------------------------------------------------------------
# Rules and policy


def _check_name(name: object, field_name: str) -> str:
    if not isinstance(name, str) or _NAME_RE.fullmatch(name) is None:
        raise ConfigurationError(
            "expected a name of 1 to 128 printable ASCII characters without spaces, '\"' or '\\'",
            field=field_name,
            value=name,
        )
    return name


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimitRule:
    """One limit: how fast, per what, and where.

    Args:
        name: the rule's name, shown to clients in ``RateLimit-Policy`` / ``RateLimit`` and
            part of every bucket key (1 to 128 printable ASCII characters, no spaces,
            quotes or backslashes). Two rules never share buckets unless they share a name.
        rate: a :class:`Rate` or a spec string (``"100/second burst 20"``); always a
            ``Rate`` after construction.
        key: what buckets are kept per: a kind name, a callable, a tuple of those, or a
            :class:`RateLimitKey` (default ``"principal"``, falling back to the client IP).
        match: the requests the rule applies to; ``None`` (the default) means all requests.
        shadow: count requests but never enforce: a request over the limit is still allowed
            and the decision reports ``shadow_limited``. Use it to try a limit on real
            traffic before turning it on.

    Raises:
        ConfigurationError: a field is invalid; ``field`` names it.
    """

    name: str
    rate: Rate | str
    key: KeySpec | RateLimitKey = "principal"
    match: RateLimitMatch | None = None
    shadow: bool = False
    _rate: Rate = field(init=False, repr=False, compare=False)
    _key: RateLimitKey = field(init=False, repr=False, compare=False)
    _policy_header: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_name(self.name, "name")
        rate = self.rate
        if isinstance(rate, str):
            rate = Rate.parse(rate, field="rate")
        elif not isinstance(rate, Rate):
            raise ConfigurationError(
                "expected a Rate or a spec string such as '5/minute'", field="rate", value=rate
            )
        if self.match is not None and not isinstance(self.match, RateLimitMatch):
            raise ConfigurationError(
                "expected a RateLimitMatch or None", field="match", value=self.match
            )
        if not isinstance(self.shadow, bool):
            raise ConfigurationError("expected True or False", field="shadow", value=self.shadow)
        object.__setattr__(self, "rate", rate)
        object.__setattr__(self, "_rate", rate)
        object.__setattr__(self, "_key", RateLimitKey.of(self.key))
        object.__setattr__(
            self, "_policy_header", f'"{self.name}";q={rate.burst};w={rate.window_seconds}'
        )

    def applies_to(self, facts: RequestFacts) -> bool:
        """Return whether the rule's match accepts the request."""
        return self.match is None or self.match.matches(facts)

    def bucket_key(self, facts: RequestFacts) -> str:
        """Return ``"<name>:<key>"``, the bucket of this request (without the policy prefix)."""
        return self.name + ":" + self._key.build(facts)


_BACKEND_SCHEMES = frozenset({"memory", "redis", "rediss", "unix"})


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimitPolicy:
    """A service's rate limiting: its rules and where the buckets live.

    Args:
        rules: the service-wide rules; give one a ``match`` to limit some routes only.
            Every rule that applies to a request is charged, and the most restrictive result
            is reported. Per-handler rules come from the :func:`rate_limit` decorator.
        backend: where buckets live: ``"memory://"`` (the default; per process, optionally
            ``memory://?max_keys=100000``), ``"redis://host:port/db"`` or
            ``"rediss://host:port/db"`` (shared by all replicas; ``?timeout=0.05`` sets the
            socket timeout in seconds), or ``"unix:///path/redis.sock"``.
        failure_mode: when the backend fails, ``"open"`` (the default) allows the request and
            ``"closed"`` denies it with 503. Both flag the decision ``backend_error``.
        key_prefix: prepended to every bucket key, to share a Redis database safely.
        headers: ``"ietf"`` (the default) sends ``RateLimit-Policy`` and ``RateLimit`` as in
            draft-ietf-httpapi-ratelimit-headers; ``"ietf+legacy"`` also sends
            ``X-RateLimit-Limit``/``-Remaining``/``-Reset``; ``"none"`` sends neither.
            ``Retry-After`` accompanies every 429.

    Raises:
        ConfigurationError: a field is invalid; ``field`` names it (``rules[1].name``).
    """

    rules: tuple[RateLimitRule, ...] = ()
    backend: str = "memory://"
    failure_mode: FailureMode = "open"
    key_prefix: str = "meshware:rl:"
    headers: HeaderMode = "ietf"

    def __post_init__(self) -> None:
        rules = self.rules
        if isinstance(rules, RateLimitRule) or not isinstance(rules, Iterable):
            raise ConfigurationError("expected a list of RateLimitRule", field="rules", value=rules)
        rules = tuple(rules)
        seen: set[str] = set()
        for index, rule in enumerate(rules):
            if not isinstance(rule, RateLimitRule):
                raise ConfigurationError(
                    "expected a RateLimitRule", field=f"rules[{index}]", value=rule
                )
            if rule.name in seen:
                raise ConfigurationError(
                    "expected unique rule names; rules with one name would share buckets",
                    field=f"rules[{index}].name",
                    value=rule.name,
                )
            seen.add(rule.name)
        object.__setattr__(self, "rules", rules)
        backend = self.backend
        scheme = urlsplit(backend).scheme.lower() if isinstance(backend, str) else ""
        if scheme not in _BACKEND_SCHEMES:
            raise ConfigurationError(
                "expected a backend URL 'memory://', 'redis://host:port/db', "
                "'rediss://host:port/db' or 'unix:///path'",
                field="backend",
                value=backend,
            )
        if self.failure_mode not in ("open", "closed"):
            raise ConfigurationError(
                "expected 'open' or 'closed'", field="failure_mode", value=self.failure_mode
            )
        if self.headers not in ("ietf", "ietf+legacy", "none"):
            raise ConfigurationError(
                "expected 'ietf', 'ietf+legacy' or 'none'", field="headers", value=self.headers
            )
        prefix = self.key_prefix
        if not isinstance(prefix, str) or (prefix and _PREFIX_RE.fullmatch(prefix) is None):
            raise ConfigurationError(
                "expected up to 128 printable ASCII characters without spaces",
                field="key_prefix",
                value=prefix,
            )


# ---------------------------------------------------------------------------------------------
# Per-route decorator

_F = TypeVar("_F", bound=Callable[..., object])


def rate_limit(
    rate: str | Rate,
    *,
    key: KeySpec | RateLimitKey = "principal",
    name: str | None = None,
    shadow: bool = False,
) -> Callable[[_F], _F]:
    """Attach a rate limit to one handler; stack several for several limits.

    ::

        @rate_limit("5/minute", key="principal", name="login")
        @rate_limit("100/day", name="login-daily")
        async def login(request): ...

    The rules are stored on the handler as the tuple ``__meshware_ratelimit__`` (in source
    order, top first) and read back with :func:`route_rate_limits`; the inbound middleware
    passes them to :meth:`RateLimiter.decide` as ``route_rules``.

    Args:
        rate: a spec string or a :class:`Rate`; parsed now, so a bad spec fails at import.
        key: what buckets are kept per, as in :class:`RateLimitRule` (default ``"principal"``).
        name: the rule's name. By default ``<module>.<qualname>`` of the handler (with
            ``#2``, ``#3`` ... for further unnamed limits on it), so that two handlers
            never share a bucket; choose a short name, since clients see it in headers.
        shadow: count but never enforce (see :class:`RateLimitRule`).

    Returns:
        A decorator that returns the handler itself, with the attribute set.

    Raises:
        ConfigurationError: the spec, key or name is invalid.
    """
    parsed = Rate.parse(rate) if isinstance(rate, str) else rate
    compiled = RateLimitKey.of(key)

    def decorate(handler: _F) -> _F:
        existing: tuple[RateLimitRule, ...] = getattr(handler, ROUTE_ATTRIBUTE, ())
        rule_name = name
        if rule_name is None:
            module = getattr(handler, "__module__", None) or "handler"
            qualname = getattr(handler, "__qualname__", None) or type(handler).__qualname__
            rule_name = _NAME_UNSAFE.sub("_", f"{module}.{qualname}")[:120]
            taken = {r.name for r in existing}
            base, n = rule_name, 1
            while rule_name in taken:
                n += 1
                rule_name = f"{base}#{n}"
        rule = RateLimitRule(name=rule_name, rate=parsed, key=compiled, match=None, shadow=shadow)
        try:
            setattr(handler, ROUTE_ATTRIBUTE, (rule, *existing))
        except AttributeError as exc:
            raise ConfigurationError(
                "cannot attach a rate limit to this object; decorate the function itself",
                field="handler",
                value=handler,
            ) from exc
        return handler

    return decorate


def route_rate_limits(handler: object) -> tuple[RateLimitRule, ...]:
    """Return the rules :func:`rate_limit` attached to ``handler`` (``()`` when none)."""
    rules = getattr(handler, ROUTE_ATTRIBUTE, ())
    return rules if isinstance(rules, tuple) else ()


# ---------------------------------------------------------------------------------------------
# Decisions


def _ceil_seconds(seconds: float) -> int:
    # A hair of float noise above a whole second must not add a second.
    return max(0, math.ceil(seconds - 1e-6))


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimitDecision:
    """What the rate limiter decided for one request.

    Attributes:
        allowed: whether the request may proceed.
        status: ``200`` when allowed, ``429`` when limited, ``503`` when the backend failed
            and ``failure_mode`` is ``"closed"``.
        rule: name of the reported rule (the most restrictive enforced rule that applied),
            or ``None`` when no enforced rule applied or the backend failed.
        limit: the reported rule's burst (the quota ``q``), or ``None``.
        window: seconds in which that quota refills (the ``w``), or ``None``.
        remaining: requests the reported rule would still admit now, or ``None``.
        reset_after: seconds until the reported rule's bucket is full again.
        retry_after: seconds until a retry could succeed (``0.0`` unless limited).
        shadow_limited: a shadow rule would have limited this request.
        shadow_rule: the first shadow rule that would have limited it.
        backend_error: the backend failed, and ``failure_mode`` decided.
        header_mode: which fields :meth:`headers` produces (the policy's ``headers``).
    """

    allowed: bool
    status: int = 200
    rule: str | None = None
    limit: int | None = None
    window: int | None = None
    remaining: int | None = None
    reset_after: float = 0.0
    retry_after: float = 0.0
    shadow_limited: bool = False
    shadow_rule: str | None = None
    backend_error: bool = False
    header_mode: HeaderMode = "ietf"

    @property
    def outcome(self) -> str:
        """``"allowed"``, ``"limited"``, ``"shadow-limited"`` or ``"backend-error"``."""
        if self.backend_error:
            return "backend-error"
        if not self.allowed:
            return "limited"
        return "shadow-limited" if self.shadow_limited else "allowed"

    def headers(self) -> list[tuple[str, str]]:
        """Return the response header fields for this decision.

        With ``header_mode="ietf"`` and a reported rule::

            RateLimit-Policy: "per-caller";q=20;w=1
            RateLimit: "per-caller";r=19;t=1

        plus ``Retry-After: <seconds>`` on a 429 (whole seconds, rounded up, at least 1).
        ``"ietf+legacy"`` adds ``X-RateLimit-Limit``, ``X-RateLimit-Remaining`` and
        ``X-RateLimit-Reset`` (seconds until full, not a timestamp); ``"none"`` gives only
        ``Retry-After`` on a 429. Decisions without a reported rule (no rule applied, or the
        backend failed) carry no rate-limit fields.
        """
        fields: list[tuple[str, str]] = []
        mode = self.header_mode
        if self.rule is not None and mode != "none":
            reset = _ceil_seconds(self.reset_after)
            fields.append(("RateLimit-Policy", f'"{self.rule}";q={self.limit};w={self.window}'))
            fields.append(("RateLimit", f'"{self.rule}";r={self.remaining};t={reset}'))
            if mode == "ietf+legacy":
                fields.append(("X-RateLimit-Limit", str(self.limit)))
                fields.append(("X-RateLimit-Remaining", str(self.remaining)))
                fields.append(("X-RateLimit-Reset", str(reset)))
        if self.status == 429:
            fields.append(("Retry-After", str(max(1, _ceil_seconds(self.retry_after)))))
        return fields


_NOT_LIMITED = RateLimitDecision(allowed=True)

_Plan = list[tuple[RateLimitRule, str]]

RateLimitCharges: TypeAlias = "tuple[list[tuple[RateLimitRule, str]], list[Acquisition]]"
"""What one request charges: each applicable rule with its bucket key, and the backend
acquisitions; from :meth:`RateLimiter.charges_for`, for :meth:`RateLimiter.charge_async`."""

_DECISION_FIELDS: Final = (
    "allowed",
    "status",
    "rule",
    "limit",
    "window",
    "remaining",
    "reset_after",
    "retry_after",
    "shadow_limited",
    "shadow_rule",
    "backend_error",
    "header_mode",
)


def _decision_maker() -> Callable[..., RateLimitDecision]:
    """``RateLimitDecision`` from the values of all its fields, in ``_DECISION_FIELDS`` order.

    A frozen dataclass's ``__init__`` sets each slot through ``object.__setattr__``, which is
    most of the cost of a decision; the slots are filled through their descriptors instead,
    when the class has exactly the slots expected (otherwise the constructor is used).
    """
    setters = []
    if tuple(f.name for f in fields(RateLimitDecision)) == _DECISION_FIELDS:
        for name in _DECISION_FIELDS:
            descriptor = RateLimitDecision.__dict__.get(name)
            if descriptor is None or type(descriptor).__name__ != "member_descriptor":
                break
            setters.append(descriptor.__set__)
    if len(setters) != len(_DECISION_FIELDS):

        def slow(*values: Any) -> RateLimitDecision:
            return RateLimitDecision(**dict(zip(_DECISION_FIELDS, values, strict=True)))

        return slow
    new = object.__new__
    (
        set_allowed,
        set_status,
        set_rule,
        set_limit,
        set_window,
        set_remaining,
        set_reset_after,
        set_retry_after,
        set_shadow_limited,
        set_shadow_rule,
        set_backend_error,
        set_header_mode,
    ) = setters

    def make(
        allowed: bool,
        status: int,
        rule: str | None,
        limit: int | None,
        window: int | None,
        remaining: int | None,
        reset_after: float,
        retry_after: float,
        shadow_limited: bool,
        shadow_rule: str | None,
        backend_error: bool,
        header_mode: HeaderMode,
    ) -> RateLimitDecision:
        decision: RateLimitDecision = new(RateLimitDecision)
        set_allowed(decision, allowed)
        set_status(decision, status)
        set_rule(decision, rule)
        set_limit(decision, limit)
        set_window(decision, window)
        set_remaining(decision, remaining)
        set_reset_after(decision, reset_after)
        set_retry_after(decision, retry_after)
        set_shadow_limited(decision, shadow_limited)
        set_shadow_rule(decision, shadow_rule)
        set_backend_error(decision, backend_error)
        set_header_mode(decision, header_mode)
        return decision

    return make


_make_decision: Final = _decision_maker()


def _more_restrictive(a: GcraResult, b: GcraResult) -> bool:
    """Whether ``a`` restricts the caller more than ``b``."""
    if a.allowed != b.allowed:
        return not a.allowed
    if not a.allowed:
        return a.retry_after > b.retry_after
    if a.remaining != b.remaining:
        return a.remaining < b.remaining
    return a.reset_after > b.reset_after


class RateLimiter:
    """Decides requests against a :class:`RateLimitPolicy`; one per service (or app).

    Args:
        policy: the rules, backend, failure mode and header style.
        backend: a :class:`~meshware.state.base.RateLimitBackend` to use instead of the one
            ``policy.backend`` names (for sharing one between limiters, or for tests). A
            backend passed in is not closed by :meth:`close`.
        clock: returns the current time in seconds (default ``time.monotonic``). The memory
            backend keeps time with it; the Redis backend uses the Redis server's clock so
            that replicas agree. Also paces the backend-error log.

    Attributes:
        policy: the policy given.
        backend: the backend in use.
        backend_errors: how many decisions met a backend error since creation.

    Raises:
        ConfigurationError: ``policy.backend`` is not a valid backend URL.
    """

    ERROR_LOG_INTERVAL = 10.0
    """At most one backend-error log line per this many seconds."""

    def __init__(
        self,
        policy: RateLimitPolicy,
        *,
        backend: RateLimitBackend | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(policy, RateLimitPolicy):
            raise ConfigurationError("expected a RateLimitPolicy", field="policy", value=policy)
        self.policy = policy
        self._clock = clock
        if backend is None:
            from meshware.state import backend_from_url

            backend = backend_from_url(policy.backend)
            self._owns_backend = True
        else:
            self._owns_backend = False
        self.backend: RateLimitBackend = backend
        self.backend_errors = 0
        self._errors_unlogged = 0
        self._last_error_log = -math.inf
        self._error_lock = threading.Lock()
        self._rules = policy.rules
        self._prefix = policy.key_prefix
        # Per service-wide rule, what each request needs: (rule, bucket key prefix, key
        # builder, match or None, rate).
        self._compiled = tuple(
            (
                rule,
                policy.key_prefix + rule.name + ":",
                rule._key.build,
                None if rule.match is None else rule.match.matches,
                rule._rate,
            )
            for rule in policy.rules
        )
        from meshware.state.memory import MemoryBackend

        self._memory = MemoryBackend
        self._mode: HeaderMode = policy.headers
        self._fail_open = policy.failure_mode == "open"
        self._failure = RateLimitDecision(
            allowed=self._fail_open,
            status=200 if self._fail_open else 503,
            backend_error=True,
            header_mode=self._mode,
        )

    def charges_for(
        self, facts: RequestFacts, route_rules: Sequence[RateLimitRule] = ()
    ) -> RateLimitCharges:
        """The buckets a request charges: each service-wide rule and each of ``route_rules``
        that applies, with the bucket key its key builds from ``facts``.

        The answer depends on ``facts`` only, so a caller that sees the same facts again may
        keep it and charge it once per request with :meth:`charge_async`.
        """
        plan: _Plan = []
        charges: list[Acquisition] = []
        for rule, bucket, build, matches, rate in self._compiled:
            if matches is None or matches(facts):
                key = bucket + build(facts)
                plan.append((rule, key))
                charges.append((key, rate, 1))
        if route_rules:
            prefix = self._prefix
            for rule in route_rules:
                if rule.match is None or rule.match.matches(facts):
                    key = prefix + rule.name + ":" + rule._key.build(facts)
                    plan.append((rule, key))
                    charges.append((key, rule._rate, 1))
        return plan, charges

    def decide(
        self, facts: RequestFacts, *, route_rules: Sequence[RateLimitRule] = ()
    ) -> RateLimitDecision:
        """Charge every applicable rule for one request and decide (blocking; for WSGI).

        Args:
            facts: the request.
            route_rules: the handler's own rules, from :func:`route_rate_limits`.

        Returns:
            The decision. A backend failure does not raise: it becomes the failure-mode
            decision with ``backend_error=True``.
        """
        return self.charge(self.charges_for(facts, route_rules))

    @property
    def in_process(self) -> bool:
        """Whether the backend keeps its buckets in this process (``memory://``): then
        :meth:`charge` never waits and an event loop may call it."""
        return type(self.backend) is self._memory

    def charge(self, charges: RateLimitCharges) -> RateLimitDecision:
        """Charge the buckets of :meth:`charges_for` for one request and decide (blocking,
        unless :attr:`in_process`); the result is :meth:`decide`'s."""
        plan, acquisitions = charges
        if not plan:
            return _NOT_LIMITED
        now = self._clock()
        try:
            results = self.backend.acquire_many(acquisitions, now)
        except BackendUnavailable as exc:
            return self._backend_failed(exc, now)
        return self._combine(plan, results)

    async def decide_async(
        self, facts: RequestFacts, *, route_rules: Sequence[RateLimitRule] = ()
    ) -> RateLimitDecision:
        """The non-blocking twin of :meth:`decide`, for ASGI; same arguments and result."""
        return await self.charge_async(self.charges_for(facts, route_rules))

    async def charge_async(self, charges: RateLimitCharges) -> RateLimitDecision:
        """Charge the buckets of :meth:`charges_for` for one request and decide, without
        blocking; the result is :meth:`decide_async`'s."""
        plan, acquisitions = charges
        if not plan:
            return _NOT_LIMITED
        now = self._clock()
        backend = self.backend
        try:
            if type(backend) is self._memory:
                # Its awaitable twin only wraps this; calling it directly saves a coroutine.
                results = backend.acquire_many(acquisitions, now)
            else:
                results = await backend.acquire_many_async(acquisitions, now)
        except BackendUnavailable as exc:
            return self._backend_failed(exc, now)
        return self._combine(plan, results)

    def _combine(self, plan: _Plan, results: Sequence[GcraResult]) -> RateLimitDecision:
        if len(plan) == 1 and len(results) == 1 and not plan[0][0].shadow:
            # One enforced rule: it is the reported one.
            rule = plan[0][0]
            result = results[0]
            rate = rule._rate
            allowed = result.allowed
            return _make_decision(
                allowed,
                200 if allowed else 429,
                rule.name,
                rate.burst,
                rate.window_seconds,
                result.remaining,
                result.reset_after,
                result.retry_after,
                False,
                None,
                False,
                self._mode,
            )
        worst: tuple[RateLimitRule, GcraResult] | None = None
        shadow_rule: str | None = None
        for (rule, _), result in zip(plan, results, strict=True):
            if rule.shadow:
                if shadow_rule is None and not result.allowed:
                    shadow_rule = rule.name
            elif worst is None or _more_restrictive(result, worst[1]):
                worst = (rule, result)
        if worst is None:
            if shadow_rule is None:
                return _NOT_LIMITED
            return RateLimitDecision(
                allowed=True, shadow_limited=True, shadow_rule=shadow_rule, header_mode=self._mode
            )
        rule, result = worst
        rate = rule._rate
        return _make_decision(
            result.allowed,
            200 if result.allowed else 429,
            rule.name,
            rate.burst,
            rate.window_seconds,
            result.remaining,
            result.reset_after,
            result.retry_after,
            shadow_rule is not None,
            shadow_rule,
            False,
            self._mode,
        )

    def _backend_failed(self, exc: BackendUnavailable, now: float) -> RateLimitDecision:
        with self._error_lock:
            self.backend_errors += 1
            self._errors_unlogged += 1
            if now - self._last_error_log >= self.ERROR_LOG_INTERVAL:
                count, self._errors_unlogged = self._errors_unlogged, 0
                self._last_error_log = now
            else:
                count = 0
        if count:
            logger.warning(
                "rate limit backend unavailable (%d decision(s) since the last report, "
                "failing %s): %s",
                count,
                "open" if self._fail_open else "closed",
                exc,
            )
        return self._failure

    def close(self) -> None:
        """Release the backend's connections, if this limiter created the backend."""
        if self._owns_backend:
            self.backend.close()

    async def aclose(self) -> None:
        """Like :meth:`close`, from the event loop that used :meth:`decide_async`."""
        if self._owns_backend:
            await self.backend.aclose()
