from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from meshware.exceptions import ConfigurationError
from meshware.outbound.call import (
    CALL_KEY,
    HASH_KEY,
    RETRY_KEY,
    RETRYABLE_KEY,
    TIMEOUT_KEY,
    CallPlan,
)
from meshware.outbound.deadline import Deadline, deadline_scope
from meshware.outbound.discovery import StaticRegistry
from meshware.outbound.endpoints import Endpoint
from meshware.outbound.errors import DeadlineExceeded
from meshware.outbound.faults import ABORT_BODY, FAULT_HEADER
from meshware.outbound.retry import RetryPolicy
from meshware.outbound.route_transport import AsyncRoutingTransport, RoutingTransport
from meshware.outbound.routing import RouteTable

ROUTES = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts: [reviews]
  http:
  - name: jason
    match:
    - headers:
        end-user: {exact: jason}
    route:
    - destination: {host: reviews, subset: v2}
  - name: orders
    match:
    - uri: {prefix: /orders}
      method: {exact: POST}
    route:
    - destination: {host: reviews, subset: v1}
    timeout: 500ms
    retries: {attempts: 3, perTryTimeout: 100ms, retryOn: 5xx}
    retryable: true
  - name: next
    match:
    - uri: {prefix: /next}
    route:
    - destination: {host: reviews-next}
  - name: canary
    route:
    - destination: {host: reviews, subset: v1}
      weight: 90
    - destination: {host: reviews, subset: v3}
      weight: 10
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ratings
spec:
  hosts: [ratings]
  http:
  - name: delayed
    match:
    - headers:
        end-user: {exact: jason}
    fault:
      delay:
        percentage: {value: 100.0}
        fixedDelay: 7s
    route:
    - destination: {host: ratings, subset: v1}
  - name: aborted
    match:
    - headers:
        end-user: {exact: mary}
    fault:
      abort:
        percentage: {value: 100.0}
        httpStatus: 500
    route:
    - destination: {host: ratings, subset: v1}
    mirror: {host: ratings, subset: v2}
  - name: both
    match:
    - headers:
        end-user: {exact: both}
    fault:
      delay: {fixedDelay: 1s}
      abort: {httpStatus: 503}
    route:
    - destination: {host: ratings, subset: v1}
  - route:
    - destination: {host: ratings, subset: v1}
"""

REGISTRY = StaticRegistry(
    {
        "reviews": [Endpoint("10.0.0.1", 9080)],
        "reviews-next": [Endpoint("10.0.0.2", 9080)],
        "ratings": [Endpoint("10.0.0.3", 9080)],
        "details": [Endpoint("10.0.0.4", 9080)],
    }
)


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    async def asleep(self, seconds: float) -> None:
        self.sleep(seconds)


class Recorder:
    """An innermost handler that records each request's plan (a copy: plans are mutable)."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.requests: list[httpx.Request] = []
        self.plans: list[CallPlan | None] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        plan = request.extensions.get(CALL_KEY)
        self.plans.append(None if plan is None else CallPlan(**_fields(plan)))
        return httpx.Response(self.status, text="real")


def _fields(plan: CallPlan) -> dict[str, Any]:
    return {name: getattr(plan, name) for name in CallPlan.__slots__}  # type: ignore[attr-defined]


class ClosingMock(httpx.MockTransport):
    def __init__(self, handler: Callable[[httpx.Request], Any]) -> None:
        super().__init__(handler)
        self.closed = 0

    def close(self) -> None:
        self.closed += 1

    async def aclose(self) -> None:
        self.closed += 1


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


@pytest.fixture
def table() -> RouteTable:
    return RouteTable.from_yaml(ROUTES)


def sync_client(
    handler: Callable[[httpx.Request], Any], table: RouteTable, fake_time: FakeTime, **kw: Any
) -> tuple[httpx.Client, RoutingTransport]:
    transport = RoutingTransport(
        httpx.MockTransport(handler),
        routes=table,
        resolver=REGISTRY,
        rng=kw.pop("rng", random.Random(1)),
        sleep=fake_time.sleep,
        clock=fake_time,
        **kw,
    )
    return httpx.Client(transport=transport), transport


def async_client(
    handler: Callable[[httpx.Request], Any], table: RouteTable, fake_time: FakeTime, **kw: Any
) -> tuple[httpx.AsyncClient, AsyncRoutingTransport]:
    transport = AsyncRoutingTransport(
        httpx.MockTransport(handler),
        routes=table,
        resolver=REGISTRY,
        rng=kw.pop("rng", random.Random(1)),
        sleep=fake_time.asleep,
        clock=fake_time,
        **kw,
    )
    return httpx.AsyncClient(transport=transport), transport


# --- the plan ----------------------------------------------------------------------------------


def test_header_match_sets_the_plan(table: RouteTable, fake_time: FakeTime) -> None:
    recorder = Recorder()
    client, _ = sync_client(recorder, table, fake_time)
    response = client.get("http://reviews/reviews/1", headers={"end-user": "jason"})
    assert response.status_code == 200
    (plan,) = recorder.plans
    assert plan is not None
    assert (plan.destination, plan.route, plan.subset) == ("reviews", "jason", "v2")
    assert plan.retry is None  # the route sets none: the retry layer's default applies
    assert (plan.retryable, plan.deadline, plan.hash_key, plan.fault, plan.mirrored) == (
        False,
        None,
        None,
        None,
        None,
    )


def test_route_timeout_retries_and_retryable(table: RouteTable, fake_time: FakeTime) -> None:
    recorder = Recorder()
    client, _ = sync_client(recorder, table, fake_time)
    client.post("http://reviews/orders/7", json={"qty": 1})
    (plan,) = recorder.plans
    assert plan is not None
    assert (plan.route, plan.subset, plan.retryable) == ("orders", "v1", True)
    assert plan.retry == RetryPolicy.from_mapping(
        {"attempts": 3, "perTryTimeout": "100ms", "retryOn": "5xx"}
    )
    assert plan.deadline is not None
    assert plan.deadline.at == fake_time.now + 0.5
    assert plan.deadline.clock is fake_time


def test_route_timeout_tightens_the_inbound_deadline(
    table: RouteTable, fake_time: FakeTime
) -> None:
    recorder = Recorder()
    client, _ = sync_client(recorder, table, fake_time)
    with deadline_scope(Deadline.after(10.0, clock=fake_time)):
        client.post("http://reviews/orders/7")
    loose = Deadline.after(0.2, clock=fake_time)
    with deadline_scope(loose):
        client.post("http://reviews/orders/7")
    tight, kept = recorder.plans
    assert tight is not None and tight.deadline is not None
    assert tight.deadline.at == fake_time.now + 0.5
    assert kept is not None and kept.deadline is loose


def test_the_route_timeout_bounds_the_attempt(table: RouteTable, fake_time: FakeTime) -> None:
    recorder = Recorder()
    client, _ = sync_client(recorder, table, fake_time)
    client.post("http://reviews/orders/7")
    client.get("http://reviews/")  # no timeout, no deadline: nothing added
    bounded, free = recorder.requests
    assert bounded.headers["x-meshware-timeout"] == "500m"
    assert bounded.extensions["timeout"] == {
        "connect": 0.5,
        "read": 0.5,
        "write": 0.5,
        "pool": 0.5,
    }
    assert "x-meshware-timeout" not in free.headers
    assert free.extensions["timeout"]["read"] == 5.0  # httpx's default, untouched


def test_an_expired_deadline_fails_before_the_call(table: RouteTable, fake_time: FakeTime) -> None:
    recorder = Recorder()
    client, _ = sync_client(recorder, table, fake_time)
    with (
        deadline_scope(Deadline(at=fake_time.now - 1.0, clock=fake_time)),
        pytest.raises(DeadlineExceeded) as info,
    ):
        client.get("http://reviews/")
    assert info.value.destination == "reviews"
    assert recorder.requests == []


def test_an_outer_layers_deadline_is_the_base(table: RouteTable, fake_time: FakeTime) -> None:
    recorder = Recorder()
    client, _ = sync_client(recorder, table, fake_time)
    earlier = Deadline.after(0.1, clock=fake_time)
    request = client.build_request("POST", "http://reviews/orders/1")
    request.extensions[CALL_KEY] = CallPlan(deadline=earlier)
    client.send(request)
    assert recorder.plans[0] is not None and recorder.plans[0].deadline is earlier


def test_weighted_canary_through_the_transport(table: RouteTable, fake_time: FakeTime) -> None:
    recorder = Recorder()
    client, _ = sync_client(recorder, table, fake_time, rng=random.Random(99))
    for _ in range(2_000):
        client.get("http://reviews/")
    counts = Counter(plan.subset for plan in recorder.plans if plan is not None)
    assert abs(counts["v1"] / 2_000 - 0.9) <= 0.02
    assert counts["v1"] + counts["v3"] == 2_000
    assert {plan.route for plan in recorder.plans if plan is not None} == {"canary"}


def test_traffic_shifting_sets_the_other_destination(
    table: RouteTable, fake_time: FakeTime
) -> None:
    recorder = Recorder()
    client, _ = sync_client(recorder, table, fake_time)
    client.get("http://reviews/next/page")
    plan = recorder.plans[0]
    assert plan is not None
    assert (plan.destination, plan.subset, plan.route) == ("reviews-next", None, "next")
    assert recorder.requests[0].url.host == "reviews"  # the URL is left for the balancer


def test_mesh_host_without_a_virtual_service_takes_the_default_route(
    table: RouteTable, fake_time: FakeTime
) -> None:
    recorder = Recorder()
    client, _ = sync_client(recorder, table, fake_time)
    client.get("http://details/details/0")
    plan = recorder.plans[0]
    assert plan is not None
    assert (plan.destination, plan.route, plan.subset) == ("details", None, None)
    assert plan.retry is None


def test_non_mesh_hosts_pass_through_untouched(table: RouteTable, fake_time: FakeTime) -> None:
    recorder = Recorder()
    vs_for_outside = RouteTable.from_yaml(
        "spec: {hosts: [example.org], http: [{route: [{destination: {host: reviews}}]}]}"
    )
    client, _ = sync_client(recorder, vs_for_outside, fake_time)
    client.get("https://example.org/", headers={"end-user": "jason"})
    assert recorder.plans == [None]
    assert CALL_KEY not in recorder.requests[0].extensions


# --- per-call overrides --------------------------------------------------------------------


def test_per_call_overrides(table: RouteTable, fake_time: FakeTime) -> None:
    recorder = Recorder()
    client, _ = sync_client(recorder, table, fake_time)
    mine = RetryPolicy(attempts=5)
    client.post(
        "http://reviews/orders/1",
        extensions={RETRY_KEY: mine, HASH_KEY: "user-42", TIMEOUT_KEY: 2.0},
    )
    client.post("http://reviews/orders/1", extensions={RETRY_KEY: None, TIMEOUT_KEY: None})
    client.get("http://reviews/", extensions={RETRYABLE_KEY: True})
    first, second, third = recorder.plans
    assert first is not None and second is not None and third is not None
    assert first.retry is mine
    assert first.hash_key == "user-42"
    # The caller's timeout replaces the route's 500ms (Envoy's per-request override).
    assert first.deadline is not None and first.deadline.at == fake_time.now + 2.0
    assert second.retry is None  # no retries for this call
    assert recorder.requests[1].extensions[RETRY_KEY] is None
    assert second.deadline is not None and second.deadline.at == fake_time.now + 0.5
    assert third.retryable is True
    assert third.retry is None


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (RETRY_KEY, {"attempts": 3}),
        (HASH_KEY, 42),
        (TIMEOUT_KEY, -1),
        (TIMEOUT_KEY, 0),
        (TIMEOUT_KEY, "5s"),
    ],
)
def test_bad_overrides_are_refused(
    table: RouteTable, fake_time: FakeTime, key: str, value: Any
) -> None:
    recorder = Recorder()
    client, _ = sync_client(recorder, table, fake_time)
    with pytest.raises(ConfigurationError) as info:
        client.get("http://reviews/", extensions={key: value})
    assert (info.value.field, info.value.value) == (f"extensions[{key!r}]", value)
    assert recorder.requests == []


# --- faults --------------------------------------------------------------------------------


def test_abort_answers_without_calling_inner(table: RouteTable, fake_time: FakeTime) -> None:
    recorder = Recorder()
    client, transport = sync_client(recorder, table, fake_time)
    request = client.build_request("GET", "http://ratings/ratings/0", headers={"end-user": "mary"})
    response = client.send(request)
    assert response.status_code == 500
    assert response.content == ABORT_BODY
    assert response.headers[FAULT_HEADER] == "abort"
    assert recorder.requests == []
    plan = request.extensions[CALL_KEY]
    assert (plan.fault, plan.route, plan.mirrored) == ("abort", "aborted", None)
    assert transport.mirror_observer.mirrored == 0  # an aborted call is not mirrored
    assert fake_time.slept == []


def test_delay_waits_then_proceeds(table: RouteTable, fake_time: FakeTime) -> None:
    recorder = Recorder()
    client, _ = sync_client(recorder, table, fake_time)
    start = fake_time.now
    response = client.get("http://ratings/ratings/0", headers={"end-user": "jason"})
    assert response.status_code == 200
    assert fake_time.slept == [7.0]
    assert fake_time.now == start + 7.0
    plan = recorder.plans[0]
    assert plan is not None and (plan.fault, plan.route) == ("delay", "delayed")


def test_delay_then_abort(table: RouteTable, fake_time: FakeTime) -> None:
    recorder = Recorder()
    client, _ = sync_client(recorder, table, fake_time)
    response = client.get("http://ratings/", headers={"end-user": "both"})
    assert (response.status_code, fake_time.slept, recorder.requests) == (503, [1.0], [])


def test_delay_counts_against_the_deadline(table: RouteTable, fake_time: FakeTime) -> None:
    recorder = Recorder()
    client, _ = sync_client(recorder, table, fake_time)
    start = fake_time.now
    with (
        deadline_scope(Deadline.after(2.5, clock=fake_time)),
        pytest.raises(DeadlineExceeded) as info,
    ):
        client.get("http://ratings/ratings/0", headers={"end-user": "jason"})
    assert fake_time.slept == [2.5]  # it waited until the deadline, not the whole delay
    assert fake_time.now == start + 2.5
    assert str(info.value) == (
        "ratings: the injected delay of 7.000s outlasts the 2.500s left before the deadline"
    )
    assert info.value.destination == "ratings"
    assert isinstance(info.value, httpx.TimeoutException)
    assert recorder.requests == []


def test_delay_within_the_deadline_leaves_less_time(table: RouteTable, fake_time: FakeTime) -> None:
    recorder = Recorder()
    client, _ = sync_client(recorder, table, fake_time)
    with deadline_scope(Deadline.after(10.0, clock=fake_time)):
        client.get("http://ratings/", headers={"end-user": "jason"})
    plan = recorder.plans[0]
    assert plan is not None and plan.deadline is not None
    assert plan.deadline.remaining() == 3.0


def test_delay_beyond_a_route_timeout(fake_time: FakeTime) -> None:
    table = RouteTable.from_yaml(
        """
        spec:
          hosts: [ratings]
          http:
          - fault: {delay: {fixedDelay: 2s}}
            timeout: 500ms
            route: [{destination: {host: ratings}}]
        """
    )
    recorder = Recorder()
    client, _ = sync_client(recorder, table, fake_time)
    with pytest.raises(DeadlineExceeded):
        client.get("http://ratings/")
    assert fake_time.slept == [0.5]


async def test_async_faults(table: RouteTable, fake_time: FakeTime) -> None:
    recorder = Recorder()
    client, _ = async_client(recorder, table, fake_time)
    async with client:
        aborted = await client.get("http://ratings/", headers={"end-user": "mary"})
        delayed = await client.get("http://ratings/", headers={"end-user": "jason"})
        with deadline_scope(Deadline.after(1.0, clock=fake_time)), pytest.raises(DeadlineExceeded):
            await client.get("http://ratings/", headers={"end-user": "jason"})
    assert (aborted.status_code, aborted.text, aborted.headers[FAULT_HEADER]) == (
        500,
        "fault filter abort",
        "abort",
    )
    assert delayed.status_code == 200
    assert fake_time.slept == [7.0, 1.0]
    assert len(recorder.requests) == 1


async def test_async_routing_and_pass_through(table: RouteTable, fake_time: FakeTime) -> None:
    recorder = Recorder()
    client, _ = async_client(recorder, table, fake_time)
    async with client:
        await client.get("http://reviews/", headers={"end-user": "jason"})
        await client.get("http://outside.example/")
    routed, passed = recorder.plans
    assert routed is not None and (routed.route, routed.subset) == ("jason", "v2")
    assert passed is None


# --- construction and closing ----------------------------------------------------------------


def test_constructor_validation(table: RouteTable) -> None:
    mock = httpx.MockTransport(Recorder())
    with pytest.raises(ConfigurationError) as info:
        RoutingTransport(mock, routes="routes", resolver=REGISTRY)  # type: ignore[arg-type]
    assert info.value.field == "routes"
    with pytest.raises(ConfigurationError) as info:
        RoutingTransport(mock, routes=table, resolver=object())  # type: ignore[arg-type]
    assert info.value.field == "resolver"
    with pytest.raises(ConfigurationError) as info:
        RoutingTransport(mock, routes=table, resolver=REGISTRY, max_pending_mirrors=0)
    assert info.value.field == "max_pending_mirrors"
    with pytest.raises(ConfigurationError) as info:
        RoutingTransport(mock, routes=table, resolver=REGISTRY, mirror_workers=0)
    assert info.value.field == "mirror_workers"
    with pytest.raises(ConfigurationError) as info:
        RoutingTransport(object(), routes=table, resolver=REGISTRY)  # type: ignore[arg-type]
    assert info.value.field == "inner"
    with pytest.raises(ConfigurationError) as info:
        AsyncRoutingTransport(object(), routes=table, resolver=REGISTRY)  # type: ignore[arg-type]
    assert info.value.field == "inner"


def test_close_propagates(table: RouteTable) -> None:
    inner = ClosingMock(Recorder())
    with httpx.Client(transport=RoutingTransport(inner, routes=table, resolver=REGISTRY)):
        pass
    assert inner.closed == 1


async def test_aclose_propagates(table: RouteTable) -> None:
    inner = ClosingMock(Recorder())
    async with httpx.AsyncClient(
        transport=AsyncRoutingTransport(inner, routes=table, resolver=REGISTRY)
    ):
        pass
    assert inner.closed == 1
