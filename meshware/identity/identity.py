"""The verified identity of the peer that sent a request."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from meshware.identity.spiffe import SpiffeId

IdentitySource = Literal["tls", "tls-socket", "ssl-client-cert", "xfcc"]
"""How an identity was established:

- ``"tls"``: the ASGI TLS extension (``scope["extensions"]["tls"]``), i.e. mTLS to this server;
- ``"tls-socket"``: a WSGI server's TLS socket (gunicorn's ``environ["gunicorn.socket"]``);
- ``"ssl-client-cert"``: the ``SSL_CLIENT_CERT`` variable a WSGI server sets;
- ``"xfcc"``: the ``x-forwarded-client-cert`` header sent by a trusted proxy.
"""


@dataclass(frozen=True, slots=True)
class Identity:
    """Who called: a SPIFFE id proven by a certificate (directly or via a trusted proxy).

    Attributes:
        spiffe_id: the caller's SPIFFE id.
        source: how the identity was established (see :data:`IdentitySource`).
        not_after: when the certificate that proved it expires, where known.
        via: the SPIFFE id or address of the trusted proxy that vouched for it (XFCC only).
    """

    spiffe_id: SpiffeId
    source: IdentitySource
    not_after: datetime | None = None
    via: str | None = None

    @property
    def trust_domain(self) -> str:
        """The trust domain, e.g. ``"cluster.local"``."""
        return self.spiffe_id.trust_domain

    @property
    def namespace(self) -> str | None:
        """The namespace, e.g. ``"default"`` (``None`` for a non-workload id)."""
        return self.spiffe_id.namespace

    @property
    def service_account(self) -> str | None:
        """The service account (the service's name), e.g. ``"orders"``."""
        return self.spiffe_id.service_account

    @property
    def principal(self) -> str:
        """Istio's principal string, e.g. ``"cluster.local/ns/default/sa/orders"``."""
        return self.spiffe_id.principal

    def __str__(self) -> str:
        return self.spiffe_id.uri
