from __future__ import annotations

import random
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshware.exceptions import ConfigurationError
from meshware.outbound.faults import (
    ABORT_BODY,
    FAULT_HEADER,
    NO_FAULT,
    FaultAbort,
    FaultDecision,
    FaultDelay,
    FaultInjection,
    abort_response,
)


class NoRandom:
    def random(self) -> float:
        raise AssertionError("no random draw expected")


class Draws:
    def __init__(self, *values: float) -> None:
        self.values = list(values)

    def random(self) -> float:
        return self.values.pop(0)


# --- parsing Istio's fault block -------------------------------------------------------------


def test_delay_with_percentage() -> None:
    fault = FaultInjection.from_mapping(
        {"delay": {"fixedDelay": "5s", "percentage": {"value": 0.1}}}
    )
    assert fault == FaultInjection(delay=FaultDelay(fixed_delay=5.0, percentage=0.1))
    assert fault.abort is None


def test_delay_with_legacy_percent_and_default() -> None:
    legacy = FaultInjection.from_mapping({"delay": {"fixedDelay": "500ms", "percent": 30}})
    assert legacy.delay == FaultDelay(fixed_delay=0.5, percentage=30.0)
    default = FaultInjection.from_mapping({"delay": {"fixedDelay": "2s"}})
    assert default.delay == FaultDelay(fixed_delay=2.0, percentage=100.0)


def test_abort_with_and_without_percentage() -> None:
    fault = FaultInjection.from_mapping({"abort": {"httpStatus": 503, "percentage": {"value": 25}}})
    assert fault.abort == FaultAbort(http_status=503, percentage=25.0)
    assert FaultInjection.from_mapping({"abort": {"httpStatus": 400}}).abort == FaultAbort(
        http_status=400, percentage=100.0
    )


def test_delay_and_abort_together() -> None:
    fault = FaultInjection.from_mapping(
        {
            "delay": {"fixedDelay": "2s", "percentage": {"value": 100}},
            "abort": {"httpStatus": 503, "percentage": {"value": 10}},
        },
        field="http[0].fault",
    )
    assert fault.delay == FaultDelay(fixed_delay=2.0)
    assert fault.abort == FaultAbort(http_status=503, percentage=10.0)


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        ({}, "http[2].fault", "expected 'delay', 'abort' or both"),
        ({"delays": {}}, "http[2].fault.delays", "unknown field; expected one of delay, abort"),
        ({"delay": {"percent": 5}}, "http[2].fault.delay", "expected 'fixedDelay'"),
        ({"delay": {"fixedDelay": "0s"}}, "http[2].fault.delay.fixedDelay", "at least 1ms"),
        ({"delay": {"fixedDelay": "soon"}}, "http[2].fault.delay.fixedDelay", "duration"),
        (
            {"delay": {"exponentialDelay": "1s"}},
            "http[2].fault.delay.exponentialDelay",
            "is not supported: only fixedDelay",
        ),
        (
            {"delay": {"fixedDelay": "1s", "percent": 5, "percentage": {"value": 5}}},
            "http[2].fault.delay.percent",
            "not both",
        ),
        (
            {"delay": {"fixedDelay": "1s", "percent": 101}},
            "http[2].fault.delay.percent",
            "0 to 100",
        ),
        ({"delay": {"fixedDelay": "1s", "percent": 2.5}}, "http[2].fault.delay.percent", "whole"),
        (
            {"delay": {"fixedDelay": "1s", "percentage": 50}},
            "http[2].fault.delay.percentage",
            "expected a mapping",
        ),
        (
            {"delay": {"fixedDelay": "1s", "percentage": {"value": 100.5}}},
            "http[2].fault.delay.percentage.value",
            "expected a percentage from 0 to 100",
        ),
        (
            {"delay": {"fixedDelay": "1s", "percentage": {}}},
            "http[2].fault.delay.percentage",
            "expected 'value'",
        ),
        (
            {"delay": {"fixedDelay": "1s", "percentage": {"value": 5, "scale": 1}}},
            "http[2].fault.delay.percentage.scale",
            "unknown field",
        ),
        ({"abort": {}}, "http[2].fault.abort", "expected 'httpStatus'"),
        ({"abort": {"httpStatus": 199}}, "http[2].fault.abort.httpStatus", "from 200 to 599"),
        ({"abort": {"httpStatus": "503"}}, "http[2].fault.abort.httpStatus", "from 200 to 599"),
        ({"abort": {"httpStatus": True}}, "http[2].fault.abort.httpStatus", "from 200 to 599"),
        (
            {"abort": {"grpcStatus": "UNAVAILABLE"}},
            "http[2].fault.abort.grpcStatus",
            "is not supported: meshware's outbound calls are HTTP",
        ),
        (
            {"abort": {"http2Error": "REFUSED_STREAM"}},
            "http[2].fault.abort.http2Error",
            "is not supported",
        ),
        (
            {"abort": {"httpStatus": 500, "percent": 5}},
            "http[2].fault.abort.percent",
            "unknown field; expected one of httpStatus, percentage",
        ),
        ({"abort": "500"}, "http[2].fault.abort", "expected a mapping, got str"),
    ],
)
def test_bad_fault_blocks_name_the_field(spec: Any, field: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        FaultInjection.from_mapping(spec, field="http[2].fault")
    assert info.value.field == field
    assert message in str(info.value)
    assert str(info.value).startswith(f"{field}: ")


def test_dataclass_validation() -> None:
    with pytest.raises(ConfigurationError) as info:
        FaultInjection()
    assert info.value.field == "fault"
    with pytest.raises(ConfigurationError) as info:
        FaultDelay(fixed_delay=0.0)
    assert str(info.value) == (
        "fault.delay.fixedDelay: expected a finite delay of at least 0.001 seconds (1ms)"
    )
    with pytest.raises(ConfigurationError) as info:
        FaultDelay(fixed_delay=float("inf"))
    assert info.value.field == "fault.delay.fixedDelay"
    with pytest.raises(ConfigurationError) as info:
        FaultAbort(http_status=600)
    assert (info.value.field, info.value.value) == ("fault.abort.httpStatus", 600)
    with pytest.raises(ConfigurationError) as info:
        FaultAbort(http_status=500, percentage=float("nan"))
    assert info.value.field == "fault.abort.percentage"
    with pytest.raises(ConfigurationError) as info:
        FaultInjection(delay=FaultAbort(http_status=500))  # type: ignore[arg-type]
    assert info.value.field == "fault.delay"


# --- deciding ----------------------------------------------------------------------------------


def test_full_and_zero_percentages_need_no_draw() -> None:
    both = FaultInjection(
        delay=FaultDelay(fixed_delay=2.0), abort=FaultAbort(http_status=503, percentage=0.0)
    )
    assert both.decide(NoRandom()) == FaultDecision(delay_s=2.0, abort_status=None)
    assert FaultInjection(abort=FaultAbort(http_status=500)).decide(NoRandom()) == FaultDecision(
        0.0, 500
    )


def test_delay_and_abort_are_drawn_independently_in_order() -> None:
    fault = FaultInjection(
        delay=FaultDelay(fixed_delay=1.5, percentage=50.0),
        abort=FaultAbort(http_status=503, percentage=10.0),
    )
    assert fault.decide(Draws(0.49, 0.09)) == FaultDecision(1.5, 503)
    assert fault.decide(Draws(0.49, 0.10)) == FaultDecision(1.5, None)
    assert fault.decide(Draws(0.50, 0.05)) == FaultDecision(0.0, 503)
    assert fault.decide(Draws(0.50, 0.50)) is NO_FAULT


def test_decisions_are_prebuilt() -> None:
    fault = FaultInjection(delay=FaultDelay(fixed_delay=1.0), abort=FaultAbort(http_status=500))
    assert fault.decide(NoRandom()) is fault.decide(NoRandom())


def test_percentages_hold_over_many_calls() -> None:
    fault = FaultInjection(
        delay=FaultDelay(fixed_delay=1.0, percentage=30.0),
        abort=FaultAbort(http_status=500, percentage=5.0),
    )
    rng = random.Random(7)
    decisions = [fault.decide(rng) for _ in range(10_000)]
    delayed = sum(1 for d in decisions if d.delay_s)
    aborted = sum(1 for d in decisions if d.abort_status == 500)
    assert abs(delayed / 10_000 - 0.30) <= 0.015
    assert abs(aborted / 10_000 - 0.05) <= 0.01


def test_decision_kind_and_truth() -> None:
    assert NO_FAULT.kind is None and not NO_FAULT
    assert FaultDecision(2.0, None).kind == "delay" and FaultDecision(2.0, None)
    assert FaultDecision(0.0, 503).kind == "abort"
    assert FaultDecision(2.0, 503).kind == "abort"


# --- the synthesized response ----------------------------------------------------------------


def test_abort_response_is_envoys() -> None:
    request = httpx.Request("GET", "http://ratings/ratings/0")
    response = abort_response(503, request)
    assert response.status_code == 503
    assert response.content == ABORT_BODY == b"fault filter abort"
    assert response.headers["content-type"] == "text/plain"
    assert response.headers[FAULT_HEADER] == "abort"
    assert response.headers["content-length"] == "18"
    assert response.request is request


# --- property test ---------------------------------------------------------------------------

_KEYS = st.sampled_from(
    [
        "delay",
        "abort",
        "fixedDelay",
        "percentage",
        "percent",
        "value",
        "httpStatus",
        "grpcStatus",
        "exponentialDelay",
        "x",
    ]
)
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-5, max_value=1000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["1s", "0s", "500ms", "1ms", "abc", "", "2h"]),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=2), st.dictionaries(_KEYS, children, max_size=3)
    ),
    max_leaves=15,
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(_VALUES, st.dictionaries(_KEYS, _VALUES, max_size=3)))
def test_fault_parser_raises_only_configuration_errors(spec: Any) -> None:
    try:
        fault = FaultInjection.from_mapping(spec)
    except ConfigurationError:
        return
    decision = fault.decide(random.Random(1))
    assert decision.delay_s >= 0.0
    assert decision.abort_status is None or 200 <= decision.abort_status <= 599
