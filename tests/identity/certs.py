"""Certificates for identity tests, good and odd, minted with ``cryptography``.

``Pki.create(directory)`` sets up three CAs with :class:`meshware.identity.ca.LocalCA`:

- ``ca``: the mesh's own CA for ``cluster.local`` (in the bundles);
- ``other``: a CA for ``other.td`` (in the bundles too, but it may only vouch for ``other.td``);
- ``rogue``: a CA that also claims ``cluster.local`` but is in no bundle.

``Issuer.leaf()`` signs a leaf with any of them and bends one rule at a time: validity dates,
SANs, the CA flag, or the signer itself (self-signed).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshware.identity.bundle import TrustBundles
from meshware.identity.ca import LocalCA

TD = "cluster.local"
OTHER_TD = "other.td"
ORDERS = "spiffe://cluster.local/ns/default/sa/orders"
CHECKOUT = "spiffe://cluster.local/ns/shop/sa/checkout"
INGRESS = "spiffe://cluster.local/ns/istio-system/sa/ingress"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass(frozen=True)
class Minted:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(self, directory: Path, name: str) -> tuple[Path, Path]:
        """Write ``<name>.crt`` and ``<name>.key``; return their paths."""
        cert, key = directory / f"{name}.crt", directory / f"{name}.key"
        cert.write_text(self.pem)
        key.write_bytes(self.key_pem)
        return cert, key


class Issuer:
    """Signs leaves with a LocalCA's key (read from its ``ca.key``, as an operator would)."""

    def __init__(self, ca: LocalCA) -> None:
        self.ca = ca
        key = serialization.load_pem_private_key(
            (ca.directory / "ca.key").read_bytes(), password=None
        )
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        self.key = key

    def leaf(
        self,
        uris: Sequence[str] = (ORDERS,),
        *,
        dns: Sequence[str] = (),
        ips: Sequence[str] = (),
        san: bool = True,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        is_ca: bool = False,
        self_signed: bool = False,
    ) -> Minted:
        """A leaf for ``uris``; every keyword bends one property away from a good leaf."""
        now = utcnow()
        key = ec.generate_private_key(ec.SECP256R1())
        signer = key if self_signed else self.key
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tests"),
                x509.NameAttribute(NameOID.COMMON_NAME, "leaf"),
            ]
        )
        issuer = subject if self_signed else self.ca.certificate.subject
        issuer_ski = x509.SubjectKeyIdentifier.from_public_key(signer.public_key())
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - dt.timedelta(minutes=5))
            .not_valid_after(not_after or now + dt.timedelta(hours=1))
            .add_extension(
                x509.BasicConstraints(ca=is_ca, path_length=None),
                critical=True,
            )
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=is_ca,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski),
                critical=False,
            )
        )
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        names += [x509.DNSName(d) for d in dns]
        names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return Minted(builder.sign(signer, hashes.SHA256()), key)

    # -- one oddity each ---------------------------------------------------------------------

    def good(self, uri: str = ORDERS, *, hours: float = 1) -> Minted:
        return self.leaf([uri], not_after=utcnow() + dt.timedelta(hours=hours))

    def expired(self, uri: str = ORDERS) -> Minted:
        now = utcnow()
        return self.leaf(
            [uri], not_before=now - dt.timedelta(days=2), not_after=now - dt.timedelta(days=1)
        )

    def not_yet_valid(self, uri: str = ORDERS) -> Minted:
        now = utcnow()
        return self.leaf(
            [uri], not_before=now + dt.timedelta(days=1), not_after=now + dt.timedelta(days=2)
        )

    def no_san(self) -> Minted:
        return self.leaf((), san=False)

    def dns_only(self) -> Minted:
        return self.leaf((), dns=["orders.default.svc"])

    def two_uris(self) -> Minted:
        return self.leaf([ORDERS, CHECKOUT])

    def non_spiffe_uri(self) -> Minted:
        return self.leaf(["https://orders.example.com/"])

    def self_signed(self, uri: str = ORDERS) -> Minted:
        return self.leaf([uri], self_signed=True)

    def ca_flagged(self, uri: str = ORDERS) -> Minted:
        return self.leaf([uri], is_ca=True)


@dataclass(frozen=True)
class Pki:
    """Three CAs (see the module docs) and the bundles that trust two of them."""

    directory: Path
    ca: Issuer
    other: Issuer
    rogue: Issuer

    @classmethod
    def create(cls, directory: Path) -> Pki:
        return cls(
            directory=directory,
            ca=Issuer(LocalCA.init(directory / "mesh", trust_domain=TD)),
            other=Issuer(LocalCA.init(directory / "other", trust_domain=OTHER_TD)),
            rogue=Issuer(LocalCA.init(directory / "rogue", trust_domain=TD)),
        )

    @property
    def bundle_pem(self) -> bytes:
        """The mesh's bundle file followed by ``other.td``'s: both trust domains."""
        return (self.directory / "mesh" / "bundle.pem").read_bytes() + (
            self.directory / "other" / "bundle.pem"
        ).read_bytes()

    def bundles(self) -> TrustBundles:
        return TrustBundles.from_pem(self.bundle_pem)

    def bundle_file(self) -> Path:
        path = self.directory / "trust-bundle.pem"
        if not path.exists():
            path.write_bytes(self.bundle_pem)
        return path
