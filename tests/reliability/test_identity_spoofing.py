"""Identity spoofing against real servers: no forged or invalid credential yields an identity.

The ``/echo`` handler of the protected service answers the principal it saw; every attack
below asks it, and the answer must be "anonymous" (``null``) or a refusal (a handshake refused,
``400``/``403``) — never the identity claimed. A trusted gateway's XFCC is the control that
shows the header is honoured when it should be.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshware.identity.ca import LocalCA
from tests.reliability import (
    ADMIN,
    SERVICES,
    executions,
    get,
    raw_request,
)
from tests.servers import client_context, meshware_serve

pytestmark = pytest.mark.integration

APPS = {"uvicorn": "tests.reliability:asgi_stack", "gunicorn": "tests.reliability:wsgi_stack"}
GATEWAY = "spiffe://cluster.local/ns/default/sa/gateway"
ADMIN_ID = "spiffe://" + ADMIN
XFCC = b"x-forwarded-client-cert: URI=" + ADMIN_ID.encode()
NOW = dt.datetime.now(dt.timezone.utc)


def _write_leaf(
    out: Path,
    name: str,
    *,
    issuer_dir: Path | None,
    uris: tuple[str, ...] = (ADMIN_ID,),
    not_before: dt.datetime = NOW - dt.timedelta(minutes=5),
    not_after: dt.datetime = NOW + dt.timedelta(hours=1),
    ca_flag: bool = False,
) -> tuple[Path, Path]:
    """A client certificate for the attack ``name``; self-signed when ``issuer_dir`` is None."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    if issuer_dir is None:
        signer, issuer = key, subject
    else:
        loaded = serialization.load_pem_private_key(
            (issuer_dir / "ca.key").read_bytes(), password=None
        )
        assert isinstance(loaded, ec.EllipticCurvePrivateKey)
        signer = loaded
        issuer = x509.load_pem_x509_certificate((issuer_dir / "ca.crt").read_bytes()).subject
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca_flag, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
        .sign(signer, hashes.SHA256())
    )
    cert_path, key_path = out / f"{name}.crt", out / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cert_dir = tmp_path_factory.mktemp("pki")
    ca = LocalCA.init(cert_dir)
    for service in SERVICES:
        ca.issue(service)
    return cert_dir


@pytest.fixture(scope="module")
def forged(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Client certificates that must never yield an identity, by attack."""
    out = tmp_path_factory.mktemp("forged")
    other = tmp_path_factory.mktemp("other-ca")
    LocalCA.init(other, trust_domain="evil.example")
    lookalike = tmp_path_factory.mktemp("lookalike")
    LocalCA.init(lookalike, trust_domain="cluster.local")
    return {
        "other trust domain's CA": _write_leaf(
            out, "other-td", issuer_dir=other, uris=("spiffe://evil.example/ns/default/sa/admin",)
        ),
        "another CA of the same trust domain": _write_leaf(out, "lookalike", issuer_dir=lookalike),
        "expired": _write_leaf(
            out,
            "expired",
            issuer_dir=pki,
            not_before=NOW - dt.timedelta(days=2),
            not_after=NOW - dt.timedelta(days=1),
        ),
        "not yet valid": _write_leaf(
            out,
            "future",
            issuer_dir=pki,
            not_before=NOW + dt.timedelta(days=1),
            not_after=NOW + dt.timedelta(days=2),
        ),
        "two URI SANs": _write_leaf(
            out, "two-sans", issuer_dir=pki, uris=(ADMIN_ID, "spiffe://cluster.local/ns/a/sa/b")
        ),
        "self-signed": _write_leaf(out, "self-signed", issuer_dir=None),
        "CA-flagged leaf": _write_leaf(out, "ca-leaf", issuer_dir=pki, ca_flag=True),
    }


@pytest.fixture(
    scope="module", params=[(s, m) for s in sorted(APPS) for m in ("strict", "permissive")]
)
def server(request: pytest.FixtureRequest, pki: Path) -> Iterator[tuple[str, str, int, Path]]:
    name, mode = request.param
    log = pki.parent / f"spoof-{name}-{mode}.jsonl"
    env = {
        "MESH_REL_BUNDLE": str(pki / "bundle.pem"),
        "MESH_REL_LOG": str(log),
        "MESH_REL_PROXY": GATEWAY,
    }
    with meshware_serve(
        APPS[name],
        service="vault",
        cert_dir=pki,
        env=env,
        args=["--no-access-log", "--mtls", mode],
    ) as port:
        yield name, mode, port, log


def _echo(port: int, ctx: object, *headers: bytes) -> tuple[int | None, str | None]:
    status, data = raw_request(port, ctx, get(b"/echo", *headers))
    if status != 200:
        return status, None
    return status, json.loads(data.split(b"\r\n\r\n", 1)[1])["principal"]


def test_trusted_gateway_xfcc_is_believed(pki: Path, server: tuple[str, str, int, Path]) -> None:
    """The control: the header does work from the configured proxy."""
    _, _, port, _ = server
    assert _echo(port, client_context(pki, "gateway"), XFCC) == (200, ADMIN)
    assert _echo(port, client_context(pki, "users")) == (200, "cluster.local/ns/default/sa/users")


def test_xfcc_from_an_untrusted_service_is_ignored(
    pki: Path, server: tuple[str, str, int, Path]
) -> None:
    _, _, port, _ = server
    users = client_context(pki, "users")
    assert _echo(port, users, XFCC) == (200, "cluster.local/ns/default/sa/users")
    assert _echo(port, users, XFCC, XFCC) == (200, "cluster.local/ns/default/sa/users")


def test_xfcc_over_plaintext_is_ignored(server: tuple[str, str, int, Path]) -> None:
    _, mode, port, log = server
    before = len(executions(log))
    status, principal = _echo(port, None, XFCC)
    if mode == "strict":
        assert status is None  # plaintext is refused before any HTTP
        assert executions(log)[before:] == []
    else:
        assert (status, principal) == (200, None)


def test_tls_without_a_client_certificate_is_anonymous(
    pki: Path, server: tuple[str, str, int, Path]
) -> None:
    _, mode, port, _ = server
    got = _echo(port, client_context(pki, None), XFCC)
    assert got == ((None, None) if mode == "strict" else (200, None))


@pytest.mark.parametrize(
    "attack",
    [
        "other trust domain's CA",
        "another CA of the same trust domain",
        "expired",
        "not yet valid",
        "two URI SANs",
        "self-signed",
        "CA-flagged leaf",
    ],
)
def test_invalid_certificates_yield_no_identity(
    pki: Path,
    forged: dict[str, tuple[Path, Path]],
    server: tuple[str, str, int, Path],
    attack: str,
) -> None:
    _, _, port, log = server
    ctx = client_context(pki, None)
    cert, key = forged[attack]
    ctx.load_cert_chain(cert, key)
    before = len(executions(log))
    status, principal = _echo(port, ctx, XFCC)
    # Refused at the handshake (None) or by meshware (403); never an identity.
    assert status in (None, 400, 403), (attack, status)
    assert principal is None
    assert all(e["principal"] is None for e in executions(log)[before:])
