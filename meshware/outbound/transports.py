"""What the outbound transports share: per-destination state, failure classification, the
per-attempt deadline header, and response streams that report when they close.

The stack, outermost first (Finagle's order)::

    TelemetryTransport        meshware.outbound.transport_telemetry
    DeadlineTransport         meshware.outbound.transport_deadline
    RoutingTransport          meshware.outbound.route_transport
    RetryTransport            meshware.outbound.transport_retry
    BalancingTransport        meshware.outbound.transport_balancing
    BreakerTransport          meshware.outbound.transport_breaker
    ConnectionTransport       meshware.outbound.transport_connection

Each has an ``Async`` twin (``AsyncRetryTransport``...) with the same arguments; the twins
share their logic through the sans-I/O helpers here and in each module. The layers talk
through the call's :class:`~meshware.outbound.call.CallPlan` and a few private
``request.extensions`` keys defined below.

:class:`OutboundState` holds the mutable state of every destination a client calls: per
*cluster* (a destination, or one subset of it, as Envoy names it) a balancer, an outlier
detector, a circuit breaker and a concurrency limiter, and per destination a retry budget.
The balancing and breaker layers must share one state object, so that an endpoint the
breaker layer ejects is the one the balancing layer stops picking.

Each attempt is bounded by the time it has left (:func:`prepare_attempt`: httpx's timeouts
capped, ``x-meshware-timeout`` written) once, just before it is sent, by the innermost
meshware layer: a layer whose next transport is an :class:`AttemptStamper` leaves it to it.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import Final

import httpx

from meshware.exceptions import ConfigurationError
from meshware.outbound.balancing import Balancer, LoadBalancerSettings
from meshware.outbound.breaker import BreakerPolicy, BreakerState, CircuitBreaker
from meshware.outbound.budget import RetryBudget
from meshware.outbound.call import CallPlan
from meshware.outbound.deadline import TIMEOUT_HEADER, Deadline, format_timeout
from meshware.outbound.destination import (
    TLS_MODES,
    ClientTLSSettings,
    DestinationRule,
    DestinationRules,
    TrafficPolicy,
)
from meshware.outbound.endpoints import Endpoint, LabelSelector, Locality
from meshware.outbound.errors import DeadlineExceeded, NoHealthyEndpoint, OutboundError
from meshware.outbound.outlier import OutlierDetection, OutlierDetector, OutlierEvent
from meshware.outbound.pool_limits import UNLIMITED, ConcurrencyLimiter, ConnectionPoolLimits
from meshware.telemetry.metrics import OutboundRecorder

__all__ = [
    "ATTEMPT_DEADLINE_KEY",
    "RETRIES_EXHAUSTED_KEY",
    "SERVER_IDENTITY_KEY",
    "TLS_KEY",
    "AsyncObservedStream",
    "AttemptStamper",
    "Cluster",
    "ObservedStream",
    "OutboundState",
    "cap_connect_timeout",
    "cap_timeouts",
    "destination_of",
    "endpoint_url",
    "error_kind",
    "is_replayable",
    "new_attempt_deadline",
    "observe_async_response",
    "observe_response",
    "prepare_attempt",
    "stamped_below",
]

#: ``request.extensions`` key: the :class:`Deadline` of the current attempt (the call's
#: deadline tightened by the per-try timeout), written by the retry layer.
ATTEMPT_DEADLINE_KEY: Final = "meshware.attempt_deadline"
#: ``request.extensions`` key: the cluster's :class:`ClientTLSSettings`, written by the
#: balancing layer for the connection layer.
TLS_KEY: Final = "meshware.tls"
#: ``request.extensions`` key: the ``retryOn`` outcome of the last try was retryable but no
#: retry was made (attempts or budget used up): Envoy's ``URX`` response flag.
RETRIES_EXHAUSTED_KEY: Final = "meshware.retries_exhausted"
#: ``response.extensions`` key: the verified SPIFFE id (a string) of the server that
#: answered, written by the connection layer.
SERVER_IDENTITY_KEY: Final = "meshware.server_identity"

_DEFAULT_LOAD_BALANCER: Final = LoadBalancerSettings(simple="ROUND_ROBIN")
_DEFAULT_BREAKER: Final = BreakerPolicy()
_DEFAULT_TLS: Final = ClientTLSSettings(mode="ISTIO_MUTUAL")
_PLAINTEXT: Final = ClientTLSSettings(mode="DISABLE")
_RESETS: Final = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError, httpx.CloseError)
_TIMEOUT_KEYS: Final = ("connect", "read", "write", "pool")
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


def error_kind(exc: BaseException) -> str | None:
    """What went wrong in a try that got no response, as ``RetryPolicy.should_retry``'s
    ``error_kind``; ``None`` for failures that are not the destination's (meshware's own
    refusals such as ``CircuitOpen`` or ``DeadlineExceeded``, programming errors).

    ``httpx.ConnectError`` and ``httpx.ConnectTimeout`` (and ``WrongServerIdentity``, a
    ``ConnectError``) give ``"connect-failure"``; other timeouts ``"timeout"``;
    ``RemoteProtocolError``, ``ReadError``, ``WriteError`` and ``CloseError`` ``"reset"``.
    """
    if isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
        return "connect-failure"
    if isinstance(exc, OutboundError):
        return None
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, _RESETS):
        return "reset"
    return None


def is_replayable(request: httpx.Request) -> bool:
    """Whether the request's body can be sent again: it is in memory (bytes, form, JSON, or
    a body that has been read), not a one-shot generator or file stream."""
    return isinstance(request.stream, httpx.ByteStream)


def destination_of(request: httpx.Request, plan: CallPlan) -> str:
    """The name errors give the destination: the plan's, else the request's host."""
    return plan.destination or request.url.host


def cap_timeouts(request: httpx.Request, seconds: float) -> None:
    """Cap every httpx timeout of the request (``connect``, ``read``, ``write``, ``pool``)
    at ``seconds``; a timeout that is already shorter stays."""
    current = request.extensions.get("timeout")
    if isinstance(current, dict):
        capped = {
            key: seconds if value is None or value > seconds else value
            for key, value in current.items()
        }
    else:
        capped = dict.fromkeys(_TIMEOUT_KEYS, seconds)
    request.extensions["timeout"] = capped


def cap_connect_timeout(request: httpx.Request, seconds: float) -> None:
    """Cap the request's httpx ``connect`` timeout at ``seconds``."""
    current = request.extensions.get("timeout")
    capped = dict(current) if isinstance(current, dict) else dict.fromkeys(_TIMEOUT_KEYS)
    connect = capped.get("connect")
    if connect is None or connect > seconds:
        capped["connect"] = seconds
    request.extensions["timeout"] = capped


class AttemptStamper:
    """Marks a transport that calls :func:`prepare_attempt` just before sending: a layer
    whose next transport is one need not call it itself, so the header is written once per
    attempt, by the innermost meshware layer."""

    __slots__ = ()


def stamped_below(transport: object) -> bool:
    """Whether ``transport`` (the next one inwards) prepares each attempt itself."""
    return isinstance(transport, AttemptStamper)


def prepare_attempt(request: httpx.Request, plan: CallPlan) -> None:
    """Bound the attempt about to be sent by the time it has left.

    The time left is that of the attempt's deadline (``ATTEMPT_DEADLINE_KEY``) or else the
    call's (``plan.deadline``). httpx's timeouts are capped at it and, for a mesh
    destination, ``x-meshware-timeout`` carries it to the next hop. The innermost meshware
    layer calls this just before passing the request on (the layers above it skip it, see
    :class:`AttemptStamper`). Does nothing without a deadline.

    Raises:
        DeadlineExceeded: the call's deadline has passed; nothing is sent.
        httpx.ReadTimeout: the attempt's per-try timeout has passed before it was sent.
    """
    deadline = request.extensions.get(ATTEMPT_DEADLINE_KEY) or plan.deadline
    if deadline is None:
        return
    left = deadline.at - deadline.clock()
    if left <= 0.0:
        call_deadline = plan.deadline
        if call_deadline is None or call_deadline.expired():
            raise DeadlineExceeded(
                "deadline exceeded before the attempt was sent",
                destination=destination_of(request, plan),
                request=request,
            )
        raise httpx.ReadTimeout("per-try timeout exceeded before the attempt was sent")
    cap_timeouts(request, left)
    if plan.destination is not None:
        request.headers[TIMEOUT_HEADER] = format_timeout(left)


class Cluster:
    """The state of calls to one destination, or to one of its subsets (Envoy's cluster).

    Created by :meth:`OutboundState.cluster`; read-only attributes:

    Attributes:
        destination: the destination service.
        subset: the subset, or ``None`` for the whole destination.
        rule: the DestinationRule in force, or ``None``.
        policy: the traffic policy in force (the subset's merged into the rule's).
        selector: the subset's label selector, or ``None`` for every endpoint.
        balancer: picks an endpoint per call.
        detector: the outlier detector, or ``None`` when outlier detection is off.
        breaker: the circuit breaker, or ``None`` when there is none.
        limiter: the concurrency limiter, or ``None`` when the pool is unlimited.
        connect_timeout: the longest wait for a new connection in seconds
            (``connectionPool.tcp.connectTimeout``), or ``None`` when no pool limits apply.
        tls: how calls are encrypted.
        load_balancer: the load-balancer settings the balancer was built from.
    """

    __slots__ = (
        "_memo",
        "balancer",
        "breaker",
        "connect_timeout",
        "destination",
        "detector",
        "limiter",
        "load_balancer",
        "policy",
        "rule",
        "selector",
        "subset",
        "tls",
    )

    def __init__(
        self,
        *,
        destination: str,
        subset: str | None,
        rule: DestinationRule | None,
        policy: TrafficPolicy,
        selector: LabelSelector | None,
        balancer: Balancer,
        load_balancer: LoadBalancerSettings,
        detector: OutlierDetector | None,
        breaker: CircuitBreaker | None,
        limiter: ConcurrencyLimiter | None,
        tls: ClientTLSSettings,
        connect_timeout: float | None = None,
    ) -> None:
        self.destination = destination
        self.subset = subset
        self.rule = rule
        self.policy = policy
        self.selector = selector
        self.balancer = balancer
        self.load_balancer = load_balancer
        self.detector = detector
        self.breaker = breaker
        self.limiter = limiter
        self.connect_timeout = connect_timeout
        self.tls = tls
        # (endpoints seen last, the subset of them): one attribute, replaced atomically.
        self._memo: tuple[Sequence[Endpoint] | None, tuple[Endpoint, ...]] = (None, ())

    def __repr__(self) -> str:
        subset = "" if self.subset is None else f", subset={self.subset!r}"
        return f"Cluster({self.destination!r}{subset})"

    def select(self, endpoints: Sequence[Endpoint]) -> tuple[Endpoint, ...]:
        """The endpoints of this cluster among the destination's ``endpoints`` (all of them
        without a subset), as the same tuple while ``endpoints`` is the same object."""
        seen, selected = self._memo
        if seen is endpoints:
            return selected
        if self.selector is not None:
            selected = self.selector.select(endpoints)
        else:
            selected = endpoints if isinstance(endpoints, tuple) else tuple(endpoints)
        if self.detector is not None:
            self.detector.set_endpoints(selected)
        self._memo = (endpoints, selected)
        return selected

    @property
    def last_selected(self) -> tuple[Endpoint, ...]:
        """The endpoints :meth:`select` chose last (none before its first call)."""
        return self._memo[1]

    def healthy(self, selected: tuple[Endpoint, ...]) -> tuple[Endpoint, ...]:
        """``selected`` without the endpoints outlier detection has ejected (all of them in
        panic mode); ``selected`` itself when none is ejected."""
        detector = self.detector
        if detector is None:
            return selected
        chosen = detector.healthy(selected)
        return selected if len(chosen) == len(selected) else tuple(chosen)

    def describe(self) -> str:
        """``"subset 'v2' of reviews"`` or ``"reviews"``, for messages."""
        if self.subset is None:
            return self.destination
        return f"subset {self.subset!r} of {self.destination}"


class OutboundState:
    """The mutable state of a client's outbound calls, per destination and cluster.

    Policies come from the DestinationRules (``rules``); a destination (or a field) without
    a rule gets the defaults given here. Share one state between the transports of a stack
    (the balancing and breaker layers need the same one), and between the sync and async
    clients of one service if you like: everything in it is thread-safe.

    Args:
        rules: the DestinationRules, as :class:`DestinationRules` or any iterable of
            :class:`DestinationRule`.
        load_balancer: the load balancing of destinations whose rule sets none (default
            round robin).
        outlier_detection: the outlier detection of destinations whose rule sets none;
            ``None`` (the default) turns it off for them, as in Istio.
        connection_pool: the connection-pool limits of destinations whose rule sets none;
            ``None`` (the default) for no limit.
        breaker: the circuit-breaker policy of every cluster (Istio has no such field);
            ``None`` for no breaker.
        tls_mode: the TLS mode of destinations whose rule sets no ``tls``:
            ``"ISTIO_MUTUAL"`` (the default, mesh mTLS) or ``"DISABLE"`` (plaintext, for
            development and tests), or ``"SIMPLE"``/``"MUTUAL"`` (see
            :class:`~meshware.outbound.destination.ClientTLSSettings`).
        retry_budget_ratio: the retry budget's ``ratio`` (Finagle's ``percentCanRetry``).
        retry_budget_window: the retry budget's window in seconds.
        retry_budget_min_retries_per_second: the retry budget's floor.
        locality: this service's locality, for locality-aware load balancing.
        clock: the monotonic clock of every breaker, detector, budget and balancer.
        rng: the random source of the balancers; seed it for reproducible picks.
        recorder: where ejections, breaker transitions, retries and exhausted budgets are
            counted (:meth:`meshware.telemetry.metrics.MeshMetrics.outbound`), or ``None``.

    Raises:
        ConfigurationError: an argument has the wrong type or range.
    """

    __slots__ = (
        "_breaker",
        "_budget_args",
        "_budgets",
        "_clusters",
        "_connection_pool",
        "_load_balancer",
        "_lock",
        "_outlier_detection",
        "_tls",
        "clock",
        "locality",
        "recorder",
        "rng",
        "rules",
    )

    def __init__(
        self,
        *,
        rules: DestinationRules | Iterable[DestinationRule] | None = None,
        load_balancer: LoadBalancerSettings = _DEFAULT_LOAD_BALANCER,
        outlier_detection: OutlierDetection | None = None,
        connection_pool: ConnectionPoolLimits | None = None,
        breaker: BreakerPolicy | None = _DEFAULT_BREAKER,
        tls_mode: str = "ISTIO_MUTUAL",
        retry_budget_ratio: float = 0.2,
        retry_budget_window: float = 10.0,
        retry_budget_min_retries_per_second: float = 10.0,
        locality: Locality | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        recorder: OutboundRecorder | None = None,
    ) -> None:
        if rules is None:
            rules = DestinationRules()
        elif not isinstance(rules, DestinationRules):
            rules = DestinationRules(rules)
        for name, value, kind in (
            ("load_balancer", load_balancer, LoadBalancerSettings),
            ("outlier_detection", outlier_detection, OutlierDetection),
            ("connection_pool", connection_pool, ConnectionPoolLimits),
            ("breaker", breaker, BreakerPolicy),
            ("locality", locality, Locality),
            ("recorder", recorder, OutboundRecorder),
        ):
            optional = name != "load_balancer"
            if not (value is None and optional) and not isinstance(value, kind):
                expected = f"a {kind.__name__}" + (" or None" if optional else "")
                raise ConfigurationError(f"expected {expected}", field=name, value=value)
        if tls_mode not in TLS_MODES:
            raise ConfigurationError(
                f"expected one of {', '.join(sorted(TLS_MODES))}", field="tls_mode", value=tls_mode
            )
        if not callable(clock):
            raise ConfigurationError("expected a callable returning seconds", field="clock")
        # Validated now, so a bad budget fails here and not on the first call.
        RetryBudget(
            ratio=retry_budget_ratio,
            window_seconds=retry_budget_window,
            min_retries_per_second=retry_budget_min_retries_per_second,
            clock=clock,
        )
        self.rules = rules
        self.clock = clock
        self.rng = rng if rng is not None else random.Random()
        self.locality = locality
        self.recorder = recorder
        self._load_balancer = load_balancer
        self._outlier_detection = outlier_detection
        self._connection_pool = connection_pool
        self._breaker = breaker
        self._tls = _PLAINTEXT if tls_mode == "DISABLE" else ClientTLSSettings(mode=tls_mode)
        self._budget_args = (
            retry_budget_ratio,
            retry_budget_window,
            retry_budget_min_retries_per_second,
        )
        self._lock = threading.Lock()
        self._clusters: dict[tuple[str, str | None], Cluster] = {}
        self._budgets: dict[str, RetryBudget] = {}

    @property
    def clusters(self) -> tuple[Cluster, ...]:
        """The clusters created so far."""
        return tuple(self._clusters.values())

    def cluster(self, destination: str, subset: str | None = None) -> Cluster:
        """The cluster of ``destination`` (or of its ``subset``), created on first use.

        Raises:
            NoHealthyEndpoint: ``subset`` is given but no DestinationRule of the destination
                defines it (Envoy's "no cluster found").
        """
        key = (destination, subset)
        cluster = self._clusters.get(key)
        if cluster is not None:
            return cluster
        with self._lock:
            cluster = self._clusters.get(key)
            if cluster is None:
                cluster = self._clusters[key] = self._build(destination, subset)
        return cluster

    @property
    def connection_pool(self) -> ConnectionPoolLimits | None:
        """The connection-pool limits of clusters whose DestinationRule sets none."""
        return self._connection_pool

    def budget(self, destination: str) -> RetryBudget:
        """The retry budget of ``destination``, created on first use."""
        budget = self._budgets.get(destination)
        if budget is None:
            with self._lock:
                budget = self._budgets.get(destination)
                if budget is None:
                    ratio, window, floor = self._budget_args
                    budget = self._budgets[destination] = RetryBudget(
                        ratio=ratio,
                        window_seconds=window,
                        min_retries_per_second=floor,
                        clock=self.clock,
                    )
        return budget

    def _build(self, destination: str, subset: str | None) -> Cluster:
        rule = self.rules.get(destination)
        selector = None
        if subset is None:
            policy = rule.traffic_policy if rule is not None else TrafficPolicy()
        else:
            found = None if rule is None else rule.subset(subset)
            if rule is None or found is None:
                where = (
                    "no DestinationRule applies to it"
                    if rule is None
                    else f"its DestinationRule defines {', '.join(sorted(rule.subset_names))}"
                    if rule.subset_names
                    else "its DestinationRule defines no subsets"
                )
                raise NoHealthyEndpoint(
                    f"subset {subset!r} is not defined ({where})", destination=destination
                )
            selector = found.selector
            policy = rule.policy_for(subset)
        settings = policy.load_balancer or self._load_balancer
        balancer = settings.build(rng=self.rng, clock=self.clock)
        recorder = self.recorder
        detector = None
        outlier = policy.outlier_detection or self._outlier_detection
        if outlier is not None:
            on_event = None
            if recorder is not None:

                def on_event(event: OutlierEvent) -> None:
                    if event.action == "eject":
                        recorder.record_ejection(destination, event.reason)

            detector = OutlierDetector(outlier, clock=self.clock, on_event=on_event)
        breaker = None
        if self._breaker is not None:
            on_change = None
            if recorder is not None:

                def on_change(_: CircuitBreaker, old: BreakerState, new: BreakerState) -> None:
                    recorder.record_breaker_transition(destination, old.value, new.value)

            breaker = CircuitBreaker(
                destination, self._breaker, clock=self.clock, on_state_change=on_change
            )
        limiter = None
        limits = policy.connection_pool or self._connection_pool
        if limits is not None and limits.max_connections != UNLIMITED:
            limiter = ConcurrencyLimiter(destination, limits)
        return Cluster(
            destination=destination,
            subset=subset,
            rule=rule,
            policy=policy,
            selector=selector,
            balancer=balancer,
            load_balancer=settings,
            detector=detector,
            breaker=breaker,
            limiter=limiter,
            tls=policy.tls or self._tls,
            connect_timeout=None if limits is None else limits.connect_timeout,
        )


# --- response streams that report their end ------------------------------------------------

OnClose = Callable[[int, "BaseException | None"], None]


class ObservedStream(httpx.SyncByteStream):
    """A response stream that counts its bytes and calls ``on_close(bytes, error)`` once,
    when it is closed (or at once, via :func:`observe_response`, for a response that is
    already read).

    Several layers may observe one response: :func:`observe_response` adds their callbacks
    to the one wrapper (:meth:`also`), called in the order they were added, instead of
    wrapping the stream once per layer.
    """

    __slots__ = ("_callbacks", "_closed", "_error", "_inner", "count")

    def __init__(self, inner: httpx.SyncByteStream, on_close: OnClose) -> None:
        self._inner = inner
        self._callbacks = [on_close]
        self._closed = False
        self._error: BaseException | None = None
        self.count = 0

    def also(self, on_close: OnClose) -> None:
        """Call ``on_close`` too, after the callbacks given before, when the stream closes."""
        self._callbacks.append(on_close)

    def __iter__(self) -> Iterator[bytes]:
        try:
            for chunk in self._inner:
                self.count += len(chunk)
                yield chunk
        except Exception as exc:
            self._error = exc
            raise

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            if not self._closed:
                self._closed = True
                _run_callbacks(self._callbacks, self.count, self._error)


class AsyncObservedStream(httpx.AsyncByteStream):
    """The async twin of :class:`ObservedStream`."""

    __slots__ = ("_callbacks", "_closed", "_error", "_inner", "count")

    def __init__(self, inner: httpx.AsyncByteStream, on_close: OnClose) -> None:
        self._inner = inner
        self._callbacks = [on_close]
        self._closed = False
        self._error: BaseException | None = None
        self.count = 0

    def also(self, on_close: OnClose) -> None:
        """Call ``on_close`` too, after the callbacks given before, when the stream closes."""
        self._callbacks.append(on_close)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                self.count += len(chunk)
                yield chunk
        except Exception as exc:
            self._error = exc
            raise

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            if not self._closed:
                self._closed = True
                _run_callbacks(self._callbacks, self.count, self._error)


def _run_callbacks(callbacks: list[OnClose], count: int, error: BaseException | None) -> None:
    # Every callback runs, as when each layer wrapped the stream; the first failure is raised.
    failure: BaseException | None = None
    for callback in callbacks:
        try:
            callback(count, error)
        except BaseException as exc:
            if failure is None:
                failure = exc
    if failure is not None:
        raise failure


def observe_response(response: httpx.Response, on_close: OnClose) -> None:
    """Arrange for ``on_close(bytes, error)`` to run once when ``response`` is closed: at once
    when it is already read (a response built from bytes), else when its stream closes (a
    stream another layer observes already gets one more callback)."""
    if response.is_closed:
        on_close(len(response.content), None)
        return
    stream = response.stream
    if type(stream) is ObservedStream and not stream._closed:
        stream.also(on_close)
    else:
        response.stream = ObservedStream(_sync_stream(response), on_close)


def observe_async_response(response: httpx.Response, on_close: OnClose) -> None:
    """The async twin of :func:`observe_response`."""
    if response.is_closed:
        on_close(len(response.content), None)
        return
    stream = response.stream
    if type(stream) is AsyncObservedStream and not stream._closed:
        stream.also(on_close)
    else:
        response.stream = AsyncObservedStream(_async_stream(response), on_close)


def _sync_stream(response: httpx.Response) -> httpx.SyncByteStream:
    stream = response.stream
    if not isinstance(stream, httpx.SyncByteStream):
        raise TypeError("a sync transport returned a response with an async stream")
    return stream


def _async_stream(response: httpx.Response) -> httpx.AsyncByteStream:
    stream = response.stream
    if not isinstance(stream, httpx.AsyncByteStream):
        raise TypeError("an async transport returned a response with a sync stream")
    return stream


def endpoint_url(url: httpx.URL, scheme: str, endpoint: Endpoint) -> httpx.URL:
    """``url`` sent to ``endpoint`` instead of its host, with ``scheme``; path, query and
    fragment unchanged."""
    reference = getattr(url, "_uri_reference", None)
    address = endpoint.address
    if reference is not None and hasattr(reference, "_replace") and address.isascii():
        # httpx re-parses the whole URL in copy_with(); the parts here are already valid
        # (a scheme we chose, a checked address and port), so only they are replaced.
        port: int | None = endpoint.port
        if port == _DEFAULT_PORTS.get(scheme):
            port = None
        fast = httpx.URL.__new__(httpx.URL)
        fast._uri_reference = reference._replace(scheme=scheme, host=address.lower(), port=port)
        return fast
    return url.copy_with(scheme=scheme, host=address, port=endpoint.port)


def new_attempt_deadline(
    plan: CallPlan, per_try_timeout: float | None, clock: Callable[[], float]
) -> Deadline | None:
    """The deadline of one attempt: the call's deadline, tightened by the per-try timeout."""
    if per_try_timeout is None:
        return plan.deadline
    return Deadline.after(per_try_timeout, clock=clock).earliest(plan.deadline)
