"""SpiffeId: every rule of the module's table, derivations, and a parser property."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from meshware.exceptions import ConfigurationError, InvalidSpiffeId
from meshware.identity.spiffe import SpiffeId, trust_domain_id

# (text, rule, a phrase the message must contain)
INVALID = [
    ("cluster.local/ns/default/sa/orders", "scheme", "expected the scheme 'spiffe://'"),
    ("https://cluster.local/ns/a/sa/b", "scheme", "expected the scheme 'spiffe://'"),
    ("SPIFFE://cluster.local/ns/a/sa/b", "scheme", "the scheme must be lower case 'spiffe://'"),
    ("Spiffe://cluster.local", "scheme", "the scheme must be lower case"),
    ("", "scheme", "expected the scheme 'spiffe://'"),
    ("spiffe://", "trust-domain-empty", "the trust domain is empty"),
    ("spiffe:///ns/a/sa/b", "trust-domain-empty", "the trust domain is empty"),
    ("spiffe://cluster.local:8443/ns/a/sa/b", "trust-domain-port", "a port is not allowed"),
    ("spiffe://user@cluster.local/ns/a", "trust-domain-userinfo", "user info is not allowed"),
    ("spiffe://user:pw@cluster.local", "trust-domain-userinfo", "user info is not allowed"),
    ("spiffe://Cluster.local", "trust-domain-chars", "character 'C' is not allowed in a trust"),
    ("spiffe://cluster local", "trust-domain-chars", "character ' ' is not allowed in a trust"),
    ("spiffe://clüster.local", "trust-domain-chars", "character 'ü' is not allowed in a trust"),
    ("spiffe://cluster.local//ns/a", "path-empty-segment", "empty path segments"),
    ("spiffe://cluster.local/ns//sa/b", "path-empty-segment", "empty path segments"),
    ("spiffe://cluster.local/ns/a/", "path-empty-segment", "a trailing '/' are not allowed"),
    ("spiffe://cluster.local/", "path-empty-segment", "a trailing '/' are not allowed"),
    ("spiffe://cluster.local/ns/./sa", "path-dot-segment", "the path segment '.' is not allowed"),
    ("spiffe://cluster.local/..", "path-dot-segment", "the path segment '..' is not allowed"),
    ("spiffe://cluster.local/ns/a b", "path-chars", "character ' ' is not allowed in a path"),
    ("spiffe://cluster.local/ns/a+b", "path-chars", "character '+' is not allowed in a path"),
    ("spiffe://cluster.local/ns/é", "path-chars", "character 'é' is not allowed in a path"),
    ("spiffe://cluster.local/ns/a?x=1", "query-fragment", "a query or fragment is not allowed"),
    ("spiffe://cluster.local/ns/a#frag", "query-fragment", "a query or fragment is not allowed"),
    ("spiffe://cluster.local?x", "query-fragment", "a query or fragment is not allowed"),
    ("spiffe://cluster%2Elocal/ns/a", "percent-encoding", "percent-encoding is not allowed"),
    ("spiffe://cluster.local/ns/a%20b", "percent-encoding", "percent-encoding is not allowed"),
    ("spiffe://" + "a" * 256, "too-long", "the trust domain exceeds 255"),
    ("spiffe://cluster.local/" + "a" * 2030, "too-long", "a SPIFFE id is at most 2048 bytes"),
]


@pytest.mark.parametrize(("text", "rule", "phrase"), INVALID)
def test_each_rule_is_enforced_with_its_code_and_a_message(
    text: str, rule: str, phrase: str
) -> None:
    with pytest.raises(InvalidSpiffeId) as info:
        SpiffeId.parse(text)

    assert info.value.rule == rule
    assert phrase in str(info.value)
    assert str(info.value).endswith(f"[{rule}]")
    assert info.value.value == text


def test_every_rule_of_the_table_is_covered() -> None:
    import meshware.identity.spiffe as module

    assert module.__doc__ is not None
    documented = {
        line.split("``")[1]
        for line in module.__doc__.splitlines()
        if line.startswith("``") and not line.startswith("``spiffe")
    }
    assert documented == {rule for _, rule, _ in INVALID}


def test_an_invalid_id_is_a_configuration_error_showing_the_value() -> None:
    with pytest.raises(ConfigurationError) as info:
        SpiffeId.parse("spiffe://cluster.local:80")

    assert str(info.value) == (
        "invalid SPIFFE id 'spiffe://cluster.local:80': a port is not allowed [trust-domain-port]"
    )


def test_a_long_value_is_shortened_in_the_message_but_kept_whole_on_the_error() -> None:
    text = "spiffe://cluster.local/ns/a b" + "c" * 200
    with pytest.raises(InvalidSpiffeId) as info:
        SpiffeId.parse(text)

    assert repr(text[:117] + "...") in str(info.value)
    assert info.value.value == text


def test_a_non_string_is_refused() -> None:
    with pytest.raises(InvalidSpiffeId) as info:
        SpiffeId.parse(b"spiffe://cluster.local")  # type: ignore[arg-type]

    assert info.value.rule == "scheme"
    assert "a SPIFFE id must be a string" in str(info.value)


def test_the_limits_are_inclusive() -> None:
    longest_td = "a" * 255
    assert SpiffeId.parse(f"spiffe://{longest_td}").trust_domain == longest_td
    path = "/" + "p" * (2048 - len("spiffe://td/"))
    longest = f"spiffe://td{path}"
    assert len(longest) == 2048
    assert SpiffeId.parse(longest).uri == longest
    with pytest.raises(InvalidSpiffeId) as info:
        SpiffeId.parse(longest + "p")
    assert info.value.rule == "too-long"


def test_the_byte_limit_counts_utf8_bytes() -> None:
    # 1024 two-byte characters: 1024 characters but 2048+ bytes.
    with pytest.raises(InvalidSpiffeId) as info:
        SpiffeId.parse("spiffe://td/" + "é" * 1024)
    assert info.value.rule == "too-long"


@pytest.mark.parametrize(
    "text",
    [
        "spiffe://cluster.local",
        "spiffe://cluster.local/ns/default/sa/orders",
        "spiffe://example.org/Path/With-Upper_Case.and.dots",
        "spiffe://a-b_c.0-9",
        "spiffe://td/...",
        "spiffe://td/.a/a.",
    ],
)
def test_valid_ids_round_trip(text: str) -> None:
    parsed = SpiffeId.parse(text)

    assert parsed.uri == text
    assert str(parsed) == text
    assert SpiffeId.parse(parsed.uri) == parsed


def test_principal_namespace_and_service_account() -> None:
    orders = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/orders")

    assert orders.trust_domain == "cluster.local"
    assert orders.path == "/ns/shop/sa/orders"
    assert orders.principal == "cluster.local/ns/shop/sa/orders"
    assert orders.namespace == "shop"
    assert orders.service_account == "orders"


@pytest.mark.parametrize(
    "text",
    [
        "spiffe://cluster.local",
        "spiffe://cluster.local/workload",
        "spiffe://cluster.local/ns/shop",
        "spiffe://cluster.local/ns/shop/sa/orders/extra",
        "spiffe://cluster.local/namespace/shop/sa/orders",
        "spiffe://cluster.local/ns/shop/serviceaccount/orders",
    ],
)
def test_non_workload_ids_have_no_namespace_or_service_account(text: str) -> None:
    parsed = SpiffeId.parse(text)

    assert parsed.namespace is None
    assert parsed.service_account is None
    assert parsed.principal == text.removeprefix("spiffe://")


def test_for_service_builds_the_mesh_id() -> None:
    built = SpiffeId.for_service("cluster.local", "shop", "orders")

    assert built == SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/orders")
    assert built.uri == "spiffe://cluster.local/ns/shop/sa/orders"


@pytest.mark.parametrize(
    ("args", "rule"),
    [
        (("Cluster.local", "shop", "orders"), "trust-domain-chars"),
        (("cluster.local", "", "orders"), "path-empty-segment"),
        (("cluster.local", "shop", "or/ders"), "path-chars"),
        (("cluster.local", "shop/sa/x", "orders"), "path-chars"),
        (("cluster.local", "shop", "a b"), "path-chars"),
        (("cluster.local", "..", "orders"), "path-dot-segment"),
    ],
)
def test_for_service_validates_its_parts(args: tuple[str, str, str], rule: str) -> None:
    with pytest.raises(InvalidSpiffeId) as info:
        SpiffeId.for_service(*args)
    assert info.value.rule == rule


def test_the_constructor_validates_so_no_invalid_id_exists() -> None:
    with pytest.raises(InvalidSpiffeId) as info:
        SpiffeId("cluster.local", "ns/shop")
    assert info.value.rule == "path-chars"
    assert "the path must start with '/'" in str(info.value)

    with pytest.raises(InvalidSpiffeId) as info:
        SpiffeId("", "/ns/a")
    assert info.value.rule == "trust-domain-empty"


def test_trust_domain_id() -> None:
    td = trust_domain_id("cluster.local")

    assert td.uri == "spiffe://cluster.local"
    assert td.path == ""
    assert td.namespace is None
    with pytest.raises(InvalidSpiffeId):
        trust_domain_id("Cluster.Local")


def test_ids_are_hashable_values() -> None:
    a = SpiffeId.parse("spiffe://cluster.local/ns/a/sa/b")
    b = SpiffeId.for_service("cluster.local", "a", "b")

    assert a == b
    assert len({a, b}) == 1


# -- properties --------------------------------------------------------------------------------

_SEGMENT = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_",
    min_size=1,
    max_size=12,
).filter(lambda s: s not in (".", ".."))
_TRUST_DOMAIN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789.-_", min_size=1, max_size=40)
_ANY_TEXT = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=120)


@given(st.one_of(_ANY_TEXT, _ANY_TEXT.map(lambda s: "spiffe://" + s)))
@example("spiffe://\ud800")
@example("spiffe://td/\udfff")
@example("spiffe://" + "\U0010ffff" * 600)
def test_parse_raises_nothing_but_invalid_spiffe_id_and_round_trips(text: str) -> None:
    try:
        parsed = SpiffeId.parse(text)
    except InvalidSpiffeId as exc:
        assert exc.rule in {rule for _, rule, _ in INVALID}
        return
    assert parsed.uri == text
    assert SpiffeId.parse(parsed.uri) == parsed


@given(_TRUST_DOMAIN, st.lists(_SEGMENT, max_size=6))
def test_well_formed_ids_are_accepted_and_round_trip(td: str, segments: list[str]) -> None:
    text = "spiffe://" + td + "".join("/" + s for s in segments)

    parsed = SpiffeId.parse(text)

    assert parsed.trust_domain == td
    assert parsed.uri == text
    assert SpiffeId(parsed.trust_domain, parsed.path) == parsed
