"""JWT request authentication with the semantics of Istio's ``RequestAuthentication``.

A ``JwtRule`` mirrors one entry of Istio's ``jwtRules``; a ``JwtAuthenticator`` applies a list
of them to a request's headers and query string:

- no token in any configured location: ``None`` (the request is unauthenticated, not
  rejected; an authorization policy decides whether that is acceptable);
- a token that is present but invalid: ``InvalidToken`` with a stable ``reason`` code (the
  inbound shells answer ``401`` with ``WWW-Authenticate: Bearer error="invalid_token"``);
- a valid token: a ``JwtResult`` whose ``principal`` (``"<iss>/<sub>"``) and ``claims`` feed
  ``RequestFacts.request_principal`` and ``RequestFacts.claims`` for authorization.

The issuer is read from the unverified payload only to choose the rule; the token is then
verified with that rule's keys, algorithms and audiences. ``exp`` is required; ``nbf`` and
``iat`` are checked when present; all three with the rule's clock skew.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import unquote_plus, urlsplit

import httpx

from meshware.exceptions import ConfigurationError, IdentityError
from meshware.policy.jwks import (
    ASYMMETRIC_ALGORITHMS,
    HMAC_ALGORITHMS,
    SUPPORTED_ALGORITHMS,
    JwksCache,
    KeySet,
    VerificationKey,
)

__all__ = [
    "DEFAULT_ALGORITHMS",
    "DEFAULT_HEADER",
    "DEFAULT_PARAM",
    "REASONS",
    "InvalidToken",
    "JwtAuthenticator",
    "JwtResult",
    "JwtRule",
]

DEFAULT_ALGORITHMS: Final[tuple[str, ...]] = ASYMMETRIC_ALGORITHMS
"""RS256/384/512, PS256/384/512, ES256/384/512 and EdDSA."""

DEFAULT_HEADER: Final[tuple[str, str]] = ("authorization", "Bearer ")
"""The default token location: ``Authorization: Bearer <token>``."""

DEFAULT_PARAM: Final = "access_token"
"""The default query parameter (RFC 6750 section 2.3), tried after the default header."""

_DESCRIPTIONS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "malformed": "the token is malformed",
        "too-large": "the token is too large",
        "unknown-issuer": "the token issuer is not accepted",
        "bad-signature": "the token signature is invalid",
        "alg-not-allowed": "the token algorithm is not allowed",
        "expired": "the token is expired",
        "not-yet-valid": "the token is not yet valid",
        "bad-audience": "the token audience is not accepted",
        "unknown-kid": "the token key id is unknown",
        "no-keys": "no key is available to verify the token",
    }
)

REASONS: Final[frozenset[str]] = frozenset(_DESCRIPTIONS)
"""Every ``InvalidToken.reason`` code."""

_TOKEN_CHARS = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_B64_VALUES: Final[Mapping[str, int]] = MappingProxyType(
    {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")}
)
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION_UNITS: Final[Mapping[str, float]] = MappingProxyType(
    {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
)


class InvalidToken(IdentityError):
    """A JWT was presented but is not acceptable.

    Attributes:
        reason: a stable short code, one of ``REASONS``: ``malformed``, ``too-large``,
            ``unknown-issuer``, ``bad-signature``, ``alg-not-allowed``, ``expired``,
            ``not-yet-valid``, ``bad-audience``, ``unknown-kid``, ``no-keys``.
        issuer: the rule's issuer once one was chosen, else ``None``.
        token_source: the header or query parameter the token came from.
    """

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        issuer: str | None = None,
        token_source: str | None = None,
    ) -> None:
        self.issuer = issuer
        self.token_source = token_source
        super().__init__(message, reason=reason)

    @property
    def description(self) -> str:
        """A fixed, client-safe phrase for ``reason`` (never echoes token content)."""
        return _DESCRIPTIONS.get(self.reason, "the token is invalid")

    @property
    def www_authenticate(self) -> str:
        """The ``WWW-Authenticate`` header value for the ``401`` answer (RFC 6750)."""
        return f'Bearer error="invalid_token", error_description="{self.description}"'


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _parse_duration(value: object, where: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        match = _DURATION.fullmatch(value.strip())
        if match:
            return float(match[1]) * _DURATION_UNITS[match[2]]
    raise ConfigurationError(
        'expected a duration such as "60s", "500ms", "20m" or a number of seconds',
        field=where,
        value=value,
    )


def _strings(value: object, where: str, *, what: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ConfigurationError(f"expected a list of {what}", field=where, value=value)
    items = tuple(value)
    for index, item in enumerate(items):
        if not isinstance(item, str) or not item:
            raise ConfigurationError(
                f"expected a non-empty string ({what})", field=f"{where}[{index}]", value=item
            )
    return items


def _seconds(value: object, where: str, *, allow_zero: bool) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not allow_zero)
    ):
        raise ConfigurationError(
            f"expected a finite number of seconds {'>= 0' if allow_zero else '> 0'}",
            field=where,
            value=value,
        )
    return float(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class JwtRule:
    """One accepted JWT issuer, as an entry of Istio's ``RequestAuthentication.jwtRules``.

    Attributes:
        issuer: the ``iss`` a token must carry to be verified by this rule (exact match).
        audiences: accepted ``aud`` values; a token is accepted if any of its audiences is
            listed. Empty (the default) accepts any audience, as Istio does.
        jwks_uri: URL of the issuer's JWKS, fetched and cached. Exactly one of ``jwks_uri``,
            ``jwks`` and ``jwks_file`` must be given.
        jwks: an inline JWKS JSON document.
        jwks_file: the path of a JWKS JSON file, read once when the authenticator is built.
        from_headers: ``(header name, prefix)`` pairs to take the token from, in order. The
            prefix (``"Bearer "``) is matched case-insensitively and stripped; a header
            without the prefix holds no token for this rule. Names are stored lower-case.
        from_params: query parameter names to take the token from, tried after the headers.
            When both ``from_headers`` and ``from_params`` are empty (the default), Istio's
            default locations are used: ``Authorization: Bearer <token>``, then the
            ``access_token`` query parameter.
        forward_original_token: keep the token header for the application. When ``False``
            (the default) the inbound shells remove it after a successful verification.
        output_payload_to_header: a header name; when set, the shells pass the verified
            payload (base64url, as in the token) to the application in that header.
        clock_skew_seconds: tolerance for ``exp``, ``nbf`` and ``iat`` (Envoy's default, 60).
        algorithms: the allowed ``alg`` values. The default is the public-key families
            RS256/384/512, PS256/384/512, ES256/384/512 and EdDSA. HS256/384/512 are only
            accepted when listed here explicitly and the key is a static ``oct`` JWK in
            ``jwks``/``jwks_file`` (never from ``jwks_uri``). ``none`` is never accepted.
        jwks_refresh_seconds: how long fetched keys are used before refetching (Istio's 20 min).
        max_token_bytes: tokens longer than this are rejected (``too-large``) before parsing.

    Raises:
        ConfigurationError: a field is invalid, naming the field and the value.
    """

    issuer: str
    audiences: tuple[str, ...] = ()
    jwks_uri: str | None = None
    jwks: str | None = None
    jwks_file: str | os.PathLike[str] | None = None
    from_headers: tuple[tuple[str, str], ...] = ()
    from_params: tuple[str, ...] = ()
    forward_original_token: bool = False
    output_payload_to_header: str | None = None
    clock_skew_seconds: float = 60.0
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    jwks_refresh_seconds: float = 1200.0
    max_token_bytes: int = 8192

    def __post_init__(self) -> None:
        if not isinstance(self.issuer, str) or not self.issuer:
            raise ConfigurationError(
                "expected a non-empty issuer string", field="issuer", value=self.issuer
            )
        object.__setattr__(
            self, "audiences", _strings(self.audiences, "audiences", what="audiences")
        )
        given = [
            name for name in ("jwks_uri", "jwks", "jwks_file") if getattr(self, name) is not None
        ]
        if len(given) != 1:
            raise ConfigurationError(
                "exactly one key source is required: jwks_uri, jwks or jwks_file "
                f"(got {', '.join(given) if given else 'none'})",
                field=given[1] if given else "jwks_uri",
            )
        if self.jwks_uri is not None:
            uri = self.jwks_uri
            parts = urlsplit(uri) if isinstance(uri, str) else None
            if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
                raise ConfigurationError(
                    "expected an http:// or https:// URL with a host", field="jwks_uri", value=uri
                )
        if self.jwks is not None and (not isinstance(self.jwks, str) or not self.jwks.strip()):
            raise ConfigurationError(
                "expected a non-empty JWKS JSON string", field="jwks", value=self.jwks
            )
        if self.jwks_file is not None and not isinstance(self.jwks_file, (str, os.PathLike)):
            raise ConfigurationError(
                "expected a file path", field="jwks_file", value=self.jwks_file
            )
        object.__setattr__(self, "from_headers", self._check_headers(self.from_headers))
        object.__setattr__(
            self,
            "from_params",
            _strings(self.from_params, "from_params", what="query parameter names"),
        )
        if not isinstance(self.forward_original_token, bool):
            raise ConfigurationError(
                "expected true or false",
                field="forward_original_token",
                value=self.forward_original_token,
            )
        out = self.output_payload_to_header
        if out is not None:
            if not isinstance(out, str) or not _TOKEN_CHARS.fullmatch(out):
                raise ConfigurationError(
                    "expected an HTTP header name", field="output_payload_to_header", value=out
                )
            object.__setattr__(self, "output_payload_to_header", out.lower())
        object.__setattr__(
            self,
            "clock_skew_seconds",
            _seconds(self.clock_skew_seconds, "clock_skew_seconds", allow_zero=True),
        )
        object.__setattr__(
            self,
            "jwks_refresh_seconds",
            _seconds(self.jwks_refresh_seconds, "jwks_refresh_seconds", allow_zero=False),
        )
        size = self.max_token_bytes
        if isinstance(size, bool) or not isinstance(size, int) or size < 16:
            raise ConfigurationError(
                "expected an integer number of bytes >= 16", field="max_token_bytes", value=size
            )
        self._check_algorithms()

    @staticmethod
    def _check_headers(value: object) -> tuple[tuple[str, str], ...]:
        if isinstance(value, str) or not isinstance(value, Iterable):
            raise ConfigurationError(
                "expected a list of (name, prefix) pairs", field="from_headers", value=value
            )
        pairs: list[tuple[str, str]] = []
        for index, item in enumerate(value):
            where = f"from_headers[{index}]"
            if isinstance(item, str) or not isinstance(item, Sequence) or len(item) != 2:
                raise ConfigurationError("expected a (name, prefix) pair", field=where, value=item)
            name, prefix = item
            if not isinstance(name, str) or not _TOKEN_CHARS.fullmatch(name):
                raise ConfigurationError("expected an HTTP header name", field=where, value=name)
            if not isinstance(prefix, str) or not prefix.isprintable() or not prefix.isascii():
                raise ConfigurationError(
                    "expected a printable ASCII prefix (may be empty)", field=where, value=prefix
                )
            pairs.append((name.lower(), prefix))
        return tuple(pairs)

    def _check_algorithms(self) -> None:
        algorithms = _strings(self.algorithms, "algorithms", what="algorithm names")
        if not algorithms:
            raise ConfigurationError("expected at least one algorithm", field="algorithms")
        for index, alg in enumerate(algorithms):
            if alg.lower() == "none":
                raise ConfigurationError(
                    "unsigned tokens (alg 'none') are never accepted",
                    field=f"algorithms[{index}]",
                    value=alg,
                )
            if alg not in SUPPORTED_ALGORITHMS:
                raise ConfigurationError(
                    f"unsupported algorithm; expected one of {', '.join(sorted(SUPPORTED_ALGORITHMS))}",
                    field=f"algorithms[{index}]",
                    value=alg,
                )
            if alg in HMAC_ALGORITHMS and self.jwks_uri is not None:
                raise ConfigurationError(
                    f"{alg} needs a static shared secret (an 'oct' key in jwks or jwks_file); "
                    "it is never accepted with jwks_uri",
                    field=f"algorithms[{index}]",
                    value=alg,
                )
        object.__setattr__(self, "algorithms", tuple(dict.fromkeys(algorithms)))

    @property
    def header_locations(self) -> tuple[tuple[str, str], ...]:
        """The effective ``(header, prefix)`` locations, defaults applied."""
        if not self.from_headers and not self.from_params:
            return (DEFAULT_HEADER,)
        return self.from_headers

    @property
    def param_locations(self) -> tuple[str, ...]:
        """The effective query parameter locations, defaults applied."""
        if not self.from_headers and not self.from_params:
            return (DEFAULT_PARAM,)
        return self.from_params

    @classmethod
    def from_mapping(cls, spec: Mapping[str, Any], path: str = "jwtRules[0]") -> JwtRule:
        """Build a rule from an Istio ``jwtRules`` entry (camelCase), e.g. parsed YAML.

        Istio fields: ``issuer``, ``audiences``, ``jwksUri``, ``jwks``,
        ``fromHeaders[].{name,prefix}``, ``fromParams``, ``forwardOriginalToken``,
        ``outputPayloadToHeader``. meshware additions: ``jwksFile``, ``clockSkew`` (``"60s"``
        or seconds), ``algorithms``, ``jwksRefreshInterval`` (``"20m"``), ``maxTokenBytes``.

        Args:
            spec: the mapping for one rule.
            path: how errors name this rule (``"jwtRules[0]"``); field paths are appended.

        Raises:
            ConfigurationError: an unknown or unsupported field, or an invalid value; ``field``
                is the full path (``"jwtRules[0].fromHeaders[1].prefix"``).
        """
        if not isinstance(spec, Mapping):
            raise ConfigurationError("expected a mapping", field=path, value=spec)
        kwargs: dict[str, Any] = {}
        for key, value in spec.items():
            where = f"{path}.{key}"
            target = _FROM_CAMEL.get(key)
            if target is None:
                hint = (
                    "is not supported by meshware"
                    if key in _ISTIO_UNSUPPORTED
                    else f"unknown field; expected one of {', '.join(_FROM_CAMEL)}"
                )
                raise ConfigurationError(hint, field=where, value=value)
            if key == "fromHeaders":
                value = _headers_from_mapping(value, where)
            elif key in ("clockSkew", "jwksRefreshInterval"):
                value = _parse_duration(value, where)
            elif key in ("audiences", "fromParams", "algorithms") and isinstance(value, list):
                value = tuple(value)
            kwargs[target] = value
        if "issuer" not in kwargs:
            raise ConfigurationError("is required", field=f"{path}.issuer")
        sources = [key for key in ("jwksUri", "jwks", "jwksFile") if key in spec]
        if len(sources) != 1:
            raise ConfigurationError(
                "exactly one key source is required: jwksUri, jwks or jwksFile "
                f"(got {', '.join(sources) if sources else 'none'})",
                field=f"{path}.{sources[1] if sources else 'jwksUri'}",
            )
        try:
            return cls(**kwargs)
        except ConfigurationError as exc:
            raise _rebase(exc, path) from exc


_FROM_CAMEL: Final[Mapping[str, str]] = MappingProxyType(
    {
        "issuer": "issuer",
        "audiences": "audiences",
        "jwksUri": "jwks_uri",
        "jwks": "jwks",
        "jwksFile": "jwks_file",
        "fromHeaders": "from_headers",
        "fromParams": "from_params",
        "forwardOriginalToken": "forward_original_token",
        "outputPayloadToHeader": "output_payload_to_header",
        "clockSkew": "clock_skew_seconds",
        "algorithms": "algorithms",
        "jwksRefreshInterval": "jwks_refresh_seconds",
        "maxTokenBytes": "max_token_bytes",
    }
)
_TO_CAMEL: Final[Mapping[str, str]] = MappingProxyType({v: k for k, v in _FROM_CAMEL.items()})
_ISTIO_UNSUPPORTED: Final = frozenset({"outputClaimToHeaders", "fromCookies", "timeout"})


def _headers_from_mapping(value: object, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list):
        raise ConfigurationError("expected a list of {name, prefix}", field=where, value=value)
    pairs: list[tuple[str, str]] = []
    for index, item in enumerate(value):
        item_where = f"{where}[{index}]"
        if not isinstance(item, Mapping):
            raise ConfigurationError(
                "expected a mapping with 'name' and optional 'prefix'", field=item_where, value=item
            )
        for extra in item:
            if extra not in ("name", "prefix"):
                raise ConfigurationError(
                    "unknown field; expected name or prefix",
                    field=f"{item_where}.{extra}",
                    value=item[extra],
                )
        name = item.get("name")
        prefix = item.get("prefix", "")
        if not isinstance(name, str) or not _TOKEN_CHARS.fullmatch(name):
            raise ConfigurationError(
                "expected an HTTP header name", field=f"{item_where}.name", value=name
            )
        if not isinstance(prefix, str) or not prefix.isprintable() or not prefix.isascii():
            raise ConfigurationError(
                "expected a printable ASCII prefix", field=f"{item_where}.prefix", value=prefix
            )
        pairs.append((name, prefix))
    return tuple(pairs)


def _rebase(exc: ConfigurationError, path: str) -> ConfigurationError:
    """Re-express an error about a python field as one about the camelCase path."""
    if exc.field is None:
        return ConfigurationError(str(exc), field=path, value=exc.value)
    message = str(exc)[len(exc.field) + 2 :]
    head, dot, rest = exc.field.partition(".")
    name, bracket, index = head.partition("[")
    camel = _TO_CAMEL.get(name, name) + bracket + index + dot + rest
    return ConfigurationError(message, field=f"{path}.{camel}", value=exc.value)


@dataclass(frozen=True, slots=True, kw_only=True)
class JwtResult:
    """A verified token: who it names and what it claims.

    Attributes:
        issuer: the token's ``iss`` (the matching rule's issuer).
        subject: the token's ``sub``; ``""`` when the token has none.
        principal: ``"<iss>/<sub>"``, Istio's request principal, matched by authorization
            rules' ``requestPrincipals``.
        audiences: the token's ``aud`` values (``()`` when absent).
        claims: the whole verified payload, read-only; authorization ``when`` conditions
            read it as ``request.auth.claims[...]``.
        token_source: the header or query parameter the token was taken from.
        header_to_strip: the header the shells remove before the application sees the
            request, or ``None`` (``forward_original_token``, or a query parameter token).
        output_header: ``(name, base64url payload)`` to add for the application when the
            rule sets ``output_payload_to_header``, else ``None``.
    """

    issuer: str
    subject: str
    principal: str
    audiences: tuple[str, ...]
    claims: Mapping[str, Any]
    token_source: str
    header_to_strip: str | None = None
    output_header: tuple[str, str] | None = None


@dataclass(frozen=True, slots=True)
class _Location:
    kind: str  # "header" or "param"
    name: str
    prefix: str
    issuers: frozenset[str]


@dataclass(frozen=True, slots=True)
class _RuleState:
    rule: JwtRule
    cache: JwksCache
    algorithms: frozenset[str]
    audiences: frozenset[str]
    skew: float
    max_bytes: int
    strip: bool
    output_header: str | None


@dataclass(slots=True)
class _Pending:
    state: _RuleState
    payload_segment: str
    signing_input: bytes
    signature: bytes
    payload: dict[str, Any]
    alg: str
    kid: str | None
    location: _Location


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _b64decode(segment: str, what: str) -> bytes:
    stripped = segment.rstrip("=")
    pad = len(segment) - len(stripped)
    remainder = len(stripped) % 4
    if (pad and (pad > 2 or len(segment) % 4)) or remainder == 1 or not _B64URL.fullmatch(stripped):
        raise InvalidToken(f"the token {what} is not base64url", reason="malformed")
    # Reject non-canonical encodings (unused low bits set), as pyjwt does.
    if remainder and _B64_VALUES[stripped[-1]] & (0x0F if remainder == 2 else 0x03):
        raise InvalidToken(f"the token {what} is not canonical base64url", reason="malformed")
    try:
        return base64.urlsafe_b64decode(stripped + "=" * (-len(stripped) % 4))
    except (binascii.Error, ValueError) as exc:  # pragma: no cover - alphabet checked above
        raise InvalidToken(f"the token {what} is not base64url", reason="malformed") from exc


def _json_object(segment: str, what: str) -> dict[str, Any]:
    raw = _b64decode(segment, what)
    try:
        value = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise InvalidToken(f"the token {what} is not valid JSON", reason="malformed") from exc
    if not isinstance(value, dict):
        raise InvalidToken(f"the token {what} is not a JSON object", reason="malformed")
    return value


def _number(payload: Mapping[str, Any], claim: str, state: _RuleState) -> float | None:
    value = payload.get(claim)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidToken(
            f"the {claim!r} claim must be a number of seconds since the epoch",
            reason="malformed",
            issuer=state.rule.issuer,
        )
    return value


class JwtAuthenticator:
    """Authenticates requests by JWT against a list of rules (one per accepted issuer).

    Build one per application at start-up: it parses inline and file key sets, precomputes
    the token locations and the issuer index, and owns one ``JwksCache`` per rule.

    Token location: all rules' header locations are tried first (in rule order, then each
    rule's order), then all query parameter locations. The first location that holds a
    token is used and any other token in the request is ignored. The token's issuer must
    have a rule that lists that location.

    Args:
        rules: the accepted issuers; issuers must be unique.
        clock: wall-clock seconds since the epoch, for ``exp``/``nbf``/``iat``.
        refresh_clock: a monotonic clock for JWKS refresh timing.
        min_refetch_seconds: the least time between two JWKS fetches triggered by an unknown
            ``kid`` or a failure (per issuer).
        http_client: the ``httpx.Client`` used by ``authenticate()`` to fetch ``jwks_uri``.
        async_http_client: the ``httpx.AsyncClient`` used by ``authenticate_async()``.
        on_jwks_error: called as ``on_jwks_error(uri, error)`` after a failed JWKS fetch.

    Raises:
        ConfigurationError: no rules, a duplicate issuer, or a bad key source
            (``field`` is ``"rules[<i>].<field>"``).
    """

    __slots__ = (
        "_by_issuer",
        "_clock",
        "_headers",
        "_max_bytes",
        "_params",
        "caches",
        "rules",
    )

    def __init__(
        self,
        rules: Sequence[JwtRule],
        *,
        clock: Callable[[], float] = time.time,
        refresh_clock: Callable[[], float] = time.monotonic,
        min_refetch_seconds: float = 30.0,
        http_client: httpx.Client | None = None,
        async_http_client: httpx.AsyncClient | None = None,
        on_jwks_error: Callable[[str, Exception], None] | None = None,
    ) -> None:
        rules = tuple(rules)
        if not rules:
            raise ConfigurationError("expected at least one JwtRule", field="rules", value=rules)
        by_issuer: dict[str, _RuleState] = {}
        caches: dict[str, JwksCache] = {}
        header_issuers: dict[tuple[str, str], set[str]] = {}
        param_issuers: dict[str, set[str]] = {}
        for index, rule in enumerate(rules):
            if not isinstance(rule, JwtRule):
                raise ConfigurationError("expected a JwtRule", field=f"rules[{index}]", value=rule)
            if rule.issuer in by_issuer:
                raise ConfigurationError(
                    "duplicate issuer; each issuer needs exactly one rule",
                    field=f"rules[{index}].issuer",
                    value=rule.issuer,
                )
            cache = JwksCache.from_rule(
                rule,
                name=f"rules[{index}]",
                min_refetch_seconds=min_refetch_seconds,
                client=http_client,
                async_client=async_http_client,
                clock=refresh_clock,
                on_fetch_error=on_jwks_error,
            )
            caches[rule.issuer] = cache
            by_issuer[rule.issuer] = _RuleState(
                rule=rule,
                cache=cache,
                algorithms=frozenset(rule.algorithms),
                audiences=frozenset(rule.audiences),
                skew=rule.clock_skew_seconds,
                max_bytes=rule.max_token_bytes,
                strip=not rule.forward_original_token,
                output_header=rule.output_payload_to_header,
            )
            for location in rule.header_locations:
                header_issuers.setdefault(location, set()).add(rule.issuer)
            for param in rule.param_locations:
                param_issuers.setdefault(param, set()).add(rule.issuer)
        self.rules: tuple[JwtRule, ...] = rules
        """The rules, in the order given."""
        self.caches: Mapping[str, JwksCache] = MappingProxyType(caches)
        """Each issuer's ``JwksCache`` (inspect counters, or ``refresh()`` at start-up)."""
        self._by_issuer = by_issuer
        self._headers = tuple(
            _Location("header", name, prefix.lower(), frozenset(issuers))
            for (name, prefix), issuers in header_issuers.items()
        )
        self._params = tuple(
            _Location("param", name, "", frozenset(issuers))
            for name, issuers in param_issuers.items()
        )
        self._max_bytes = max(rule.max_token_bytes for rule in rules)
        self._clock = clock

    # -- public ----------------------------------------------------------------------------

    def authenticate(self, headers: Mapping[str, str], query: str = "") -> JwtResult | None:
        """Authenticate a request (blocking; for WSGI).

        May fetch a ``jwks_uri`` synchronously when keys are needed and due (first use,
        stale, or an unknown ``kid`` outside the refetch rate limit).

        Args:
            headers: request headers with lower-case names (as ``RequestFacts.headers``).
            query: the raw query string without ``?``.

        Returns:
            ``None`` when no configured location holds a token, else the ``JwtResult``.

        Raises:
            InvalidToken: a token is present but not acceptable; see ``reason``.
        """
        pending = self._begin(headers, query)
        if pending is None:
            return None
        cache = pending.state.cache
        if cache.is_static:
            return self._finish(pending, self._select(pending, cache.key_set))
        cache.maybe_refresh()
        key_set = cache.key_set
        try:
            keys = self._select(pending, key_set)
        except InvalidToken as exc:
            if exc.reason not in _REFETCH_REASONS:
                raise
            cache.maybe_refresh(key_missing=True)
            # Compare sets, not the return value: another thread may have just fetched.
            if cache.key_set is key_set:
                raise
            keys = self._select(pending, cache.key_set)
        return self._finish(pending, keys)

    async def authenticate_async(
        self, headers: Mapping[str, str], query: str = ""
    ) -> JwtResult | None:
        """Authenticate a request without blocking the event loop (for ASGI).

        Same contract as ``authenticate()``; JWKS fetches use ``httpx.AsyncClient`` and
        concurrent requests share one fetch.
        """
        pending = self._begin(headers, query)
        if pending is None:
            return None
        cache = pending.state.cache
        if cache.is_static:
            return self._finish(pending, self._select(pending, cache.key_set))
        await cache.maybe_refresh_async()
        key_set = cache.key_set
        try:
            keys = self._select(pending, key_set)
        except InvalidToken as exc:
            if exc.reason not in _REFETCH_REASONS:
                raise
            await cache.maybe_refresh_async(key_missing=True)
            if cache.key_set is key_set:
                raise
            keys = self._select(pending, cache.key_set)
        return self._finish(pending, keys)

    def refresh(self) -> None:
        """Fetch every ``jwks_uri`` now (blocking), e.g. at start-up. Failures are reported,
        not raised."""
        for cache in self.caches.values():
            cache.refresh()

    async def refresh_async(self) -> None:
        """Fetch every ``jwks_uri`` now without blocking. Failures are reported, not raised."""
        for cache in self.caches.values():
            await cache.refresh_async()

    # -- steps -----------------------------------------------------------------------------

    def _find(self, headers: Mapping[str, str], query: str) -> tuple[str, _Location] | None:
        for location in self._headers:
            value = headers.get(location.name)
            if value is None:
                continue
            prefix = location.prefix
            if prefix:
                if value[: len(prefix)].lower() != prefix:
                    continue  # e.g. "Basic ..." is not a bearer token
                value = value[len(prefix) :]
            value = value.strip()
            if value:
                return value, location
        if self._params and query:
            found: dict[str, str] = {}
            for part in query.split("&"):
                name, _, value = part.partition("=")
                if "%" in name or "+" in name:
                    name = unquote_plus(name)
                if name not in found:
                    found[name] = value
            for location in self._params:
                value = found.get(location.name, "")
                if "%" in value or "+" in value:
                    value = unquote_plus(value)
                value = value.strip()
                if value:
                    return value, location
        return None

    def _begin(self, headers: Mapping[str, str], query: str) -> _Pending | None:
        found = self._find(headers, query)
        if found is None:
            return None
        token, location = found
        source = location.name
        if len(token) > self._max_bytes:
            raise InvalidToken(
                f"token of {len(token)} bytes exceeds the limit of {self._max_bytes}",
                reason="too-large",
                token_source=source,
            )
        parts = token.split(".")
        if len(parts) != 3:
            detail = (
                "encrypted tokens (JWE) are not supported"
                if len(parts) == 5
                else f"expected 3 dot-separated parts, got {len(parts)}"
            )
            raise InvalidToken(
                f"the token is not a compact JWS: {detail}", reason="malformed", token_source=source
            )
        header_segment, payload_segment, signature_segment = parts
        try:
            header = _json_object(header_segment, "header")
            payload = _json_object(payload_segment, "payload")
            signature = _b64decode(signature_segment, "signature")
        except InvalidToken as exc:
            exc.token_source = source
            raise
        issuer = payload.get("iss")
        if not isinstance(issuer, str):
            raise InvalidToken(
                "the token has no 'iss' claim"
                if issuer is None
                else "the 'iss' claim is not a string",
                reason="unknown-issuer" if issuer is None else "malformed",
                token_source=source,
            )
        state = self._by_issuer.get(issuer)
        if state is None:
            raise InvalidToken(
                f"issuer {_shown(issuer)} is not accepted",
                reason="unknown-issuer",
                token_source=source,
            )
        if issuer not in location.issuers:
            raise InvalidToken(
                f"issuer {_shown(issuer)} does not accept tokens from {location.kind} {source!r}",
                reason="unknown-issuer",
                issuer=issuer,
                token_source=source,
            )
        if len(token) > state.max_bytes:
            raise InvalidToken(
                f"token of {len(token)} bytes exceeds the limit of {state.max_bytes}",
                reason="too-large",
                issuer=issuer,
                token_source=source,
            )
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise InvalidToken(
                "the token header has no 'alg' string",
                reason="malformed",
                issuer=issuer,
                token_source=source,
            )
        if alg not in state.algorithms:
            raise InvalidToken(
                f"algorithm {_shown(alg)} is not allowed for issuer {_shown(issuer)}; "
                f"allowed: {', '.join(state.rule.algorithms)}",
                reason="alg-not-allowed",
                issuer=issuer,
                token_source=source,
            )
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise InvalidToken(
                "the token header 'kid' is not a string",
                reason="malformed",
                issuer=issuer,
                token_source=source,
            )
        if "crit" in header:
            # RFC 7515 section 4.1.11: unknown critical extensions must be rejected.
            raise InvalidToken(
                "the token header has critical extensions ('crit'), none are supported",
                reason="malformed",
                issuer=issuer,
                token_source=source,
            )
        signing_input = token[: len(header_segment) + 1 + len(payload_segment)].encode("ascii")
        return _Pending(
            state=state,
            payload_segment=payload_segment,
            signing_input=signing_input,
            signature=signature,
            payload=payload,
            alg=alg,
            kid=kid,
            location=location,
        )

    @staticmethod
    def _select(p: _Pending, key_set: KeySet) -> tuple[VerificationKey, ...]:
        state = p.state
        cache = state.cache
        issuer = state.rule.issuer
        if not key_set.keys:
            detail = f"; last fetch error: {cache.last_error}" if cache.last_error else ""
            raise InvalidToken(
                f"no verification keys for issuer {_shown(issuer)} are available{detail}",
                reason="no-keys",
                issuer=issuer,
                token_source=p.location.name,
            )
        if p.kid is not None:
            candidates = key_set.with_kid(p.kid)
            if candidates is None:
                raise InvalidToken(
                    f"key id {_shown(p.kid)} is not among the keys of issuer {_shown(issuer)}",
                    reason="unknown-kid",
                    issuer=issuer,
                    token_source=p.location.name,
                )
            usable = tuple(key for key in candidates if p.alg in key.algorithms)
            if not usable:
                raise InvalidToken(
                    f"key {_shown(p.kid)} ({candidates[0].kty}) cannot verify {p.alg} tokens",
                    reason="alg-not-allowed",
                    issuer=issuer,
                    token_source=p.location.name,
                )
            return usable
        usable = key_set.for_algorithm(p.alg)
        if not usable:
            raise InvalidToken(
                f"issuer {_shown(issuer)} has no key that can verify {p.alg} tokens",
                reason="no-keys",
                issuer=issuer,
                token_source=p.location.name,
            )
        return usable

    def _finish(self, p: _Pending, keys: tuple[VerificationKey, ...]) -> JwtResult:
        state = p.state
        issuer = state.rule.issuer
        source = p.location.name
        for key in keys:
            if key.verify(p.alg, p.signing_input, p.signature):
                break
        else:
            raise InvalidToken(
                f"signature verification failed for issuer {_shown(issuer)}",
                reason="bad-signature",
                issuer=issuer,
                token_source=source,
            )
        payload = p.payload
        now = self._clock()
        skew = state.skew
        try:
            exp = _number(payload, "exp", state)
            nbf = _number(payload, "nbf", state)
            iat = _number(payload, "iat", state)
        except InvalidToken as exc:
            exc.token_source = source
            raise
        if exp is None:
            raise InvalidToken(
                "the token has no 'exp' claim; an expiry is required",
                reason="malformed",
                issuer=issuer,
                token_source=source,
            )
        if now >= exp + skew:
            raise InvalidToken(
                f"the token expired at {exp:.0f} (now {now:.0f}, skew {skew:g}s)",
                reason="expired",
                issuer=issuer,
                token_source=source,
            )
        if nbf is not None and now + skew < nbf:
            raise InvalidToken(
                f"the token is not valid before {nbf:.0f} (now {now:.0f}, skew {skew:g}s)",
                reason="not-yet-valid",
                issuer=issuer,
                token_source=source,
            )
        if iat is not None and now + skew < iat:
            raise InvalidToken(
                f"the token is issued in the future at {iat:.0f} (now {now:.0f}, skew {skew:g}s)",
                reason="not-yet-valid",
                issuer=issuer,
                token_source=source,
            )
        aud = payload.get("aud")
        audiences: tuple[str, ...]
        if aud is None:
            audiences = ()
        elif isinstance(aud, str):
            audiences = (aud,)
        elif isinstance(aud, list) and all(isinstance(item, str) for item in aud):
            audiences = tuple(aud)
        else:
            raise InvalidToken(
                "the 'aud' claim must be a string or a list of strings",
                reason="malformed",
                issuer=issuer,
                token_source=source,
            )
        if state.audiences and state.audiences.isdisjoint(audiences):
            raise InvalidToken(
                f"audience {_shown(list(audiences))} is not among {sorted(state.audiences)}",
                reason="bad-audience",
                issuer=issuer,
                token_source=source,
            )
        subject = payload.get("sub", "")
        if not isinstance(subject, str):
            raise InvalidToken(
                "the 'sub' claim is not a string",
                reason="malformed",
                issuer=issuer,
                token_source=source,
            )
        is_header = p.location.kind == "header"
        return JwtResult(
            issuer=issuer,
            subject=subject,
            principal=f"{issuer}/{subject}",
            audiences=audiences,
            claims=MappingProxyType(payload),
            token_source=source,
            header_to_strip=source if state.strip and is_header else None,
            output_header=(
                (state.output_header, p.payload_segment) if state.output_header else None
            ),
        )

    def __repr__(self) -> str:
        return f"JwtAuthenticator(issuers={list(self._by_issuer)!r})"


_REFETCH_REASONS: Final = frozenset({"unknown-kid", "no-keys"})
