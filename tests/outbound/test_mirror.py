from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest

from meshware.outbound.call import CALL_KEY, HASH_KEY, RETRY_KEY, CallPlan
from meshware.outbound.deadline import Deadline, deadline_scope
from meshware.outbound.discovery import StaticRegistry
from meshware.outbound.endpoints import Endpoint
from meshware.outbound.mirror import (
    SHADOW_SUFFIX,
    MirrorObserver,
    MirrorOutcome,
    shadow_host,
    shadow_request,
)
from meshware.outbound.retry import RetryPolicy
from meshware.outbound.route_transport import AsyncRoutingTransport, RoutingTransport
from meshware.outbound.routing import RouteTable

MIRROR_ALL = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: httpbin
spec:
  hosts:
    - httpbin
  http:
  - name: shadowed
    route:
    - destination:
        host: httpbin
        subset: v1
      weight: 100
    timeout: 2s
    mirror:
      host: httpbin
      subset: v2
    mirrorPercentage:
      value: 100.0
"""

MIRROR_HALF = """
spec:
  hosts: [httpbin]
  http:
  - route:
    - destination: {host: httpbin, subset: v1}
    mirror: {host: httpbin-shadow-service}
    mirrorPercentage: {value: 50}
"""

REGISTRY = StaticRegistry(
    {"httpbin": [Endpoint("10.0.0.1", 8000)], "httpbin-shadow-service": [Endpoint("10.0.0.2", 80)]}
)


def is_copy(request: httpx.Request) -> bool:
    return request.headers["host"].endswith(SHADOW_SUFFIX)


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


# --- the core pieces ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "shadow"),
    [
        ("httpbin", "httpbin-shadow"),
        ("httpbin:8000", "httpbin-shadow:8000"),
        ("reviews.default.svc.cluster.local", "reviews.default.svc.cluster.local-shadow"),
        ("[::1]:8080", "[::1]-shadow:8080"),
        ("[::1]", "[::1]-shadow"),
    ],
)
def test_shadow_host(host: str, shadow: str) -> None:
    assert shadow_host(host) == shadow


def test_shadow_request_copies_the_call() -> None:
    request = httpx.Request(
        "POST",
        "http://httpbin:8000/anything?x=1",
        headers={"x-trace": "abc", "content-type": "application/json"},
        content=b'{"a": 1}',
        extensions={
            RETRY_KEY: RetryPolicy(attempts=5),
            HASH_KEY: "k",
            CALL_KEY: CallPlan(destination="httpbin"),
            "timeout": {"connect": 1.0, "read": 1.0, "write": 1.0, "pool": 1.0},
        },
    )
    plan = CallPlan(destination="httpbin", subset="v2")
    copy = shadow_request(request, plan)
    assert copy is not None
    assert (copy.method, str(copy.url), copy.content) == (
        "POST",
        "http://httpbin:8000/anything?x=1",
        b'{"a": 1}',
    )
    assert copy.headers["host"] == "httpbin-shadow:8000"
    assert copy.headers["x-trace"] == "abc"
    assert copy.headers["content-length"] == "8"
    assert copy.extensions[CALL_KEY] is plan
    assert copy.extensions[RETRY_KEY] is None  # sent once
    assert HASH_KEY not in copy.extensions
    assert copy.extensions["timeout"] == request.extensions["timeout"]
    assert request.headers["host"] == "httpbin:8000"  # the original is untouched


def test_streaming_bodies_are_not_copied() -> None:
    def chunks() -> Iterator[bytes]:
        yield b"part"

    request = httpx.Request("POST", "http://httpbin/", content=chunks())
    assert shadow_request(request, CallPlan()) is None


def test_observer_counts_and_calls_back() -> None:
    seen: list[MirrorOutcome] = []
    observer = MirrorObserver(on_outcome=seen.append)
    outcomes = [
        MirrorOutcome(
            call_id=1,
            role="mirror",
            route="r",
            destination="a",
            subset="v2",
            status=500,
            error=None,
            latency_s=0.1,
        ),
        MirrorOutcome(
            call_id=1,
            role="primary",
            route="r",
            destination="a",
            subset="v1",
            status=200,
            error=None,
            latency_s=0.2,
        ),
        MirrorOutcome(
            call_id=2,
            role="mirror",
            route="r",
            destination="a",
            subset="v2",
            status=None,
            error=httpx.ConnectError("no"),
            latency_s=0.3,
        ),
        MirrorOutcome(
            call_id=3,
            role="primary",
            route="r",
            destination="a",
            subset="v1",
            status=None,
            error=httpx.ReadTimeout("slow"),
            latency_s=0.3,
        ),
    ]
    for outcome in outcomes:
        observer.record(outcome)
    assert seen == outcomes
    assert (observer.responses, observer.errors) == (1, 1)
    assert (observer.primary_responses, observer.primary_errors) == (1, 1)
    assert observer.mirror_statuses == {500: 1}
    assert observer.primary_statuses == {200: 1}


def test_a_failing_callback_is_logged_and_swallowed(caplog: pytest.LogCaptureFixture) -> None:
    def broken(outcome: MirrorOutcome) -> None:
        raise RuntimeError("metrics backend down")

    observer = MirrorObserver(on_outcome=broken)
    with caplog.at_level(logging.ERROR, logger="meshware.outbound.mirror"):
        observer.record(
            MirrorOutcome(
                call_id=1,
                role="mirror",
                route=None,
                destination="a",
                subset=None,
                status=200,
                error=None,
                latency_s=0.0,
            )
        )
    assert observer.responses == 1
    assert "on_outcome callback failed" in caplog.text


# --- through the sync transport ----------------------------------------------------------------


def make_sync(
    handler: Callable[[httpx.Request], Any], text: str = MIRROR_ALL, **kw: Any
) -> tuple[httpx.Client, RoutingTransport]:
    transport = RoutingTransport(
        httpx.MockTransport(handler),
        routes=RouteTable.from_yaml(text),
        resolver=REGISTRY,
        rng=kw.pop("rng", random.Random(5)),
        **kw,
    )
    return httpx.Client(transport=transport), transport


def test_sync_mirror_gets_a_copy_with_its_own_plan() -> None:
    copies: list[tuple[httpx.Request, CallPlan]] = []
    lock = threading.Lock()
    clock = Clock()

    def handler(request: httpx.Request) -> httpx.Response:
        if is_copy(request):
            with lock:
                copies.append((request, request.extensions[CALL_KEY]))
            return httpx.Response(503)
        return httpx.Response(200, text="primary")

    outcomes: list[MirrorOutcome] = []
    observer = MirrorObserver(on_outcome=outcomes.append)
    client, transport = make_sync(handler, mirror_observer=observer, clock=clock)
    request = client.build_request(
        "PUT", "http://httpbin/put", json={"k": "v"}, extensions={HASH_KEY: "user-1"}
    )
    with deadline_scope(Deadline.after(10.0, clock=clock)):
        response = client.send(request)
    client.close()  # waits for the copy
    assert response.text == "primary"
    primary_plan = request.extensions[CALL_KEY]
    assert (primary_plan.subset, primary_plan.mirrored) == ("v1", "v2")
    ((copy, plan),) = copies
    assert (copy.method, copy.content, copy.headers["host"]) == (
        "PUT",
        b'{"k":"v"}',
        "httpbin-shadow",
    )
    assert (plan.destination, plan.subset, plan.retry, plan.route) == (
        "httpbin",
        "v2",
        None,
        "shadowed",
    )
    assert plan.deadline is primary_plan.deadline  # bounded like the real call
    assert plan.hash_key == "user-1"
    assert copy.extensions[RETRY_KEY] is None
    assert transport.mirror_observer is observer
    assert observer.snapshot() == {
        "mirrored": 1,
        "responses": 1,
        "errors": 0,
        "dropped": 0,
        "cancelled": 0,
        "skipped_streaming": 0,
        "primary_responses": 1,
        "primary_errors": 0,
    }
    assert sorted((o.role, o.status, o.subset) for o in outcomes) == [
        ("mirror", 503, "v2"),
        ("primary", 200, "v1"),
    ]
    assert outcomes[0].call_id == outcomes[1].call_id


def test_sync_mirror_never_delays_the_primary() -> None:
    release = threading.Event()
    mirror_started = threading.Event()

    def handler(request: httpx.Request) -> httpx.Response:
        if is_copy(request):
            mirror_started.set()
            assert release.wait(10), "the test never released the mirror"
            return httpx.Response(200)
        return httpx.Response(200, text="primary")

    client, transport = make_sync(handler)
    response = client.get("http://httpbin/get")
    assert response.text == "primary"
    assert mirror_started.wait(10)
    assert transport.mirror_observer.responses == 0  # the copy is still blocked
    release.set()
    client.close()
    assert transport.mirror_observer.responses == 1


def test_sync_mirror_never_fails_the_primary() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if is_copy(request):
            raise httpx.ConnectError("mirror is down")
        return httpx.Response(201)

    client, transport = make_sync(handler)
    assert client.post("http://httpbin/post", content=b"x").status_code == 201
    client.close()
    assert (transport.mirror_observer.errors, transport.mirror_observer.primary_responses) == (1, 1)


def test_sync_streaming_bodies_are_not_mirrored() -> None:
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(200, content=request.read())

    def upload() -> Iterator[bytes]:
        yield b"chunk-1,"
        yield b"chunk-2"

    client, transport = make_sync(handler)
    request = client.build_request("POST", "http://httpbin/upload", content=upload())
    response = client.send(request)
    client.close()
    assert response.content == b"chunk-1,chunk-2"
    assert [is_copy(r) for r in calls] == [False]
    assert request.extensions[CALL_KEY].mirrored is None
    assert transport.mirror_observer.skipped_streaming == 1
    assert transport.mirror_observer.mirrored == 0


def test_sync_copies_beyond_the_limit_are_dropped() -> None:
    release = threading.Event()

    def handler(request: httpx.Request) -> httpx.Response:
        if is_copy(request):
            assert release.wait(10)
        return httpx.Response(200)

    client, transport = make_sync(handler, max_pending_mirrors=1, mirror_workers=1)
    first = client.build_request("GET", "http://httpbin/1")
    second = client.build_request("GET", "http://httpbin/2")
    client.send(first)
    client.send(second)
    release.set()
    client.close()
    assert first.extensions[CALL_KEY].mirrored == "v2"
    assert second.extensions[CALL_KEY].mirrored is None
    observer = transport.mirror_observer
    assert (observer.mirrored, observer.dropped, observer.responses) == (1, 1, 1)
    assert observer.primary_responses == 1  # only mirrored calls report their primary


def test_sync_close_waits_for_accepted_copies_then_closes_inner() -> None:
    release = threading.Event()
    started = threading.Event()
    seen_at_close: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if is_copy(request):
            started.set()
            assert release.wait(10)
        return httpx.Response(200)

    class Inner(httpx.MockTransport):
        def close(self) -> None:
            seen_at_close.append(observer.responses)

    observer = MirrorObserver()
    transport = RoutingTransport(
        Inner(handler),
        routes=RouteTable.from_yaml(MIRROR_ALL),
        resolver=REGISTRY,
        mirror_observer=observer,
        mirror_workers=1,
    )
    client = httpx.Client(transport=transport)
    for _ in range(3):  # one copy runs (blocked), two wait in the queue
        client.get("http://httpbin/")
    assert started.wait(10)
    unblock = threading.Timer(0.05, release.set)  # frees the copy while close() waits
    unblock.start()
    client.close()
    unblock.join()
    assert seen_at_close == [3]  # every accepted copy finished before inner was closed
    assert (observer.mirrored, observer.responses, observer.cancelled) == (3, 3, 0)
    # After close, copies are dropped; calls still go through.
    assert transport.handle_request(httpx.Request("GET", "http://httpbin/")).status_code == 200
    assert observer.dropped == 1


def test_mirror_percentage_holds() -> None:
    copies = 0
    primaries = 0
    lock = threading.Lock()

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal copies, primaries
        with lock:
            if is_copy(request):
                copies += 1
            else:
                primaries += 1
        return httpx.Response(200)

    client, transport = make_sync(
        handler, MIRROR_HALF, rng=random.Random(2024), max_pending_mirrors=10_000
    )
    for _ in range(2_000):
        client.get("http://httpbin/")
    client.close()
    observer = transport.mirror_observer
    assert primaries == 2_000
    assert abs(copies / 2_000 - 0.5) <= 0.03
    assert observer.mirrored == observer.responses == copies


def test_mirror_to_another_service_names_it() -> None:
    plans: list[CallPlan] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if is_copy(request):
            plans.append(request.extensions[CALL_KEY])
        return httpx.Response(200)

    client, _ = make_sync(handler, MIRROR_HALF, rng=random.Random(1))
    requests = [client.build_request("GET", "http://httpbin/") for _ in range(10)]
    for request in requests:
        client.send(request)
    client.close()
    mirrored = [r.extensions[CALL_KEY].mirrored for r in requests]
    assert set(mirrored) == {None, "httpbin-shadow-service"}
    assert {(p.destination, p.subset) for p in plans} == {("httpbin-shadow-service", None)}
    assert len(plans) == mirrored.count("httpbin-shadow-service")


# --- through the async transport -------------------------------------------------------------


def make_async(
    handler: Callable[[httpx.Request], Any], text: str = MIRROR_ALL, **kw: Any
) -> tuple[httpx.AsyncClient, AsyncRoutingTransport]:
    transport = AsyncRoutingTransport(
        httpx.MockTransport(handler),
        routes=RouteTable.from_yaml(text),
        resolver=REGISTRY,
        rng=kw.pop("rng", random.Random(5)),
        **kw,
    )
    return httpx.AsyncClient(transport=transport), transport


async def settle(transport: AsyncRoutingTransport) -> None:
    while transport.pending_mirrors:
        await asyncio.sleep(0)


async def test_async_mirror_never_delays_the_primary() -> None:
    release = asyncio.Event()
    order: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        if is_copy(request):
            await release.wait()
            order.append("mirror")
            return httpx.Response(200)
        order.append("primary")
        return httpx.Response(200, text="primary")

    client, transport = make_async(handler)
    async with client:
        response = await client.get("http://httpbin/get")
        assert response.text == "primary"
        assert transport.pending_mirrors == 1
        assert transport.mirror_observer.responses == 0
        release.set()
        await settle(transport)
    assert order == ["primary", "mirror"]
    assert transport.mirror_observer.responses == 1


async def test_async_mirror_never_fails_the_primary() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        if is_copy(request):
            raise RuntimeError("mirror handler bug")
        return httpx.Response(200)

    client, transport = make_async(handler)
    async with client:
        assert (await client.get("http://httpbin/")).status_code == 200
        await settle(transport)
    observer = transport.mirror_observer
    assert (observer.mirrored, observer.errors, observer.primary_responses) == (1, 1, 1)


async def test_async_streaming_bodies_are_not_mirrored() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        assert not is_copy(request)
        return httpx.Response(200, content=await request.aread())

    async def upload() -> AsyncIterator[bytes]:
        yield b"a"
        yield b"b"

    client, transport = make_async(handler)
    async with client:
        response = await client.post("http://httpbin/", content=upload())
    assert response.content == b"ab"
    assert transport.mirror_observer.skipped_streaming == 1


async def test_async_aclose_cancels_copies_in_flight() -> None:
    never = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        if is_copy(request):
            await never.wait()
        return httpx.Response(200)

    client, transport = make_async(handler)
    await client.get("http://httpbin/")
    await asyncio.sleep(0)  # let the copy start and block
    assert transport.pending_mirrors == 1
    await client.aclose()
    assert transport.pending_mirrors == 0
    assert transport.mirror_observer.cancelled == 1
    await client.aclose()  # closing twice is harmless


async def test_async_a_copy_answered_before_aclose_is_a_response_not_a_cancellation() -> None:
    never = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        await never.wait()  # the mirror's body never finishes arriving
        yield b""

    async def handler(request: httpx.Request) -> httpx.Response:
        if is_copy(request):
            return httpx.Response(200, content=body())
        return httpx.Response(200)

    client, transport = make_async(handler)
    await client.get("http://httpbin/")
    for _ in range(5):  # let the copy get its response and start reading the body
        await asyncio.sleep(0)
    assert transport.mirror_observer.responses == 1
    await client.aclose()
    observer = transport.mirror_observer
    assert (observer.mirrored, observer.responses, observer.cancelled) == (1, 1, 0)
    assert transport.pending_mirrors == 0


async def test_async_copies_beyond_the_limit_are_dropped() -> None:
    never = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        if is_copy(request):
            await never.wait()
        return httpx.Response(200)

    client, transport = make_async(handler, max_pending_mirrors=2)
    async with client:
        for _ in range(5):
            await client.get("http://httpbin/")
    observer = transport.mirror_observer
    assert (observer.mirrored, observer.dropped, observer.cancelled) == (2, 3, 2)


async def test_async_mirror_percentage_holds() -> None:
    copies = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal copies
        copies += is_copy(request)
        return httpx.Response(200)

    client, transport = make_async(
        handler, MIRROR_HALF, rng=random.Random(77), max_pending_mirrors=10_000
    )
    async with client:
        for _ in range(2_000):
            await client.get("http://httpbin/")
        await settle(transport)
    assert abs(copies / 2_000 - 0.5) <= 0.03
    assert transport.mirror_observer.responses == copies
