"""A local certificate authority for development and small deployments.

Directory layout (``DIR`` is ``--dir``, by default ``$MESHWARE_CERT_DIR`` or ``./.meshware/certs``)::

    DIR/ca.key                          the CA's private key (mode 0600)
    DIR/ca.crt                          the CA certificate (URI SAN spiffe://<trust-domain>)
    DIR/bundle.pem                      the trust bundle: every CA this mesh trusts
    DIR/services/<ns>/<service>/key.pem     the service's private key (mode 0600)
    DIR/services/<ns>/<service>/cert.pem    its certificate (one URI SAN: its SPIFFE id)
    DIR/services/<ns>/<service>/bundle.pem  a copy of the trust bundle

Files are written atomically (a temporary file renamed into place), so a running server that
watches them never reads half a file; the key is written before the certificate.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshware.exceptions import ConfigurationError
from meshware.identity.spiffe import SpiffeId, trust_domain_id

DEFAULT_CERT_DIR = ".meshware/certs"
CERT_DIR_ENV = "MESHWARE_CERT_DIR"
_CLOCK_SKEW = dt.timedelta(minutes=5)
# Far beyond any useful lifetime, yet well inside what datetime and X.509 can represent.
_MAX_DURATION_SECONDS = 1000 * 365 * 86400


def default_cert_dir() -> Path:
    """``$MESHWARE_CERT_DIR`` if set, else ``./.meshware/certs``."""
    return Path(os.environ.get(CERT_DIR_ENV) or DEFAULT_CERT_DIR)


@dataclass(frozen=True, slots=True)
class ServicePaths:
    """Where a service's credentials live under a certificate directory."""

    key: Path
    cert: Path
    bundle: Path

    @classmethod
    def under(cls, cert_dir: str | os.PathLike[str], service: str, namespace: str) -> ServicePaths:
        base = Path(cert_dir) / "services" / namespace / service
        return cls(key=base / "key.pem", cert=base / "cert.pem", bundle=base / "bundle.pem")


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def parse_duration(text: str, *, field: str) -> dt.timedelta:
    """Parse ``"24h"``, ``"30m"``, ``"90s"``, ``"7d"`` (one number and one unit)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    value = text.strip()
    number = value[:-1]
    # isascii: str.isdigit() also accepts digits int() refuses (superscripts); the length
    # bound keeps int() away from its digit limit.
    if number.isascii() and number.isdigit() and len(number) <= 15 and value[-1] in units:
        seconds = int(number) * units[value[-1]]
        if 0 < seconds <= _MAX_DURATION_SECONDS:
            return dt.timedelta(seconds=seconds)
    raise ConfigurationError(
        f"expected a positive duration like '24h', '30m', '90s' or '7d', got {text!r}",
        field=field,
        value=text,
    )


class LocalCA:
    """The CA stored in a certificate directory; issues service certificates.

    Use :meth:`init` to create one and :meth:`load` to open an existing one.
    """

    def __init__(
        self,
        directory: Path,
        key: ec.EllipticCurvePrivateKey,
        cert: x509.Certificate,
        trust_domain: str,
    ) -> None:
        self.directory = directory
        self._key = key
        self.certificate = cert
        self.trust_domain = trust_domain

    @classmethod
    def init(
        cls,
        directory: str | os.PathLike[str] | None = None,
        *,
        trust_domain: str = "cluster.local",
        validity: dt.timedelta = dt.timedelta(days=3650),
        force: bool = False,
    ) -> LocalCA:
        """Create a CA for ``trust_domain`` in ``directory``.

        Args:
            directory: the certificate directory (default: :func:`default_cert_dir`).
            trust_domain: the SPIFFE trust domain the CA vouches for.
            validity: how long the CA certificate is valid.
            force: replace an existing CA (every certificate it issued stops being trusted).

        Raises:
            ConfigurationError: an invalid trust domain, or a CA already exists and not ``force``.
        """
        root = Path(directory) if directory is not None else default_cert_dir()
        td_id = trust_domain_id(trust_domain)  # validates the trust domain
        if not dt.timedelta(0) < validity <= dt.timedelta(seconds=_MAX_DURATION_SECONDS):
            raise ConfigurationError(
                "expected a positive duration of at most 1000 years",
                field="validity",
                value=validity,
            )
        if (root / "ca.key").exists() and not force:
            raise ConfigurationError(
                f"a CA already exists in {root} (use --force to replace it)",
                field="dir",
                value=str(root),
            )
        key = _new_key()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshware"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"meshware CA {trust_domain}"),
            ]
        )
        now = dt.datetime.now(dt.timezone.utc)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(td_id.uri)]),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        _write_atomic(root / "ca.key", _key_pem(key), 0o600)
        _write_atomic(root / "ca.crt", cert_pem, 0o644)
        _write_atomic(root / "bundle.pem", cert_pem, 0o644)
        return cls(root, key, cert, trust_domain)

    @classmethod
    def load(cls, directory: str | os.PathLike[str] | None = None) -> LocalCA:
        """Open the CA in ``directory``; a missing or unreadable file is a ConfigurationError."""
        root = Path(directory) if directory is not None else default_cert_dir()
        key_path, cert_path = root / "ca.key", root / "ca.crt"
        try:
            key_bytes = key_path.read_bytes()
            cert_bytes = cert_path.read_bytes()
        except FileNotFoundError as exc:
            raise ConfigurationError(
                f"no CA in {root}: {exc.filename} is missing (run 'meshware ca init --dir {root}')",
                field="dir",
                value=str(root),
            ) from exc
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read {exc.filename}: {exc.strerror}", field="dir", value=str(root)
            ) from exc
        try:
            key = serialization.load_pem_private_key(key_bytes, password=None)
            cert = x509.load_pem_x509_certificate(cert_bytes)
        except ValueError as exc:
            raise ConfigurationError(
                f"the CA files in {root} are not valid PEM: {exc}", field="dir", value=str(root)
            ) from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigurationError(
                "the CA key must be an EC key", field="dir", value=str(key_path)
            )
        td = _ca_trust_domain(cert)
        if td is None:
            raise ConfigurationError(
                f"{cert_path} has no spiffe://<trust-domain> URI SAN", field="dir", value=str(root)
            )
        return cls(root, key, cert, td)

    def issue(
        self,
        service: str,
        *,
        namespace: str = "default",
        ttl: dt.timedelta = dt.timedelta(hours=24),
        dns_names: Sequence[str] | None = None,
        ip_addresses: Sequence[str] | None = None,
    ) -> ServicePaths:
        """Issue a key and certificate for ``service`` and write them (see the module docs).

        The certificate carries exactly one URI SAN, the service's SPIFFE id, plus DNS and IP
        SANs for tools that check host names (default: the service name, ``localhost`` and
        ``127.0.0.1``). It has SKI and AKI, ``serverAuth`` and ``clientAuth`` key usages, and
        is valid from five minutes ago (clock skew) for ``ttl``.

        Returns:
            the paths written.
        """
        spiffe_id = SpiffeId.for_service(self.trust_domain, namespace, service)
        if ttl <= dt.timedelta(0):
            raise ConfigurationError("must be positive", field="ttl", value=ttl)
        dns = list(dns_names) if dns_names is not None else [service, "localhost"]
        ips = list(ip_addresses) if ip_addresses is not None else ["127.0.0.1"]
        try:
            ip_values = [ipaddress.ip_address(ip) for ip in ips]
        except ValueError as exc:
            raise ConfigurationError(str(exc), field="ip", value=ips) from exc
        key = _new_key()
        cert = self._sign_leaf(key, spiffe_id, ttl, dns, ip_values, service)
        paths = ServicePaths.under(self.directory, service, namespace)
        _write_atomic(paths.key, _key_pem(key), 0o600)
        _write_atomic(paths.bundle, (self.directory / "bundle.pem").read_bytes(), 0o644)
        _write_atomic(paths.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return paths

    def _sign_leaf(
        self,
        key: ec.EllipticCurvePrivateKey,
        spiffe_id: SpiffeId,
        ttl: dt.timedelta,
        dns: list[str],
        ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address],
        common_name: str,
    ) -> x509.Certificate:
        now = dt.datetime.now(dt.timezone.utc)
        ca_not_after = self.certificate.not_valid_after_utc
        # Compared before adding so that a huge ttl cannot overflow datetime.
        not_after = ca_not_after if ttl >= ca_not_after - now else now + ttl
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id.uri)]
        sans += [x509.DNSName(name) for name in dns]
        sans += [x509.IPAddress(ip) for ip in ips]
        ca_ski = self.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        return (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, spiffe_id.trust_domain),
                        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                    ]
                )
            )
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
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
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski.value),
                critical=False,
            )
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(self._key, hashes.SHA256())
        )

    def sign_raw(
        self,
        key: ec.EllipticCurvePrivateKey,
        spiffe_id: SpiffeId,
        *,
        ttl: dt.timedelta = dt.timedelta(hours=1),
    ) -> x509.Certificate:
        """Sign a leaf for ``key`` without writing files (tests and tooling)."""
        return self._sign_leaf(key, spiffe_id, ttl, [], [], spiffe_id.service_account or "leaf")


def _ca_trust_domain(cert: x509.Certificate) -> str | None:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in sans.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith("spiffe://"):
            return SpiffeId.parse(uri).trust_domain
    return None


def certificate_trust_domain(cert: x509.Certificate) -> str | None:
    """The trust domain a CA certificate names in its ``spiffe://`` URI SAN, if any."""
    return _ca_trust_domain(cert)
