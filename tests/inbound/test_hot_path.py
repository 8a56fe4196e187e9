"""Shortcuts of the inbound shells' per-request path give what the general code gives."""

from __future__ import annotations

import uuid

from hypothesis import given
from hypothesis import strategies as st

from meshware.identity.identity import Identity
from meshware.identity.spiffe import SpiffeId
from meshware.inbound import facts as facts_module
from meshware.inbound.asgi.ratelimit import RateLimitCore
from meshware.inbound.asgi.telemetry import new_request_id
from meshware.inbound.facts import facts_from_scope, host_without_port
from meshware.inbound.record import RequestRecord
from meshware.policy.ratelimit import RateLimitDecision, RateLimitPolicy

decisions = st.builds(
    RateLimitDecision,
    allowed=st.just(True),
    status=st.just(200),
    rule=st.none() | st.sampled_from(["per-caller", "login", "a;b"]),
    limit=st.integers(1, 100),
    window=st.integers(1, 100),
    remaining=st.integers(0, 100),
    reset_after=st.floats(0, 1000),
    shadow_limited=st.booleans(),
    shadow_rule=st.none() | st.just("shadow"),
    backend_error=st.booleans(),
    header_mode=st.sampled_from(["ietf", "ietf+legacy", "none"]),
)


@given(decisions)
def test_encoded_rate_limit_fields_are_the_decisions_headers(decision: RateLimitDecision) -> None:
    core = RateLimitCore(RateLimitPolicy(), None, None)

    for _ in range(2):  # the second time with the policy field kept
        assert core.encoded(decision) == [
            (name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in decision.headers()
        ]


def test_request_ids_are_version_4_uuids() -> None:
    ids = {new_request_id() for _ in range(200)}

    assert len(ids) == 200
    for request_id in ids:
        parsed = uuid.UUID(hex=request_id)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert parsed.hex == request_id


def test_an_identity_keeps_its_principal_and_namespace() -> None:
    first = Identity(SpiffeId.parse("spiffe://cluster.local/ns/a/sa/one"), "xfcc")
    second = Identity(SpiffeId.parse("spiffe://cluster.local/ns/a/sa/two"), "xfcc")

    assert first.principal == "cluster.local/ns/a/sa/one"
    assert first.principal is first.principal
    assert first.namespace is first.namespace == "a"
    assert second.principal == "cluster.local/ns/a/sa/two"
    assert first.principal == "cluster.local/ns/a/sa/one"
    # Kept values are derived, not part of the id: equality and hashing are unchanged.
    assert first.spiffe_id == SpiffeId("cluster.local", "/ns/a/sa/one")
    assert hash(first.spiffe_id) == hash(SpiffeId("cluster.local", "/ns/a/sa/one"))
    assert repr(first.spiffe_id) == "SpiffeId(trust_domain='cluster.local', path='/ns/a/sa/one')"


def test_facts_take_the_caller_and_the_host() -> None:
    caller = Identity(SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/web"), "xfcc")
    other = Identity(SpiffeId.parse("spiffe://cluster.local/ns/ops/sa/cron"), "xfcc")
    for identity, host in ((caller, b"API.example.com:8443"), (other, b"[::1]:80"), (caller, b"x")):
        scope = {
            "type": "http",
            "method": "GET",
            "path": "/",
            "headers": [(b"host", host)],
        }
        facts = facts_from_scope(scope, RequestRecord(identity=identity), headers=False)

        assert facts.source_principal == identity.principal
        assert facts.source_namespace == identity.namespace
        assert facts.host == host_without_port(host.decode("latin-1"))


def test_the_host_cache_is_bounded() -> None:
    for n in range(facts_module._MAX_HOSTS + 20):
        scope = {"type": "http", "method": "GET", "path": "/", "headers": [(b"host", b"h%d" % n)]}
        assert facts_from_scope(scope, RequestRecord(), headers=False).host == f"h{n}"

    assert len(facts_module._hosts) <= facts_module._MAX_HOSTS
