"""IdentityMiddleware through both shells: ASGI (httpx.ASGITransport) and WSGI (WSGITransport).

A tiny wrapper plays the server's part: it puts the client certificate where uvicorn
(``scope["extensions"]["tls"]``) or a WSGI server (``environ["SSL_CLIENT_CERT"]``) would, and
keeps the scope / environ so tests can read the request record afterwards.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, MutableMapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from meshware.exceptions import ConfigurationError
from meshware.identity.bundle import PeerVerifier
from meshware.identity.identity import Identity, IdentitySource
from meshware.identity.resolve import IdentityResolver
from meshware.identity.spiffe import SpiffeId
from meshware.inbound.asgi.identity import IdentityMiddleware as AsgiIdentity
from meshware.inbound.record import IDENTITY_KEY, RECORD_KEY, RequestRecord
from meshware.inbound.wsgi.identity import IdentityMiddleware as WsgiIdentity
from tests.identity.certs import CHECKOUT, INGRESS, ORDERS, Minted, Pki

PROXY_IP = "10.1.2.3"
STRANGER_IP = "203.0.113.9"
ANONYMOUS: dict[str, str | None] = {"principal": None}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


class FrozenClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def echo(identity: Identity | None) -> tuple[bytes, list[tuple[str, str]]]:
    body: dict[str, str | None] = ANONYMOUS
    if identity is not None:
        body = {"principal": identity.principal, "source": identity.source, "via": identity.via}
    return json.dumps(body).encode(), [("content-type", "application/json")]


class Shell:
    """Builds one kind of middleware behind a pretend server and sends requests to it."""

    def __init__(self, kind: str, pki: Pki) -> None:
        self.kind = kind
        self.pki = pki
        self.app_calls = 0
        self.seen: list[MutableMapping[str, Any]] = []
        self.clock = FrozenClock()

    def resolver(self, *trusted: str) -> IdentityResolver:
        return IdentityResolver(
            PeerVerifier(self.pki.bundles()), trusted_proxies=trusted, clock=self.clock
        )

    def build(
        self,
        *,
        cert: Minted | None = None,
        resolver: IdentityResolver | None = None,
        **options: Any,
    ) -> Any:
        resolver = resolver or self.resolver()
        pem = cert.pem if cert is not None else None
        if self.kind == "asgi":
            return self._asgi_server(
                AsgiIdentity(self._asgi_app, resolver=resolver, **options), pem
            )
        return self._wsgi_server(WsgiIdentity(self._wsgi_app, resolver=resolver, **options), pem)

    # -- the application ----------------------------------------------------------------------

    async def _asgi_app(self, scope: Any, receive: Any, send: Any) -> None:
        self.app_calls += 1
        body, headers = echo(scope.get(IDENTITY_KEY))
        raw = [(k.encode(), v.encode()) for k, v in headers]
        await send({"type": "http.response.start", "status": 200, "headers": raw})
        await send({"type": "http.response.body", "body": body})

    def _wsgi_app(self, environ: Any, start_response: Any) -> Iterable[bytes]:
        self.app_calls += 1
        body, headers = echo(environ.get(IDENTITY_KEY))
        start_response("200 OK", headers)
        return [body]

    # -- the pretend servers ------------------------------------------------------------------

    def _asgi_server(self, middleware: Any, pem: str | None) -> Any:
        async def server(scope: Any, receive: Any, send: Any) -> None:
            if pem is not None:
                scope["extensions"] = {
                    "tls": {"server_cert": None, "client_cert_chain": [pem], "tls_version": 0x0304}
                }
            self.seen.append(scope)
            await middleware(scope, receive, send)

        return server

    def _wsgi_server(self, middleware: Any, pem: str | None) -> Any:
        def server(environ: Any, start_response: Any) -> Iterable[bytes]:
            if pem is not None:
                environ["SSL_CLIENT_CERT"] = pem
            self.seen.append(environ)
            return middleware(environ, start_response)  # type: ignore[no-any-return]

        return server

    async def request(
        self, app: Any, path: str = "/", *, peer: str = "127.0.0.1", xfcc: str | None = None
    ) -> httpx.Response:
        headers = {"x-forwarded-client-cert": xfcc} if xfcc is not None else {}
        if self.kind == "asgi":
            transport = httpx.ASGITransport(app=app, client=(peer, 40000))
            async with httpx.AsyncClient(transport=transport, base_url="http://orders") as client:
                return await client.get(path, headers=headers)
        wsgi = httpx.WSGITransport(app=app, remote_addr=peer)
        with httpx.Client(transport=wsgi, base_url="http://orders") as sync_client:
            return sync_client.get(path, headers=headers)

    @property
    def record(self) -> RequestRecord | None:
        record: RequestRecord | None = self.seen[-1].get(RECORD_KEY)
        return record


@pytest.fixture(params=["asgi", "wsgi"])
def shell(request: pytest.FixtureRequest, pki: Pki) -> Shell:
    return Shell(request.param, pki)


def xfcc_uri(uri: str) -> str:
    return f"By={INGRESS};Hash=abc;URI={uri}"


def json_error(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"] == "application/json"
    assert response.headers["content-length"] == str(len(response.content))
    data: dict[str, Any] = response.json()
    return data


# -- direct mTLS ---------------------------------------------------------------------------------


async def test_a_verified_callers_principal_reaches_the_app(shell: Shell, pki: Pki) -> None:
    cert = pki.ca.good(CHECKOUT)

    response = await shell.request(shell.build(cert=cert))

    source: IdentitySource = "tls" if shell.kind == "asgi" else "ssl-client-cert"
    assert response.status_code == 200
    assert response.json() == {
        "principal": "cluster.local/ns/shop/sa/checkout",
        "source": source,
        "via": None,
    }
    assert shell.record is not None
    assert shell.record.identity == Identity(
        SpiffeId.parse(CHECKOUT), source, not_after=cert.cert.not_valid_after_utc
    )
    assert shell.record.identity_error is None


async def test_no_certificate_is_anonymous(shell: Shell) -> None:
    response = await shell.request(shell.build())

    assert response.status_code == 200
    assert response.json() == ANONYMOUS
    assert IDENTITY_KEY not in shell.seen[-1]
    assert shell.record is None  # nothing to note: no record is created
    assert shell.app_calls == 1


async def test_require_identity_refuses_anonymous_callers(shell: Shell) -> None:
    response = await shell.request(shell.build(require_identity=True), "/api/orders")

    assert response.status_code == 403
    assert json_error(response) == {
        "status": 403,
        "error": "forbidden",
        "detail": "a verified peer identity (mTLS) is required",
    }
    assert shell.app_calls == 0
    assert shell.record is not None
    assert shell.record.identity is None
    assert shell.record.identity_error == "no-identity"


@pytest.mark.parametrize("path", ["/livez", "/readyz"])
async def test_require_identity_exempts_health_probes(shell: Shell, path: str) -> None:
    response = await shell.request(shell.build(require_identity=True), path)

    assert response.status_code == 200
    assert response.json() == ANONYMOUS


async def test_exempt_paths_are_exact_and_configurable(shell: Shell) -> None:
    app = shell.build(require_identity=True, exempt_paths=["/metrics"])

    assert (await shell.request(app, "/metrics")).status_code == 200
    assert (await shell.request(app, "/livez")).status_code == 403
    assert (await shell.request(app, "/metrics/x")).status_code == 403


async def test_require_identity_admits_a_verified_caller(shell: Shell, pki: Pki) -> None:
    response = await shell.request(shell.build(cert=pki.ca.good(), require_identity=True))

    assert response.status_code == 200
    assert response.json()["principal"] == "cluster.local/ns/default/sa/orders"


@pytest.mark.parametrize(
    ("make", "reason", "detail"),
    [
        (lambda p: p.ca.expired(), "expired", "the certificate expired at "),
        (lambda p: p.ca.not_yet_valid(), "not-yet-valid", "the certificate is not valid before "),
        (
            lambda p: p.rogue.good(),
            "untrusted",
            "the certificate does not chain to a CA of trust domain 'cluster.local'",
        ),
        (
            lambda p: p.other.good(ORDERS),
            "untrusted",
            "the certificate does not chain to a CA of trust domain 'cluster.local'",
        ),
        (
            lambda p: p.ca.good("spiffe://nowhere.td/ns/a/sa/b"),
            "unknown-trust-domain",
            "no trust bundle for trust domain 'nowhere.td'",
        ),
        (lambda p: p.ca.dns_only(), "no-uri-san", "the certificate has no URI SAN"),
        (lambda p: p.ca.two_uris(), "multiple-uri-sans", "the certificate has 2 URI SANs"),
        (lambda p: p.ca.self_signed(), "untrusted", "does not chain to a CA"),
    ],
    ids=["expired", "not-yet-valid", "wrong-ca", "other-td-ca", "unknown-td", "dns-only",
         "two-uris", "self-signed"],
)  # fmt: skip
async def test_a_refused_certificate_gets_403_and_the_app_is_not_called(
    shell: Shell, pki: Pki, make: Any, reason: str, detail: str
) -> None:
    response = await shell.request(shell.build(cert=make(pki)))

    assert response.status_code == 403
    body = json_error(response)
    assert body["status"] == 403
    assert body["error"] == "forbidden"
    assert body["reason"] == reason
    assert body["detail"].startswith("peer identity refused: ")
    assert detail in body["detail"]
    assert shell.app_calls == 0
    assert shell.record is not None
    assert shell.record.identity is None
    assert shell.record.identity_error == reason


async def test_a_refused_certificate_is_refused_even_on_exempt_paths(
    shell: Shell, pki: Pki
) -> None:
    response = await shell.request(shell.build(cert=pki.ca.expired()), "/livez")

    assert response.status_code == 403
    assert json_error(response)["reason"] == "expired"


# -- x-forwarded-client-cert ---------------------------------------------------------------------


async def test_xfcc_from_an_untrusted_peer_is_ignored_counted_and_logged(
    shell: Shell, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="meshware.identity")
    resolver = shell.resolver(PROXY_IP)

    response = await shell.request(
        shell.build(resolver=resolver), peer=STRANGER_IP, xfcc=xfcc_uri(CHECKOUT)
    )

    assert response.status_code == 200
    assert response.json() == ANONYMOUS
    assert resolver.failures == {"untrusted-xfcc": 1}
    assert [r.getMessage() for r in caplog.records if r.name == "meshware.identity"] == [
        f"ignored x-forwarded-client-cert from untrusted peer {STRANGER_IP}"
    ]
    assert shell.record is not None
    assert shell.record.identity is None
    assert shell.record.identity_error == "untrusted-xfcc"


async def test_xfcc_from_an_untrusted_peer_leaves_its_own_identity(shell: Shell, pki: Pki) -> None:
    resolver = shell.resolver(INGRESS)

    response = await shell.request(
        shell.build(cert=pki.ca.good(ORDERS), resolver=resolver, require_identity=True),
        peer=STRANGER_IP,
        xfcc=xfcc_uri(CHECKOUT),
    )

    assert response.status_code == 200
    assert response.json()["principal"] == "cluster.local/ns/default/sa/orders"
    assert response.json()["via"] is None
    assert resolver.failures == {"untrusted-xfcc": 1}
    assert shell.record is not None
    assert shell.record.identity is not None
    assert shell.record.identity.spiffe_id.uri == ORDERS
    assert shell.record.identity_error == "untrusted-xfcc"


async def test_xfcc_spoofing_is_logged_once_per_interval(
    shell: Shell, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="meshware.identity")
    resolver = shell.resolver(PROXY_IP)
    app = shell.build(resolver=resolver)

    for _ in range(25):
        response = await shell.request(app, peer=STRANGER_IP, xfcc=xfcc_uri(CHECKOUT))
        assert response.json() == ANONYMOUS

    lines = [r.getMessage() for r in caplog.records if r.name == "meshware.identity"]
    assert lines == [f"ignored x-forwarded-client-cert from untrusted peer {STRANGER_IP}"]
    assert resolver.failures == {"untrusted-xfcc": 25}

    shell.clock.now += 10.0
    await shell.request(app, peer=STRANGER_IP, xfcc=xfcc_uri(CHECKOUT))

    lines = [r.getMessage() for r in caplog.records if r.name == "meshware.identity"]
    assert lines[1:] == [
        f"ignored x-forwarded-client-cert from untrusted peer {STRANGER_IP} "
        "(24 similar events not logged)"
    ]


async def test_xfcc_from_a_trusted_network_is_believed(shell: Shell) -> None:
    resolver = shell.resolver("10.0.0.0/8")

    response = await shell.request(
        shell.build(resolver=resolver), peer=PROXY_IP, xfcc=xfcc_uri(CHECKOUT)
    )

    assert response.status_code == 200
    assert response.json() == {
        "principal": "cluster.local/ns/shop/sa/checkout",
        "source": "xfcc",
        "via": PROXY_IP,
    }
    assert not resolver.failures
    assert shell.record is not None
    assert shell.record.identity == Identity(SpiffeId.parse(CHECKOUT), "xfcc", via=PROXY_IP)
    assert shell.record.identity_error is None


async def test_xfcc_from_a_trusted_proxy_identity_is_believed(shell: Shell, pki: Pki) -> None:
    response = await shell.request(
        shell.build(cert=pki.ca.good(INGRESS), resolver=shell.resolver(INGRESS)),
        peer=STRANGER_IP,
        xfcc=xfcc_uri(CHECKOUT),
    )

    assert response.status_code == 200
    assert response.json() == {
        "principal": "cluster.local/ns/shop/sa/checkout",
        "source": "xfcc",
        "via": INGRESS,
    }


async def test_xfcc_with_a_verified_cert_is_believed(shell: Shell, pki: Pki) -> None:
    cert = pki.ca.good(CHECKOUT)
    header = f'Hash=abc;Cert="{quote(cert.pem, safe="")}";URI={CHECKOUT}'

    response = await shell.request(
        shell.build(resolver=shell.resolver(PROXY_IP)), peer=PROXY_IP, xfcc=header
    )

    assert response.status_code == 200
    assert response.json()["principal"] == "cluster.local/ns/shop/sa/checkout"
    assert shell.record is not None
    assert shell.record.identity is not None
    assert shell.record.identity.not_after == cert.cert.not_valid_after_utc


async def test_xfcc_naming_an_unknown_trust_domain_is_refused(shell: Shell) -> None:
    response = await shell.request(
        shell.build(resolver=shell.resolver(PROXY_IP)),
        peer=PROXY_IP,
        xfcc=xfcc_uri("spiffe://elsewhere.td/ns/a/sa/b"),
    )

    assert response.status_code == 403
    assert json_error(response) == {
        "status": 403,
        "error": "forbidden",
        "detail": "peer identity refused: x-forwarded-client-cert names trust domain "
        "'elsewhere.td', which has no trust bundle here",
        "reason": "unknown-trust-domain",
    }
    assert shell.app_calls == 0
    assert shell.record is not None
    assert shell.record.identity_error == "unknown-trust-domain"


@pytest.mark.parametrize(
    ("header", "reason", "detail"),
    [
        (
            'URI="spiffe://cluster.local/ns/shop/sa/checkout',
            "xfcc-unbalanced-quote",
            "x-forwarded-client-cert: unbalanced quote",
        ),
        (
            "URI=spiffe://cluster.local/ns/a/sa/b;Role=admin",
            "xfcc-unknown-key",
            "x-forwarded-client-cert element 0: unknown key 'Role' (expected one of "
            "By, Hash, Cert, Chain, Subject, URI, DNS)",
        ),
        (
            "URI=spiffe://cluster.local/ns/a/sa/b,,",
            "xfcc-malformed",
            "x-forwarded-client-cert element 1 is empty",
        ),
    ],
)
async def test_malformed_xfcc_from_a_trusted_proxy_is_400(
    shell: Shell, header: str, reason: str, detail: str
) -> None:
    response = await shell.request(
        shell.build(resolver=shell.resolver(PROXY_IP)), peer=PROXY_IP, xfcc=header
    )

    assert response.status_code == 400
    assert json_error(response) == {
        "status": 400,
        "error": "bad_request",
        "detail": detail,
        "reason": reason,
    }
    assert shell.app_calls == 0
    assert shell.record is not None
    assert shell.record.identity_error == reason


async def test_malformed_xfcc_from_an_untrusted_peer_is_only_ignored(shell: Shell) -> None:
    response = await shell.request(
        shell.build(resolver=shell.resolver(PROXY_IP)), peer=STRANGER_IP, xfcc='URI="x'
    )

    assert response.status_code == 200
    assert response.json() == ANONYMOUS


async def test_xfcc_whose_uri_does_not_match_its_cert_is_refused(shell: Shell, pki: Pki) -> None:
    cert = pki.ca.good(CHECKOUT)
    header = f'Hash=abc;Cert="{quote(cert.pem, safe="")}";URI={ORDERS}'

    response = await shell.request(
        shell.build(resolver=shell.resolver(PROXY_IP)), peer=PROXY_IP, xfcc=header
    )

    assert response.status_code == 403
    assert json_error(response) == {
        "status": 403,
        "error": "forbidden",
        "detail": "peer identity refused: x-forwarded-client-cert URI does not match its Cert",
        "reason": "xfcc-uri-mismatch",
    }
    assert shell.app_calls == 0


async def test_xfcc_with_a_cert_of_a_wrong_ca_is_refused(shell: Shell, pki: Pki) -> None:
    cert = pki.rogue.good(CHECKOUT)
    header = f'Cert="{quote(cert.pem, safe="")}";URI={CHECKOUT}'

    response = await shell.request(
        shell.build(resolver=shell.resolver(PROXY_IP)), peer=PROXY_IP, xfcc=header
    )

    assert response.status_code == 403
    assert json_error(response)["reason"] == "untrusted"


# -- construction --------------------------------------------------------------------------------


async def test_from_bundle(shell: Shell, pki: Pki) -> None:
    factory: Any = AsgiIdentity if shell.kind == "asgi" else WsgiIdentity
    inner = shell._asgi_app if shell.kind == "asgi" else shell._wsgi_app
    middleware = factory.from_bundle(
        inner, bundle=str(pki.bundle_file()), trusted_proxies=[PROXY_IP], require_identity=True
    )

    assert middleware.require_identity is True
    assert middleware.exempt_paths == frozenset({"/livez", "/readyz"})
    assert middleware.resolver.verifier.bundles.trust_domains == frozenset(
        {"cluster.local", "other.td"}
    )
    app = (
        shell._asgi_server(middleware, None)
        if shell.kind == "asgi"
        else shell._wsgi_server(middleware, None)
    )
    believed = await shell.request(app, peer=PROXY_IP, xfcc=xfcc_uri(CHECKOUT))
    refused = await shell.request(app, peer=STRANGER_IP)

    assert believed.json()["principal"] == "cluster.local/ns/shop/sa/checkout"
    assert refused.status_code == 403


def test_from_bundle_with_a_missing_file_is_a_configuration_error(tmp_path: Path) -> None:
    async def asgi_app(scope: Any, receive: Any, send: Any) -> None: ...

    def wsgi_app(environ: Any, start_response: Any) -> Iterable[bytes]:
        return []

    missing = tmp_path / "missing.pem"
    message = f"bundle: cannot read trust bundle {missing}: No such file or directory"
    with pytest.raises(ConfigurationError) as info:
        AsgiIdentity.from_bundle(asgi_app, bundle=str(missing))
    assert str(info.value) == message
    with pytest.raises(ConfigurationError) as info:
        WsgiIdentity.from_bundle(wsgi_app, bundle=str(missing))
    assert str(info.value) == message


# -- ASGI-only scope types ----------------------------------------------------------------------


async def test_lifespan_scopes_pass_through_untouched(pki: Pki) -> None:
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope)

    resolver = IdentityResolver(PeerVerifier(pki.bundles()))
    middleware = AsgiIdentity(app, resolver=resolver, require_identity=True)
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}}

    async def receive() -> Any:
        raise AssertionError("the middleware must not receive")

    async def send(message: Any) -> None:
        raise AssertionError("the middleware must not send")

    await middleware(scope, receive, send)

    assert seen == [scope]
    assert seen[0] is scope
    assert scope == {"type": "lifespan", "asgi": {"version": "3.0"}}
    assert not resolver.failures


async def test_a_refused_websocket_is_closed_with_policy_violation(pki: Pki) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("the app must not be called")

    middleware = AsgiIdentity(app, resolver=IdentityResolver(PeerVerifier(pki.bundles())))
    scope: dict[str, Any] = {
        "type": "websocket",
        "path": "/ws",
        "headers": [],
        "client": ("127.0.0.1", 1),
        "extensions": {"tls": {"client_cert_chain": [pki.ca.expired().pem]}},
    }
    sent: list[Any] = []

    async def receive() -> Any:
        return {"type": "websocket.connect"}

    async def send(message: Any) -> None:
        sent.append(message)

    await middleware(scope, receive, send)

    assert sent == [{"type": "websocket.close", "code": 1008}]
    assert scope[RECORD_KEY].identity_error == "expired"


async def test_a_verified_websocket_reaches_the_app(pki: Pki) -> None:
    seen: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope[IDENTITY_KEY].principal)

    middleware = AsgiIdentity(app, resolver=IdentityResolver(PeerVerifier(pki.bundles())))
    scope = {
        "type": "websocket",
        "path": "/ws",
        "headers": [],
        "client": ("127.0.0.1", 1),
        "extensions": {"tls": {"client_cert_chain": [pki.ca.good(CHECKOUT).pem]}},
    }

    async def receive() -> Any:
        return {"type": "websocket.connect"}

    async def send(message: Any) -> None:
        raise AssertionError("nothing to send")

    await middleware(scope, receive, send)

    assert seen == ["cluster.local/ns/shop/sa/checkout"]
