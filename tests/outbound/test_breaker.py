from __future__ import annotations

import asyncio
import math
import sys
import threading
import warnings

import pytest

from meshware.exceptions import ConfigurationError
from meshware.outbound.breaker import BreakerPolicy, BreakerState, CircuitBreaker
from meshware.outbound.errors import CircuitOpen


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Boom(Exception):
    pass


def make(
    threshold: int = 3, window: float | None = None, recovery: float = 30.0
) -> tuple[CircuitBreaker, FakeClock, list[tuple[str, str]]]:
    clock = FakeClock()
    changes: list[tuple[str, str]] = []
    breaker = CircuitBreaker(
        "payments",
        BreakerPolicy(
            failure_threshold=threshold, failure_window=window, recovery_timeout=recovery
        ),
        clock=clock,
        on_state_change=lambda b, old, new: changes.append((old.value, new.value)),
    )
    return breaker, clock, changes


def state(breaker: CircuitBreaker) -> BreakerState:
    return breaker.state


def trip(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        breaker.on_failure()


# --- closed and open --------------------------------------------------------------------


def test_consecutive_failures_open_the_breaker() -> None:
    breaker, _, changes = make(threshold=3)
    trip(breaker, 2)
    assert state(breaker) is BreakerState.CLOSED
    assert breaker.allow()
    breaker.on_failure()
    assert state(breaker) is BreakerState.OPEN
    assert not breaker.allow()
    assert changes == [("closed", "open")]


def test_a_success_resets_consecutive_failures() -> None:
    breaker, _, _ = make(threshold=3)
    trip(breaker, 2)
    breaker.on_success()
    trip(breaker, 2)
    assert state(breaker) is BreakerState.CLOSED


def test_windowed_failures_open_the_breaker() -> None:
    breaker, clock, _ = make(threshold=3, window=10.0)
    breaker.on_failure()
    breaker.on_success()  # successes do not reset a windowed count
    clock.now += 4.0
    breaker.on_failure()
    clock.now += 6.0
    breaker.on_failure()  # three failures within 10 s
    assert state(breaker) is BreakerState.OPEN


def test_windowed_failures_spread_out_do_not_open() -> None:
    breaker, clock, _ = make(threshold=3, window=10.0)
    for _ in range(10):
        breaker.on_failure()
        clock.now += 5.1  # never three within 10 s
    assert state(breaker) is BreakerState.CLOSED


def test_failures_of_one_endpoint_among_several_do_not_open() -> None:
    breaker, _, _ = make(threshold=3)
    for _ in range(10):
        breaker.on_failure("10.0.0.2:8443", sources=3)  # one dying endpoint of three
    assert state(breaker) is BreakerState.CLOSED
    breaker.on_failure("10.0.0.1:8443", sources=3)
    assert state(breaker) is BreakerState.CLOSED  # two of three
    breaker.on_failure("10.0.0.3:8443", sources=3)
    assert state(breaker) is BreakerState.OPEN  # every endpoint failed, 12 in a row


def test_a_success_forgets_which_endpoints_failed() -> None:
    breaker, _, _ = make(threshold=2)
    breaker.on_failure("a", sources=2)
    breaker.on_failure("a", sources=2)
    breaker.on_success()
    breaker.on_failure("b", sources=2)
    assert state(breaker) is BreakerState.CLOSED  # "a" failed before the success
    breaker.on_failure("a", sources=2)
    assert state(breaker) is BreakerState.OPEN


def test_a_single_endpoint_destination_opens_as_before() -> None:
    breaker, _, _ = make(threshold=3)
    for _ in range(3):
        breaker.on_failure("10.0.0.1:8443", sources=1)
    assert state(breaker) is BreakerState.OPEN


def test_windowed_failures_must_span_the_endpoints_within_the_window() -> None:
    breaker, clock, _ = make(threshold=3, window=10.0)
    breaker.on_failure("a", sources=2)
    clock.now += 20.0  # "a" is out of the window now
    breaker.on_failure("b", sources=2)
    breaker.on_failure("b", sources=2)
    breaker.on_failure("b", sources=2)
    assert state(breaker) is BreakerState.CLOSED
    clock.now += 1.0
    breaker.on_failure("a", sources=2)
    assert state(breaker) is BreakerState.OPEN


def test_a_half_open_probe_that_fails_reopens_whatever_its_source() -> None:
    breaker, clock, _ = make(threshold=1, recovery=5.0)
    breaker.on_failure("a", sources=1)
    clock.now += 5.0
    assert breaker.allow()  # the probe
    breaker.on_failure("b", sources=3)
    assert state(breaker) is BreakerState.OPEN


def test_open_breaker_refuses_with_circuit_open() -> None:
    breaker, clock, _ = make(threshold=1, recovery=30.0)
    breaker.on_failure()
    clock.now += 12.5
    with pytest.raises(CircuitOpen) as info:
        breaker.before_call()
    assert info.value.destination == "payments"
    assert str(info.value) == "payments: circuit breaker is open; next probe in 17.5s"


def test_results_arriving_while_open_are_ignored() -> None:
    breaker, clock, changes = make(threshold=1, recovery=30.0)
    breaker.on_failure()
    breaker.on_success()  # a call admitted before the trip finishes late
    breaker.on_failure()
    assert state(breaker) is BreakerState.OPEN
    clock.now += 30.0
    assert breaker.allow()  # the recovery timer was not pushed back
    assert changes == [("closed", "open"), ("open", "half-open")]


# --- half-open --------------------------------------------------------------------------


def test_half_open_admits_one_probe_and_success_closes() -> None:
    breaker, clock, changes = make(threshold=1, recovery=30.0)
    breaker.on_failure()
    clock.now += 29.999
    assert state(breaker) is BreakerState.OPEN
    clock.now = 1030.0
    assert state(breaker) is BreakerState.HALF_OPEN
    assert breaker.allow() is True  # the probe
    assert breaker.allow() is False
    with pytest.raises(CircuitOpen) as info:
        breaker.before_call()
    assert str(info.value) == (
        "payments: circuit breaker is half-open and its probe call is in flight"
    )
    breaker.on_success()
    assert state(breaker) is BreakerState.CLOSED
    assert all(breaker.allow() for _ in range(5))
    assert changes == [("closed", "open"), ("open", "half-open"), ("half-open", "closed")]


def test_a_failed_probe_reopens_for_another_recovery_timeout() -> None:
    breaker, clock, changes = make(threshold=1, recovery=30.0)
    breaker.on_failure()
    clock.now += 30.0
    assert breaker.allow()
    clock.now += 2.0
    breaker.on_failure()
    assert state(breaker) is BreakerState.OPEN
    clock.now += 29.0
    assert not breaker.allow()
    clock.now += 1.0
    assert breaker.allow()
    assert changes[-2:] == [("half-open", "open"), ("open", "half-open")]


def test_release_frees_the_probe_without_a_verdict() -> None:
    breaker, clock, _ = make(threshold=1)
    breaker.on_failure()
    clock.now += 30.0
    assert breaker.allow()
    breaker.release()
    assert state(breaker) is BreakerState.HALF_OPEN
    assert breaker.allow()
    assert not breaker.allow()


def test_a_lost_probe_is_replaced_after_the_recovery_timeout() -> None:
    breaker, clock, _ = make(threshold=1, recovery=30.0)
    breaker.on_failure()
    clock.now += 30.0
    assert breaker.allow()  # this probe never reports back
    clock.now += 29.0
    assert not breaker.allow()
    clock.now += 1.0
    assert breaker.allow()


def test_reset_closes_the_breaker() -> None:
    breaker, _, changes = make(threshold=1)
    breaker.on_failure()
    breaker.reset()
    assert state(breaker) is BreakerState.CLOSED
    assert breaker.allow()
    assert changes == [("closed", "open"), ("open", "closed")]
    breaker.reset()
    assert changes == [("closed", "open"), ("open", "closed")]


# --- as a context manager ---------------------------------------------------------------


def test_the_tripping_call_surfaces_its_own_error() -> None:
    breaker, _, _ = make(threshold=2)
    calls = 0

    def charge() -> None:
        nonlocal calls
        calls += 1
        raise Boom("card declined by upstream")

    for _ in range(2):
        with pytest.raises(Boom, match="card declined by upstream"), breaker:
            charge()
    assert state(breaker) is BreakerState.OPEN
    with pytest.raises(CircuitOpen), breaker:
        charge()
    assert calls == 2


def test_context_manager_counts_success() -> None:
    breaker, clock, _ = make(threshold=1)
    breaker.on_failure()
    clock.now += 30.0
    with breaker as entered:
        assert entered is breaker
    assert state(breaker) is BreakerState.CLOSED


def test_exceptions_that_are_not_failures_count_as_success() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(
        "payments",
        BreakerPolicy(failure_threshold=1),
        clock=clock,
        is_failure=lambda exc: not isinstance(exc, KeyError),
    )
    with pytest.raises(KeyError), breaker:
        raise KeyError("not found: the caller's mistake")
    assert state(breaker) is BreakerState.CLOSED
    with pytest.raises(Boom), breaker:
        raise Boom
    assert state(breaker) is BreakerState.OPEN


def test_keyboard_interrupt_only_releases_the_probe() -> None:
    breaker, clock, _ = make(threshold=1)
    breaker.on_failure()
    clock.now += 30.0
    with pytest.raises(KeyboardInterrupt), breaker:
        raise KeyboardInterrupt
    assert state(breaker) is BreakerState.HALF_OPEN
    assert breaker.allow()


async def test_async_context_manager() -> None:
    breaker, _, _ = make(threshold=1)

    async def call() -> str:
        async with breaker:
            raise Boom("upstream reset")

    with pytest.raises(Boom, match="upstream reset"):
        await call()
    with pytest.raises(CircuitOpen):
        await call()


async def test_half_open_admits_exactly_one_of_many_concurrent_calls() -> None:
    breaker, clock, _ = make(threshold=1, recovery=30.0)
    breaker.on_failure()
    clock.now += 30.0
    entered = 0
    release = asyncio.Event()

    async def call() -> str:
        nonlocal entered
        async with breaker:
            entered += 1
            await release.wait()
            return "ok"

    tasks = [asyncio.create_task(call()) for _ in range(50)]
    for _ in range(3):
        await asyncio.sleep(0)  # let every task reach the breaker
    refused_while_probe_out = sum(t.done() for t in tasks)
    release.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert entered == 1
    assert refused_while_probe_out == 49  # refused at once, not after the probe finished
    assert results.count("ok") == 1
    assert sum(isinstance(r, CircuitOpen) for r in results) == 49
    assert state(breaker) is BreakerState.CLOSED


async def test_a_cancelled_probe_gives_its_place_back() -> None:
    breaker, clock, _ = make(threshold=1)
    breaker.on_failure()
    clock.now += 30.0
    started = asyncio.Event()

    async def probe() -> None:
        async with breaker:
            started.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(probe())
    await started.wait()
    assert not breaker.allow()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert state(breaker) is BreakerState.HALF_OPEN
    assert breaker.allow()


def test_half_open_admits_exactly_one_thread() -> None:
    breaker, clock, _ = make(threshold=1)
    breaker.on_failure()
    clock.now += 30.0
    entered = 0
    refused = 0
    lock = threading.Lock()
    barrier = threading.Barrier(16)
    probe_may_finish = threading.Event()

    def worker() -> None:
        nonlocal entered, refused
        barrier.wait()
        try:
            with breaker:
                with lock:
                    entered += 1
                probe_may_finish.wait(5)
        except CircuitOpen:
            with lock:
                refused += 1
                everyone_else_refused = refused == 15
            if everyone_else_refused:
                probe_may_finish.set()

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (entered, refused) == (1, 15)
    assert state(breaker) is BreakerState.CLOSED


def test_using_the_breaker_raises_no_deprecation_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        breaker, clock, _ = make(threshold=1)
        with pytest.raises(Boom), breaker:
            raise Boom
        clock.now += 30.0
        with breaker:
            pass
        repr(breaker)


# --- configuration ----------------------------------------------------------------------


def test_default_policy() -> None:
    breaker = CircuitBreaker("orders")
    assert breaker.policy == BreakerPolicy(
        failure_threshold=5, failure_window=None, recovery_timeout=30.0
    )
    assert repr(breaker) == "CircuitBreaker('orders', state='closed')"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"failure_threshold": 0}, "failure_threshold"),
        ({"failure_threshold": 2.5}, "failure_threshold"),
        ({"failure_threshold": True}, "failure_threshold"),
        ({"failure_window": 0}, "failure_window"),
        ({"failure_window": math.inf}, "failure_window"),
        ({"recovery_timeout": -1}, "recovery_timeout"),
        ({"recovery_timeout": "30s"}, "recovery_timeout"),
    ],
)
def test_policy_validation(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        BreakerPolicy(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: expected")


# --- why meshware has its own breaker (docs/design-breaker.md) ---------------------------
# aiobreaker 1.2 was evaluated and rejected; these tests pin the behaviour that decided it,
# so that a future aiobreaker release that changes it is noticed.


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_aiobreaker_replaces_the_tripping_error() -> None:
    aiobreaker = pytest.importorskip("aiobreaker")

    breaker = aiobreaker.CircuitBreaker(fail_max=1)

    def fail() -> None:
        raise Boom("original")

    with pytest.raises(aiobreaker.CircuitBreakerError) as info:
        breaker.call(fail)
    assert isinstance(info.value.__cause__, Boom)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
async def test_aiobreaker_half_open_admits_every_concurrent_call() -> None:
    aiobreaker = pytest.importorskip("aiobreaker")

    breaker = aiobreaker.CircuitBreaker(fail_max=1)
    breaker.half_open()
    entered = 0
    release = asyncio.Event()

    async def slow() -> None:
        nonlocal entered
        entered += 1
        await release.wait()

    tasks = [asyncio.create_task(breaker.call_async(slow)) for _ in range(10)]
    for _ in range(3):
        await asyncio.sleep(0)
    release.set()
    await asyncio.gather(*tasks)
    assert entered == 10


@pytest.mark.skipif(sys.version_info < (3, 12), reason="datetime.utcnow() warns from 3.12")
def test_aiobreaker_warns_on_current_pythons() -> None:
    aiobreaker = pytest.importorskip("aiobreaker")

    breaker = aiobreaker.CircuitBreaker(fail_max=1)
    with pytest.warns(DeprecationWarning, match="utcnow"):
        breaker.open()
