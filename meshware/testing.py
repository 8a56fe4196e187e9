"""Helpers to test services that run meshware: no certificates to manage, no servers to start.

Everything here drives the real meshware code: a peer identity is a real certificate from a
throwaway CA, verified by the real identity layer; a JWT is really signed and verified; an
authorization check is the real :class:`~meshware.policy.authz.Authorizer`.

- :class:`FakeClock`: monotonic time that moves only when a test says so.
- :func:`as_peer`, :class:`MeshTestCA`: who calls, and the CA that vouches for it.
- :class:`JwtIssuer`, :func:`jwt_token`, :func:`jwt_rule`: tokens and the matching
  :class:`~meshware.policy.jwt.JwtRule`.
- :class:`MeshTestTransport` (ASGI) and :class:`MeshTestWSGITransport` (WSGI): httpx
  transports that call an application as an mTLS server would, with a verified client
  certificate (and a JWT) for the chosen peer.
- :func:`assert_allowed`, :func:`assert_denied`: authorization checks with readable failures.
- :class:`MockUpstream`, :func:`fault_injecting_transport`: fake dependencies for outbound
  calls, and the faults (aborts, delays, connection errors) to test resilience with.

The pytest plugin (:mod:`meshware.pytest_plugin`, registered automatically) offers the
fixtures ``mesh_ca``, ``mesh_peer``, ``mesh_jwt`` and ``mesh_clock``. A full example::

    from meshware.inbound.asgi.stack import build_asgi_stack
    from meshware.inbound.stack import InboundConfig
    from meshware.testing import MeshTestTransport, as_peer, default_ca

    stack = build_asgi_stack(app, InboundConfig(service="payments", bundle=default_ca().bundle_path))
    transport = MeshTestTransport(stack, peer=as_peer("orders"))
    async with httpx.AsyncClient(transport=transport, base_url="https://payments") as client:
        response = await client.post("/api/charge")
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import datetime as dt
import json
import math
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import httpx
import jwt as pyjwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from meshware.exceptions import ConfigurationError
from meshware.identity.bundle import TrustBundles
from meshware.identity.ca import LocalCA
from meshware.identity.spiffe import SpiffeId
from meshware.outbound.faults import FaultAbort, FaultDelay, FaultInjection, abort_response
from meshware.policy.authz import AuthorizationPolicy, Authorizer, AuthzDecision
from meshware.policy.facts import RequestFacts
from meshware.policy.jwt import JwtRule

if TYPE_CHECKING:
    from meshware.config.loader import MeshConfig
    from meshware.types import ASGIApp, Environ, Receive, Scope, Send, StartResponse, WSGIApp

__all__ = [
    "CLAIMS_EXTENSION",
    "DEFAULT_ISSUER",
    "PEER_EXTENSION",
    "ErrorKind",
    "FakeClock",
    "FaultInjectingTransport",
    "JwtIssuer",
    "MeshPeer",
    "MeshTestCA",
    "MeshTestTransport",
    "MeshTestWSGITransport",
    "MockUpstream",
    "as_peer",
    "assert_allowed",
    "assert_denied",
    "default_ca",
    "default_issuer",
    "fault_injecting_transport",
    "jwt_rule",
    "jwt_token",
    "request_facts",
]

DEFAULT_ISSUER: Final = "https://issuer.meshware.test"
"""The issuer of :func:`jwt_token` and :func:`jwt_rule` when none is named."""
PEER_EXTENSION: Final = "meshware.test.peer"
"""A request extension that overrides the test transport's peer for one request: a
:class:`MeshPeer`, anything :func:`as_peer` accepts, or ``None`` for no certificate."""
CLAIMS_EXTENSION: Final = "meshware.test.jwt_claims"
"""A request extension that overrides the test transport's JWT claims for one request (a
mapping, or ``None`` for no token)."""

ErrorKind = Literal["connect-failure", "reset", "timeout"]
"""Connection errors :func:`fault_injecting_transport` raises, named as Istio's ``retryOn``
conditions: ``httpx.ConnectError``, ``httpx.ReadError``, ``httpx.ReadTimeout``."""

_UNSET: Final[Any] = object()


def _type_name(value: object) -> str:
    return type(value).__name__


def _finite(value: object, name: str, *, minimum: float = 0.0) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < minimum
    ):
        raise ConfigurationError(
            f"expected a finite number of seconds >= {minimum:g}", field=name, value=value
        )
    return float(value)


# -- time --------------------------------------------------------------------------------------


class FakeClock:
    """Monotonic seconds that move only when :meth:`advance` is called.

    Pass it wherever meshware takes a ``clock`` (``Callable[[], float]``), and its
    :meth:`sleep` wherever it takes a ``sleep``, so that waiting costs no real time::

        clock = FakeClock()
        breaker = SomethingWithAClock(clock=clock)
        clock.advance(30)          # thirty seconds later, instantly

    Args:
        start: the first reading.

    Raises:
        ConfigurationError: ``start`` is not a finite number.
    """

    __slots__ = ("_now",)

    def __init__(self, start: float = 0.0) -> None:
        self._now = _finite(start, "start", minimum=-math.inf)

    def __call__(self) -> float:
        return self._now

    @property
    def now(self) -> float:
        """The current reading."""
        return self._now

    def advance(self, seconds: float) -> float:
        """Move time forward by ``seconds`` (never back) and return the new reading.

        Raises:
            ConfigurationError: ``seconds`` is negative or not finite.
        """
        self._now += _finite(seconds, "seconds")
        return self._now

    def sleep(self, seconds: float) -> None:
        """Stand-in for :func:`time.sleep`: advances the clock instead of waiting."""
        self.advance(seconds)

    async def async_sleep(self, seconds: float) -> None:
        """Stand-in for :func:`asyncio.sleep`: advances the clock instead of waiting."""
        self.advance(seconds)

    def __repr__(self) -> str:
        return f"FakeClock(now={self._now!r})"


# -- peers and their certificates --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MeshPeer:
    """A caller of a service: a workload identity.

    Attributes:
        spiffe_id: its SPIFFE id (``spiffe://cluster.local/ns/default/sa/orders``).
    """

    spiffe_id: SpiffeId

    @property
    def principal(self) -> str:
        """Istio's principal (``cluster.local/ns/default/sa/orders``)."""
        return self.spiffe_id.principal

    @property
    def namespace(self) -> str:
        """The caller's namespace."""
        return self.spiffe_id.namespace or ""

    @property
    def service_account(self) -> str:
        """The caller's service account: its service name."""
        return self.spiffe_id.service_account or ""

    @property
    def trust_domain(self) -> str:
        """The caller's trust domain."""
        return self.spiffe_id.trust_domain

    def __str__(self) -> str:
        return self.spiffe_id.uri


def as_peer(
    who: str | SpiffeId | MeshPeer,
    namespace: str = "default",
    trust_domain: str = "cluster.local",
) -> MeshPeer:
    """The caller named by ``who``.

    Args:
        who: a service name (``"orders"``), a principal
            (``"cluster.local/ns/shop/sa/orders"``), a SPIFFE id (string or
            :class:`~meshware.identity.spiffe.SpiffeId`) or a :class:`MeshPeer` (returned
            as is).
        namespace: the namespace of a service name.
        trust_domain: the trust domain of a service name.

    Returns:
        The peer.

    Raises:
        ConfigurationError: ``who`` is none of the above, or not a workload identity
            (``<trust-domain>/ns/<namespace>/sa/<account>``); ``field`` is ``"peer"``.
    """
    if isinstance(who, MeshPeer):
        return who
    try:
        if isinstance(who, SpiffeId):
            spiffe = who
        elif not isinstance(who, str) or not who:
            raise ConfigurationError(
                "expected a service name, a principal or a SPIFFE id", field="peer", value=who
            )
        elif who.startswith("spiffe://"):
            spiffe = SpiffeId.parse(who)
        elif "/" in who:
            spiffe = SpiffeId.parse(f"spiffe://{who}")
        else:
            spiffe = SpiffeId.for_service(trust_domain, namespace, who)
    except ConfigurationError as exc:
        if exc.field == "peer":
            raise
        raise ConfigurationError(
            f"expected a service name, a principal or a SPIFFE id: {exc}", field="peer", value=who
        ) from exc
    if spiffe.namespace is None or spiffe.service_account is None:
        raise ConfigurationError(
            "expected a workload identity: <trust-domain>/ns/<namespace>/sa/<account>",
            field="peer",
            value=who,
        )
    return MeshPeer(spiffe)


class MeshTestCA:
    """A throwaway certificate authority (a :class:`~meshware.identity.ca.LocalCA`) that
    issues a client certificate per peer, for tests.

    Give the service under test :attr:`bundle_path` as its trust bundle
    (``InboundConfig(bundle=ca.bundle_path)``), and the test transports present the
    certificates this CA issues. A peer of another trust domain gets a certificate too,
    which the service then refuses, as it would refuse a foreign workload.

    Args:
        directory: where to keep the CA's files; a new temporary directory by default,
            removed by :meth:`close`.
        trust_domain: the CA's trust domain.

    Raises:
        ConfigurationError: an invalid trust domain.
    """

    def __init__(
        self, directory: str | Path | None = None, *, trust_domain: str = "cluster.local"
    ) -> None:
        self._owned = directory is None
        root = (
            Path(tempfile.mkdtemp(prefix="meshware-test-ca-"))
            if directory is None
            else Path(directory)
        )
        self.directory = root
        self.ca = LocalCA.init(root, trust_domain=trust_domain, validity=dt.timedelta(days=2))
        self._leaves: dict[str, str] = {}
        self._lock = threading.Lock()

    @property
    def trust_domain(self) -> str:
        """The CA's trust domain."""
        return self.ca.trust_domain

    @property
    def bundle_path(self) -> Path:
        """The trust bundle file (PEM) that verifies the certificates issued here."""
        return self.directory / "bundle.pem"

    def trust_bundles(self) -> TrustBundles:
        """The trust bundle, loaded."""
        return TrustBundles.from_file(self.bundle_path, default_trust_domain=self.trust_domain)

    def certificate_pem(self, peer: str | SpiffeId | MeshPeer) -> str:
        """The PEM client certificate of ``peer`` (issued once, then reused), valid for an
        hour, with the peer's SPIFFE id as its only URI SAN."""
        spiffe = as_peer(peer, trust_domain=self.trust_domain).spiffe_id
        with self._lock:
            pem = self._leaves.get(spiffe.uri)
            if pem is None:
                key = ec.generate_private_key(ec.SECP256R1())
                cert = self.ca.sign_raw(key, spiffe, ttl=dt.timedelta(hours=1))
                pem = cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
                self._leaves[spiffe.uri] = pem
        return pem

    def close(self) -> None:
        """Remove the CA's directory, when this object created it."""
        if self._owned:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> MeshTestCA:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MeshTestCA(trust_domain={self.trust_domain!r}, directory={str(self.directory)!r})"


_DEFAULTS_LOCK = threading.Lock()
_DEFAULT_CA: MeshTestCA | None = None
_ISSUERS: dict[str, JwtIssuer] = {}


def default_ca() -> MeshTestCA:
    """The process-wide test CA (trust domain ``cluster.local``), created on first use and
    removed when the process exits. The test transports use it unless given another."""
    global _DEFAULT_CA
    with _DEFAULTS_LOCK:
        if _DEFAULT_CA is None:
            _DEFAULT_CA = MeshTestCA()
            atexit.register(_DEFAULT_CA.close)
        return _DEFAULT_CA


# -- JWTs --------------------------------------------------------------------------------------


class JwtIssuer:
    """A JWT issuer with a fresh ES256 key, and the :class:`~meshware.policy.jwt.JwtRule`
    that accepts its tokens.

    Args:
        issuer: the ``iss`` of its tokens.
        audiences: the audiences its rule accepts; tokens carry the first one unless their
            claims name an ``aud``.
        clock: wall-clock seconds, for ``iat`` and ``exp``.

    Raises:
        ConfigurationError: an empty issuer.
    """

    def __init__(
        self,
        issuer: str = DEFAULT_ISSUER,
        *,
        audiences: Sequence[str] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(issuer, str) or not issuer:
            raise ConfigurationError("expected a non-empty issuer", field="issuer", value=issuer)
        self.issuer = issuer
        self.audiences = tuple(audiences)
        self._clock = clock
        self._key = ec.generate_private_key(ec.SECP256R1())
        self.kid = "meshware-test-1"
        public: dict[str, Any] = ECAlgorithm.to_jwk(self._key.public_key(), as_dict=True)
        public.update(kid=self.kid, alg="ES256", use="sig")
        self.jwks = json.dumps({"keys": [public]})
        """The public key set (JSON), as a ``jwks`` field holds it."""
        self.rule = JwtRule(issuer=issuer, audiences=self.audiences, jwks=self.jwks)
        """The rule that accepts this issuer's tokens."""

    def token(
        self,
        claims: Mapping[str, Any] | None = None,
        *,
        subject: str = "test-user",
        expires_in: float = 3600.0,
    ) -> str:
        """A signed token.

        ``iss`` is the issuer, ``sub`` is ``subject``, ``iat`` now and ``exp`` now plus
        ``expires_in`` (negative for an expired token), unless ``claims`` set them.

        Args:
            claims: further claims (``{"scope": "read", "groups": ["admin"]}``).
            subject: the ``sub`` claim.
            expires_in: seconds until ``exp``.
        """
        now = int(self._clock())
        payload: dict[str, Any] = {
            "iss": self.issuer,
            "sub": subject,
            "iat": now,
            "exp": now + int(expires_in),
        }
        if self.audiences:
            payload["aud"] = self.audiences[0]
        payload.update(claims or {})
        return pyjwt.encode(payload, self._key, algorithm="ES256", headers={"kid": self.kid})

    def principal(
        self, claims: Mapping[str, Any] | None = None, *, subject: str = "test-user"
    ) -> str:
        """The request principal (``<iss>/<sub>``) of a token with these claims."""
        merged = {"iss": self.issuer, "sub": subject, **(claims or {})}
        return f"{merged['iss']}/{merged['sub']}"

    def __repr__(self) -> str:
        return f"JwtIssuer({self.issuer!r})"


def default_issuer(issuer: str = DEFAULT_ISSUER) -> JwtIssuer:
    """The process-wide :class:`JwtIssuer` of ``issuer``, created on first use."""
    with _DEFAULTS_LOCK:
        found = _ISSUERS.get(issuer)
        if found is None:
            found = _ISSUERS[issuer] = JwtIssuer(issuer)
        return found


def jwt_token(claims: Mapping[str, Any] | None = None, *, issuer: str = DEFAULT_ISSUER) -> str:
    """A token from the process-wide issuer ``issuer``, accepted by :func:`jwt_rule` of the
    same issuer. See :meth:`JwtIssuer.token` for the claims it carries."""
    return default_issuer(issuer).token(claims)


def jwt_rule(issuer: str = DEFAULT_ISSUER) -> JwtRule:
    """The :class:`~meshware.policy.jwt.JwtRule` that accepts :func:`jwt_token`'s tokens of
    ``issuer`` (an inline JWKS: nothing is fetched)."""
    return default_issuer(issuer).rule


# -- authorization checks ----------------------------------------------------------------------


def request_facts(
    method: str,
    path: str,
    *,
    from_: str | SpiffeId | MeshPeer | None = None,
    namespace: str = "default",
    trust_domain: str = "cluster.local",
    request_principal: str | None = None,
    claims: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
    ip: str | None = None,
    port: int | None = None,
    host: str = "",
) -> RequestFacts:
    """The :class:`~meshware.policy.facts.RequestFacts` of a request, as the inbound stack
    would build them after verifying the caller.

    Args:
        method: the HTTP method (upper-cased here).
        path: the raw path, optionally with ``?query``.
        from_: the caller (see :func:`as_peer`), or ``None`` for no mTLS identity.
        namespace: the namespace of a caller given by service name.
        trust_domain: the trust domain of a caller given by service name.
        request_principal: the JWT principal ``<iss>/<sub>``; by default taken from
            ``claims`` when they hold ``iss`` and ``sub``.
        claims: the JWT's claims.
        headers: request headers (names are lower-cased).
        ip: the caller's address.
        port: the port the request arrived on.
        host: the ``Host`` header.

    Raises:
        ConfigurationError: ``from_`` names no workload identity.
    """
    peer = as_peer(from_, namespace, trust_domain) if from_ is not None else None
    raw_path, _, query = path.partition("?")
    claims = dict(claims or {})
    if (
        request_principal is None
        and isinstance(claims.get("iss"), str)
        and isinstance(claims.get("sub"), str)
    ):
        request_principal = f"{claims['iss']}/{claims['sub']}"
    return RequestFacts(
        method=method.upper(),
        path=raw_path,
        query=query,
        host=host.lower(),
        port=port,
        headers={name.lower(): value for name, value in (headers or {}).items()},
        source_ip=ip,
        source_principal=peer.principal if peer is not None else None,
        source_namespace=peer.namespace if peer is not None else None,
        request_principal=request_principal,
        claims=claims,
    )


def _authorizer(target: Any) -> Authorizer:
    from meshware.config.loader import MeshConfig

    if isinstance(target, Authorizer):
        return target
    if isinstance(target, MeshConfig):
        return target.authorizer()
    if isinstance(target, AuthorizationPolicy):
        return Authorizer([target])
    if isinstance(target, Iterable) and not isinstance(target, (str, bytes, Mapping)):
        return Authorizer(list(target))
    raise ConfigurationError(
        "expected an Authorizer, a MeshConfig, an AuthorizationPolicy or a list of them, got "
        f"{_type_name(target)}",
        field="target",
        value=target,
    )


def _request_text(facts: RequestFacts) -> str:
    caller = facts.source_principal or "a caller without an mTLS identity"
    text = f"{facts.method} {facts.path}{'?' + facts.query if facts.query else ''} from {caller}"
    if facts.request_principal:
        text += f" with JWT {facts.request_principal}"
    return text


def _outcome(decision: AuthzDecision) -> str:
    verdict = "allowed" if decision.allowed else "denied"
    text = f"it was {verdict} ({decision.status} {decision.code}): {decision.reason}"
    if decision.dry_run:
        matched = ", ".join(
            f'"{m.policy}" would {"allow" if m.would_allow else "deny"}' for m in decision.dry_run
        )
        text += f"; dry-run: {matched}"
    return text


def assert_allowed(
    target: Authorizer | MeshConfig | AuthorizationPolicy | Iterable[AuthorizationPolicy],
    method: str,
    path: str,
    *,
    from_: str | SpiffeId | MeshPeer | None = None,
    by_policy: str | None = None,
    rule: int | None = None,
    **facts: Any,
) -> AuthzDecision:
    """Assert that the policies allow a request; return the decision.

    Args:
        target: the policies: an :class:`~meshware.policy.authz.Authorizer`, a
            :class:`~meshware.config.loader.MeshConfig`, one policy or a list of them.
        method: the HTTP method.
        path: the raw path, optionally with ``?query``.
        from_: the caller (see :func:`as_peer`), or ``None`` for no mTLS identity.
        by_policy: the ALLOW policy expected to decide (``None``: any reason to allow).
        rule: the index of its rule expected to match.
        **facts: ``namespace``, ``trust_domain``, ``request_principal``, ``claims``,
            ``headers``, ``ip``, ``port``, ``host``: see :func:`request_facts`.

    Raises:
        AssertionError: the request is denied, or allowed by another policy or rule; the
            message says what was decided and why.
    """
    request = request_facts(method, path, from_=from_, **facts)
    decision = _authorizer(target).decide(request)
    expected = "allowed" + (f' by policy "{by_policy}"' if by_policy is not None else "")
    if rule is not None:
        expected += f" rule {rule}"
    wrong = not decision.allowed
    wrong = wrong or (by_policy is not None and decision.policy != by_policy)
    wrong = wrong or (rule is not None and decision.rule != rule)
    if wrong:
        raise AssertionError(
            f"expected {_request_text(request)} to be {expected}, but {_outcome(decision)}"
        )
    return decision


def assert_denied(
    target: Authorizer | MeshConfig | AuthorizationPolicy | Iterable[AuthorizationPolicy],
    method: str,
    path: str,
    *,
    from_: str | SpiffeId | MeshPeer | None = None,
    by_policy: str | None = None,
    rule: int | None = None,
    status: int | None = None,
    **facts: Any,
) -> AuthzDecision:
    """Assert that the policies deny a request; return the decision.

    Args:
        target: the policies, as for :func:`assert_allowed`.
        method: the HTTP method.
        path: the raw path, optionally with ``?query``.
        from_: the caller (see :func:`as_peer`), or ``None`` for no mTLS identity.
        by_policy: the DENY policy expected to decide. ``None`` accepts any denial,
            including "no ALLOW policy matched" (which no policy decides).
        rule: the index of its rule expected to match.
        status: the expected status (403, or 400 for a path refused by normalization).
        **facts: as for :func:`assert_allowed`.

    Raises:
        AssertionError: the request is allowed, or denied otherwise than expected.
    """
    request = request_facts(method, path, from_=from_, **facts)
    decision = _authorizer(target).decide(request)
    expected = "denied" + (f' by policy "{by_policy}"' if by_policy is not None else "")
    if rule is not None:
        expected += f" rule {rule}"
    if status is not None:
        expected += f" with status {status}"
    wrong = decision.allowed
    wrong = wrong or (by_policy is not None and decision.policy != by_policy)
    wrong = wrong or (rule is not None and decision.rule != rule)
    wrong = wrong or (status is not None and decision.status != status)
    if wrong:
        raise AssertionError(
            f"expected {_request_text(request)} to be {expected}, but {_outcome(decision)}"
        )
    return decision


# -- calling an application as the mTLS server would -------------------------------------------

# The certificate chain of the request being handled, set around the app call; the transports
# call the application in the same task (ASGI) or thread (WSGI).
_CHAIN: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "meshware_test_chain", default=None
)


class _Injector:
    """What both test transports share: the peer, the token, and per-request overrides."""

    def _setup(
        self,
        peer: str | SpiffeId | MeshPeer | None,
        jwt_claims: Mapping[str, Any] | None,
        jwt_issuer: JwtIssuer | str | None,
        ca: MeshTestCA | None,
    ) -> None:
        self.peer = as_peer(peer) if peer is not None else None
        self.jwt_claims = dict(jwt_claims) if jwt_claims is not None else None
        if isinstance(jwt_issuer, str):
            jwt_issuer = default_issuer(jwt_issuer)
        self.jwt_issuer = jwt_issuer
        self._ca = ca

    @property
    def ca(self) -> MeshTestCA:
        """The CA whose certificates are presented (:func:`default_ca` unless given)."""
        if self._ca is None:
            self._ca = default_ca()
        return self._ca

    def _prepare(self, request: httpx.Request) -> tuple[str, ...] | None:
        given = request.extensions.get(PEER_EXTENSION, _UNSET)
        peer = self.peer if given is _UNSET else (as_peer(given) if given is not None else None)
        claims = request.extensions.get(CLAIMS_EXTENSION, _UNSET)
        if claims is _UNSET:
            claims = self.jwt_claims
        if claims is not None and "authorization" not in request.headers:
            issuer = self.jwt_issuer or default_issuer()
            request.headers["authorization"] = f"Bearer {issuer.token(claims)}"
        if peer is None:
            return None
        return (self.ca.certificate_pem(peer),)


class MeshTestTransport(_Injector, httpx.ASGITransport):
    """An ``httpx.ASGITransport`` that calls an ASGI application as meshware's mTLS server
    would: with the client certificate of ``peer`` in the ASGI TLS extension
    (``scope["extensions"]["tls"]["client_cert_chain"]``), and a bearer token for
    ``jwt_claims``.

    The application's identity layer verifies the certificate for real, so configure it to
    trust :attr:`ca` (``InboundConfig(bundle=transport.ca.bundle_path)``; by default the
    process-wide :func:`default_ca`), and its JWT layer to accept the issuer
    (``jwt_rules=[jwt_rule()]``).

    One request may override the peer and the claims with the request extensions
    :data:`PEER_EXTENSION` and :data:`CLAIMS_EXTENSION`::

        await client.get("/", extensions={PEER_EXTENSION: "cart", CLAIMS_EXTENSION: None})

    Args:
        app: the ASGI application (usually a meshware stack).
        peer: the caller (see :func:`as_peer`), or ``None`` for no client certificate.
        jwt_claims: claims of a token to send as ``Authorization: Bearer``, or ``None``
            for no token. A request that has an ``Authorization`` header keeps it.
        jwt_issuer: who signs the token: a :class:`JwtIssuer` or an issuer name
            (:func:`default_issuer`); :data:`DEFAULT_ISSUER` by default.
        ca: the CA that issues the peer's certificate.
        client: the client address and port the application sees.
        root_path: the ASGI ``root_path``.
        raise_app_exceptions: re-raise the application's exceptions (httpx's default).

    Raises:
        ConfigurationError: ``peer`` names no workload identity.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        peer: str | SpiffeId | MeshPeer | None = None,
        jwt_claims: Mapping[str, Any] | None = None,
        jwt_issuer: JwtIssuer | str | None = None,
        ca: MeshTestCA | None = None,
        client: tuple[str, int] = ("127.0.0.1", 40000),
        root_path: str = "",
        raise_app_exceptions: bool = True,
    ) -> None:
        self._setup(peer, jwt_claims, jwt_issuer, ca)
        self.application = app
        super().__init__(
            app=self._serve,
            raise_app_exceptions=raise_app_exceptions,
            root_path=root_path,
            client=client,
        )

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        chain = _CHAIN.get()
        if chain is not None:
            extensions = dict(scope.get("extensions") or {})
            extensions["tls"] = {
                "server_cert": None,
                "client_cert_chain": list(chain),
                "client_cert_name": None,
                "client_cert_error": None,
                "tls_version": 0x0304,
                "cipher_suite": None,
            }
            scope["extensions"] = extensions
        await self.application(scope, receive, send)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        token = _CHAIN.set(self._prepare(request))
        try:
            return await super().handle_async_request(request)
        finally:
            _CHAIN.reset(token)


class MeshTestWSGITransport(_Injector, httpx.WSGITransport):
    """The WSGI twin of :class:`MeshTestTransport`: the client certificate goes into
    ``environ["SSL_CLIENT_CERT"]``, as WSGI servers set it.

    Args:
        app: the WSGI application (usually a meshware stack).
        peer: the caller (see :func:`as_peer`), or ``None`` for no client certificate.
        jwt_claims: claims of a token to send as ``Authorization: Bearer``, or ``None``.
        jwt_issuer: who signs the token (see :class:`MeshTestTransport`).
        ca: the CA that issues the peer's certificate.
        remote_addr: the client address the application sees.
        script_name: the WSGI ``SCRIPT_NAME``.
        raise_app_exceptions: re-raise the application's exceptions (httpx's default).

    Raises:
        ConfigurationError: ``peer`` names no workload identity.
    """

    def __init__(
        self,
        app: WSGIApp,
        *,
        peer: str | SpiffeId | MeshPeer | None = None,
        jwt_claims: Mapping[str, Any] | None = None,
        jwt_issuer: JwtIssuer | str | None = None,
        ca: MeshTestCA | None = None,
        remote_addr: str = "127.0.0.1",
        script_name: str = "",
        raise_app_exceptions: bool = True,
    ) -> None:
        self._setup(peer, jwt_claims, jwt_issuer, ca)
        self.application = app
        super().__init__(
            app=self._serve,
            raise_app_exceptions=raise_app_exceptions,
            script_name=script_name,
            remote_addr=remote_addr,
        )

    def _serve(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        chain = _CHAIN.get()
        if chain is not None:
            environ["SSL_CLIENT_CERT"] = chain[0]
        return self.application(environ, start_response)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        token = _CHAIN.set(self._prepare(request))
        try:
            return super().handle_request(request)
        finally:
            _CHAIN.reset(token)


# -- fake upstreams and faults -----------------------------------------------------------------


@dataclass(slots=True)
class _Route:
    host: str
    path: str
    method: str | None
    replies: list[Any]
    handler: Callable[[httpx.Request], httpx.Response] | None

    def matches(self, request: httpx.Request) -> bool:
        if self.method is not None and request.method != self.method:
            return False
        if self.host != "*" and request.url.host != self.host:
            return False
        path = request.url.path
        if self.path == "*":
            return True
        if self.path.endswith("*"):
            return path.startswith(self.path[:-1])
        return path == self.path


def _reply(value: Any, request: httpx.Request) -> httpx.Response:
    if isinstance(value, httpx.Response):
        return value
    if isinstance(value, type) and issubclass(value, BaseException):
        value = (
            value("injected by MockUpstream", request=request)
            if issubclass(value, httpx.RequestError)
            else value()
        )
    if isinstance(value, BaseException):
        raise value
    return httpx.Response(int(value), request=request)


class MockUpstream:
    """Fake upstream services for outbound calls, behind an ``httpx.MockTransport``.

    Answers are registered per host and path; every request is recorded::

        upstream = MockUpstream()
        upstream.add("payments", "/api/charge", json={"ok": True})
        upstream.add("ledger", sequence=[503, 503, 200])      # fails twice, then recovers
        client = httpx.Client(transport=upstream.transport())

    A host with no registered answer fails to connect (``httpx.ConnectError``), as an
    unknown host would; a known host answers an unknown path with 404.

    Attributes:
        requests: every request received, in order.
    """

    def __init__(self) -> None:
        self._routes: list[_Route] = []
        self._lock = threading.Lock()
        self.requests: list[httpx.Request] = []

    def add(
        self,
        host: str,
        path: str = "*",
        *,
        method: str | None = None,
        status: int = 200,
        json: Any = _UNSET,
        text: str | None = None,
        headers: Mapping[str, str] | None = None,
        sequence: Sequence[Any] | None = None,
        handler: Callable[[httpx.Request], httpx.Response] | None = None,
    ) -> MockUpstream:
        """Register how ``host`` answers requests to ``path``; the latest registration that
        matches a request wins.

        Args:
            host: the host (``"payments"``), or ``"*"`` for any host.
            path: an exact path, a prefix ending in ``*`` (``"/api/*"``), or ``"*"``.
            method: only this method (upper-case), or any.
            status: the status of the answer.
            json: a JSON body.
            text: a text body.
            headers: response headers.
            sequence: successive answers instead of one: statuses, ``httpx.Response``
                objects, or exceptions (instances or classes) to raise; the last one
                repeats.
            handler: a function from the request to the response, instead of the above.

        Returns:
            This upstream, to chain calls.

        Raises:
            ConfigurationError: ``sequence`` or ``handler`` is combined with a fixed answer,
                or ``sequence`` is empty.
        """
        fixed = status != 200 or json is not _UNSET or text is not None or headers is not None
        if (sequence is not None or handler is not None) and fixed:
            raise ConfigurationError(
                "give a fixed answer, a sequence or a handler, not several", field="sequence"
            )
        if sequence is not None and handler is not None:
            raise ConfigurationError("give a sequence or a handler, not both", field="handler")
        if sequence is not None and not sequence:
            raise ConfigurationError("expected at least one answer", field="sequence", value=[])
        replies: list[Any]
        if sequence is not None:
            replies = list(sequence)
        elif handler is not None:
            replies = []
        else:
            kwargs: dict[str, Any] = {"headers": dict(headers or {})}
            if json is not _UNSET:
                kwargs["json"] = json
            elif text is not None:
                kwargs["text"] = text
            replies = [(status, kwargs)]
        route = _Route(host.lower(), path, method.upper() if method else None, replies, handler)
        with self._lock:
            self._routes.append(route)
        return self

    def handle(self, request: httpx.Request) -> httpx.Response:
        """Answer one request (the ``httpx.MockTransport`` handler)."""
        with self._lock:
            self.requests.append(request)
            route = next((r for r in reversed(self._routes) if r.matches(request)), None)
            known = any(r.host in ("*", request.url.host) for r in self._routes)
            reply: Any = None
            if route is not None and route.handler is None:
                reply = route.replies[0] if len(route.replies) == 1 else route.replies.pop(0)
        if route is None:
            if not known:
                raise httpx.ConnectError(
                    f"MockUpstream has no host {request.url.host!r}", request=request
                )
            return httpx.Response(404, text="no MockUpstream route", request=request)
        if route.handler is not None:
            return route.handler(request)
        if isinstance(reply, tuple):
            status, kwargs = reply
            return httpx.Response(status, request=request, **kwargs)
        return _reply(reply, request)

    def transport(self) -> httpx.MockTransport:
        """An ``httpx.MockTransport`` (for sync and async clients) answering with
        :meth:`handle`."""
        return httpx.MockTransport(self.handle)

    def calls(self, host: str | None = None, path: str | None = None) -> list[httpx.Request]:
        """The recorded requests to ``host`` and ``path`` (each ``None`` for any)."""
        return [
            r
            for r in self.requests
            if (host is None or r.url.host == host.lower()) and (path is None or r.url.path == path)
        ]


_ERRORS: Final[Mapping[str, type[httpx.TransportError]]] = {
    "connect-failure": httpx.ConnectError,
    "reset": httpx.ReadError,
    "timeout": httpx.ReadTimeout,
}


class FaultInjectingTransport(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """Injects faults into the calls that go through it, then hands the rest to ``inner``.

    Built by :func:`fault_injecting_transport`; aborts and delays are decided by meshware's
    own :class:`~meshware.outbound.faults.FaultInjection` (Istio's ``fault`` block) and an
    aborted call gets the same answer a VirtualService fault gives
    (:func:`~meshware.outbound.faults.abort_response`: ``x-meshware-fault: abort``).

    Attributes:
        calls: calls seen (including those passed through untouched).
        delayed: calls delayed.
        aborted: calls answered with the abort status.
        failed: calls failed with a connection error.
    """

    def __init__(
        self,
        inner: httpx.BaseTransport | httpx.AsyncBaseTransport,
        *,
        fault: FaultInjection | None,
        error: ErrorKind | None,
        error_percent: float,
        hosts: frozenset[str] | None,
        rng: random.Random,
        clock: FakeClock | None,
    ) -> None:
        self.inner = inner
        self.fault = fault
        self.error = error
        self.error_percent = error_percent
        self.hosts = hosts
        self._rng = rng
        self._clock = clock
        self._lock = threading.Lock()
        self.calls = self.delayed = self.aborted = self.failed = 0

    def _decide(self, request: httpx.Request) -> tuple[float, int | None, bool]:
        with self._lock:
            self.calls += 1
            if self.hosts is not None and request.url.host not in self.hosts:
                return 0.0, None, False
            delay, status = 0.0, None
            if self.fault is not None:
                decision = self.fault.decide(self._rng)
                delay, status = decision.delay_s, decision.abort_status
            error = False
            if status is None and self.error is not None:
                pct = self.error_percent
                error = pct >= 100.0 or (pct > 0.0 and self._rng.random() * 100.0 < pct)
            self.delayed += delay > 0.0
            self.aborted += status is not None
            self.failed += error
            return delay, status, error

    def _fail(self, request: httpx.Request) -> httpx.TransportError:
        kind = _ERRORS[self.error or "connect-failure"]
        return kind(f"{self.error} injected by fault_injecting_transport", request=request)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if not isinstance(self.inner, httpx.BaseTransport):
            raise TypeError("the inner transport is async-only; use an httpx.AsyncClient")
        delay, status, error = self._decide(request)
        if delay:
            if self._clock is not None:
                self._clock.advance(delay)
            else:
                time.sleep(delay)
        if status is not None:
            return abort_response(status, request)
        if error:
            raise self._fail(request)
        return self.inner.handle_request(request)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not isinstance(self.inner, httpx.AsyncBaseTransport):
            raise TypeError("the inner transport is sync-only; use an httpx.Client")
        delay, status, error = self._decide(request)
        if delay:
            if self._clock is not None:
                self._clock.advance(delay)
            else:
                await asyncio.sleep(delay)
        if status is not None:
            return abort_response(status, request)
        if error:
            raise self._fail(request)
        return await self.inner.handle_async_request(request)

    def close(self) -> None:
        if isinstance(self.inner, httpx.BaseTransport):
            self.inner.close()

    async def aclose(self) -> None:
        if isinstance(self.inner, httpx.AsyncBaseTransport):
            await self.inner.aclose()


def fault_injecting_transport(
    inner: MockUpstream | httpx.BaseTransport | httpx.AsyncBaseTransport,
    *,
    abort: int | None = None,
    abort_percent: float = 100.0,
    delay: float | None = None,
    delay_percent: float = 100.0,
    error: ErrorKind | None = None,
    error_percent: float = 100.0,
    fault: Mapping[str, Any] | FaultInjection | None = None,
    hosts: Iterable[str] | None = None,
    rng: random.Random | None = None,
    clock: FakeClock | None = None,
) -> FaultInjectingTransport:
    """A transport that injects faults into calls before ``inner`` sees them.

    ::

        upstream = MockUpstream().add("payments", json={"ok": True})
        transport = fault_injecting_transport(upstream, abort=503, abort_percent=50,
                                              rng=random.Random(7))
        client = httpx.Client(transport=transport)

    Put meshware's outbound layers on top to test them against the faults, for instance
    ``RetryTransport(transport, resolver=..., sleep=clock.sleep)``.

    Args:
        inner: where calls that are not failed go: a :class:`MockUpstream` or any httpx
            transport.
        abort: answer with this status instead of passing the call on.
        abort_percent: the share of calls aborted (0-100).
        delay: wait this many seconds before the call (on ``clock`` when given).
        delay_percent: the share of calls delayed (0-100).
        error: fail calls with a connection error: ``"connect-failure"``, ``"reset"`` or
            ``"timeout"`` (see :data:`ErrorKind`); an aborted call is not also failed.
        error_percent: the share of calls failed (0-100).
        fault: an Istio VirtualService ``fault`` block (``{"abort": {"httpStatus": 503,
            "percentage": {"value": 50}}}``) or a
            :class:`~meshware.outbound.faults.FaultInjection`, instead of ``abort`` and
            ``delay``.
        hosts: inject only into calls to these hosts (every host by default).
        rng: the random source of the percentages (seed it for reproducible tests).
        clock: a :class:`FakeClock` that delays advance instead of waiting for real.

    Raises:
        ConfigurationError: nothing to inject, ``fault`` combined with ``abort`` or
            ``delay``, or a value out of range.
    """
    if fault is not None and (abort is not None or delay is not None):
        raise ConfigurationError("give fault, or abort and delay, not both", field="fault")
    injection: FaultInjection | None
    if isinstance(fault, FaultInjection) or fault is None:
        injection = fault
    else:
        injection = FaultInjection.from_mapping(fault)
    if injection is None and (abort is not None or delay is not None):
        injection = FaultInjection(
            delay=FaultDelay(fixed_delay=delay, percentage=delay_percent)
            if delay is not None
            else None,
            abort=FaultAbort(http_status=abort, percentage=abort_percent)
            if abort is not None
            else None,
        )
    if error is not None and error not in _ERRORS:
        raise ConfigurationError(
            f"expected one of {', '.join(_ERRORS)}", field="error", value=error
        )
    if (
        isinstance(error_percent, bool)
        or not isinstance(error_percent, (int, float))
        or not 0.0 <= error_percent <= 100.0
    ):
        raise ConfigurationError(
            "expected a percentage from 0 to 100", field="error_percent", value=error_percent
        )
    if injection is None and error is None:
        raise ConfigurationError(
            "nothing to inject; give abort, delay, error or fault", field="fault"
        )
    transport = inner.transport() if isinstance(inner, MockUpstream) else inner
    return FaultInjectingTransport(
        transport,
        fault=injection,
        error=error,
        error_percent=float(error_percent),
        hosts=frozenset(h.lower() for h in hosts) if hosts is not None else None,
        rng=rng if rng is not None else random.Random(),
        clock=clock,
    )
