"""The resolver's caches: XFCC resolutions per (header, proxy) and trust decisions per address."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest

from meshware.identity.bundle import PeerVerifier, TrustBundles
from meshware.identity.identity import Identity
from meshware.identity.resolve import XFCC_CACHE_SIZE, IdentityResolver, Resolution
from meshware.identity.spiffe import SpiffeId
from tests.identity.certs import CHECKOUT, ORDERS, Minted, Pki

PROXY_IP = "10.1.2.3"
STRANGER_IP = "203.0.113.9"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


class Clock:
    def __init__(self) -> None:
        self.now = 5.0

    def __call__(self) -> float:
        return self.now


def scope(xfcc: str, client: str = PROXY_IP) -> dict[str, Any]:
    return {
        "type": "http",
        "path": "/",
        "headers": [(b"host", b"orders"), (b"x-forwarded-client-cert", xfcc.encode())],
        "client": (client, 40000),
    }


def uri_header(uri: str) -> str:
    return f"Hash=abc;URI={uri}"


def test_a_repeated_header_from_a_trusted_proxy_is_resolved_once(pki: Pki) -> None:
    resolver = IdentityResolver(PeerVerifier(pki.bundles()), trusted_proxies=["10.0.0.0/8"])

    first = resolver.resolve_scope(scope(uri_header(CHECKOUT)))
    second = resolver.resolve_scope(scope(uri_header(CHECKOUT)))

    expected = Identity(SpiffeId.parse(CHECKOUT), "xfcc", via=PROXY_IP)
    assert first == second == Resolution(identity=expected)
    assert second is first  # the remembered resolution, not a new one
    assert not resolver.failures


def test_the_proxy_is_part_of_the_key(pki: Pki) -> None:
    resolver = IdentityResolver(PeerVerifier(pki.bundles()), trusted_proxies=["10.0.0.0/8"])

    near = resolver.resolve_scope(scope(uri_header(CHECKOUT), client="10.0.0.1"))
    far = resolver.resolve_scope(scope(uri_header(CHECKOUT), client="10.0.0.2"))

    assert near.identity is not None and near.identity.via == "10.0.0.1"
    assert far.identity is not None and far.identity.via == "10.0.0.2"


def test_new_bundles_invalidate_remembered_resolutions(pki: Pki) -> None:
    both = pki.bundles()
    only_other = TrustBundles({"other.td": both.certificates("other.td")})
    current = [both]
    resolver = IdentityResolver(PeerVerifier(lambda: current[0]), trusted_proxies=[PROXY_IP])

    before = resolver.resolve_scope(scope(uri_header(CHECKOUT)))
    current[0] = only_other  # a reload that drops the cluster.local bundle
    after = resolver.resolve_scope(scope(uri_header(CHECKOUT)))

    assert before.identity is not None
    assert after.identity is None
    assert after.error is not None
    assert after.error.reason == "unknown-trust-domain"
    assert str(after.error) == (
        "x-forwarded-client-cert names trust domain 'cluster.local', which has no trust bundle here"
    )
    assert resolver.failures == {"unknown-trust-domain": 1}


def test_refusals_are_worked_out_and_counted_on_every_request(pki: Pki) -> None:
    resolver = IdentityResolver(
        PeerVerifier(pki.bundles()), trusted_proxies=[PROXY_IP], clock=Clock()
    )

    results = [resolver.resolve_scope(scope('URI="unbalanced')) for _ in range(3)]

    assert [r.error.reason if r.error else None for r in results] == ["xfcc-unbalanced-quote"] * 3
    assert results[0].error is not results[1].error
    assert resolver.failures == {"xfcc-unbalanced-quote": 3}
    assert not resolver._xfcc_cache


def test_untrusted_peers_are_ignored_and_counted_on_every_request(pki: Pki) -> None:
    resolver = IdentityResolver(
        PeerVerifier(pki.bundles()), trusted_proxies=[PROXY_IP], clock=Clock()
    )

    results = [resolver.resolve_scope(scope(uri_header(CHECKOUT), STRANGER_IP)) for _ in range(3)]

    assert results == [Resolution(ignored="untrusted-xfcc")] * 3
    assert resolver.failures == {"untrusted-xfcc": 3}
    assert resolver.trusted_proxies._by_ip == {STRANGER_IP: False}


def test_identities_proven_by_a_forwarded_cert_are_not_remembered(pki: Pki) -> None:
    leaf: Minted = pki.ca.good(ORDERS, hours=2)
    header = f'Hash=abc;Cert="{quote(leaf.pem, safe="")}"'
    resolver = IdentityResolver(PeerVerifier(pki.bundles()), trusted_proxies=[PROXY_IP])

    first = resolver.resolve_scope(scope(header))
    second = resolver.resolve_scope(scope(header))

    assert first.identity is not None and first.identity.not_after is not None
    assert first == second
    assert not resolver._xfcc_cache  # expiry is checked by the verifier on each request


def test_long_headers_are_resolved_but_not_remembered(pki: Pki) -> None:
    resolver = IdentityResolver(PeerVerifier(pki.bundles()), trusted_proxies=[PROXY_IP])
    header = f'Subject="{"x" * 5000}";URI={CHECKOUT}'

    resolution = resolver.resolve_scope(scope(header))

    assert resolution.identity is not None
    assert resolution.identity.spiffe_id.uri == CHECKOUT
    assert not resolver._xfcc_cache


def test_the_cache_is_bounded(pki: Pki) -> None:
    resolver = IdentityResolver(PeerVerifier(pki.bundles()), trusted_proxies=[PROXY_IP])

    for n in range(XFCC_CACHE_SIZE + 50):
        resolution = resolver.resolve_scope(scope(f"Hash=h{n};URI={CHECKOUT}"))
        assert resolution.identity is not None

    assert len(resolver._xfcc_cache) == XFCC_CACHE_SIZE
    # The oldest entries went first.
    assert ("Hash=h0;URI=" + CHECKOUT, PROXY_IP) not in resolver._xfcc_cache
    assert (f"Hash=h{XFCC_CACHE_SIZE + 49};URI={CHECKOUT}", PROXY_IP) in resolver._xfcc_cache


def test_the_trust_cache_is_bounded(pki: Pki) -> None:
    resolver = IdentityResolver(PeerVerifier(pki.bundles()), trusted_proxies=["10.0.0.0/8"])
    proxies = resolver.trusted_proxies

    for n in range(1100):
        assert proxies.trusts(f"10.0.{n // 256}.{n % 256}", None)
    assert proxies.trusts("not an address", None) is False

    assert len(proxies._by_ip) == 1024
    assert proxies._by_ip["not an address"] is False


def test_the_trust_cache_is_not_part_of_equality() -> None:
    from meshware.identity.resolve import TrustedProxies

    a, b = TrustedProxies.parse(["10.0.0.0/8"]), TrustedProxies.parse(["10.0.0.0/8"])
    a.trusts("10.1.1.1", None)

    assert a == b
    assert hash(a) == hash(b)
    assert repr(a) == repr(b)
