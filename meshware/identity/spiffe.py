"""SPIFFE ids, parsed and validated exactly as the SPIFFE-ID specification says.

A mesh workload's id has the form ``spiffe://<trust-domain>/ns/<namespace>/sa/<service>``;
its Istio-style principal drops the scheme: ``<trust-domain>/ns/<namespace>/sa/<service>``.

Rules enforced (each failure names its rule in ``InvalidSpiffeId.rule``):

========================  ==================================================================
rule                      what it says
========================  ==================================================================
``scheme``                starts with ``spiffe://`` (scheme in lower case)
``trust-domain-empty``    the trust domain is not empty
``trust-domain-port``     no port in the trust domain
``trust-domain-userinfo`` no user info (``user@``) in the trust domain
``trust-domain-chars``    trust domain characters are ``a-z 0-9 . - _`` only (lower case)
``path-empty-segment``    no empty path segments (``//``) and no trailing ``/``
``path-dot-segment``      no ``.`` or ``..`` segments
``path-chars``            path characters are ``a-z A-Z 0-9 . - _`` and ``/`` only
``query-fragment``        no query (``?``) or fragment (``#``)
``percent-encoding``      no percent-encoded characters anywhere
``too-long``              at most 2048 bytes in all, trust domain at most 255
========================  ==================================================================
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from meshware.exceptions import InvalidSpiffeId

_SCHEME = "spiffe://"
_MAX_ID_BYTES = 2048
_MAX_TRUST_DOMAIN = 255
_TRUST_DOMAIN_RE = re.compile(r"[a-z0-9._-]+")
_SEGMENT_RE = re.compile(r"[a-zA-Z0-9._-]+")


def _check_trust_domain(value: str, td: str) -> None:
    if not td:
        raise InvalidSpiffeId(value, "trust-domain-empty", "the trust domain is empty")
    if "@" in td:
        raise InvalidSpiffeId(value, "trust-domain-userinfo", "user info is not allowed")
    if ":" in td:
        raise InvalidSpiffeId(value, "trust-domain-port", "a port is not allowed")
    if "%" in td:
        raise InvalidSpiffeId(value, "percent-encoding", "percent-encoding is not allowed")
    if len(td) > _MAX_TRUST_DOMAIN:
        raise InvalidSpiffeId(value, "too-long", f"the trust domain exceeds {_MAX_TRUST_DOMAIN}")
    if not _TRUST_DOMAIN_RE.fullmatch(td):
        bad = next(c for c in td if not _TRUST_DOMAIN_RE.fullmatch(c))
        raise InvalidSpiffeId(
            value,
            "trust-domain-chars",
            f"character {bad!r} is not allowed in a trust domain (expected a-z 0-9 . - _)",
        )


def _check_path(value: str, path: str) -> None:
    if not path:
        return
    if "%" in path:
        raise InvalidSpiffeId(value, "percent-encoding", "percent-encoding is not allowed")
    for segment in path[1:].split("/"):
        if segment == "":
            raise InvalidSpiffeId(
                value,
                "path-empty-segment",
                "empty path segments and a trailing '/' are not allowed",
            )
        if segment in (".", ".."):
            raise InvalidSpiffeId(
                value, "path-dot-segment", f"the path segment {segment!r} is not allowed"
            )
        if not _SEGMENT_RE.fullmatch(segment):
            bad = next(c for c in segment if not _SEGMENT_RE.fullmatch(c))
            raise InvalidSpiffeId(
                value,
                "path-chars",
                f"character {bad!r} is not allowed in a path (expected a-z A-Z 0-9 . - _)",
            )


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A validated SPIFFE id.

    Build one with :meth:`parse` (from text) or :meth:`for_service` (from parts); the
    constructor validates too, so an invalid ``SpiffeId`` cannot exist.

    Attributes:
        trust_domain: the trust domain, e.g. ``"cluster.local"``.
        path: the path, ``""`` or starting with ``/``, e.g. ``"/ns/default/sa/orders"``.
        principal: Istio's principal form: ``cluster.local/ns/default/sa/orders``.
        namespace: the namespace of a ``/ns/<ns>/sa/<sa>`` id, else ``None``.
    """

    trust_domain: str
    path: str = ""
    # Derived once here: every request's metrics, log line and policy facts read them.
    principal: str = field(init=False, repr=False, compare=False)
    namespace: str | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        text = self.uri
        # surrogatepass: a lone surrogate is refused by the character rules, not by a crash.
        if len(text.encode("utf-8", "surrogatepass")) > _MAX_ID_BYTES:
            raise InvalidSpiffeId(text, "too-long", f"a SPIFFE id is at most {_MAX_ID_BYTES} bytes")
        _check_trust_domain(text, self.trust_domain)
        if self.path and not self.path.startswith("/"):
            raise InvalidSpiffeId(text, "path-chars", "the path must start with '/'")
        _check_path(text, self.path)
        object.__setattr__(self, "principal", f"{self.trust_domain}{self.path}")
        object.__setattr__(self, "namespace", self._workload_part(2))

    @classmethod
    def parse(cls, value: str) -> SpiffeId:
        """Parse ``spiffe://trust-domain/path`` or raise :class:`InvalidSpiffeId`."""
        if not isinstance(value, str):
            raise InvalidSpiffeId(repr(value), "scheme", "a SPIFFE id must be a string")
        if len(value.encode("utf-8", "surrogatepass")) > _MAX_ID_BYTES:
            raise InvalidSpiffeId(
                value, "too-long", f"a SPIFFE id is at most {_MAX_ID_BYTES} bytes"
            )
        if not value.startswith(_SCHEME):
            detail = "expected the scheme 'spiffe://'"
            if value.lower().startswith(_SCHEME):
                detail = "the scheme must be lower case 'spiffe://'"
            raise InvalidSpiffeId(value, "scheme", detail)
        rest = value[len(_SCHEME) :]
        if "?" in rest or "#" in rest:
            raise InvalidSpiffeId(value, "query-fragment", "a query or fragment is not allowed")
        td, slash, path = rest.partition("/")
        return cls(td, slash + path)

    @classmethod
    def for_service(cls, trust_domain: str, namespace: str, service_account: str) -> SpiffeId:
        """The mesh id of a workload: ``spiffe://<td>/ns/<namespace>/sa/<service_account>``.

        Raises:
            InvalidSpiffeId: a part breaks a rule, or contains ``/`` (which would make an id
                of another shape).
        """
        for part in (namespace, service_account):
            if "/" in part:
                raise InvalidSpiffeId(
                    f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}",
                    "path-chars",
                    f"character '/' is not allowed in a namespace or service account ({part!r})",
                )
        return cls(trust_domain, f"/ns/{namespace}/sa/{service_account}")

    @property
    def uri(self) -> str:
        """The id as text: ``spiffe://cluster.local/ns/default/sa/orders``."""
        return f"{_SCHEME}{self.trust_domain}{self.path}"

    @property
    def service_account(self) -> str | None:
        """The service account of a ``/ns/<ns>/sa/<sa>`` id, else ``None``."""
        return self._workload_part(4)

    def _workload_part(self, index: int) -> str | None:
        # /ns/<namespace>/sa/<service account>: parts 2 and 4
        parts = self.path.split("/")
        if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa":
            return parts[index]
        return None

    def __str__(self) -> str:
        return self.uri


def trust_domain_id(trust_domain: str) -> SpiffeId:
    """The id of a trust domain itself (``spiffe://cluster.local``), as a CA certificate holds."""
    return SpiffeId(trust_domain, "")
