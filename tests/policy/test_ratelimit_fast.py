"""The rate limiter's shortcuts give what the general code gives."""

from __future__ import annotations

from dataclasses import fields

from hypothesis import given, settings
from hypothesis import strategies as st

from meshware.policy.facts import RequestFacts
from meshware.policy.ratelimit import (
    RateLimitDecision,
    RateLimiter,
    RateLimitKey,
    RateLimitPolicy,
    RateLimitRule,
    _escape,
    _make_decision,
)

decisions = st.builds(
    RateLimitDecision,
    allowed=st.booleans(),
    status=st.sampled_from([200, 429, 503]),
    rule=st.none() | st.text(max_size=5),
    limit=st.none() | st.integers(1, 100),
    window=st.none() | st.integers(1, 100),
    remaining=st.none() | st.integers(0, 100),
    reset_after=st.floats(0, 1000),
    retry_after=st.floats(0, 1000),
    shadow_limited=st.booleans(),
    shadow_rule=st.none() | st.text(max_size=5),
    backend_error=st.booleans(),
    header_mode=st.sampled_from(["ietf", "ietf+legacy", "none"]),
)


@given(decisions)
def test_the_fast_constructor_builds_equal_decisions(decision: RateLimitDecision) -> None:
    made = _make_decision(*(getattr(decision, f.name) for f in fields(RateLimitDecision)))

    assert made == decision
    assert repr(made) == repr(decision)
    assert made.headers() == decision.headers()


@settings(max_examples=300)
@given(st.none() | st.text(max_size=200))
def test_a_principal_key_is_escaped_only_when_needed(principal: str | None) -> None:
    facts = RequestFacts(method="GET", path="/", source_principal=principal, source_ip="10.0.0.1")

    key = RateLimitKey.of("principal").build(facts)

    assert key == ("p=" + _escape(principal) if principal else "ip=10.0.0.1")


def test_one_rule_reports_its_result() -> None:
    now = [100.0]
    limiter = RateLimiter(
        RateLimitPolicy(rules=(RateLimitRule(name="per-caller", rate="2/second"),)),
        clock=lambda: now[0],
    )
    facts = RequestFacts(method="GET", path="/", source_principal="cluster.local/ns/a/sa/b")

    first, second, third = (limiter.decide(facts) for _ in range(3))

    assert first == RateLimitDecision(
        allowed=True, rule="per-caller", limit=2, window=1, remaining=1, reset_after=0.5
    )
    assert second.remaining == 0 and second.allowed
    assert third == RateLimitDecision(
        allowed=False,
        status=429,
        rule="per-caller",
        limit=2,
        window=1,
        remaining=0,
        reset_after=1.0,
        retry_after=0.5,
    )
