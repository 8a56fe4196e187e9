from __future__ import annotations

import threading

import pytest

from meshware.exceptions import ConfigurationError
from meshware.policy.ratelimit import GcraResult, Rate, gcra
from meshware.state import RateLimitBackend, backend_from_url
from meshware.state.memory import DEFAULT_MAX_KEYS, MemoryBackend

ONE_PER_SECOND_BURST_3 = Rate(count=1, period_seconds=1.0, burst=3)


def test_is_a_rate_limit_backend() -> None:
    assert isinstance(MemoryBackend(), RateLimitBackend)


def test_charges_like_gcra() -> None:
    backend = MemoryBackend()
    tat = None
    for now in (0.0, 0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 7.25):
        expected = gcra(tat, now, ONE_PER_SECOND_BURST_3)
        assert backend.acquire("k", ONE_PER_SECOND_BURST_3, 1, now) == expected
        if expected.allowed:
            tat = expected.tat


def test_burst_then_denied_with_exact_figures() -> None:
    backend = MemoryBackend()
    results = [backend.acquire("k", ONE_PER_SECOND_BURST_3, 1, 100.0) for _ in range(4)]
    assert results == [
        GcraResult(True, 101.0, 2, 1.0, 0.0),
        GcraResult(True, 102.0, 1, 2.0, 0.0),
        GcraResult(True, 103.0, 0, 3.0, 0.0),
        GcraResult(False, 103.0, 0, 3.0, 1.0),
    ]
    assert backend.acquire("k", ONE_PER_SECOND_BURST_3, 1, 101.0) == GcraResult(
        True, 104.0, 0, 3.0, 0.0
    )


def test_keys_are_independent() -> None:
    backend = MemoryBackend()
    rate = Rate(count=1, period_seconds=60.0)
    assert backend.acquire("a", rate, 1, 0.0).allowed
    assert not backend.acquire("a", rate, 1, 0.0).allowed
    assert backend.acquire("b", rate, 1, 0.0).allowed


def test_acquire_many_keeps_order_and_charges_each() -> None:
    backend = MemoryBackend()
    one = Rate(count=1, period_seconds=10.0)
    five = Rate(count=5, period_seconds=10.0)
    first = backend.acquire_many([("x", one, 1), ("y", five, 2)], 0.0)
    assert first == [GcraResult(True, 10.0, 0, 10.0, 0.0), GcraResult(True, 4.0, 3, 4.0, 0.0)]
    second = backend.acquire_many([("x", one, 1), ("y", five, 2)], 0.0)
    assert second == [GcraResult(False, 10.0, 0, 10.0, 10.0), GcraResult(True, 8.0, 1, 8.0, 0.0)]


def test_cost_out_of_range_is_rejected_before_charging() -> None:
    backend = MemoryBackend()
    rate = Rate(count=2, period_seconds=1.0)
    with pytest.raises(ConfigurationError) as info:
        backend.acquire_many([("ok", rate, 1), ("bad", rate, 3)], 0.0)
    assert info.value.field == "cost"
    assert info.value.value == 3
    assert len(backend) == 0


def test_max_keys_evicts_least_recently_charged() -> None:
    backend = MemoryBackend(max_keys=3)
    rate = Rate(count=1, period_seconds=3600.0)
    for key in ("a", "b", "c"):
        backend.acquire(key, rate, 1, 0.0)
    backend.acquire("a", rate, 1, 0.0)  # denied, but touched: now the most recent
    backend.acquire("d", rate, 1, 0.0)  # evicts "b"
    assert len(backend) == 3
    assert list(backend._tats) == ["c", "a", "d"]
    # "b" starts again with a full bucket; "a" is still limited.
    assert backend.acquire("b", rate, 1, 0.0).allowed
    assert not backend.acquire("a", rate, 1, 0.0).allowed


def test_memory_stays_bounded_under_a_key_flood() -> None:
    backend = MemoryBackend(max_keys=100)
    rate = Rate(count=10, period_seconds=1.0)
    for i in range(10_000):
        backend.acquire(f"client-{i}", rate, 1, 0.0)
        assert len(backend) <= 100
    assert len(backend) == 100


def test_expired_buckets_are_swept() -> None:
    backend = MemoryBackend()
    rate = Rate(count=1, period_seconds=1.0)  # each bucket is full again 1 s after use
    for i in range(6):
        backend.acquire(f"k{i}", rate, 1, 0.0)
    assert len(backend) == 6
    backend.acquire("fresh", rate, 1, 5.0)  # adds one, sweeps two expired
    assert len(backend) == 5
    backend.acquire("fresh", rate, 1, 5.0)
    backend.acquire("fresh", rate, 1, 5.0)
    assert list(backend._tats) == ["fresh"]


def test_live_buckets_are_not_swept() -> None:
    backend = MemoryBackend()
    slow = Rate(count=1, period_seconds=100.0)
    backend.acquire("slow", slow, 1, 0.0)
    backend.acquire("other", slow, 1, 50.0)
    assert list(backend._tats) == ["slow", "other"]
    assert not backend.acquire("slow", slow, 1, 50.0).allowed


def test_threads_hammering_one_key_never_over_admit() -> None:
    backend = MemoryBackend()
    rate = Rate(count=10, period_seconds=60.0, burst=25)
    admitted: list[int] = []
    start = threading.Barrier(16)

    def worker() -> None:
        start.wait()
        count = 0
        for _ in range(500):
            if backend.acquire("shared", rate, 1, 1000.0).allowed:
                count += 1
        admitted.append(count)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(admitted) == 16
    assert sum(admitted) == 25


def test_threads_with_many_keys_keep_the_bound() -> None:
    backend = MemoryBackend(max_keys=50)
    rate = Rate(count=1, period_seconds=60.0)
    errors: list[BaseException] = []

    def worker(offset: int) -> None:
        try:
            for i in range(2000):
                backend.acquire(f"k{offset}-{i % 300}", rate, 1, 0.0)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(backend) == 50


async def test_async_methods_share_the_buckets() -> None:
    backend = MemoryBackend()
    assert (await backend.acquire_async("k", ONE_PER_SECOND_BURST_3, 2, 0.0)) == GcraResult(
        True, 2.0, 1, 2.0, 0.0
    )
    assert backend.acquire("k", ONE_PER_SECOND_BURST_3, 1, 0.0).remaining == 0
    assert await backend.acquire_many_async([("k", ONE_PER_SECOND_BURST_3, 1)], 0.0) == [
        GcraResult(False, 3.0, 0, 3.0, 1.0)
    ]
    await backend.aclose()
    assert len(backend) == 0


def test_close_forgets_buckets() -> None:
    backend = MemoryBackend()
    backend.acquire("k", ONE_PER_SECOND_BURST_3, 3, 0.0)
    backend.close()
    assert backend.acquire("k", ONE_PER_SECOND_BURST_3, 3, 0.0).allowed


@pytest.mark.parametrize("bad", [0, -1, True, 2.5, "10"])
def test_max_keys_must_be_a_positive_integer(bad: object) -> None:
    with pytest.raises(ConfigurationError) as info:
        MemoryBackend(max_keys=bad)  # type: ignore[arg-type]
    assert str(info.value) == "max_keys: expected a positive integer number of keys"
    assert info.value.value == bad


def test_backend_from_url_memory() -> None:
    backend = backend_from_url("memory://")
    assert isinstance(backend, MemoryBackend)
    assert backend.max_keys == DEFAULT_MAX_KEYS
    sized = backend_from_url("memory://?max_keys=500")
    assert isinstance(sized, MemoryBackend)
    assert sized.max_keys == 500


@pytest.mark.parametrize(
    "url",
    [
        "memory://somewhere",
        "memory:///path",
        "memory://?max_keys=0",
        "memory://?max_keys=-3",
        "memory://?max_keys=lots",
        "memory://?size=10",
    ],
)
def test_backend_from_url_rejects_bad_memory_urls(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        backend_from_url(url)
    assert info.value.field == "backend"
    assert info.value.value == url
    assert "memory://" in str(info.value)


@pytest.mark.parametrize("url", ["", "http://localhost", "memcached://x", "redis"])
def test_backend_from_url_rejects_unknown_schemes(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        backend_from_url(url)
    assert str(info.value) == (
        "backend: expected a backend URL 'memory://', 'redis://host:port/db', "
        "'rediss://host:port/db' or 'unix:///path'"
    )
