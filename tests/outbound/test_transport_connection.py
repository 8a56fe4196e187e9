"""The connection layer against real TLS servers on 127.0.0.1 with LocalCA certificates:
server identity checked before the request is sent, client certificate rotation, plaintext
mode; and the whole outbound stack end to end."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import random
import ssl
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpcore
import httpx
import pytest
from cryptography import x509
from opentelemetry.sdk.trace import TracerProvider

from meshware.exceptions import ConfigurationError
from meshware.identity.bundle import spiffe_id_of
from meshware.identity.ca import LocalCA, ServicePaths
from meshware.outbound.call import CALL_KEY, CallPlan
from meshware.outbound.deadline import Deadline, deadline_scope
from meshware.outbound.destination import ClientTLSSettings
from meshware.outbound.discovery import StaticRegistry
from meshware.outbound.endpoints import Endpoint
from meshware.outbound.errors import OutboundError
from meshware.outbound.retry import RetryPolicy
from meshware.outbound.transport_balancing import AsyncBalancingTransport, BalancingTransport
from meshware.outbound.transport_breaker import AsyncBreakerTransport, BreakerTransport
from meshware.outbound.transport_connection import (
    AsyncConnectionTransport,
    ConnectionTransport,
    WrongServerIdentity,
    _answer_readable_directly,
)
from meshware.outbound.transport_deadline import AsyncDeadlineTransport, DeadlineTransport
from meshware.outbound.transport_retry import AsyncRetryTransport, RetryTransport
from meshware.outbound.transport_telemetry import AsyncTelemetryTransport, TelemetryTransport
from meshware.outbound.transports import SERVER_IDENTITY_KEY, TLS_KEY, OutboundState
from meshware.telemetry.context import request_id_scope
from meshware.telemetry.metrics import MeshMetrics, WorkloadInfo

pytestmark = pytest.mark.integration

ORDERS = WorkloadInfo(service="orders")
PAYMENTS_ID = "spiffe://cluster.local/ns/default/sa/payments"
INVENTORY_ID = "spiffe://cluster.local/ns/default/sa/inventory"


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Seen:
    """What the server's application saw: one entry per request it handled."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _TlsServer

    def setup(self) -> None:
        super().setup()
        self.peer = self.connection.getpeercert(True)

    def do_GET(self) -> None:
        peer = x509.load_der_x509_certificate(self.peer) if self.peer else None
        with self.server.seen.lock:
            self.server.seen.requests.append(
                {
                    "path": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "peer": None if peer is None else spiffe_id_of(peer).uri,
                    "serial": None if peer is None else peer.serial_number,
                    "connection": id(self.connection),
                }
            )
        body = b"paid"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        if self.path == "/close":
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _TlsServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, context: ssl.SSLContext) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.context = context
        self.seen = Seen()
        self.errors: list[BaseException] = []

    def get_request(self) -> tuple[Any, Any]:
        sock, address = self.socket.accept()
        return self.context.wrap_socket(sock, server_side=True), address

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.errors.append(sys.exc_info()[1] or RuntimeError("unknown"))


@pytest.fixture
def ca(tmp_path: Path) -> LocalCA:
    return LocalCA.init(tmp_path / "certs")


@pytest.fixture
def serve(ca: LocalCA) -> Iterator[Any]:
    servers: list[tuple[_TlsServer, threading.Thread]] = []

    def start(service: str, *, client_cert: bool = True) -> tuple[int, Seen]:
        paths = ca.issue(service)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(paths.bundle))
        context.load_cert_chain(paths.cert, paths.key)
        context.verify_mode = ssl.CERT_REQUIRED if client_cert else ssl.CERT_NONE
        server = _TlsServer(context)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        thread.start()
        servers.append((server, thread))
        return server.server_address[1], server.seen

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join()


def mesh_request(port: int, destination: str = "payments", path: str = "/charge") -> httpx.Request:
    return httpx.Request(
        "GET",
        f"https://127.0.0.1:{port}{path}",
        headers={"host": destination},
        extensions={CALL_KEY: CallPlan(destination=destination)},
    )


# --- server identity -------------------------------------------------------------------------


def test_mtls_call_to_the_service_meant(ca: LocalCA, serve: Any) -> None:
    ca.issue("orders")
    port, seen = serve("payments")
    transport = ConnectionTransport(workload=ORDERS, cert_dir=ca.directory)
    try:
        response = transport.handle_request(mesh_request(port))
        response.read()
    finally:
        transport.close()
    assert response.status_code == 200
    assert response.text == "paid"
    assert response.extensions[SERVER_IDENTITY_KEY] == PAYMENTS_ID
    (request,) = seen.requests
    assert request["peer"] == "spiffe://cluster.local/ns/default/sa/orders"
    assert request["headers"]["host"] == "payments"


def test_a_server_with_another_identity_is_refused_before_anything_is_sent(
    ca: LocalCA, serve: Any
) -> None:
    ca.issue("orders")
    port, seen = serve("inventory")  # listening where "payments" was expected
    transport = ConnectionTransport(workload=ORDERS, cert_dir=ca.directory)
    request = mesh_request(port)
    try:
        with pytest.raises(WrongServerIdentity) as info:
            transport.handle_request(request)
    finally:
        transport.close()
    error = info.value
    assert (error.expected, error.actual, error.reason) == (
        (PAYMENTS_ID,),
        INVENTORY_ID,
        "wrong-server",
    )
    assert str(error) == (
        f"payments: the server is {INVENTORY_ID}, not {PAYMENTS_ID}; nothing was sent"
    )
    assert isinstance(error, httpx.ConnectError)
    assert isinstance(error, OutboundError)
    assert error.request is request
    assert seen.requests == []


async def test_a_server_with_another_identity_is_refused_async(ca: LocalCA, serve: Any) -> None:
    ca.issue("orders")
    port, seen = serve("inventory")
    transport = AsyncConnectionTransport(workload=ORDERS, cert_dir=ca.directory)
    try:
        with pytest.raises(WrongServerIdentity) as info:
            await transport.handle_async_request(mesh_request(port))
        assert info.value.actual == INVENTORY_ID
        response = await transport.handle_async_request(mesh_request(port, "inventory"))
        await response.aread()
        assert response.extensions[SERVER_IDENTITY_KEY] == INVENTORY_ID
    finally:
        await transport.aclose()
    assert [r["path"] for r in seen.requests] == ["/charge"]


def test_a_pooled_connection_is_not_reused_for_another_destination(ca: LocalCA, serve: Any) -> None:
    ca.issue("orders")
    port, seen = serve("inventory")
    transport = ConnectionTransport(workload=ORDERS, cert_dir=ca.directory)
    try:
        ok = transport.handle_request(mesh_request(port, "inventory"))
        ok.read()
        # Same address and port, but a call meant for payments: a fresh, checked connection.
        with pytest.raises(WrongServerIdentity):
            transport.handle_request(mesh_request(port, "payments"))
    finally:
        transport.close()
    assert len(seen.requests) == 1


def test_expected_ids_can_be_overridden(ca: LocalCA, serve: Any) -> None:
    ca.issue("orders")
    port, _ = serve("inventory")
    transport = ConnectionTransport(
        workload=ORDERS,
        cert_dir=ca.directory,
        server_ids={"payments": [PAYMENTS_ID, INVENTORY_ID]},
    )
    try:
        response = transport.handle_request(mesh_request(port))
        response.read()
        assert response.extensions[SERVER_IDENTITY_KEY] == INVENTORY_ID
        # The rule's subjectAltNames win over both.
        request = mesh_request(port)
        request.extensions[TLS_KEY] = ClientTLSSettings(
            mode="ISTIO_MUTUAL", subject_alt_names=("spiffe://cluster.local/ns/x/sa/y",)
        )
        with pytest.raises(WrongServerIdentity) as info:
            transport.handle_request(request)
        assert info.value.expected == ("spiffe://cluster.local/ns/x/sa/y",)
    finally:
        transport.close()


def test_namespaced_destinations_expect_their_namespace(ca: LocalCA, serve: Any) -> None:
    ca.issue("orders")
    port, _ = serve("payments")  # in namespace default
    transport = ConnectionTransport(workload=ORDERS, cert_dir=ca.directory)
    try:
        with pytest.raises(WrongServerIdentity) as info:
            transport.handle_request(mesh_request(port, "payments.billing"))
    finally:
        transport.close()
    assert info.value.expected == ("spiffe://cluster.local/ns/billing/sa/payments",)


def test_a_server_from_an_untrusted_ca_fails_the_handshake(
    ca: LocalCA, serve: Any, tmp_path: Path
) -> None:
    rogue = LocalCA.init(tmp_path / "rogue")
    port, seen = serve("payments")
    # The client trusts only the rogue CA's bundle: the server's chain cannot verify.
    client_paths = rogue.issue("orders")
    transport = ConnectionTransport(workload=ORDERS, paths=client_paths)
    try:
        with pytest.raises(httpx.ConnectError) as info:
            transport.handle_request(mesh_request(port))
    finally:
        transport.close()
    assert "certificate verify failed" in str(info.value)
    assert seen.requests == []


def test_simple_tls_presents_no_client_certificate(ca: LocalCA, serve: Any) -> None:
    ca.issue("orders")
    port, seen = serve("payments", client_cert=False)
    transport = ConnectionTransport(workload=ORDERS, cert_dir=ca.directory)
    request = mesh_request(port)
    request.extensions[TLS_KEY] = ClientTLSSettings(mode="SIMPLE")
    try:
        response = transport.handle_request(request)
        response.read()
    finally:
        transport.close()
    assert response.extensions[SERVER_IDENTITY_KEY] == PAYMENTS_ID
    assert seen.requests[0]["peer"] is None


# --- client certificate rotation ---------------------------------------------------------------


def reissue(ca: LocalCA, service: str) -> ServicePaths:
    paths = ca.issue(service)
    # A later mtime whatever the file system's timestamp resolution.
    later = dt.datetime.now().timestamp() + 60
    for path in (paths.cert, paths.key):
        os.utime(path, (later, later))
    return paths


def test_a_rotated_client_certificate_is_used_by_new_connections(ca: LocalCA, serve: Any) -> None:
    ca.issue("orders")
    port, seen = serve("payments")
    clock = FakeClock()
    transport = ConnectionTransport(workload=ORDERS, cert_dir=ca.directory, clock=clock)
    try:
        first = transport.handle_request(mesh_request(port, path="/one"))
        first.read()
        paths = reissue(ca, "orders")
        new_serial = x509.load_pem_x509_certificate(paths.cert.read_bytes()).serial_number

        # Within the check interval the files are not looked at.
        clock.now += 0.5
        transport.handle_request(mesh_request(port, path="/two")).read()
        assert transport.reloads == 0

        # After it, the new files are loaded; the pooled connection carries on with the old
        # certificate and is then closed by the server ...
        clock.now += 1.0
        transport.handle_request(mesh_request(port, path="/close")).read()
        assert transport.reloads == 1
        # ... so the next call opens a new connection, which presents the new certificate.
        transport.handle_request(mesh_request(port, path="/four")).read()
    finally:
        transport.close()
    old_serial = seen.requests[0]["serial"]
    assert old_serial != new_serial
    assert [(r["path"], r["serial"]) for r in seen.requests] == [
        ("/one", old_serial),
        ("/two", old_serial),
        ("/close", old_serial),
        ("/four", new_serial),
    ]
    assert len({r["connection"] for r in seen.requests[:3]}) == 1


def test_half_written_credentials_keep_the_old_ones(ca: LocalCA, serve: Any) -> None:
    paths = ca.issue("orders")
    port, seen = serve("payments")
    clock = FakeClock()
    transport = ConnectionTransport(workload=ORDERS, cert_dir=ca.directory, clock=clock)
    try:
        other = LocalCA.init(ca.directory.parent / "other").issue("orders")
        paths.key.write_bytes(other.key.read_bytes())  # a key without its certificate
        later = dt.datetime.now().timestamp() + 60
        os.utime(paths.key, (later, later))
        clock.now += 2.0
        response = transport.handle_request(mesh_request(port, path="/close"))
        response.read()
        assert response.status_code == 200
        assert transport.reloads == 0
    finally:
        transport.close()
    assert seen.requests[0]["peer"] == "spiffe://cluster.local/ns/default/sa/orders"


# --- plaintext mode and passthrough ------------------------------------------------------------


def test_plaintext_mode_refuses_tls_mesh_calls_and_passes_the_rest() -> None:
    seen: list[str] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200)

    transport = ConnectionTransport(workload=ORDERS, passthrough=httpx.MockTransport(upstream))
    assert transport.plaintext
    with pytest.raises(ConfigurationError) as info:
        transport.handle_request(mesh_request(8443))
    assert info.value.field == "cert_dir"
    plain = httpx.Request(
        "GET",
        "http://10.0.0.1:8080/charge",
        extensions={CALL_KEY: CallPlan(destination="payments")},
    )
    assert transport.handle_request(plain).status_code == 200
    assert (
        transport.handle_request(httpx.Request("GET", "https://api.example.com/")).status_code
        == 200
    )
    assert seen == ["http://10.0.0.1:8080/charge", "https://api.example.com/"]


def test_constructor_validation(ca: LocalCA, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError) as info:
        ConnectionTransport(workload="orders")  # type: ignore[arg-type]
    assert info.value.field == "workload"
    with pytest.raises(ConfigurationError) as info:
        ConnectionTransport(workload=ORDERS, cert_dir=tmp_path / "nothing-here")
    assert info.value.field == "paths"
    with pytest.raises(ConfigurationError) as info:
        ConnectionTransport(workload=ORDERS, server_ids={"payments": ["payments"]})
    assert info.value.field == "server_ids.payments[0]"
    with pytest.raises(ConfigurationError) as info:
        ConnectionTransport(workload=ORDERS, cert_dir=ca.directory, paths=ca.issue("orders"))
    assert info.value.field == "paths"


# --- the whole stack ---------------------------------------------------------------------------


def test_the_whole_stack_over_mtls(ca: LocalCA, serve: Any) -> None:
    ca.issue("orders")
    port, seen = serve("payments")
    metrics = MeshMetrics()
    recorder = metrics.outbound(ORDERS)
    registry = StaticRegistry({"payments": [Endpoint("127.0.0.1", port, labels={"version": "v1"})]})
    state = OutboundState(recorder=recorder, rng=random.Random(1))
    transport = TelemetryTransport(
        DeadlineTransport(
            RetryTransport(
                BalancingTransport(
                    BreakerTransport(
                        ConnectionTransport(workload=ORDERS, cert_dir=ca.directory),
                        state=state,
                    ),
                    resolver=registry,
                    state=state,
                ),
                policy=RetryPolicy(per_try_timeout=2.0),
                resolver=registry,
                state=state,
            )
        ),
        recorder=recorder,
        tracer_provider=TracerProvider(),
    )
    with (
        httpx.Client(transport=transport) as client,
        request_id_scope("req-1"),
        deadline_scope(Deadline.after(5.0)),
    ):
        response = client.get("http://payments/charge")
    assert (response.status_code, response.text) == (200, "paid")
    assert str(response.request.url) == "http://payments/charge"
    (request,) = seen.requests
    assert request["headers"]["host"] == "payments"
    assert request["headers"]["x-request-id"] == "req-1"
    assert request["headers"]["x-meshware-timeout"].endswith("u")
    assert "traceparent" in request["headers"]
    assert request["peer"] == "spiffe://cluster.local/ns/default/sa/orders"
    values = [
        s for f in metrics.registry.collect() for s in f.samples if s.name == "istio_requests_total"
    ]
    assert [
        (s.labels["destination_principal"], s.labels["destination_version"]) for s in values
    ] == [(PAYMENTS_ID, "v1")]


async def test_the_whole_stack_over_mtls_async(ca: LocalCA, serve: Any) -> None:
    ca.issue("orders")
    port, seen = serve("inventory")
    good_port, good_seen = serve("payments")
    registry = StaticRegistry(
        {"payments": [Endpoint("127.0.0.1", port), Endpoint("127.0.0.1", good_port)]}
    )
    state = OutboundState(rng=random.Random(1))
    transport = AsyncTelemetryTransport(
        AsyncDeadlineTransport(
            AsyncRetryTransport(
                AsyncBalancingTransport(
                    AsyncBreakerTransport(
                        AsyncConnectionTransport(workload=ORDERS, cert_dir=ca.directory),
                        state=state,
                    ),
                    resolver=registry,
                    state=state,
                ),
                resolver=registry,
                state=state,
            )
        )
    )
    async with httpx.AsyncClient(transport=transport) as client:
        # Whichever endpoint comes first, the impostor is refused as a connect failure and
        # the retry goes to the other endpoint.
        for _ in range(2):
            response = await client.get("http://payments/charge")
            assert response.status_code == 200
    assert seen.requests == []
    assert len(good_seen.requests) == 2


async def test_is_readable_is_answered_from_the_socket_and_sees_a_server_close() -> None:
    closing: asyncio.Event = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await closing.wait()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    stream = await httpcore.AnyIOBackend().connect_tcp("127.0.0.1", port)
    _answer_readable_directly(stream)
    assert "get_extra_info" in vars(stream)  # anyio's attribute dicts are out of the way
    assert stream.get_extra_info("is_readable") is False  # idle, open
    assert stream.get_extra_info("server_addr") == ("127.0.0.1", port)  # the rest unchanged
    closing.set()
    for _ in range(100):  # the FIN arrives
        if stream.get_extra_info("is_readable"):
            break
        await asyncio.sleep(0.01)
    assert stream.get_extra_info("is_readable") is True
    await stream.aclose()
    server.close()
    await server.wait_closed()
