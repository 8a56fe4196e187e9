from __future__ import annotations

import math
import threading

import pytest

from meshware.exceptions import ConfigurationError
from meshware.outbound.budget import RetryBudget


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def withdraw_all(budget: RetryBudget, limit: int = 10_000) -> int:
    granted = 0
    while granted < limit and budget.try_withdraw():
        granted += 1
    return granted


def test_defaults_are_finagles() -> None:
    budget = RetryBudget(clock=FakeClock())
    assert (budget.ratio, budget.window_seconds, budget.min_retries_per_second) == (
        0.2,
        10.0,
        10.0,
    )
    assert budget.deposit_amount == 1000
    assert budget.withdrawal_amount == 5000
    # The floor alone: 10 retries a second over a 10 s window.
    assert budget.level() == 100


@pytest.mark.parametrize(
    ("ratio", "min_per_second", "window", "requests", "allowed"),
    [
        (0.2, 0.0, 10.0, 50, 10),  # 0.2 * 50
        (0.2, 0.0, 10.0, 4, 0),  # 0.8 of a retry is no retry
        (0.2, 10.0, 10.0, 0, 100),  # 10/s * 10 s
        (0.2, 10.0, 10.0, 50, 110),  # both terms add up
        (0.3, 0.0, 10.0, 10, 3),  # 3.33... rounds down
        (2.0, 0.0, 10.0, 1, 2),  # a ratio above 1: two retries per request
        (0.0, 1.0, 5.0, 1000, 5),  # requests earn nothing; the floor is 1/s * 5 s
        (0.5, 0.5, 4.0, 6, 5),  # 0.5 * 6 + 0.5 * 4
        (0.0, 0.0, 10.0, 1000, 0),  # no budget at all
    ],
)
def test_exhaustion_at_exactly_the_formula_limit(
    ratio: float, min_per_second: float, window: float, requests: int, allowed: int
) -> None:
    budget = RetryBudget(
        ratio=ratio,
        window_seconds=window,
        min_retries_per_second=min_per_second,
        clock=FakeClock(),
    )
    for _ in range(requests):
        budget.record_request()
    assert budget.level() == allowed
    assert withdraw_all(budget) == allowed
    assert budget.try_withdraw() is False
    assert budget.level() == 0


def test_a_refused_withdrawal_takes_nothing() -> None:
    budget = RetryBudget(min_retries_per_second=0.0, clock=FakeClock())
    for _ in range(4):
        budget.record_request()
    assert budget.try_withdraw() is False
    budget.record_request()  # the fifth request completes one retry's worth
    assert budget.try_withdraw() is True


def test_budget_refills_when_the_window_has_passed() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.2, window_seconds=10.0, min_retries_per_second=1.0, clock=clock)
    assert withdraw_all(budget) == 10
    clock.now += 9.99  # withdrawals still inside the window
    assert budget.try_withdraw() is False
    clock.now = 1010.0  # a full window later they have expired
    assert budget.level() == 10
    assert withdraw_all(budget) == 10


def test_deposits_expire_after_the_window() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.2, window_seconds=10.0, min_retries_per_second=0.0, clock=clock)
    for _ in range(50):
        budget.record_request()
    clock.now = 1009.99
    assert budget.level() == 10
    clock.now = 1010.0
    assert budget.level() == 0
    assert budget.try_withdraw() is False


def test_the_window_slides_in_tenths() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=1.0, window_seconds=10.0, min_retries_per_second=0.0, clock=clock)
    budget.record_request()  # slice [1000, 1001)
    clock.now = 1004.5
    budget.record_request()  # slice [1004, 1005)
    clock.now = 1009.9
    assert budget.level() == 2
    clock.now = 1010.0  # the first slice leaves the window
    assert budget.level() == 1
    clock.now = 1014.0  # and then the second
    assert budget.level() == 0


def test_withdrawals_outliving_their_deposits_leave_a_debt() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.2, window_seconds=10.0, min_retries_per_second=0.0, clock=clock)
    for _ in range(5):
        budget.record_request()
    clock.now = 1005.0
    assert budget.try_withdraw() is True
    clock.now = 1010.0  # the deposits expire, the withdrawal (made at 1005) does not yet
    assert budget.level() == 0
    for _ in range(5):
        budget.record_request()
    assert budget.try_withdraw() is False  # the new deposits first pay the debt
    clock.now = 1015.0  # the withdrawal expires too
    assert budget.try_withdraw() is True


def test_a_long_idle_period_clears_everything() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.2, min_retries_per_second=0.0, clock=clock)
    for _ in range(100):
        budget.record_request()
    clock.now += 3600.0
    assert budget.level() == 0


def test_a_clock_going_backwards_changes_nothing() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.2, min_retries_per_second=0.0, clock=clock)
    for _ in range(10):
        budget.record_request()
    clock.now -= 5.0
    assert budget.level() == 2


def test_concurrent_use_is_exact() -> None:
    budget = RetryBudget(ratio=0.2, min_retries_per_second=0.0, clock=FakeClock())
    barrier = threading.Barrier(8)

    def deposit() -> None:
        barrier.wait()
        for _ in range(1000):
            budget.record_request()

    threads = [threading.Thread(target=deposit) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert budget.level() == 1600

    granted = [0] * 8

    def withdraw(index: int) -> None:
        barrier.wait()
        for _ in range(400):
            if budget.try_withdraw():
                granted[index] += 1

    threads = [threading.Thread(target=withdraw, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(granted) == 1600
    assert budget.level() == 0


@pytest.mark.parametrize(
    ("kwargs", "field", "message"),
    [
        ({"ratio": -0.1}, "ratio", "expected a number at least 0 and at most 1000, got -0.1"),
        ({"ratio": 1001}, "ratio", "expected a number at least 0 and at most 1000, got 1001"),
        ({"ratio": math.nan}, "ratio", "expected a number at least 0 and at most 1000, got nan"),
        ({"ratio": "0.2"}, "ratio", "expected a number, got str"),
        ({"ratio": True}, "ratio", "expected a number, got bool"),
        (
            {"window_seconds": 0.5},
            "window_seconds",
            "expected a number at least 1 and at most 60, got 0.5",
        ),
        (
            {"window_seconds": 61},
            "window_seconds",
            "expected a number at least 1 and at most 60, got 61",
        ),
        (
            {"min_retries_per_second": -1},
            "min_retries_per_second",
            "expected a number at least 0, got -1",
        ),
    ],
)
def test_invalid_arguments(kwargs: dict[str, object], field: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        RetryBudget(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
    assert str(info.value) == f"{field}: {message}"


def test_repr_shows_the_level() -> None:
    budget = RetryBudget(ratio=0.5, window_seconds=2.0, min_retries_per_second=1.0)
    assert repr(budget) == (
        "RetryBudget(ratio=0.5, window_seconds=2.0, min_retries_per_second=1.0, level=2)"
    )
