from __future__ import annotations

import math
import threading

import pytest

from meshware.exceptions import ConfigurationError
from meshware.outbound.outlier import OutlierDetection, OutlierDetector, OutlierEvent


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


TEN = [f"10.0.0.{i}:8080" for i in range(1, 11)]


def detector(
    config: OutlierDetection | None = None, endpoints: list[str] = TEN
) -> tuple[OutlierDetector, FakeClock, list[OutlierEvent]]:
    clock = FakeClock()
    events: list[OutlierEvent] = []
    found = OutlierDetector(config, clock=clock, on_event=events.append)
    found.set_endpoints(endpoints)
    return found, clock, events


def fail(found: OutlierDetector, endpoint: str, times: int, status: int = 503) -> list[bool]:
    return [found.on_result(endpoint, status=status) for _ in range(times)]


def test_defaults_are_istios() -> None:
    config = OutlierDetection()
    assert config.consecutive_5xx_errors == 5
    assert config.consecutive_gateway_errors is None
    assert config.consecutive_local_origin_failures == 5
    assert config.split_external_local_origin_errors is False
    assert config.interval == 10.0
    assert config.base_ejection_time == 30.0
    assert config.max_ejection_percent == 10
    assert config.min_health_percent == 0
    assert config.effective_max_ejection_time == 300.0
    assert OutlierDetection(base_ejection_time=600.0).effective_max_ejection_time == 600.0


def test_five_consecutive_5xx_eject() -> None:
    found, _, events = detector()
    assert fail(found, TEN[0], 5, status=500) == [False, False, False, False, True]
    assert found.is_ejected(TEN[0])
    assert found.ejections_total == 1
    assert found.ejections_active == 1
    assert events == [
        OutlierEvent(
            action="eject",
            endpoint=TEN[0],
            reason="consecutive-5xx",
            at=1000.0,
            ejection_time=30.0,
            times_ejected=1,
        )
    ]
    assert found.healthy(TEN) == TEN[1:]


def test_a_success_resets_the_count() -> None:
    found, _, _ = detector()
    fail(found, TEN[0], 4)
    found.on_result(TEN[0], status=200)
    assert fail(found, TEN[0], 4) == [False] * 4
    assert not found.is_ejected(TEN[0])
    assert found.on_result(TEN[0], status=500) is True


def test_4xx_responses_reset_the_count() -> None:
    found, _, _ = detector()
    fail(found, TEN[0], 4)
    found.on_result(TEN[0], status=404)
    fail(found, TEN[0], 4)
    assert not found.is_ejected(TEN[0])


def test_unejection_exactly_when_the_time_is_up() -> None:
    found, clock, events = detector()
    fail(found, TEN[0], 5)
    clock.now = 1029.999
    assert found.is_ejected(TEN[0])
    assert TEN[0] not in found.healthy(TEN)
    clock.now = 1030.0
    assert not found.is_ejected(TEN[0])
    assert found.healthy(TEN) == TEN
    assert events[-1] == OutlierEvent(
        action="uneject", endpoint=TEN[0], reason=None, at=1030.0, times_ejected=1
    )
    assert found.ejections_active == 0


def test_is_ejected_at_an_explicit_time() -> None:
    found, _, _ = detector()
    fail(found, TEN[0], 5)
    assert found.is_ejected(TEN[0], now=1010.0)
    assert not found.is_ejected(TEN[0], now=1030.0)
    assert not found.is_ejected("unknown:80")


def test_counters_are_reset_when_an_endpoint_returns() -> None:
    found, clock, _ = detector()
    fail(found, TEN[0], 7)  # ejected at the 5th; two more arrive while out
    clock.now = 1030.0
    assert fail(found, TEN[0], 4) == [False] * 4
    assert found.on_result(TEN[0], status=503) is True


def test_ejection_time_grows_with_each_ejection() -> None:
    found, clock, events = detector()
    times = []
    for _ in range(12):
        fail(found, TEN[0], 5)
        eject = events[-1]
        assert eject.action == "eject"
        times.append(eject.ejection_time)
        assert eject.ejection_time is not None
        clock.now += eject.ejection_time  # back in service, fails again at once
    assert times == [
        30.0,
        60.0,
        90.0,
        120.0,
        150.0,
        180.0,
        210.0,
        240.0,
        270.0,
        300.0,
        300.0,
        300.0,
    ]
    assert [e.times_ejected for e in events if e.action == "eject"] == list(range(1, 13))


def test_time_back_in_service_shrinks_the_multiplier() -> None:
    found, clock, events = detector()
    for _ in range(3):  # multiplier 3: ejections of 30, 60 and 90 s
        fail(found, TEN[0], 5)
        clock.now += events[-1].ejection_time or 0.0
    clock.now += 25.0  # two full intervals of good service: 3 -> 1
    fail(found, TEN[0], 5)
    assert events[-1].ejection_time == 60.0  # multiplier 1 + 1


def test_a_long_healthy_period_forgives_everything() -> None:
    found, clock, events = detector()
    for _ in range(4):
        fail(found, TEN[0], 5)
        clock.now += events[-1].ejection_time or 0.0
    clock.now += 3600.0
    fail(found, TEN[0], 5)
    assert events[-1].ejection_time == 30.0


def test_max_ejection_time_caps_the_ejection() -> None:
    found, clock, events = detector(
        OutlierDetection(base_ejection_time=10.0, max_ejection_time=25.0)
    )
    for _ in range(4):
        fail(found, TEN[0], 5)
        clock.now += events[-1].ejection_time or 0.0
    assert [e.ejection_time for e in events if e.action == "eject"] == [10.0, 20.0, 25.0, 25.0]


def test_gateway_errors_count_apart_from_other_5xx() -> None:
    config = OutlierDetection(consecutive_5xx_errors=None, consecutive_gateway_errors=3)
    found, _, events = detector(config)
    found.on_result(TEN[0], status=502)
    found.on_result(TEN[0], status=500)  # a 5xx but not a gateway error: resets the count
    assert [found.on_result(TEN[0], status=s) for s in (502, 503, 504)] == [False, False, True]
    assert events[-1].reason == "consecutive-gateway-errors"


def test_gateway_errors_also_count_as_5xx() -> None:
    config = OutlierDetection(consecutive_5xx_errors=4, consecutive_gateway_errors=10)
    found, _, events = detector(config)
    assert [found.on_result(TEN[0], status=s) for s in (502, 500, 504, 503)] == [
        False,
        False,
        False,
        True,
    ]
    assert events[-1].reason == "consecutive-5xx"


def test_zero_turns_a_check_off() -> None:
    config = OutlierDetection(consecutive_5xx_errors=0, max_ejection_percent=100)
    assert config.consecutive_5xx_errors is None
    found, _, _ = detector(config)
    assert not any(fail(found, TEN[0], 50))


def test_local_origin_failures_count_as_503_without_the_split() -> None:
    found, _, events = detector()
    results = [found.on_result(TEN[0], local_origin_failure=True) for _ in range(5)]
    assert results == [False] * 4 + [True]
    assert events[-1].reason == "consecutive-5xx"


def test_split_counts_local_origin_failures_apart() -> None:
    config = OutlierDetection(
        split_external_local_origin_errors=True, consecutive_local_origin_failures=3
    )
    found, _, events = detector(config)
    for _ in range(4):  # server 5xx do not touch the local-origin count...
        found.on_result(TEN[0], status=503)
    for _ in range(2):  # ...and local failures do not touch the 5xx count
        found.on_result(TEN[0], local_origin_failure=True)
    assert not found.is_ejected(TEN[0])
    assert found.on_result(TEN[0], local_origin_failure=True) is True
    assert events[-1].reason == "consecutive-local-origin-failures"


def test_split_a_response_or_a_connection_clears_local_failures() -> None:
    config = OutlierDetection(
        split_external_local_origin_errors=True, consecutive_local_origin_failures=3
    )
    found, _, _ = detector(config)
    for _ in range(2):
        found.on_result(TEN[0], local_origin_failure=True)
    found.on_result(TEN[0], status=503)  # the server answered: the connection works
    for _ in range(2):
        found.on_result(TEN[0], local_origin_failure=True)
    found.on_result(TEN[0])  # a connection was made
    for _ in range(2):
        found.on_result(TEN[0], local_origin_failure=True)
    assert not found.is_ejected(TEN[0])


def test_a_status_and_a_local_failure_together_are_refused() -> None:
    found, _, _ = detector()
    with pytest.raises(ConfigurationError) as info:
        found.on_result(TEN[0], status=503, local_origin_failure=True)
    assert info.value.field == "local_origin_failure"


# --- maxEjectionPercent -----------------------------------------------------------------


def test_three_endpoints_at_ten_percent_eject_none_as_in_envoy() -> None:
    three = TEN[:3]
    found, _, events = detector(endpoints=three)
    assert fail(found, three[0], 5) == [False] * 5
    assert not found.is_ejected(three[0])
    assert found.ejections_overflow == 1
    assert events == [
        OutlierEvent(
            action="overflow",
            endpoint=three[0],
            reason="consecutive-5xx",
            at=1000.0,
            times_ejected=0,
        )
    ]
    # The counter that fired was reset: it takes another five to try again.
    assert fail(found, three[0], 4) == [False] * 4
    assert found.ejections_overflow == 1


def test_always_eject_one_host_ejects_the_first() -> None:
    three = TEN[:3]
    found, _, _ = detector(OutlierDetection(always_eject_one_host=True), endpoints=three)
    assert fail(found, three[0], 5)[-1] is True
    assert fail(found, three[1], 5)[-1] is False  # only the first one
    assert found.ejections_active == 1


def test_max_ejection_percent_is_never_exceeded() -> None:
    three = TEN[:3]
    found, clock, _ = detector(OutlierDetection(max_ejection_percent=34), endpoints=three)
    assert fail(found, three[0], 5)[-1] is True  # 1 of 3: 33.3 %
    assert fail(found, three[1], 5)[-1] is False  # 2 of 3 would be 66.7 %
    assert found.healthy(three) == three[1:]
    clock.now += 30.0  # the first comes back; now the second may go
    assert fail(found, three[1], 5)[-1] is True


def test_exactly_the_percentage_is_allowed() -> None:
    found, _, _ = detector(OutlierDetection(max_ejection_percent=20))
    assert fail(found, TEN[0], 5)[-1] is True
    assert fail(found, TEN[1], 5)[-1] is True  # 2 of 10 = 20 %
    assert fail(found, TEN[2], 5)[-1] is False  # 30 %
    assert found.healthy(TEN) == TEN[2:]


def test_endpoints_seen_by_healthy_count_towards_the_percentage() -> None:
    clock = FakeClock()
    found = OutlierDetector(OutlierDetection(max_ejection_percent=50), clock=clock)
    assert found.healthy(["a", "b"]) == ["a", "b"]
    assert fail(found, "a", 5)[-1] is True  # 1 of 2
    assert fail(found, "b", 5)[-1] is False


def test_set_endpoints_forgets_removed_endpoints() -> None:
    found, _, _ = detector(OutlierDetection(max_ejection_percent=50), endpoints=["a", "b"])
    fail(found, "a", 5)
    assert found.ejections_active == 1
    found.set_endpoints(["b", "c", "d", "e"])
    assert found.ejections_active == 0
    assert not found.is_ejected("a")
    assert fail(found, "b", 5)[-1] is True
    assert fail(found, "c", 5)[-1] is True  # 2 of 4


# --- minHealthPercent: panic ------------------------------------------------------------


def test_below_min_health_percent_every_endpoint_is_used() -> None:
    four = TEN[:4]
    config = OutlierDetection(max_ejection_percent=100, min_health_percent=50)
    found, _, _ = detector(config, endpoints=four)
    fail(found, four[0], 5)
    assert found.healthy(four) == four[1:]  # 75 % healthy
    fail(found, four[1], 5)
    assert found.healthy(four) == four[2:]  # 50 %: not below the threshold
    fail(found, four[2], 5)
    assert found.healthy(four) == four  # 25 % < 50 %: panic, use them all
    assert found.ejections_active == 3


def test_without_min_health_percent_all_may_be_ejected() -> None:
    two = TEN[:2]
    found, _, _ = detector(OutlierDetection(max_ejection_percent=100), endpoints=two)
    fail(found, two[0], 5)
    fail(found, two[1], 5)
    assert found.healthy(two) == []


def test_healthy_keeps_the_given_order_and_type() -> None:
    found, _, _ = detector(OutlierDetection(max_ejection_percent=100), endpoints=["a", "b", "c"])
    fail(found, "b", 5)
    assert found.healthy(("c", "b", "a")) == ["c", "a"]


# --- events, threads ----------------------------------------------------------------------


def test_the_event_hook_may_call_back_into_the_detector() -> None:
    clock = FakeClock()
    seen: list[tuple[str, bool]] = []

    def on_event(event: OutlierEvent) -> None:
        seen.append((event.action, found.is_ejected(event.endpoint)))

    found = OutlierDetector(
        OutlierDetection(max_ejection_percent=100), clock=clock, on_event=on_event
    )
    fail(found, "a", 5)
    clock.now += 30.0
    found.healthy(["a"])
    assert seen == [("eject", True), ("uneject", False)]


def test_concurrent_results_eject_each_endpoint_once() -> None:
    endpoints = [f"e{i}" for i in range(8)]
    found, _, events = detector(OutlierDetection(max_ejection_percent=100), endpoints=endpoints)
    barrier = threading.Barrier(8)

    def hammer(endpoint: str) -> None:
        barrier.wait()
        for _ in range(500):
            found.on_result(endpoint, status=503)

    threads = [threading.Thread(target=hammer, args=(e,)) for e in endpoints]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert found.ejections_total == 8
    assert sorted(e.endpoint for e in events if e.action == "eject") == endpoints  # type: ignore[type-var]


# --- configuration ----------------------------------------------------------------------


def test_from_mapping_reads_istio_fields() -> None:
    config = OutlierDetection.from_mapping(
        {
            "consecutive5xxErrors": 7,
            "consecutiveGatewayErrors": 3,
            "consecutiveLocalOriginFailures": 2,
            "splitExternalLocalOriginErrors": True,
            "interval": "500ms",
            "baseEjectionTime": "1m",
            "maxEjectionPercent": 50,
            "minHealthPercent": 25,
        }
    )
    assert config == OutlierDetection(
        consecutive_5xx_errors=7,
        consecutive_gateway_errors=3,
        consecutive_local_origin_failures=2,
        split_external_local_origin_errors=True,
        interval=0.5,
        base_ejection_time=60.0,
        max_ejection_percent=50,
        min_health_percent=25,
    )


def test_from_mapping_zero_gateway_errors_means_off() -> None:
    config = OutlierDetection.from_mapping(
        {"consecutiveGatewayErrors": 0, "baseEjectionTime": "30s"}
    )
    assert config.consecutive_gateway_errors is None
    assert config.base_ejection_time == 30.0


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        (
            {"consecutiveErrors": 5},
            "outlierDetection.consecutiveErrors",
            "was removed from Istio; use consecutive5xxErrors (or consecutiveGatewayErrors for "
            "502/503/504 only)",
        ),
        (
            {"baseEjectionTimeMs": 5},
            "outlierDetection.baseEjectionTimeMs",
            "unknown key; expected one of consecutive5xxErrors, consecutiveGatewayErrors, "
            "consecutiveLocalOriginFailures, splitExternalLocalOriginErrors, interval, "
            "baseEjectionTime, maxEjectionPercent, minHealthPercent",
        ),
        (
            {"interval": "10"},
            "outlierDetection.interval",
            "expected a duration such as '30s', '500ms' or '1m' (units h, m, s, ms, us, ns), "
            "got '10'",
        ),
        ({"baseEjectionTime": "0s"}, "outlierDetection.baseEjectionTime", "expected at least 1ms"),
        (
            {"maxEjectionPercent": 101},
            "outlierDetection.maxEjectionPercent",
            "expected a percentage, 0-100",
        ),
        (
            {"consecutive5xxErrors": -1},
            "outlierDetection.consecutive5xxErrors",
            "expected a whole number, 0 or more",
        ),
        (
            {"consecutive5xxErrors": "5"},
            "outlierDetection.consecutive5xxErrors",
            "expected a whole number, 0 or more",
        ),
        (
            {"splitExternalLocalOriginErrors": "true"},
            "outlierDetection.splitExternalLocalOriginErrors",
            "expected true or false",
        ),
    ],
)
def test_from_mapping_errors(spec: dict[str, object], field: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        OutlierDetection.from_mapping(spec)
    assert info.value.field == field
    assert str(info.value) == f"{field}: {message}"


def test_from_mapping_needs_a_mapping() -> None:
    with pytest.raises(ConfigurationError) as info:
        OutlierDetection.from_mapping("5xx", prefix="trafficPolicy.outlierDetection")  # type: ignore[arg-type]
    assert info.value.field == "trafficPolicy.outlierDetection"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"consecutive_5xx_errors": -1}, "consecutive_5xx_errors"),
        ({"consecutive_gateway_errors": 2.5}, "consecutive_gateway_errors"),
        ({"consecutive_local_origin_failures": True}, "consecutive_local_origin_failures"),
        ({"interval": 0}, "interval"),
        ({"base_ejection_time": math.nan}, "base_ejection_time"),
        ({"max_ejection_time": 10.0}, "max_ejection_time"),  # below the 30 s base
        ({"max_ejection_percent": 150}, "max_ejection_percent"),
        ({"min_health_percent": -1}, "min_health_percent"),
        ({"split_external_local_origin_errors": "no"}, "split_external_local_origin_errors"),
    ],
)
def test_config_validation(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        OutlierDetection(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: expected")
