"""The deadline layer, and the per-attempt x-meshware-timeout header of the layers below it."""

from __future__ import annotations

import random
from collections.abc import Callable

import httpx
import pytest

from meshware.exceptions import ConfigurationError
from meshware.outbound.call import CALL_KEY, TIMEOUT_KEY, CallPlan, plan_of
from meshware.outbound.deadline import Deadline, deadline_scope, format_timeout
from meshware.outbound.discovery import StaticRegistry
from meshware.outbound.endpoints import Endpoint
from meshware.outbound.errors import DeadlineExceeded
from meshware.outbound.retry import RetryPolicy
from meshware.outbound.transport_balancing import AsyncBalancingTransport, BalancingTransport
from meshware.outbound.transport_deadline import AsyncDeadlineTransport, DeadlineTransport
from meshware.outbound.transport_retry import AsyncRetryTransport, RetryTransport
from meshware.outbound.transports import OutboundState

URL = "http://payments/api/charge"


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


Handler = Callable[[httpx.Request], httpx.Response]


class Seen:
    """A MockTransport handler that records what reached the network."""

    def __init__(self, *responses: int | Exception) -> None:
        self.requests: list[httpx.Request] = []
        self.headers: list[str | None] = []
        self.timeouts: list[dict[str, float | None]] = []
        self._responses = list(responses) or [200]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.headers.append(request.headers.get("x-meshware-timeout"))
        self.timeouts.append(dict(request.extensions["timeout"]))
        outcome = self._responses.pop(0) if len(self._responses) > 1 else self._responses[0]
        if isinstance(outcome, Exception):
            raise outcome
        return httpx.Response(outcome, text="ok")


def registry() -> StaticRegistry:
    return StaticRegistry({"payments": [Endpoint("10.0.0.1", 8080)]})


# --- fail fast ---------------------------------------------------------------------------


def test_no_time_left_fails_fast_without_a_network_call() -> None:
    clock = FakeClock()
    seen = Seen()
    client = httpx.Client(transport=DeadlineTransport(httpx.MockTransport(seen), clock=clock))
    with (
        deadline_scope(Deadline(at=clock.now - 0.25, clock=clock)),
        pytest.raises(DeadlineExceeded) as info,
    ):
        client.get(URL)
    assert seen.requests == []
    assert info.value.destination == "payments"
    assert str(info.value) == "payments: deadline exceeded 0.250s before the call was made"
    assert isinstance(info.value, httpx.TimeoutException)


async def test_no_time_left_fails_fast_async() -> None:
    clock = FakeClock()
    seen = Seen()
    transport = AsyncDeadlineTransport(httpx.MockTransport(seen), clock=clock)
    async with httpx.AsyncClient(transport=transport) as client:
        with deadline_scope(Deadline(at=clock.now, clock=clock)), pytest.raises(DeadlineExceeded):
            await client.get(URL)
    assert seen.requests == []


def test_per_call_timeout_tightens_the_inbound_deadline_and_caps_httpx_timeouts() -> None:
    clock = FakeClock()
    seen = Seen()
    client = httpx.Client(
        transport=DeadlineTransport(httpx.MockTransport(seen), clock=clock), timeout=5.0
    )
    with deadline_scope(Deadline.after(2.0, clock=clock)):
        response = client.get(URL, extensions={TIMEOUT_KEY: 0.75})
    plan: CallPlan = response.request.extensions[CALL_KEY]
    assert plan.deadline is not None and plan.deadline.at == clock.now + 0.75
    assert seen.timeouts == [{"connect": 0.75, "read": 0.75, "write": 0.75, "pool": 0.75}]
    # Not a mesh destination here: the header is for mesh services only.
    assert seen.headers == [None]


def test_the_inbound_deadline_wins_when_it_is_earlier() -> None:
    clock = FakeClock()
    seen = Seen()
    client = httpx.Client(
        transport=DeadlineTransport(httpx.MockTransport(seen), clock=clock), timeout=0.1
    )
    with deadline_scope(Deadline.after(2.0, clock=clock)):
        response = client.get(URL, extensions={TIMEOUT_KEY: 30})
    assert response.request.extensions[CALL_KEY].deadline.at == clock.now + 2.0
    # httpx's own shorter timeouts stay.
    assert seen.timeouts == [{"connect": 0.1, "read": 0.1, "write": 0.1, "pool": 0.1}]


def test_no_deadline_leaves_the_call_alone() -> None:
    seen = Seen()
    client = httpx.Client(transport=DeadlineTransport(httpx.MockTransport(seen)), timeout=None)
    response = client.get(URL)
    assert response.request.extensions[CALL_KEY].deadline is None
    assert seen.timeouts == [{"connect": None, "read": None, "write": None, "pool": None}]


@pytest.mark.parametrize("value", [0, -1, float("nan"), "1s", True])
def test_bad_per_call_timeout(value: object) -> None:
    client = httpx.Client(transport=DeadlineTransport(httpx.MockTransport(Seen())))
    with pytest.raises(ConfigurationError) as info:
        client.get(URL, extensions={TIMEOUT_KEY: value})
    assert info.value.field == "extensions['meshware.timeout']"


def test_a_timeout_after_the_deadline_is_deadline_exceeded() -> None:
    clock = FakeClock()

    def slow(request: httpx.Request) -> httpx.Response:
        clock.now += 1.0  # the call took longer than the time left
        raise httpx.ReadTimeout("timed out", request=request)

    client = httpx.Client(transport=DeadlineTransport(httpx.MockTransport(slow), clock=clock))
    with pytest.raises(DeadlineExceeded) as info:
        client.get(URL, extensions={TIMEOUT_KEY: 0.5})
    assert str(info.value) == (
        "payments: deadline exceeded during the call (ReadTimeout: timed out)"
    )
    assert isinstance(info.value.__cause__, httpx.ReadTimeout)


def test_a_timeout_before_the_deadline_stays_what_it_was() -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    clock = FakeClock()
    client = httpx.Client(transport=DeadlineTransport(httpx.MockTransport(slow), clock=clock))
    with pytest.raises(httpx.ReadTimeout) as info:
        client.get(URL, extensions={TIMEOUT_KEY: 0.5})
    assert not isinstance(info.value, DeadlineExceeded)


# --- the header, per attempt -------------------------------------------------------------


def stack(
    seen: Handler, clock: FakeClock, sleeps: list[float], policy: RetryPolicy
) -> httpx.Client:
    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock.now += seconds

    state = OutboundState(tls_mode="DISABLE", clock=clock, rng=random.Random(1), breaker=None)
    balancing = BalancingTransport(httpx.MockTransport(seen), resolver=registry(), state=state)
    retry = RetryTransport(balancing, policy=policy, resolver=registry(), state=state, sleep=sleep)
    return httpx.Client(transport=DeadlineTransport(retry, clock=clock))


def test_header_per_attempt_is_the_smaller_of_deadline_and_per_try_timeout() -> None:
    clock = FakeClock()
    sleeps: list[float] = []
    seen = Seen(503, 503, 200)
    policy = RetryPolicy(attempts=2, per_try_timeout=0.8, backoff_base=0.2, backoff_cap=0.2)
    client = stack(seen, clock, sleeps, policy)
    with deadline_scope(Deadline.after(1.5, clock=clock)):
        response = client.get(URL)
    assert response.status_code == 200
    assert len(sleeps) == 2
    # Try 1: 0.8 s per try < 1.5 s left. Try 2: 0.8 < 1.5 - s1. Try 3: what is left.
    left_at_third = 1.5 - sleeps[0] - sleeps[1]
    assert seen.headers[:2] == ["800m", "800m"]
    assert seen.headers[2] == format_seconds(min(0.8, left_at_third))
    assert seen.timeouts[0] == pytest.approx(
        {"connect": 0.8, "read": 0.8, "write": 0.8, "pool": 0.8}
    )


def format_seconds(seconds: float) -> str:
    return format_timeout(seconds)


def test_header_counts_down_as_the_deadline_nears() -> None:
    clock = FakeClock()
    sleeps: list[float] = []
    seen = Seen(503, 200)
    policy = RetryPolicy(attempts=1, per_try_timeout=5.0)

    def handler(request: httpx.Request) -> httpx.Response:
        clock.now += 0.3  # each try takes 300 ms
        return seen(request)

    client = stack(handler, clock, sleeps, policy)
    with deadline_scope(Deadline.after(1.0, clock=clock)):
        client.get(URL)
    spent = 0.3 + sleeps[0]
    assert seen.headers == ["1S", format_seconds(1.0 - spent)]


def test_no_deadline_no_per_try_timeout_no_header() -> None:
    clock = FakeClock()
    seen = Seen()
    client = stack(seen, clock, [], RetryPolicy())
    client.get(URL)
    assert seen.headers == [None]


async def test_header_async() -> None:
    clock = FakeClock()
    seen = Seen(503, 200)
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        clock.now += seconds

    async def handler(request: httpx.Request) -> httpx.Response:
        return seen(request)

    state = OutboundState(tls_mode="DISABLE", clock=clock, breaker=None)
    transport = AsyncDeadlineTransport(
        AsyncRetryTransport(
            AsyncBalancingTransport(httpx.MockTransport(handler), resolver=registry(), state=state),
            policy=RetryPolicy(attempts=1, per_try_timeout=0.4),
            resolver=registry(),
            state=state,
            sleep=sleep,
        ),
        clock=clock,
    )
    async with httpx.AsyncClient(transport=transport) as client:
        with deadline_scope(Deadline.after(2.0, clock=clock)):
            response = await client.get(URL)
    assert response.status_code == 200
    assert seen.headers == ["400m", "400m"]


def test_plan_from_a_routing_stand_in_is_kept() -> None:
    clock = FakeClock()
    seen = Seen()

    class Route(httpx.BaseTransport):
        def __init__(self, inner: httpx.BaseTransport) -> None:
            self.inner = inner

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            plan = plan_of(request)
            plan.destination = "payments"
            # A route timeout of 0.2 s tightens the deadline further.
            plan.deadline = Deadline.after(0.2, clock=clock).earliest(plan.deadline)
            return self.inner.handle_request(request)

    state = OutboundState(tls_mode="DISABLE", clock=clock, breaker=None)
    inner = BalancingTransport(httpx.MockTransport(seen), resolver=registry(), state=state)
    client = httpx.Client(transport=DeadlineTransport(Route(inner), clock=clock))
    with deadline_scope(Deadline.after(3.0, clock=clock)):
        client.get(URL)
    assert seen.headers == ["200m"]


def test_calls_to_other_hosts_are_capped_when_retry_is_the_next_layer() -> None:
    clock = FakeClock()
    seen = Seen()
    state = OutboundState(tls_mode="DISABLE", clock=clock, breaker=None)
    retry = RetryTransport(httpx.MockTransport(seen), resolver=registry(), state=state)
    client = httpx.Client(transport=DeadlineTransport(retry, clock=clock), timeout=10.0)
    with deadline_scope(Deadline.after(1.5, clock=clock)):
        client.get("https://api.example.com/v1")
    assert seen.timeouts == [{"connect": 1.5, "read": 1.5, "write": 1.5, "pool": 1.5}]
    assert seen.headers == [None]
