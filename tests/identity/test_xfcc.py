"""parse_xfcc: Envoy's documented header values, hostile values, and a parser property."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from meshware.exceptions import IdentityError, InvalidXfcc
from meshware.identity.xfcc import MAX_XFCC_BYTES, MAX_XFCC_ELEMENTS, XfccElement, parse_xfcc

HASH = "468ed33be74eee6556d90c0149c1309e9ba61d6425303443c0748a02dd8de688"
SUBJECT = "/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client"
PEM = "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU+abc/def==\n-----END CERTIFICATE-----\n"


def reason_of(header: str) -> str:
    with pytest.raises(InvalidXfcc) as info:
        parse_xfcc(header)
    return info.value.reason


# -- Envoy's examples --------------------------------------------------------------------------


def test_the_spiffe_example() -> None:
    header = (
        "By=spiffe://cluster.local/ns/default/sa/a;Hash=abc;"
        'Subject="/C=US/ST=CA/L=San Francisco/OU=Lyft/CN=Test Client";'
        "URI=spiffe://cluster.local/ns/default/sa/b"
    )

    assert parse_xfcc(header) == [
        XfccElement(
            by=("spiffe://cluster.local/ns/default/sa/a",),
            hash="abc",
            subject=SUBJECT,
            uris=("spiffe://cluster.local/ns/default/sa/b",),
        )
    ]


def test_envoys_single_element_example() -> None:
    header = f'By=http://frontend.lyft.com;Hash={HASH};Subject="{SUBJECT}";URI=http://testclient.lyft.com'

    [element] = parse_xfcc(header)

    assert element.by == ("http://frontend.lyft.com",)
    assert element.hash == HASH
    assert element.subject == SUBJECT
    assert element.uris == ("http://testclient.lyft.com",)
    assert element.dns == ()
    assert element.cert is None
    assert element.chain is None


def test_envoys_two_element_example_is_in_order_farthest_first() -> None:
    header = (
        f"By=http://frontend.lyft.com;Hash={HASH};URI=http://testclient.lyft.com,"
        f"By=http://backend.lyft.com;Hash={HASH};URI=http://frontend.lyft.com"
    )

    first, last = parse_xfcc(header)

    assert first == XfccElement(
        by=("http://frontend.lyft.com",), hash=HASH, uris=("http://testclient.lyft.com",)
    )
    assert last == XfccElement(
        by=("http://backend.lyft.com",), hash=HASH, uris=("http://frontend.lyft.com",)
    )


def test_envoys_repeated_dns_example() -> None:
    header = (
        f'By=http://frontend.lyft.com;Hash={HASH};Subject="{SUBJECT}";'
        "URI=http://testclient.lyft.com;DNS=lyft.com;DNS=www.lyft.com"
    )

    [element] = parse_xfcc(header)

    assert element.dns == ("lyft.com", "www.lyft.com")
    assert element.uris == ("http://testclient.lyft.com",)


def test_envoys_empty_values_example() -> None:
    [element] = parse_xfcc(f'By=http://frontend.lyft.com;Hash={HASH};Subject="";URI=;DNS=lyft.com')

    assert element.subject == ""
    assert element.uris == ("",)
    assert element.dns == ("lyft.com",)


def test_a_url_encoded_cert_and_chain_are_decoded() -> None:
    encoded = quote(PEM, safe="")
    header = f'Hash={HASH};Cert="{encoded}";Chain="{encoded}{encoded}";URI=spiffe://td/x'

    [element] = parse_xfcc(header)

    assert element.cert == PEM
    assert element.chain == PEM + PEM
    assert "+" in element.cert and "/" in element.cert


def test_an_unquoted_url_encoded_cert() -> None:
    [element] = parse_xfcc(f"Cert={quote(PEM, safe='')}")

    assert element.cert == PEM


def test_quoted_values_with_escaped_quotes_commas_and_semicolons() -> None:
    header = r'Subject="CN=say \"hi\", O=a;b=c";URI=spiffe://td/x,Subject="\\";URI=spiffe://td/y'

    first, second = parse_xfcc(header)

    assert first.subject == 'CN=say "hi", O=a;b=c'
    assert first.uris == ("spiffe://td/x",)
    assert second.subject == "\\"
    assert second.uris == ("spiffe://td/y",)


def test_keys_are_case_insensitive_and_space_is_trimmed() -> None:
    header = " by = spiffe://td/proxy ; uri=spiffe://td/a ; HASH=abc ;dns=x ,  URI=spiffe://td/b "

    first, second = parse_xfcc(header)

    assert first == XfccElement(
        by=("spiffe://td/proxy",), uris=("spiffe://td/a",), hash="abc", dns=("x",)
    )
    assert second == XfccElement(uris=("spiffe://td/b",))


def test_space_after_a_quoted_value_and_a_trailing_semicolon() -> None:
    [element] = parse_xfcc('Subject="a b"  ;URI=spiffe://td/x;')

    assert element.subject == "a b"
    assert element.uris == ("spiffe://td/x",)


def test_the_limits_are_inclusive() -> None:
    elements = parse_xfcc(",".join(["URI=spiffe://td/x"] * MAX_XFCC_ELEMENTS))
    assert len(elements) == MAX_XFCC_ELEMENTS

    filler = "a" * (MAX_XFCC_BYTES - len("Subject="))
    [element] = parse_xfcc(f"Subject={filler}")
    assert element.subject == filler


# -- hostile values ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "reason", "message"),
    [
        (
            'Subject="/CN=unterminated;URI=spiffe://td/x',
            "xfcc-unbalanced-quote",
            "x-forwarded-client-cert: unbalanced quote",
        ),
        (
            'Subject="ends in backslash\\',
            "xfcc-unbalanced-quote",
            "x-forwarded-client-cert: unbalanced quote",
        ),
        (
            'URI=spiffe://td/x";Hash=a',
            "xfcc-unbalanced-quote",
            "x-forwarded-client-cert: unbalanced quote",
        ),
        (
            'URI=spiffe://td/"x";Hash=a',
            "xfcc-unbalanced-quote",
            "x-forwarded-client-cert element 0: stray quote in URI",
        ),
        (
            'Subject="a"b;URI=spiffe://td/x',
            "xfcc-malformed",
            "x-forwarded-client-cert element 0: text after the quoted Subject value",
        ),
        ("", "xfcc-malformed", "x-forwarded-client-cert element 0 is empty"),
        ("   ", "xfcc-malformed", "x-forwarded-client-cert element 0 is empty"),
        (
            "URI=spiffe://td/a,,URI=spiffe://td/b",
            "xfcc-malformed",
            "x-forwarded-client-cert element 1 is empty",
        ),
        ("URI=spiffe://td/a,", "xfcc-malformed", "x-forwarded-client-cert element 1 is empty"),
        (
            "URI=spiffe://td/a;Hash",
            "xfcc-malformed",
            "x-forwarded-client-cert element 0: expected key=value at offset 18",
        ),
        (
            "spiffe://td/a",
            "xfcc-malformed",
            "x-forwarded-client-cert element 0: expected key=value at offset 0",
        ),
        (
            "Hash;URI=spiffe://td/a",
            "xfcc-malformed",
            "x-forwarded-client-cert element 0: expected key=value at offset 0",
        ),
        (
            "URI=spiffe://td/a;;Hash=b",
            "xfcc-malformed",
            "x-forwarded-client-cert element 0: expected key=value at offset 18",
        ),
        (
            "=spiffe://td/a",
            "xfcc-malformed",
            "x-forwarded-client-cert element 0: empty key at offset 0",
        ),
        (
            "URI=spiffe://td/a;Principal=admin",
            "xfcc-unknown-key",
            "x-forwarded-client-cert element 0: unknown key 'Principal' (expected one of "
            "By, Hash, Cert, Chain, Subject, URI, DNS)",
        ),
        (
            "Hash=a;Hash=b",
            "xfcc-malformed",
            "x-forwarded-client-cert element 0: Hash appears twice",
        ),
        (
            "URI=spiffe://td/a,Cert=x;cert=y",
            "xfcc-malformed",
            "x-forwarded-client-cert element 1: Cert appears twice",
        ),
        (
            'Subject="a";subject="b"',
            "xfcc-malformed",
            "x-forwarded-client-cert element 0: Subject appears twice",
        ),
        (
            ",".join(["URI=spiffe://td/x"] * (MAX_XFCC_ELEMENTS + 1)),
            "xfcc-too-many-elements",
            "x-forwarded-client-cert has more than 16 elements",
        ),
        (
            "," * 10_000,
            "xfcc-too-many-elements",
            "x-forwarded-client-cert has more than 16 elements",
        ),
        (
            "Subject=" + "a" * (MAX_XFCC_BYTES - len("Subject=") + 1),
            "xfcc-too-large",
            f"x-forwarded-client-cert is {MAX_XFCC_BYTES + 1} bytes; at most 32768 accepted",
        ),
    ],
    ids=[
        "unterminated-quote",
        "escaped-final-quote",
        "quote-after-unquoted-value",
        "quote-inside-unquoted-value",
        "text-after-quoted-value",
        "empty-header",
        "blank-header",
        "empty-middle-element",
        "empty-last-element",
        "missing-equals-at-end",
        "missing-equals-only",
        "missing-equals-first",
        "empty-pair",
        "empty-key",
        "unknown-key",
        "repeated-hash",
        "repeated-cert-any-case",
        "repeated-subject",
        "too-many-elements",
        "too-many-commas",
        "too-large",
    ],
)
def test_hostile_values_are_refused_with_a_reason(header: str, reason: str, message: str) -> None:
    with pytest.raises(InvalidXfcc) as info:
        parse_xfcc(header)

    assert info.value.reason == reason
    assert str(info.value) == message


def test_a_long_unknown_key_is_shortened_in_the_message() -> None:
    with pytest.raises(InvalidXfcc) as info:
        parse_xfcc("K" * 1000 + "=v")

    assert f"unknown key {'K' * 40!r} " in str(info.value)
    assert len(str(info.value)) < 200


def test_invalid_xfcc_is_an_identity_error() -> None:
    with pytest.raises(IdentityError):
        parse_xfcc("nonsense")


# -- property ---------------------------------------------------------------------------------

_PIECES = st.sampled_from(
    ['"', "\\", ",", ";", "=", " ", "URI", "uri", "By", "Hash", "Cert", "DNS", "Subject", "%", "%2"]
)
_HEADERISH = st.lists(st.one_of(_PIECES, st.text(max_size=6)), max_size=40).map("".join)


@given(st.one_of(st.text(), _HEADERISH))
@example('Subject="\\')
@example("URI=a;" * 3000)
@example('"' + "," * 20 + '"')
@example("Cert=%ff%fe%80")
def test_parse_xfcc_raises_only_invalid_xfcc(header: str) -> None:
    try:
        elements = parse_xfcc(header)
    except InvalidXfcc as exc:
        assert exc.reason in {
            "xfcc-malformed",
            "xfcc-unbalanced-quote",
            "xfcc-unknown-key",
            "xfcc-too-many-elements",
            "xfcc-too-large",
        }
        return
    assert 1 <= len(elements) <= MAX_XFCC_ELEMENTS
    assert all(isinstance(e, XfccElement) for e in elements)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["Subject", "Hash", "By", "URI", "DNS"]),
            st.text(alphabet=st.characters(codec="latin-1"), max_size=20),
        ),
        min_size=1,
        max_size=6,
        unique_by=lambda pair: pair[0],
    )
)
def test_quoted_values_survive_a_round_trip(pairs: list[tuple[str, str]]) -> None:
    def quoted(value: str) -> str:
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

    header = ";".join(f"{key}={quoted(value)}" for key, value in pairs)

    [element] = parse_xfcc(header)

    found = {
        "Subject": element.subject,
        "Hash": element.hash,
        "By": element.by[0] if element.by else None,
        "URI": element.uris[0] if element.uris else None,
        "DNS": element.dns[0] if element.dns else None,
    }
    assert {key: found[key] for key, _ in pairs} == dict(pairs)
