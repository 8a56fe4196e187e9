"""Fixtures for JWT tests: signing keys and a real JWKS server on 127.0.0.1."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm


class JwksKeyring:
    """Private keys by name, their public JWKs, and a token signer."""

    def __init__(self) -> None:
        self.private: dict[str, Any] = {
            "rsa-1": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "rsa-2": rsa.generate_private_key(public_exponent=65537, key_size=2048),
            "ec-1": ec.generate_private_key(ec.SECP256R1()),
            "ed-1": ed25519.Ed25519PrivateKey.generate(),
        }
        self.secret = b"s" * 32 + b"-shared-secret-for-hs256-tests"

    def jwk(self, kid: str, **extra: Any) -> dict[str, Any]:
        if kid == "hs-1":
            k = base64.urlsafe_b64encode(self.secret).rstrip(b"=").decode()
            return {"kty": "oct", "k": k, "kid": kid, **extra}
        public = self.private[kid].public_key()
        codec: Any = {"rsa": RSAAlgorithm, "ec-": ECAlgorithm, "ed-": OKPAlgorithm}[kid[:3]]
        data: dict[str, Any] = codec.to_jwk(public, as_dict=True)
        data.update(kid=kid, **extra)
        return data

    def jwks(self, *kids: str) -> str:
        return json.dumps({"keys": [self.jwk(kid) for kid in kids]})

    def sign(
        self,
        kid: str,
        claims: dict[str, Any],
        *,
        alg: str | None = None,
        with_kid: bool = True,
        headers: dict[str, Any] | None = None,
    ) -> str:
        default_alg = {"rsa": "RS256", "ec-": "ES256", "ed-": "EdDSA", "hs-": "HS256"}[kid[:3]]
        key = self.secret if kid == "hs-1" else self.private[kid]
        extra = dict(headers or {})
        if with_kid:
            extra.setdefault("kid", kid)
        return jwt.encode(claims, key, algorithm=alg or default_alg, headers=extra)


class JwksServer:
    """A JWKS document served over HTTP from a thread; tests change it between requests."""

    def __init__(self) -> None:
        self.body = b'{"keys": []}'
        self.status = 200
        self.hits = 0
        self.release = threading.Event()
        self.release.set()
        self.arrived = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.hits += 1
                owner.arrived.set()
                owner.release.wait(timeout=10)  # tests hold a fetch in flight with this
                body = owner.body
                self.send_response(owner.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        host, port = self._server.server_address[:2]
        self.url = f"http://{host!s}:{port}/.well-known/jwks.json"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()

    def serve(self, document: str, status: int = 200) -> None:
        self.body = document.encode()
        self.status = status

    def close(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


@pytest.fixture(scope="session")
def jwks_keyring() -> JwksKeyring:
    return JwksKeyring()


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer()
    try:
        yield server
    finally:
        server.close()
