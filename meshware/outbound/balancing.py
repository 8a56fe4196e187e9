"""Load balancing: which endpoint of a destination gets the next call.

A :class:`Balancer` picks one endpoint from the destination's (healthy) endpoints per call, and
may learn from the calls it sees through :meth:`Balancer.on_start` and
:meth:`Balancer.on_complete`. One balancer instance serves one destination; its state (a
round-robin position, in-flight counts, latency estimates) lives in the instance.

The algorithms and their names follow Istio's DestinationRule ``trafficPolicy.loadBalancer``:

=====================  =======================================================================
``ROUND_ROBIN``        :class:`RoundRobin`, smooth weighted round robin (as nginx)
``RANDOM``             :class:`Random`, weighted
``LEAST_REQUEST``      :class:`LeastRequest`, power of two choices on in-flight calls (Envoy)
``PEAK_EWMA``          :class:`PeakEwma`, latency-aware power of two choices (Linkerd)
``consistentHash``     :class:`RingHash`, a consistent-hash ring (Envoy's ``RING_HASH``)
``localityLbSetting``  :class:`LocalityAware`, prefer the caller's zone, fail over outwards
=====================  =======================================================================

:func:`balancer_from_config` builds a balancer from that configuration shape, and
:func:`hash_key_for` computes the consistent-hash key of a request.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import math
import random
import re
import threading
import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol, runtime_checkable

from meshware.exceptions import ConfigurationError
from meshware.outbound.endpoints import Endpoint, Locality
from meshware.outbound.errors import NoHealthyEndpoint

__all__ = [
    "Balancer",
    "ConsistentHash",
    "HttpCookie",
    "LeastRequest",
    "LoadBalancerSettings",
    "LocalityAware",
    "LocalityLbSetting",
    "PeakEwma",
    "PickContext",
    "Random",
    "RingHash",
    "RoundRobin",
    "balancer_from_config",
    "hash_key_for",
]

_NO_KEYS: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True, kw_only=True)
class PickContext:
    """What a balancer may know about the call it picks an endpoint for.

    Args:
        destination: the destination service's name, used in errors (``"payments"``).
        hash_key: the consistent-hash key of the request (see :func:`hash_key_for`), or
            ``None``. Only :class:`RingHash` uses it.
        exclude: keys (``"address:port"``) of endpoints to avoid, such as those a retry
            already tried. Balancers honour it whenever another endpoint is available, and
            ignore it when every endpoint is excluded.
        local: the caller's locality, for :class:`LocalityAware`; ``None`` uses the
            balancer's own default.

    Raises:
        ConfigurationError: when ``destination`` is not a string or ``exclude`` not a
            frozenset.
    """

    destination: str
    hash_key: str | None = None
    exclude: frozenset[str] = _NO_KEYS
    local: Locality | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.destination, str):
            raise ConfigurationError(
                "expected the destination's name", field="destination", value=self.destination
            )
        if type(self.exclude) is not frozenset:
            raise ConfigurationError(
                "expected a frozenset of endpoint keys", field="exclude", value=self.exclude
            )


@runtime_checkable
class Balancer(Protocol):
    """Picks an endpoint per call and optionally learns from the calls' outcomes.

    The caller (the ``meshware.outbound`` client) passes only endpoints that may take traffic
    (outlier detection has already removed ejected ones), calls :meth:`on_start` when it sends
    to the picked endpoint and :meth:`on_complete` with the token when the call ends, whatever
    the outcome. Pass the same sequence object while the endpoints do not change (resolvers
    return one): balancers then skip their rebuild checks.
    """

    def pick(self, endpoints: Sequence[Endpoint], ctx: PickContext) -> Endpoint:
        """The endpoint for this call.

        Raises:
            NoHealthyEndpoint: when ``endpoints`` is empty; its ``destination`` is
                ``ctx.destination``.
        """
        ...

    def on_start(self, endpoint: Endpoint) -> object:
        """Note that a call to ``endpoint`` starts; returns a token for :meth:`on_complete`."""
        ...

    def on_complete(self, token: object, *, latency_s: float, failed: bool) -> None:
        """Note that the call of ``token`` ended after ``latency_s`` seconds, failed or not."""
        ...


def _no_endpoint(ctx: PickContext) -> NoReturn:
    raise NoHealthyEndpoint("no healthy endpoint to pick from", destination=ctx.destination)


def _allowed(endpoints: Sequence[Endpoint], exclude: frozenset[str]) -> list[int]:
    # Indices of endpoints not excluded, or all of them when every one is excluded.
    allowed = [i for i, e in enumerate(endpoints) if e.key not in exclude]
    return allowed or list(range(len(endpoints)))


def _signature(endpoints: Sequence[Endpoint]) -> tuple[tuple[str, int], ...]:
    return tuple([(e.key, e.weight) for e in endpoints])


class _NoFeedback:
    __slots__ = ()

    def on_start(self, endpoint: Endpoint) -> object:
        """Does nothing: this balancer does not track calls. Returns ``None``."""
        return None

    def on_complete(self, token: object, *, latency_s: float, failed: bool) -> None:
        """Does nothing: this balancer does not track calls."""


class _RoundRobinState:
    __slots__ = ("current", "equal", "offset", "order", "seq", "signature", "weights")

    def __init__(
        self, seq: Sequence[Endpoint], signature: tuple[tuple[str, int], ...], offset: int
    ) -> None:
        self.seq = seq
        self.signature = signature
        self.weights = [w for _, w in signature]
        self.equal = len(set(self.weights)) <= 1
        self.current = [0] * len(signature)
        self.offset = offset
        n = len(signature)
        self.order = [(offset + i) % n for i in range(n)]


class RoundRobin(_NoFeedback):
    """Weighted round robin, smooth as nginx's: each endpoint gets calls in proportion to its
    weight, spread out rather than in bursts (weights 5, 1, 1 give ``a a b a c a a``).

    With equal weights it is a plain rotation. Thread-safe.

    Args:
        randomize_start: start the rotation at a random endpoint (as Envoy does), so that
            many clients started together do not all call the same endpoint first. ``False``
            starts at the first endpoint, which makes the sequence predictable.
        rng: the random source for the start; a new ``random.Random()`` when ``None``.
    """

    __slots__ = ("_counter", "_lock", "_randomize", "_rng", "_state")

    def __init__(self, *, randomize_start: bool = True, rng: random.Random | None = None) -> None:
        self._randomize = bool(randomize_start)
        self._rng = rng if rng is not None else random.Random()
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self._state = _RoundRobinState((), (), 0)

    def _refresh(self, endpoints: Sequence[Endpoint]) -> _RoundRobinState:
        state = self._state
        signature = _signature(endpoints)
        if signature == state.signature:
            state.seq = endpoints
            return state
        offset = self._rng.randrange(len(endpoints)) if self._randomize else 0
        state = _RoundRobinState(endpoints, signature, offset)
        self._state = state
        return state

    def pick(self, endpoints: Sequence[Endpoint], ctx: PickContext) -> Endpoint:
        """The next endpoint in weighted rotation, skipping ``ctx.exclude`` where possible."""
        n = len(endpoints)
        if n == 0:
            _no_endpoint(ctx)
        state = self._state
        if state.seq is not endpoints:
            state = self._refresh(endpoints)
        exclude = ctx.exclude
        if state.equal:
            start = next(self._counter) + state.offset
            if not exclude:
                return endpoints[start % n]
            for step in range(n):
                endpoint = endpoints[(start + step) % n]
                if endpoint.key not in exclude:
                    return endpoint
            return endpoints[start % n]
        with self._lock:
            best = self._smooth_step(state, endpoints, exclude)
            if best < 0:
                best = self._smooth_step(state, endpoints, _NO_KEYS)
        return endpoints[best]

    @staticmethod
    def _smooth_step(
        state: _RoundRobinState, endpoints: Sequence[Endpoint], exclude: frozenset[str]
    ) -> int:
        current, weights = state.current, state.weights
        best = -1
        total = 0
        for i in state.order:
            if exclude and endpoints[i].key in exclude:
                continue
            current[i] += weights[i]
            total += weights[i]
            if best < 0 or current[i] > current[best]:
                best = i
        if best >= 0:
            current[best] -= total
        return best


class _WeightedState:
    __slots__ = ("cumulative", "equal", "seq", "signature", "total")

    def __init__(self, seq: Sequence[Endpoint], signature: tuple[tuple[str, int], ...]) -> None:
        self.seq = seq
        self.signature = signature
        self.cumulative = list(itertools.accumulate(w for _, w in signature))
        self.total = self.cumulative[-1] if self.cumulative else 0
        self.equal = len({w for _, w in signature}) <= 1


def _weighted_index(state: _WeightedState, draw: Callable[[], float], n: int) -> int:
    if state.equal:
        return int(draw() * n)
    return bisect_right(state.cumulative, draw() * state.total)


class Random(_NoFeedback):
    """Picks an endpoint at random, with probability proportional to its weight.

    Args:
        rng: the random source; a new ``random.Random()`` when ``None``. Pass a seeded one
            for reproducible picks.
    """

    __slots__ = ("_draw", "_rng", "_state")

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()
        self._draw = self._rng.random
        self._state = _WeightedState((), ())

    def pick(self, endpoints: Sequence[Endpoint], ctx: PickContext) -> Endpoint:
        """A weighted random endpoint, avoiding ``ctx.exclude`` where possible."""
        n = len(endpoints)
        if n == 0:
            _no_endpoint(ctx)
        state = self._state
        if state.seq is not endpoints:
            signature = _signature(endpoints)
            if signature == state.signature:
                state.seq = endpoints
            else:
                state = self._state = _WeightedState(endpoints, signature)
        if not ctx.exclude:
            return endpoints[_weighted_index(state, self._draw, n)]
        allowed = _allowed(endpoints, ctx.exclude)
        weights = [endpoints[i].weight for i in allowed]
        return endpoints[self._rng.choices(allowed, weights=weights)[0]]


class _Load:
    __slots__ = ("active", "key")

    def __init__(self, key: str) -> None:
        self.key = key
        self.active = 0


class _LoadState:
    __slots__ = ("equal", "loads", "schedule", "seq", "signature")

    def __init__(
        self,
        seq: Sequence[Endpoint],
        signature: tuple[tuple[str, int], ...],
        loads: list[_Load],
    ) -> None:
        self.seq = seq
        self.signature = signature
        self.loads = loads
        self.equal = len({w for _, w in signature}) <= 1
        # Earliest-deadline-first schedule for unequal weights: (deadline, tie-break, index).
        self.schedule: list[tuple[float, int, int]] = []
        if not self.equal:
            self.schedule = [(1.0 / w, i, i) for i, (_, w) in enumerate(signature)]
            heapq.heapify(self.schedule)


class LeastRequest:
    """Envoy's ``LEAST_REQUEST``: favour endpoints with fewer calls in flight.

    With equal weights: of ``choice_count`` random endpoints, the one with the fewest calls in
    flight (the "power of two choices" when ``choice_count`` is 2), which avoids both the
    herding of a global least-loaded choice and the blindness of plain random. With unequal
    weights, as Envoy: a weighted earliest-deadline-first schedule where an endpoint's weight
    is ``weight / (in_flight + 1) ** active_request_bias`` when it is scheduled again, so idle
    endpoints share calls exactly by weight and loaded ones are slowed down.

    In-flight counts come from :meth:`on_start` / :meth:`on_complete`. Thread-safe.

    Args:
        choice_count: how many endpoints to sample per pick, at least 2 (Envoy's default 2).
            The first two samples are always distinct endpoints.
        active_request_bias: how strongly in-flight calls reduce an endpoint's weight
            (Envoy's ``active_request_bias``, default 1.0; 0 ignores load).
        rng: the random source; a new ``random.Random()`` when ``None``.

    Raises:
        ConfigurationError: for ``choice_count`` below 2 or a negative bias.
    """

    __slots__ = ("_bias", "_choices", "_draw", "_loads", "_lock", "_rng", "_state", "_ticket")

    def __init__(
        self,
        *,
        choice_count: int = 2,
        active_request_bias: float = 1.0,
        rng: random.Random | None = None,
    ) -> None:
        if isinstance(choice_count, bool) or not isinstance(choice_count, int) or choice_count < 2:
            raise ConfigurationError(
                "expected an integer of at least 2", field="choice_count", value=choice_count
            )
        if (
            isinstance(active_request_bias, bool)
            or not isinstance(active_request_bias, (int, float))
            or not 0 <= active_request_bias < math.inf
        ):
            raise ConfigurationError(
                "expected a finite number >= 0",
                field="active_request_bias",
                value=active_request_bias,
            )
        self._choices = choice_count
        self._bias = float(active_request_bias)
        self._rng = rng if rng is not None else random.Random()
        self._draw = self._rng.random
        self._lock = threading.Lock()
        self._loads: dict[str, _Load] = {}
        self._state = _LoadState((), (), [])
        self._ticket = itertools.count(1 << 32)

    def in_flight(self, endpoint: Endpoint) -> int:
        """The number of calls to ``endpoint`` started and not yet completed."""
        load = self._loads.get(endpoint.key)
        return 0 if load is None else load.active

    def _refresh(self, endpoints: Sequence[Endpoint]) -> _LoadState:
        signature = _signature(endpoints)
        with self._lock:
            state = self._state
            if signature == state.signature:
                state.seq = endpoints
                return state
            loads = self._loads
            fresh = {key: loads.get(key) or _Load(key) for key, _ in signature}
            # Keep counts of calls still in flight to endpoints that just left the set.
            fresh.update({k: v for k, v in loads.items() if v.active and k not in fresh})
            self._loads = fresh
            state = self._state = _LoadState(
                endpoints, signature, [fresh[key] for key, _ in signature]
            )
            return state

    def pick(self, endpoints: Sequence[Endpoint], ctx: PickContext) -> Endpoint:
        """The least loaded of the sampled (or the next scheduled) endpoints, avoiding
        ``ctx.exclude`` where possible."""
        n = len(endpoints)
        if n == 0:
            _no_endpoint(ctx)
        if n == 1:
            return endpoints[0]
        state = self._state
        if state.seq is not endpoints:
            state = self._refresh(endpoints)
        if not state.equal:
            return endpoints[self._scheduled(state, ctx.exclude, endpoints)]
        loads = state.loads
        if ctx.exclude:
            allowed = _allowed(endpoints, ctx.exclude)
            if len(allowed) > self._choices:
                allowed = self._rng.sample(allowed, self._choices)
            return endpoints[min(allowed, key=lambda i: loads[i].active)]
        draw = self._draw
        best = int(draw() * n)
        other = int(draw() * (n - 1))
        if other >= best:
            other += 1
        least = loads[best].active
        if loads[other].active < least:
            best, least = other, loads[other].active
        for _ in range(self._choices - 2):
            other = int(draw() * n)
            if loads[other].active < least:
                best, least = other, loads[other].active
        return endpoints[best]

    def _scheduled(
        self, state: _LoadState, exclude: frozenset[str], endpoints: Sequence[Endpoint]
    ) -> int:
        schedule = state.schedule
        with self._lock:
            entry = heapq.heappop(schedule)
            if exclude and endpoints[entry[2]].key in exclude:
                skipped = [entry]
                while schedule and endpoints[entry[2]].key in exclude:
                    entry = heapq.heappop(schedule)
                    skipped.append(entry)
                if endpoints[entry[2]].key in exclude:
                    entry = skipped[0]  # every endpoint is excluded: the earliest after all
                for other in skipped:
                    if other is not entry:
                        heapq.heappush(schedule, other)
            deadline, _, index = entry
            weight: float = state.signature[index][1]
            if self._bias:
                weight /= math.pow(state.loads[index].active + 1, self._bias)
            heapq.heappush(schedule, (deadline + 1.0 / weight, next(self._ticket), index))
        return index

    def on_start(self, endpoint: Endpoint) -> object:
        """Count a call to ``endpoint`` as in flight; returns the token for
        :meth:`on_complete`."""
        with self._lock:
            load = self._loads.get(endpoint.key)
            if load is None:
                load = self._loads[endpoint.key] = _Load(endpoint.key)
            load.active += 1
        return load

    def on_complete(self, token: object, *, latency_s: float, failed: bool) -> None:
        """Count the call of ``token`` as finished (the outcome does not matter here)."""
        if isinstance(token, _Load):
            with self._lock:
                if token.active > 0:
                    token.active -= 1


class _Ewma:
    __slots__ = ("estimate", "key", "pending", "stamp")

    def __init__(self, key: str, estimate: float, stamp: float) -> None:
        self.key = key
        self.estimate = estimate
        self.stamp = stamp
        self.pending = 0


class _EwmaState:
    __slots__ = ("equal", "seq", "signature", "stats", "weighted")

    def __init__(
        self,
        seq: Sequence[Endpoint],
        signature: tuple[tuple[str, int], ...],
        stats: list[_Ewma],
    ) -> None:
        self.seq = seq
        self.signature = signature
        self.stats = stats
        self.weighted = _WeightedState(seq, signature)
        self.equal = self.weighted.equal


class PeakEwma:
    """Linkerd's latency-aware balancer: power of two choices on
    ``cost = peak-EWMA latency * (in-flight + 1)``.

    Each endpoint's latency estimate jumps up at once to any slower observation (the *peak*)
    and otherwise moves towards new observations as an exponentially weighted moving average
    with time constant ``decay_s``; without observations it decays towards zero. So a slow
    endpoint loses traffic immediately, and gets a trial call again once its estimate has
    decayed below its peers'. Two random endpoints are compared per pick; with unequal
    weights, candidates are sampled by weight and the cost is divided by the weight.
    Thread-safe.

    Args:
        decay_s: the time constant of the moving average, in seconds (Linkerd's default 10).
        default_rtt_s: the estimate of an endpoint without observations yet (Linkerd's
            default 30 ms), so new endpoints neither flood nor starve.
        failure_penalty_s: a failed call counts as at least this latency, so that an endpoint
            that fails fast does not attract traffic by looking quick. 0 (the default, as
            Linkerd) counts failures by their latency only.
        rng: the random source; a new ``random.Random()`` when ``None``.
        clock: the time source (monotonic seconds).

    Raises:
        ConfigurationError: for a non-positive ``decay_s`` or a negative time.
    """

    __slots__ = (
        "_clock",
        "_decay",
        "_default_rtt",
        "_draw",
        "_lock",
        "_penalty",
        "_rng",
        "_state",
        "_stats",
    )

    def __init__(
        self,
        *,
        decay_s: float = 10.0,
        default_rtt_s: float = 0.030,
        failure_penalty_s: float = 0.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._decay = _seconds(decay_s, "decay_s", positive=True)
        self._default_rtt = _seconds(default_rtt_s, "default_rtt_s")
        self._penalty = _seconds(failure_penalty_s, "failure_penalty_s")
        self._rng = rng if rng is not None else random.Random()
        self._draw = self._rng.random
        self._clock = clock
        self._lock = threading.Lock()
        self._stats: dict[str, _Ewma] = {}
        self._state = _EwmaState((), (), [])

    def _refresh(self, endpoints: Sequence[Endpoint]) -> _EwmaState:
        signature = _signature(endpoints)
        with self._lock:
            state = self._state
            if signature == state.signature:
                state.seq = endpoints
                return state
            stats = self._stats
            now = self._clock()
            fresh = {
                key: stats.get(key) or _Ewma(key, self._default_rtt, now) for key, _ in signature
            }
            fresh.update({k: v for k, v in stats.items() if v.pending and k not in fresh})
            self._stats = fresh
            state = self._state = _EwmaState(
                endpoints, signature, [fresh[key] for key, _ in signature]
            )
            return state

    def _observe(self, stat: _Ewma, rtt: float, now: float) -> None:
        # Finagle's and Linkerd's rule; reading the cost observes 0 to apply the decay.
        elapsed = now - stat.stamp
        if rtt > stat.estimate:
            stat.estimate = rtt
        elif elapsed > 0:
            weight = math.exp(-elapsed / self._decay)
            stat.estimate = stat.estimate * weight + rtt * (1.0 - weight)
        if now > stat.stamp:
            stat.stamp = now

    def _cost(self, stat: _Ewma, weight: int, now: float) -> float:
        self._observe(stat, 0.0, now)
        return stat.estimate * (stat.pending + 1) / weight

    def cost(self, endpoint: Endpoint) -> float:
        """The endpoint's current cost (its decayed latency estimate in seconds times
        in-flight calls plus one, divided by its weight); the default estimate for an endpoint
        this balancer has not seen."""
        with self._lock:
            stat = self._stats.get(endpoint.key)
            if stat is None:
                return self._default_rtt / endpoint.weight
            return self._cost(stat, endpoint.weight, self._clock())

    def pick(self, endpoints: Sequence[Endpoint], ctx: PickContext) -> Endpoint:
        """The cheaper of two sampled endpoints, avoiding ``ctx.exclude`` where possible."""
        n = len(endpoints)
        if n == 0:
            _no_endpoint(ctx)
        if n == 1:
            return endpoints[0]
        state = self._state
        if state.seq is not endpoints:
            state = self._refresh(endpoints)
        if ctx.exclude:
            allowed = _allowed(endpoints, ctx.exclude)
            if len(allowed) == 1:
                return endpoints[allowed[0]]
            first, second = self._rng.sample(allowed, 2)
        elif state.equal:
            draw = self._draw
            first = int(draw() * n)
            second = int(draw() * (n - 1))
            if second >= first:
                second += 1
        else:
            first = _weighted_index(state.weighted, self._draw, n)
            second = _weighted_index(state.weighted, self._draw, n)
        stats = state.stats
        with self._lock:
            now = self._clock()
            first_cost = self._cost(stats[first], endpoints[first].weight, now)
            second_cost = self._cost(stats[second], endpoints[second].weight, now)
        return endpoints[second if second_cost < first_cost else first]

    def on_start(self, endpoint: Endpoint) -> object:
        """Count a call to ``endpoint`` as in flight; returns the token for
        :meth:`on_complete`."""
        with self._lock:
            stat = self._stats.get(endpoint.key)
            if stat is None:
                stat = self._stats[endpoint.key] = _Ewma(
                    endpoint.key, self._default_rtt, self._clock()
                )
            stat.pending += 1
        return stat

    def on_complete(self, token: object, *, latency_s: float, failed: bool) -> None:
        """Fold the call's latency into the endpoint's estimate and end its in-flight count.

        A failed call counts as at least ``failure_penalty_s``.
        """
        if not isinstance(token, _Ewma):
            return
        rtt = max(latency_s, self._penalty) if failed else latency_s
        with self._lock:
            if token.pending > 0:
                token.pending -= 1
            if rtt >= 0 and not math.isnan(rtt):
                self._observe(token, rtt, self._clock())


def _seconds(value: object, field: str, *, positive: bool = False) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0 <= value < math.inf
        or (positive and value == 0)
    ):
        expected = (
            "a finite number of seconds > 0" if positive else "a finite number of seconds >= 0"
        )
        raise ConfigurationError(f"expected {expected}", field=field, value=value)
    return float(value)


def _hash64(data: str) -> int:
    # A stable hash: every process (and every replica of the caller) must build the same ring
    # and map a key to the same point, which rules out Python's salted hash().
    return int.from_bytes(hashlib.blake2b(data.encode(), digest_size=8).digest(), "big")


_DEFAULT_MIN_RING = 1024
_DEFAULT_MAX_RING = 8 * 1024 * 1024


class _Ring:
    __slots__ = ("hashes", "owners", "seq", "signature")

    def __init__(
        self,
        seq: Sequence[Endpoint],
        signature: tuple[tuple[str, int], ...],
        hashes: list[int],
        owners: list[int],
    ) -> None:
        self.seq = seq
        self.signature = signature
        self.hashes = hashes
        self.owners = owners


def _ring_size_check(value: object, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _DEFAULT_MAX_RING:
        raise ConfigurationError(
            f"expected an integer from 1 to {_DEFAULT_MAX_RING}", field=field, value=value
        )
    return value


class RingHash:
    """Consistent hashing on a ring of virtual nodes (Envoy's ``RING_HASH``): calls with the
    same hash key go to the same endpoint while it is available, and when an endpoint joins
    or leaves only about ``1/N`` of the keys move.

    Each endpoint owns points on a 64-bit ring, hashed from ``"<address:port>_<i>"``; a key
    goes to the owner of the first point at or after the key's hash. Every weight unit gets
    the same power-of-two number of points, chosen so the ring has at least
    ``minimum_ring_size`` points (and at most twice that, capped at ``maximum_ring_size``);
    since that number only changes when the total weight crosses a power of two, adding or
    removing one endpoint rarely moves the others' points. The hash is BLAKE2b, so all
    processes agree on the ring. The ring is rebuilt only when the endpoint set (keys and
    weights) changes.

    A call without a hash key (``ctx.hash_key`` is ``None``) goes to ``fallback``. With
    ``ctx.exclude``, the walk continues clockwise to the next endpoint not excluded.

    Args:
        minimum_ring_size: the least number of points on the ring (Envoy's default 1024).
            More points spread keys more evenly and cost memory and build time.
        maximum_ring_size: the most points on the ring (Envoy's default 8M).
        fallback: the balancer for calls without a key; a new :class:`RoundRobin` when
            ``None``. :meth:`on_start` and :meth:`on_complete` are passed on to it.

    Raises:
        ConfigurationError: for ring sizes out of range or a maximum below the minimum.
    """

    __slots__ = ("_fallback", "_max", "_min", "_ring")

    def __init__(
        self,
        *,
        minimum_ring_size: int = _DEFAULT_MIN_RING,
        maximum_ring_size: int = _DEFAULT_MAX_RING,
        fallback: Balancer | None = None,
    ) -> None:
        self._min = _ring_size_check(minimum_ring_size, "minimum_ring_size")
        self._max = _ring_size_check(maximum_ring_size, "maximum_ring_size")
        if self._max < self._min:
            raise ConfigurationError(
                f"expected maximum_ring_size >= minimum_ring_size ({self._min})",
                field="maximum_ring_size",
                value=maximum_ring_size,
            )
        self._fallback: Balancer = fallback if fallback is not None else RoundRobin()
        self._ring = _Ring((), (), [], [])

    @property
    def ring_size(self) -> int:
        """The number of points of the ring built for the last endpoint set (0 before the
        first keyed pick)."""
        return len(self._ring.hashes)

    def _build(
        self, endpoints: Sequence[Endpoint], signature: tuple[tuple[str, int], ...]
    ) -> _Ring:
        total = sum(w for _, w in signature)
        per_unit = 2.0 ** math.ceil(math.log2(self._min / total))
        if per_unit * total > self._max:
            per_unit = self._max / total
        points: list[tuple[int, str, int]] = []
        for index, (key, weight) in enumerate(signature):
            count = max(1, math.ceil(weight * per_unit))
            points.extend((_hash64(f"{key}_{i}"), key, index) for i in range(count))
        points.sort()
        return _Ring(endpoints, signature, [p[0] for p in points], [p[2] for p in points])

    def pick(self, endpoints: Sequence[Endpoint], ctx: PickContext) -> Endpoint:
        """The owner of ``ctx.hash_key`` on the ring (the next one clockwise not in
        ``ctx.exclude``), or ``fallback``'s pick when there is no key."""
        n = len(endpoints)
        if n == 0:
            _no_endpoint(ctx)
        key = ctx.hash_key
        if key is None:
            return self._fallback.pick(endpoints, ctx)
        ring = self._ring
        if ring.seq is not endpoints:
            signature = _signature(endpoints)
            if signature == ring.signature:
                ring = self._ring = _Ring(endpoints, signature, ring.hashes, ring.owners)
            else:
                ring = self._ring = self._build(endpoints, signature)
        hashes = ring.hashes
        size = len(hashes)
        position = bisect_left(hashes, _hash64(key))
        if position == size:
            position = 0
        chosen = endpoints[ring.owners[position]]
        exclude = ctx.exclude
        if not exclude or chosen.key not in exclude:
            return chosen
        owners = ring.owners
        for step in range(1, size):
            candidate = endpoints[owners[(position + step) % size]]
            if candidate.key not in exclude:
                return candidate
        return chosen

    def on_start(self, endpoint: Endpoint) -> object:
        """Passed on to ``fallback``."""
        return self._fallback.on_start(endpoint)

    def on_complete(self, token: object, *, latency_s: float, failed: bool) -> None:
        """Passed on to ``fallback``."""
        self._fallback.on_complete(token, latency_s=latency_s, failed=failed)


def _failover_pairs(failover: object, field: str) -> dict[str, str]:
    if isinstance(failover, Mapping):
        items = [{"from": k, "to": v} for k, v in failover.items()]
    elif isinstance(failover, Sequence) and not isinstance(failover, (str, bytes)):
        items = list(failover)
    else:
        raise ConfigurationError(
            "expected a list of {'from': region, 'to': region} or a mapping of region to region",
            field=field,
            value=failover,
        )
    pairs: dict[str, str] = {}
    for index, item in enumerate(items):
        path = f"{field}[{index}]"
        if not isinstance(item, Mapping) or set(item) != {"from", "to"}:
            raise ConfigurationError(
                "expected a mapping with exactly 'from' and 'to'", field=path, value=item
            )
        for side in ("from", "to"):
            region = item[side]
            if not isinstance(region, str) or not region or "/" in region:
                raise ConfigurationError(
                    "expected a region name (failover is between regions)",
                    field=f"{path}.{side}",
                    value=region,
                )
        if item["from"] == item["to"]:
            raise ConfigurationError(
                "expected 'to' to differ from 'from'", field=f"{path}.to", value=item["to"]
            )
        if item["from"] in pairs:
            raise ConfigurationError(
                "region listed twice as 'from'", field=f"{path}.from", value=item["from"]
            )
        pairs[item["from"]] = item["to"]
    return pairs


class _Groups:
    __slots__ = ("groups", "local", "seq")

    def __init__(
        self,
        seq: Sequence[Endpoint],
        local: Locality,
        groups: tuple[tuple[Endpoint, ...], ...],
    ) -> None:
        self.seq = seq
        self.local = local
        self.groups = groups


class LocalityAware:
    """Prefers endpoints near the caller, failing over outwards, as Istio's
    ``localityLbSetting`` does.

    Endpoints fall into priorities by their locality relative to the caller's:

    0. same region, zone and subzone;
    1. same region and zone;
    2. same region;
    3. the region ``failover`` names for the caller's region;
    4. everything else, including endpoints of unknown locality.

    Each call goes to the first priority that has an endpoint (one that is not in
    ``ctx.exclude``, when such an endpoint exists anywhere), and ``inner`` picks within it.
    Pass only healthy endpoints: a priority whose endpoints are all ejected is then empty and
    traffic fails over to the next one. Without a known caller locality, ``inner`` picks
    among all endpoints.

    Args:
        inner: the balancer used within a priority.
        local: the caller's locality when ``PickContext.local`` is ``None``.
        failover: region-to-region failover: a mapping ``{"us-east": "eu-west"}`` or Istio's
            list ``[{"from": "us-east", "to": "eu-west"}]``.

    Raises:
        ConfigurationError: naming ``failover[<i>].from`` / ``.to`` for a bad entry.
    """

    __slots__ = ("_cache", "_failover", "_inner", "_local")

    def __init__(
        self,
        inner: Balancer,
        *,
        local: Locality | None = None,
        failover: Mapping[str, str] | Sequence[Mapping[str, str]] = (),
    ) -> None:
        if not isinstance(inner, Balancer):
            raise ConfigurationError(
                "expected a Balancer (pick, on_start, on_complete)", field="inner", value=inner
            )
        if local is not None and not isinstance(local, Locality):
            raise ConfigurationError("expected a Locality", field="local", value=local)
        self._inner = inner
        self._local = local
        self._failover = _failover_pairs(failover, "failover")
        self._cache: _Groups | None = None

    @property
    def inner(self) -> Balancer:
        """The balancer used within a priority."""
        return self._inner

    def priorities(
        self, endpoints: Sequence[Endpoint], local: Locality
    ) -> tuple[tuple[Endpoint, ...], ...]:
        """The non-empty priority groups of ``endpoints`` for a caller at ``local``, nearest
        first (cached while ``endpoints`` is the same object)."""
        cache = self._cache
        if cache is not None and cache.seq is endpoints and cache.local == local:
            return cache.groups
        buckets: list[list[Endpoint]] = [[], [], [], [], []]
        failover_to = self._failover.get(local.region)
        for endpoint in endpoints:
            level = local.match_level(endpoint.locality)
            if level:
                buckets[3 - level].append(endpoint)
            elif (
                failover_to is not None
                and endpoint.locality is not None
                and endpoint.locality.region == failover_to
            ):
                buckets[3].append(endpoint)
            else:
                buckets[4].append(endpoint)
        groups = tuple(tuple(b) for b in buckets if b)
        self._cache = _Groups(endpoints, local, groups)
        return groups

    def pick(self, endpoints: Sequence[Endpoint], ctx: PickContext) -> Endpoint:
        """``inner``'s pick within the nearest priority that has an endpoint."""
        if not endpoints:
            _no_endpoint(ctx)
        local = ctx.local or self._local
        if local is None:
            return self._inner.pick(endpoints, ctx)
        groups = self.priorities(endpoints, local)
        exclude = ctx.exclude
        if exclude:
            for group in groups:
                for endpoint in group:
                    if endpoint.key not in exclude:
                        return self._inner.pick(group, ctx)
        return self._inner.pick(groups[0], ctx)

    def on_start(self, endpoint: Endpoint) -> object:
        """Passed on to ``inner``."""
        return self._inner.on_start(endpoint)

    def on_complete(self, token: object, *, latency_s: float, failed: bool) -> None:
        """Passed on to ``inner``."""
        self._inner.on_complete(token, latency_s=latency_s, failed=failed)


# --- configuration -----------------------------------------------------------------------

_SIMPLE = {
    "ROUND_ROBIN": "ROUND_ROBIN",
    "LEAST_REQUEST": "LEAST_REQUEST",
    "LEAST_CONN": "LEAST_REQUEST",  # Istio's deprecated name of LEAST_REQUEST
    "RANDOM": "RANDOM",
    "PEAK_EWMA": "PEAK_EWMA",
    "UNSPECIFIED": "LEAST_REQUEST",  # Istio's default
}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s|us|ns)")
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


def _duration(value: object, field: str) -> float:
    if isinstance(value, str):
        text = value.strip()
        parts = _DURATION.findall(text)
        if parts and "".join(n + u for n, u in parts) == text:
            return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    raise ConfigurationError(
        "expected a duration such as '0s', '30s', '1.5s', '100ms' or '1h30m'",
        field=field,
        value=value,
    )


def _header_name(value: object, field: str) -> str:
    if (
        not isinstance(value, str)
        or not value
        or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", value)
    ):
        raise ConfigurationError("expected an HTTP header name", field=field, value=value)
    return value.lower()


def _non_empty(value: object, field: str, what: str) -> str:
    if not isinstance(value, str) or not value or value != value.strip():
        raise ConfigurationError(f"expected a non-empty {what}", field=field, value=value)
    return value


def _reject_unknown(data: Mapping[str, Any], allowed: Sequence[str], field: str) -> None:
    for key in data:
        if key not in allowed:
            raise ConfigurationError(
                f"unknown or unsupported field (expected one of: {', '.join(allowed)})",
                field=f"{field}.{key}",
                value=data[key],
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpCookie:
    """Istio's ``consistentHash.httpCookie``: hash on the value of a cookie.

    Args:
        name: the cookie's name.
        path: the cookie's path (kept for configuration fidelity).
        ttl: the cookie's lifetime in seconds. meshware reads the cookie but does not issue
            it: when the request has no such cookie the call has no hash key.

    Raises:
        ConfigurationError: for an empty name or a negative ttl.
    """

    name: str
    path: str = ""
    ttl: float = 0.0

    def __post_init__(self) -> None:
        _non_empty(self.name, "httpCookie.name", "cookie name")
        if not isinstance(self.path, str):
            raise ConfigurationError("expected a string", field="httpCookie.path", value=self.path)
        _seconds(self.ttl, "httpCookie.ttl")


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsistentHash:
    """Istio's ``consistentHash``: what to hash a call on, and the ring's size.

    Exactly one source must be set.

    Args:
        http_header_name: hash on this request header (``httpHeaderName``).
        http_cookie: hash on this cookie (``httpCookie``).
        use_source_ip: hash on the caller's IP address (``useSourceIp``).
        http_query_parameter_name: hash on this query parameter (``httpQueryParameterName``).
        use_source_principal: hash on the inbound caller's principal (meshware's
            ``useSourcePrincipal``), so that all calls made on behalf of one caller land on
            the same endpoint.
        minimum_ring_size: the ring's least number of points (``minimumRingSize``).

    Raises:
        ConfigurationError: when no source or more than one is set, or the ring size is out of
            range.
    """

    http_header_name: str | None = None
    http_cookie: HttpCookie | None = None
    use_source_ip: bool = False
    http_query_parameter_name: str | None = None
    use_source_principal: bool = False
    minimum_ring_size: int = _DEFAULT_MIN_RING

    def __post_init__(self) -> None:
        if self.http_header_name is not None:
            object.__setattr__(
                self,
                "http_header_name",
                _header_name(self.http_header_name, "consistentHash.httpHeaderName"),
            )
        if self.http_cookie is not None and not isinstance(self.http_cookie, HttpCookie):
            raise ConfigurationError(
                "expected an HttpCookie", field="consistentHash.httpCookie", value=self.http_cookie
            )
        if self.http_query_parameter_name is not None:
            _non_empty(
                self.http_query_parameter_name,
                "consistentHash.httpQueryParameterName",
                "query parameter name",
            )
        for name in ("use_source_ip", "use_source_principal"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigurationError(
                    "expected true or false",
                    field=f"consistentHash.{name}",
                    value=getattr(self, name),
                )
        sources = [
            self.http_header_name is not None,
            self.http_cookie is not None,
            self.use_source_ip,
            self.http_query_parameter_name is not None,
            self.use_source_principal,
        ]
        if sum(sources) != 1:
            raise ConfigurationError(
                "expected exactly one of httpHeaderName, httpCookie, useSourceIp, "
                "httpQueryParameterName, useSourcePrincipal",
                field="consistentHash",
                value=sum(sources),
            )
        _ring_size_check(self.minimum_ring_size, "consistentHash.minimumRingSize")


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalityLbSetting:
    """Istio's ``localityLbSetting`` (the ``failover`` form).

    Args:
        enabled: whether locality-aware balancing is on.
        failover: region failover pairs ``((from_region, to_region), ...)``.
        local: the caller's locality, when ``PickContext.local`` does not give it.
    """

    enabled: bool = True
    failover: tuple[tuple[str, str], ...] = ()
    local: Locality | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigurationError(
                "expected true or false", field="localityLbSetting.enabled", value=self.enabled
            )
        failover = self.failover
        if not isinstance(failover, tuple) or not all(
            isinstance(p, tuple) and len(p) == 2 for p in failover
        ):
            raise ConfigurationError(
                "expected a tuple of (from_region, to_region) pairs",
                field="localityLbSetting.failover",
                value=failover,
            )
        pairs = _failover_pairs(
            [{"from": a, "to": b} for a, b in failover], "localityLbSetting.failover"
        )
        object.__setattr__(self, "failover", tuple(pairs.items()))


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadBalancerSettings:
    """Istio's ``trafficPolicy.loadBalancer``, parsed and validated.

    Args:
        simple: the algorithm when there is no ``consistent_hash``: ``"ROUND_ROBIN"``,
            ``"LEAST_REQUEST"`` (Istio's default), ``"RANDOM"`` or ``"PEAK_EWMA"``.
        consistent_hash: consistent hashing settings; when set, ``simple`` is ignored and the
            balancer is a :class:`RingHash` (with a round-robin fallback for calls without
            a key).
        locality: locality-aware settings; when enabled, the balancer is wrapped in
            :class:`LocalityAware`.

    Raises:
        ConfigurationError: for an unknown ``simple`` value (``PASSTHROUGH`` included: a host
            that no resolver knows is already passed through untouched).
    """

    simple: str = "LEAST_REQUEST"
    consistent_hash: ConsistentHash | None = None
    locality: LocalityLbSetting | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "simple", _simple_name(self.simple, "loadBalancer.simple"))
        if self.consistent_hash is not None and not isinstance(
            self.consistent_hash, ConsistentHash
        ):
            raise ConfigurationError(
                "expected a ConsistentHash",
                field="loadBalancer.consistentHash",
                value=self.consistent_hash,
            )
        if self.locality is not None and not isinstance(self.locality, LocalityLbSetting):
            raise ConfigurationError(
                "expected a LocalityLbSetting",
                field="loadBalancer.localityLbSetting",
                value=self.locality,
            )

    @classmethod
    def from_config(
        cls,
        config: str | Mapping[str, Any] | LoadBalancerSettings | None,
        *,
        field: str = "loadBalancer",
    ) -> LoadBalancerSettings:
        """Parse a ``loadBalancer`` mapping (or just an algorithm name) in Istio's shape.

        Accepted::

            "ROUND_ROBIN"                      # a bare name, case-insensitive
            {"simple": "LEAST_REQUEST"}        # ROUND_ROBIN, LEAST_REQUEST, RANDOM, PEAK_EWMA
            {"consistentHash": {"httpHeaderName": "x-user"}, ...}
            {"consistentHash": {"httpCookie": {"name": "u", "ttl": "0s"}}}
            {"consistentHash": {"useSourceIp": True, "minimumRingSize": 4096}}
            {"consistentHash": {"httpQueryParameterName": "q",
                                "ringHash": {"minimumRingSize": 2048}}}
            {"simple": "ROUND_ROBIN",
             "localityLbSetting": {"enabled": True,
                                   "failover": [{"from": "us-east", "to": "eu-west"}]}}

        ``None`` and ``{}`` give Istio's default, ``LEAST_REQUEST``.

        Args:
            config: the configuration.
            field: the dotted path of ``config``, prefixed to error fields.

        Raises:
            ConfigurationError: naming the exact field, for unknown keys, unsupported values
                (``PASSTHROUGH``, ``maglev``, ``distribute``, ``failoverPriority``,
                ``warmupDurationSecs``) and bad values.
        """
        if isinstance(config, LoadBalancerSettings):
            return config
        if config is None:
            return cls()
        if isinstance(config, str):
            return cls(simple=_simple_name(config, field))
        if not isinstance(config, Mapping):
            raise ConfigurationError(
                "expected an algorithm name or a loadBalancer mapping", field=field, value=config
            )
        _reject_unknown(config, ("simple", "consistentHash", "localityLbSetting"), field)
        if "simple" in config and "consistentHash" in config:
            raise ConfigurationError(
                "set either 'simple' or 'consistentHash', not both",
                field=f"{field}.consistentHash",
                value=config["consistentHash"],
            )
        simple = _simple_name(config.get("simple", "LEAST_REQUEST"), f"{field}.simple")
        consistent = None
        if "consistentHash" in config:
            consistent = _consistent_hash(config["consistentHash"], f"{field}.consistentHash")
        locality = None
        if "localityLbSetting" in config:
            locality = _locality_setting(config["localityLbSetting"], f"{field}.localityLbSetting")
        return cls(simple=simple, consistent_hash=consistent, locality=locality)

    def build(
        self,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> Balancer:
        """A new balancer with these settings (build one per destination).

        Args:
            rng: the random source passed to the balancers that draw; ``None`` for fresh ones.
            clock: the time source passed to :class:`PeakEwma`.
        """
        balancer: Balancer
        if self.consistent_hash is not None:
            balancer = RingHash(
                minimum_ring_size=self.consistent_hash.minimum_ring_size,
                fallback=RoundRobin(rng=rng),
            )
        elif self.simple == "ROUND_ROBIN":
            balancer = RoundRobin(rng=rng)
        elif self.simple == "RANDOM":
            balancer = Random(rng=rng)
        elif self.simple == "PEAK_EWMA":
            balancer = PeakEwma(rng=rng, clock=clock)
        else:
            balancer = LeastRequest(rng=rng)
        if self.locality is not None and self.locality.enabled:
            balancer = LocalityAware(
                balancer,
                local=self.locality.local,
                failover=dict(self.locality.failover),
            )
        return balancer


def _simple_name(value: object, field: str) -> str:
    if isinstance(value, str):
        name = value.strip().upper()
        if name in _SIMPLE:
            return _SIMPLE[name]
        if name == "PASSTHROUGH":
            raise ConfigurationError(
                "PASSTHROUGH is not supported: a host that no resolver knows is already sent "
                "untouched, so leave the host out of discovery instead",
                field=field,
                value=value,
            )
    raise ConfigurationError(
        "expected one of ROUND_ROBIN, LEAST_REQUEST, RANDOM, PEAK_EWMA", field=field, value=value
    )


def _consistent_hash(data: object, field: str) -> ConsistentHash:
    if not isinstance(data, Mapping):
        raise ConfigurationError("expected a mapping", field=field, value=data)
    _reject_unknown(
        data,
        (
            "httpHeaderName",
            "httpCookie",
            "useSourceIp",
            "httpQueryParameterName",
            "useSourcePrincipal",
            "minimumRingSize",
            "ringHash",
        ),
        field,
    )
    sources = [
        k
        for k in (
            "httpHeaderName",
            "httpCookie",
            "useSourceIp",
            "httpQueryParameterName",
            "useSourcePrincipal",
        )
        if k in data
    ]
    if len(sources) != 1:
        raise ConfigurationError(
            "expected exactly one of httpHeaderName, httpCookie, useSourceIp, "
            "httpQueryParameterName, useSourcePrincipal",
            field=field,
            value=sources,
        )
    source = sources[0]
    value = data[source]
    path = f"{field}.{source}"
    kwargs: dict[str, Any] = {}
    if source == "httpHeaderName":
        kwargs["http_header_name"] = _header_name(value, path)
    elif source == "httpQueryParameterName":
        kwargs["http_query_parameter_name"] = _non_empty(value, path, "query parameter name")
    elif source in ("useSourceIp", "useSourcePrincipal"):
        if value is not True:
            raise ConfigurationError("expected true", field=path, value=value)
        kwargs["use_source_ip" if source == "useSourceIp" else "use_source_principal"] = True
    else:
        if not isinstance(value, Mapping):
            raise ConfigurationError(
                "expected a mapping with 'name' (and optional 'path', 'ttl')",
                field=path,
                value=value,
            )
        _reject_unknown(value, ("name", "path", "ttl"), path)
        cookie_path = value.get("path", "")
        if not isinstance(cookie_path, str):
            raise ConfigurationError("expected a string", field=f"{path}.path", value=cookie_path)
        kwargs["http_cookie"] = HttpCookie(
            name=_non_empty(value.get("name"), f"{path}.name", "cookie name"),
            path=cookie_path,
            ttl=_duration(value["ttl"], f"{path}.ttl") if "ttl" in value else 0.0,
        )
    ring_size = data.get("minimumRingSize")
    ring_field = f"{field}.minimumRingSize"
    if "ringHash" in data:
        ring = data["ringHash"]
        if ring_size is not None:
            raise ConfigurationError(
                "set minimumRingSize either here or in ringHash, not both",
                field=f"{field}.ringHash",
                value=ring,
            )
        if not isinstance(ring, Mapping):
            raise ConfigurationError("expected a mapping", field=f"{field}.ringHash", value=ring)
        _reject_unknown(ring, ("minimumRingSize",), f"{field}.ringHash")
        ring_size = ring.get("minimumRingSize")
        ring_field = f"{field}.ringHash.minimumRingSize"
    if ring_size is not None:
        kwargs["minimum_ring_size"] = _ring_size_check(ring_size, ring_field)
    return ConsistentHash(**kwargs)


def _locality_setting(data: object, field: str) -> LocalityLbSetting:
    if not isinstance(data, Mapping):
        raise ConfigurationError("expected a mapping", field=field, value=data)
    for unsupported in ("distribute", "failoverPriority"):
        if unsupported in data:
            raise ConfigurationError(
                f"{unsupported} is not supported; use 'failover'",
                field=f"{field}.{unsupported}",
                value=data[unsupported],
            )
    _reject_unknown(data, ("enabled", "failover"), field)
    enabled = data.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigurationError("expected true or false", field=f"{field}.enabled", value=enabled)
    pairs = _failover_pairs(data.get("failover", []), f"{field}.failover")
    return LocalityLbSetting(enabled=enabled, failover=tuple(pairs.items()))


def balancer_from_config(
    config: str | Mapping[str, Any] | LoadBalancerSettings | None,
    *,
    field: str = "loadBalancer",
    rng: random.Random | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Balancer:
    """A new balancer from Istio's ``trafficPolicy.loadBalancer`` shape (or a bare name).

    See :meth:`LoadBalancerSettings.from_config` for the accepted shapes::

        balancer_from_config({"simple": "ROUND_ROBIN"})            # RoundRobin
        balancer_from_config({"consistentHash": {"httpHeaderName": "x-user"}})  # RingHash
        balancer_from_config("PEAK_EWMA")                          # PeakEwma

    Args:
        config: the configuration; ``None`` gives Istio's default, ``LEAST_REQUEST``.
        field: the dotted path of ``config``, prefixed to error fields.
        rng: the random source for the balancers that draw.
        clock: the time source for :class:`PeakEwma`.

    Raises:
        ConfigurationError: naming the field of an unknown key or an unsupported value.
    """
    settings = LoadBalancerSettings.from_config(config, field=field)
    return settings.build(rng=rng, clock=clock)


def _cookie_from_header(header: str | None, name: str) -> str | None:
    if not header:
        return None
    for part in header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            return value.strip().strip('"')
    return None


def hash_key_for(
    config: ConsistentHash | LoadBalancerSettings | None,
    request_headers: Mapping[str, str],
    cookies: Mapping[str, str] | None = None,
    source_principal: str | None = None,
    source_ip: str | None = None,
    *,
    query_params: Mapping[str, str] | None = None,
) -> str | None:
    """The consistent-hash key of a call, for :attr:`PickContext.hash_key`.

    Returns ``None`` (no key: the ring's fallback picks) when hashing is not configured or
    the request lacks the configured header, cookie, parameter or source.

    Args:
        config: the hash settings, or load-balancer settings that may hold them.
        request_headers: the outgoing request's headers, looked up by lower-case name (an
            ``httpx.Headers`` or any case-insensitive mapping works too).
        cookies: the request's cookies by name; when ``None`` they are read from the
            ``cookie`` header.
        source_principal: the principal of the inbound caller on whose behalf the call is
            made (``useSourcePrincipal``).
        source_ip: the inbound caller's IP address (``useSourceIp``).
        query_params: the outgoing request's query parameters (``httpQueryParameterName``).
    """
    if isinstance(config, LoadBalancerSettings):
        config = config.consistent_hash
    if config is None:
        return None
    if config.http_header_name is not None:
        return request_headers.get(config.http_header_name)
    if config.http_cookie is not None:
        if cookies is None:
            return _cookie_from_header(request_headers.get("cookie"), config.http_cookie.name)
        return cookies.get(config.http_cookie.name)
    if config.use_source_ip:
        return source_ip
    if config.http_query_parameter_name is not None:
        return None if query_params is None else query_params.get(config.http_query_parameter_name)
    return source_principal
