"""Trust bundles and PeerVerifier: what is believed, what is refused (and why), the cache."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import meshware.identity.bundle as bundle_module
from meshware.exceptions import CertificateRejected, ConfigurationError
from meshware.identity.bundle import PeerVerifier, TrustBundles, VerifiedPeer, spiffe_id_of
from meshware.identity.spiffe import SpiffeId
from tests.identity.certs import ORDERS, OTHER_TD, TD, Issuer, Minted, Pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def verifier(pki: Pki) -> PeerVerifier:
    return PeerVerifier(pki.bundles())


class UtcClock:
    """A UTC clock that moves only when told to."""

    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


def count_verifications(verifier: PeerVerifier) -> list[int]:
    """Wrap the verifier's uncached path; the returned list holds the number of calls."""
    calls = [0]
    real: Callable[..., VerifiedPeer] = verifier._verify

    def counting(*args: Any, **kwargs: Any) -> VerifiedPeer:
        calls[0] += 1
        return real(*args, **kwargs)

    verifier._verify = counting  # type: ignore[method-assign]
    return calls


def rejection(verifier: PeerVerifier, cert: Minted, *, der: bool = False) -> CertificateRejected:
    with pytest.raises(CertificateRejected) as info:
        if der:
            verifier.verify_der(cert.der)
        else:
            verifier.verify_pem(cert.pem)
    return info.value


# -- TrustBundles ----------------------------------------------------------------------------


def test_bundles_group_cas_by_the_trust_domain_they_name(pki: Pki) -> None:
    bundles = TrustBundles.from_pem(pki.bundle_pem)

    assert bundles.trust_domains == frozenset({TD, OTHER_TD})
    assert bundles.certificates(TD) == (pki.ca.ca.certificate,)
    assert bundles.certificates(OTHER_TD) == (pki.other.ca.certificate,)
    assert bundles.certificates("nowhere.td") == ()
    assert bundles.store(TD) is not None
    assert bundles.store("nowhere.td") is None


def test_two_cas_of_one_trust_domain_share_its_bundle(pki: Pki) -> None:
    rogue_pem = (pki.directory / "rogue" / "ca.crt").read_bytes()

    bundles = TrustBundles.from_pem(pki.bundle_pem + rogue_pem)

    assert bundles.certificates(TD) == (pki.ca.ca.certificate, pki.rogue.ca.certificate)
    verifier = PeerVerifier(bundles)
    assert verifier.verify_pem(pki.rogue.good().pem).spiffe_id.uri == ORDERS
    assert verifier.verify_pem(pki.ca.good().pem).spiffe_id.uri == ORDERS


def test_a_ca_without_a_spiffe_san_needs_a_default_trust_domain(pki: Pki) -> None:
    plain = pki.ca.leaf((), dns=["not-a-ca"], is_ca=True)
    data = plain.pem.encode()

    with pytest.raises(ConfigurationError) as info:
        TrustBundles.from_pem(data)
    assert info.value.field == "bundle"
    assert str(info.value) == (
        "bundle: CA 'CN=leaf,O=tests' names no trust domain (no spiffe:// URI SAN) "
        "and no default trust domain was given"
    )

    bundles = TrustBundles.from_pem(data, default_trust_domain="legacy.td")
    assert bundles.trust_domains == frozenset({"legacy.td"})


def test_bundles_need_at_least_one_ca() -> None:
    with pytest.raises(ConfigurationError) as info:
        TrustBundles({})
    assert str(info.value) == "bundle: no trust bundle: at least one CA is needed"


@pytest.mark.parametrize("data", [b"", b"hello", b"-----BEGIN CERTIFICATE-----\nAAAA\n"])
def test_bundles_refuse_what_is_not_pem(data: bytes) -> None:
    with pytest.raises(ConfigurationError) as info:
        TrustBundles.from_pem(data)
    assert info.value.field == "bundle"
    assert str(info.value).startswith("bundle: not PEM certificates: ")


def test_bundles_from_a_file(pki: Pki, tmp_path: Path) -> None:
    assert TrustBundles.from_file(pki.bundle_file()).trust_domains == frozenset({TD, OTHER_TD})

    missing = tmp_path / "missing.pem"
    with pytest.raises(ConfigurationError) as info:
        TrustBundles.from_file(missing)
    assert (
        str(info.value) == f"bundle: cannot read trust bundle {missing}: No such file or directory"
    )
    assert info.value.value == str(missing)

    junk = tmp_path / "junk.pem"
    junk.write_text("junk")
    with pytest.raises(ConfigurationError) as info:
        TrustBundles.from_file(junk)
    assert str(info.value).startswith(f"bundle: {junk}: bundle: not PEM certificates")


# -- spiffe_id_of ------------------------------------------------------------------------------


def test_spiffe_id_of_a_good_certificate(pki: Pki) -> None:
    assert spiffe_id_of(pki.ca.good().cert) == SpiffeId.parse(ORDERS)


@pytest.mark.parametrize(
    ("make", "reason", "message"),
    [
        (Issuer.no_san, "no-uri-san", "the certificate has no subject alternative names"),
        (Issuer.dns_only, "no-uri-san", "the certificate has no URI SAN"),
        (
            Issuer.two_uris,
            "multiple-uri-sans",
            "the certificate has 2 URI SANs; exactly one SPIFFE id is allowed",
        ),
        (
            Issuer.non_spiffe_uri,
            "invalid-spiffe-id",
            "invalid SPIFFE id 'https://orders.example.com/': expected the scheme 'spiffe://' "
            "[scheme]",
        ),
    ],
)
def test_spiffe_id_of_refuses_a_certificate_without_exactly_one_spiffe_id(
    pki: Pki, make: Callable[[Issuer], Minted], reason: str, message: str
) -> None:
    with pytest.raises(CertificateRejected) as info:
        spiffe_id_of(make(pki.ca).cert)
    assert info.value.reason == reason
    assert str(info.value) == message


# -- PeerVerifier: accepted --------------------------------------------------------------------


def test_a_good_certificate_is_accepted_as_der_and_as_pem(pki: Pki, verifier: PeerVerifier) -> None:
    cert = pki.ca.good()

    from_der = verifier.verify_der(cert.der)
    from_pem = verifier.verify_pem(cert.pem)

    assert (
        from_der
        == from_pem
        == VerifiedPeer(spiffe_id=SpiffeId.parse(ORDERS), not_after=cert.cert.not_valid_after_utc)
    )


def test_each_trust_domain_accepts_its_own_cas_certificates(
    pki: Pki, verifier: PeerVerifier
) -> None:
    other_id = "spiffe://other.td/ns/billing/sa/invoices"

    assert verifier.verify_pem(pki.other.good(other_id).pem).spiffe_id.uri == other_id


def test_an_issued_service_certificate_is_accepted(pki: Pki, verifier: PeerVerifier) -> None:
    paths = pki.ca.ca.issue("checkout", namespace="shop")

    peer = verifier.verify_pem(paths.cert.read_text())

    assert peer.spiffe_id.principal == "cluster.local/ns/shop/sa/checkout"


# -- PeerVerifier: refused, each with its reason ------------------------------------------------


@pytest.mark.parametrize("der", [False, True], ids=["pem", "der"])
@pytest.mark.parametrize(
    ("make", "reason", "phrase"),
    [
        (lambda p: p.ca.expired(), "expired", "the certificate expired at "),
        (lambda p: p.ca.not_yet_valid(), "not-yet-valid", "the certificate is not valid before "),
        (
            lambda p: p.rogue.good(),
            "untrusted",
            "the certificate does not chain to a CA of trust domain 'cluster.local'",
        ),
        (
            lambda p: p.other.good(ORDERS),
            "untrusted",
            "the certificate does not chain to a CA of trust domain 'cluster.local'",
        ),
        (
            lambda p: p.ca.good("spiffe://nowhere.td/ns/a/sa/b"),
            "unknown-trust-domain",
            "no trust bundle for trust domain 'nowhere.td' (trusted: cluster.local, other.td)",
        ),
        (
            lambda p: p.other.good("spiffe://nowhere.td/ns/a/sa/b"),
            "unknown-trust-domain",
            "no trust bundle for trust domain 'nowhere.td'",
        ),
        (lambda p: p.ca.no_san(), "no-uri-san", "no subject alternative names"),
        (lambda p: p.ca.dns_only(), "no-uri-san", "the certificate has no URI SAN"),
        (lambda p: p.ca.two_uris(), "multiple-uri-sans", "has 2 URI SANs"),
        (lambda p: p.ca.non_spiffe_uri(), "invalid-spiffe-id", "[scheme]"),
        (
            lambda p: p.ca.leaf(["spiffe://Cluster.Local/ns/a/sa/b"]),
            "invalid-spiffe-id",
            "[trust-domain-chars]",
        ),
        (
            lambda p: p.ca.self_signed(),
            "untrusted",
            "the certificate does not chain to a CA of trust domain 'cluster.local'",
        ),
        (
            lambda p: p.ca.ca_flagged(),
            "untrusted",
            "basicConstraints.cA must not be asserted in an EE certificate",
        ),
    ],
    ids=[
        "expired",
        "not-yet-valid",
        "wrong-ca",
        "other-trust-domains-ca",
        "unknown-trust-domain",
        "unknown-trust-domain-other-ca",
        "no-san",
        "dns-only-san",
        "two-uri-sans",
        "non-spiffe-uri",
        "invalid-spiffe-id",
        "self-signed",
        "ca-flagged-leaf",
    ],
)
def test_a_bad_certificate_is_refused_with_its_reason(
    pki: Pki,
    verifier: PeerVerifier,
    make: Callable[[Pki], Minted],
    reason: str,
    phrase: str,
    der: bool,
) -> None:
    refused = rejection(verifier, make(pki), der=der)

    assert refused.reason == reason
    assert phrase in str(refused)


def test_the_trust_domains_own_ca_is_what_vouches(pki: Pki) -> None:
    # other.td's CA is trusted for other.td only; alone it cannot vouch for cluster.local,
    # and without cluster.local's bundle that trust domain is simply unknown.
    only_other = PeerVerifier(TrustBundles({OTHER_TD: [pki.other.ca.certificate]}))

    assert rejection(only_other, pki.other.good(ORDERS)).reason == "unknown-trust-domain"
    misfiled = PeerVerifier(TrustBundles({TD: [pki.other.ca.certificate]}))
    assert misfiled.verify_pem(pki.other.good(ORDERS).pem).spiffe_id.uri == ORDERS


@pytest.mark.parametrize(
    "data",
    [b"", b"garbage", b"0\x03\x02\x01\x00", b"\x30\x82\xff\xff" + b"\x00" * 16],
)
def test_malformed_der_is_refused(verifier: PeerVerifier, data: bytes) -> None:
    with pytest.raises(CertificateRejected) as info:
        verifier.verify_der(data)
    assert info.value.reason == "malformed"
    assert str(info.value).startswith("unparseable certificate: ")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not a certificate",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        "-----BEGIN CERTIFICATE-----\n\u00e9\u00e9\n-----END CERTIFICATE-----\n",
    ],
)
def test_malformed_pem_is_refused(verifier: PeerVerifier, text: str) -> None:
    with pytest.raises(CertificateRejected) as info:
        verifier.verify_pem(text)
    assert info.value.reason == "malformed"


def test_a_pem_private_key_is_no_certificate(pki: Pki, verifier: PeerVerifier) -> None:
    with pytest.raises(CertificateRejected) as info:
        verifier.verify_pem(pki.ca.good().key_pem.decode())
    assert info.value.reason == "malformed"


def test_a_malformed_intermediate_is_refused(pki: Pki, verifier: PeerVerifier) -> None:
    with pytest.raises(CertificateRejected) as info:
        verifier.verify_pem(pki.ca.good().pem, ["not a certificate"])
    assert info.value.reason == "malformed"


def test_a_superfluous_valid_intermediate_does_not_hurt(pki: Pki, verifier: PeerVerifier) -> None:
    ca_pem = (pki.directory / "mesh" / "ca.crt").read_text()

    assert verifier.verify_pem(pki.ca.good().pem, [ca_pem]).spiffe_id.uri == ORDERS


def test_validity_is_judged_by_the_clock(pki: Pki) -> None:
    cert = pki.ca.good(hours=1)
    clock = UtcClock(cert.cert.not_valid_before_utc - dt.timedelta(seconds=1))
    verifier = PeerVerifier(pki.bundles(), clock=clock)

    assert rejection(verifier, cert).reason == "not-yet-valid"
    clock.now = cert.cert.not_valid_before_utc
    assert verifier.verify_pem(cert.pem).spiffe_id.uri == ORDERS
    clock.now = cert.cert.not_valid_after_utc
    assert verifier.verify_der(cert.der).spiffe_id.uri == ORDERS
    clock.now = cert.cert.not_valid_after_utc + dt.timedelta(seconds=1)
    assert rejection(verifier, cert).reason == "expired"
    assert rejection(verifier, cert, der=True).reason == "expired"


# -- the cache ---------------------------------------------------------------------------------


def test_the_cache_answers_without_verifying_again(pki: Pki, verifier: PeerVerifier) -> None:
    calls = count_verifications(verifier)
    cert = pki.ca.good()

    first = verifier.verify_pem(cert.pem)
    second = verifier.verify_pem(cert.pem)

    assert second is first
    assert calls[0] == 1
    verifier.verify_der(cert.der)
    verifier.verify_der(cert.der)
    assert calls[0] == 2


def test_the_cache_remembers_refusals_too(pki: Pki, verifier: PeerVerifier) -> None:
    calls = count_verifications(verifier)
    cert = pki.rogue.good()

    first = rejection(verifier, cert)
    second = rejection(verifier, cert)

    assert first.reason == second.reason == "untrusted"
    assert str(second) == str(first)
    assert calls[0] == 1


def _depth(exc: BaseException) -> int:
    tb, depth = exc.__traceback__, 0
    while tb is not None:
        tb, depth = tb.tb_next, depth + 1
    return depth


def test_a_remembered_refusal_is_raised_afresh_each_time(pki: Pki, verifier: PeerVerifier) -> None:
    # Re-raising one cached instance would grow its traceback on every hit and keep each
    # caller's frames (and their requests) alive.
    cert = pki.rogue.good()

    refusals = [rejection(verifier, cert) for _ in range(6)]

    assert len({id(r) for r in refusals}) == 6
    assert len({_depth(r) for r in refusals[1:]}) == 1
    assert {(r.reason, str(r)) for r in refusals} == {(refusals[0].reason, str(refusals[0]))}
    assert refusals[0].__cause__ is not None  # the first, computed one keeps its cause


def test_a_cached_result_expires_with_the_certificate(pki: Pki) -> None:
    cert = pki.ca.good(hours=1)
    not_after = cert.cert.not_valid_after_utc
    clock = UtcClock(not_after - dt.timedelta(minutes=30))
    verifier = PeerVerifier(pki.bundles(), clock=clock)
    calls = count_verifications(verifier)

    assert verifier.verify_pem(cert.pem).not_after == not_after
    clock.now = not_after
    assert verifier.verify_pem(cert.pem).not_after == not_after
    assert calls[0] == 1

    clock.now = not_after + dt.timedelta(seconds=1)
    refused = rejection(verifier, cert)
    assert refused.reason == "expired"
    assert str(refused) == f"the certificate expired at {not_after.isoformat()}"
    assert calls[0] == 2


def test_a_not_yet_valid_refusal_is_not_remembered(pki: Pki) -> None:
    cert = pki.ca.good(hours=1)
    clock = UtcClock(cert.cert.not_valid_before_utc - dt.timedelta(minutes=1))
    verifier = PeerVerifier(pki.bundles(), clock=clock)

    assert rejection(verifier, cert).reason == "not-yet-valid"
    clock.now = cert.cert.not_valid_before_utc + dt.timedelta(seconds=1)

    assert verifier.verify_pem(cert.pem).spiffe_id.uri == ORDERS


def test_new_bundles_invalidate_the_cache(pki: Pki) -> None:
    current = [pki.bundles()]
    verifier = PeerVerifier(lambda: current[0])
    calls = count_verifications(verifier)
    cert = pki.ca.good()

    verifier.verify_pem(cert.pem)
    verifier.verify_pem(cert.pem)
    assert calls[0] == 1

    current[0] = pki.bundles()  # equal content, but a new object: verified again
    verifier.verify_pem(cert.pem)
    assert calls[0] == 2
    assert verifier.bundles is current[0]

    current[0] = TrustBundles({OTHER_TD: [pki.other.ca.certificate]})
    assert rejection(verifier, cert).reason == "unknown-trust-domain"

    current[0] = TrustBundles({TD: [pki.rogue.ca.certificate]})
    assert rejection(verifier, cert).reason == "untrusted"
    assert verifier.verify_pem(pki.rogue.good().pem).spiffe_id.uri == ORDERS
    assert calls[0] == 5


def test_the_cache_is_bounded(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bundle_module, "_CACHE_SIZE", 2)
    verifier = PeerVerifier(pki.bundles())
    calls = count_verifications(verifier)
    a, b, c = (pki.ca.good(f"spiffe://cluster.local/ns/default/sa/s{i}") for i in range(3))

    for cert in (a, b, c):
        verifier.verify_pem(cert.pem)
    assert calls[0] == 3
    assert len(verifier._cache) == 2

    verifier.verify_pem(c.pem)  # still cached
    assert calls[0] == 3
    verifier.verify_pem(a.pem)  # evicted first: verified again
    assert calls[0] == 4


def test_certificates_of_the_same_identity_are_cached_apart(
    pki: Pki, verifier: PeerVerifier
) -> None:
    good, expired = pki.ca.good(), pki.ca.expired()

    assert verifier.verify_pem(good.pem).spiffe_id.uri == ORDERS
    assert rejection(verifier, expired).reason == "expired"
    assert verifier.verify_pem(good.pem).spiffe_id.uri == ORDERS
