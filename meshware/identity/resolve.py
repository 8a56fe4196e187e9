"""The resolver chain: who is the peer of this request?

Sources, first match wins:

1. the ASGI TLS extension, ``scope["extensions"]["tls"]["client_cert_chain"]`` (asgiref's TLS
   spec; ``meshware serve`` provides it on uvicorn);
2. a WSGI server's TLS socket (``environ["gunicorn.socket"]``) or the ``SSL_CLIENT_CERT``
   variable (PEM) that werkzeug, mod_wsgi and others set;
3. the ``x-forwarded-client-cert`` header — **only** when the direct peer is a configured
   trusted proxy (its source IP is in a trusted network, or its own verified SPIFFE id is a
   trusted proxy id). The header then takes precedence over the proxy's own certificate,
   because it describes the client the proxy is forwarding for. From anyone else the header
   is ignored, counted (``untrusted-xfcc``) and logged, never believed.

A certificate that is presented but fails verification is an error, not "no identity": the
shells refuse such a request (403). A malformed XFCC from a trusted proxy is a 400.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from meshware.exceptions import CertificateRejected, ConfigurationError, IdentityError
from meshware.identity.bundle import PeerVerifier, TrustBundles, VerifiedPeer
from meshware.identity.identity import Identity, IdentitySource
from meshware.identity.spiffe import SpiffeId
from meshware.identity.xfcc import parse_xfcc

logger = logging.getLogger("meshware.identity")

_XFCC_HEADER = b"x-forwarded-client-cert"
_XFCC_ENVIRON = "HTTP_X_FORWARDED_CLIENT_CERT"
_LOG_EVERY_SECONDS = 10.0

XFCC_CACHE_SIZE = 1024
"""How many XFCC resolutions an :class:`IdentityResolver` remembers (see its docstring)."""

_XFCC_CACHE_MAX_HEADER = 4096
_TRUST_CACHE_SIZE = 1024

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class TrustedProxies:
    """Who may send ``x-forwarded-client-cert``: networks and/or proxy SPIFFE ids.

    Build it with :meth:`parse` from strings: ``"10.0.0.0/8"``, ``"127.0.0.1"`` (a single
    address) or ``"spiffe://cluster.local/ns/istio-system/sa/ingress"``.
    """

    networks: tuple[IpNetwork, ...] = ()
    ids: frozenset[str] = frozenset()
    # Whether each recently seen peer address is trusted: parsing an address costs more than
    # the rest of the check, and a proxy sends every request from the same few addresses.
    _by_ip: dict[str, bool] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    @classmethod
    def parse(cls, entries: Iterable[str]) -> TrustedProxies:
        if isinstance(entries, str):
            raise ConfigurationError(
                "expected a list of entries, got a single string (wrap it in a list)",
                field="trusted_proxies",
                value=entries,
            )
        networks: list[IpNetwork] = []
        ids: set[str] = set()
        for i, entry in enumerate(entries):
            if entry.startswith("spiffe://"):
                ids.add(SpiffeId.parse(entry).uri)
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                raise ConfigurationError(
                    "expected an IP address, a CIDR network or a spiffe:// id",
                    field=f"trusted_proxies[{i}]",
                    value=entry,
                ) from None
        return cls(networks=tuple(networks), ids=frozenset(ids))

    def __bool__(self) -> bool:
        return bool(self.networks or self.ids)

    def trusts(self, ip: str | None, peer: Identity | None) -> bool:
        """Whether a peer at address ``ip`` (and with identity ``peer``, if any) is trusted."""
        if peer is not None and peer.spiffe_id.uri in self.ids:
            return True
        if ip is None or not self.networks:
            return False
        known = self._by_ip.get(ip)
        if known is not None:
            return known
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            trusted = False
        else:
            trusted = any(address in net for net in self.networks)
        _bounded_put(self._by_ip, ip, trusted, _TRUST_CACHE_SIZE)
        return trusted


def _bounded_put(cache: dict[Any, Any], key: Any, value: Any, size: int) -> None:
    # Oldest first (dicts keep insertion order). Keys are chosen by peers, so the memory they
    # may take is capped; a race between threads only costs a second computation.
    if len(cache) >= size:
        with contextlib.suppress(StopIteration, KeyError, RuntimeError):
            del cache[next(iter(cache))]
    cache[key] = value


_PEM_END = "-----END CERTIFICATE-----"


def _split_pem(text: str) -> list[str]:
    """Split concatenated PEM certificates."""
    parts = text.split(_PEM_END)
    return [part.strip() + "\n" + _PEM_END + "\n" for part in parts if part.strip()]


@dataclass(frozen=True, slots=True)
class Resolution:
    """The resolver's answer for one request.

    Attributes:
        identity: the verified caller, or ``None`` (unauthenticated).
        error: set when an identity was presented but refused; the request must be refused.
        ignored: a reason code when something was ignored without refusing the request
            (``"untrusted-xfcc"``).
    """

    identity: Identity | None = None
    error: IdentityError | None = None
    ignored: str | None = None


_NONE = Resolution()
_UNTRUSTED = Resolution(ignored="untrusted-xfcc")


class IdentityResolver:
    """Runs the resolver chain for ASGI scopes and WSGI environs.

    Args:
        verifier: verifies peer certificates against the trust bundles.
        trusted_proxies: who may send ``x-forwarded-client-cert`` (strings or a
            :class:`TrustedProxies`); empty means nobody, so the header is never believed.
        clock: monotonic seconds, for throttling the warnings logged about refused or
            ignored identities (at most one per 10 seconds).

    A proxy sends the same ``x-forwarded-client-cert`` value for every request of one caller,
    so identities taken from the header's ``URI`` (no ``Cert``) are remembered per (header
    value, trusted proxy), up to :data:`XFCC_CACHE_SIZE` of them, until the verifier's trust
    bundles change. Refusals and identities proven by a forwarded ``Cert`` (which expire with
    it) are worked out on every request.
    """

    def __init__(
        self,
        verifier: PeerVerifier,
        *,
        trusted_proxies: TrustedProxies | Iterable[str] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.verifier = verifier
        self.trusted_proxies = (
            trusted_proxies
            if isinstance(trusted_proxies, TrustedProxies)
            else TrustedProxies.parse(trusted_proxies)
        )
        self.failures: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._clock = clock
        # -inf, not 0.0: a monotonic clock may start near zero, and the first event must log.
        self._last_log = float("-inf")
        self._suppressed = 0
        # (header, proxy) -> (the bundles in force when resolved, the resolution)
        self._xfcc_cache: dict[tuple[str, str | None], tuple[TrustBundles, Resolution]] = {}

    # -- the two shells' entry points -------------------------------------------------------

    def resolve_scope(self, scope: Mapping[str, Any]) -> Resolution:
        """Resolve the peer of an ASGI request."""
        direct: Identity | None = None
        tls = (scope.get("extensions") or {}).get("tls")
        if tls is not None:
            chain = tls.get("client_cert_chain") or ()
            if chain:
                try:
                    direct = self._identity(self.verifier.verify_pem(chain[0], chain[1:]), "tls")
                except CertificateRejected as exc:
                    return self._refused(exc)
        xfcc = None
        for name, value in scope.get("headers") or ():
            if name == _XFCC_HEADER:
                xfcc = (
                    value.decode("latin-1") if xfcc is None else f"{xfcc},{value.decode('latin-1')}"
                )
        if xfcc is None:
            return Resolution(identity=direct) if direct is not None else _NONE
        client = scope.get("client")
        return self._with_xfcc(xfcc, client[0] if client else None, direct)

    def resolve_environ(self, environ: MutableMapping[str, Any]) -> Resolution:
        """Resolve the peer of a WSGI request."""
        direct: Identity | None = None
        try:
            direct = self._from_environ_tls(environ)
        except CertificateRejected as exc:
            return self._refused(exc)
        xfcc = environ.get(_XFCC_ENVIRON)
        if xfcc is None:
            return Resolution(identity=direct) if direct is not None else _NONE
        return self._with_xfcc(xfcc, environ.get("REMOTE_ADDR"), direct)

    # -- sources ------------------------------------------------------------------------------

    def _from_environ_tls(self, environ: Mapping[str, Any]) -> Identity | None:
        sock = environ.get("gunicorn.socket")
        if isinstance(sock, ssl.SSLSocket):
            der = sock.getpeercert(binary_form=True)
            if der:
                return self._identity(self.verifier.verify_der(der), "tls-socket")
            return None
        pem = environ.get("SSL_CLIENT_CERT")
        if pem:
            return self._identity(self.verifier.verify_pem(pem), "ssl-client-cert")
        return None

    def _with_xfcc(self, header: str, ip: str | None, direct: Identity | None) -> Resolution:
        proxies = self.trusted_proxies
        # The cached answer of trusts() for a peer known by its address only, when there is.
        trusted = proxies._by_ip.get(ip) if direct is None and ip is not None else None
        if trusted is None:
            trusted = proxies.trusts(ip, direct)
        if not trusted:
            self._count(
                "untrusted-xfcc", f"ignored x-forwarded-client-cert from untrusted peer {ip}"
            )
            if direct is None:
                return _UNTRUSTED
            return Resolution(identity=direct, ignored="untrusted-xfcc")
        via = direct.spiffe_id.uri if direct is not None else ip
        key = (header, via)
        bundles = self.verifier._bundles_fn()  # PeerVerifier.bundles, without the property
        hit = self._xfcc_cache.get(key)
        if hit is not None and hit[0] is bundles:
            return hit[1]
        try:
            elements = parse_xfcc(header)
            element = elements[-1]
            if element.cert:
                # Envoy's Chain holds the whole chain, leaf included; the rest are intermediates.
                chain = _split_pem(element.chain) if element.chain else []
                intermediates = [c for c in chain if c.strip() != element.cert.strip()]
                peer = self.verifier.verify_pem(element.cert, intermediates)
                if element.uris and element.uris != (peer.spiffe_id.uri,):
                    raise CertificateRejected(
                        "x-forwarded-client-cert URI does not match its Cert",
                        reason="xfcc-uri-mismatch",
                    )
                return Resolution(identity=self._identity(peer, "xfcc", via=via))
            resolution = Resolution(identity=self._identity_from_uris(element.uris, via, bundles))
        except IdentityError as exc:
            return self._refused(exc)
        if len(header) <= _XFCC_CACHE_MAX_HEADER:
            _bounded_put(self._xfcc_cache, key, (bundles, resolution), XFCC_CACHE_SIZE)
        return resolution

    def _identity_from_uris(
        self, uris: tuple[str, ...], via: str | None, bundles: TrustBundles
    ) -> Identity:
        spiffe = [u for u in uris if u.startswith("spiffe://")]
        if len(spiffe) != 1:
            raise CertificateRejected(
                f"x-forwarded-client-cert must name exactly one spiffe:// URI, found {len(spiffe)}",
                reason="xfcc-no-spiffe-id" if not spiffe else "multiple-uri-sans",
            )
        try:
            spiffe_id = SpiffeId.parse(spiffe[0])
        except ConfigurationError as exc:
            raise CertificateRejected(str(exc), reason="invalid-spiffe-id") from exc
        if spiffe_id.trust_domain not in bundles.trust_domains:
            raise CertificateRejected(
                f"x-forwarded-client-cert names trust domain {spiffe_id.trust_domain!r}, "
                "which has no trust bundle here",
                reason="unknown-trust-domain",
            )
        return Identity(spiffe_id=spiffe_id, source="xfcc", via=via)

    @staticmethod
    def _identity(peer: VerifiedPeer, source: IdentitySource, via: str | None = None) -> Identity:
        return Identity(spiffe_id=peer.spiffe_id, source=source, not_after=peer.not_after, via=via)

    # -- accounting ---------------------------------------------------------------------------

    def _refused(self, exc: IdentityError) -> Resolution:
        self._count(exc.reason, f"refused peer identity: {exc}")
        return Resolution(error=exc)

    def _count(self, reason: str, message: str) -> None:
        # Counted always; logged at most once per interval so hostile traffic cannot flood logs.
        with self._lock:
            self.failures[reason] += 1
            now = self._clock()
            if now - self._last_log < _LOG_EVERY_SECONDS:
                self._suppressed += 1
                return
            suppressed, self._suppressed, self._last_log = self._suppressed, 0, now
        suffix = f" ({suppressed} similar events not logged)" if suppressed else ""
        logger.warning("%s%s", message, suffix)
