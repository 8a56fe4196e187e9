"""Client-side mTLS: call other services with this service's certificate, and verify that the
server is the service we meant to call (its SPIFFE id), not merely "some certificate from the CA".

Host names are not what identifies a mesh service, so the client context does not check them;
instead :func:`server_identity` reads the server's certificate from an httpx response and
verifies it against the trust bundles, per trust domain, like the server side does.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import httpx

from meshware.exceptions import CertificateRejected
from meshware.identity.bundle import PeerVerifier
from meshware.identity.ca import ServicePaths
from meshware.identity.spiffe import SpiffeId


def client_ssl_context(paths: ServicePaths) -> ssl.SSLContext:
    """An SSL context presenting the service's certificate and trusting its bundle."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(paths.bundle))
    ctx.check_hostname = False  # the SPIFFE id is checked instead (server_identity)
    ctx.load_cert_chain(paths.cert, paths.key)
    return ctx


def client_ssl_context_for(
    cert_dir: str | os.PathLike[str], service: str, namespace: str = "default"
) -> ssl.SSLContext:
    """:func:`client_ssl_context` for a service's files under a certificate directory."""
    return client_ssl_context(ServicePaths.under(Path(cert_dir), service, namespace))


def server_identity(response: httpx.Response, verifier: PeerVerifier) -> SpiffeId:
    """The verified SPIFFE id of the server that sent ``response``.

    Raises:
        CertificateRejected: the connection was not TLS, or the server's certificate does not
            verify (see :class:`~meshware.identity.bundle.PeerVerifier`).
    """
    stream = response.extensions.get("network_stream")
    sslobj = stream.get_extra_info("ssl_object") if stream is not None else None
    der = sslobj.getpeercert(True) if sslobj is not None else None
    if not der:
        raise CertificateRejected("the server presented no certificate", reason="no-certificate")
    return verifier.verify_der(der).spiffe_id


def require_server(response: httpx.Response, verifier: PeerVerifier, expected: SpiffeId) -> None:
    """Raise :class:`CertificateRejected` unless the server is ``expected``."""
    actual = server_identity(response, verifier)
    if actual != expected:
        raise CertificateRejected(
            f"expected server {expected.uri}, but it is {actual.uri}", reason="wrong-server"
        )
