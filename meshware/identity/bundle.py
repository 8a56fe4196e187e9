"""Trust bundles per trust domain, and verification of a peer's leaf certificate.

A peer is believed only when its certificate

1. carries exactly one URI SAN, a valid SPIFFE id;
2. chains to a CA in the bundle **of the trust domain that id claims** (a CA of another trust
   domain cannot vouch for it, even though the TLS layer, which holds every trusted CA, may
   have accepted the chain);
3. is within its validity dates (and so is its chain).

Each CA certificate in a bundle file is assigned to the trust domain named by its own
``spiffe://<trust-domain>`` URI SAN (as meshware's CA and SPIRE write them); a CA without one
belongs to the bundle file's default trust domain.

Verification is cached per certificate (keyed by its bytes), so a connection's certificate is
verified once, not once per request; a cached result still expires with the certificate.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509 import verification

from meshware.exceptions import CertificateRejected, ConfigurationError, InvalidSpiffeId
from meshware.identity.ca import certificate_trust_domain
from meshware.identity.spiffe import SpiffeId

_CACHE_SIZE = 4096


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class TrustBundles:
    """The CA certificates trusted for each trust domain.

    Args:
        bundles: trust domain -> its CA certificates.
    """

    def __init__(self, bundles: Mapping[str, Sequence[x509.Certificate]]) -> None:
        if not bundles:
            raise ConfigurationError("no trust bundle: at least one CA is needed", field="bundle")
        self._bundles = {td: tuple(certs) for td, certs in bundles.items()}
        self._trust_domains = frozenset(self._bundles)
        self._stores = {td: verification.Store(list(certs)) for td, certs in self._bundles.items()}

    @classmethod
    def from_pem(cls, data: bytes, *, default_trust_domain: str | None = None) -> TrustBundles:
        """Build bundles from concatenated PEM CA certificates (see the module docs)."""
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError as exc:
            raise ConfigurationError(f"not PEM certificates: {exc}", field="bundle") from exc
        grouped: dict[str, list[x509.Certificate]] = {}
        for cert in certs:
            td = certificate_trust_domain(cert) or default_trust_domain
            if td is None:
                raise ConfigurationError(
                    f"CA {cert.subject.rfc4514_string()!r} names no trust domain "
                    "(no spiffe:// URI SAN) and no default trust domain was given",
                    field="bundle",
                )
            grouped.setdefault(td, []).append(cert)
        return cls(grouped)

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], *, default_trust_domain: str | None = None
    ) -> TrustBundles:
        """Read a bundle file; a missing or unreadable file is a ConfigurationError."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read trust bundle {path}: {exc.strerror}", field="bundle", value=str(path)
            ) from exc
        try:
            return cls.from_pem(data, default_trust_domain=default_trust_domain)
        except ConfigurationError as exc:
            raise ConfigurationError(f"{path}: {exc}", field="bundle", value=str(path)) from exc

    @property
    def trust_domains(self) -> frozenset[str]:
        """The trust domains that have a bundle."""
        return self._trust_domains

    def certificates(self, trust_domain: str) -> tuple[x509.Certificate, ...]:
        """The CA certificates of ``trust_domain`` (empty if unknown)."""
        return self._bundles.get(trust_domain, ())

    def store(self, trust_domain: str) -> verification.Store | None:
        """The verification store of ``trust_domain``, or ``None`` if unknown."""
        return self._stores.get(trust_domain)


@dataclass(frozen=True, slots=True)
class VerifiedPeer:
    """The outcome of a successful verification."""

    spiffe_id: SpiffeId
    not_after: dt.datetime


def spiffe_id_of(cert: x509.Certificate) -> SpiffeId:
    """The certificate's single SPIFFE id, or :class:`CertificateRejected` saying why not."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CertificateRejected(
            "the certificate has no subject alternative names", reason="no-uri-san"
        ) from None
    except ValueError as exc:
        raise CertificateRejected(f"unreadable extensions: {exc}", reason="malformed") from exc
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if not uris:
        raise CertificateRejected("the certificate has no URI SAN", reason="no-uri-san")
    if len(uris) > 1:
        raise CertificateRejected(
            f"the certificate has {len(uris)} URI SANs; exactly one SPIFFE id is allowed",
            reason="multiple-uri-sans",
        )
    try:
        return SpiffeId.parse(uris[0])
    except InvalidSpiffeId as exc:
        raise CertificateRejected(str(exc), reason="invalid-spiffe-id") from exc


class PeerVerifier:
    """Verifies peer leaf certificates against per-trust-domain bundles, with a cache.

    Args:
        bundles: the trusted CAs, or a callable returning the current ones (so a reloading
            source can swap bundles; a new bundles object invalidates cached results).
        clock: returns the current UTC time (tests pass a fixed one).
    """

    def __init__(
        self,
        bundles: TrustBundles | Callable[[], TrustBundles],
        *,
        clock: Callable[[], dt.datetime] = _utcnow,
    ) -> None:
        if isinstance(bundles, TrustBundles):
            fixed = bundles
            self._bundles_fn: Callable[[], TrustBundles] = lambda: fixed
        else:
            self._bundles_fn = bundles
        self._clock = clock
        self._cache: dict[object, tuple[TrustBundles, VerifiedPeer | CertificateRejected]] = {}
        self._lock = threading.Lock()

    @property
    def bundles(self) -> TrustBundles:
        """The bundles in force now."""
        return self._bundles_fn()

    def verify_der(self, der: bytes, intermediates: Iterable[bytes] = ()) -> VerifiedPeer:
        """Verify a DER leaf certificate; raise :class:`CertificateRejected` saying why not."""
        chain = tuple(intermediates)
        key: bytes | tuple[bytes, ...] = (der, *chain) if chain else der
        return self._cached(key, lambda: self._verify(self._load(der, pem=False), chain))

    def verify_pem(self, pem: str, intermediates: Iterable[str] = ()) -> VerifiedPeer:
        """Verify a PEM leaf certificate (as in the ASGI TLS extension or ``SSL_CLIENT_CERT``)."""
        chain = tuple(intermediates)
        inter = [p.encode() for p in chain]
        # The leaf alone keys the common case (no intermediates); a chain is part of the key.
        key: str | tuple[str, ...] = (pem, *chain) if chain else pem
        return self._cached(
            key, lambda: self._verify(self._load(pem.encode(), pem=True), inter, pem=True)
        )

    def _cached(
        self,
        key: bytes | str | tuple[bytes, ...] | tuple[str, ...],
        compute: Callable[[], VerifiedPeer],
    ) -> VerifiedPeer:
        bundles = self._bundles_fn()
        hit = self._cache.get(key)
        if hit is not None and hit[0] is bundles:
            outcome = hit[1]
            if isinstance(outcome, CertificateRejected):
                # A new exception per hit: re-raising the cached one would grow its traceback
                # (and keep every caller's frames alive) on each request.
                raise CertificateRejected(str(outcome), reason=outcome.reason)
            if self._clock() <= outcome.not_after:
                return outcome
        try:
            result = compute()
        except CertificateRejected as exc:
            # Time cures "not yet valid", so that refusal is not remembered; the others stand.
            # The cache keeps a bare copy, without this call's traceback.
            if exc.reason != "not-yet-valid":
                self._store(key, bundles, CertificateRejected(str(exc), reason=exc.reason))
            raise
        self._store(key, bundles, result)
        return result

    def _store(
        self, key: object, bundles: TrustBundles, result: VerifiedPeer | CertificateRejected
    ) -> None:
        with self._lock:
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = (bundles, result)

    @staticmethod
    def _load(data: bytes, *, pem: bool) -> x509.Certificate:
        try:
            return (
                x509.load_pem_x509_certificate(data)
                if pem
                else x509.load_der_x509_certificate(data)
            )
        except ValueError as exc:
            raise CertificateRejected(
                f"unparseable certificate: {exc}", reason="malformed"
            ) from exc

    def _verify(
        self, leaf: x509.Certificate, intermediates: Iterable[bytes], *, pem: bool = False
    ) -> VerifiedPeer:
        spiffe_id = spiffe_id_of(leaf)
        bundles = self._bundles_fn()
        store = bundles.store(spiffe_id.trust_domain)
        if store is None:
            raise CertificateRejected(
                f"no trust bundle for trust domain {spiffe_id.trust_domain!r} "
                f"(trusted: {', '.join(sorted(bundles.trust_domains))})",
                reason="unknown-trust-domain",
            )
        now = self._clock()
        if now < leaf.not_valid_before_utc:
            raise CertificateRejected(
                f"the certificate is not valid before {leaf.not_valid_before_utc.isoformat()}",
                reason="not-yet-valid",
            )
        if now > leaf.not_valid_after_utc:
            raise CertificateRejected(
                f"the certificate expired at {leaf.not_valid_after_utc.isoformat()}",
                reason="expired",
            )
        chain = [self._load(c, pem=pem) for c in intermediates]
        verifier = verification.PolicyBuilder().store(store).time(now).build_client_verifier()
        try:
            verifier.verify(leaf, chain)
        except verification.VerificationError as exc:
            raise CertificateRejected(
                f"the certificate does not chain to a CA of trust domain "
                f"{spiffe_id.trust_domain!r}: {exc}",
                reason="untrusted",
            ) from exc
        return VerifiedPeer(spiffe_id=spiffe_id, not_after=leaf.not_valid_after_utc)
