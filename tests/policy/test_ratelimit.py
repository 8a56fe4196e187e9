from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from fractions import Fraction

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshware.exceptions import ConfigurationError
from meshware.policy.facts import RequestFacts
from meshware.policy.ratelimit import (
    GcraResult,
    Rate,
    RateLimitDecision,
    RateLimiter,
    RateLimitKey,
    RateLimitMatch,
    RateLimitPolicy,
    RateLimitRule,
    gcra,
    rate_limit,
    route_rate_limits,
)
from meshware.state.base import Acquisition, BackendUnavailable
from meshware.state.memory import MemoryBackend

ORDERS = "cluster.local/ns/shop/sa/orders"


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def facts(**kwargs: object) -> RequestFacts:
    values: dict[str, object] = {"method": "GET", "path": "/api/orders", "source_ip": "10.0.0.1"}
    values.update(kwargs)
    return RequestFacts(**values)  # type: ignore[arg-type]


# --- Rate specs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "count", "period", "burst"),
    [
        ("100/second burst 20", 100, 1.0, 20),
        ("5/minute", 5, 60.0, 5),
        ("10/s", 10, 1.0, 10),
        ("1000/hour burst 50", 1000, 3600.0, 50),
        ("2/5s", 2, 5.0, 2),
        ("3/m", 3, 60.0, 3),
        ("3/min", 3, 60.0, 3),
        ("7/h", 7, 3600.0, 7),
        ("1/day", 1, 86400.0, 1),
        ("1/d", 1, 86400.0, 1),
        ("4/2hours", 4, 7200.0, 4),
        ("  6 / 30 seconds   burst 2 ", 6, 30.0, 2),
        ("10/SECOND BURST 3", 10, 1.0, 3),
        ("1/0.5s", 1, 0.5, 1),
    ],
)
def test_parse(text: str, count: int, period: float, burst: int) -> None:
    rate = Rate.parse(text)
    assert rate == Rate(count=count, period_seconds=period, burst=burst)
    assert (rate.count, rate.period_seconds, rate.burst) == (count, period, burst)


def test_derived_values() -> None:
    rate = Rate.parse("100/second burst 20")
    assert rate.emission_interval == 0.01
    assert rate.window_seconds == 1  # 20 x 0.01 s, rounded up to a whole second
    assert Rate.parse("1000/hour burst 50").window_seconds == 180  # 50 per 3 minutes
    assert Rate.parse("5/minute").window_seconds == 60
    assert Rate.parse("2/5s").emission_interval == 2.5


@pytest.mark.parametrize(
    ("rate", "text"),
    [
        (Rate(count=100, period_seconds=1, burst=20), "100/second burst 20"),
        (Rate(count=5, period_seconds=60), "5/minute"),
        (Rate(count=2, period_seconds=5), "2/5s"),
        (Rate(count=1, period_seconds=86400), "1/day"),
        (Rate(count=9, period_seconds=3600, burst=3), "9/hour burst 3"),
    ],
)
def test_str_is_a_spec(rate: Rate, text: str) -> None:
    assert str(rate) == text
    assert Rate.parse(text) == rate


HELP = (
    "expected '<count>/[<n>]<unit>[ burst <b>]' such as '100/second burst 20', '5/minute' "
    "or '2/5s', with unit second|s|minute|m|min|hour|h|day|d"
)


@pytest.mark.parametrize("text", ["", "5", "5/", "/s", "five/minute", "5/minute burst", "5//s"])
def test_parse_errors_quote_the_text(text: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Rate.parse(text)
    assert str(info.value) == f"rate: invalid rate {text!r}: {HELP}"
    assert info.value.field == "rate"
    assert info.value.value == text


def test_parse_unknown_unit() -> None:
    with pytest.raises(ConfigurationError) as info:
        Rate.parse("5/fortnight", field="rules[0].rate")
    assert str(info.value) == (
        f"rules[0].rate: invalid rate '5/fortnight': unknown unit 'fortnight'; {HELP}"
    )


@pytest.mark.parametrize(
    ("text", "detail"),
    [
        ("0/s", "count: expected a count from 1 to 1000000000"),
        ("5/0s", "period_seconds: expected a period of more than 0 and at most 366 days"),
        ("5/400d", "period_seconds: expected a period of more than 0 and at most 366 days"),
        ("5/s burst 0", "burst: expected a burst from 1 to 1000000000"),
        ("2000000/s", "count: expected at most one request per microsecond"),
    ],
)
def test_parse_range_errors(text: str, detail: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Rate.parse(text)
    assert str(info.value).startswith(f"rate: invalid rate {text!r}: {detail}")
    assert isinstance(info.value.__cause__, ConfigurationError)


def test_parse_rejects_non_strings() -> None:
    with pytest.raises(ConfigurationError) as info:
        Rate.parse(5)  # type: ignore[arg-type]
    assert info.value.value == 5


@pytest.mark.parametrize(
    ("kwargs", "field", "value"),
    [
        ({"count": 0, "period_seconds": 1}, "count", 0),
        ({"count": True, "period_seconds": 1}, "count", True),
        ({"count": 1.5, "period_seconds": 1}, "count", 1.5),
        ({"count": 1, "period_seconds": 0}, "period_seconds", 0),
        ({"count": 1, "period_seconds": math.inf}, "period_seconds", math.inf),
        ({"count": 1, "period_seconds": "1"}, "period_seconds", "1"),
        ({"count": 1, "period_seconds": 1, "burst": -1}, "burst", -1),
        ({"count": 1, "period_seconds": 1, "burst": 2.0}, "burst", 2.0),
    ],
)
def test_rate_validation(kwargs: dict[str, object], field: str, value: object) -> None:
    with pytest.raises(ConfigurationError) as info:
        Rate(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
    assert info.value.value == value


@given(st.text(max_size=40))
def test_parse_never_raises_anything_else(text: str) -> None:
    try:
        rate = Rate.parse(text)
    except ConfigurationError as exc:
        assert exc.field == "rate"
        assert exc.value == text
    else:
        assert rate.count >= 1 and rate.burst >= 1 and rate.period_seconds > 0


@given(
    st.integers(1, 10**6),
    st.sampled_from(["s", "second", "m", "min", "minute", "h", "hour", "d", "day"]),
    st.integers(1, 30),
    st.one_of(st.none(), st.integers(1, 10**6)),
)
def test_parse_generated_specs(count: int, unit: str, multiple: int, burst: int | None) -> None:
    seconds = {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit[0]]
    text = f"{count}/{multiple}{unit}" + (f" burst {burst}" if burst else "")
    rate = Rate.parse(text)
    assert rate.count == count
    assert rate.period_seconds == seconds * multiple
    assert rate.burst == (burst or count)
    assert Rate.parse(str(rate)) == rate


# --- GCRA ---------------------------------------------------------------------------------

R3 = Rate(count=1, period_seconds=1, burst=3)  # one token a second, bucket of three


@pytest.mark.parametrize(
    ("tat", "now", "cost", "expected"),
    [
        (None, 0.0, 1, GcraResult(True, 1.0, 2, 1.0, 0.0)),
        (1.0, 0.0, 1, GcraResult(True, 2.0, 1, 2.0, 0.0)),
        (2.0, 0.0, 1, GcraResult(True, 3.0, 0, 3.0, 0.0)),
        (3.0, 0.0, 1, GcraResult(False, 3.0, 0, 3.0, 1.0)),  # burst used up
        (3.0, 0.5, 1, GcraResult(False, 3.0, 0, 2.5, 0.5)),  # half a token back
        (3.0, 1.0, 1, GcraResult(True, 4.0, 0, 3.0, 0.0)),  # exactly at retry_after
        (3.0, 1.5, 1, GcraResult(True, 4.0, 0, 2.5, 0.0)),
        (3.0, 2.5, 1, GcraResult(True, 4.0, 1, 1.5, 0.0)),  # 1.5 tokens left -> 1
        (3.0, 10.0, 1, GcraResult(True, 11.0, 2, 1.0, 0.0)),  # idle: full bucket again
        (0.5, 10.0, 3, GcraResult(True, 13.0, 0, 3.0, 0.0)),  # whole burst at once
        (2.0, 0.0, 2, GcraResult(False, 2.0, 1, 2.0, 1.0)),  # one token left, two wanted
        (2.0, 1.0, 2, GcraResult(True, 4.0, 0, 3.0, 0.0)),
    ],
)
def test_gcra_exact(tat: float | None, now: float, cost: int, expected: GcraResult) -> None:
    assert gcra(tat, now, R3, cost) == expected


def test_gcra_boundary_survives_float_rounding() -> None:
    rate = Rate.parse("10/second burst 5")
    tat = None
    for expected_remaining in (4, 3, 2, 1, 0):
        result = gcra(tat, 0.0, rate)
        assert (result.allowed, result.remaining) == (True, expected_remaining)
        tat = result.tat
    denied = gcra(tat, 0.0, rate)
    assert not denied.allowed
    assert denied.retry_after == pytest.approx(0.1)
    # 0.1 x 5 accumulates to 0.5000000000000001: the request exactly one interval later
    # must still be admitted.
    assert tat == pytest.approx(0.5)
    assert gcra(tat, 0.1, rate).allowed


@pytest.mark.parametrize("cost", [0, -1, 4])
def test_gcra_rejects_impossible_costs(cost: int) -> None:
    with pytest.raises(ConfigurationError) as info:
        gcra(None, 0.0, R3, cost)
    assert str(info.value) == (
        "cost: expected a cost from 1 to the burst (3); a larger cost could never be admitted"
    )


@given(
    count=st.integers(1, 20),
    period=st.sampled_from([1, 2, 5, 10]),
    burst=st.integers(1, 20),
    steps=st.lists(st.tuples(st.integers(0, 300), st.integers(1, 20)), max_size=40),
)
def test_gcra_is_a_token_bucket(
    count: int, period: int, burst: int, steps: list[tuple[int, int]]
) -> None:
    """GCRA admits exactly what a bucket of ``burst`` tokens refilled at count/period does."""
    rate = Rate(count=count, period_seconds=period, burst=burst)
    tokens = Fraction(burst)
    now = Fraction(0)
    tat: float | None = None
    for step, want in steps:
        cost = min(want, burst)
        dt = Fraction(step, 100)  # steps of 10 ms
        now += dt
        tokens = min(Fraction(burst), tokens + dt * count / period)
        result = gcra(tat, float(now), rate, cost)
        assert result.allowed == (tokens >= cost)
        if result.allowed:
            tokens -= cost
            tat = result.tat
        assert result.remaining == math.floor(tokens)
        assert result.reset_after == pytest.approx(float((burst - tokens) * period / count))


# --- Keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "request_facts", "expected"),
    [
        ("principal", facts(source_principal=ORDERS), f"p={ORDERS}"),
        ("principal", facts(), "ip=10.0.0.1"),
        ("principal", facts(source_ip=None), "ip=unknown"),
        ("request_principal", facts(request_principal="https://idp/alice"), "rp=https://idp/alice"),
        ("request_principal", facts(source_principal=ORDERS), "ip=10.0.0.1"),
        ("client_ip", facts(source_ip="2001:db8::1"), "ip=2001:db8::1"),
        ("route", facts(route="/api/orders/{id}"), "route=/api/orders/{id}"),
        ("route", facts(path="/api/orders/42"), "path=/api/orders/42"),
        ("route", facts(path="/a%20b"), "path=/a b"),
        ("header:X-Api-Key", facts(headers={"x-api-key": "k-123"}), "h:x-api-key=k-123"),
        ("header:x-api-key", facts(headers={"x-api-key": ""}), "ip=10.0.0.1"),
        ("header:x-api-key", facts(headers={"x-api-key": "10.0.0.1"}), "h:x-api-key=10.0.0.1"),
        (lambda f: f.claims.get("tenant"), facts(claims={"tenant": "acme"}), "fn0=acme"),
        (lambda f: None, facts(), "ip=10.0.0.1"),
        (
            ("principal", "route"),
            facts(source_principal=ORDERS, route="/x"),
            f"p={ORDERS}|route=/x",
        ),
        (("principal", "route"), facts(), "ip=10.0.0.1|path=/api/orders"),
        (("client_ip", lambda f: f.method), facts(), "ip=10.0.0.1|fn1=GET"),
        ("header:x-user", facts(headers={"x-user": "a|b%c"}), "h:x-user=a%7Cb%25c"),
    ],
)
def test_key_build(spec: object, request_facts: RequestFacts, expected: str) -> None:
    assert RateLimitKey.of(spec).build(request_facts) == expected  # type: ignore[arg-type]


def test_long_key_values_are_hashed() -> None:
    key = RateLimitKey.of("header:x-token")
    a = key.build(facts(headers={"x-token": "a" * 500}))
    b = key.build(facts(headers={"x-token": "a" * 499 + "b"}))
    assert a.startswith("h:x-token=%H") and len(a) == len("h:x-token=%H") + 32
    assert a != b
    assert a == key.build(facts(headers={"x-token": "a" * 500}))
    # Exactly at the limit the value is kept.
    assert key.build(facts(headers={"x-token": "c" * 128})) == "h:x-token=" + "c" * 128


def test_key_of_returns_keys_unchanged_and_accepts_lists() -> None:
    key = RateLimitKey(parts=("principal",))
    assert RateLimitKey.of(key) is key
    assert RateLimitKey.of(["client_ip", "route"]).parts == (  # type: ignore[arg-type]
        "client_ip",
        "route",
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "user",
            "key: unknown key kind 'user'; expected 'principal', 'request_principal', "
            "'client_ip', 'route', 'header:<name>' or a callable",
        ),
        ("header:", "key: expected a header name after 'header:' (letters, digits and -_.)"),
        ("header:a b", "key: expected a header name after 'header:' (letters, digits and -_.)"),
        (
            ("principal", 3),
            "key: expected 'principal', 'request_principal', 'client_ip', 'route', "
            "'header:<name>' or a callable(RequestFacts) -> str | None",
        ),
        ((), "key: expected at least one key part"),
    ],
)
def test_key_errors(spec: object, message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        RateLimitKey.of(spec)  # type: ignore[arg-type]
    assert str(info.value) == message


def test_key_parts_must_be_a_tuple() -> None:
    with pytest.raises(ConfigurationError) as info:
        RateLimitKey(parts="principal")  # type: ignore[arg-type]
    assert info.value.field == "key"


# --- Matching -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("match", "request_facts", "expected"),
    [
        (RateLimitMatch(), facts(), True),
        (RateLimitMatch(methods=("POST",)), facts(), False),
        (RateLimitMatch(methods=("POST", "GET")), facts(), True),
        (RateLimitMatch(path_prefixes=("/api",)), facts(path="/api"), True),
        (RateLimitMatch(path_prefixes=("/api",)), facts(path="/api/orders"), True),
        (RateLimitMatch(path_prefixes=("/api",)), facts(path="/apiary"), False),
        (RateLimitMatch(path_prefixes=("/static/",)), facts(path="/static/app.js"), True),
        (RateLimitMatch(path_prefixes=("/static/",)), facts(path="/static"), False),
        (RateLimitMatch(path_prefixes=("/api/login",)), facts(path="/api/%6Cogin"), True),
        (RateLimitMatch(path_prefixes=("/a", "/b")), facts(path="/b/c"), True),
        (RateLimitMatch(routes=("/api/orders/{id}",)), facts(route="/api/orders/{id}"), True),
        (RateLimitMatch(routes=("/api/orders/{id}",)), facts(path="/api/orders/1"), False),
        (
            RateLimitMatch(methods=("POST",), path_prefixes=("/api",)),
            facts(method="POST", path="/other"),
            False,
        ),
        (
            RateLimitMatch(methods=("POST",), path_prefixes=("/api",)),
            facts(method="POST", path="/api/x"),
            True,
        ),
    ],
)
def test_match(match: RateLimitMatch, request_facts: RequestFacts, expected: bool) -> None:
    assert match.matches(request_facts) is expected


def test_match_accepts_lists() -> None:
    match = RateLimitMatch(methods=["GET"], path_prefixes=["/a"])  # type: ignore[arg-type]
    assert match.methods == ("GET",)
    assert match.path_prefixes == ("/a",)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"methods": "GET"}, "match.methods: expected a list of strings (not a single string)"),
        ({"methods": ("get",)}, "match.methods: expected an upper-case HTTP method such as 'GET'"),
        ({"methods": (1,)}, "match.methods: expected a list of strings"),
        (
            {"path_prefixes": ("api",)},
            "match.path_prefixes: expected a path starting with '/' (printable, no spaces)",
        ),
        (
            {"routes": ("/a b",)},
            "match.routes: expected a path starting with '/' (printable, no spaces)",
        ),
    ],
)
def test_match_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        RateLimitMatch(**kwargs)  # type: ignore[arg-type]
    assert str(info.value) == message


# --- Rules and policy ---------------------------------------------------------------------


def test_rule_parses_its_rate_and_precomputes() -> None:
    rule = RateLimitRule(name="per-caller", rate="100/second burst 20")
    assert rule.rate == Rate(count=100, period_seconds=1, burst=20)
    assert rule.key == "principal"
    assert rule.bucket_key(facts(source_principal=ORDERS)) == f"per-caller:p={ORDERS}"
    assert rule.applies_to(facts())


NAME_HELP = "expected a name of 1 to 128 printable ASCII characters without spaces, '\"' or '\\'"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "", "rate": "1/s"}, f"name: {NAME_HELP}"),
        ({"name": "two words", "rate": "1/s"}, f"name: {NAME_HELP}"),
        ({"name": 'q"uote', "rate": "1/s"}, f"name: {NAME_HELP}"),
        ({"name": "x" * 129, "rate": "1/s"}, f"name: {NAME_HELP}"),
        ({"name": "r", "rate": 5}, "rate: expected a Rate or a spec string such as '5/minute'"),
        ({"name": "r", "rate": "5 per minute"}, f"rate: invalid rate '5 per minute': {HELP}"),
        ({"name": "r", "rate": "1/s", "key": "who"}, "key: unknown key kind 'who'"),
        ({"name": "r", "rate": "1/s", "match": {"methods": ["GET"]}}, "match: expected a"),
        ({"name": "r", "rate": "1/s", "shadow": "yes"}, "shadow: expected True or False"),
    ],
)
def test_rule_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        RateLimitRule(**kwargs)  # type: ignore[arg-type]
    assert str(info.value).startswith(message)


def test_policy_defaults() -> None:
    policy = RateLimitPolicy()
    assert (policy.rules, policy.backend, policy.failure_mode) == ((), "memory://", "open")
    assert (policy.key_prefix, policy.headers) == ("meshware:rl:", "ietf")


def test_policy_accepts_a_list_of_rules() -> None:
    rule = RateLimitRule(name="a", rate="1/s")
    assert RateLimitPolicy(rules=[rule]).rules == (rule,)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message", "field"),
    [
        (
            {"rules": (RateLimitRule(name="a", rate="1/s"), RateLimitRule(name="a", rate="2/s"))},
            "rules[1].name: expected unique rule names; rules with one name would share buckets",
            "rules[1].name",
        ),
        ({"rules": ("1/s",)}, "rules[0]: expected a RateLimitRule", "rules[0]"),
        (
            {"rules": RateLimitRule(name="a", rate="1/s")},
            "rules: expected a list of RateLimitRule",
            "rules",
        ),
        (
            {"backend": "memcached://x"},
            "backend: expected a backend URL 'memory://', 'redis://host:port/db', "
            "'rediss://host:port/db' or 'unix:///path'",
            "backend",
        ),
        ({"failure_mode": "fail"}, "failure_mode: expected 'open' or 'closed'", "failure_mode"),
        ({"headers": "draft"}, "headers: expected 'ietf', 'ietf+legacy' or 'none'", "headers"),
        (
            {"key_prefix": "has space"},
            "key_prefix: expected up to 128 printable ASCII characters without spaces",
            "key_prefix",
        ),
    ],
)
def test_policy_errors(kwargs: dict[str, object], message: str, field: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        RateLimitPolicy(**kwargs)  # type: ignore[arg-type]
    assert str(info.value) == message
    assert info.value.field == field


def test_limiter_rejects_bad_backend_options_at_startup() -> None:
    with pytest.raises(ConfigurationError) as info:
        RateLimiter(RateLimitPolicy(backend="memory://?max_keys=0"))
    assert info.value.field == "backend"


# --- Decorator ----------------------------------------------------------------------------


@rate_limit("5/minute", key="principal", name="login")
@rate_limit("100/day", name="login-daily", shadow=True)
async def login() -> str:
    return "ok"


@rate_limit("1/s")
@rate_limit("10/minute")
def search() -> str:
    return "found"


def test_decorator_attaches_rules_in_source_order() -> None:
    rules = route_rate_limits(login)
    assert [r.name for r in rules] == ["login", "login-daily"]
    assert rules[0].rate == Rate.parse("5/minute")
    assert rules[0].key == RateLimitKey(parts=("principal",))
    assert (rules[0].shadow, rules[1].shadow) == (False, True)
    assert login.__meshware_ratelimit__ == rules  # type: ignore[attr-defined]


def test_decorator_default_names_are_unique_per_handler() -> None:
    assert [r.name for r in route_rate_limits(search)] == [
        f"{__name__}.search#2",
        f"{__name__}.search",
    ]


def test_decorator_returns_the_handler_and_keeps_it_callable() -> None:
    assert search() == "found"
    assert route_rate_limits(test_decorator_returns_the_handler_and_keeps_it_callable) == ()


def test_decorator_on_methods() -> None:
    class View:
        @rate_limit("1/s", name="view")
        def get(self) -> str:
            return "ok"

    assert [r.name for r in route_rate_limits(View().get)] == ["view"]


def test_decorator_fails_at_import_on_bad_spec() -> None:
    with pytest.raises(ConfigurationError) as info:
        rate_limit("5 a minute")
    assert info.value.value == "5 a minute"


# --- RateLimiter --------------------------------------------------------------------------


def limiter(*rules: RateLimitRule, clock: FakeClock | None = None, **kwargs: object) -> RateLimiter:
    policy = RateLimitPolicy(rules=rules, **kwargs)  # type: ignore[arg-type]
    return RateLimiter(policy, clock=clock or FakeClock())


def test_no_rules_no_limit() -> None:
    decision = limiter().decide(facts())
    assert decision == RateLimitDecision(allowed=True)
    assert decision.headers() == []
    assert decision.outcome == "allowed"


def test_burst_then_429_with_exact_headers() -> None:
    clock = FakeClock()
    lim = limiter(RateLimitRule(name="per-caller", rate="1/second burst 3"), clock=clock)
    decisions = [lim.decide(facts(source_principal=ORDERS)) for _ in range(4)]
    assert [(d.allowed, d.status, d.remaining) for d in decisions] == [
        (True, 200, 2),
        (True, 200, 1),
        (True, 200, 0),
        (False, 429, 0),
    ]
    assert decisions[0].headers() == [
        ("RateLimit-Policy", '"per-caller";q=3;w=3'),
        ("RateLimit", '"per-caller";r=2;t=1'),
    ]
    assert decisions[3] == RateLimitDecision(
        allowed=False,
        status=429,
        rule="per-caller",
        limit=3,
        window=3,
        remaining=0,
        reset_after=3.0,
        retry_after=1.0,
    )
    assert decisions[3].outcome == "limited"
    assert decisions[3].headers() == [
        ("RateLimit-Policy", '"per-caller";q=3;w=3'),
        ("RateLimit", '"per-caller";r=0;t=3'),
        ("Retry-After", "1"),
    ]
    # Another caller has its own bucket; the first one gets a token back a second later.
    assert lim.decide(facts(source_principal="cluster.local/ns/shop/sa/cart")).remaining == 2
    clock.now += 1.0
    assert lim.decide(facts(source_principal=ORDERS)).allowed


@pytest.mark.parametrize(
    ("retry_after", "header"), [(0.2, "1"), (1.0, "1"), (2.0000000001, "2"), (2.5, "3")]
)
def test_retry_after_is_whole_seconds_rounded_up(retry_after: float, header: str) -> None:
    decision = RateLimitDecision(
        allowed=False,
        status=429,
        rule="r",
        limit=1,
        window=1,
        remaining=0,
        reset_after=retry_after,
        retry_after=retry_after,
    )
    assert decision.headers()[-1] == ("Retry-After", header)


def test_legacy_headers() -> None:
    lim = limiter(RateLimitRule(name="api", rate="2/minute"), headers="ietf+legacy")
    first = lim.decide(facts())
    lim.decide(facts())
    third = lim.decide(facts())
    assert first.headers() == [
        ("RateLimit-Policy", '"api";q=2;w=60'),
        ("RateLimit", '"api";r=1;t=30'),
        ("X-RateLimit-Limit", "2"),
        ("X-RateLimit-Remaining", "1"),
        ("X-RateLimit-Reset", "30"),
    ]
    assert third.headers() == [
        ("RateLimit-Policy", '"api";q=2;w=60'),
        ("RateLimit", '"api";r=0;t=60'),
        ("X-RateLimit-Limit", "2"),
        ("X-RateLimit-Remaining", "0"),
        ("X-RateLimit-Reset", "60"),
        ("Retry-After", "30"),
    ]


def test_headers_none_keeps_only_retry_after() -> None:
    lim = limiter(RateLimitRule(name="api", rate="1/minute"), headers="none")
    assert lim.decide(facts()).headers() == []
    assert lim.decide(facts()).headers() == [("Retry-After", "60")]


def test_shadow_rule_counts_but_never_enforces() -> None:
    lim = limiter(RateLimitRule(name="trial", rate="1/minute", shadow=True))
    first, second = lim.decide(facts()), lim.decide(facts())
    assert first == RateLimitDecision(allowed=True)
    assert second == RateLimitDecision(allowed=True, shadow_limited=True, shadow_rule="trial")
    assert second.outcome == "shadow-limited"
    assert second.headers() == []


def test_shadow_rule_beside_an_enforced_rule() -> None:
    lim = limiter(
        RateLimitRule(name="trial", rate="1/minute", shadow=True),
        RateLimitRule(name="real", rate="10/minute"),
    )
    lim.decide(facts())
    decision = lim.decide(facts())
    assert (decision.allowed, decision.rule, decision.remaining) == (True, "real", 8)
    assert (decision.shadow_limited, decision.shadow_rule) == (True, "trial")
    assert decision.headers() == [
        ("RateLimit-Policy", '"real";q=10;w=60'),
        ("RateLimit", '"real";r=8;t=12'),
    ]


def test_most_restrictive_allowed_rule_is_reported() -> None:
    lim = limiter(
        RateLimitRule(name="wide", rate="100/minute", key="client_ip"),
        RateLimitRule(name="narrow", rate="3/minute", key="client_ip"),
    )
    decision = lim.decide(facts())
    assert (decision.rule, decision.limit, decision.remaining) == ("narrow", 3, 2)


def test_denying_rule_wins_and_every_rule_is_charged() -> None:
    backend = MemoryBackend()
    lim = RateLimiter(
        RateLimitPolicy(
            rules=(
                RateLimitRule(name="minute", rate="2/minute"),
                RateLimitRule(name="hour", rate="10/hour"),
            )
        ),
        backend=backend,
        clock=FakeClock(),
    )
    decisions = [lim.decide(facts()) for _ in range(4)]
    assert [(d.status, d.rule, d.remaining) for d in decisions] == [
        (200, "minute", 1),
        (200, "minute", 0),
        (429, "minute", 0),
        (429, "minute", 0),
    ]
    # The hourly rule was charged for all four requests, the two rejected ones included.
    hour = backend.acquire("meshware:rl:hour:ip=10.0.0.1", Rate.parse("10/hour"), 1, 1000.0)
    assert hour.remaining == 5


def test_longest_retry_after_is_reported_among_denials() -> None:
    lim = limiter(
        RateLimitRule(name="second", rate="1/second"),
        RateLimitRule(name="minute", rate="1/minute"),
    )
    lim.decide(facts())
    decision = lim.decide(facts())
    assert (decision.rule, decision.retry_after) == ("minute", 60.0)
    assert decision.headers()[-1] == ("Retry-After", "60")


def test_rules_apply_only_where_they_match() -> None:
    lim = limiter(
        RateLimitRule(
            name="writes",
            rate="1/minute",
            key="client_ip",
            match=RateLimitMatch(methods=("POST",), path_prefixes=("/api",)),
        )
    )
    assert lim.decide(facts(method="POST")).remaining == 0
    assert lim.decide(facts(method="POST")).status == 429
    assert lim.decide(facts(method="GET")) == RateLimitDecision(allowed=True)
    assert lim.decide(facts(method="POST", path="/health")) == RateLimitDecision(allowed=True)


def test_route_rules_from_the_decorator() -> None:
    lim = limiter(RateLimitRule(name="global", rate="100/minute"))
    caller = facts(source_principal=ORDERS)
    rules = route_rate_limits(login)
    decisions = [lim.decide(caller, route_rules=rules) for _ in range(6)]
    assert [(d.status, d.rule, d.remaining) for d in decisions] == [
        (200, "login", 4),
        (200, "login", 3),
        (200, "login", 2),
        (200, "login", 1),
        (200, "login", 0),
        (429, "login", 0),
    ]
    assert not decisions[-1].shadow_limited  # the daily shadow rule still has room
    assert lim.decide(caller).rule == "global"


async def test_async_decisions_match_sync_ones() -> None:
    rule = RateLimitRule(name="api", rate="1/second burst 2")
    sync_lim, async_lim = limiter(rule), limiter(rule)
    sync = [sync_lim.decide(facts()) for _ in range(3)]
    asynchronous = [await async_lim.decide_async(facts()) for _ in range(3)]
    assert sync == asynchronous
    assert [d.status for d in asynchronous] == [200, 200, 429]
    await async_lim.aclose()
    sync_lim.close()


class FailingBackend:
    """A backend whose store is down."""

    def __init__(self) -> None:
        self.calls = 0

    def acquire(self, key: str, rate: Rate, cost: int, now: float) -> GcraResult:
        raise AssertionError("the limiter charges through acquire_many")

    async def acquire_async(self, key: str, rate: Rate, cost: int, now: float) -> GcraResult:
        raise AssertionError("the limiter charges through acquire_many_async")

    def acquire_many(self, requests: Sequence[Acquisition], now: float) -> list[GcraResult]:
        self.calls += 1
        raise BackendUnavailable("connection refused", backend="redis://cache:6379/0")

    async def acquire_many_async(
        self, requests: Sequence[Acquisition], now: float
    ) -> list[GcraResult]:
        return self.acquire_many(requests, now)

    def close(self) -> None:
        raise AssertionError("a backend passed in is not closed by the limiter")

    async def aclose(self) -> None:
        raise AssertionError("a backend passed in is not closed by the limiter")


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("open", RateLimitDecision(allowed=True, status=200, backend_error=True)),
        ("closed", RateLimitDecision(allowed=False, status=503, backend_error=True)),
    ],
)
async def test_failure_modes(mode: str, expected: RateLimitDecision) -> None:
    policy = RateLimitPolicy(
        rules=(RateLimitRule(name="api", rate="1/s"),),
        failure_mode=mode,  # type: ignore[arg-type]
    )
    lim = RateLimiter(policy, backend=FailingBackend(), clock=FakeClock())
    assert lim.decide(facts()) == expected
    assert await lim.decide_async(facts()) == expected
    assert expected.headers() == []
    assert expected.outcome == "backend-error"
    assert lim.backend_errors == 2
    lim.close()
    await lim.aclose()


def test_failing_backend_is_not_asked_when_no_rule_applies() -> None:
    backend = FailingBackend()
    policy = RateLimitPolicy(
        rules=(RateLimitRule(name="api", rate="1/s", match=RateLimitMatch(methods=("PUT",))),)
    )
    assert RateLimiter(policy, backend=backend).decide(facts()) == RateLimitDecision(allowed=True)
    assert backend.calls == 0


def test_backend_errors_are_counted_and_logged_once_per_ten_seconds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock(0.0)
    policy = RateLimitPolicy(rules=(RateLimitRule(name="api", rate="1/s"),))
    lim = RateLimiter(policy, backend=FailingBackend(), clock=clock)
    with caplog.at_level(logging.WARNING, logger="meshware.ratelimit"):
        for now in (0.0, 1.0, 2.0, 9.9, 10.0, 12.0):
            clock.now = now
            lim.decide(facts())
    assert lim.backend_errors == 6
    assert [r.getMessage() for r in caplog.records] == [
        "rate limit backend unavailable (1 decision(s) since the last report, failing open): "
        "redis://cache:6379/0: connection refused",
        "rate limit backend unavailable (4 decision(s) since the last report, failing open): "
        "redis://cache:6379/0: connection refused",
    ]
