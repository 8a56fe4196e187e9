"""The redis:// backend against a real redis-server (see conftest.py)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshware.exceptions import ConfigurationError
from meshware.policy.facts import RequestFacts
from meshware.policy.ratelimit import (
    Rate,
    RateLimitDecision,
    RateLimiter,
    RateLimitPolicy,
    RateLimitRule,
)
from meshware.state import BackendUnavailable, RateLimitBackend, backend_from_url
from meshware.state.redis import DEFAULT_TIMEOUT, GCRA_SHA, RedisBackend
from tests.redis_server import RedisServer

pytestmark = pytest.mark.integration

# Slow rates: the few milliseconds between commands change no whole-number figure.
FIVE_PER_HOUR = Rate(count=5, period_seconds=3600.0)
FACTS = RequestFacts(method="GET", path="/orders", source_ip="10.1.2.3")


@pytest.fixture
def backend(redis_url: str) -> Iterator[RedisBackend]:
    b = RedisBackend(redis_url)
    yield b
    b.close()


def _policy(redis_url: str, *rules: RateLimitRule, **kwargs: object) -> RateLimitPolicy:
    return RateLimitPolicy(rules=rules, backend=redis_url, **kwargs)  # type: ignore[arg-type]


def _evalsha_calls(server: RedisServer) -> tuple[int, int]:
    stats = server.info("commandstats")

    def calls(name: str) -> int:
        entry = stats.get(f"cmdstat_{name}")
        return int(entry.split(",")[0].split("=")[1]) if entry else 0

    return calls("evalsha"), calls("eval")


def test_is_a_rate_limit_backend(backend: RedisBackend) -> None:
    assert isinstance(backend, RateLimitBackend)


def test_burst_then_denied(backend: RedisBackend) -> None:
    results = [backend.acquire("k", FIVE_PER_HOUR, 1, 0.0) for _ in range(6)]
    assert [r.allowed for r in results] == [True] * 5 + [False]
    assert [r.remaining for r in results] == [4, 3, 2, 1, 0, 0]
    assert [r.retry_after for r in results[:5]] == [0.0] * 5
    # The sixth waits for one emission interval (720 s) less the milliseconds elapsed.
    assert 715.0 < results[5].retry_after <= 720.0
    assert 3595.0 < results[5].reset_after <= 3600.0
    assert results[5].tat == results[4].tat


def test_cost_takes_several_tokens(backend: RedisBackend) -> None:
    first = backend.acquire("k", FIVE_PER_HOUR, 3, 0.0)
    assert (first.allowed, first.remaining) == (True, 2)
    second = backend.acquire("k", FIVE_PER_HOUR, 3, 0.0)
    assert (second.allowed, second.remaining) == (False, 2)
    assert 715.0 < second.retry_after <= 720.0
    with pytest.raises(ConfigurationError) as info:
        backend.acquire("k", FIVE_PER_HOUR, 6, 0.0)
    assert info.value.field == "cost"


def test_caller_clock_is_ignored(backend: RedisBackend) -> None:
    # Replicas with skewed clocks: the server's TIME decides, not the value passed in.
    assert backend.acquire("k", FIVE_PER_HOUR, 4, -1e9).remaining == 1
    assert backend.acquire("k", FIVE_PER_HOUR, 1, 1e12).remaining == 0
    assert not backend.acquire("k", FIVE_PER_HOUR, 1, 0.0).allowed


def test_buckets_expire_when_full_again(backend: RedisBackend, redis_control: RedisServer) -> None:
    backend.acquire("meshware:rl:x", FIVE_PER_HOUR, 2, 0.0)
    pttl = int(redis_control.command("PTTL", "meshware:rl:x")[1:-2])
    assert 1_435_000 < pttl <= 1_440_000  # 2 tokens x 720 s
    stored = float(redis_control.command("GET", "meshware:rl:x").split(b"\r\n")[1])
    assert stored > 0


def test_acquire_many_is_one_round_trip(backend: RedisBackend, redis_control: RedisServer) -> None:
    one = Rate(count=1, period_seconds=3600.0)
    backend.acquire("warm-up", one, 1, 0.0)  # loads the script (EVALSHA miss, then EVAL)
    before = _evalsha_calls(redis_control)
    for _ in range(3):
        results = backend.acquire_many([("a", one, 1), ("b", FIVE_PER_HOUR, 2)], 0.0)
    after = _evalsha_calls(redis_control)
    assert (after[0] - before[0], after[1] - before[1]) == (3, 0)
    assert [(r.allowed, r.remaining) for r in results] == [(False, 0), (False, 1)]


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_decision_with_several_rules_is_one_round_trip(
    redis_url: str, redis_control: RedisServer, mode: str
) -> None:
    policy = _policy(
        redis_url,
        RateLimitRule(name="per-ip", rate="100/hour", key="client_ip"),
        RateLimitRule(name="per-route", rate="100/hour", key="route"),
    )
    route_rules = (RateLimitRule(name="checkout", rate="3/hour", key="client_ip"),)
    limiter = RateLimiter(policy)

    async def decide() -> RateLimitDecision:
        if mode == "sync":
            return limiter.decide(FACTS, route_rules=route_rules)
        return await limiter.decide_async(FACTS, route_rules=route_rules)

    try:
        await decide()  # loads the script
        before = _evalsha_calls(redis_control)
        decisions = [await decide() for _ in range(4)]
        after = _evalsha_calls(redis_control)
    finally:
        await limiter.aclose()
    assert (after[0] - before[0], after[1] - before[1]) == (4, 0)
    assert [(d.status, d.rule, d.remaining) for d in decisions] == [
        (200, "checkout", 1),
        (200, "checkout", 0),
        (429, "checkout", 0),
        (429, "checkout", 0),
    ]
    # Every rule was charged on every request, the limited ones included.
    assert redis_control.command("EXISTS", "meshware:rl:per-route:path=/orders") == b":1\r\n"


def test_script_flush_recovers_with_eval(backend: RedisBackend, redis_control: RedisServer) -> None:
    assert backend.acquire("k", FIVE_PER_HOUR, 1, 0.0).remaining == 4
    assert redis_control.command("SCRIPT", "EXISTS", GCRA_SHA) == b"*1\r\n:1\r\n"
    assert redis_control.command("SCRIPT", "FLUSH") == b"+OK\r\n"
    before = _evalsha_calls(redis_control)
    assert backend.acquire("k", FIVE_PER_HOUR, 1, 0.0).remaining == 3
    assert backend.acquire("k", FIVE_PER_HOUR, 1, 0.0).remaining == 2
    after = _evalsha_calls(redis_control)
    # One EVALSHA miss and one EVAL re-caching the script, then EVALSHA alone again.
    assert (after[0] - before[0], after[1] - before[1]) == (2, 1)
    assert redis_control.command("SCRIPT", "EXISTS", GCRA_SHA) == b"*1\r\n:1\r\n"


async def test_async_script_flush_recovers(
    backend: RedisBackend, redis_control: RedisServer
) -> None:
    assert (await backend.acquire_async("k", FIVE_PER_HOUR, 1, 0.0)).remaining == 4
    redis_control.command("SCRIPT", "FLUSH")
    assert (await backend.acquire_async("k", FIVE_PER_HOUR, 1, 0.0)).remaining == 3
    assert redis_control.command("SCRIPT", "EXISTS", GCRA_SHA) == b"*1\r\n:1\r\n"
    await backend.aclose()


def test_two_replicas_share_one_limit(redis_url: str) -> None:
    rule = RateLimitRule(name="orders", rate="10/hour burst 4", key="client_ip")
    replicas = [RateLimiter(_policy(redis_url, rule)) for _ in range(2)]
    try:
        decisions = [replicas[i % 2].decide(FACTS) for i in range(8)]
    finally:
        for limiter in replicas:
            limiter.close()
    assert [d.allowed for d in decisions] == [True] * 4 + [False] * 4
    assert [d.remaining for d in decisions[:4]] == [3, 2, 1, 0]
    assert {d.status for d in decisions[4:]} == {429}


def test_concurrent_burst_from_two_replicas_admits_exactly_burst(redis_url: str) -> None:
    rule = RateLimitRule(name="orders", rate="100/hour burst 30", key="client_ip")
    replicas = [RateLimiter(_policy(redis_url, rule)) for _ in range(2)]
    admitted: list[int] = []
    start = threading.Barrier(8)

    def worker(limiter: RateLimiter) -> None:
        start.wait()
        admitted.append(sum(limiter.decide(FACTS).allowed for _ in range(25)))

    threads = [threading.Thread(target=worker, args=(replicas[n % 2],)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for limiter in replicas:
        limiter.close()
    assert len(admitted) == 8
    assert sum(admitted) == 30


async def test_two_async_replicas_share_one_limit(redis_url: str) -> None:
    rule = RateLimitRule(name="orders", rate="10/hour burst 6", key="client_ip")
    replicas = [RateLimiter(_policy(redis_url, rule)) for _ in range(2)]
    try:
        decisions = await asyncio.gather(*(replicas[i % 2].decide_async(FACTS) for i in range(20)))
    finally:
        for limiter in replicas:
            await limiter.aclose()
    assert sum(d.allowed for d in decisions) == 6
    assert sorted(d.remaining for d in decisions if d.allowed and d.remaining is not None) == [
        0,
        1,
        2,
        3,
        4,
        5,
    ]
    assert all(d.status == 429 for d in decisions if not d.allowed)


def test_decision_headers_from_redis(redis_url: str) -> None:
    rule = RateLimitRule(name="orders", rate="2/hour", key="client_ip")
    limiter = RateLimiter(_policy(redis_url, rule))
    try:
        first, second, third = (limiter.decide(FACTS) for _ in range(3))
    finally:
        limiter.close()
    assert first.headers() == [
        ("RateLimit-Policy", '"orders";q=2;w=3600'),
        ("RateLimit", '"orders";r=1;t=1800'),
    ]
    assert second.headers() == [
        ("RateLimit-Policy", '"orders";q=2;w=3600'),
        ("RateLimit", '"orders";r=0;t=3600'),
    ]
    assert third.headers() == [
        ("RateLimit-Policy", '"orders";q=2;w=3600'),
        ("RateLimit", '"orders";r=0;t=3600'),
        ("Retry-After", "1800"),
    ]


def test_key_prefix_and_rule_name_make_the_redis_key(
    redis_url: str, redis_control: RedisServer
) -> None:
    rule = RateLimitRule(name="orders", rate="2/hour", key="client_ip")
    limiter = RateLimiter(_policy(redis_url, rule, key_prefix="shop:"))
    try:
        limiter.decide(FACTS)
    finally:
        limiter.close()
    assert redis_control.command("EXISTS", "shop:orders:ip=10.1.2.3") == b":1\r\n"


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_redis_down_fails_open_then_recovers(
    redis_url: str, redis_control: RedisServer, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    rule = RateLimitRule(name="orders", rate="2/hour", key="client_ip")
    limiter = RateLimiter(_policy(redis_url, rule))

    async def decide() -> RateLimitDecision:
        if mode == "sync":
            return limiter.decide(FACTS)
        return await limiter.decide_async(FACTS)

    try:
        assert (await decide()).remaining == 1
        redis_control.stop()
        with caplog.at_level(logging.WARNING, logger="meshware.ratelimit"):
            down = [await decide() for _ in range(3)]
        assert (
            down
            == [RateLimitDecision(allowed=True, status=200, backend_error=True, header_mode="ietf")]
            * 3
        )
        assert down[0].outcome == "backend-error"
        assert down[0].headers() == []
        assert limiter.backend_errors == 3
        assert len(caplog.records) == 1
        assert "rate limit backend unavailable (1 decision(s)" in caplog.records[0].message
        assert "failing open" in caplog.records[0].message
        redis_control.start()
        # A restarted Redis has lost its buckets and its script cache; both come back.
        back = [await decide() for _ in range(3)]
        assert [(d.allowed, d.backend_error, d.remaining) for d in back] == [
            (True, False, 1),
            (True, False, 0),
            (False, False, 0),
        ]
    finally:
        await limiter.aclose()


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_redis_down_fails_closed_with_503(
    redis_url: str, redis_control: RedisServer, mode: str
) -> None:
    rule = RateLimitRule(name="orders", rate="2/hour", key="client_ip")
    limiter = RateLimiter(_policy(redis_url, rule, failure_mode="closed"))
    try:
        redis_control.stop()
        decision = limiter.decide(FACTS) if mode == "sync" else await limiter.decide_async(FACTS)
        assert decision == RateLimitDecision(
            allowed=False, status=503, backend_error=True, header_mode="ietf"
        )
        assert decision.headers() == []
        assert limiter.backend_errors == 1
        redis_control.start()
        decision = limiter.decide(FACTS) if mode == "sync" else await limiter.decide_async(FACTS)
        assert (decision.allowed, decision.status, decision.backend_error) == (True, 200, False)
    finally:
        await limiter.aclose()


def test_backend_raises_backend_unavailable_without_credentials() -> None:
    with RedisServerlessPort() as port:
        backend = RedisBackend(f"redis://user:s3cret@127.0.0.1:{port}/2")
        try:
            with pytest.raises(BackendUnavailable) as info:
                backend.acquire("k", FIVE_PER_HOUR, 1, 0.0)
        finally:
            backend.close()
    assert info.value.backend == f"redis://127.0.0.1:{port}/2"
    assert str(info.value).startswith(f"redis://127.0.0.1:{port}/2: ConnectionError: ")
    assert "s3cret" not in str(info.value)
    assert info.value.__cause__ is not None


async def test_async_backend_raises_backend_unavailable() -> None:
    with RedisServerlessPort() as port:
        backend = RedisBackend(f"redis://127.0.0.1:{port}")
        try:
            with pytest.raises(BackendUnavailable) as info:
                await backend.acquire_async("k", FIVE_PER_HOUR, 1, 0.0)
        finally:
            await backend.aclose()
    assert info.value.backend == f"redis://127.0.0.1:{port}"


class RedisServerlessPort:
    """A 127.0.0.1 port that nothing listens on, for the duration of a block."""

    def __enter__(self) -> int:
        import socket

        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))  # bound but not listening: connections are refused
        port: int = self._sock.getsockname()[1]
        return port

    def __exit__(self, *exc: object) -> None:
        self._sock.close()


def test_url_options() -> None:
    assert RedisBackend("redis://127.0.0.1:6379/0").timeout == DEFAULT_TIMEOUT
    backend = RedisBackend("redis://:pw@127.0.0.1:6379/3?timeout=0.2&max_connections=8")
    assert backend.timeout == 0.2
    assert backend.url == "redis://127.0.0.1:6379/3"
    kwargs = backend._sync.connection_pool.connection_kwargs
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (0.2, 0.2)
    assert kwargs["db"] == 3
    assert backend._sync.connection_pool.max_connections == 8
    backend.close()
    tls = backend_from_url("rediss://cache.internal:6380/0?ssl_cert_reqs=required")
    assert isinstance(tls, RedisBackend)
    assert tls.url == "rediss://cache.internal:6380/0"
    tls.close()
    unix = RedisBackend("unix:///run/redis/redis.sock?db=2&timeout=1")
    assert unix.url == "unix:///run/redis/redis.sock"
    assert unix._sync.connection_pool.connection_kwargs["path"] == "/run/redis/redis.sock"
    assert unix._sync.connection_pool.connection_kwargs["db"] == 2
    unix.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            "redis://127.0.0.1:6379/0?timeout=0",
            "expected a timeout of more than 0 and at most 60 seconds, got '0'",
        ),
        (
            "redis://127.0.0.1:6379/0?timeout=soon",
            "expected a timeout of more than 0 and at most 60 seconds, got 'soon'",
        ),
        (
            "redis://127.0.0.1:6379/0?timeout=nan",
            "expected a timeout of more than 0 and at most 60 seconds, got 'nan'",
        ),
        ("redis://127.0.0.1:6379/0?retries=3", "unknown Redis URL option 'retries'; expected"),
        ("redis://127.0.0.1:99999/0", "invalid Redis URL: Port out of range 0-65535"),
        (
            "redis://127.0.0.1:6379/zero",
            "expected a database number after the host ('/0'), got '/zero'",
        ),
        ("unix:///tmp/r.sock?db=x", "invalid Redis URL: Invalid value for 'db'"),
    ],
)
def test_bad_urls_are_configuration_errors(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        RedisBackend(url)
    assert info.value.field == "backend"
    assert info.value.value == url
    assert str(info.value).startswith("backend: " + message)


@given(
    st.sampled_from(["redis://", "rediss://", "unix://", "memory://", "http://", ""]),
    st.text(max_size=40),
)
def test_backend_urls_raise_only_configuration_errors(scheme: str, rest: str) -> None:
    try:
        backend = backend_from_url(scheme + rest)
    except ConfigurationError as exc:
        assert exc.field == "backend"
        assert exc.value == scheme + rest
    else:
        assert isinstance(backend, RateLimitBackend)
        backend.close()
