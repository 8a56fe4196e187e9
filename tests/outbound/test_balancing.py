from __future__ import annotations

import collections
import random
import threading
from collections.abc import Sequence

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshware.exceptions import ConfigurationError
from meshware.outbound import balancing
from meshware.outbound.balancing import (
    Balancer,
    ConsistentHash,
    HttpCookie,
    LeastRequest,
    LoadBalancerSettings,
    LocalityAware,
    PeakEwma,
    PickContext,
    Random,
    RingHash,
    RoundRobin,
    balancer_from_config,
    hash_key_for,
)
from meshware.outbound.endpoints import Endpoint, Locality
from meshware.outbound.errors import NoHealthyEndpoint


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


A = Endpoint("10.0.0.1", 8080)
B = Endpoint("10.0.0.2", 8080)
C = Endpoint("10.0.0.3", 8080)
ABC = (A, B, C)
CTX = PickContext(destination="payments")


def names(endpoints: Sequence[Endpoint]) -> str:
    return "".join("abcdefghij"[int(e.address.rsplit(".", 1)[1]) - 1] for e in endpoints)


def picks(
    balancer: Balancer, endpoints: Sequence[Endpoint], count: int, ctx: PickContext = CTX
) -> str:
    return names([balancer.pick(endpoints, ctx) for _ in range(count)])


def every_balancer() -> list[Balancer]:
    return [
        RoundRobin(),
        Random(rng=random.Random(1)),
        LeastRequest(rng=random.Random(1)),
        PeakEwma(rng=random.Random(1), clock=FakeClock()),
        RingHash(),
        LocalityAware(RoundRobin(), local=Locality("eu")),
    ]


# --- PickContext and the common contract -------------------------------------------------


def test_pick_context_rejects_a_mutable_exclude_set() -> None:
    with pytest.raises(ConfigurationError) as info:
        PickContext(destination="payments", exclude={"10.0.0.1:8080"})  # type: ignore[arg-type]
    assert info.value.field == "exclude"
    assert str(info.value) == "exclude: expected a frozenset of endpoint keys"


@pytest.mark.parametrize("balancer", every_balancer(), ids=lambda b: type(b).__name__)
def test_empty_endpoints_raise_no_healthy_endpoint_naming_the_destination(
    balancer: Balancer,
) -> None:
    with pytest.raises(NoHealthyEndpoint) as info:
        balancer.pick((), PickContext(destination="payments", hash_key="k"))
    assert info.value.destination == "payments"
    assert str(info.value) == "payments: no healthy endpoint to pick from"
    assert isinstance(info.value, httpx.TransportError)


@pytest.mark.parametrize("balancer", every_balancer(), ids=lambda b: type(b).__name__)
def test_exclude_is_honoured_while_another_endpoint_exists(balancer: Balancer) -> None:
    ctx = PickContext(destination="payments", hash_key="user-1", exclude=frozenset({A.key, B.key}))
    assert {balancer.pick(ABC, ctx) for _ in range(50)} == {C}


@pytest.mark.parametrize("balancer", every_balancer(), ids=lambda b: type(b).__name__)
def test_exclude_is_ignored_when_every_endpoint_is_excluded(balancer: Balancer) -> None:
    ctx = PickContext(destination="payments", hash_key="user-1", exclude=frozenset({A.key}))
    assert balancer.pick((A,), ctx) is A


@pytest.mark.parametrize("balancer", every_balancer(), ids=lambda b: type(b).__name__)
def test_every_balancer_satisfies_the_protocol(balancer: Balancer) -> None:
    assert isinstance(balancer, Balancer)
    token = balancer.on_start(A)
    balancer.on_complete(token, latency_s=0.01, failed=False)


# --- RoundRobin ----------------------------------------------------------------------------


def test_round_robin_rotates_in_order() -> None:
    assert picks(RoundRobin(randomize_start=False), ABC, 7) == "abcabca"


def test_round_robin_is_smooth_and_weighted_like_nginx() -> None:
    endpoints = (
        Endpoint("10.0.0.1", 80, weight=5),
        Endpoint("10.0.0.2", 80),
        Endpoint("10.0.0.3", 80),
    )
    assert picks(RoundRobin(randomize_start=False), endpoints, 14) == "aabacaa" * 2


def test_round_robin_weights_give_exact_shares_over_whole_cycles() -> None:
    endpoints = (Endpoint("10.0.0.1", 80, weight=3), Endpoint("10.0.0.2", 80, weight=2))
    sequence = picks(RoundRobin(randomize_start=False), endpoints, 500)
    assert collections.Counter(sequence) == {"a": 300, "b": 200}
    assert sequence[:5] == "abab" + "a"


def test_round_robin_random_start_is_a_rotation() -> None:
    starts = set()
    for seed in range(20):
        sequence = picks(RoundRobin(rng=random.Random(seed)), ABC, 6)
        assert sequence in {"abcabc", "bcabca", "cabcab"}
        starts.add(sequence[0])
    assert starts == {"a", "b", "c"}


def test_round_robin_keeps_its_position_for_an_equal_new_sequence() -> None:
    balancer = RoundRobin(randomize_start=False)
    assert picks(balancer, ABC, 2) == "ab"
    assert picks(balancer, list(ABC), 2) == "ca"


def test_round_robin_picks_up_a_changed_endpoint_set() -> None:
    balancer = RoundRobin(randomize_start=False)
    d = Endpoint("10.0.0.4", 8080)
    assert picks(balancer, ABC, 3) == "abc"
    assert set(picks(balancer, (A, B, C, d), 8)) == {"a", "b", "c", "d"}
    assert set(picks(balancer, (B, C), 4)) == {"b", "c"}


def test_weighted_round_robin_skips_excluded_endpoints() -> None:
    endpoints = (
        Endpoint("10.0.0.1", 80, weight=5),
        Endpoint("10.0.0.2", 80),
        Endpoint("10.0.0.3", 80),
    )
    ctx = PickContext(destination="p", exclude=frozenset({"10.0.0.1:80"}))
    assert set(picks(RoundRobin(randomize_start=False), endpoints, 10, ctx)) == {"b", "c"}


# --- Random --------------------------------------------------------------------------------


def test_random_follows_weights_over_ten_thousand_picks() -> None:
    endpoints = (
        Endpoint("10.0.0.1", 80, weight=1),
        Endpoint("10.0.0.2", 80, weight=2),
        Endpoint("10.0.0.3", 80, weight=7),
    )
    counts = collections.Counter(picks(Random(rng=random.Random(42)), endpoints, 10_000))
    assert abs(counts["a"] / 10_000 - 0.1) < 0.015
    assert abs(counts["b"] / 10_000 - 0.2) < 0.02
    assert abs(counts["c"] / 10_000 - 0.7) < 0.02


def test_random_with_equal_weights_is_uniform() -> None:
    counts = collections.Counter(picks(Random(rng=random.Random(3)), ABC, 9_000))
    assert all(abs(counts[n] - 3_000) < 250 for n in "abc")


def test_random_is_reproducible_with_a_seed() -> None:
    assert picks(Random(rng=random.Random(9)), ABC, 30) == picks(
        Random(rng=random.Random(9)), ABC, 30
    )


# --- LeastRequest --------------------------------------------------------------------------


def test_least_request_prefers_the_endpoint_with_fewer_calls_in_flight() -> None:
    balancer = LeastRequest(rng=random.Random(5))
    tokens = [balancer.on_start(A) for _ in range(3)]
    assert set(picks(balancer, (A, B), 100)) == {"b"}
    for token in tokens:
        balancer.on_complete(token, latency_s=0.1, failed=False)
    assert balancer.in_flight(A) == 0
    assert set(picks(balancer, (A, B), 100)) == {"a", "b"}


def test_least_request_never_picks_the_most_loaded_of_three() -> None:
    balancer = LeastRequest(rng=random.Random(11))
    for _ in range(5):
        balancer.on_start(A)
    balancer.on_start(B)
    counts = collections.Counter(picks(balancer, ABC, 3_000))
    assert counts["a"] == 0
    # c wins every pair it is sampled into: two of the three pairs.
    assert abs(counts["c"] / 3_000 - 2 / 3) < 0.03


def test_weighted_least_request_shares_exactly_by_weight_when_idle() -> None:
    light = Endpoint("10.0.0.1", 80, weight=1)
    heavy = Endpoint("10.0.0.2", 80, weight=4)
    sequence = picks(LeastRequest(), (light, heavy), 2_000)
    assert collections.Counter(sequence) == {"a": 400, "b": 1_600}
    assert "bbbbb" not in sequence  # spread out, not in bursts


def test_weighted_least_request_slows_down_a_loaded_endpoint() -> None:
    light = Endpoint("10.0.0.1", 80, weight=1)
    heavy = Endpoint("10.0.0.2", 80, weight=4)
    balancer = LeastRequest()
    for _ in range(7):
        balancer.on_start(heavy)
    # heavy is rescheduled with weight 4 / (7 + 1) = 0.5 against light's 1.
    counts = collections.Counter(picks(balancer, (light, heavy), 3_000))
    assert abs(counts["a"] / 3_000 - 2 / 3) < 0.01


def test_weighted_least_request_skips_excluded_endpoints() -> None:
    light = Endpoint("10.0.0.1", 80, weight=1)
    heavy = Endpoint("10.0.0.2", 80, weight=4)
    balancer = LeastRequest()
    ctx = PickContext(destination="p", exclude=frozenset({heavy.key}))
    assert picks(balancer, (light, heavy), 5, ctx) == "aaaaa"
    # Later picks make up for it: over all 505 picks the shares are exact again.
    counts = collections.Counter(picks(balancer, (light, heavy), 500))
    assert (counts["a"] + 5, counts["b"]) == (101, 404)


def test_least_request_counts_are_thread_safe() -> None:
    balancer = LeastRequest()

    def work() -> None:
        for _ in range(2_000):
            balancer.on_complete(balancer.on_start(A), latency_s=0.0, failed=False)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert balancer.in_flight(A) == 0


def test_least_request_keeps_in_flight_counts_across_set_changes() -> None:
    balancer = LeastRequest(rng=random.Random(0))
    balancer.pick(ABC, CTX)
    token = balancer.on_start(C)
    balancer.pick((A, B), CTX)
    assert balancer.in_flight(C) == 1
    balancer.on_complete(token, latency_s=0.0, failed=True)
    assert balancer.in_flight(C) == 0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"choice_count": 1}, "choice_count"),
        ({"choice_count": True}, "choice_count"),
        ({"active_request_bias": -1.0}, "active_request_bias"),
    ],
)
def test_least_request_rejects_bad_settings(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        LeastRequest(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


# --- PeakEwma ------------------------------------------------------------------------------


def run_ewma(
    balancer: PeakEwma, clock: FakeClock, latency: dict[Endpoint, float], seconds: float
) -> list[Endpoint]:
    chosen = []
    for _ in range(round(seconds * 10)):
        clock.advance(0.1)
        endpoint = balancer.pick((A, B), CTX)
        token = balancer.on_start(endpoint)
        balancer.on_complete(token, latency_s=latency[endpoint], failed=False)
        chosen.append(endpoint)
    return chosen


def test_peak_ewma_moves_traffic_away_from_a_slow_endpoint_and_back_after_decay() -> None:
    clock = FakeClock()
    balancer = PeakEwma(clock=clock, rng=random.Random(7))
    latency = {A: 0.010, B: 0.500}
    first = run_ewma(balancer, clock, latency, 30)
    # B is tried at most once or twice before its peak estimate (0.5 s) shuts it out.
    assert first.count(B) <= 2
    assert B not in first[20:]
    latency[B] = 0.010  # B recovers, but nothing tells the balancer until B is tried again.
    second = run_ewma(balancer, clock, latency, 5)
    assert B not in second
    # 0.5 * exp(-t / 10) falls below A's ~0.01 after about 39 s: B is tried and stays in.
    third = run_ewma(balancer, clock, latency, 40)
    assert B in third[:100]
    assert abs(third[-200:].count(B) / 200 - 0.5) < 0.15


def test_peak_ewma_a_still_slow_endpoint_gets_only_probes() -> None:
    clock = FakeClock()
    balancer = PeakEwma(clock=clock, rng=random.Random(7))
    chosen = run_ewma(balancer, clock, {A: 0.010, B: 0.500}, 200)
    # One probe about every 40 s once the peak has decayed.
    assert 2 <= chosen.count(B) <= 8


def test_peak_ewma_counts_calls_in_flight() -> None:
    clock = FakeClock()
    balancer = PeakEwma(clock=clock, rng=random.Random(1))
    balancer.on_start(A)
    assert balancer.cost(A) == pytest.approx(0.030 * 2)
    assert balancer.cost(B) == pytest.approx(0.030)
    assert set(picks(balancer, (A, B), 50)) == {"b"}


def test_peak_ewma_decays_with_the_configured_time_constant() -> None:
    clock = FakeClock()
    balancer = PeakEwma(clock=clock, decay_s=10.0)
    balancer.on_complete(balancer.on_start(A), latency_s=0.400, failed=False)
    assert balancer.cost(A) == pytest.approx(0.400)
    clock.advance(10.0)
    assert balancer.cost(A) == pytest.approx(0.400 * 0.36787944117, rel=1e-9)


def test_peak_ewma_failure_penalty_makes_fast_failures_expensive() -> None:
    clock = FakeClock()
    plain = PeakEwma(clock=clock)
    penalised = PeakEwma(clock=clock, failure_penalty_s=1.0)
    for balancer in (plain, penalised):
        token = balancer.on_start(A)
        clock.advance(2.0)
        balancer.on_complete(token, latency_s=0.001, failed=True)
    assert plain.cost(A) < 0.030
    assert penalised.cost(A) == pytest.approx(1.0)


def test_peak_ewma_rejects_a_zero_decay() -> None:
    with pytest.raises(ConfigurationError) as info:
        PeakEwma(decay_s=0)
    assert info.value.field == "decay_s"
    assert "expected a finite number of seconds > 0" in str(info.value)


# --- RingHash ------------------------------------------------------------------------------

TEN = tuple(Endpoint(f"10.0.1.{i}", 8080) for i in range(10))


def owners(balancer: RingHash, endpoints: Sequence[Endpoint], keys: int = 10_000) -> list[str]:
    return [
        balancer.pick(endpoints, PickContext(destination="p", hash_key=f"user-{k}")).key
        for k in range(keys)
    ]


def test_ring_hash_sends_a_key_to_the_same_endpoint_every_time_and_in_every_instance() -> None:
    first = RingHash().pick(TEN, PickContext(destination="p", hash_key="alice"))
    for _ in range(20):
        assert RingHash().pick(list(TEN), PickContext(destination="p", hash_key="alice")) is first
    # The ring does not depend on the order endpoints arrive in.
    assert RingHash().pick(TEN[::-1], PickContext(destination="p", hash_key="alice")) == first


def test_ring_hash_removing_an_endpoint_moves_only_its_own_keys() -> None:
    balancer = RingHash()
    before = owners(balancer, TEN)
    gone = TEN[3]
    after = owners(balancer, TEN[:3] + TEN[4:])
    moved = [k for k, (b, a) in enumerate(zip(before, after, strict=True)) if b != a]
    assert all(before[k] == gone.key for k in moved)
    assert len(moved) == before.count(gone.key)
    assert 0.06 < len(moved) / 10_000 < 0.14  # about 1/N


def test_ring_hash_adding_an_endpoint_moves_keys_only_to_it() -> None:
    balancer = RingHash()
    before = owners(balancer, TEN[:9])
    after = owners(balancer, TEN)
    moved = [k for k in range(10_000) if before[k] != after[k]]
    assert {after[k] for k in moved} == {TEN[9].key}
    assert 0.06 < len(moved) / 10_000 < 0.14


def test_ring_hash_spreads_keys_by_weight() -> None:
    heavy = Endpoint("10.0.2.1", 80, weight=2)
    light = Endpoint("10.0.2.2", 80)
    counts = collections.Counter(owners(RingHash(), (heavy, light)))
    assert 1.6 < counts[heavy.key] / counts[light.key] < 2.5


def test_ring_hash_builds_at_least_the_minimum_ring_size() -> None:
    balancer = RingHash(minimum_ring_size=2048)
    balancer.pick(TEN, PickContext(destination="p", hash_key="k"))
    assert 2048 <= balancer.ring_size < 4096
    small = RingHash(minimum_ring_size=16, maximum_ring_size=16)
    small.pick(ABC, PickContext(destination="p", hash_key="k"))
    assert small.ring_size == 18  # 16 / 3 rounds up to 6 points per endpoint


def test_ring_hash_rebuilds_only_when_the_endpoint_set_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = []
    real = balancing._hash64

    def counting(data: str) -> int:
        calls.append(data)
        return real(data)

    monkeypatch.setattr(balancing, "_hash64", counting)
    balancer = RingHash()
    balancer.pick(TEN, PickContext(destination="p", hash_key="k"))
    assert len(calls) == 1280 + 1
    calls.clear()
    balancer.pick(list(TEN), PickContext(destination="p", hash_key="k"))
    assert calls == ["k"]
    balancer.pick(TEN[:9], PickContext(destination="p", hash_key="k"))
    assert len(calls) == 1 + 1152 + 1


def test_ring_hash_without_a_key_falls_back_to_round_robin() -> None:
    balancer = RingHash(fallback=RoundRobin(randomize_start=False))
    assert picks(balancer, ABC, 6) == "abcabc"


def test_ring_hash_exclude_walks_to_the_next_endpoint_deterministically() -> None:
    balancer = RingHash()
    owner = balancer.pick(TEN, PickContext(destination="p", hash_key="bob"))
    retry = PickContext(destination="p", hash_key="bob", exclude=frozenset({owner.key}))
    second = balancer.pick(TEN, retry)
    assert second != owner
    assert all(balancer.pick(TEN, retry) is second for _ in range(10))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"minimum_ring_size": 0}, "minimum_ring_size"),
        ({"maximum_ring_size": 10**9}, "maximum_ring_size"),
        ({"minimum_ring_size": 100, "maximum_ring_size": 50}, "maximum_ring_size"),
    ],
)
def test_ring_hash_rejects_bad_sizes(kwargs: dict[str, int], field: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        RingHash(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


# --- LocalityAware -------------------------------------------------------------------------

HERE = Locality("eu-west", "eu-west-1a", "rack-1")
SAME_SUBZONE = Endpoint("10.1.0.1", 80, locality=HERE)
SAME_ZONE = Endpoint("10.1.0.2", 80, locality=Locality("eu-west", "eu-west-1a", "rack-2"))
SAME_REGION = Endpoint("10.1.0.3", 80, locality=Locality("eu-west", "eu-west-1b"))
FAILOVER_REGION = Endpoint("10.1.0.4", 80, locality=Locality("eu-central"))
FAR = Endpoint("10.1.0.5", 80, locality=Locality("us-east", "eu-west-1a"))
UNKNOWN = Endpoint("10.1.0.6", 80)
WORLD = (FAR, UNKNOWN, FAILOVER_REGION, SAME_REGION, SAME_ZONE, SAME_SUBZONE)


def test_locality_aware_fails_over_level_by_level() -> None:
    balancer = LocalityAware(RoundRobin(), local=HERE, failover={"eu-west": "eu-central"})
    remaining = list(WORLD)
    for expected in (SAME_SUBZONE, SAME_ZONE, SAME_REGION, FAILOVER_REGION):
        endpoints = tuple(remaining)
        assert {balancer.pick(endpoints, CTX) for _ in range(10)} == {expected}
        remaining.remove(expected)
    assert {balancer.pick(tuple(remaining), CTX) for _ in range(10)} == {FAR, UNKNOWN}


def test_locality_aware_priorities_without_failover_put_other_regions_last() -> None:
    balancer = LocalityAware(RoundRobin(), failover=[{"from": "us-east", "to": "eu-west"}])
    assert balancer.priorities(WORLD, HERE) == (
        (SAME_SUBZONE,),
        (SAME_ZONE,),
        (SAME_REGION,),
        (FAR, UNKNOWN, FAILOVER_REGION),
    )


def test_locality_aware_uses_the_callers_locality_from_the_context() -> None:
    balancer = LocalityAware(RoundRobin(), local=HERE)
    ctx = PickContext(destination="p", local=Locality("us-east"))
    assert {balancer.pick(WORLD, ctx) for _ in range(5)} == {FAR}


def test_locality_aware_without_a_locality_balances_over_everything() -> None:
    balancer = LocalityAware(RoundRobin(randomize_start=False))
    assert [balancer.pick(WORLD, CTX) for _ in range(6)] == list(WORLD)


def test_locality_aware_retry_moves_to_the_next_priority() -> None:
    balancer = LocalityAware(RoundRobin(), local=HERE)
    retry = PickContext(destination="p", exclude=frozenset({SAME_SUBZONE.key}))
    assert balancer.pick(WORLD, retry) is SAME_ZONE


def test_locality_aware_passes_feedback_to_the_inner_balancer() -> None:
    inner = LeastRequest()
    balancer = LocalityAware(inner, local=HERE)
    token = balancer.on_start(SAME_ZONE)
    assert inner.in_flight(SAME_ZONE) == 1
    balancer.on_complete(token, latency_s=0.1, failed=False)
    assert inner.in_flight(SAME_ZONE) == 0


@pytest.mark.parametrize(
    ("failover", "field", "message"),
    [
        ([{"from": "eu"}], "failover[0]", "expected a mapping with exactly 'from' and 'to'"),
        ([{"from": "eu", "to": "eu"}], "failover[0].to", "expected 'to' to differ from 'from'"),
        ([{"from": "eu/a", "to": "us"}], "failover[0].from", "expected a region name"),
        ("eu", "failover", "expected a list of"),
    ],
)
def test_locality_aware_rejects_bad_failover(failover: object, field: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        LocalityAware(RoundRobin(), failover=failover)  # type: ignore[arg-type]
    assert info.value.field == field
    assert message in str(info.value)


# --- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "kind"),
    [
        (None, LeastRequest),
        ({}, LeastRequest),
        ({"simple": "ROUND_ROBIN"}, RoundRobin),
        ({"simple": "LEAST_REQUEST"}, LeastRequest),
        ({"simple": "LEAST_CONN"}, LeastRequest),
        ({"simple": "RANDOM"}, Random),
        ({"simple": "PEAK_EWMA"}, PeakEwma),
        ("round_robin", RoundRobin),
        ({"consistentHash": {"httpHeaderName": "x-user"}}, RingHash),
        ({"consistentHash": {"httpCookie": {"name": "u", "ttl": "0s"}}}, RingHash),
        ({"consistentHash": {"useSourceIp": True}}, RingHash),
        ({"consistentHash": {"httpQueryParameterName": "q"}}, RingHash),
        ({"simple": "RANDOM", "localityLbSetting": {"enabled": False}}, Random),
    ],
)
def test_balancer_from_config_builds_the_named_balancer(config: object, kind: type) -> None:
    assert type(balancer_from_config(config)) is kind  # type: ignore[arg-type]


def test_balancer_from_config_applies_the_ring_size() -> None:
    for config in (
        {"consistentHash": {"useSourceIp": True, "minimumRingSize": 4096}},
        {"consistentHash": {"useSourceIp": True, "ringHash": {"minimumRingSize": 4096}}},
    ):
        balancer = balancer_from_config(config)
        assert isinstance(balancer, RingHash)
        balancer.pick(ABC, PickContext(destination="p", hash_key="k"))
        assert balancer.ring_size >= 4096


def test_balancer_from_config_wraps_locality_settings() -> None:
    balancer = balancer_from_config(
        {
            "simple": "ROUND_ROBIN",
            "localityLbSetting": {
                "enabled": True,
                "failover": [{"from": "eu-west", "to": "eu-central"}],
            },
        }
    )
    assert isinstance(balancer, LocalityAware)
    assert isinstance(balancer.inner, RoundRobin)
    ctx = PickContext(destination="p", local=HERE)
    assert balancer.pick((FAR, FAILOVER_REGION), ctx) is FAILOVER_REGION


def test_settings_parse_into_frozen_objects() -> None:
    settings = LoadBalancerSettings.from_config(
        {"consistentHash": {"httpCookie": {"name": "session", "path": "/", "ttl": "1h30m"}}}
    )
    assert settings.consistent_hash == ConsistentHash(
        http_cookie=HttpCookie(name="session", path="/", ttl=5400.0)
    )
    assert LoadBalancerSettings.from_config(settings) is settings


@pytest.mark.parametrize(
    ("config", "field", "message"),
    [
        ({"simple": "PASSTHROUGH"}, "loadBalancer.simple", "PASSTHROUGH is not supported"),
        ({"simple": "FASTEST"}, "loadBalancer.simple", "expected one of ROUND_ROBIN"),
        ({"simple": 3}, "loadBalancer.simple", "expected one of ROUND_ROBIN"),
        (
            {"warmupDurationSecs": "10s"},
            "loadBalancer.warmupDurationSecs",
            "unknown or unsupported",
        ),
        (
            {"simple": "RANDOM", "consistentHash": {"useSourceIp": True}},
            "loadBalancer.consistentHash",
            "set either 'simple' or 'consistentHash'",
        ),
        ({"consistentHash": {}}, "loadBalancer.consistentHash", "expected exactly one of"),
        (
            {"consistentHash": {"useSourceIp": True, "httpHeaderName": "x"}},
            "loadBalancer.consistentHash",
            "expected exactly one of",
        ),
        (
            {"consistentHash": {"useSourceIp": True, "maglev": {"tableSize": 7}}},
            "loadBalancer.consistentHash.maglev",
            "unknown or unsupported",
        ),
        (
            {"consistentHash": {"useSourceIp": False}},
            "loadBalancer.consistentHash.useSourceIp",
            "expected true",
        ),
        (
            {"consistentHash": {"httpHeaderName": "bad header"}},
            "loadBalancer.consistentHash.httpHeaderName",
            "expected an HTTP header name",
        ),
        (
            {"consistentHash": {"httpCookie": {"name": "u", "ttl": "soon"}}},
            "loadBalancer.consistentHash.httpCookie.ttl",
            "expected a duration",
        ),
        (
            {"consistentHash": {"httpCookie": {"ttl": "1s"}}},
            "loadBalancer.consistentHash.httpCookie.name",
            "expected a non-empty cookie name",
        ),
        (
            {"consistentHash": {"useSourceIp": True, "minimumRingSize": 0}},
            "loadBalancer.consistentHash.minimumRingSize",
            "expected an integer from 1 to 8388608",
        ),
        (
            {"consistentHash": {"useSourceIp": True, "ringHash": {"minimumRingSize": "big"}}},
            "loadBalancer.consistentHash.ringHash.minimumRingSize",
            "expected an integer",
        ),
        (
            {"localityLbSetting": {"distribute": []}},
            "loadBalancer.localityLbSetting.distribute",
            "distribute is not supported",
        ),
        (
            {"localityLbSetting": {"failoverPriority": ["x"]}},
            "loadBalancer.localityLbSetting.failoverPriority",
            "failoverPriority is not supported",
        ),
        (
            {"localityLbSetting": {"failover": [{"from": "a", "to": ""}]}},
            "loadBalancer.localityLbSetting.failover[0].to",
            "expected a region name",
        ),
        ([1, 2], "loadBalancer", "expected an algorithm name or a loadBalancer mapping"),
    ],
)
def test_balancer_from_config_names_the_bad_field(config: object, field: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        balancer_from_config(config)  # type: ignore[arg-type]
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    assert message in str(info.value)


def test_balancer_from_config_prefixes_a_custom_field_path() -> None:
    with pytest.raises(ConfigurationError) as info:
        balancer_from_config({"simple": "NOPE"}, field="trafficPolicy.loadBalancer")
    assert info.value.field == "trafficPolicy.loadBalancer.simple"
    assert info.value.value == "NOPE"


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "simple",
                    "consistentHash",
                    "localityLbSetting",
                    "httpHeaderName",
                    "httpCookie",
                    "name",
                    "ttl",
                    "path",
                    "useSourceIp",
                    "minimumRingSize",
                    "ringHash",
                    "failover",
                    "from",
                    "to",
                    "enabled",
                ]
            )
            | st.text(max_size=8),
            children,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@given(JSON)
def test_load_balancer_parser_raises_only_configuration_errors(data: object) -> None:
    try:
        settings = LoadBalancerSettings.from_config(data)  # type: ignore[arg-type]
    except ConfigurationError as exc:
        assert exc.field is not None
        assert exc.field.startswith("loadBalancer")
    else:
        assert isinstance(settings.build(), Balancer)


@given(st.text(max_size=20))
def test_cookie_ttl_parser_raises_only_configuration_errors(text: str) -> None:
    config = {"consistentHash": {"httpCookie": {"name": "u", "ttl": text}}}
    try:
        settings = LoadBalancerSettings.from_config(config)
    except ConfigurationError as exc:
        assert exc.field == "loadBalancer.consistentHash.httpCookie.ttl"
    else:
        assert settings.consistent_hash is not None
        assert settings.consistent_hash.http_cookie is not None
        assert settings.consistent_hash.http_cookie.ttl >= 0


# --- hash_key_for --------------------------------------------------------------------------


def settings_for(consistent_hash: dict[str, object]) -> LoadBalancerSettings:
    return LoadBalancerSettings.from_config({"consistentHash": consistent_hash})


def test_hash_key_from_a_header_is_case_insensitive_in_the_config() -> None:
    settings = settings_for({"httpHeaderName": "X-User"})
    assert hash_key_for(settings, {"x-user": "alice"}) == "alice"
    assert hash_key_for(settings, httpx.Headers({"X-USER": "bob"})) == "bob"
    assert hash_key_for(settings, {"x-other": "alice"}) is None


def test_hash_key_from_a_cookie_mapping_or_the_cookie_header() -> None:
    settings = settings_for({"httpCookie": {"name": "session", "ttl": "0s"}})
    assert hash_key_for(settings, {}, {"session": "s-1"}) == "s-1"
    assert hash_key_for(settings, {"cookie": 'theme=dark; session="s-2"; x=1'}) == "s-2"
    assert hash_key_for(settings, {"cookie": "theme=dark"}) is None
    assert hash_key_for(settings, {}) is None


def test_hash_key_from_the_source() -> None:
    by_ip = settings_for({"useSourceIp": True})
    assert hash_key_for(by_ip, {}, None, "cluster.local/ns/a/sa/b", "10.9.8.7") == "10.9.8.7"
    by_principal = settings_for({"useSourcePrincipal": True})
    assert (
        hash_key_for(by_principal, {}, source_principal="cluster.local/ns/a/sa/b")
        == "cluster.local/ns/a/sa/b"
    )


def test_hash_key_from_a_query_parameter() -> None:
    settings = settings_for({"httpQueryParameterName": "tenant"})
    url = httpx.URL("http://payments/api?tenant=acme&x=1")
    assert hash_key_for(settings, {}, query_params=url.params) == "acme"
    assert hash_key_for(settings, {}) is None


def test_hash_key_without_consistent_hashing_is_none() -> None:
    assert hash_key_for(None, {"x-user": "a"}) is None
    assert hash_key_for(LoadBalancerSettings.from_config({"simple": "RANDOM"}), {}) is None


def test_hash_key_drives_the_ring_end_to_end() -> None:
    settings = settings_for({"httpHeaderName": "x-user"})
    balancer = settings.build(rng=random.Random(0))
    key = hash_key_for(settings, {"x-user": "carol"})
    ctx = PickContext(destination="payments", hash_key=key)
    assert len({balancer.pick(TEN, ctx) for _ in range(20)}) == 1
