"""JSON Web Key Sets: the keys that verify JWT signatures, loaded once or fetched and cached.

A ``JwksCache`` holds the verification keys of one JWT issuer. Keys come from exactly one
source:

- ``jwks``: an inline JWKS document (a JSON string), parsed at construction;
- ``jwks_file``: a file holding a JWKS document, read at construction;
- ``jwks_uri``: an HTTP(S) URL, fetched with httpx when first needed, then again every
  ``refresh_seconds`` (Istio's default is 20 minutes) and, at most once per
  ``min_refetch_seconds``, when a token names a key id the cache does not know (so the
  issuer's key rotation is picked up at once, and a flood of tokens with made-up key ids
  cannot hammer the issuer).

Static sources are strict: bad JSON or a bad key is a ``ConfigurationError`` naming the
source and what is wrong. Fetched documents are lenient per key (a key meshware cannot use is
skipped and logged) but a failed fetch never replaces good keys: the last good set is kept,
the failure is counted in ``fetch_failures``, logged on the ``meshware.jwt`` logger and passed
to the ``on_fetch_error`` callback.

The refresh decision (``should_refresh``) is sans-I/O and reads time from an injectable
monotonic clock; ``refresh()`` and ``refresh_async()`` do the I/O.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

import httpx

from meshware.exceptions import ConfigurationError

if TYPE_CHECKING:
    from jwt import PyJWK
    from jwt.algorithms import Algorithm

    from meshware.policy.jwt import JwtRule

__all__ = [
    "ASYMMETRIC_ALGORITHMS",
    "HMAC_ALGORITHMS",
    "SUPPORTED_ALGORITHMS",
    "JwksCache",
    "KeySet",
    "VerificationKey",
    "parse_jwks",
]

logger = logging.getLogger("meshware.jwt")

ASYMMETRIC_ALGORITHMS: Final[tuple[str, ...]] = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)
"""The public-key signature algorithms accepted by default (the ``algorithms`` default)."""

HMAC_ALGORITHMS: Final[frozenset[str]] = frozenset({"HS256", "HS384", "HS512"})
"""Shared-secret algorithms: only with an explicit ``algorithms`` list and a static ``oct`` key."""

SUPPORTED_ALGORITHMS: Final[frozenset[str]] = frozenset(
    {*ASYMMETRIC_ALGORITHMS, "ES256K", *HMAC_ALGORITHMS}
)
"""Every algorithm name a rule may list. ``none`` is never among them."""


@functools.cache
def _verifiers() -> Mapping[str, Algorithm]:
    # pyjwt (and the cryptography it loads) is imported when a first key is parsed, so that a
    # service without JWT rules does not carry it.
    from jwt.algorithms import get_default_algorithms

    return MappingProxyType(
        {n: alg for n, alg in get_default_algorithms().items() if n in SUPPORTED_ALGORITHMS}
    )


# Which algorithms a key can verify follows from its type (and curve): an RSA key never
# verifies an HS256 token, which is what defeats the HS/RS key-confusion attack.
_RSA_ALGORITHMS: Final = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_CURVES: Final[Mapping[str, frozenset[str]]] = MappingProxyType(
    {
        "P-256": frozenset({"ES256"}),
        "P-384": frozenset({"ES384"}),
        "P-521": frozenset({"ES512"}),
        "secp256k1": frozenset({"ES256K"}),
    }
)
_OKP_CURVES: Final[Mapping[str, frozenset[str]]] = MappingProxyType(
    {"Ed25519": frozenset({"EdDSA"}), "Ed448": frozenset({"EdDSA"})}
)
# RFC 7518 section 3.2: an HMAC key must be at least as long as the hash output.
_HMAC_MIN_BYTES: Final[Mapping[str, int]] = MappingProxyType(
    {"HS256": 32, "HS384": 48, "HS512": 64}
)
_RSA_MIN_BITS: Final = 2048
_PRIVATE_MEMBERS: Final = ("d", "p", "q", "dp", "dq", "qi")

DEFAULT_MAX_JWKS_BYTES: Final = 1024 * 1024


class VerificationKey:
    """One usable public key (or shared secret) from a JWKS.

    Attributes:
        kid: the key's ``kid``, or ``None`` when the JWK has none.
        kty: the JWK key type (``"RSA"``, ``"EC"``, ``"OKP"`` or ``"oct"``).
        algorithms: the algorithms this key may verify: those its type allows, narrowed by the
            JWK's own ``alg`` and by the rule's allowlist.
        jwk: pyjwt's parsed ``PyJWK``.
    """

    __slots__ = ("_key", "_verifiers", "algorithms", "jwk", "kid", "kty")

    def __init__(self, jwk: PyJWK, algorithms: frozenset[str]) -> None:
        self.jwk = jwk
        self.kid: str | None = jwk.key_id
        self.kty: str = jwk.key_type or ""
        self.algorithms = algorithms
        self._key: Any = jwk.key
        self._verifiers = _verifiers()

    def verify(self, algorithm: str, signing_input: bytes, signature: bytes) -> bool:
        """Return whether ``signature`` over ``signing_input`` is valid under ``algorithm``.

        Args:
            algorithm: the token's ``alg``; must be one of ``self.algorithms``.
            signing_input: the ASCII bytes ``"<header>.<payload>"`` of the compact token.
            signature: the decoded signature bytes.
        """
        if algorithm not in self.algorithms:
            return False
        return self._verifiers[algorithm].verify(signing_input, self._key, signature)

    def __repr__(self) -> str:
        return f"VerificationKey(kid={self.kid!r}, kty={self.kty!r})"


class KeySet:
    """An immutable set of verification keys with lookups precomputed for the request path.

    Attributes:
        keys: every usable key, in document order.
    """

    __slots__ = ("_by_alg", "_by_kid", "_kidless", "keys")

    def __init__(self, keys: Iterable[VerificationKey] = ()) -> None:
        self.keys: tuple[VerificationKey, ...] = tuple(keys)
        kidless = tuple(k for k in self.keys if k.kid is None)
        by_kid: dict[str, list[VerificationKey]] = {}
        by_alg: dict[str, list[VerificationKey]] = {}
        for key in self.keys:
            if key.kid is not None:
                by_kid.setdefault(key.kid, []).append(key)
            for alg in key.algorithms:
                by_alg.setdefault(alg, []).append(key)
        # A key without a kid may verify a token with any kid (as Envoy does).
        self._by_kid = {kid: (*keys, *kidless) for kid, keys in by_kid.items()}
        self._by_alg = {alg: tuple(keys) for alg, keys in by_alg.items()}
        self._kidless = kidless

    def with_kid(self, kid: str) -> tuple[VerificationKey, ...] | None:
        """Return the keys that may verify a token whose header names ``kid``.

        These are the keys with that ``kid`` plus the keys that have no ``kid`` at all;
        ``None`` when there are none (the key id is unknown).
        """
        found = self._by_kid.get(kid)
        if found is not None:
            return found
        return self._kidless or None

    def for_algorithm(self, algorithm: str) -> tuple[VerificationKey, ...]:
        """Return the keys that can verify ``algorithm`` (for tokens without a ``kid``)."""
        return self._by_alg.get(algorithm, ())

    @property
    def key_ids(self) -> frozenset[str]:
        """The ``kid`` of every key that has one."""
        return frozenset(self._by_kid)

    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        return f"KeySet({list(self.keys)!r})"


class _KeyProblem(ValueError):
    pass


def _key_label(index: int, jwk: Mapping[str, Any]) -> str:
    kid = jwk.get("kid")
    return f"key #{index} (kid {kid!r})" if isinstance(kid, str) else f"key #{index}"


def _parse_key(
    jwk: Any, index: int, allowed: frozenset[str], *, static: bool
) -> VerificationKey | None:
    """Parse one JWK; ``None`` when it is fine but not usable under ``allowed``."""
    if not isinstance(jwk, dict):
        raise _KeyProblem(f"key #{index}: expected a JSON object, got {type(jwk).__name__}")
    label = _key_label(index, jwk)
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise _KeyProblem(f"{label}: 'kid' must be a string")
    kty = jwk.get("kty")
    if kty != "oct" and any(member in jwk for member in _PRIVATE_MEMBERS):
        raise _KeyProblem(f"{label}: contains private key material; publish only the public key")
    use = jwk.get("use")
    if use is not None and use != "sig":
        return None  # an encryption key published alongside the signing keys
    key_ops = jwk.get("key_ops")
    if isinstance(key_ops, list) and "verify" not in key_ops:
        return None
    if kty == "RSA":
        by_type = _RSA_ALGORITHMS
    elif kty in ("EC", "OKP"):
        crv = jwk.get("crv")
        curves = _EC_CURVES if kty == "EC" else _OKP_CURVES
        found = curves.get(crv) if isinstance(crv, str) else None
        if found is None:
            raise _KeyProblem(
                f"{label}: unsupported or missing curve 'crv' {crv!r} for a {kty} key; "
                f"expected one of {', '.join(curves)}"
            )
        by_type = found
    elif kty == "oct":
        if not static:
            raise _KeyProblem(f"{label}: shared-secret ('oct') keys are not accepted from a URL")
        by_type = HMAC_ALGORITHMS
    else:
        raise _KeyProblem(
            f"{label}: unsupported key type 'kty' {kty!r}; expected RSA, EC, OKP or oct"
        )
    declared = jwk.get("alg")
    if declared is not None:
        if not isinstance(declared, str) or declared not in by_type:
            raise _KeyProblem(f"{label}: 'alg' {declared!r} does not fit a {kty} key")
        by_type = frozenset({declared})
    usable = by_type & allowed
    if not usable:
        return None
    from jwt import PyJWK
    from jwt.exceptions import PyJWTError

    try:
        parsed = PyJWK(jwk, algorithm=min(usable))
    except (PyJWTError, ValueError, TypeError) as exc:
        raise _KeyProblem(f"{label}: {exc}") from exc
    if kty == "RSA" and parsed.key.key_size < _RSA_MIN_BITS:
        raise _KeyProblem(
            f"{label}: RSA key of {parsed.key.key_size} bits; at least {_RSA_MIN_BITS} are required"
        )
    if kty == "oct":
        length = len(parsed.key)
        usable = frozenset(alg for alg in usable if length >= _HMAC_MIN_BYTES[alg])
        if not usable:
            raise _KeyProblem(
                f"{label}: shared secret of {length} bytes is too short; "
                "HS256 needs 32, HS384 48, HS512 64"
            )
    return VerificationKey(parsed, usable)


def parse_jwks(
    document: str | bytes, allowed: Iterable[str], *, static: bool
) -> tuple[KeySet, list[str]]:
    """Parse a JWKS document into a ``KeySet`` and the problems met on the way.

    With ``static=True`` (inline and file sources) any bad key raises ``ValueError``; with
    ``static=False`` (fetched documents) bad keys are skipped and described in the returned
    list. Either way a document without a single usable key raises ``ValueError``.

    Args:
        document: the JWKS JSON text (``{"keys": [...]}``).
        allowed: the algorithms the rule accepts; keys that cannot verify any are skipped.
        static: whether the document comes from configuration rather than the network.
    """
    try:
        data = json.loads(document)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError('expected a JWKS object {"keys": [...]}')
    allowed_set = frozenset(allowed)
    keys: list[VerificationKey] = []
    problems: list[str] = []
    for index, jwk in enumerate(data["keys"]):
        try:
            key = _parse_key(jwk, index, allowed_set, static=static)
        except _KeyProblem as exc:
            if static:
                raise ValueError(str(exc)) from exc
            problems.append(str(exc))
            continue
        if key is not None:
            keys.append(key)
    if not keys:
        detail = f" ({'; '.join(problems)})" if problems else ""
        raise ValueError(
            f"no usable signing key for algorithms {', '.join(sorted(allowed_set))}{detail}"
        )
    return KeySet(keys), problems


class JwksCache:
    """The verification keys of one issuer, from an inline JWKS, a file or a URL.

    Exactly one of ``jwks``, ``jwks_file`` and ``jwks_uri`` must be given. Inline and file
    sources are parsed here and never change; a URL is fetched on the first ``refresh()``
    (the authenticator calls it when a token first needs the keys).

    Args:
        name: how errors and log lines name this source (``"rules[0]"``).
        jwks: an inline JWKS JSON document.
        jwks_file: the path of a file holding a JWKS JSON document.
        jwks_uri: an ``http://`` or ``https://`` URL serving the JWKS.
        algorithms: the algorithms the keys will verify; keys that fit none are skipped.
            ``oct`` (shared secret) keys are only accepted from ``jwks``/``jwks_file``.
        refresh_seconds: how long fetched keys stay fresh before the next use refetches them.
        min_refetch_seconds: the least time between two fetch attempts triggered by need (an
            unknown ``kid``, stale keys, a previous failure). Explicit ``refresh()`` calls are
            not limited.
        timeout_seconds: the fetch timeout when meshware makes its own httpx client.
        max_bytes: the largest JWKS document accepted from the URL.
        client: an ``httpx.Client`` for ``refresh()``; by default a short-lived client is
            made per fetch (fetches are rare).
        async_client: an ``httpx.AsyncClient`` for ``refresh_async()``; same default.
        clock: a monotonic clock in seconds (``time.monotonic``); tests pass a fake.
        on_fetch_error: called as ``on_fetch_error(uri, error)`` after every failed fetch, in
            addition to the counter and the log line. It must not raise.

    Raises:
        ConfigurationError: no source or several, an unusable URL, an unreadable file, bad
            JSON, or a bad key (the message names ``name``, the field and what is wrong).
    """

    def __init__(
        self,
        *,
        name: str = "jwks",
        jwks: str | None = None,
        jwks_file: str | os.PathLike[str] | None = None,
        jwks_uri: str | None = None,
        algorithms: Iterable[str] = ASYMMETRIC_ALGORITHMS,
        refresh_seconds: float = 1200.0,
        min_refetch_seconds: float = 30.0,
        timeout_seconds: float = 5.0,
        max_bytes: int = DEFAULT_MAX_JWKS_BYTES,
        client: httpx.Client | None = None,
        async_client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_fetch_error: Callable[[str, Exception], None] | None = None,
    ) -> None:
        given = [
            field
            for field, value in (("jwks_uri", jwks_uri), ("jwks", jwks), ("jwks_file", jwks_file))
            if value is not None
        ]
        if len(given) != 1:
            raise ConfigurationError(
                "exactly one key source is required: jwks_uri, jwks or jwks_file "
                f"(got {', '.join(given) if given else 'none'})",
                field=f"{name}.{given[1] if given else 'jwks_uri'}",
            )
        for field, number, allow_zero in (
            ("refresh_seconds", refresh_seconds, False),
            ("min_refetch_seconds", min_refetch_seconds, True),
            ("timeout_seconds", timeout_seconds, False),
        ):
            if (
                isinstance(number, bool)
                or not isinstance(number, (int, float))
                or not math.isfinite(number)
                or number < 0
                or (number == 0 and not allow_zero)
            ):
                raise ConfigurationError(
                    f"expected a finite number of seconds {'>= 0' if allow_zero else '> 0'}",
                    field=f"{name}.{field}",
                    value=number,
                )
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ConfigurationError(
                "expected a positive integer", field=f"{name}.max_bytes", value=max_bytes
            )
        self.name = name
        self.algorithms: frozenset[str] = frozenset(algorithms)
        self.refresh_seconds = float(refresh_seconds)
        self.min_refetch_seconds = float(min_refetch_seconds)
        self._timeout = float(timeout_seconds)
        self._max_bytes = max_bytes
        self._client = client
        self._async_client = async_client
        self._clock = clock
        self._on_fetch_error = on_fetch_error
        self._lock = threading.Lock()
        self._inflight: tuple[asyncio.AbstractEventLoop, asyncio.Task[bool]] | None = None
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None

        self.jwks_uri: str | None = jwks_uri
        """The URL keys are fetched from, or ``None`` for a static source."""
        self._uri = jwks_uri or ""
        self.fetch_count = 0
        """How many fetches succeeded."""
        self.fetch_failures = 0
        """How many fetches failed (the previous keys were kept each time)."""
        self.last_error: str | None = None
        """A description of the latest fetch failure, cleared by the next success."""
        self._key_set = KeySet()

        if jwks_uri is not None:
            parts = urlsplit(jwks_uri) if isinstance(jwks_uri, str) else None
            if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigurationError(
                    "expected an http:// or https:// URL with a host",
                    field=f"{name}.jwks_uri",
                    value=jwks_uri,
                )
            return
        if jwks is not None:
            field, document = "jwks", jwks
            if not isinstance(jwks, str):
                raise ConfigurationError(
                    "expected a JWKS JSON string", field=f"{name}.jwks", value=jwks
                )
        elif jwks_file is not None:
            field = "jwks_file"
            try:
                with open(jwks_file, "rb") as fh:
                    raw = fh.read(max_bytes + 1)
            except (OSError, TypeError) as exc:
                raise ConfigurationError(
                    f"cannot read the JWKS file: {exc}", field=f"{name}.jwks_file", value=jwks_file
                ) from exc
            if len(raw) > max_bytes:
                raise ConfigurationError(
                    f"JWKS file is larger than {max_bytes} bytes",
                    field=f"{name}.jwks_file",
                    value=jwks_file,
                )
            document = raw.decode("utf-8", errors="replace")
        try:
            self._key_set, _ = parse_jwks(document, self.algorithms, static=True)
        except ValueError as exc:
            raise ConfigurationError(
                f"invalid JWKS: {exc}",
                field=f"{name}.{field}",
                value=jwks_file if field == "jwks_file" else None,
            ) from exc

    @classmethod
    def from_rule(cls, rule: JwtRule, *, name: str = "rules[0]", **options: Any) -> JwksCache:
        """Build the cache for a ``JwtRule``'s key source, algorithms and refresh interval.

        Args:
            rule: the rule whose ``jwks_uri`` / ``jwks`` / ``jwks_file`` to use.
            name: how errors name the rule.
            **options: further ``JwksCache`` keyword arguments (``client``, ``clock``, ...).
        """
        return cls(
            name=name,
            jwks=rule.jwks,
            jwks_file=rule.jwks_file,
            jwks_uri=rule.jwks_uri,
            algorithms=rule.algorithms,
            refresh_seconds=rule.jwks_refresh_seconds,
            **options,
        )

    # -- reading ---------------------------------------------------------------------------

    @property
    def key_set(self) -> KeySet:
        """The current keys (replaced as a whole on each successful fetch)."""
        return self._key_set

    @property
    def keys(self) -> tuple[PyJWK, ...]:
        """The current keys as pyjwt ``PyJWK`` objects."""
        return tuple(key.jwk for key in self._key_set.keys)

    @property
    def is_static(self) -> bool:
        """Whether the keys come from configuration (``jwks`` / ``jwks_file``)."""
        return self.jwks_uri is None

    @property
    def fetched_at(self) -> float | None:
        """The clock reading of the last successful fetch, or ``None``."""
        return self._fetched_at

    def should_refresh(self, *, key_missing: bool = False) -> bool:
        """Decide whether a fetch is due now. Never does I/O.

        A fetch is due for a URL source when the last attempt is at least
        ``min_refetch_seconds`` old and either the keys are stale (never fetched, or older
        than ``refresh_seconds``) or ``key_missing`` says a token needs a key that is not here.

        Args:
            key_missing: a token names a ``kid`` (or an algorithm) no cached key matches.
        """
        if self.jwks_uri is None:
            return False
        now = self._clock()
        attempted = self._attempted_at
        if attempted is not None and now - attempted < self.min_refetch_seconds:
            return False
        fetched = self._fetched_at
        return key_missing or fetched is None or now - fetched >= self.refresh_seconds

    # -- fetching --------------------------------------------------------------------------

    def refresh(self) -> bool:
        """Fetch the JWKS now (blocking) and return whether new keys were installed.

        Not rate limited. A failure keeps the previous keys, increments ``fetch_failures``,
        logs a warning and calls ``on_fetch_error``; it is not raised. Static sources return
        ``False`` at once.
        """
        if self.jwks_uri is None:
            return False
        with self._lock:
            return self._refresh_locked()

    def maybe_refresh(self, *, key_missing: bool = False) -> bool:
        """Fetch (blocking) only if ``should_refresh(key_missing=...)`` says so.

        Concurrent callers in other threads wait for one fetch instead of each making their
        own. Returns whether this call installed new keys (compare ``key_set`` to learn
        whether another thread did).
        """
        # A fetch running in another thread is waited for, so its keys can be used.
        if not self.should_refresh(key_missing=key_missing) and not self._lock.locked():
            return False
        with self._lock:
            # Another thread may have fetched while this one waited for the lock.
            if not self.should_refresh(key_missing=key_missing):
                return False
            return self._refresh_locked()

    async def refresh_async(self) -> bool:
        """Fetch the JWKS now without blocking the event loop; see ``refresh()``.

        Concurrent calls on the same event loop share one fetch, which runs in its own task so
        that a cancelled request does not cancel it for the others.
        """
        if self.jwks_uri is None:
            return False
        loop = asyncio.get_running_loop()
        inflight = self._inflight
        if inflight is None or inflight[0] is not loop or inflight[1].done():
            inflight = (loop, loop.create_task(self._refresh_task()))
            self._inflight = inflight
        return await asyncio.shield(inflight[1])

    async def maybe_refresh_async(self, *, key_missing: bool = False) -> bool:
        """Fetch without blocking only if due; joins a fetch already running on this loop."""
        inflight = self._inflight
        if (
            inflight is not None
            and inflight[0] is asyncio.get_running_loop()
            and not inflight[1].done()
        ):
            return await asyncio.shield(inflight[1])
        if not self.should_refresh(key_missing=key_missing):
            return False
        return await self.refresh_async()

    async def _refresh_task(self) -> bool:
        self._attempted_at = self._clock()
        try:
            return self._install(await self._fetch_async())
        except Exception as exc:
            # A broken issuer must never take the service down: count, log, report.
            self._record_failure(exc)
            return False

    def _refresh_locked(self) -> bool:
        self._attempted_at = self._clock()
        try:
            return self._install(self._fetch_sync())
        except Exception as exc:
            # A broken issuer must never take the service down: count, log, report.
            self._record_failure(exc)
            return False

    def _fetch_sync(self) -> bytes:
        if self._client is not None:
            return self._read_sync(self._client)
        with httpx.Client(timeout=self._timeout) as client:
            return self._read_sync(client)

    def _read_sync(self, client: httpx.Client) -> bytes:
        with client.stream("GET", self._uri, headers=_ACCEPT) as response:
            self._check_status(response)
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                self._check_size(body)
            return bytes(body)

    async def _fetch_async(self) -> bytes:
        if self._async_client is not None:
            return await self._read_async(self._async_client)
        async with httpx.AsyncClient(timeout=self._timeout) as client:
            return await self._read_async(client)

    async def _read_async(self, client: httpx.AsyncClient) -> bytes:
        async with client.stream("GET", self._uri, headers=_ACCEPT) as response:
            self._check_status(response)
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                self._check_size(body)
            return bytes(body)

    @staticmethod
    def _check_status(response: httpx.Response) -> None:
        if response.status_code != 200:
            raise ValueError(f"HTTP status {response.status_code}, expected 200")

    def _check_size(self, body: bytearray) -> None:
        if len(body) > self._max_bytes:
            raise ValueError(f"JWKS document larger than {self._max_bytes} bytes")

    def _install(self, body: bytes) -> bool:
        key_set, problems = parse_jwks(body, self.algorithms, static=False)
        for problem in problems:
            logger.warning("JWKS from %s (%s): skipped %s", self.jwks_uri, self.name, problem)
        self._key_set = key_set
        self._fetched_at = self._clock()
        self.fetch_count += 1
        self.last_error = None
        logger.debug("JWKS from %s (%s): %d key(s)", self.jwks_uri, self.name, len(key_set))
        return True

    def _record_failure(self, exc: Exception) -> None:
        self.fetch_failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        logger.warning(
            "JWKS fetch from %s (%s) failed: %s; keeping %d cached key(s)",
            self.jwks_uri,
            self.name,
            self.last_error,
            len(self._key_set),
        )
        if self._on_fetch_error is not None:
            self._on_fetch_error(self._uri, exc)

    def __repr__(self) -> str:
        source = self.jwks_uri if self.jwks_uri is not None else "static"
        return f"JwksCache(name={self.name!r}, source={source!r}, keys={len(self._key_set)})"


_ACCEPT: Final = {"accept": "application/jwk-set+json, application/json"}
