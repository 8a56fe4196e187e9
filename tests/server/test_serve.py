"""``meshware serve`` on real uvicorn and gunicorn processes with real certificates.

Every test runs against both servers: uvicorn for the ASGI app, gunicorn for the WSGI app.
Clients are httpx and curl presenting certificates issued by ``meshware cert issue``.
"""

from __future__ import annotations

import datetime as dt
import shutil
import ssl
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshware.identity.ca import LocalCA, ServicePaths
from meshware.identity.spiffe import SpiffeId
from tests.servers import MESHWARE, ROOT, meshware_serve

pytestmark = pytest.mark.integration

APPS = {"uvicorn": "tests.server.echo_apps:asgi_app", "gunicorn": "tests.server.echo_apps:wsgi_app"}


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MESHWARE, *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and certificates for orders (the server), users and shipping (callers)."""
    cert_dir = tmp_path_factory.mktemp("pki")
    assert run_cli("ca", "init", "--dir", str(cert_dir)).returncode == 0
    for service in ("orders", "users", "shipping"):
        result = run_cli("cert", "issue", service, "--dir", str(cert_dir))
        assert result.returncode == 0, result.stderr
    return cert_dir


def client(pki: Path, service: str | None) -> httpx.Client:
    ctx = ssl.create_default_context(cafile=str(pki / "bundle.pem"))
    if service is not None:
        paths = ServicePaths.under(pki, service, "default")
        ctx.load_cert_chain(paths.cert, paths.key)
    return httpx.Client(verify=ctx, timeout=10)


def write_client_cert(
    directory: Path,
    signer: LocalCA,
    spiffe_id: SpiffeId,
    *,
    not_before: dt.datetime,
    not_after: dt.datetime,
) -> tuple[Path, Path]:
    """A client certificate with chosen validity, signed by ``signer``; returns (cert, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    ca_key = serialization.load_pem_private_key((signer.directory / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_ski = signer.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "odd")]))
        .issuer_name(signer.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski.value),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id.uri)]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = directory / "odd.crt", directory / "odd.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def refused(pki: Path, port: int, cert: tuple[Path, Path] | None) -> bool:
    """True when the TLS connection (or the first request on it) is refused by the server."""
    ctx = ssl.create_default_context(cafile=str(pki / "bundle.pem"))
    if cert is not None:
        ctx.load_cert_chain(*cert)
    try:
        with httpx.Client(verify=ctx, timeout=5) as c:
            c.get(f"https://127.0.0.1:{port}/")
    except httpx.TransportError:
        return True
    return False


@pytest.mark.parametrize("server", ["uvicorn", "gunicorn"])
def test_strict_mtls_echoes_the_verified_caller(pki: Path, server: str) -> None:
    with meshware_serve(APPS[server], service="orders", cert_dir=pki) as port:
        with client(pki, "users") as c:
            response = c.get(f"https://127.0.0.1:{port}/")
        assert response.status_code == 200
        assert response.text == "cluster.local/ns/default/sa/users https"

        users = ServicePaths.under(pki, "shipping", "default")
        curl = subprocess.run(
            [
                "curl", "-sS", "--max-time", "10",
                "--cacert", str(pki / "bundle.pem"),
                "--cert", str(users.cert), "--key", str(users.key),
                f"https://127.0.0.1:{port}/",
            ],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert curl.returncode == 0, curl.stderr
        assert curl.stdout == "cluster.local/ns/default/sa/shipping https"

        # No client certificate, and plaintext: both refused under STRICT.
        assert refused(pki, port, None)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
        curl = subprocess.run(
            ["curl", "-sS", "--max-time", "10", "--cacert", str(pki / "bundle.pem"),
             f"https://127.0.0.1:{port}/"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert curl.returncode != 0


@pytest.mark.parametrize("server", ["uvicorn", "gunicorn"])
def test_permissive_accepts_plaintext_without_identity(pki: Path, server: str) -> None:
    with meshware_serve(
        APPS[server], service="orders", cert_dir=pki, args=["--mtls", "permissive"]
    ) as port:
        with client(pki, "users") as c:
            assert c.get(f"https://127.0.0.1:{port}/").text == (
                "cluster.local/ns/default/sa/users https"
            )
        with client(pki, None) as c:
            assert c.get(f"https://127.0.0.1:{port}/").text == "anonymous https"
        plain = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
        assert plain.text == "anonymous http"
        # A spoofed XFCC header from an untrusted peer is not believed.
        spoof = httpx.get(
            f"http://127.0.0.1:{port}/",
            headers={"x-forwarded-client-cert": "URI=spiffe://cluster.local/ns/default/sa/admin"},
            timeout=5,
        )
        assert spoof.text == "anonymous http"


@pytest.mark.parametrize("server", ["uvicorn", "gunicorn"])
def test_xfcc_from_a_trusted_proxy_is_believed(pki: Path, server: str) -> None:
    args = ["--mtls", "permissive", "--trusted-proxy", "127.0.0.1/32"]
    with meshware_serve(APPS[server], service="orders", cert_dir=pki, args=args) as port:
        xfcc = "By=spiffe://cluster.local/ns/default/sa/gw;URI=spiffe://cluster.local/ns/default/sa/users"
        ok = httpx.get(
            f"http://127.0.0.1:{port}/", headers={"x-forwarded-client-cert": xfcc}, timeout=5
        )
        assert ok.text == "cluster.local/ns/default/sa/users http"
        bad = httpx.get(
            f"http://127.0.0.1:{port}/",
            headers={"x-forwarded-client-cert": 'URI="spiffe://cluster.local/ns/default/sa/users'},
            timeout=5,
        )
        assert bad.status_code == 400
        assert bad.json()["reason"] == "xfcc-unbalanced-quote"
        foreign = httpx.get(
            f"http://127.0.0.1:{port}/",
            headers={"x-forwarded-client-cert": "URI=spiffe://evil.example/ns/default/sa/users"},
            timeout=5,
        )
        assert foreign.status_code == 403
        assert foreign.json()["reason"] == "unknown-trust-domain"


@pytest.mark.parametrize("server", ["uvicorn", "gunicorn"])
def test_bad_client_certificates_are_refused(pki: Path, server: str, tmp_path: Path) -> None:
    ca = LocalCA.load(pki)
    now = dt.datetime.now(dt.timezone.utc)
    users = SpiffeId.for_service("cluster.local", "default", "users")
    expired = write_client_cert(
        tmp_path,
        ca,
        users,
        not_before=now - dt.timedelta(days=2),
        not_after=now - dt.timedelta(days=1),
    )
    other_ca = LocalCA.init(tmp_path / "other", trust_domain="other.local")
    stranger = other_ca.issue("stranger")
    with meshware_serve(APPS[server], service="orders", cert_dir=pki) as port:
        assert refused(pki, port, expired)
        # A CA that is not in the bundle: the handshake fails.
        assert refused(pki, port, (stranger.cert, stranger.key))


@pytest.mark.parametrize("server", ["uvicorn", "gunicorn"])
def test_a_trust_domain_cannot_vouch_for_another(pki: Path, server: str, tmp_path: Path) -> None:
    """Both CAs are trusted (federation), but other.local's CA cannot issue cluster.local ids."""
    cert_dir = tmp_path / "pki"
    shutil.copytree(pki, cert_dir)
    other = LocalCA.init(tmp_path / "other", trust_domain="other.local")
    federated = (cert_dir / "bundle.pem").read_bytes() + (other.directory / "ca.crt").read_bytes()
    ServicePaths.under(cert_dir, "orders", "default").bundle.write_bytes(federated)
    (cert_dir / "bundle.pem").write_bytes(federated)
    now = dt.datetime.now(dt.timezone.utc)
    forged = write_client_cert(
        tmp_path,
        other,
        SpiffeId.for_service("cluster.local", "default", "admin"),
        not_before=now - dt.timedelta(minutes=1),
        not_after=now + dt.timedelta(hours=1),
    )
    honest = other.issue("partner")
    with meshware_serve(APPS[server], service="orders", cert_dir=cert_dir) as port:
        ctx = ssl.create_default_context(cafile=str(cert_dir / "bundle.pem"))
        ctx.load_cert_chain(*forged)
        with httpx.Client(verify=ctx, timeout=5) as c:
            response = c.get(f"https://127.0.0.1:{port}/")
        assert response.status_code == 403
        assert response.json()["reason"] == "untrusted"
        ctx = ssl.create_default_context(cafile=str(cert_dir / "bundle.pem"))
        ctx.load_cert_chain(honest.cert, honest.key)
        with httpx.Client(verify=ctx, timeout=5) as c:
            assert c.get(f"https://127.0.0.1:{port}/").text == (
                "other.local/ns/default/sa/partner https"
            )


def _server_serial(response: httpx.Response) -> int:
    sslobj = response.extensions["network_stream"].get_extra_info("ssl_object")
    return x509.load_der_x509_certificate(sslobj.getpeercert(True)).serial_number


@pytest.mark.parametrize("server", ["uvicorn", "gunicorn"])
def test_rotated_certificate_is_served_without_restart(server: str, tmp_path: Path) -> None:
    cert_dir = tmp_path / "pki"
    ca = LocalCA.init(cert_dir)
    ca.issue("orders")
    ca.issue("users")
    with meshware_serve(APPS[server], service="orders", cert_dir=cert_dir) as port:
        with client(cert_dir, "users") as c:
            before = _server_serial(c.get(f"https://127.0.0.1:{port}/"))
        slow_result: list[httpx.Response | BaseException] = []

        def slow_call() -> None:
            try:
                with client(cert_dir, "users") as c:
                    slow_result.append(c.get(f"https://127.0.0.1:{port}/slow"))
            except BaseException as exc:  # recorded and asserted below
                slow_result.append(exc)

        in_flight = threading.Thread(target=slow_call)
        in_flight.start()
        time.sleep(0.3)
        ca.issue("orders")  # rotation while a request is in flight
        time.sleep(1.2)  # the server checks its files at most once a second
        with client(cert_dir, "users") as c:
            after = _server_serial(c.get(f"https://127.0.0.1:{port}/"))
        in_flight.join(10)
        assert after != before
        assert (
            after
            == x509.load_pem_x509_certificate(
                ServicePaths.under(cert_dir, "orders", "default").cert.read_bytes()
            ).serial_number
        )
        assert len(slow_result) == 1 and isinstance(slow_result[0], httpx.Response)
        assert slow_result[0].status_code == 200


@pytest.mark.parametrize("server", ["uvicorn", "gunicorn"])
def test_missing_key_file_is_a_startup_error(server: str, tmp_path: Path) -> None:
    ca = LocalCA.init(tmp_path)
    paths = ca.issue("orders")
    paths.key.unlink()
    result = run_cli(
        "serve", APPS[server], "--service", "orders", "--dir", str(tmp_path),
        "--app-dir", str(ROOT), "--port", "1",
    )  # fmt: skip
    assert result.returncode == 2
    assert f"key_file: key_file {paths.key} does not exist" in result.stderr
