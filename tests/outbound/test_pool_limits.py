from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from functools import partial

import httpx
import pytest

from meshware.exceptions import ConfigurationError
from meshware.outbound.deadline import Deadline, deadline_scope
from meshware.outbound.errors import DeadlineExceeded, PoolOverloaded
from meshware.outbound.pool_limits import UNLIMITED, ConcurrencyLimiter, ConnectionPoolLimits


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def limiter(max_connections: int, max_pending: int) -> ConcurrencyLimiter:
    return ConcurrencyLimiter(
        "inventory",
        ConnectionPoolLimits(max_connections=max_connections, max_pending_requests=max_pending),
    )


def wait_until(predicate: Callable[[], bool], limit: float = 5.0) -> None:
    # Synchronises with a worker thread; the assertions never depend on how long it took.
    done = threading.Event()
    for _ in range(int(limit / 0.001)):
        if predicate():
            return
        done.wait(0.001)
    raise AssertionError("condition not reached")


# --- the limits -------------------------------------------------------------------------


def test_defaults_are_istios() -> None:
    limits = ConnectionPoolLimits()
    assert limits.max_connections == UNLIMITED == 2**32 - 1
    assert limits.max_pending_requests == UNLIMITED
    assert limits.max_requests_per_connection is None
    assert limits.connect_timeout == 10.0
    assert limits.idle_timeout is None


def test_from_mapping_reads_istio_fields() -> None:
    limits = ConnectionPoolLimits.from_mapping(
        {
            "tcp": {"maxConnections": 100, "connectTimeout": "30ms"},
            "http": {
                "http1MaxPendingRequests": 10,
                "maxRequestsPerConnection": 1,
                "idleTimeout": "15s",
            },
        }
    )
    assert limits == ConnectionPoolLimits(
        max_connections=100,
        max_pending_requests=10,
        max_requests_per_connection=1,
        connect_timeout=0.03,
        idle_timeout=15.0,
    )


def test_from_mapping_zero_means_unset_as_in_istio() -> None:
    limits = ConnectionPoolLimits.from_mapping(
        {"tcp": {"maxConnections": 0}, "http": {"http1MaxPendingRequests": 0}}
    )
    assert limits.max_connections == UNLIMITED
    assert limits.max_pending_requests == UNLIMITED


def test_zero_pending_in_code_means_no_queue() -> None:
    assert ConnectionPoolLimits(max_pending_requests=0).max_pending_requests == 0
    assert ConnectionPoolLimits(max_requests_per_connection=0).max_requests_per_connection is None


@pytest.mark.parametrize(
    ("spec", "field", "message"),
    [
        (
            {"http": {"http2MaxRequests": 100}},
            "connectionPool.http.http2MaxRequests",
            "is not supported; understood keys are http1MaxPendingRequests, "
            "maxRequestsPerConnection, idleTimeout",
        ),
        (
            {"tcp": {"tcpKeepalive": {"time": "7200s"}}},
            "connectionPool.tcp.tcpKeepalive",
            "is not supported; understood keys are maxConnections, connectTimeout",
        ),
        ({"udp": {}}, "connectionPool.udp", "unknown key; expected tcp or http"),
        ({"tcp": 5}, "connectionPool.tcp", "expected a mapping, got int"),
        (
            {"tcp": {"maxConnections": -1}},
            "connectionPool.tcp.maxConnections",
            "expected a whole number, 0 or more (0: no limit)",
        ),
        (
            {"tcp": {"maxConnections": "100"}},
            "connectionPool.tcp.maxConnections",
            "expected a whole number, 0 or more (0: no limit)",
        ),
        (
            {"tcp": {"connectTimeout": "10"}},
            "connectionPool.tcp.connectTimeout",
            "expected a duration such as '30s', '500ms' or '1m' (units h, m, s, ms, us, ns), "
            "got '10'",
        ),
        (
            {"http": {"idleTimeout": "0s"}},
            "connectionPool.http.idleTimeout",
            "expected at least 1ms",
        ),
    ],
)
def test_from_mapping_errors(spec: dict[str, object], field: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        ConnectionPoolLimits.from_mapping(spec)
    assert info.value.field == field
    assert str(info.value) == f"{field}: {message}"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_connections": 0}, "max_connections"),
        ({"max_connections": True}, "max_connections"),
        ({"max_pending_requests": -1}, "max_pending_requests"),
        ({"max_requests_per_connection": -3}, "max_requests_per_connection"),
        ({"connect_timeout": 0}, "connect_timeout"),
        ({"idle_timeout": float("nan")}, "idle_timeout"),
    ],
)
def test_limits_validation(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        ConnectionPoolLimits(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


def test_httpx_limits() -> None:
    assert ConnectionPoolLimits().httpx_limits() == httpx.Limits(max_connections=None)
    assert ConnectionPoolLimits(max_connections=8, idle_timeout=30.0).httpx_limits() == (
        httpx.Limits(max_connections=8, keepalive_expiry=30.0)
    )


# --- the limiter, sync ------------------------------------------------------------------


def test_calls_beyond_the_queue_are_shed_immediately() -> None:
    pool = limiter(max_connections=2, max_pending=1)
    pool.acquire()
    pool.acquire()
    assert pool.in_flight == 2
    got_slot = threading.Event()

    def queued() -> None:
        pool.acquire()
        got_slot.set()

    worker = threading.Thread(target=queued)
    worker.start()
    wait_until(lambda: pool.pending == 1)
    with pytest.raises(PoolOverloaded) as info:
        pool.acquire()
    assert info.value.destination == "inventory"
    assert str(info.value) == (
        "inventory: connection pool is full: 2 in flight (maxConnections 2), 1 waiting "
        "(http1MaxPendingRequests 1); call shed"
    )
    assert pool.shed_total == 1
    assert not got_slot.is_set()
    pool.release()  # hands the slot to the queued call
    worker.join()
    assert got_slot.is_set()
    assert (pool.in_flight, pool.pending) == (2, 0)
    pool.release()
    pool.release()
    assert pool.in_flight == 0


def test_no_queue_sheds_as_soon_as_the_slots_are_taken() -> None:
    pool = limiter(max_connections=1, max_pending=0)
    with pool.slot(), pytest.raises(PoolOverloaded):
        pool.acquire()
    assert pool.in_flight == 0
    with pool.slot():
        assert pool.in_flight == 1


def test_a_waiting_call_gives_up_at_its_deadline() -> None:
    pool = limiter(max_connections=1, max_pending=5)
    pool.acquire()
    with pytest.raises(DeadlineExceeded) as info:
        pool.acquire(timeout=0.01)
    assert str(info.value) == (
        "inventory: deadline reached while waiting for a connection-pool slot (1 in flight)"
    )
    assert (pool.pending, pool.timed_out_total) == (0, 1)


def test_a_call_with_no_time_left_does_not_queue() -> None:
    pool = limiter(max_connections=1, max_pending=5)
    pool.acquire()
    clock = FakeClock()
    expired = Deadline(at=clock.now, clock=clock)
    with pytest.raises(DeadlineExceeded) as info:
        pool.acquire(deadline=expired)
    assert str(info.value) == (
        "inventory: no time left to wait for a connection-pool slot (1 in flight)"
    )
    assert pool.pending == 0
    with deadline_scope(expired), pytest.raises(DeadlineExceeded):
        pool.acquire()  # the current deadline applies too
    assert pool.timed_out_total == 2


def test_a_free_slot_is_taken_even_without_time_to_wait() -> None:
    pool = limiter(max_connections=1, max_pending=0)
    clock = FakeClock()
    pool.acquire(deadline=Deadline(at=clock.now, clock=clock))
    assert pool.in_flight == 1


def test_slot_releases_on_error() -> None:
    pool = limiter(max_connections=1, max_pending=0)
    with pytest.raises(RuntimeError), pool.slot():
        raise RuntimeError("upstream broke")
    assert pool.in_flight == 0


def test_waiters_are_served_first_come_first_served() -> None:
    pool = limiter(max_connections=1, max_pending=10)
    pool.acquire()
    order: list[int] = []

    def queued(index: int) -> None:
        pool.acquire()
        order.append(index)

    threads = []
    for index in range(5):
        thread = threading.Thread(target=queued, args=(index,))
        thread.start()
        wait_until(partial(lambda n: pool.pending == n, index + 1))
        threads.append(thread)
    for served in range(1, 6):
        pool.release()
        wait_until(partial(lambda n: len(order) == n, served))
    for thread in threads:
        thread.join()
    assert order == [0, 1, 2, 3, 4]


# --- the limiter, async -----------------------------------------------------------------


async def test_async_shedding_and_queueing() -> None:
    pool = limiter(max_connections=2, max_pending=2)
    gate = asyncio.Event()
    active = 0
    peak = 0

    async def call() -> str:
        nonlocal active, peak
        async with pool.slot_async():
            active += 1
            peak = max(peak, active)
            await gate.wait()
            active -= 1
            return "ok"

    tasks = [asyncio.create_task(call()) for _ in range(10)]
    for _ in range(3):
        await asyncio.sleep(0)
    assert (pool.in_flight, pool.pending) == (2, 2)
    shed = [t for t in tasks if t.done()]
    assert len(shed) == 6
    assert all(isinstance(t.exception(), PoolOverloaded) for t in shed)
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results.count("ok") == 4
    assert peak == 2
    assert (pool.in_flight, pool.pending, pool.shed_total) == (0, 0, 6)


async def test_async_waiter_gives_up_at_the_current_deadline() -> None:
    pool = limiter(max_connections=1, max_pending=1)
    await pool.acquire_async()
    with deadline_scope(Deadline.after(0.01)), pytest.raises(DeadlineExceeded):
        await pool.acquire_async()
    assert (pool.pending, pool.timed_out_total) == (0, 1)
    pool.release()
    assert pool.in_flight == 0


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    pool = limiter(max_connections=1, max_pending=1)
    await pool.acquire_async()
    waiting = asyncio.create_task(pool.acquire_async())
    await asyncio.sleep(0)
    assert pool.pending == 1
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert pool.pending == 0
    pool.release()  # nobody is waiting any more: the slot is simply freed
    assert pool.in_flight == 0
    await pool.acquire_async()  # and the queue accepts again
    assert pool.in_flight == 1


async def test_a_thread_release_wakes_an_async_waiter() -> None:
    pool = limiter(max_connections=1, max_pending=1)
    pool.acquire()
    waiting = asyncio.create_task(pool.acquire_async())
    await asyncio.sleep(0)
    assert pool.pending == 1
    await asyncio.to_thread(pool.release)
    await asyncio.wait_for(waiting, 5)
    assert (pool.in_flight, pool.pending) == (1, 0)


async def test_an_async_release_wakes_a_thread_waiter() -> None:
    pool = limiter(max_connections=1, max_pending=1)
    await pool.acquire_async()
    worker = asyncio.create_task(asyncio.to_thread(pool.acquire))
    while pool.pending == 0:
        await asyncio.sleep(0.001)
    pool.release()
    await asyncio.wait_for(worker, 5)
    assert (pool.in_flight, pool.pending) == (1, 0)
