"""The breaker layer: circuit breaker, connection-pool limits, connect timeout, and what it
reports, sync and async alike."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from meshware.exceptions import ConfigurationError
from meshware.outbound.breaker import BreakerPolicy, BreakerState
from meshware.outbound.call import CALL_KEY, CallPlan
from meshware.outbound.deadline import Deadline
from meshware.outbound.destination import DestinationRule
from meshware.outbound.endpoints import Endpoint
from meshware.outbound.errors import CircuitOpen, DeadlineExceeded, PoolOverloaded
from meshware.outbound.pool_limits import ConnectionPoolLimits
from meshware.outbound.transport_breaker import AsyncBreakerTransport, BreakerTransport
from meshware.outbound.transports import OutboundState
from meshware.telemetry.metrics import MeshMetrics, WorkloadInfo

URL = "http://10.0.0.1:8080/api/charge"


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Upstream:
    def __init__(self, *outcomes: int | Exception) -> None:
        self.outcomes = list(outcomes) or [200]
        self.calls = 0
        self.timeouts: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls += 1
        self.timeouts.append(dict(request.extensions["timeout"]))
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if isinstance(outcome, Exception):
            raise outcome
        # A body still to be read, as from a real connection.
        return httpx.Response(outcome, stream=httpx.ByteStream(b"body"))


class Harness:
    def __init__(
        self,
        kind: str,
        upstream: Callable[[httpx.Request], Any],
        *,
        rules: list[dict[str, Any]] | None = None,
        failure_statuses: tuple[int, ...] | None = None,
        **state_args: Any,
    ) -> None:
        self.kind = kind
        self.clock = FakeClock()
        state_args.setdefault("breaker", BreakerPolicy(failure_threshold=3, recovery_timeout=10))
        self.state = OutboundState(
            rules=[DestinationRule.from_mapping(r) for r in rules or []],
            tls_mode="DISABLE",
            clock=self.clock,
            **state_args,
        )
        extra: dict[str, Any] = {}
        if failure_statuses is not None:
            extra["failure_statuses"] = failure_statuses
        mock = httpx.MockTransport(upstream)
        if kind == "sync":
            self.client = httpx.Client(transport=BreakerTransport(mock, state=self.state, **extra))
        else:
            self.aclient = httpx.AsyncClient(
                transport=AsyncBreakerTransport(mock, state=self.state, **extra)
            )

    def plan(self, subset: str | None = None, deadline: Deadline | None = None) -> CallPlan:
        return CallPlan(destination="payments", subset=subset, deadline=deadline)

    async def send(self, plan: CallPlan | None = None, **kwargs: Any) -> httpx.Response:
        extensions = {CALL_KEY: plan or self.plan()}
        if self.kind == "sync":
            return self.client.get(URL, extensions=extensions, **kwargs)
        return await self.aclient.get(URL, extensions=extensions, **kwargs)

    async def open_stream(self, plan: CallPlan | None = None) -> httpx.Response:
        request_args: dict[str, Any] = {"extensions": {CALL_KEY: plan or self.plan()}}
        if self.kind == "sync":
            request = self.client.build_request("GET", URL, **request_args)
            return self.client.send(request, stream=True)
        request = self.aclient.build_request("GET", URL, **request_args)
        return await self.aclient.send(request, stream=True)

    async def close(self, response: httpx.Response) -> None:
        if self.kind == "sync":
            response.close()
        else:
            await response.aclose()

    @property
    def breaker_state(self) -> BreakerState:
        breaker = self.state.cluster("payments").breaker
        assert breaker is not None
        return breaker.state


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# --- the circuit breaker --------------------------------------------------------------------


async def test_breaker_opens_and_fails_fast_without_a_network_call(kind: str) -> None:
    upstream = Upstream(503)
    harness = Harness(kind, upstream)
    for _ in range(3):
        response = await harness.send()
        assert response.status_code == 503
    assert harness.breaker_state is BreakerState.OPEN
    with pytest.raises(CircuitOpen) as info:
        await harness.send()
    assert upstream.calls == 3
    assert info.value.destination == "payments"
    assert str(info.value) == "payments: circuit breaker is open; next probe in 10.0s"
    assert info.value.request.url == httpx.URL(URL)


async def test_connect_errors_resets_and_timeouts_are_failures(kind: str) -> None:
    upstream = Upstream(
        httpx.ConnectError("refused"), httpx.ReadError("reset"), httpx.ReadTimeout("slow")
    )
    harness = Harness(kind, upstream)
    for _ in range(3):
        with pytest.raises(httpx.TransportError):
            await harness.send()
    assert harness.breaker_state is BreakerState.OPEN


async def test_4xx_and_meshwares_own_refusals_are_not_failures(kind: str) -> None:
    upstream = Upstream(404, 429, 404)
    harness = Harness(kind, upstream)
    for _ in range(3):
        await harness.send()
    expired = Deadline(at=harness.clock.now, clock=harness.clock)
    for _ in range(3):
        with pytest.raises(DeadlineExceeded):
            await harness.send(harness.plan(deadline=expired))
    assert harness.breaker_state is BreakerState.CLOSED
    assert upstream.calls == 3


async def test_failure_statuses_are_configurable(kind: str) -> None:
    harness = Harness(kind, Upstream(500), failure_statuses=(503,))
    for _ in range(4):
        await harness.send()
    assert harness.breaker_state is BreakerState.CLOSED


async def test_half_open_probe_failure_reopens(kind: str) -> None:
    upstream = Upstream(503)
    harness = Harness(kind, upstream)
    for _ in range(3):
        await harness.send()
    harness.clock.now += 10.0
    states = [harness.breaker_state]
    response = await harness.send()  # the probe
    assert response.status_code == 503
    states.append(harness.breaker_state)
    assert states == [BreakerState.HALF_OPEN, BreakerState.OPEN]
    with pytest.raises(CircuitOpen):
        await harness.send()
    assert upstream.calls == 4


async def test_half_open_lets_exactly_one_probe_through() -> None:
    gate = asyncio.Event()
    calls = 0
    statuses = [503, 503, 503, 200]

    async def upstream(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 4:
            await gate.wait()  # the probe is in flight until the gate opens
        return httpx.Response(statuses[min(calls, 4) - 1])

    harness = Harness("async", upstream)
    for _ in range(3):
        await harness.send()
    harness.clock.now += 10.0
    probe = asyncio.create_task(harness.send())
    await asyncio.sleep(0)
    while calls < 4:
        await asyncio.sleep(0)
    with pytest.raises(CircuitOpen) as info:
        await harness.send()
    assert str(info.value) == (
        "payments: circuit breaker is half-open and its probe call is in flight"
    )
    gate.set()
    assert (await probe).status_code == 200
    assert harness.breaker_state is BreakerState.CLOSED
    assert (await harness.send()).status_code == 200
    assert calls == 5


async def test_a_cancelled_probe_gives_its_place_back() -> None:
    never = asyncio.Event()
    calls = 0

    async def upstream(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 4:
            await never.wait()
        return httpx.Response(503 if calls <= 3 else 200)

    harness = Harness("async", upstream)
    for _ in range(3):
        await harness.send()
    harness.clock.now += 10.0
    probe = asyncio.create_task(harness.send())
    while calls < 4:
        await asyncio.sleep(0)
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    assert (await harness.send()).status_code == 200  # the next call may probe
    assert harness.breaker_state is BreakerState.CLOSED


async def test_subsets_have_breakers_of_their_own(kind: str) -> None:
    rules = [
        {
            "host": "payments",
            "subsets": [
                {"name": "v1", "labels": {"version": "v1"}},
                {"name": "v2", "labels": {"version": "v2"}},
            ],
        }
    ]
    harness = Harness(kind, Upstream(503), rules=rules)
    for _ in range(3):
        await harness.send(harness.plan("v2"))
    with pytest.raises(CircuitOpen):
        await harness.send(harness.plan("v2"))
    assert (await harness.send(harness.plan("v1"))).status_code == 503


async def test_calls_without_a_destination_pass_through(kind: str) -> None:
    upstream = Upstream(503)
    harness = Harness(kind, upstream)
    for _ in range(5):
        if kind == "sync":
            harness.client.get(URL)
        else:
            await harness.aclient.get(URL)
    assert upstream.calls == 5
    assert harness.state.clusters == ()


# --- connection-pool limits -----------------------------------------------------------------


async def test_pool_overload_sheds_at_once_and_a_closed_body_frees_the_slot(kind: str) -> None:
    upstream = Upstream(200)
    harness = Harness(
        kind,
        upstream,
        connection_pool=ConnectionPoolLimits(max_connections=1, max_pending_requests=0),
    )
    held = await harness.open_stream()  # its body is not read yet: the slot stays taken
    with pytest.raises(PoolOverloaded) as info:
        await harness.send()
    assert str(info.value) == (
        "payments: connection pool is full: 1 in flight (maxConnections 1), 0 waiting "
        "(http1MaxPendingRequests 0); call shed"
    )
    assert upstream.calls == 1
    await harness.close(held)
    assert (await harness.send()).status_code == 200
    limiter = harness.state.cluster("payments").limiter
    assert limiter is not None and (limiter.in_flight, limiter.shed_total) == (0, 1)


async def test_a_shed_call_gives_a_half_open_probe_back(kind: str) -> None:
    upstream = Upstream(503, 503, 503, 200)
    harness = Harness(
        kind,
        upstream,
        connection_pool=ConnectionPoolLimits(max_connections=1, max_pending_requests=0),
    )
    for _ in range(3):
        await harness.send()
    harness.clock.now += 10.0
    limiter = harness.state.cluster("payments").limiter
    assert limiter is not None
    limiter.acquire()  # somebody else holds the only slot
    with pytest.raises(PoolOverloaded):
        await harness.send()
    limiter.release()
    assert (await harness.send()).status_code == 200
    assert harness.breaker_state is BreakerState.CLOSED


async def test_waiting_for_a_slot_ends_at_the_deadline(kind: str) -> None:
    harness = Harness(
        kind,
        Upstream(200),
        connection_pool=ConnectionPoolLimits(max_connections=1, max_pending_requests=5),
    )
    held = await harness.open_stream()
    expired = Deadline(at=harness.clock.now, clock=harness.clock)
    with pytest.raises(DeadlineExceeded) as info:
        await harness.send(harness.plan(deadline=expired))
    assert (
        str(info.value) == "payments: no time left to wait for a connection-pool slot (1 in flight)"
    )
    await harness.close(held)


async def test_pool_limits_and_connect_timeout_come_from_the_rule(kind: str) -> None:
    rules = [
        {
            "host": "payments",
            "trafficPolicy": {
                "connectionPool": {"tcp": {"maxConnections": 4, "connectTimeout": "250ms"}}
            },
        }
    ]
    upstream = Upstream(200)
    harness = Harness(kind, upstream, rules=rules)
    if kind == "sync":
        harness.client.timeout = httpx.Timeout(5.0)
    else:
        harness.aclient.timeout = httpx.Timeout(5.0)
    await harness.send()
    assert upstream.timeouts == [{"connect": 0.25, "read": 5.0, "write": 5.0, "pool": 5.0}]
    limiter = harness.state.cluster("payments").limiter
    assert limiter is not None and limiter.limits.max_connections == 4


# --- what is counted ---------------------------------------------------------------------------


async def test_breaker_transitions_and_ejections_are_counted(kind: str) -> None:
    metrics = MeshMetrics()
    recorder = metrics.outbound(WorkloadInfo(service="orders"))
    rules = [
        {
            "host": "payments",
            "trafficPolicy": {
                "outlierDetection": {"consecutive5xxErrors": 2, "maxEjectionPercent": 100}
            },
        }
    ]
    harness = Harness(kind, Upstream(503, 503, 503, 200), rules=rules, recorder=recorder)
    endpoint = Endpoint("10.0.0.1", 8080)
    for _ in range(3):
        plan = harness.plan()
        plan.endpoint = endpoint
        await harness.send(plan)
    harness.clock.now += 10.0
    await harness.send()
    get = metrics.registry.get_sample_value
    service = {"destination_service": "payments.default.svc.cluster.local"}
    for old, new in (("closed", "open"), ("open", "half-open"), ("half-open", "closed")):
        labels = {**service, "from_state": old, "to_state": new}
        assert get("meshware_outbound_breaker_transitions_total", labels) == 1.0
    ejections = {**service, "reason": "consecutive-5xx"}
    assert get("meshware_outbound_outlier_ejections_total", ejections) == 1.0


def test_constructor_validation() -> None:
    mock = httpx.MockTransport(Upstream())
    with pytest.raises(ConfigurationError) as info:
        BreakerTransport(mock, failure_statuses=(500, 700))
    assert (info.value.field, info.value.value) == ("failure_statuses", 700)
    with pytest.raises(ConfigurationError) as info:
        BreakerTransport(mock, failure_statuses="5xx")  # type: ignore[arg-type]
    assert info.value.field == "failure_statuses"
    with pytest.raises(ConfigurationError) as info:
        AsyncBreakerTransport(mock, state=object())  # type: ignore[arg-type]
    assert info.value.field == "state"


def test_outbound_state_validation() -> None:
    with pytest.raises(ConfigurationError) as info:
        OutboundState(tls_mode="PERMISSIVE")
    assert info.value.field == "tls_mode"
    with pytest.raises(ConfigurationError) as info:
        OutboundState(retry_budget_ratio=-1)
    assert info.value.field == "ratio"
    with pytest.raises(ConfigurationError) as info:
        OutboundState(breaker="on")  # type: ignore[arg-type]
    assert info.value.field == "breaker"
