"""JWT attacks through real servers: every forged, stale or misdirected token gets ``401``.

The protected service verifies RS256 tokens of ``https://issuer.example`` for audience
``shop`` (an RSA key in a JWKS file). Each attack sends one token to ``/echo`` over mTLS and
expects ``401``, ``WWW-Authenticate: Bearer error="invalid_token"`` and a handler that never
ran; a valid token is the control. (gunicorn answers a token larger than its 8190-byte header
limit with ``431`` itself: a server-level refusal, accepted for that one attack.)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from meshware.identity.ca import LocalCA
from tests.reliability import SERVICES, executions
from tests.servers import client_context, meshware_serve

pytestmark = pytest.mark.integration

APPS = {"uvicorn": "tests.reliability:asgi_stack", "gunicorn": "tests.reliability:wsgi_stack"}
ISSUER = "https://issuer.example"
KID = "rsa-1"
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PUBLIC_PEM = KEY.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "alice",
        "aud": "shop",
        "iat": now,
        "exp": now + 600,
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def _signed(claims: dict[str, Any], *, key: Any = KEY, kid: str = KID) -> str:
    return pyjwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})


def _unsigned(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    head = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
    return head + "." + _b64(signature)


def _hs_confused() -> str:
    """HS256 keyed with the issuer's public key: the classic RS/HS key-confusion forgery."""
    header = {"alg": "HS256", "typ": "JWT", "kid": KID}
    head = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(_claims()).encode())
    signature = hmac.new(PUBLIC_PEM, head.encode(), hashlib.sha256).digest()
    return head + "." + _b64(signature)


def _tampered() -> str:
    head, _, signature = _signed(_claims()).split(".")
    return head + "." + _b64(json.dumps(_claims(sub="admin")).encode()) + "." + signature


ATTACKS: dict[str, str] = {
    "alg none": _unsigned({"alg": "none", "typ": "JWT"}, _claims()),
    "alg None with kid": _unsigned({"alg": "None", "kid": KID}, _claims()),
    "HS256 keyed with the RSA public key": _hs_confused(),
    "expired": _signed(_claims(iat=int(time.time()) - 7200, exp=int(time.time()) - 3600)),
    "not yet valid": _signed(_claims(nbf=int(time.time()) + 3600)),
    "wrong audience": _signed(_claims(aud="billing")),
    "no audience": _signed(_claims(aud=None)),
    "wrong issuer": _signed(_claims(iss="https://evil.example")),
    "kid not in the JWKS": _signed(_claims(), kid="rsa-2"),
    "signed by another key": _signed(_claims(), key=OTHER_KEY),
    "tampered payload": _tampered(),
    "oversized": _signed(_claims(pad="x" * 20_000)),
    "garbage": "not-a-token",
    "garbage three parts": "abc.def.ghi",
    "empty signature": _signed(_claims()).rsplit(".", 1)[0] + ".",
    "header not JSON": _b64(b"{nope") + "." + _b64(b"{}") + "." + _b64(b"sig"),
}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cert_dir = tmp_path_factory.mktemp("pki")
    ca = LocalCA.init(cert_dir)
    for service in SERVICES:
        ca.issue(service)
    public: dict[str, Any] = RSAAlgorithm.to_jwk(KEY.public_key(), as_dict=True)
    public.update(kid=KID, alg="RS256", use="sig")
    (cert_dir / "jwks.json").write_text(json.dumps({"keys": [public]}))
    return cert_dir


@pytest.fixture(scope="module", params=sorted(APPS))
def server(request: pytest.FixtureRequest, pki: Path) -> Iterator[tuple[int, Path]]:
    log = pki.parent / f"jwt-{request.param}.jsonl"
    env = {
        "MESH_REL_BUNDLE": str(pki / "bundle.pem"),
        "MESH_REL_LOG": str(log),
        "MESH_REL_JWKS": str(pki / "jwks.json"),
        "MESH_REL_ISSUER": ISSUER,
        "MESH_REL_AUDIENCE": "shop",
    }
    with meshware_serve(
        APPS[request.param], service="vault", cert_dir=pki, env=env, args=["--no-access-log"]
    ) as port:
        yield port, log


@pytest.fixture(scope="module")
def users(pki: Path) -> Iterator[httpx.Client]:
    with httpx.Client(verify=client_context(pki, "users"), timeout=10) as client:
        yield client


def test_a_valid_token_is_accepted(server: tuple[int, Path], users: httpx.Client) -> None:
    port, _ = server
    response = users.get(
        f"https://127.0.0.1:{port}/echo", headers={"authorization": f"Bearer {_signed(_claims())}"}
    )
    assert response.status_code == 200
    assert response.json()["request_principal"] == f"{ISSUER}/alice"


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attack_gets_401(server: tuple[int, Path], users: httpx.Client, attack: str) -> None:
    port, log = server
    before = len(executions(log))
    response = users.get(
        f"https://127.0.0.1:{port}/echo", headers={"authorization": f"Bearer {ATTACKS[attack]}"}
    )
    if attack == "oversized" and response.status_code == 431:
        # gunicorn refuses a header over 8190 bytes itself, before meshware sees the token.
        assert executions(log)[before:] == []
        return
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"].startswith('Bearer error="invalid_token"')
    body = response.json()
    assert (body["status"], body["error"]) == (401, "unauthorized")
    assert executions(log)[before:] == []


def test_attack_in_the_query_parameter_gets_401(
    server: tuple[int, Path], users: httpx.Client
) -> None:
    port, log = server
    before = len(executions(log))
    response = users.get(
        f"https://127.0.0.1:{port}/echo", params={"access_token": ATTACKS["alg none"]}
    )
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith('Bearer error="invalid_token"')
    assert executions(log)[before:] == []
