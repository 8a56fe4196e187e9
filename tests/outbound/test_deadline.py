from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
import threading

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshware.exceptions import ConfigurationError, MeshwareError
from meshware.outbound.deadline import (
    TIMEOUT_HEADER,
    Deadline,
    InvalidTimeoutHeader,
    check_deadline,
    current_deadline,
    deadline_scope,
    effective_timeout,
    format_timeout,
    parse_duration,
    parse_timeout,
)
from meshware.outbound.errors import DeadlineExceeded


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- the header -------------------------------------------------------------------------


def test_header_name() -> None:
    assert TIMEOUT_HEADER == "x-meshware-timeout"


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("2500m", 2.5),
        ("1H", 3600.0),
        ("2M", 120.0),
        ("30S", 30.0),
        ("250000u", 0.25),
        ("1500000n", 0.0015),
        ("0n", 0.0),
        ("00000001S", 1.0),
        ("99999999H", 99_999_999 * 3600.0),
        (" 100m\t", 0.1),
        (b"750m", 0.75),
    ],
)
def test_parse_timeout_units(value: str | bytes, seconds: float) -> None:
    assert parse_timeout(value) == seconds


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("100", "missing-unit"),
        ("100s", "bad-unit"),
        ("100ms", "bad-unit"),
        ("1.5S", "not-digits"),
        ("-5S", "not-digits"),
        ("+5S", "not-digits"),
        ("1 0S", "not-digits"),
        ("\u0663S", "not-digits"),  # an Arabic-Indic three: a digit, but not ASCII
        ("S", "missing-digits"),
        ("123456789m", "too-many-digits"),
        ("2500m,100m", "not-digits"),
    ],
)
def test_parse_timeout_rejects_malformed_values(value: str, reason: str) -> None:
    with pytest.raises(InvalidTimeoutHeader) as info:
        parse_timeout(value)
    assert info.value.reason == reason
    assert info.value.value == value
    assert str(info.value).startswith(f"invalid x-meshware-timeout header {value!r}: ")
    assert str(info.value).endswith(f"[{reason}]")


def test_invalid_header_error_is_in_the_hierarchy() -> None:
    with pytest.raises(InvalidTimeoutHeader) as info:
        parse_timeout("5sec")
    assert isinstance(info.value, MeshwareError)
    assert isinstance(info.value, ValueError)
    assert str(info.value) == (
        "invalid x-meshware-timeout header '5sec': unit 'c' is not one of H, M, S, m, u, n; "
        "expected 1-8 ASCII digits followed by a unit H, M, S, m, u or n (e.g. '2500m') "
        "[bad-unit]"
    )


def test_invalid_header_error_shortens_long_values() -> None:
    with pytest.raises(InvalidTimeoutHeader) as info:
        parse_timeout("x" * 500)
    assert "'" + "x" * 37 + "...'" in str(info.value)


@pytest.mark.parametrize(
    ("seconds", "encoded"),
    [
        (2.5, "2500m"),
        (1.0, "1S"),
        (60.0, "1M"),
        (7200.0, "2H"),
        (0.3, "300m"),
        (0.000001, "1u"),
        (1e-7, "100n"),
        (1 / 3, "333334u"),
        (0.0, "0n"),
        (-4.0, "0n"),
        (math.inf, "99999999H"),
        (1e30, "99999999H"),
    ],
)
def test_format_timeout(seconds: float, encoded: str) -> None:
    assert format_timeout(seconds) == encoded


def test_format_timeout_rejects_nan() -> None:
    with pytest.raises(ConfigurationError) as info:
        format_timeout(math.nan)
    assert info.value.field == "seconds"


@given(st.floats(min_value=0.0, max_value=1e9, allow_nan=False))
def test_format_then_parse_never_loses_time(seconds: float) -> None:
    encoded = format_timeout(seconds)
    assert 2 <= len(encoded) <= 9
    back = parse_timeout(encoded)
    # Rounded up, never down (to the nanosecond the float can carry). The coarsest step
    # between units (m to S, x1000) bounds the loss of precision to 1e-5.
    assert back >= seconds - 1e-9
    assert back <= seconds * (1 + 1e-5) + 1e-9


@given(st.text(max_size=30))
def test_parse_timeout_only_raises_its_documented_error(value: str) -> None:
    try:
        seconds = parse_timeout(value)
    except InvalidTimeoutHeader:
        return
    assert seconds >= 0.0


@given(st.binary(max_size=30))
def test_parse_timeout_bytes_only_raises_its_documented_error(value: bytes) -> None:
    with contextlib.suppress(InvalidTimeoutHeader):
        assert parse_timeout(value) >= 0.0


@given(
    st.integers(min_value=0, max_value=99_999_999),
    st.sampled_from(["H", "M", "S", "m", "u", "n"]),
)
def test_every_well_formed_value_parses(number: int, unit: str) -> None:
    scale = {"H": 3600, "M": 60, "S": 1, "m": 1e-3, "u": 1e-6, "n": 1e-9}[unit]
    assert parse_timeout(f"{number}{unit}") == pytest.approx(number * scale, rel=1e-12)


# --- Deadline ---------------------------------------------------------------------------


def test_deadline_remaining_and_expiry_follow_the_clock() -> None:
    clock = FakeClock()
    deadline = Deadline.after(2.0, clock=clock)
    assert deadline.at == 1002.0
    assert deadline.remaining() == 2.0
    assert not deadline.expired()
    clock.now = 1001.5
    assert deadline.remaining() == 0.5
    assert deadline.to_header() == "500m"
    clock.now = 1002.0
    assert deadline.expired()
    assert deadline.remaining() == 0.0
    clock.now = 1010.0
    assert deadline.remaining() == 0.0
    assert deadline.to_header() == "0n"


def test_deadline_header_round_trip_between_hosts_with_different_clocks() -> None:
    caller_clock = FakeClock(now=50.0)
    callee_clock = FakeClock(now=987654.0)  # another host: its monotonic clock is unrelated
    sent = Deadline.after(2.5, clock=caller_clock)
    caller_clock.now = 50.75
    header = sent.to_header()
    assert header == "1750m"
    received = Deadline.from_header(header, clock=callee_clock)
    assert received.at == 987654.0 + 1.75
    assert received.remaining() == 1.75


def test_deadline_from_malformed_header_raises() -> None:
    with pytest.raises(InvalidTimeoutHeader):
        Deadline.from_header("12.5S", clock=FakeClock())


def test_deadline_earliest() -> None:
    clock = FakeClock()
    soon = Deadline.after(1.0, clock=clock)
    late = Deadline.after(5.0, clock=clock)
    assert soon.earliest(late) is soon
    assert late.earliest(soon) is soon
    assert late.earliest(None) is late


@pytest.mark.parametrize("seconds", [-1.0, math.nan])
def test_deadline_after_rejects_bad_durations(seconds: float) -> None:
    with pytest.raises(ConfigurationError) as info:
        Deadline.after(seconds, clock=FakeClock())
    assert info.value.field == "seconds"


def test_deadline_equality_ignores_the_clock() -> None:
    assert Deadline(at=5.0, clock=FakeClock()) == Deadline(at=5.0)


# --- the context variable ---------------------------------------------------------------


def test_deadline_scope_sets_and_restores() -> None:
    clock = FakeClock()
    outer = Deadline.after(10.0, clock=clock)
    inner = Deadline.after(1.0, clock=clock)
    assert current_deadline() is None
    with deadline_scope(outer) as set_outer:
        assert set_outer is outer
        assert current_deadline() is outer
        with deadline_scope(inner):
            assert current_deadline() is inner
        assert current_deadline() is outer
        with deadline_scope(None):
            assert current_deadline() is None
        assert current_deadline() is outer
    assert current_deadline() is None


def test_deadline_scope_restores_after_an_error() -> None:
    deadline = Deadline.after(1.0, clock=FakeClock())
    with pytest.raises(RuntimeError), deadline_scope(deadline):
        raise RuntimeError("boom")
    assert current_deadline() is None


async def test_deadline_is_seen_by_tasks_and_to_thread() -> None:
    deadline = Deadline.after(3.0, clock=FakeClock())

    async def in_task() -> Deadline | None:
        return current_deadline()

    with deadline_scope(deadline):
        seen_by_task = await asyncio.create_task(in_task())
        seen_by_thread = await asyncio.to_thread(current_deadline)
    assert seen_by_task is deadline
    assert seen_by_thread is deadline


async def test_a_task_scope_does_not_leak_into_its_caller() -> None:
    clock = FakeClock()
    outer = Deadline.after(3.0, clock=clock)

    async def narrows() -> Deadline | None:
        with deadline_scope(Deadline.after(0.5, clock=clock)):
            await asyncio.sleep(0)
            return current_deadline()

    with deadline_scope(outer):
        narrowed = await asyncio.create_task(narrows())
        assert narrowed is not None and narrowed.at == 1000.5
        assert current_deadline() is outer


def test_plain_threads_need_copy_context() -> None:
    deadline = Deadline.after(3.0, clock=FakeClock())
    seen: dict[str, Deadline | None] = {}

    def look(name: str) -> None:
        seen[name] = current_deadline()

    with deadline_scope(deadline):
        plain = threading.Thread(target=look, args=("plain",))
        copied = threading.Thread(target=contextvars.copy_context().run, args=(look, "copied"))
        plain.start()
        copied.start()
        plain.join()
        copied.join()
    assert seen == {"plain": None, "copied": deadline}


# --- effective timeout and the fast failure ---------------------------------------------


@pytest.mark.parametrize(
    ("route", "per_try", "left", "expected"),
    [
        (None, None, None, None),
        (5.0, None, None, 5.0),
        (None, 2.0, None, 2.0),
        (None, None, 1.5, 1.5),
        (5.0, 2.0, None, 2.0),
        (1.0, 2.0, None, 1.0),
        (5.0, 2.0, 0.25, 0.25),
        (0.1, 2.0, 0.25, 0.1),
        (5.0, None, 0.0, 0.0),
    ],
)
def test_effective_timeout_is_the_smallest_limit(
    route: float | None, per_try: float | None, left: float | None, expected: float | None
) -> None:
    clock = FakeClock()
    deadline = None if left is None else Deadline(at=clock.now + left, clock=clock)
    assert effective_timeout(route, per_try, deadline) == expected


def test_effective_timeout_of_an_expired_deadline_is_zero() -> None:
    clock = FakeClock()
    deadline = Deadline.after(1.0, clock=clock)
    clock.now += 3.0
    assert effective_timeout(10.0, 2.0, deadline) == 0.0


def test_check_deadline_returns_time_left() -> None:
    clock = FakeClock()
    deadline = Deadline.after(0.75, clock=clock)
    assert check_deadline("payments", deadline) == 0.75
    assert check_deadline("payments") is None
    with deadline_scope(deadline):
        assert check_deadline("payments") == 0.75


def test_check_deadline_raises_when_no_time_is_left() -> None:
    clock = FakeClock()
    deadline = Deadline.after(0.5, clock=clock)
    clock.now += 0.625
    request = httpx.Request("GET", "http://payments/api/charge")
    with pytest.raises(DeadlineExceeded) as info:
        check_deadline("payments", deadline, request=request)
    assert info.value.destination == "payments"
    assert info.value.request is request
    assert str(info.value) == "payments: deadline exceeded 0.125s before the call was made"
    assert isinstance(info.value, httpx.TimeoutException)


def test_check_deadline_uses_the_current_deadline() -> None:
    clock = FakeClock()
    with deadline_scope(Deadline(at=clock.now, clock=clock)), pytest.raises(DeadlineExceeded):
        check_deadline("orders")


# --- durations --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("30s", 30.0),
        ("1m", 60.0),
        ("500ms", 0.5),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("1h30m", 5400.0),
        ("250us", 0.00025),
        ("250µs", 0.00025),
        ("100ns", 1e-7),
        (".5s", 0.5),
        ("0", 0.0),
        (" 2s ", 2.0),
        (3, 3.0),
        (0.25, 0.25),
    ],
)
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value, field="x.timeout") == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    ["", "30", "s", "10 s", "-1s", "1.2.3s", "1d", "1S", "abc", "٣s", True, None, [], -1, math.inf],
)
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_duration(value, field="outlierDetection.interval")
    assert info.value.field == "outlierDetection.interval"
    assert str(info.value).startswith("outlierDetection.interval: expected ")


def test_parse_duration_error_message() -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_duration("30", field="retries.perTryTimeout")
    assert str(info.value) == (
        "retries.perTryTimeout: expected a duration such as '30s', '500ms' or '1m' "
        "(units h, m, s, ms, us, ns), got '30'"
    )
    assert info.value.value == "30"


def test_parse_duration_rejects_overflow() -> None:
    with pytest.raises(ConfigurationError, match="too large"):
        parse_duration("9" * 400 + "h", field="x")


@given(st.text(max_size=20))
def test_parse_duration_only_raises_configuration_error(value: str) -> None:
    try:
        seconds = parse_duration(value, field="x")
    except ConfigurationError:
        return
    assert seconds >= 0.0
