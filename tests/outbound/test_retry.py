from __future__ import annotations

import dataclasses
import math
import random
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshware.exceptions import ConfigurationError
from meshware.outbound.budget import RetryBudget
from meshware.outbound.deadline import Deadline
from meshware.outbound.retry import (
    DEFAULT_RETRY_ON,
    IDEMPOTENT_METHODS,
    RetryPolicy,
    RetryReason,
    RetryState,
    RetryVerdict,
    parse_retry_after,
    parse_retry_on,
)

NOW = datetime(2030, 1, 1, 12, 0, 0, tzinfo=timezone.utc)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def wall_clock() -> float:
    return NOW.timestamp()


def upper_bound(low: float, high: float) -> float:
    return high


def classify(retry_on: str, **outcome: object) -> str | None:
    policy = RetryPolicy(retry_on=retry_on, retry_non_idempotent=True)
    verdict = policy.should_retry(1, method="GET", **outcome)  # type: ignore[arg-type]
    return verdict.condition if verdict.retry else None


# --- every retryOn condition, with Envoy's meaning ---------------------------------------

STATUS_CASES = [
    # retryOn, status, matched condition (None: no retry)
    ("5xx", 500, "5xx"),
    ("5xx", 503, "5xx"),
    ("5xx", 599, "5xx"),
    ("5xx", 499, None),
    ("5xx", 409, None),
    ("5xx", 200, None),
    ("gateway-error", 502, "gateway-error"),
    ("gateway-error", 503, "gateway-error"),
    ("gateway-error", 504, "gateway-error"),
    ("gateway-error", 500, None),
    ("gateway-error", 501, None),
    ("retriable-4xx", 409, "retriable-4xx"),
    ("retriable-4xx", 400, None),
    ("retriable-4xx", 429, None),
    ("503", 503, "503"),
    ("503", 502, None),
    ("429,503", 429, "429"),
    ("retriable-status-codes,429", 429, "429"),
    ("retriable-status-codes", 503, None),  # the token alone lists no code
    ("reset", 503, None),
    ("connect-failure", 503, None),
    ("refused-stream", 503, None),
    ("reset-before-request", 500, None),
    ("5xx,gateway-error", 502, "5xx"),
    ("gateway-error,503", 503, "gateway-error"),
]


@pytest.mark.parametrize(("retry_on", "status", "condition"), STATUS_CASES)
def test_status_conditions(retry_on: str, status: int, condition: str | None) -> None:
    assert classify(retry_on, response_status=status) == condition


ERROR_CASES = [
    # retryOn, error kind, matched condition (None: no retry)
    ("5xx", "reset", "5xx"),
    ("5xx", "connect-failure", "5xx"),
    ("5xx", "refused-stream", "5xx"),
    ("5xx", "timeout", "5xx"),
    ("gateway-error", "reset", "gateway-error"),
    ("gateway-error", "connect-failure", "gateway-error"),
    ("gateway-error", "refused-stream", "gateway-error"),
    ("gateway-error", "timeout", "gateway-error"),
    ("reset", "reset", "reset"),
    ("reset", "connect-failure", "reset"),
    ("reset", "refused-stream", "reset"),
    ("reset", "timeout", "reset"),
    ("connect-failure", "connect-failure", "connect-failure"),
    ("connect-failure", "reset", None),
    ("connect-failure", "refused-stream", None),
    ("connect-failure", "timeout", None),
    ("reset-before-request", "connect-failure", "reset-before-request"),
    ("reset-before-request", "reset", None),
    ("reset-before-request", "timeout", None),
    ("refused-stream", "refused-stream", "refused-stream"),
    ("refused-stream", "reset", None),
    ("refused-stream", "connect-failure", None),
    ("refused-stream", "timeout", None),
    ("retriable-4xx", "reset", None),
    ("503", "connect-failure", None),
    ("503", "timeout", None),
    # Envoy's order of evaluation decides which condition is reported.
    ("5xx,connect-failure", "connect-failure", "connect-failure"),
    ("5xx,reset", "timeout", "reset"),
    ("refused-stream,5xx", "refused-stream", "5xx"),
]


@pytest.mark.parametrize(("retry_on", "error_kind", "condition"), ERROR_CASES)
def test_error_conditions(retry_on: str, error_kind: str, condition: str | None) -> None:
    assert classify(retry_on, error_kind=error_kind) == condition


def test_default_conditions_are_istios_http_default() -> None:
    policy = RetryPolicy()
    assert policy.retry_on == frozenset({"connect-failure", "refused-stream", "503"})
    assert policy.retry_on == DEFAULT_RETRY_ON
    assert policy.attempts == 2
    assert policy.should_retry(1, method="GET", response_status=503).condition == "503"
    assert not policy.should_retry(1, method="GET", response_status=502)
    assert not policy.should_retry(1, method="GET", error_kind="reset")
    assert policy.should_retry(1, method="GET", error_kind="connect-failure").retry


def test_success_is_not_retried() -> None:
    verdict = RetryPolicy(retry_on="5xx").should_retry(1, method="GET", response_status=200)
    assert verdict == RetryVerdict(retry=False, reason="not-retryable", condition=None)
    assert not verdict


# --- the safe-to-repeat rule ------------------------------------------------------------


def test_post_is_never_retried_on_503_unless_opted_in() -> None:
    policy = RetryPolicy(retry_on="5xx,connect-failure")
    verdict = policy.should_retry(1, method="POST", response_status=503)
    assert verdict == RetryVerdict(retry=False, reason="unsafe-method", condition="5xx")


@pytest.mark.parametrize(
    "headers",
    [
        {"idempotency-key": "c5a2f0e1"},
        {"Idempotency-Key": "c5a2f0e1"},
        {"IDEMPOTENCY-KEY": "c5a2f0e1"},
        httpx.Headers({"Idempotency-Key": "c5a2f0e1"}),
    ],
)
def test_post_with_an_idempotency_key_is_retried(headers: dict[str, str] | httpx.Headers) -> None:
    policy = RetryPolicy(retry_on="5xx")
    verdict = policy.should_retry(1, method="POST", request_headers=headers, response_status=503)
    assert verdict == RetryVerdict(retry=True, reason="retry", condition="5xx")


@pytest.mark.parametrize("headers", [{}, {"idempotency-key": ""}, {"idempotency-key": "  "}])
def test_an_empty_idempotency_key_does_not_count(headers: dict[str, str]) -> None:
    policy = RetryPolicy(retry_on="5xx")
    verdict = policy.should_retry(1, method="POST", request_headers=headers, response_status=503)
    assert verdict.reason == "unsafe-method"


@pytest.mark.parametrize("error_kind", ["connect-failure", "refused-stream"])
@pytest.mark.parametrize("method", ["POST", "PATCH", "CONNECT"])
def test_never_delivered_requests_are_retried_for_any_method(method: str, error_kind: str) -> None:
    policy = RetryPolicy(retry_on="5xx")
    verdict = policy.should_retry(1, method=method, error_kind=error_kind)
    assert verdict == RetryVerdict(retry=True, reason="retry", condition="5xx")


@pytest.mark.parametrize("error_kind", ["reset", "timeout"])
def test_post_that_may_have_reached_the_server_is_not_retried(error_kind: str) -> None:
    policy = RetryPolicy(retry_on="5xx,reset")
    verdict = policy.should_retry(1, method="POST", error_kind=error_kind)
    assert verdict == RetryVerdict(retry=False, reason="unsafe-method", condition="reset")


def test_route_marked_retryable_allows_any_method() -> None:
    policy = RetryPolicy(retry_on="5xx")
    verdict = policy.should_retry(1, method="POST", response_status=500, route_retryable=True)
    assert verdict.retry
    assert (
        RetryPolicy(retry_on="5xx", retry_non_idempotent=True)
        .should_retry(1, method="PATCH", response_status=500)
        .retry
    )


@pytest.mark.parametrize("method", [*sorted(IDEMPOTENT_METHODS), "get", "Put"])
def test_idempotent_methods_are_retried(method: str) -> None:
    assert RetryPolicy(retry_on="503").should_retry(1, method=method, response_status=503).retry


def test_retryable_methods_can_be_narrowed() -> None:
    policy = RetryPolicy(retry_on="503", retryable_methods=frozenset({"get", "head"}))
    assert policy.retryable_methods == frozenset({"GET", "HEAD"})
    assert policy.should_retry(1, method="DELETE", response_status=503).reason == "unsafe-method"
    assert policy.is_safe_to_repeat("HEAD")
    assert not policy.is_safe_to_repeat("PUT")


# --- attempts ---------------------------------------------------------------------------


def test_attempts_count_retries_after_the_first_try() -> None:
    policy = RetryPolicy(retry_on="5xx", attempts=2)
    assert policy.should_retry(1, method="GET", response_status=500).retry
    assert policy.should_retry(2, method="GET", response_status=500).retry
    verdict = policy.should_retry(3, method="GET", response_status=500)
    assert verdict == RetryVerdict(retry=False, reason="attempts-exhausted", condition="5xx")


def test_zero_attempts_disables_retries() -> None:
    verdict = RetryPolicy(attempts=0).should_retry(1, method="GET", error_kind="connect-failure")
    assert verdict.reason == RetryReason.ATTEMPTS_EXHAUSTED


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({}, "response_status"),
        ({"response_status": 503, "error_kind": "reset"}, "error_kind"),
        ({"error_kind": "dns"}, "error_kind"),
    ],
)
def test_should_retry_needs_one_valid_outcome(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        RetryPolicy().should_retry(1, method="GET", **kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


def test_unknown_error_kind_message() -> None:
    with pytest.raises(ConfigurationError) as info:
        RetryPolicy().should_retry(1, method="GET", error_kind="dns")
    assert str(info.value) == (
        "error_kind: expected one of connect-failure, refused-stream, reset, timeout"
    )


def test_attempt_numbers_start_at_one() -> None:
    with pytest.raises(ConfigurationError) as info:
        RetryPolicy().should_retry(0, method="GET", response_status=503)
    assert info.value.field == "attempt"


# --- backoff ----------------------------------------------------------------------------


def test_backoff_ceiling_doubles_up_to_the_cap() -> None:
    policy = RetryPolicy()
    ceilings = [policy.backoff(n, uniform=upper_bound) for n in range(7)]
    assert ceilings == [0.025, 0.05, 0.1, 0.2, 0.25, 0.25, 0.25]
    assert policy.backoff(10_000, uniform=upper_bound) == 0.25


def test_backoff_is_fully_jittered_from_zero() -> None:
    calls: list[tuple[float, float]] = []

    def record(low: float, high: float) -> float:
        calls.append((low, high))
        return low

    policy = RetryPolicy(backoff_base=0.1, backoff_cap=1.0)
    assert policy.backoff(2, uniform=record) == 0.0
    assert calls == [(0.0, 0.4)]


@given(st.integers(min_value=0, max_value=200), st.integers(min_value=0, max_value=2**32))
def test_backoff_bounds_with_a_seeded_rng(retries_done: int, seed: int) -> None:
    policy = RetryPolicy(backoff_base=0.025, backoff_cap=0.25)
    delay = policy.backoff(retries_done, uniform=random.Random(seed).uniform)
    ceiling = min(0.25, 0.025 * 2 ** min(retries_done, 62))
    assert 0.0 <= delay <= ceiling
    assert delay == random.Random(seed).uniform(0.0, ceiling)


# --- Retry-After ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "delay"),
    [
        ("120", 120.0),
        ("0", 0.0),
        (" 7 ", 7.0),
        (format_datetime(NOW + timedelta(seconds=90), usegmt=True), 90.0),
        ("Tue, 01 Jan 2030 12:00:30 GMT", 30.0),
        ("Tuesday, 01-Jan-30 12:00:45 GMT", 45.0),
        ("Tue Jan  1 12:01:00 2030", 60.0),
        ("Tue, 01 Jan 2030 11:00:00 GMT", 0.0),  # in the past
        ("", None),
        ("soon", None),
        ("-5", None),
        ("1.5", None),
        ("Tue, 99 Foo 2030 99:99:99 GMT", None),
        ("99999999999999999999", 1e20),
    ],
)
def test_parse_retry_after(value: str, delay: float | None) -> None:
    assert parse_retry_after(value, now=wall_clock()) == delay


@given(st.text(max_size=60))
def test_parse_retry_after_never_raises(value: str) -> None:
    delay = parse_retry_after(value, now=wall_clock())
    assert delay is None or delay >= 0.0


def test_parse_retry_after_with_huge_digit_strings() -> None:
    assert parse_retry_after("9" * 5000) == math.inf


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_replaces_the_backoff_on_429_and_503(status: int) -> None:
    policy = RetryPolicy(retry_on=f"{status}")
    delay = policy.delay(0, response_status=status, retry_after="3", uniform=upper_bound)
    assert delay == 3.0


def test_retry_after_http_date_uses_the_wall_clock() -> None:
    policy = RetryPolicy(retry_on="503")
    header = format_datetime(NOW + timedelta(seconds=4), usegmt=True)
    assert policy.delay(0, response_status=503, retry_after=header, wall_clock=wall_clock) == 4.0


def test_retry_after_is_clamped() -> None:
    policy = RetryPolicy(retry_on="503", max_retry_after=2.5)
    assert policy.delay(0, response_status=503, retry_after="3600") == 2.5


@pytest.mark.parametrize(
    ("policy", "status", "header"),
    [
        (RetryPolicy(retry_on="5xx"), 502, "3"),  # not a 429/503
        (RetryPolicy(retry_on="503", respect_retry_after=False), 503, "3"),
        (RetryPolicy(retry_on="503"), 503, "garbage"),
        (RetryPolicy(retry_on="503"), 503, None),
    ],
)
def test_backoff_is_used_when_retry_after_does_not_apply(
    policy: RetryPolicy, status: int, header: str | None
) -> None:
    assert policy.delay(3, response_status=status, retry_after=header, uniform=upper_bound) == 0.2


# --- parsing retryOn --------------------------------------------------------------------


def test_parse_retry_on_accepts_tokens_and_codes() -> None:
    parsed = parse_retry_on(
        " 5xx, gateway-error,,reset ,connect-failure,retriable-4xx,"
        "refused-stream,retriable-status-codes,503,0429,reset-before-request"
    )
    assert parsed == frozenset(
        {
            "5xx",
            "gateway-error",
            "reset",
            "connect-failure",
            "retriable-4xx",
            "refused-stream",
            "retriable-status-codes",
            "503",
            "429",
            "reset-before-request",
        }
    )
    assert parse_retry_on(["5xx", "503"]) == frozenset({"5xx", "503"})
    assert parse_retry_on("") == frozenset()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            "5xx,bogus",
            "retry_on: unknown retryOn condition 'bogus'; expected one of 5xx, connect-failure, "
            "gateway-error, refused-stream, reset, reset-before-request, retriable-4xx, "
            "retriable-status-codes or an HTTP status code",
        ),
        ("5XX", "retry_on: unknown retryOn condition '5XX' (conditions are lower-case); "),
        ("99", "retry_on: status code 99 is outside 100-599"),
        ("600", "retry_on: status code 600 is outside 100-599"),
        (
            "unavailable",
            "retry_on: retryOn condition 'unavailable' is not supported: "
            "it is a gRPC status condition",
        ),
        (
            "envoy-ratelimited",
            "retry_on: retryOn condition 'envoy-ratelimited' is not supported: "
            "it reacts to Envoy's x-envoy-ratelimited header",
        ),
    ],
)
def test_parse_retry_on_errors(value: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_retry_on(value)
    assert str(info.value).startswith(message)
    assert info.value.field == "retry_on"


def test_parse_retry_on_rejects_non_strings() -> None:
    with pytest.raises(ConfigurationError, match="got int"):
        parse_retry_on([503])  # type: ignore[list-item]


@given(st.text(max_size=40))
def test_parse_retry_on_only_raises_configuration_error(value: str) -> None:
    try:
        parsed = parse_retry_on(value)
    except ConfigurationError:
        return
    assert all(isinstance(token, str) for token in parsed)


# --- policy validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"attempts": -1}, "attempts"),
        ({"attempts": 1.5}, "attempts"),
        ({"attempts": True}, "attempts"),
        ({"per_try_timeout": 0}, "per_try_timeout"),
        ({"per_try_timeout": math.inf}, "per_try_timeout"),
        ({"backoff_base": -0.1}, "backoff_base"),
        ({"backoff_base": 0.5, "backoff_cap": 0.25}, "backoff_cap"),
        ({"max_retry_after": math.nan}, "max_retry_after"),
        ({"retry_non_idempotent": 1}, "retry_non_idempotent"),
        ({"retry_on": "5xx,nope"}, "retry_on"),
        ({"retryable_methods": "GET"}, "retryable_methods"),
    ],
)
def test_policy_validation(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        RetryPolicy(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: expected") or "retryOn" in str(info.value)


def test_policy_progress_makes_new_objects() -> None:
    policy = RetryPolicy(retry_on="5xx")
    changed = dataclasses.replace(policy, retry_on="gateway-error")
    assert policy.should_retry(1, method="GET", response_status=500).retry
    assert not changed.should_retry(1, method="GET", response_status=500).retry
    assert changed.retry_on == frozenset({"gateway-error"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.attempts = 5  # type: ignore[misc]
    assert policy == RetryPolicy(retry_on=frozenset({"5xx"}))
    assert hash(policy) == hash(RetryPolicy(retry_on="5xx"))


# --- Istio's VirtualService retries -----------------------------------------------------


def test_from_mapping_reads_istio_fields() -> None:
    policy = RetryPolicy.from_mapping(
        {
            "attempts": 3,
            "perTryTimeout": "2s",
            "retryOn": "gateway-error,connect-failure,refused-stream,429",
            "retryRemoteLocalities": False,
            "backoff": "50ms",
        }
    )
    assert policy.attempts == 3
    assert policy.per_try_timeout == 2.0
    assert policy.retry_on == frozenset(
        {"gateway-error", "connect-failure", "refused-stream", "429"}
    )
    assert policy.backoff_base == 0.05
    assert policy.backoff_cap == pytest.approx(0.5)


def test_from_mapping_without_attempts_disables_retries_as_istio_does() -> None:
    policy = RetryPolicy.from_mapping({"retryOn": "5xx"})
    assert policy.attempts == 0
    assert not policy.should_retry(1, method="GET", response_status=500)


def test_from_mapping_with_empty_retry_on_keeps_the_default() -> None:
    assert RetryPolicy.from_mapping({"attempts": 2, "retryOn": ""}).retry_on == DEFAULT_RETRY_ON


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        (
            {"attempts": 2, "retryRemoteLocalities": True},
            "retries.retryRemoteLocalities",
            "is not supported: meshware has no locality-aware failover; "
            "remove it or set it to false",
        ),
        (
            {"attempts": 2, "retryRemoteLocalities": "yes"},
            "retries.retryRemoteLocalities",
            "expected true or false",
        ),
        (
            {"attempts": 2, "retryIgnorePreviousHosts": True},
            "retries.retryIgnorePreviousHosts",
            "is not supported here: which endpoint a retry goes to is the balancer's choice",
        ),
        (
            {"attempts": 2, "retry_on": "5xx"},
            "retries.retry_on",
            "unknown key; expected one of attempts, perTryTimeout, retryOn, backoff, "
            "retryRemoteLocalities",
        ),
        ({"attempts": -1}, "retries.attempts", "expected a whole number of retries, 0 or more"),
        ({"attempts": "3"}, "retries.attempts", "expected a whole number of retries, 0 or more"),
        (
            {"attempts": 2, "perTryTimeout": "2"},
            "retries.perTryTimeout",
            "expected a duration such as '30s', '500ms' or '1m' (units h, m, s, ms, us, ns), "
            "got '2'",
        ),
        ({"attempts": 2, "perTryTimeout": "0s"}, "retries.perTryTimeout", "expected at least 1ms"),
        (
            {"attempts": 2, "retryOn": ["5xx"]},
            "retries.retryOn",
            "expected a comma-separated string such as '5xx,reset,503'",
        ),
        (
            {"attempts": 2, "retryOn": "5xx,cancelled"},
            "retries.retryOn",
            "retryOn condition 'cancelled' is not supported: it is a gRPC status condition",
        ),
        ({"attempts": 2, "backoff": "0s"}, "retries.backoff", "expected a positive duration"),
    ],
)
def test_from_mapping_errors(spec: dict[str, object], field: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        RetryPolicy.from_mapping(spec)
    assert info.value.field == field
    assert str(info.value) == f"{field}: {message}"


def test_from_mapping_prefix_and_type() -> None:
    with pytest.raises(ConfigurationError) as info:
        RetryPolicy.from_mapping({"attempts": -2}, prefix="http[0].retries")
    assert info.value.field == "http[0].retries.attempts"
    with pytest.raises(ConfigurationError) as info:
        RetryPolicy.from_mapping(["attempts"])  # type: ignore[arg-type]
    assert info.value.field == "retries"


# --- RetryState -------------------------------------------------------------------------


def test_state_progress_is_immutable() -> None:
    policy = RetryPolicy(retry_on="5xx", attempts=2)
    first = policy.new_state(uniform=upper_bound)
    assert first.attempt == 1
    second = first.increment(method="GET", response_status=503)
    assert first.retries == 0 and first.verdict is None  # unchanged
    assert second.retries == 1
    assert second.attempt == 2
    assert second.verdict == RetryVerdict(retry=True, reason="retry", condition="5xx")
    assert second.delay == 0.025
    third = second.increment(method="GET", error_kind="reset")
    assert third.retries == 2
    assert third.delay == 0.05
    fourth = third.increment(method="GET", response_status=500)
    assert fourth.retries == 2
    assert fourth.delay == 0.0
    assert fourth.verdict == RetryVerdict(retry=False, reason="attempts-exhausted", condition="5xx")
    assert [v.reason for v in fourth.history] == ["retry", "retry", "attempts-exhausted"]


def test_state_stops_on_a_response_that_is_not_retryable() -> None:
    state = RetryState(policy=RetryPolicy(retry_on="5xx")).increment(
        method="GET", response_status=404
    )
    assert state.retries == 0
    assert state.verdict is not None and state.verdict.reason == "not-retryable"


def test_state_honours_retry_after() -> None:
    state = RetryState(policy=RetryPolicy(retry_on="429"), uniform=upper_bound)
    after = state.increment(method="GET", response_status=429, retry_after="2")
    assert after.verdict is not None and after.verdict.retry
    assert after.delay == 2.0


def test_state_with_seeded_rng_is_reproducible() -> None:
    policy = RetryPolicy(retry_on="503", attempts=3)
    state = policy.new_state(uniform=random.Random(42).uniform)
    delays = []
    for _ in range(3):
        state = state.increment(method="GET", response_status=503)
        delays.append(state.delay)
    rng = random.Random(42)
    assert delays == [rng.uniform(0.0, 0.025), rng.uniform(0.0, 0.05), rng.uniform(0.0, 0.1)]
    assert all(0.0 <= d <= c for d, c in zip(delays, (0.025, 0.05, 0.1), strict=True))


def test_state_respects_the_budget() -> None:
    budget = RetryBudget(ratio=0.2, min_retries_per_second=0.0, clock=FakeClock())
    for _ in range(5):
        budget.record_request()  # room for exactly one retry
    state = RetryState(policy=RetryPolicy(retry_on="503", attempts=5), uniform=upper_bound)
    state = state.increment(method="GET", response_status=503, budget=budget)
    assert state.verdict is not None and state.verdict.retry
    state = state.increment(method="GET", response_status=503, budget=budget)
    assert state.verdict == RetryVerdict(retry=False, reason="budget-exhausted", condition="503")
    assert state.retries == 1
    assert state.delay == 0.0


def test_state_does_not_spend_budget_on_refused_retries() -> None:
    budget = RetryBudget(ratio=0.2, min_retries_per_second=0.0, clock=FakeClock())
    for _ in range(5):
        budget.record_request()
    state = RetryState(policy=RetryPolicy(retry_on="503"))
    state.increment(method="POST", response_status=503, budget=budget)  # unsafe: no retry
    state.increment(method="GET", response_status=200, budget=budget)  # success: no retry
    assert budget.level() == 1


def test_state_gives_up_when_the_wait_would_outlast_the_deadline() -> None:
    clock = FakeClock()
    deadline = Deadline.after(0.02, clock=clock)
    state = RetryState(policy=RetryPolicy(retry_on="503"), uniform=upper_bound)
    after = state.increment(method="GET", response_status=503, deadline=deadline)
    assert after.verdict == RetryVerdict(retry=False, reason="deadline-exceeded", condition="503")
    roomy = Deadline.after(1.0, clock=clock)
    assert state.increment(method="GET", response_status=503, deadline=roomy).verdict == (
        RetryVerdict(retry=True, reason="retry", condition="503")
    )


def test_verdict_truthiness() -> None:
    assert RetryVerdict(retry=True, reason="retry", condition="5xx")
    assert not RetryVerdict(retry=False, reason="unsafe-method", condition="5xx")
