"""A DestinationRule's ``connectionPool.http.maxRequestsPerConnection`` and ``idleTimeout``,
applied by the connection layer: the mesh client (sync and async) against real ``meshware
serve`` (uvicorn) processes, one in plaintext and one under STRICT mTLS with LocalCA
certificates. The served app (:func:`app`, below) answers each request with the client port of
the TCP connection that carried it, so the tests count connections at the server."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from meshware.introspection import outbound_state_of
from meshware.outbound.call import CALL_KEY, CallPlan
from meshware.outbound.client import OutboundConfig, mesh_client, mesh_sync_client
from meshware.outbound.destination import DestinationRule
from meshware.outbound.discovery import StaticRegistry
from meshware.outbound.endpoints import Endpoint
from meshware.outbound.pool_limits import ConnectionPoolLimits
from meshware.outbound.reloadable import apply_destination_rules
from meshware.outbound.transport_connection import AsyncConnectionTransport, ConnectionTransport
from meshware.outbound.transports import OutboundState
from meshware.telemetry.metrics import WorkloadInfo
from tests.servers import answer_lifespan, issue_pki, meshware_serve

pytestmark = pytest.mark.integration

APP = "tests.outbound.test_connection_reuse:app"
PAYMENTS_ID = "spiffe://cluster.local/ns/default/sa/payments"
#: Longer than every idle timeout below, far shorter than the server's own (uvicorn: 5 s).
IDLE_WAIT = 0.6


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers with the client port of the request's connection (served, not called here)."""
    if scope["type"] == "lifespan":
        await answer_lifespan(receive, send)
        return
    body = str(scope["client"][1]).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


@dataclass(frozen=True)
class Servers:
    cert_dir: Path
    ports: Mapping[str, int]  # by kind: "plaintext", "mtls"


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    cert_dir = issue_pki(tmp_path_factory.mktemp("pki"), "orders", "payments")
    quiet = ["--no-access-log"]
    with (
        meshware_serve(
            APP, service="payments", cert_dir=cert_dir, args=[*quiet, "--mtls", "disable"]
        ) as plaintext,
        meshware_serve(APP, service="payments", cert_dir=cert_dir, args=quiet) as mtls,
    ):
        yield Servers(cert_dir, {"plaintext": plaintext, "mtls": mtls})


def config(servers: Servers, kind: str, **http: Any) -> OutboundConfig:
    """``payments`` (its rule's ``connectionPool.http`` is ``http``, if any) and ``ledger``
    (no rule), both served by the ``kind`` server."""
    endpoint = Endpoint("127.0.0.1", servers.ports[kind])
    rules = []
    if http:
        rules.append(
            DestinationRule.from_mapping(
                {"host": "payments", "trafficPolicy": {"connectionPool": {"http": http}}}
            )
        )
    return OutboundConfig(
        service="orders",
        cert_dir=servers.cert_dir if kind == "mtls" else None,
        resolver=StaticRegistry({"payments": [endpoint], "ledger": [endpoint]}),
        destinations=rules,
        server_ids={"ledger": PAYMENTS_ID},  # the same server stands in for both
    )


def sync_ports(client: Any, count: int, host: str = "payments") -> list[int]:
    ports = []
    for _ in range(count):
        response = client.get(f"http://{host}/")
        assert response.status_code == 200
        ports.append(int(response.text))
    return ports


async def async_ports(client: Any, count: int, host: str = "payments") -> list[int]:
    ports = []
    for _ in range(count):
        response = await client.get(f"http://{host}/")
        assert response.status_code == 200
        ports.append(int(response.text))
    return ports


def ports_of(config: OutboundConfig, flavour: str, count: int, host: str = "payments") -> list[int]:
    """The client ports of ``count`` sequential calls from a new sync or async client."""
    if flavour == "sync":
        with mesh_sync_client(config) as client:
            return sync_ports(client, count, host)

    async def run() -> list[int]:
        async with mesh_client(config) as client:
            return await async_ports(client, count, host)

    return asyncio.run(run())


def runs(ports: list[int]) -> list[int]:
    """The lengths of the runs of one port: the requests each connection carried in turn."""
    return [len(list(group)) for _, group in itertools.groupby(ports)]


KINDS = pytest.mark.parametrize("kind", ["plaintext", "mtls"])
FLAVOURS = pytest.mark.parametrize("flavour", ["sync", "async"])


@KINDS
@FLAVOURS
@pytest.mark.parametrize(
    ("http", "calls", "carried"),
    [
        ({}, 6, [6]),  # no limit: one connection for every call
        ({"maxRequestsPerConnection": 3}, 9, [3, 3, 3]),
        ({"maxRequestsPerConnection": 1}, 4, [1, 1, 1, 1]),  # keep-alive off
    ],
    ids=["unset", "3", "1"],
)
def test_each_connection_carries_at_most_max_requests_per_connection(
    servers: Servers, kind: str, flavour: str, http: dict[str, Any], calls: int, carried: list[int]
) -> None:
    ports = ports_of(config(servers, kind, **http), flavour, calls)
    assert runs(ports) == carried
    assert len(set(ports)) == len(carried)  # no connection is used again after its run


@KINDS
def test_the_limit_applies_to_its_destination_only(servers: Servers, kind: str) -> None:
    with mesh_sync_client(config(servers, kind, maxRequestsPerConnection=2)) as client:
        ports = sync_ports(client, 6)
        ledger = sync_ports(client, 5, "ledger")
    assert runs(ports) == [2, 2, 2]
    assert runs(ledger) == [5]
    assert not set(ledger) & set(ports)


@KINDS
def test_an_idle_connection_is_not_reused_after_the_idle_timeout(
    servers: Servers, kind: str
) -> None:
    async def scenario() -> list[list[int]]:
        idle = config(servers, kind, idleTimeout="200ms")
        plain = config(servers, kind)
        with mesh_sync_client(idle) as sync_idle, mesh_sync_client(plain) as sync_plain:
            async with mesh_client(idle) as async_idle, mesh_client(plain) as async_plain:
                ports = [
                    sync_ports(sync_idle, 1),
                    sync_ports(sync_plain, 1),
                    await async_ports(async_idle, 1),
                    await async_ports(async_plain, 1),
                ]
                time.sleep(IDLE_WAIT)  # every client waits at once; the loop has no other work
                ports[0] += sync_ports(sync_idle, 1)
                ports[1] += sync_ports(sync_plain, 1)
                ports[2] += await async_ports(async_idle, 1)
                ports[3] += await async_ports(async_plain, 1)
        return ports

    sync_idle, sync_plain, async_idle, async_plain = asyncio.run(scenario())
    # Idle longer than idleTimeout: closed, and the next call opens a new connection ...
    assert runs(sync_idle) == [1, 1]
    assert runs(async_idle) == [1, 1]
    # ... while without it (the transport's keep-alive expiry, 5 s) the same wait keeps it.
    assert runs(sync_plain) == [2]
    assert runs(async_plain) == [2]


@KINDS
def test_a_reloaded_rule_applies_to_the_next_calls(servers: Servers, kind: str) -> None:
    with mesh_sync_client(config(servers, kind)) as client:
        before = sync_ports(client, 3)
        state = outbound_state_of(client)
        assert state is not None
        rule = DestinationRule.from_mapping(
            {
                "host": "payments",
                "trafficPolicy": {"connectionPool": {"http": {"maxRequestsPerConnection": 1}}},
            }
        )
        assert apply_destination_rules(state, [rule]) == ("payments",)
        after = sync_ports(client, 3)
        apply_destination_rules(state, [])
        again = sync_ports(client, 3)
    assert runs(before) == [3]
    assert len(set(after)) == 3
    assert runs(again) == [3]


def test_per_connection_names_the_settings_a_connection_pool_applies() -> None:
    assert ConnectionPoolLimits(max_connections=4).per_connection is None
    assert ConnectionPoolLimits(max_requests_per_connection=3).per_connection == (3, None)
    assert ConnectionPoolLimits(idle_timeout=0.5).per_connection == (None, 0.5)
    assert ConnectionPoolLimits(max_requests_per_connection=0).per_connection is None


async def test_async_plaintext_mesh_calls_use_meshware_pools(servers: Servers) -> None:
    # Plaintext mesh calls of the async client go through the connection layer's own pool,
    # whose connections answer httpcore's idle check by polling their socket.
    port = servers.ports["plaintext"]
    transport = AsyncConnectionTransport(
        workload=WorkloadInfo(service="orders"), state=OutboundState()
    )
    ports = []
    for _ in range(3):
        request = httpx.Request(
            "GET",
            f"http://127.0.0.1:{port}/",
            headers={"host": "payments"},
            extensions={CALL_KEY: CallPlan(destination="payments")},
        )
        response = await transport.handle_async_request(request)
        await response.aread()
        ports.append(int(response.content))
    assert len(set(ports)) == 1  # one kept-alive connection
    (pool,) = (entry.pool for entry in transport._core.pools.values())
    (connection,) = pool.connections
    stream = connection._connection._network_stream  # type: ignore[attr-defined]
    assert "get_extra_info" in vars(stream)
    await transport.aclose()


def test_only_the_async_layer_pools_plaintext_calls_by_default() -> None:
    assert AsyncConnectionTransport(
        workload=WorkloadInfo(service="orders"), state=OutboundState()
    )._core.pool_plaintext
    assert not ConnectionTransport(
        workload=WorkloadInfo(service="orders"), state=OutboundState()
    )._core.pool_plaintext
    # A passthrough of the caller's own sends every plaintext call.
    assert not AsyncConnectionTransport(
        workload=WorkloadInfo(service="orders"),
        state=OutboundState(),
        passthrough=httpx.AsyncHTTPTransport(),
    )._core.pool_plaintext
