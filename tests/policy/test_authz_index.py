"""Rules indexed by the caller's principal decide exactly as rules matched one by one."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from meshware.policy.authz import (
    NO_ALLOW_MATCH,
    AuthorizationPolicy,
    Authorizer,
    Operation,
    Rule,
    Source,
    _first_match,
    _first_match_of,
)
from meshware.policy.facts import RequestFacts

CALLERS = [f"cluster.local/ns/shop/sa/s{i}" for i in range(4)]
PRINCIPAL_PATTERNS = [*CALLERS, "cluster.local/ns/shop/*", "*/sa/s1", "*"]

principal_lists = st.lists(st.sampled_from(PRINCIPAL_PATTERNS), min_size=1, max_size=3)
sources = st.one_of(
    st.builds(lambda p: Source(principals=p), principal_lists),
    st.builds(
        lambda p, n: Source(principals=p, not_principals=n), principal_lists, principal_lists
    ),
    st.builds(lambda: Source(namespaces=["shop"])),
    st.builds(lambda: Source(not_principals=["cluster.local/ns/shop/sa/s0"])),
)
operations = st.builds(
    lambda methods, paths: Operation(methods=methods, paths=paths),
    st.lists(st.sampled_from(["GET", "POST"]), min_size=1, max_size=2),
    st.lists(st.sampled_from(["/api/*", "/api/a", "/admin/*", "*"]), min_size=1, max_size=2),
)
rules = st.builds(
    lambda f, t: Rule(from_=f, to=t),
    st.lists(sources, max_size=2),
    st.lists(operations, max_size=2),
)
requests = st.builds(
    lambda principal, method, path: RequestFacts(
        method=method,
        path=path,
        source_principal=principal,
        source_namespace=None if principal is None else "shop",
    ),
    st.sampled_from([None, *CALLERS, "cluster.local/ns/other/sa/x"]),
    st.sampled_from(["GET", "POST"]),
    st.sampled_from(["/api/a", "/api/b", "/admin/x", "/"]),
)


@settings(max_examples=500, deadline=None)
@given(st.lists(rules, min_size=1, max_size=8), st.lists(requests, min_size=1, max_size=6))
def test_indexed_first_match_is_the_first_rule_that_matches(
    rule_list: list[Rule], facts_list: list[RequestFacts]
) -> None:
    indexed = _first_match_of(rule_list)
    plain = tuple(rule._compiled for rule in rule_list)
    for facts in facts_list:
        assert indexed(facts, facts.path) == _first_match(plain, facts, facts.path)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(rules, min_size=1, max_size=6),
    st.lists(rules, min_size=1, max_size=6),
    st.lists(requests, min_size=1, max_size=6),
)
def test_decisions_follow_the_rules_in_order(
    deny_rules: list[Rule], allow_rules: list[Rule], facts_list: list[RequestFacts]
) -> None:
    deny = AuthorizationPolicy(name="deny", action="DENY", rules=deny_rules)
    allow = AuthorizationPolicy(name="allow", action="ALLOW", rules=allow_rules)
    authorizer = Authorizer([deny, allow])
    for facts in facts_list:
        decision = authorizer.decide(facts)
        denied_by = deny.matching_rule(facts)
        allowed_by = allow.matching_rule(facts)
        if denied_by is not None:
            assert (decision.allowed, decision.policy, decision.rule) == (False, "deny", denied_by)
        elif allowed_by is not None:
            assert (decision.allowed, decision.policy, decision.rule) == (True, "allow", allowed_by)
        else:
            assert (decision.allowed, decision.code) == (False, NO_ALLOW_MATCH)


def test_only_the_callers_rules_are_tried() -> None:
    tried: list[int] = []
    rule_list = [
        Rule(from_=[Source(principals=[caller])], to=[Operation(methods=["GET"])])
        for caller in CALLERS
    ]
    checks = [rule._compiled for rule in rule_list]

    def spy(index: int) -> object:
        def check(facts: RequestFacts, path: str) -> bool:
            tried.append(index)
            return bool(checks[index](facts, path))

        return check

    for index, rule in enumerate(rule_list):
        object.__setattr__(rule, "_compiled", spy(index))
    first_match = _first_match_of(rule_list)

    assert first_match(RequestFacts(method="GET", path="/", source_principal=CALLERS[3]), "/") == 3
    assert tried == [3]
    tried.clear()
    assert first_match(RequestFacts(method="GET", path="/"), "/") == -1
    assert tried == []
