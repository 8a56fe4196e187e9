"""The balancing layer: discovery, subsets, outlier ejection (reported by the breaker layer),
panic mode and the pick, sync and async alike."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshware.exceptions import ConfigurationError
from meshware.outbound.balancing import LeastRequest
from meshware.outbound.call import CALL_KEY, HASH_KEY, CallPlan, plan_of
from meshware.outbound.destination import ClientTLSSettings, DestinationRule
from meshware.outbound.discovery import StaticRegistry
from meshware.outbound.endpoints import Endpoint
from meshware.outbound.errors import NoHealthyEndpoint
from meshware.outbound.transport_balancing import AsyncBalancingTransport, BalancingTransport
from meshware.outbound.transport_breaker import AsyncBreakerTransport, BreakerTransport
from meshware.outbound.transports import TLS_KEY, OutboundState, endpoint_url

URL = "http://payments/api/charge?id=7"
A = Endpoint("10.0.0.1", 8080, labels={"version": "v1"})
B = Endpoint("10.0.0.2", 8080, labels={"version": "v2"})
C = Endpoint("10.0.0.3", 8080, labels={"version": "v2"})


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Upstream:
    """Answers by endpoint address (200 unless told) and records what reached it."""

    def __init__(self, statuses: dict[str, int] | None = None) -> None:
        self.statuses = statuses or {}
        self.requests: list[httpx.Request] = []
        # The layers restore the caller's URL afterwards: keep the one that was sent.
        self.urls: list[httpx.URL] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.urls.append(request.url)
        return httpx.Response(self.statuses.get(request.url.host, 200))

    @property
    def hosts(self) -> list[str]:
        return [url.host for url in self.urls]


class Harness:
    def __init__(
        self,
        kind: str,
        upstream: Callable[[httpx.Request], httpx.Response],
        *,
        endpoints: tuple[Endpoint, ...] = (A, B, C),
        rules: list[dict[str, Any]] | None = None,
        route: Callable[[CallPlan], None] | None = None,
        **state_args: Any,
    ) -> None:
        self.kind = kind
        self.clock = FakeClock()
        state_args.setdefault("tls_mode", "DISABLE")
        self.state = OutboundState(
            rules=[DestinationRule.from_mapping(r) for r in rules or []],
            clock=self.clock,
            rng=random.Random(5),
            breaker=None,
            **state_args,
        )
        self.registry = StaticRegistry({"payments": endpoints, "empty": []})
        mock = httpx.MockTransport(upstream)
        self.route = route
        if kind == "sync":
            self.client = httpx.Client(
                transport=BalancingTransport(
                    BreakerTransport(mock, state=self.state),
                    resolver=self.registry,
                    state=self.state,
                )
            )
        else:
            self.aclient = httpx.AsyncClient(
                transport=AsyncBalancingTransport(
                    AsyncBreakerTransport(mock, state=self.state),
                    resolver=self.registry,
                    state=self.state,
                )
            )

    async def send(self, url: str = URL, **kwargs: Any) -> httpx.Response:
        extensions = dict(kwargs.pop("extensions", {}))
        if self.route is not None:
            plan = CallPlan()
            self.route(plan)
            extensions[CALL_KEY] = plan
        if self.kind == "sync":
            return self.client.get(url, extensions=extensions, **kwargs)
        return await self.aclient.get(url, extensions=extensions, **kwargs)


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def subset(name: str) -> Callable[[CallPlan], None]:
    def route(plan: CallPlan) -> None:
        plan.destination = "payments"
        plan.subset = name

    return route


SUBSETS = {
    "host": "payments",
    "subsets": [
        {"name": "v1", "labels": {"version": "v1"}},
        {"name": "v2", "labels": {"version": "v2"}},
        {"name": "v3", "labels": {"version": "v3"}},
    ],
}


# --- the pick and the rewrite ----------------------------------------------------------------


async def test_round_robin_rewrites_the_url_and_keeps_the_host_header(kind: str) -> None:
    upstream = Upstream()
    harness = Harness(kind, upstream)
    responses = [await harness.send() for _ in range(6)]
    assert sorted(upstream.hosts[:3]) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert upstream.hosts[3:] == upstream.hosts[:3]
    first = upstream.requests[0]
    assert str(upstream.urls[0]) == f"http://{upstream.hosts[0]}:8080/api/charge?id=7"
    assert first.headers["host"] == "payments"
    # The caller's request is restored: it still names the service.
    assert str(responses[0].request.url) == URL
    plan: CallPlan = responses[0].request.extensions[CALL_KEY]
    assert plan.destination == "payments"
    assert plan.endpoint is not None and plan.endpoint.address == upstream.hosts[0]


async def test_tls_clusters_get_https_and_their_settings(kind: str) -> None:
    upstream = Upstream()
    rules = [
        {
            "host": "payments",
            "trafficPolicy": {
                "tls": {"mode": "ISTIO_MUTUAL", "sni": "payments.default.svc.cluster.local"}
            },
        }
    ]
    harness = Harness(kind, upstream, rules=rules)
    await harness.send()
    request = upstream.requests[0]
    assert upstream.urls[0].scheme == "https"
    assert request.extensions[TLS_KEY] == ClientTLSSettings(
        mode="ISTIO_MUTUAL", sni="payments.default.svc.cluster.local"
    )
    assert request.extensions["sni_hostname"] == "payments.default.svc.cluster.local"


async def test_the_default_tls_mode_is_mesh_mtls(kind: str) -> None:
    upstream = Upstream()
    harness = Harness(kind, upstream, tls_mode="ISTIO_MUTUAL")
    await harness.send()
    assert upstream.urls[0].scheme == "https"
    assert "sni_hostname" not in upstream.requests[0].extensions


async def test_ipv6_endpoints(kind: str) -> None:
    upstream = Upstream()
    harness = Harness(kind, upstream, endpoints=(Endpoint("fd00::7", 8443),))
    await harness.send()
    assert str(upstream.urls[0]) == "http://[fd00::7]:8443/api/charge?id=7"


async def test_a_host_discovery_does_not_know_passes_through_untouched(kind: str) -> None:
    upstream = Upstream()
    harness = Harness(kind, upstream)
    response = await harness.send("https://api.example.com/v1?x=1")
    request = upstream.requests[0]
    assert str(upstream.urls[0]) == "https://api.example.com/v1?x=1"
    assert TLS_KEY not in request.extensions
    assert response.request.extensions[CALL_KEY].destination is None


# --- subsets ---------------------------------------------------------------------------------


async def test_subset_selection_by_labels(kind: str) -> None:
    upstream = Upstream()
    harness = Harness(kind, upstream, rules=[SUBSETS], route=subset("v2"))
    for _ in range(4):
        await harness.send()
    assert sorted(set(upstream.hosts)) == ["10.0.0.2", "10.0.0.3"]


async def test_a_subset_no_rule_defines(kind: str) -> None:
    harness = Harness(kind, Upstream(), rules=[SUBSETS], route=subset("canary"))
    with pytest.raises(NoHealthyEndpoint) as info:
        await harness.send()
    assert (
        str(info.value)
        == "payments: subset 'canary' is not defined (its DestinationRule defines v1, v2, v3)"
    )
    harness = Harness(kind, Upstream(), route=subset("v1"))
    with pytest.raises(NoHealthyEndpoint) as info:
        await harness.send()
    assert (
        str(info.value) == "payments: subset 'v1' is not defined (no DestinationRule applies to it)"
    )


async def test_a_subset_without_endpoints(kind: str) -> None:
    harness = Harness(kind, Upstream(), rules=[SUBSETS], route=subset("v3"))
    with pytest.raises(NoHealthyEndpoint) as info:
        await harness.send()
    assert str(info.value) == (
        "payments: no endpoint for subset 'v3' of payments: none of its 3 endpoints carries "
        "the labels {'version': 'v3'}"
    )


async def test_discovery_found_no_endpoints(kind: str) -> None:
    harness = Harness(kind, Upstream())
    with pytest.raises(NoHealthyEndpoint) as info:
        await harness.send("http://empty/")
    assert str(info.value) == "empty: no endpoint for empty: discovery found no endpoints"


async def test_a_routed_destination_discovery_does_not_know(kind: str) -> None:
    def route(plan: CallPlan) -> None:
        plan.destination = "ledger"

    harness = Harness(kind, Upstream(), route=route)
    with pytest.raises(NoHealthyEndpoint) as info:
        await harness.send()
    assert str(info.value) == "ledger: discovery does not know this destination"


# --- outlier ejection, through the breaker layer's reports -----------------------------------

EJECT_AFTER_TWO = {
    "host": "payments",
    "trafficPolicy": {
        "outlierDetection": {
            "consecutive5xxErrors": 2,
            "baseEjectionTime": "30s",
            "maxEjectionPercent": 100,
        }
    },
}


async def test_consecutive_5xx_eject_an_endpoint_until_its_time_is_up(kind: str) -> None:
    upstream = Upstream({"10.0.0.1": 503})
    harness = Harness(kind, upstream, endpoints=(A, B), rules=[EJECT_AFTER_TWO])
    for _ in range(4):
        await harness.send()
    assert upstream.hosts.count("10.0.0.1") == 2  # two 503s, then out
    before = len(upstream.requests)
    for _ in range(6):
        response = await harness.send()
        assert response.status_code == 200
    assert set(upstream.hosts[before:]) == {"10.0.0.2"}
    cluster = harness.state.cluster("payments")
    assert cluster.detector is not None and cluster.detector.ejections_active == 1

    harness.clock.now += 29.9
    await harness.send()
    await harness.send()
    assert "10.0.0.1" not in upstream.hosts[before:]
    harness.clock.now += 0.1  # the base ejection time has passed: back in rotation
    await harness.send()
    await harness.send()
    assert "10.0.0.1" in upstream.hosts[-2:]


async def test_panic_mode_uses_every_endpoint(kind: str) -> None:
    rules = [
        {
            "host": "payments",
            "trafficPolicy": {
                "outlierDetection": {
                    "consecutive5xxErrors": 1,
                    "maxEjectionPercent": 100,
                    "minHealthPercent": 50,
                }
            },
        }
    ]
    upstream = Upstream({"10.0.0.1": 503, "10.0.0.2": 503})
    harness = Harness(kind, upstream, rules=rules)
    cluster = harness.state.cluster("payments")
    detector = cluster.detector
    assert detector is not None
    for _ in range(10):
        await harness.send()
        if detector.ejections_total == 2:
            break
    assert detector.ejections_active == 2
    # One healthy endpoint of three is below minHealthPercent (50): all are used again.
    before = len(upstream.requests)
    for _ in range(3):
        await harness.send()
    assert sorted(upstream.hosts[before:]) == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]


async def test_every_endpoint_ejected_is_no_healthy_endpoint(kind: str) -> None:
    rules = [
        {
            "host": "payments",
            "trafficPolicy": {
                "outlierDetection": {"consecutive5xxErrors": 1, "maxEjectionPercent": 100}
            },
        }
    ]
    harness = Harness(
        kind, Upstream({"10.0.0.1": 500, "10.0.0.2": 502}), endpoints=(A, B), rules=rules
    )
    await harness.send()
    await harness.send()
    with pytest.raises(NoHealthyEndpoint) as info:
        await harness.send()
    assert str(info.value) == (
        "payments: no healthy endpoint for payments: all 2 are ejected by outlier detection"
    )


async def test_local_origin_failures_eject_too(kind: str) -> None:
    def upstream(request: httpx.Request) -> httpx.Response:
        if request.url.host == "10.0.0.1":
            raise httpx.ConnectError("connection refused")
        return httpx.Response(200)

    harness = Harness(kind, upstream, endpoints=(A, B), rules=[EJECT_AFTER_TWO])
    failures = 0
    for _ in range(6):
        try:
            await harness.send()
        except httpx.ConnectError:
            failures += 1
    assert failures == 2
    cluster = harness.state.cluster("payments")
    assert cluster.detector is not None and cluster.detector.is_ejected(A)


# --- hashing and balancer feedback -----------------------------------------------------------

HASHED = {
    "host": "payments",
    "trafficPolicy": {"loadBalancer": {"consistentHash": {"httpHeaderName": "x-user"}}},
}


async def test_consistent_hash_on_a_header(kind: str) -> None:
    upstream = Upstream()
    harness = Harness(kind, upstream, rules=[HASHED])
    for _ in range(5):
        await harness.send(headers={"x-user": "alice"})
    assert len(set(upstream.hosts)) == 1
    users = [f"user-{n}" for n in range(30)]
    for user in users:
        await harness.send(headers={"x-user": user})
    assert len(set(upstream.hosts)) == 3


async def test_hash_key_from_the_call_or_the_plan(kind: str) -> None:
    upstream = Upstream()
    harness = Harness(kind, upstream, rules=[HASHED])
    for _ in range(4):
        await harness.send(extensions={HASH_KEY: "cart-42"})
    assert len(set(upstream.hosts)) == 1

    def route(plan: CallPlan) -> None:
        plan.destination = "payments"
        plan.hash_key = "cart-42"

    routed = Harness(kind, upstream, rules=[HASHED], route=route)
    await routed.send(headers={"x-user": "bob"})
    assert upstream.hosts[-1] == upstream.hosts[0]


async def test_bad_hash_key(kind: str) -> None:
    harness = Harness(kind, Upstream(), rules=[HASHED])
    with pytest.raises(ConfigurationError) as info:
        await harness.send(extensions={HASH_KEY: 42})
    assert info.value.field == "extensions['meshware.hash_key']"


async def test_balancer_learns_of_every_call(kind: str) -> None:
    rules = [{"host": "payments", "trafficPolicy": {"loadBalancer": {"simple": "LEAST_REQUEST"}}}]
    harness = Harness(kind, Upstream({"10.0.0.2": 503}), rules=rules)
    for _ in range(6):
        await harness.send()
    balancer = harness.state.cluster("payments").balancer
    assert isinstance(balancer, LeastRequest)
    assert [balancer.in_flight(e) for e in (A, B, C)] == [0, 0, 0]


def test_constructor_validation() -> None:
    mock = httpx.MockTransport(Upstream())
    with pytest.raises(ConfigurationError) as info:
        BalancingTransport(mock, resolver={"payments": [A]})  # type: ignore[arg-type]
    assert info.value.field == "resolver"
    with pytest.raises(ConfigurationError) as info:
        AsyncBalancingTransport(
            mock,
            resolver=StaticRegistry({}),
            state=object(),  # type: ignore[arg-type]
        )
    assert info.value.field == "state"


def test_routing_stand_in_plans_are_used_as_given() -> None:
    # A plan made by an upper layer (plan_of) is the one the balancing layer fills in.
    upstream = Upstream()
    state = OutboundState(tls_mode="DISABLE", breaker=None)
    transport = BalancingTransport(
        httpx.MockTransport(upstream), resolver=StaticRegistry({"payments": [A]}), state=state
    )
    request = httpx.Request("GET", URL)
    plan = plan_of(request)
    transport.handle_request(request)
    assert plan.endpoint == A
    assert transport.state is state


@pytest.mark.parametrize(
    "url",
    [
        "http://payments/api/charge?id=7&x=%20y#frag",
        "http://user:secret@payments:8080/",
        "https://payments/a%2Fb",
    ],
)
@pytest.mark.parametrize(
    "endpoint",
    [
        Endpoint("10.0.0.1", 8080),
        Endpoint("fd00::7", 8443),
        Endpoint("Payments-1.Internal", 80),
        Endpoint("10.0.0.9", 443),
    ],
)
@pytest.mark.parametrize("scheme", ["http", "https"])
def test_endpoint_url_is_what_copy_with_gives(url: str, endpoint: Endpoint, scheme: str) -> None:
    original = httpx.URL(url)
    fast = endpoint_url(original, scheme, endpoint)
    slow = original.copy_with(scheme=scheme, host=endpoint.address, port=endpoint.port)
    assert str(fast) == str(slow)
    assert (fast.host, fast.port, fast.raw_path, fast.scheme) == (
        slow.host,
        slow.port,
        slow.raw_path,
        slow.scheme,
    )
    assert fast == slow


_segments = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), max_size=12
)


@settings(max_examples=200, deadline=None)
@given(
    path=st.lists(_segments, max_size=4),
    params=st.lists(st.tuples(_segments, _segments), max_size=3),
    port=st.integers(1, 65535),
    https=st.booleans(),
)
def test_endpoint_url_property(
    path: list[str], params: list[tuple[str, str]], port: int, https: bool
) -> None:
    raw = "/" + "/".join(quote(segment, safe="") for segment in path)
    original = httpx.URL("http://payments" + raw, params=params)
    endpoint = Endpoint("10.1.2.3", port)
    scheme = "https" if https else "http"
    fast = endpoint_url(original, scheme, endpoint)
    assert fast == original.copy_with(scheme=scheme, host="10.1.2.3", port=port)
    assert fast.raw_path == original.raw_path
