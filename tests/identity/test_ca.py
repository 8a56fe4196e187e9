"""LocalCA: the files it writes, the certificates it issues, and how it fails."""

from __future__ import annotations

import datetime as dt
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from meshware.exceptions import ConfigurationError, InvalidSpiffeId
from meshware.identity.bundle import PeerVerifier, TrustBundles
from meshware.identity.ca import (
    CERT_DIR_ENV,
    LocalCA,
    ServicePaths,
    certificate_trust_domain,
    default_cert_dir,
    parse_duration,
)
from meshware.identity.spiffe import SpiffeId
from tests.identity.certs import Issuer


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def san_of(cert: x509.Certificate) -> x509.SubjectAlternativeName:
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def ski_of(cert: x509.Certificate) -> bytes:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


@pytest.fixture
def ca(tmp_path: Path) -> LocalCA:
    return LocalCA.init(tmp_path / "certs")


# -- init ------------------------------------------------------------------------------------


def test_init_writes_the_documented_files(tmp_path: Path) -> None:
    root = tmp_path / "certs"

    ca = LocalCA.init(root, trust_domain="example.org")

    assert sorted(p.name for p in root.iterdir()) == ["bundle.pem", "ca.crt", "ca.key"]
    assert mode(root / "ca.key") == 0o600
    assert mode(root / "ca.crt") == 0o644
    assert mode(root / "bundle.pem") == 0o644
    assert (root / "bundle.pem").read_bytes() == (root / "ca.crt").read_bytes()
    assert ca.directory == root
    assert ca.trust_domain == "example.org"
    assert load_cert(root / "ca.crt") == ca.certificate
    key = serialization.load_pem_private_key((root / "ca.key").read_bytes(), password=None)
    assert key.public_key() == ca.certificate.public_key()


def test_the_ca_certificate_is_a_ca_naming_its_trust_domain(ca: LocalCA) -> None:
    cert = ca.certificate
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)

    assert constraints.critical
    assert constraints.value.ca is True
    assert constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign and usage.value.crl_sign
    assert san_of(cert).get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://cluster.local"
    ]
    assert certificate_trust_domain(cert) == "cluster.local"
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski_of(cert)
    assert cert.issuer == cert.subject


def test_init_validity(tmp_path: Path) -> None:
    ca = LocalCA.init(tmp_path, validity=dt.timedelta(days=30))
    cert = ca.certificate

    # Valid from five minutes ago (clock skew) for the requested validity.
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(days=30, minutes=5)


@pytest.mark.parametrize(
    "validity", [dt.timedelta(0), dt.timedelta(seconds=-1), dt.timedelta(days=3_650_000)]
)
def test_init_refuses_an_unusable_validity(tmp_path: Path, validity: dt.timedelta) -> None:
    with pytest.raises(ConfigurationError) as info:
        LocalCA.init(tmp_path, validity=validity)

    assert info.value.field == "validity"
    assert "expected a positive duration of at most 1000 years" in str(info.value)
    assert not any(tmp_path.iterdir())


def test_init_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    first = LocalCA.init(tmp_path)
    key_before = (tmp_path / "ca.key").read_bytes()

    with pytest.raises(ConfigurationError) as info:
        LocalCA.init(tmp_path)

    assert info.value.field == "dir"
    assert info.value.value == str(tmp_path)
    assert str(info.value) == f"dir: a CA already exists in {tmp_path} (use --force to replace it)"
    assert (tmp_path / "ca.key").read_bytes() == key_before

    second = LocalCA.init(tmp_path, force=True)
    assert (tmp_path / "ca.key").read_bytes() != key_before
    assert second.certificate != first.certificate
    assert LocalCA.load(tmp_path).certificate == second.certificate


def test_init_refuses_an_invalid_trust_domain_before_writing(tmp_path: Path) -> None:
    with pytest.raises(InvalidSpiffeId) as info:
        LocalCA.init(tmp_path / "certs", trust_domain="Cluster.Local")

    assert info.value.rule == "trust-domain-chars"
    assert not (tmp_path / "certs").exists()


def test_the_default_directory_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(CERT_DIR_ENV, raising=False)
    assert default_cert_dir() == Path(".meshware/certs")

    monkeypatch.setenv(CERT_DIR_ENV, str(tmp_path / "from-env"))
    ca = LocalCA.init()

    assert ca.directory == tmp_path / "from-env"
    assert (tmp_path / "from-env" / "ca.key").exists()
    assert LocalCA.load().certificate == ca.certificate


# -- load ------------------------------------------------------------------------------------


def test_load_opens_what_init_wrote(tmp_path: Path) -> None:
    created = LocalCA.init(tmp_path, trust_domain="example.org")

    loaded = LocalCA.load(tmp_path)

    assert loaded.trust_domain == "example.org"
    assert loaded.certificate == created.certificate
    assert loaded.directory == tmp_path


def test_load_of_a_missing_directory_says_to_run_ca_init(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"

    with pytest.raises(ConfigurationError) as info:
        LocalCA.load(missing)

    assert info.value.field == "dir"
    assert info.value.value == str(missing)
    assert str(info.value) == (
        f"dir: no CA in {missing}: {missing / 'ca.key'} is missing "
        f"(run 'meshware ca init --dir {missing}')"
    )


def test_load_of_a_missing_certificate(ca: LocalCA) -> None:
    (ca.directory / "ca.crt").unlink()

    with pytest.raises(ConfigurationError, match=r"ca\.crt is missing .*meshware ca init"):
        LocalCA.load(ca.directory)


def test_load_of_files_that_are_not_pem(ca: LocalCA) -> None:
    (ca.directory / "ca.crt").write_text("not a certificate\n")

    with pytest.raises(ConfigurationError) as info:
        LocalCA.load(ca.directory)

    assert info.value.field == "dir"
    assert f"the CA files in {ca.directory} are not valid PEM" in str(info.value)


def test_load_refuses_a_non_ec_key(ca: LocalCA) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (ca.directory / "ca.key").write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )

    with pytest.raises(ConfigurationError) as info:
        LocalCA.load(ca.directory)

    assert str(info.value) == "dir: the CA key must be an EC key"
    assert info.value.value == str(ca.directory / "ca.key")


def test_load_refuses_a_ca_without_a_spiffe_san(ca: LocalCA) -> None:
    leaf = Issuer(ca).leaf((), dns=["orders"])
    (ca.directory / "ca.crt").write_text(leaf.pem)

    with pytest.raises(ConfigurationError) as info:
        LocalCA.load(ca.directory)

    assert str(info.value) == (
        f"dir: {ca.directory / 'ca.crt'} has no spiffe://<trust-domain> URI SAN"
    )


# -- issue -----------------------------------------------------------------------------------


def test_issue_writes_key_cert_and_bundle_at_the_documented_paths(ca: LocalCA) -> None:
    paths = ca.issue("orders", namespace="shop")

    base = ca.directory / "services" / "shop" / "orders"
    assert paths == ServicePaths(
        key=base / "key.pem", cert=base / "cert.pem", bundle=base / "bundle.pem"
    )
    assert paths == ServicePaths.under(ca.directory, "orders", "shop")
    assert sorted(p.name for p in base.iterdir()) == ["bundle.pem", "cert.pem", "key.pem"]
    assert mode(paths.key) == 0o600
    assert mode(paths.cert) == 0o644
    assert paths.bundle.read_bytes() == (ca.directory / "bundle.pem").read_bytes()
    key = serialization.load_pem_private_key(paths.key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key() == load_cert(paths.cert).public_key()


def test_the_issued_certificate(ca: LocalCA) -> None:
    cert = load_cert(ca.issue("orders", namespace="shop").cert)
    san = san_of(cert)

    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://cluster.local/ns/shop/sa/orders"
    ]
    assert san.get_values_for_type(x509.DNSName) == ["orders", "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca is False
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature and not usage.value.key_cert_sign
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski_of(ca.certificate)
    assert cert.issuer == ca.certificate.subject
    ca.certificate.public_key().verify(  # type: ignore[call-arg, union-attr]
        cert.signature,
        cert.tbs_certificate_bytes,
        ec.ECDSA(cert.signature_hash_algorithm),  # type: ignore[arg-type]
    )


def test_issue_with_explicit_dns_and_ip_sans(ca: LocalCA) -> None:
    cert = load_cert(
        ca.issue("orders", dns_names=["orders.shop.svc"], ip_addresses=["10.0.0.7", "::1"]).cert
    )
    san = san_of(cert)

    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://cluster.local/ns/default/sa/orders"
    ]
    assert san.get_values_for_type(x509.DNSName) == ["orders.shop.svc"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.7", "::1"]


def test_issue_validity_follows_the_ttl(ca: LocalCA) -> None:
    cert = load_cert(ca.issue("orders", ttl=dt.timedelta(hours=3)).cert)

    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(hours=3, minutes=5)


@pytest.mark.parametrize("ttl", [dt.timedelta(days=30), dt.timedelta(days=999_999_999)])
def test_issue_validity_is_clamped_to_the_cas(tmp_path: Path, ttl: dt.timedelta) -> None:
    ca = LocalCA.init(tmp_path, validity=dt.timedelta(days=2))

    cert = load_cert(ca.issue("orders", ttl=ttl).cert)

    assert cert.not_valid_after_utc == ca.certificate.not_valid_after_utc


@pytest.mark.parametrize("ttl", [dt.timedelta(0), dt.timedelta(hours=-1)])
def test_issue_refuses_a_non_positive_ttl(ca: LocalCA, ttl: dt.timedelta) -> None:
    with pytest.raises(ConfigurationError) as info:
        ca.issue("orders", ttl=ttl)

    assert info.value.field == "ttl"
    assert str(info.value) == "ttl: must be positive"
    assert not (ca.directory / "services").exists()


def test_issue_refuses_a_bad_ip(ca: LocalCA) -> None:
    with pytest.raises(ConfigurationError) as info:
        ca.issue("orders", ip_addresses=["10.0.0.300"])

    assert info.value.field == "ip"
    assert "'10.0.0.300' does not appear to be an IPv4 or IPv6 address" in str(info.value)


@pytest.mark.parametrize(
    ("service", "namespace", "rule"),
    [
        ("a b", "default", "path-chars"),
        ("orders", "x/y", "path-chars"),
        ("..", "a", "path-dot-segment"),
    ],
)
def test_issue_refuses_a_name_that_is_no_spiffe_path(
    ca: LocalCA, service: str, namespace: str, rule: str
) -> None:
    with pytest.raises(InvalidSpiffeId) as info:
        ca.issue(service, namespace=namespace)

    assert info.value.rule == rule
    assert not (ca.directory / "services").exists()


def test_reissue_replaces_the_files_without_leaving_temporaries(ca: LocalCA) -> None:
    first = ca.issue("orders")
    cert_before = first.cert.read_bytes()

    second = ca.issue("orders")

    assert second == first
    assert second.cert.read_bytes() != cert_before
    assert sorted(p.name for p in second.cert.parent.iterdir()) == [
        "bundle.pem",
        "cert.pem",
        "key.pem",
    ]


def test_a_loaded_ca_issues_certificates_its_bundle_verifies(ca: LocalCA) -> None:
    paths = LocalCA.load(ca.directory).issue("orders")

    peer = PeerVerifier(TrustBundles.from_file(paths.bundle)).verify_pem(paths.cert.read_text())

    assert peer.spiffe_id == SpiffeId.parse("spiffe://cluster.local/ns/default/sa/orders")
    assert peer.not_after == load_cert(paths.cert).not_valid_after_utc


def test_sign_raw_signs_without_writing(ca: LocalCA) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    spiffe_id = SpiffeId.for_service("cluster.local", "shop", "orders")

    cert = ca.sign_raw(key, spiffe_id, ttl=dt.timedelta(minutes=30))

    assert san_of(cert).get_values_for_type(x509.UniformResourceIdentifier) == [spiffe_id.uri]
    assert san_of(cert).get_values_for_type(x509.DNSName) == []
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(minutes=35)
    assert not (ca.directory / "services").exists()
    assert (
        PeerVerifier(TrustBundles({"cluster.local": [ca.certificate]}))
        .verify_der(cert.public_bytes(serialization.Encoding.DER))
        .spiffe_id
        == spiffe_id
    )


# -- what Python's own TLS thinks of these certificates ---------------------------------------


def _strict_context(server: bool, paths: ServicePaths) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    context.load_cert_chain(paths.cert, paths.key)
    context.load_verify_locations(paths.bundle)
    context.verify_mode = ssl.CERT_REQUIRED
    # What Python 3.13 turns on by default.
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    return context


def _handshake(client: ssl.SSLObject, server: ssl.SSLObject, bios: list[ssl.MemoryBIO]) -> None:
    client_in, client_out, server_in, server_out = bios
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, side, outgoing, peer_incoming in (
            ("client", client, client_out, server_in),
            ("server", server, server_out, client_in),
        ):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
            if data := outgoing.read():
                peer_incoming.write(data)
        if all(done.values()):
            return
    raise AssertionError(f"handshake did not complete: {done}")


def test_strict_x509_verification_accepts_a_mutual_tls_handshake(ca: LocalCA) -> None:
    server_paths = ca.issue("orders")
    client_paths = ca.issue("checkout", namespace="shop")
    bios = [ssl.MemoryBIO() for _ in range(4)]
    client = _strict_context(False, client_paths).wrap_bio(
        bios[0], bios[1], server_hostname="localhost"
    )
    server = _strict_context(True, server_paths).wrap_bio(bios[2], bios[3], server_side=True)

    _handshake(client, server, bios)

    client_seen = server.getpeercert()
    server_seen = client.getpeercert()
    assert client_seen is not None and server_seen is not None
    assert ("URI", "spiffe://cluster.local/ns/shop/sa/checkout") in client_seen["subjectAltName"]
    assert ("URI", "spiffe://cluster.local/ns/default/sa/orders") in server_seen["subjectAltName"]
    der = server.getpeercert(binary_form=True)
    assert der is not None
    verified = PeerVerifier(TrustBundles.from_file(server_paths.bundle)).verify_der(der)
    assert verified.spiffe_id.uri == "spiffe://cluster.local/ns/shop/sa/checkout"


def test_strict_verification_refuses_a_certificate_of_another_ca(
    ca: LocalCA, tmp_path: Path
) -> None:
    stranger = LocalCA.init(tmp_path / "stranger").issue("checkout")
    bios = [ssl.MemoryBIO() for _ in range(4)]
    client = _strict_context(False, stranger).wrap_bio(
        bios[0], bios[1], server_hostname="localhost"
    )
    server = _strict_context(True, ca.issue("orders")).wrap_bio(bios[2], bios[3], server_side=True)

    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        _handshake(client, server, bios)


# -- parse_duration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", dt.timedelta(seconds=90)),
        ("30m", dt.timedelta(minutes=30)),
        ("24h", dt.timedelta(hours=24)),
        ("7d", dt.timedelta(days=7)),
        (" 15m ", dt.timedelta(minutes=15)),
        ("0007d", dt.timedelta(days=7)),
        ("365000d", dt.timedelta(days=365000)),
    ],
)
def test_parse_duration(text: str, expected: dt.timedelta) -> None:
    assert parse_duration(text, field="ttl") == expected


@pytest.mark.parametrize(
    "text",
    ["", "h", "24", "24x", "24H", "-5m", "+5m", "0s", "1.5h", "5 m", "1h30m", "²h", "٣h",
     "99999999999999d", "9" * 5000 + "s", "365001d"],
)  # fmt: skip
def test_parse_duration_refuses_anything_else(text: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        parse_duration(text, field="--ttl")

    assert info.value.field == "--ttl"
    assert info.value.value == text
    assert str(info.value).startswith(
        "--ttl: expected a positive duration like '24h', '30m', '90s' or '7d', got "
    )
