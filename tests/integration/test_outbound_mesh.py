"""The outbound client end to end, on real ``meshware serve`` (uvicorn) processes under STRICT
mTLS with certificates from a :class:`~meshware.identity.ca.LocalCA`.

The services are those of :mod:`tests.integration.apps`; the client is meshware's own
(``mesh_client`` / ``mesh_sync_client`` with ``cert_dir``), finding the instances through a
:class:`~meshware.outbound.discovery.StaticRegistry` of their ports with ``version`` labels.
Every instance appends each request it executes to a log file, so the tests count at the
servers — by ``x-request-id`` — what was executed, even on an instance they killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshware.outbound.call import TIMEOUT_KEY
from meshware.outbound.client import OutboundConfig, mesh_client, mesh_sync_client
from meshware.outbound.deadline import Deadline, deadline_scope, parse_timeout
from meshware.outbound.destination import DestinationRule
from meshware.outbound.discovery import EnvResolver
from meshware.outbound.errors import DeadlineExceeded
from meshware.outbound.mirror import MirrorObserver
from meshware.outbound.routing import RouteTable
from meshware.telemetry.metrics import MeshMetrics
from tests.reliability.mesh_instances import Instance, executed, registry, samples, start
from tests.servers import issue_pki, kill_server

pytestmark = pytest.mark.integration

MIDDLE = "tests.integration.apps:middle"
SERVICES = ("frontend", "catalog", "hop-a", "hop-b", "hop-c")

SUBSETS = DestinationRule.from_mapping(
    {
        "host": "catalog",
        "subsets": [
            {"name": "v1", "labels": {"version": "v1"}},
            {"name": "v2", "labels": {"version": "v2"}},
        ],
    }
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return issue_pki(tmp_path_factory.mktemp("pki"), *SERVICES)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def served_pid(instance: Instance) -> int:
    """The process id of ``instance``, as its requests report it."""
    (pid,) = {entry["pid"] for entry in instance.requests()}
    return int(pid)


@pytest.fixture(scope="module")
def catalog(pki: Path) -> Iterator[tuple[Instance, Instance, Instance]]:
    """catalog: c1 and c2 are v1, c3 is v2."""
    with contextlib.ExitStack() as stack:
        yield (
            start(stack, pki, "catalog", "c1", version="v1"),
            start(stack, pki, "catalog", "c2", version="v1"),
            start(stack, pki, "catalog", "c3", version="v2"),
        )


# --- 1. outlier ejection of a killed instance --------------------------------------------------


async def test_a_killed_instance_is_ejected_and_no_call_fails(pki: Path) -> None:
    rule = DestinationRule.from_mapping(
        {
            "host": "catalog",
            "trafficPolicy": {
                "outlierDetection": {
                    # A connect failure counts as a 503, a gateway error (local-origin
                    # errors are not split off): the first one ejects the dead endpoint.
                    "consecutiveGatewayErrors": 1,
                    "consecutive5xxErrors": 2,
                    "interval": "1s",
                    "baseEjectionTime": "30s",
                    # Envoy's default of 10 % allows 0.3 of three endpoints to be ejected,
                    # which rounds down to none: it would never eject one of three.
                    "maxEjectionPercent": 100,
                }
            },
        }
    )
    metrics = MeshMetrics()
    with contextlib.ExitStack() as stack:
        instances = [start(stack, pki, "catalog", f"e{n}") for n in (1, 2, 3)]
        victim = instances[1]
        config = OutboundConfig(
            service="frontend",
            cert_dir=pki,
            resolver=registry(instances),
            destinations=(rule,),
            metrics=metrics,
        )
        served: list[str] = []
        statuses: list[int] = []
        # A clock that stands still: the 30 s ejection outlasts the test however slow the
        # machine. Nothing else here needs time to pass: there is no deadline, and the retry
        # budget's 20 % of the calls made leaves room for the one retry.
        frozen = FakeClock()
        async with mesh_client(config, rng=random.Random(7), clock=frozen) as client:
            for n in range(300):
                if n == 100:
                    # Between two calls: a call in flight at the kill could have been executed
                    # before its connection was reset; it is not retried (the default retryOn
                    # has no "reset"), so it would show up as a failure, never as a repeat.
                    kill_server(served_pid(victim), victim.port)
                response = await client.get(
                    "http://catalog/items", headers={"x-request-id": f"eject-{n}"}
                )
                statuses.append(response.status_code)
                served.append(response.json()["instance"])

    assert statuses == [200] * 300  # zero failed calls at the client
    assert set(served[:100]) == {"e1", "e2", "e3"}
    assert set(served[100:]) == {"e1", "e3"}
    # Each request executed exactly once, counted at the servers (the killed one included).
    counts = executed(instances, "eject-")
    assert counts == Counter({f"eject-{n}": 1 for n in range(300)})
    assert all(int(line["request_id"][6:]) < 100 for line in victim.requests("eject-"))
    # One connect failure reached the dead endpoint: it was retried and ejected, and no
    # attempt went there again.
    retries = samples(metrics, "meshware_outbound_retries_total")
    assert [(dict(k)["condition"], v) for k, v in retries.items()] == [("connect-failure", 1.0)]
    ejections = samples(metrics, "meshware_outbound_outlier_ejections_total")
    assert [(dict(k)["reason"], v) for k, v in ejections.items()] == [
        ("consecutive-gateway-errors", 1.0)
    ]


# --- 2. canary by weight and by header ----------------------------------------------------------

CANARY = RouteTable.from_yaml(
    """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: catalog}
spec:
  hosts: [catalog]
  http:
  - name: test-user
    match:
    - headers:
        x-test-user: {exact: "true"}
    route:
    - destination: {host: catalog, subset: v2}
  - name: canary
    route:
    - destination: {host: catalog, subset: v1}
      weight: 90
    - destination: {host: catalog, subset: v2}
      weight: 10
"""
)


async def test_canary_weights_and_header_routing(
    pki: Path, catalog: tuple[Instance, Instance, Instance]
) -> None:
    config = OutboundConfig(
        service="frontend",
        cert_dir=pki,
        resolver=registry(catalog),
        routes=CANARY,
        destinations=(SUBSETS,),
    )
    semaphore = asyncio.Semaphore(10)
    async with mesh_client(config, rng=random.Random(2024)) as client:

        async def call(n: int, **headers: str) -> dict[str, Any]:
            async with semaphore:
                response = await client.get(
                    "http://catalog/items", headers={"x-request-id": f"canary-{n}", **headers}
                )
                assert response.status_code == 200
                return response.json()  # type: ignore[no-any-return]

        answers = await asyncio.gather(*(call(n) for n in range(2000)))
        tester = await asyncio.gather(
            *(call(n, **{"x-test-user": "true"}) for n in range(2000, 2050))
        )

    instances = Counter(answer["instance"] for answer in answers)
    versions = Counter(answer["version"] for answer in answers)
    # Binomial(2000, 0.1): one standard deviation is 0.67 points; 3 points is 4.5 of them.
    assert abs(versions["v2"] / 2000 - 0.10) <= 0.03
    assert versions["v1"] + versions["v2"] == 2000
    assert instances["c3"] == versions["v2"]  # v2 is c3 alone; v1 is c1 and c2, round robin
    assert abs(instances["c1"] - instances["c2"]) <= 1
    assert {answer["instance"] for answer in tester} == {"c3"}
    assert executed(catalog, "canary-") == Counter({f"canary-{n}": 1 for n in range(2050)})


# --- 3. mirroring -------------------------------------------------------------------------------

MIRROR = RouteTable.from_yaml(
    """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: catalog}
spec:
  hosts: [catalog]
  http:
  - name: shadow
    route:
    - destination: {host: catalog, subset: v1}
    mirror: {host: catalog, subset: v2}
    mirrorPercentage: {value: 50.0}
"""
)
MIRROR_DELAY = 2.0  # v2 answers after this long: a primary that waited for it would show it


async def test_mirroring_copies_half_the_calls_without_delaying_them(pki: Path) -> None:
    observer = MirrorObserver()
    with contextlib.ExitStack() as stack:
        v1 = start(stack, pki, "catalog", "m1", version="v1")
        v2 = start(
            stack, pki, "catalog", "m2", version="v2", env={"MESH_TEST_DELAY": str(MIRROR_DELAY)}
        )
        config = OutboundConfig(
            service="frontend",
            cert_dir=pki,
            resolver=registry([v1, v2]),
            routes=MIRROR,
            destinations=(SUBSETS,),
            mirror_observer=observer,
        )
        answers: list[dict[str, Any]] = []
        latencies: list[float] = []
        async with mesh_client(config, rng=random.Random(11)) as client:

            async def call(n: int) -> None:
                async with semaphore:
                    started = time.perf_counter()
                    response = await client.get(
                        "http://catalog/items", headers={"x-request-id": f"mirror-{n}"}
                    )
                    latencies.append(time.perf_counter() - started)
                    assert response.status_code == 200
                    answers.append(response.json())

            semaphore = asyncio.Semaphore(5)
            # Batches of 50, each waited out, keep the copies in flight under the client's
            # limit of 64 (beyond it they would be dropped, not delayed).
            for batch in range(8):
                await asyncio.gather(*(call(n) for n in range(batch * 50, batch * 50 + 50)))
                await until(lambda: settled(observer), timeout=60)
        shadowed = v2.requests("mirror-")

    assert {answer["instance"] for answer in answers} == {"m1"}  # only v1 answers
    assert executed([v1], "mirror-") == Counter({f"mirror-{n}": 1 for n in range(400)})
    # Binomial(400, 0.5): one standard deviation is 10 copies; 50 is five of them.
    assert 150 <= len(shadowed) <= 250
    assert observer.snapshot() == {
        "mirrored": len(shadowed),
        "responses": len(shadowed),
        "errors": 0,
        "dropped": 0,
        "cancelled": 0,
        "skipped_streaming": 0,
        "primary_responses": len(shadowed),
        "primary_errors": 0,
    }
    assert {line["host"] for line in shadowed} == {"catalog-shadow"}
    assert len({line["request_id"] for line in shadowed}) == len(shadowed)
    assert {line["host"] for line in v1.requests("mirror-")} == {"catalog"}
    # No primary waited for its copy: each took less than the copy's answer alone.
    assert max(latencies) < MIRROR_DELAY


def settled(observer: MirrorObserver) -> bool:
    counts = observer.snapshot()
    return counts["responses"] + counts["errors"] + counts["cancelled"] == counts["mirrored"]


async def until(condition: Any, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.02)


# --- 4. a deadline two hops down ----------------------------------------------------------------


@pytest.fixture(scope="module")
def chain(pki: Path) -> Iterator[tuple[Instance, Instance, Instance]]:
    """hop-a (middle) -> hop-b (middle) -> hop-c (backend)."""
    with contextlib.ExitStack() as stack:
        c = start(stack, pki, "hop-c", "hop-c")
        b = start(
            stack,
            pki,
            "hop-b",
            "hop-b",
            app=MIDDLE,
            env={
                "MESH_TEST_NEXT": "hop-c",
                "MESH_TEST_CERT_DIR": str(pki),
                EnvResolver.variable_name("hop-c"): f"127.0.0.1:{c.port}",
            },
        )
        a = start(
            stack,
            pki,
            "hop-a",
            "hop-a",
            app=MIDDLE,
            env={
                "MESH_TEST_NEXT": "hop-b",
                "MESH_TEST_CERT_DIR": str(pki),
                EnvResolver.variable_name("hop-b"): f"127.0.0.1:{b.port}",
            },
        )
        yield a, b, c


def edge_config(pki: Path, a: Instance) -> OutboundConfig:
    return OutboundConfig(service="frontend", cert_dir=pki, resolver=registry([a]))


async def test_the_deadline_shrinks_at_every_hop(
    pki: Path, chain: tuple[Instance, Instance, Instance]
) -> None:
    a, _, _ = chain
    async with mesh_client(edge_config(pki, a)) as client:
        response = await client.get(
            "http://hop-a/chain", headers={"x-request-id": "chain-1"}, extensions={TIMEOUT_KEY: 2.0}
        )
    assert response.status_code == 200
    body = response.json()
    hop_b, hop_c = body["next"], body["next"]["next"]
    assert [body["service"], hop_b["service"], hop_c["service"]] == ["hop-a", "hop-b", "hop-c"]
    seen = [parse_timeout(hop["timeout"]) for hop in (body, hop_b, hop_c)]
    assert 2.0 >= seen[0] > seen[1] > seen[2] > 0.0
    assert hop_c["request_id"] == "chain-1"  # the request id travels with the deadline


async def test_a_spent_deadline_fails_fast_without_reaching_the_server(
    pki: Path, chain: tuple[Instance, Instance, Instance]
) -> None:
    a, b, _ = chain
    async with mesh_client(edge_config(pki, a)) as client:
        spent = Deadline(at=time.monotonic() - 0.001)
        with deadline_scope(spent), pytest.raises(DeadlineExceeded) as info:
            await client.get("http://hop-a/chain", headers={"x-request-id": "spent-edge"})
        # hop-a gets 300 ms and spends 500 ms before calling hop-b: its own client refuses.
        response = await client.get(
            "http://hop-a/chain?spend=0.5",
            headers={"x-request-id": "spent-hop", "x-meshware-timeout": "300m"},
        )
    assert info.value.destination == "hop-a"
    assert str(info.value).startswith("hop-a: ")
    assert a.requests("spent-edge") == []
    assert response.status_code == 504
    assert response.json() == {
        "service": "hop-a",
        "instance": "hop-a",
        "timeout": "300m",
        "error": "DeadlineExceeded",
        "destination": "hop-b",
    }
    assert [line["request_id"] for line in a.requests("spent-hop")] == ["spent-hop"]
    assert b.requests("spent-") == []


# --- 5. the sync client -------------------------------------------------------------------------


def test_sync_client_round_robin_and_safe_retries(
    pki: Path, catalog: tuple[Instance, Instance, Instance]
) -> None:
    config = OutboundConfig(service="frontend", cert_dir=pki, resolver=registry(catalog))
    with mesh_sync_client(config, rng=random.Random(5)) as client:
        order = [
            client.get("http://catalog/items", headers={"x-request-id": f"sync-rr-{n}"}).json()[
                "instance"
            ]
            for n in range(9)
        ]
        post = client.post(
            "http://catalog/orders?status=503",
            json={"item": 1},
            headers={"x-request-id": "sync-post"},
        )
        get = client.get("http://catalog/items?status=503", headers={"x-request-id": "sync-get"})

    assert sorted(order[:3]) == ["c1", "c2", "c3"]
    assert order == order[:3] * 3
    assert post.status_code == 503
    assert get.status_code == 503
    counts = executed(catalog, "sync-")
    assert counts["sync-post"] == 1  # a POST is not repeated after a 503
    assert counts["sync-get"] == 3  # a GET is: the default policy's two retries
    tried = [line["instance"] for i in catalog for line in i.requests("sync-get")]
    assert sorted(tried) == ["c1", "c2", "c3"]  # each retry went to another instance
