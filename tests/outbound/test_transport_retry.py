"""The retry layer, through the balancing and breaker layers, sync and async alike."""

from __future__ import annotations

import asyncio
import email.utils
import random
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest

from meshware.exceptions import ConfigurationError
from meshware.outbound.breaker import BreakerPolicy
from meshware.outbound.call import CALL_KEY, RETRY_KEY, RETRYABLE_KEY, CallPlan, plan_of
from meshware.outbound.discovery import StaticRegistry
from meshware.outbound.endpoints import Endpoint
from meshware.outbound.errors import CircuitOpen
from meshware.outbound.retry import RetryPolicy
from meshware.outbound.transport_balancing import AsyncBalancingTransport, BalancingTransport
from meshware.outbound.transport_breaker import AsyncBreakerTransport, BreakerTransport
from meshware.outbound.transport_retry import AsyncRetryTransport, RetryTransport
from meshware.outbound.transports import RETRIES_EXHAUSTED_KEY, OutboundState
from meshware.telemetry.metrics import MeshMetrics, WorkloadInfo

URL = "http://payments/api/charge"
TWO = (Endpoint("10.0.0.1", 8080), Endpoint("10.0.0.2", 8080))
BROAD = RetryPolicy(retry_on="5xx,reset,connect-failure")


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


Outcome = int | Exception | httpx.Response


class Upstream:
    """Answers tries in order (the last outcome repeats) and records each request."""

    def __init__(self, *outcomes: Outcome) -> None:
        self.outcomes = list(outcomes) or [200]
        self.requests: list[httpx.Request] = []
        self.hosts: list[str] = []
        self.headers: list[httpx.Headers] = []
        self.timeouts: list[dict[str, Any]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        self.hosts.append(request.url.host)
        self.headers.append(httpx.Headers(request.headers))
        self.timeouts.append(dict(request.extensions.get("timeout", {})))
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if isinstance(outcome, Exception):
            raise outcome
        if isinstance(outcome, httpx.Response):
            return outcome
        return httpx.Response(outcome, text=f"try {len(self.requests)}")

    @property
    def calls(self) -> int:
        return len(self.requests)


class Harness:
    """The retry -> balancing -> breaker stack over a MockTransport, sync or async."""

    def __init__(
        self,
        kind: str,
        upstream: Callable[[httpx.Request], Any],
        *,
        policy: RetryPolicy | None = BROAD,
        state: OutboundState | None = None,
        endpoints: tuple[Endpoint, ...] = TWO,
        route: Callable[[CallPlan], None] | None = None,
        wall_clock: Callable[[], float] | None = None,
    ) -> None:
        self.kind = kind
        self.clock = FakeClock()
        self.state = state or OutboundState(
            tls_mode="DISABLE", clock=self.clock, rng=random.Random(3), breaker=None
        )
        self.sleeps: list[float] = []
        self.registry = StaticRegistry({"payments": endpoints})
        extra: dict[str, Any] = {}
        if wall_clock is not None:
            extra["wall_clock"] = wall_clock
        mock = httpx.MockTransport(upstream)
        if kind == "sync":
            inner: httpx.BaseTransport = RetryTransport(
                BalancingTransport(
                    BreakerTransport(mock, state=self.state),
                    resolver=self.registry,
                    state=self.state,
                ),
                policy=policy,
                resolver=self.registry,
                state=self.state,
                sleep=self.sleeps.append,
                rng=random.Random(7),
                **extra,
            )
            self.client = httpx.Client(transport=_Route(inner, route) if route else inner)
        else:

            async def sleep(seconds: float) -> None:
                self.sleeps.append(seconds)

            ainner: httpx.AsyncBaseTransport = AsyncRetryTransport(
                AsyncBalancingTransport(
                    AsyncBreakerTransport(mock, state=self.state),
                    resolver=self.registry,
                    state=self.state,
                ),
                policy=policy,
                resolver=self.registry,
                state=self.state,
                sleep=sleep,
                rng=random.Random(7),
                **extra,
            )
            self.aclient = httpx.AsyncClient(
                transport=_AsyncRoute(ainner, route) if route else ainner
            )

    async def send(self, method: str = "GET", url: str = URL, **kwargs: Any) -> httpx.Response:
        if self.kind == "sync":
            return self.client.request(method, url, **kwargs)
        return await self.aclient.request(method, url, **kwargs)

    def body(self, *chunks: bytes) -> Any:
        """An unreplayable streaming body of the right kind."""
        if self.kind == "sync":

            def gen() -> Iterator[bytes]:
                yield from chunks

            return gen()

        async def agen() -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield chunk

        return agen()


class _Route(httpx.BaseTransport):
    """Stands in for the routing layer: fills in the plan."""

    def __init__(self, inner: httpx.BaseTransport, route: Callable[[CallPlan], None]) -> None:
        self.inner = inner
        self.route = route

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.route(plan_of(request))
        return self.inner.handle_request(request)


class _AsyncRoute(httpx.AsyncBaseTransport):
    def __init__(self, inner: httpx.AsyncBaseTransport, route: Callable[[CallPlan], None]) -> None:
        self.inner = inner
        self.route = route

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.route(plan_of(request))
        return await self.inner.handle_async_request(request)


@pytest.fixture(params=["sync", "async"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def connect_error() -> httpx.ConnectError:
    return httpx.ConnectError("connection refused")


# --- each retryOn condition ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("retry_on", "first", "retried"),
    [
        ("5xx", 500, True),
        ("5xx", httpx.ReadTimeout("per-try timeout"), True),
        ("5xx", 404, False),
        ("gateway-error", 502, True),
        ("gateway-error", 504, True),
        ("gateway-error", 500, False),
        ("gateway-error", httpx.ConnectError("refused"), True),
        ("reset", httpx.ReadError("connection reset by peer"), True),
        ("reset", httpx.RemoteProtocolError("server disconnected"), True),
        ("reset", 503, False),
        ("connect-failure", httpx.ConnectError("refused"), True),
        ("connect-failure", httpx.ConnectTimeout("connect timed out"), True),
        ("connect-failure", httpx.ReadError("reset"), False),
        ("reset-before-request", httpx.ConnectError("refused"), True),
        ("reset-before-request", httpx.ReadError("reset"), False),
        ("retriable-4xx", 409, True),
        ("retriable-4xx", 400, False),
        ("429", 429, True),
        ("503", 503, True),
        ("503", 502, False),
    ],
)
async def test_retry_on_each_condition(
    kind: str, retry_on: str, first: Outcome, retried: bool
) -> None:
    upstream = Upstream(first, 200)
    harness = Harness(kind, upstream, policy=RetryPolicy(attempts=2, retry_on=retry_on))
    if retried:
        response = await harness.send()
        assert response.status_code == 200
        assert upstream.calls == 2
    elif isinstance(first, Exception):
        with pytest.raises(type(first)) as info:
            await harness.send()
        assert info.value is first
        assert upstream.calls == 1
    else:
        response = await harness.send()
        assert response.status_code == first
        assert upstream.calls == 1


# --- the safe-to-repeat rule ---------------------------------------------------------------


async def test_post_is_not_retried_on_503(kind: str) -> None:
    upstream = Upstream(503, 200)
    harness = Harness(kind, upstream, policy=RetryPolicy())
    response = await harness.send("POST", json={"amount": 10})
    assert (response.status_code, upstream.calls) == (503, 1)
    assert RETRIES_EXHAUSTED_KEY not in response.request.extensions


@pytest.mark.parametrize(
    "opt_in",
    ["extension", "idempotency-key", "route"],
)
async def test_post_marked_safe_is_retried_on_503(kind: str, opt_in: str) -> None:
    upstream = Upstream(503, 200)
    kwargs: dict[str, Any] = {"json": {"amount": 10}}
    route = None
    if opt_in == "extension":
        kwargs["extensions"] = {RETRYABLE_KEY: True}
    elif opt_in == "idempotency-key":
        kwargs["headers"] = {"Idempotency-Key": "charge-7f3a"}
    else:

        def route(plan: CallPlan) -> None:
            plan.destination = "payments"
            plan.retryable = True

    harness = Harness(kind, upstream, policy=RetryPolicy(), route=route)
    response = await harness.send("POST", **kwargs)
    assert (response.status_code, upstream.calls) == (200, 2)
    assert upstream.requests[1].content == b'{"amount":10}'


async def test_post_is_retried_on_connect_failure(kind: str) -> None:
    upstream = Upstream(connect_error(), 200)
    harness = Harness(kind, upstream, policy=RetryPolicy())
    response = await harness.send("POST", content=b"charge")
    assert (response.status_code, upstream.calls) == (200, 2)
    assert [r.content for r in upstream.requests] == [b"charge", b"charge"]


async def test_unreplayable_body_is_never_retried(kind: str) -> None:
    upstream = Upstream(503, 200)
    harness = Harness(kind, upstream, policy=RetryPolicy(retry_non_idempotent=True))
    response = await harness.send("PUT", content=harness.body(b"a", b"b"))
    assert (response.status_code, upstream.calls) == (503, 1)

    error = connect_error()
    upstream = Upstream(error, 200)
    harness = Harness(kind, upstream, policy=RetryPolicy())
    with pytest.raises(httpx.ConnectError) as info:
        await harness.send("PUT", content=harness.body(b"a"))
    assert info.value is error
    assert upstream.calls == 1


# --- when retries run out: the last real outcome ---------------------------------------------


async def test_attempts_exhausted_returns_the_last_response(kind: str) -> None:
    upstream = Upstream(503)
    harness = Harness(kind, upstream, policy=RetryPolicy(attempts=2))
    response = await harness.send()
    assert (response.status_code, response.text, upstream.calls) == (503, "try 3", 3)
    assert response.request.extensions[RETRIES_EXHAUSTED_KEY] is True
    assert harness.sleeps and all(0 <= s <= 0.05 for s in harness.sleeps)


async def test_attempts_exhausted_raises_the_last_error(kind: str) -> None:
    errors = [connect_error(), connect_error(), connect_error()]
    upstream = Upstream(*errors)
    harness = Harness(kind, upstream, policy=RetryPolicy(attempts=2))
    with pytest.raises(httpx.ConnectError) as info:
        await harness.send()
    assert info.value is errors[2]
    assert upstream.calls == 3
    assert info.value.request.extensions[RETRIES_EXHAUSTED_KEY] is True


async def test_budget_exhaustion_returns_the_last_response(kind: str) -> None:
    metrics = MeshMetrics()
    recorder = metrics.outbound(WorkloadInfo(service="orders"))
    clock = FakeClock()
    state = OutboundState(
        tls_mode="DISABLE",
        clock=clock,
        breaker=None,
        retry_budget_ratio=0.0,
        retry_budget_min_retries_per_second=0.0,
        recorder=recorder,
    )
    upstream = Upstream(503, 200)
    harness = Harness(kind, upstream, policy=RetryPolicy(), state=state)
    response = await harness.send()
    assert (response.status_code, upstream.calls) == (503, 1)
    assert response.request.extensions[RETRIES_EXHAUSTED_KEY] is True
    labels = {"destination_service": "payments.default.svc.cluster.local"}
    assert (
        metrics.registry.get_sample_value("meshware_outbound_retry_budget_exhausted_total", labels)
        == 1.0
    )


async def test_budget_exhaustion_raises_the_original_error(kind: str) -> None:
    state = OutboundState(
        tls_mode="DISABLE",
        breaker=None,
        retry_budget_ratio=0.0,
        retry_budget_min_retries_per_second=0.0,
    )
    error = connect_error()
    upstream = Upstream(error, 200)
    harness = Harness(kind, upstream, policy=RetryPolicy(), state=state)
    with pytest.raises(httpx.ConnectError) as info:
        await harness.send()
    assert info.value is error
    assert upstream.calls == 1


async def test_budget_allows_retries_up_to_its_balance(kind: str) -> None:
    # ratio 0.5 of 2 requests = 1 retry, and no floor: the second 503 is not retried.
    state = OutboundState(
        tls_mode="DISABLE",
        breaker=None,
        retry_budget_ratio=0.5,
        retry_budget_min_retries_per_second=0.0,
    )
    upstream = Upstream(503, 200, 503, 200)
    harness = Harness(kind, upstream, policy=RetryPolicy(), state=state)
    state.budget("payments").record_request()
    first = await harness.send()
    second = await harness.send()
    assert (first.status_code, second.status_code, upstream.calls) == (200, 503, 3)


async def test_a_local_refusal_of_a_retry_delivers_the_previous_response(kind: str) -> None:
    state = OutboundState(
        tls_mode="DISABLE", breaker=BreakerPolicy(failure_threshold=1), clock=FakeClock()
    )
    upstream = Upstream(503, 200)
    # One endpoint: its failure is the whole destination's, which the breaker stands for.
    harness = Harness(kind, upstream, policy=RetryPolicy(), state=state, endpoints=TWO[:1])
    response = await harness.send()
    # The 503 opened the breaker; the retry was refused with CircuitOpen before any network
    # call, and the caller gets the real 503, already read.
    assert (response.status_code, response.text, upstream.calls) == (503, "try 1", 1)


async def test_a_local_refusal_of_a_retry_raises_the_previous_error(kind: str) -> None:
    state = OutboundState(
        tls_mode="DISABLE", breaker=BreakerPolicy(failure_threshold=1), clock=FakeClock()
    )
    error = connect_error()
    upstream = Upstream(error, 200)
    # One endpoint: its failure is the whole destination's, which the breaker stands for.
    harness = Harness(kind, upstream, policy=RetryPolicy(), state=state, endpoints=TWO[:1])
    with pytest.raises(httpx.ConnectError) as info:
        await harness.send()
    assert info.value is error
    assert isinstance(info.value.__context__, CircuitOpen)
    assert upstream.calls == 1


# --- per-try timeout, backoff, Retry-After -------------------------------------------------


async def test_per_try_timeout_caps_each_try_and_a_timed_out_try_is_retried(kind: str) -> None:
    upstream = Upstream(httpx.ReadTimeout("read timed out"), 200)
    harness = Harness(
        kind, upstream, policy=RetryPolicy(attempts=1, per_try_timeout=0.25, retry_on="reset")
    )
    response = await harness.send()
    assert (response.status_code, upstream.calls) == (200, 2)
    for timeout in upstream.timeouts:
        assert timeout == {"connect": 0.25, "read": 0.25, "write": 0.25, "pool": 0.25}
    assert [h["x-meshware-timeout"] for h in upstream.headers] == ["250m", "250m"]


async def test_async_per_try_timeout_is_a_hard_limit() -> None:
    never = asyncio.Event()
    calls = 0

    async def upstream(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls == 1:
            await never.wait()  # a server that never answers
        return httpx.Response(200)

    harness = Harness(
        "async", upstream, policy=RetryPolicy(attempts=1, per_try_timeout=0.02, retry_on="reset")
    )
    response = await harness.send()
    assert (response.status_code, calls) == (200, 2)


async def test_async_per_try_limit_exhausted_raises_a_read_timeout() -> None:
    never = asyncio.Event()

    async def upstream(request: httpx.Request) -> httpx.Response:
        await never.wait()
        return httpx.Response(200)

    harness = Harness("async", upstream, policy=RetryPolicy(attempts=0, per_try_timeout=0.01))
    with pytest.raises(httpx.ReadTimeout) as info:
        await harness.send()
    assert str(info.value).startswith("per-try time limit of ")


@pytest.mark.parametrize("status", [503, 429])
async def test_retry_after_is_honoured(kind: str, status: int) -> None:
    upstream = Upstream(httpx.Response(status, headers={"Retry-After": "3"}), 200)
    harness = Harness(kind, upstream, policy=RetryPolicy(retry_on="429,503"))
    response = await harness.send()
    assert response.status_code == 200
    assert harness.sleeps == [3.0]


async def test_retry_after_as_a_date(kind: str) -> None:
    now = 1_445_412_480.0  # Wed, 21 Oct 2015 07:28:00 GMT
    date = email.utils.formatdate(now + 4, usegmt=True)
    upstream = Upstream(httpx.Response(503, headers={"Retry-After": date}), 200)
    harness = Harness(kind, upstream, policy=RetryPolicy(), wall_clock=lambda: now)
    await harness.send()
    assert harness.sleeps == [4.0]


async def test_backoff_is_jittered_and_capped(kind: str) -> None:
    upstream = Upstream(503, 503, 503, 503, 200)
    policy = RetryPolicy(attempts=4, backoff_base=0.1, backoff_cap=0.3)
    harness = Harness(kind, upstream, policy=policy)
    await harness.send()
    assert len(harness.sleeps) == 4
    for retries_done, slept in enumerate(harness.sleeps):
        assert 0.0 <= slept <= min(0.3, 0.1 * 2**retries_done)


# --- endpoints, responses, overrides ---------------------------------------------------------


async def test_a_retry_goes_to_another_endpoint(kind: str) -> None:
    upstream = Upstream(503, 200)
    harness = Harness(kind, upstream)
    response = await harness.send()
    assert response.status_code == 200
    assert len(set(upstream.hosts)) == 2
    plan: CallPlan = response.request.extensions[CALL_KEY]
    assert plan.tried == {f"{upstream.hosts[0]}:8080"}
    assert plan.endpoint is not None and plan.endpoint.address == upstream.hosts[1]
    assert plan.attempt == 1
    # Every try kept the service's name as its Host header.
    assert [h["host"] for h in upstream.headers] == ["payments", "payments"]


class Tracked(httpx.SyncByteStream, httpx.AsyncByteStream):
    def __init__(self) -> None:
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        yield b"unavailable"

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b"unavailable"

    def close(self) -> None:
        self.closed = True

    async def aclose(self) -> None:
        self.closed = True


async def test_a_response_to_be_retried_is_closed_first(kind: str) -> None:
    stream = Tracked()
    upstream = Upstream(httpx.Response(503, stream=stream), 200)
    harness = Harness(kind, upstream)
    response = await harness.send()
    assert response.status_code == 200
    assert stream.closed


async def test_retry_key_none_disables_retries(kind: str) -> None:
    upstream = Upstream(503, 200)
    harness = Harness(kind, upstream)
    response = await harness.send(extensions={RETRY_KEY: None})
    assert (response.status_code, upstream.calls) == (503, 1)


async def test_retry_key_policy_overrides_the_route_and_the_default(kind: str) -> None:
    upstream = Upstream(500, 500, 200)

    def route(plan: CallPlan) -> None:
        plan.destination = "payments"
        plan.retry = RetryPolicy(attempts=0)

    harness = Harness(kind, upstream, route=route)
    response = await harness.send(extensions={RETRY_KEY: RetryPolicy(attempts=3, retry_on="5xx")})
    assert (response.status_code, upstream.calls) == (200, 3)


async def test_the_routes_policy_overrides_the_default(kind: str) -> None:
    upstream = Upstream(500, 200)

    def route(plan: CallPlan) -> None:
        plan.destination = "payments"
        plan.retry = RetryPolicy(attempts=0)

    harness = Harness(kind, upstream, route=route)
    response = await harness.send()
    assert (response.status_code, upstream.calls) == (500, 1)


async def test_bad_retry_key(kind: str) -> None:
    harness = Harness(kind, Upstream(200))
    with pytest.raises(ConfigurationError) as info:
        await harness.send(extensions={RETRY_KEY: {"attempts": 3}})
    assert info.value.field == "extensions['meshware.retry']"


async def test_a_host_that_is_not_a_mesh_service_is_sent_once_untouched(kind: str) -> None:
    upstream = Upstream(503, 200)
    harness = Harness(kind, upstream)
    response = await harness.send(url="https://api.example.com/v1/charges")
    assert (response.status_code, upstream.calls) == (503, 1)
    assert str(upstream.requests[0].url) == "https://api.example.com/v1/charges"
    assert "x-meshware-timeout" not in upstream.headers[0]
    assert response.request.extensions[CALL_KEY].destination is None


async def test_retries_are_counted_by_condition(kind: str) -> None:
    metrics = MeshMetrics()
    state = OutboundState(
        tls_mode="DISABLE", breaker=None, recorder=metrics.outbound(WorkloadInfo(service="orders"))
    )
    upstream = Upstream(503, connect_error(), 200)
    harness = Harness(kind, upstream, policy=RetryPolicy(attempts=3), state=state)
    await harness.send()
    base = {"destination_service": "payments.default.svc.cluster.local"}
    get = metrics.registry.get_sample_value
    assert get("meshware_outbound_retries_total", {**base, "condition": "503"}) == 1.0
    assert get("meshware_outbound_retries_total", {**base, "condition": "connect-failure"}) == 1.0


def test_constructor_validation() -> None:
    mock = httpx.MockTransport(Upstream(200))
    with pytest.raises(ConfigurationError) as info:
        RetryTransport(mock, policy="5xx")  # type: ignore[arg-type]
    assert info.value.field == "policy"
    with pytest.raises(ConfigurationError) as info:
        RetryTransport(mock, resolver={"payments": []})  # type: ignore[arg-type]
    assert info.value.field == "resolver"
    with pytest.raises(ConfigurationError) as info:
        AsyncRetryTransport(mock, state="shared")  # type: ignore[arg-type]
    assert info.value.field == "state"


def test_close_propagates() -> None:
    closed: list[str] = []

    class Inner(httpx.BaseTransport):
        def close(self) -> None:
            closed.append("sync")

    class AsyncInner(httpx.AsyncBaseTransport):
        async def aclose(self) -> None:
            closed.append("async")

    RetryTransport(Inner()).close()
    asyncio.run(AsyncRetryTransport(AsyncInner()).aclose())
    assert closed == ["sync", "async"]


async def test_each_try_starts_from_the_callers_timeouts(kind: str) -> None:
    upstream = Upstream(503, 200)

    def shortening(request: httpx.Request) -> httpx.Response:
        response = upstream(request)
        # A lower layer that waited in a queue shortened this try's timeouts.
        request.extensions["timeout"] = dict.fromkeys(("connect", "read", "write", "pool"), 0.01)
        return response

    harness = Harness(kind, shortening, policy=RetryPolicy(per_try_timeout=0.25))
    await harness.send()
    assert [t["read"] for t in upstream.timeouts] == [0.25, 0.25]
