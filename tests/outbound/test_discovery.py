from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshware.exceptions import ConfigurationError
from meshware.outbound.discovery import (
    ChainResolver,
    DnsResolver,
    EnvResolver,
    Resolver,
    StaticRegistry,
)
from meshware.outbound.endpoints import Endpoint, LabelSelector, Locality, Subset
from meshware.outbound.errors import NoHealthyEndpoint


class FakeClock:
    def __init__(self, now: float = 5000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --- endpoints -----------------------------------------------------------------------------


def test_endpoint_key_and_read_only_labels() -> None:
    labels = {"version": "v2"}
    endpoint = Endpoint("10.0.0.1", 8443, labels=labels, weight=3)
    labels["version"] = "v3"
    assert endpoint.key == "10.0.0.1:8443"
    assert endpoint.labels == {"version": "v2"}
    with pytest.raises(TypeError):
        endpoint.labels["version"] = "v4"  # type: ignore[index]
    assert Endpoint("fd00::1", 80).key == "[fd00::1]:80"
    assert str(Endpoint(address="payments-1", port=9000)) == "payments-1:9000"


def test_endpoints_are_hashable_values() -> None:
    first = Endpoint("10.0.0.1", 80, labels={"a": "b"})
    assert first == Endpoint("10.0.0.1", 80, labels={"a": "b"})
    assert first != Endpoint("10.0.0.1", 80, labels={"a": "c"})
    assert len({first, Endpoint("10.0.0.1", 80, labels={"a": "b"})}) == 1


def test_endpoint_locality_comes_from_topology_labels() -> None:
    endpoint = Endpoint(
        "10.0.0.1",
        80,
        labels={
            "topology.kubernetes.io/region": "eu-west-1",
            "topology.kubernetes.io/zone": "eu-west-1a",
            "topology.istio.io/subzone": "rack-4",
        },
    )
    assert endpoint.locality == Locality("eu-west-1", "eu-west-1a", "rack-4")
    assert Endpoint("10.0.0.1", 80, labels={"topology.kubernetes.io/zone": "z"}).locality is None
    explicit = Locality("us")
    assert Endpoint("10.0.0.1", 80, locality=explicit).locality is explicit


@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        ({"address": "", "port": 80}, "address", "expected a non-empty IP address or host name"),
        ({"address": "10.0.0.1:80", "port": 80}, "address", "without a port"),
        ({"address": "a b", "port": 80}, "address", "without spaces"),
        ({"address": "10.0.0.1", "port": 0}, "port", "expected an integer port from 1 to 65535"),
        ({"address": "10.0.0.1", "port": True}, "port", "expected an integer port"),
        ({"address": "10.0.0.1", "port": 80, "weight": 0}, "weight", "at least 1"),
        ({"address": "10.0.0.1", "port": 80, "labels": {"a": 1}}, "labels.a", "string label"),
        ({"address": "10.0.0.1", "port": 80, "locality": "eu"}, "locality", "Locality.parse"),
    ],
)
def test_endpoint_validation_names_the_field(
    kwargs: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        Endpoint(**kwargs)
    assert info.value.field == field
    assert message in str(info.value)


def test_endpoint_parse() -> None:
    assert Endpoint.parse(" 10.0.0.1:8443 ") == Endpoint("10.0.0.1", 8443)
    assert Endpoint.parse("[::1]:9000").key == "[::1]:9000"
    assert Endpoint.parse("payments", default_port=80) == Endpoint("payments", 80)
    for bad in ("payments", "::1:80", "[::1", "h:http", "h:70000", "[::1]x"):
        with pytest.raises(ConfigurationError) as info:
            Endpoint.parse(bad)
        assert info.value.field == "endpoint"


@given(st.text(max_size=30))
def test_endpoint_parse_raises_only_configuration_errors(text: str) -> None:
    try:
        endpoint = Endpoint.parse(text)
    except ConfigurationError as exc:
        assert exc.field == "endpoint"
    else:
        assert endpoint.key.endswith(f":{endpoint.port}")


def test_locality_parse_and_match_levels() -> None:
    here = Locality.parse("eu/eu-1a/r1")
    assert (here.region, here.zone, here.subzone) == ("eu", "eu-1a", "r1")
    assert str(Locality.parse("eu/eu-1a")) == "eu/eu-1a"
    assert here.match_level(Locality("eu", "eu-1a", "r1")) == 3
    assert here.match_level(Locality("eu", "eu-1a", "r2")) == 2
    assert here.match_level(Locality("eu", "eu-1b")) == 1
    assert here.match_level(Locality("us", "eu-1a", "r1")) == 0
    assert here.match_level(None) == 0
    assert Locality("eu").match_level(Locality("eu", "eu-1a")) == 1


@pytest.mark.parametrize("text", ["", "/", "eu//r1", "a/b/c/d", " eu", 7])
def test_locality_parse_rejects_bad_forms(text: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        Locality.parse(text, field="x.locality")
    assert info.value.field == "x.locality"


@given(st.text(max_size=20))
def test_locality_parse_raises_only_configuration_errors(text: str) -> None:
    try:
        locality = Locality.parse(text)
    except ConfigurationError:
        return
    assert str(locality) == text


def test_label_selector_and_subset() -> None:
    v1 = Endpoint("10.0.0.1", 80, labels={"version": "v1", "app": "pay"})
    v2 = Endpoint("10.0.0.2", 80, labels={"version": "v2", "app": "pay"})
    bare = Endpoint("10.0.0.3", 80)
    assert LabelSelector({"version": "v2"}).select((v1, v2, bare)) == (v2,)
    assert LabelSelector({"app": "pay", "version": "v1"}).matches(v1.labels)
    assert not LabelSelector({"app": "pay", "version": "v1"}).matches({"app": "pay"})
    assert LabelSelector().select((v1, bare)) == (v1, bare)
    subset = Subset.from_mapping({"name": "v2", "labels": {"version": "v2"}}, field="subsets[1]")
    assert subset == Subset(name="v2", labels={"version": "v2"})
    assert subset.select((v1, v2, bare)) == (v2,)
    assert subset.matches(v2)
    assert not subset.matches(v1)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"name": "", "labels": {}}, "subsets[1].name"),
        ({"name": "v 2"}, "subsets[1].name"),
        ({"name": "v2", "labels": {"version": 2}}, "subsets[1].labels.version"),
        ({"name": "v2", "trafficPolicy": {}}, "subsets[1].trafficPolicy"),
        ("v2", "subsets[1]"),
    ],
)
def test_subset_errors_name_the_field(data: Any, field: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Subset.from_mapping(data, field="subsets[1]")
    assert info.value.field == field


# --- StaticRegistry ------------------------------------------------------------------------


def test_static_registry_from_code() -> None:
    endpoints = [Endpoint("10.0.0.1", 8443), Endpoint("10.0.0.2", 8443)]
    registry = StaticRegistry({"payments": endpoints, "Ledger": []})
    assert registry.resolve("payments") == tuple(endpoints)
    assert registry.resolve("PAYMENTS.") == tuple(endpoints)
    assert registry.resolve("ledger") == ()
    assert registry.resolve("example.com") is None
    assert registry.services == frozenset({"payments", "ledger"})
    assert registry.resolve("payments") is registry.resolve("payments")
    assert isinstance(registry, Resolver)


async def test_static_registry_resolves_async() -> None:
    registry = StaticRegistry({"payments": [Endpoint("10.0.0.1", 8443)]})
    assert await registry.resolve_async("payments") == (Endpoint("10.0.0.1", 8443),)
    assert await registry.resolve_async("nope") is None


def test_static_registry_from_code_rejects_duplicates_and_non_endpoints() -> None:
    with pytest.raises(ConfigurationError) as info:
        StaticRegistry({"payments": [Endpoint("10.0.0.1", 80), Endpoint("10.0.0.1", 80)]})
    assert info.value.field == "services.payments[1]"
    assert str(info.value) == (
        "services.payments[1]: duplicate endpoint 10.0.0.1:80 (also at services.payments[0])"
    )
    with pytest.raises(ConfigurationError) as info:
        StaticRegistry({"payments": ["10.0.0.1:80"]})  # type: ignore[list-item]
    assert info.value.field == "services.payments[0]"
    with pytest.raises(ConfigurationError) as info:
        StaticRegistry({"pay ments": []})
    assert info.value.field == "services.pay ments"


def test_static_registry_from_mapping() -> None:
    registry = StaticRegistry.from_mapping(
        {
            "services": {
                "payments": {
                    "endpoints": [
                        {
                            "address": "127.0.0.1",
                            "port": 8443,
                            "labels": {"version": "v2"},
                            "locality": "eu/eu-west-1a",
                            "weight": 2,
                        },
                        "127.0.0.1:8444",
                    ]
                },
                "ledger": {"endpoints": []},
            }
        }
    )
    assert registry.resolve("payments") == (
        Endpoint(
            "127.0.0.1",
            8443,
            labels={"version": "v2"},
            locality=Locality("eu", "eu-west-1a"),
            weight=2,
        ),
        Endpoint("127.0.0.1", 8444),
    )
    assert registry.resolve("ledger") == ()


@pytest.mark.parametrize(
    ("data", "field", "message"),
    [
        ([], None, "expected a mapping with a 'services' key"),
        ({"service": {}}, "service", "unknown registry field"),
        ({"services": []}, "services", "expected a mapping of service names"),
        ({"services": {"pay/ments": {}}}, "services.pay/ments", "expected a service host name"),
        (
            {"services": {"payments": []}},
            "services.payments",
            "expected a mapping with an 'endpoints'",
        ),
        (
            {"services": {"payments": {"endpoint": []}}},
            "services.payments.endpoint",
            "unknown service field",
        ),
        (
            {"services": {"payments": {"endpoints": "10.0.0.1:80"}}},
            "services.payments.endpoints",
            "expected a list of endpoints",
        ),
        (
            {"services": {"payments": {"endpoints": [{"address": "10.0.0.1", "port": "80"}]}}},
            "services.payments.endpoints[0].port",
            "expected an integer port from 1 to 65535",
        ),
        (
            {"services": {"payments": {"endpoints": [{"port": 80}]}}},
            "services.payments.endpoints[0].address",
            "expected a non-empty IP address or host name",
        ),
        (
            {"services": {"payments": {"endpoints": ["10.0.0.1:80", "10.0.0.1"]}}},
            "services.payments.endpoints[1]",
            "expected 'host:port' with a port",
        ),
        (
            {"services": {"payments": {"endpoints": [{"address": "a", "port": 1, "zone": "z"}]}}},
            "services.payments.endpoints[0].zone",
            "unknown endpoint field",
        ),
        (
            {
                "services": {
                    "payments": {"endpoints": [{"address": "a", "port": 1, "locality": "a//b"}]}
                }
            },
            "services.payments.endpoints[0].locality",
            "expected 'region', 'region/zone' or 'region/zone/subzone'",
        ),
        (
            {"services": {"payments": {"endpoints": [{"address": "a", "port": 1, "weight": -1}]}}},
            "services.payments.endpoints[0].weight",
            "expected an integer weight of at least 1",
        ),
        (
            {"services": {"payments": {"endpoints": [{"address": "a", "port": 1, "labels": []}]}}},
            "services.payments.endpoints[0].labels",
            "expected a mapping of label names",
        ),
        (
            {"services": {"payments": {"endpoints": ["a:1", {"address": "a", "port": 1}]}}},
            "services.payments.endpoints[1]",
            "duplicate endpoint a:1 (also at services.payments.endpoints[0])",
        ),
        (
            {"services": {"payments": {"endpoints": []}, "PAYMENTS": {"endpoints": []}}},
            "services.PAYMENTS",
            "service listed twice",
        ),
    ],
)
def test_registry_mapping_errors_name_the_exact_field(
    data: Any, field: str | None, message: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        StaticRegistry.from_mapping(data)
    assert info.value.field == field
    assert message in str(info.value)


def test_registry_mapping_errors_carry_the_given_prefix() -> None:
    with pytest.raises(ConfigurationError) as info:
        StaticRegistry.from_mapping(
            {"services": {"payments": {"endpoints": [{"address": "a", "port": 0}]}}},
            field="discovery",
        )
    assert info.value.field == "discovery.services.payments.endpoints[0].port"
    assert info.value.value == 0


REGISTRY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70000) | st.text(max_size=15),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(
                [
                    "services",
                    "payments",
                    "endpoints",
                    "address",
                    "port",
                    "labels",
                    "weight",
                    "locality",
                ]
            )
            | st.text(max_size=6),
            children,
            max_size=4,
        )
    ),
    max_leaves=15,
)


@given(REGISTRY_JSON)
def test_registry_parser_raises_only_configuration_errors(data: Any) -> None:
    try:
        registry = StaticRegistry.from_mapping(data)
    except ConfigurationError:
        return
    for name in registry.services:
        assert all(isinstance(e, Endpoint) for e in registry.resolve(name) or ())


# --- StaticRegistry.from_file --------------------------------------------------------------

GOOD = """\
services:
  payments:
    endpoints:
      - address: 10.0.0.1
        port: 8443
        labels: {version: v1}
"""
GOOD_V2 = """\
services:
  payments:
    endpoints:
      - address: 10.0.0.1
        port: 8443
        labels: {version: v1}
      - {address: 10.0.0.2, port: 8443, labels: {version: v2}, locality: eu/eu-1a}
"""


def write(path: Path, text: str, mtime_ns: int) -> None:
    path.write_text(text, encoding="utf-8")
    # Set distinct modification times: file-system timestamps can be coarser than a test.
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_from_file_without_watch(tmp_path: Path) -> None:
    path = tmp_path / "registry.yaml"
    write(path, GOOD, 1_000_000_000)
    registry = StaticRegistry.from_file(path)
    assert registry.resolve("payments") == (Endpoint("10.0.0.1", 8443, labels={"version": "v1"}),)
    write(path, GOOD_V2, 2_000_000_000)
    assert len(registry.resolve("payments") or ()) == 1
    assert registry.check_for_changes() is False


def test_from_file_reloads_after_poll_interval(tmp_path: Path) -> None:
    path = tmp_path / "registry.yaml"
    write(path, GOOD, 1_000_000_000)
    clock = FakeClock()
    registry = StaticRegistry.from_file(path, watch=True, poll_interval=1.0, clock=clock)
    before = registry.resolve("payments")
    write(path, GOOD_V2, 2_000_000_000)
    clock.advance(0.5)
    assert registry.resolve("payments") is before
    clock.advance(0.5)
    after = registry.resolve("payments")
    assert after == (
        Endpoint("10.0.0.1", 8443, labels={"version": "v1"}),
        Endpoint("10.0.0.2", 8443, labels={"version": "v2"}, locality=Locality("eu", "eu-1a")),
    )
    assert registry.reloads == 1
    clock.advance(5.0)
    assert registry.resolve("payments") is after
    assert registry.reloads == 1


def test_from_file_detects_an_atomic_replace_of_the_same_size(tmp_path: Path) -> None:
    path = tmp_path / "registry.yaml"
    write(path, GOOD, 1_000_000_000)
    clock = FakeClock()
    registry = StaticRegistry.from_file(path, watch=True, clock=clock)
    replacement = tmp_path / "registry.yaml.new"
    write(replacement, GOOD.replace("10.0.0.1", "10.0.0.9"), 1_000_000_000)
    os.replace(replacement, path)
    clock.advance(1.0)
    assert registry.resolve("payments") == (Endpoint("10.0.0.9", 8443, labels={"version": "v1"}),)


def test_broken_file_keeps_the_last_good_registry(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "registry.yaml"
    write(path, GOOD, 1_000_000_000)
    clock = FakeClock()
    registry = StaticRegistry.from_file(path, watch=True, poll_interval=1.0, clock=clock)
    good = registry.resolve("payments")
    write(
        path, "services: {payments: {endpoints: [{address: 10.0.0.1, port: 99999}]}}\n", 2 * 10**9
    )
    clock.advance(1.0)
    with caplog.at_level(logging.ERROR, logger="meshware.outbound.discovery"):
        assert registry.resolve("payments") is good
        for _ in range(3):
            clock.advance(1.0)
            assert registry.resolve("payments") is good
    assert registry.reload_errors == 1  # one broken version, counted and logged once
    assert len(caplog.records) == 1
    assert "keeping the last good service registry" in caplog.records[0].getMessage()
    error = registry.last_error
    assert error is not None
    assert error.field == "services.payments.endpoints[0].port"
    assert str(error) == (
        f"services.payments.endpoints[0].port: expected an integer port from 1 to 65535 (in {path})"
    )
    write(path, "services: [unclosed\n", 3 * 10**9)
    clock.advance(1.0)
    assert registry.resolve("payments") is good
    assert registry.reload_errors == 2
    assert "invalid YAML in the registry file" in str(registry.last_error)
    write(path, GOOD_V2, 4 * 10**9)
    clock.advance(1.0)
    assert len(registry.resolve("payments") or ()) == 2
    assert registry.reloads == 1


def test_deleted_file_keeps_the_last_good_registry(tmp_path: Path) -> None:
    path = tmp_path / "registry.yaml"
    write(path, GOOD, 1_000_000_000)
    clock = FakeClock()
    registry = StaticRegistry.from_file(path, watch=True, clock=clock)
    good = registry.resolve("payments")
    path.unlink()
    clock.advance(1.0)
    assert registry.resolve("payments") is good
    clock.advance(1.0)
    assert registry.resolve("payments") is good
    assert registry.reload_errors == 1
    assert "cannot read the registry file" in str(registry.last_error)
    write(path, GOOD_V2, 2 * 10**9)
    assert registry.check_for_changes() is True
    assert len(registry.resolve("payments") or ()) == 2


async def test_watched_file_reloads_through_resolve_async(tmp_path: Path) -> None:
    path = tmp_path / "registry.yaml"
    write(path, GOOD, 1_000_000_000)
    clock = FakeClock()
    registry = StaticRegistry.from_file(path, watch=True, poll_interval=2.0, clock=clock)
    write(path, GOOD_V2, 2 * 10**9)
    clock.advance(2.0)
    assert len(await registry.resolve_async("payments") or ()) == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("services: [unclosed\n", "invalid YAML in the registry file"),
        ("services:\n  payments:\n    endpoints: [10.0.0.1]\n", "expected 'host:port' with a port"),
        ("- 1\n", "expected a mapping with a 'services' key"),
    ],
)
def test_from_file_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "registry.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigurationError) as info:
        StaticRegistry.from_file(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_from_file_missing_file_and_bad_interval(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read the registry file"):
        StaticRegistry.from_file(tmp_path / "missing.yaml")
    (tmp_path / "empty.yaml").write_text("", encoding="utf-8")
    assert StaticRegistry.from_file(tmp_path / "empty.yaml").services == frozenset()
    with pytest.raises(ConfigurationError) as info:
        StaticRegistry.from_file(tmp_path / "empty.yaml", watch=True, poll_interval=-1)
    assert info.value.field == "poll_interval"


# --- EnvResolver ---------------------------------------------------------------------------


def test_env_resolver_format_and_name_mangling() -> None:
    resolver = EnvResolver(
        {
            "MESHWARE_SERVICE_PAYMENTS": "127.0.0.1:8443,127.0.0.1:8444",
            "MESHWARE_SERVICE_PAYMENTS_API_V2": " [::1]:9000 , api-2:9001 ",
            "MESHWARE_SERVICE_LEDGER": "   ",
            "OTHER": "10.0.0.1:80",
        }
    )
    assert resolver.resolve("payments") == (
        Endpoint("127.0.0.1", 8443),
        Endpoint("127.0.0.1", 8444),
    )
    expected = (Endpoint("::1", 9000), Endpoint("api-2", 9001))
    assert resolver.resolve("payments-api.v2") == expected
    assert resolver.resolve("Payments_API-v2.") == expected
    assert resolver.resolve("ledger") is None
    assert resolver.resolve("other") is None
    assert resolver.variables == frozenset(
        {"MESHWARE_SERVICE_PAYMENTS", "MESHWARE_SERVICE_PAYMENTS_API_V2"}
    )
    assert EnvResolver.variable_name("payments-api.v2") == "MESHWARE_SERVICE_PAYMENTS_API_V2"


async def test_env_resolver_reads_os_environ_with_a_prefix_and_default_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MESH_SVC_ORDERS", "orders-1,orders-2:8081")
    resolver = EnvResolver(prefix="MESH_SVC_", default_port=8080)
    assert await resolver.resolve_async("orders") == (
        Endpoint("orders-1", 8080),
        Endpoint("orders-2", 8081),
    )


@pytest.mark.parametrize(
    "value",
    ["127.0.0.1", "127.0.0.1:80,", "::1:80", "a:80,a:80", "a:http", "[::1:80", "a b:80"],
)
def test_env_resolver_errors_name_the_variable(value: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        EnvResolver({"MESHWARE_SERVICE_PAYMENTS": value})
    assert info.value.field.startswith("MESHWARE_SERVICE_PAYMENTS")  # type: ignore[union-attr]


def test_env_resolver_error_message() -> None:
    with pytest.raises(ConfigurationError) as info:
        EnvResolver({"MESHWARE_SERVICE_PAYMENTS": "10.0.0.1:80,10.0.0.2"})
    assert str(info.value) == (
        "MESHWARE_SERVICE_PAYMENTS: expected comma-separated 'host:port' items "
        "(IPv6 in brackets: '[::1]:8443'); '10.0.0.2' is not one"
    )
    assert info.value.value == "10.0.0.1:80,10.0.0.2"


@given(st.text(max_size=40))
def test_env_resolver_raises_only_configuration_errors(value: str) -> None:
    try:
        resolver = EnvResolver({"MESHWARE_SERVICE_X": value})
    except ConfigurationError as exc:
        assert exc.field is not None
        assert exc.field.startswith("MESHWARE_SERVICE_X")
        return
    found = resolver.resolve("x")
    assert found is None if not value.strip() else found


# --- ChainResolver -------------------------------------------------------------------------


async def test_chain_resolver_first_non_none_wins() -> None:
    first = StaticRegistry({"ledger": []})
    second = StaticRegistry(
        {"ledger": [Endpoint("10.0.0.9", 80)], "payments": [Endpoint("10.0.0.1", 80)]}
    )
    chain = ChainResolver([first, second])
    assert chain.resolve("ledger") == ()
    assert chain.resolve("payments") == (Endpoint("10.0.0.1", 80),)
    assert chain.resolve("example.com") is None
    assert await chain.resolve_async("ledger") == ()
    assert await chain.resolve_async("payments") == (Endpoint("10.0.0.1", 80),)
    assert await chain.resolve_async("example.com") is None
    assert chain.resolvers == (first, second)


def test_chain_resolver_rejects_bad_input() -> None:
    with pytest.raises(ConfigurationError) as info:
        ChainResolver([])
    assert info.value.field == "resolvers"
    with pytest.raises(ConfigurationError) as info:
        ChainResolver([StaticRegistry({}), object()])  # type: ignore[list-item]
    assert info.value.field == "resolvers[1]"


# --- DnsResolver over a loopback DNS server ------------------------------------------------


class LoopbackDns:
    """A tiny authoritative DNS server on 127.0.0.1 answering from ``records``."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], tuple[int, list[str]]] = {}
        self.queries: list[tuple[str, str]] = []
        self.servfail = False
        self.additional = True
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.05)
        self.port: int = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def set(self, name: str, rdtype: str, ttl: int, *values: str) -> None:
        self.records[(name, rdtype)] = (ttl, list(values))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()

    def _rrset(self, name: str, rdtype: str) -> dns.rrset.RRset:
        ttl, values = self.records[(name, rdtype)]
        return dns.rrset.from_text_list(name, ttl, "IN", rdtype, values)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            query = dns.message.from_wire(data)
            response = dns.message.make_response(query)
            response.flags |= dns.flags.AA
            question = query.question[0]
            name = question.name.to_text().lower()
            rdtype = dns.rdatatype.to_text(question.rdtype)
            self.queries.append((name, rdtype))
            if self.servfail:
                response.set_rcode(dns.rcode.SERVFAIL)
            elif not any(n == name for n, _ in self.records):
                response.set_rcode(dns.rcode.NXDOMAIN)
            elif (name, rdtype) in self.records:
                rrset = self._rrset(name, rdtype)
                response.answer.append(rrset)
                if rdtype == "SRV" and self.additional:
                    for rdata in rrset:
                        target = rdata.target.to_text().lower()
                        for family in ("A", "AAAA"):
                            if (target, family) in self.records:
                                response.additional.append(self._rrset(target, family))
            self._sock.sendto(response.to_wire(), peer)


@pytest.fixture
def dns_server() -> Iterator[LoopbackDns]:
    server = LoopbackDns()
    yield server
    server.close()


SUFFIX = "default.svc.cluster.local"
PAYMENTS = f"payments.{SUFFIX}."


def make_resolver(server: LoopbackDns, clock: FakeClock, **kwargs: Any) -> DnsResolver:
    options: dict[str, Any] = {
        "suffix": SUFFIX,
        "nameservers": ["127.0.0.1"],
        "nameserver_port": server.port,
        "timeout": 2.0,
        "clock": clock,
    }
    options.update(kwargs)
    if "srv" not in options and "port" not in options:
        options["port"] = 8443
    return DnsResolver(**options)


def test_dns_a_and_aaaa_records_with_ttl_caching(dns_server: LoopbackDns) -> None:
    dns_server.set(PAYMENTS, "A", 30, "10.0.0.2", "10.0.0.1")
    dns_server.set(PAYMENTS, "AAAA", 60, "fd00::1")
    clock = FakeClock()
    resolver = make_resolver(dns_server, clock)
    first = resolver.resolve("payments")
    assert first == (
        Endpoint("10.0.0.1", 8443),
        Endpoint("10.0.0.2", 8443),
        Endpoint("fd00::1", 8443),
    )
    assert dns_server.queries == [(PAYMENTS, "A"), (PAYMENTS, "AAAA")]
    clock.advance(29.9)
    assert resolver.resolve("payments") is first
    assert resolver.resolve(f"payments.{SUFFIX}") is first  # the suffix is not added twice
    assert len(dns_server.queries) == 2
    clock.advance(0.2)  # past the smaller TTL (30 s)
    dns_server.set(PAYMENTS, "A", 30, "10.0.0.1", "10.0.0.2")  # rotated order, same set
    assert resolver.resolve("payments") is first  # same answer: same object
    assert len(dns_server.queries) == 4
    clock.advance(31)
    dns_server.set(PAYMENTS, "A", 30, "10.0.0.3")
    assert resolver.resolve("payments") == (Endpoint("10.0.0.3", 8443), Endpoint("fd00::1", 8443))


def test_dns_ttl_is_clamped(dns_server: LoopbackDns) -> None:
    dns_server.set(PAYMENTS, "A", 0, "10.0.0.1")
    dns_server.set(f"ledger.{SUFFIX}.", "A", 86400, "10.0.0.2")
    clock = FakeClock()
    resolver = make_resolver(dns_server, clock, families=["A"], min_ttl=5, max_ttl=60)
    resolver.resolve("payments")
    resolver.resolve("ledger")
    clock.advance(4.9)
    resolver.resolve("payments")
    clock.advance(0.2)
    resolver.resolve("payments")
    assert dns_server.queries.count((PAYMENTS, "A")) == 2
    clock.advance(54)
    resolver.resolve("ledger")
    clock.advance(1)
    resolver.resolve("ledger")
    assert dns_server.queries.count((f"ledger.{SUFFIX}.", "A")) == 2


def test_dns_unknown_names_are_not_mesh_services_and_cached_negatively(
    dns_server: LoopbackDns,
) -> None:
    dns_server.set(PAYMENTS, "A", 30, "10.0.0.1")
    clock = FakeClock()
    resolver = make_resolver(dns_server, clock, negative_ttl=5)
    assert resolver.resolve("example") is None
    assert resolver.resolve("example") is None
    assert dns_server.queries == [(f"example.{SUFFIX}.", "A")]
    clock.advance(5)
    assert resolver.resolve("example") is None
    assert len(dns_server.queries) == 2


def test_dns_name_without_records_is_a_service_without_endpoints(dns_server: LoopbackDns) -> None:
    dns_server.set(PAYMENTS, "AAAA", 30, "fd00::1")
    resolver = make_resolver(dns_server, FakeClock(), families=["A"])
    assert resolver.resolve("payments") == ()


def test_dns_allow_list_and_ip_literals_skip_queries(dns_server: LoopbackDns) -> None:
    dns_server.set(PAYMENTS, "A", 30, "10.0.0.1")
    resolver = make_resolver(dns_server, FakeClock(), names=["payments"])
    assert resolver.resolve("ledger") is None
    assert resolver.resolve("10.1.2.3") is None
    assert resolver.resolve("[::1]") is None
    assert resolver.resolve("Payments") == (Endpoint("10.0.0.1", 8443),)
    assert dns_server.queries == [(PAYMENTS, "A"), (PAYMENTS, "AAAA")]


def srv_records(server: LoopbackDns) -> None:
    srv = f"_http._tcp.{PAYMENTS}"
    server.set(
        srv,
        "SRV",
        30,
        f"0 50 8080 pod-a.{PAYMENTS}",
        f"0 100 8081 pod-b.{PAYMENTS}",
        f"10 100 9000 backup.{PAYMENTS}",
    )
    server.set(f"pod-a.{PAYMENTS}", "A", 20, "10.0.1.1")
    server.set(f"pod-b.{PAYMENTS}", "A", 40, "10.0.1.2")
    server.set(f"backup.{PAYMENTS}", "A", 40, "10.0.9.9")


def test_dns_srv_records_with_additional_addresses(dns_server: LoopbackDns) -> None:
    srv_records(dns_server)
    clock = FakeClock()
    resolver = make_resolver(dns_server, clock, srv="_http._tcp")
    expected = (Endpoint("10.0.1.1", 8080, weight=50), Endpoint("10.0.1.2", 8081, weight=100))
    assert resolver.resolve("payments") == expected
    assert dns_server.queries == [(f"_http._tcp.{PAYMENTS}", "SRV")]
    clock.advance(19.9)  # the smallest TTL, pod-a's A record, governs
    resolver.resolve("payments")
    clock.advance(0.2)
    resolver.resolve("payments")
    assert dns_server.queries.count((f"_http._tcp.{PAYMENTS}", "SRV")) == 2


def test_dns_srv_targets_are_looked_up_when_not_in_the_response(dns_server: LoopbackDns) -> None:
    srv_records(dns_server)
    dns_server.additional = False
    resolver = make_resolver(dns_server, FakeClock(), srv="_http._tcp", families=["A"])
    assert resolver.resolve("payments") == (
        Endpoint("10.0.1.1", 8080, weight=50),
        Endpoint("10.0.1.2", 8081, weight=100),
    )
    assert dns_server.queries == [
        (f"_http._tcp.{PAYMENTS}", "SRV"),
        (f"pod-a.{PAYMENTS}", "A"),
        (f"pod-b.{PAYMENTS}", "A"),
    ]


def test_dns_failure_serves_stale_for_a_bounded_time(
    dns_server: LoopbackDns, caplog: pytest.LogCaptureFixture
) -> None:
    dns_server.set(PAYMENTS, "A", 30, "10.0.0.1")
    clock = FakeClock()
    resolver = make_resolver(dns_server, clock, families=["A"], negative_ttl=5, max_stale=60)
    good = resolver.resolve("payments")
    dns_server.servfail = True
    clock.advance(31)
    with caplog.at_level(logging.WARNING, logger="meshware.outbound.discovery"):
        assert resolver.resolve("payments") is good
    assert resolver.failures == 1
    assert resolver.stale_served == 1
    assert "serving the expired answer" in caplog.records[0].getMessage()
    clock.advance(4)  # within the retry wait: no new query
    assert resolver.resolve("payments") is good
    assert len(dns_server.queries) == 2
    clock.advance(1)
    assert resolver.resolve("payments") is good
    assert len(dns_server.queries) == 3
    clock.advance(55)  # 30 + 60 s past the answer: stale no longer allowed
    with pytest.raises(NoHealthyEndpoint) as info:
        resolver.resolve("payments")
    assert info.value.destination == "payments"
    assert str(info.value).startswith(f"payments: DNS lookup of payments.{SUFFIX} failed: ")
    dns_server.servfail = False
    assert resolver.resolve("payments") == good


def test_dns_failure_without_an_earlier_answer_raises(dns_server: LoopbackDns) -> None:
    dns_server.servfail = True
    resolver = make_resolver(dns_server, FakeClock())
    with pytest.raises(NoHealthyEndpoint) as info:
        resolver.resolve("payments")
    assert info.value.destination == "payments"
    assert resolver.failures == 1


async def test_dns_resolve_async_shares_the_cache(dns_server: LoopbackDns) -> None:
    dns_server.set(PAYMENTS, "A", 30, "10.0.0.1")
    srv_records(dns_server)
    clock = FakeClock()
    resolver = make_resolver(dns_server, clock, families=["A"])
    first = await resolver.resolve_async("payments")
    assert first == (Endpoint("10.0.0.1", 8443),)
    assert resolver.resolve("payments") is first
    assert await resolver.resolve_async("nothing-here") is None
    assert len(dns_server.queries) == 2
    dns_server.additional = False
    by_srv = make_resolver(dns_server, clock, srv="_http._tcp", families=["A"])
    assert await by_srv.resolve_async("payments") == (
        Endpoint("10.0.1.1", 8080, weight=50),
        Endpoint("10.0.1.2", 8081, weight=100),
    )
    dns_server.servfail = True
    clock.advance(100)
    assert await resolver.resolve_async("payments") is first  # stale, within max_stale
    clock.advance(300)
    with pytest.raises(NoHealthyEndpoint):
        await resolver.resolve_async("payments")


def test_dns_resolver_in_a_chain_after_a_registry(dns_server: LoopbackDns) -> None:
    dns_server.set(PAYMENTS, "A", 30, "10.0.0.1")
    chain = ChainResolver(
        [
            StaticRegistry({"ledger": [Endpoint("10.9.9.9", 80)]}),
            make_resolver(dns_server, FakeClock()),
        ]
    )
    assert chain.resolve("ledger") == (Endpoint("10.9.9.9", 80),)
    assert chain.resolve("payments") == (Endpoint("10.0.0.1", 8443),)
    assert chain.resolve("example") is None


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({}, "port"),
        ({"port": 80, "srv": "_http._tcp"}, "srv"),
        ({"srv": "http"}, "srv"),
        ({"port": 80, "nameservers": ["dns.example"]}, "nameservers[0]"),
        ({"port": 80, "nameservers": []}, "nameservers"),
        ({"port": 80, "families": ["MX"]}, "families"),
        ({"port": 80, "min_ttl": 10, "max_ttl": 5}, "max_ttl"),
        ({"port": 80, "timeout": 0}, "timeout"),
        ({"port": 80, "suffix": "bad suffix"}, "suffix"),
    ],
)
def test_dns_resolver_rejects_bad_settings(kwargs: dict[str, Any], field: str) -> None:
    kwargs.setdefault("nameservers", ["127.0.0.1"])
    with pytest.raises(ConfigurationError) as info:
        DnsResolver(**kwargs)
    assert info.value.field == field
