"""The resolver chain over plain ASGI scopes and WSGI environs."""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from meshware.exceptions import (
    CertificateRejected,
    ConfigurationError,
    InvalidSpiffeId,
    InvalidXfcc,
)
from meshware.identity.bundle import PeerVerifier
from meshware.identity.identity import Identity
from meshware.identity.resolve import IdentityResolver, Resolution, TrustedProxies
from meshware.identity.spiffe import SpiffeId
from tests.identity.certs import CHECKOUT, INGRESS, ORDERS, Minted, Pki

PROXY_IP = "10.1.2.3"
STRANGER_IP = "203.0.113.9"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def orders(pki: Pki) -> Minted:
    return pki.ca.good(ORDERS, hours=2)


@pytest.fixture(scope="module")
def checkout(pki: Pki) -> Minted:
    return pki.ca.good(CHECKOUT, hours=2)


@pytest.fixture(scope="module")
def ingress(pki: Pki) -> Minted:
    return pki.ca.good(INGRESS, hours=2)


class MonotonicClock:
    def __init__(self) -> None:
        self.now = 5.0  # close to zero, as a monotonic clock may be early after boot

    def __call__(self) -> float:
        return self.now


def resolver(pki: Pki, *trusted: str, clock: MonotonicClock | None = None) -> IdentityResolver:
    return IdentityResolver(
        PeerVerifier(pki.bundles()), trusted_proxies=trusted, clock=clock or MonotonicClock()
    )


def scope(
    *,
    chain: list[str] | None = None,
    xfcc: Sequence[str] = (),
    client: tuple[str, int] | None = ("127.0.0.1", 50000),
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "type": "http",
        "path": "/",
        "headers": [(b"host", b"orders")]
        + [(b"x-forwarded-client-cert", v.encode()) for v in xfcc],
        "client": client,
    }
    if chain is not None:
        result["extensions"] = {"tls": {"client_cert_chain": chain, "server_cert": None}}
    return result


def environ(
    *, pem: str | None = None, xfcc: str | None = None, remote: str = "127.0.0.1"
) -> dict[str, Any]:
    result: dict[str, Any] = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "REMOTE_ADDR": remote}
    if pem is not None:
        result["SSL_CLIENT_CERT"] = pem
    if xfcc is not None:
        result["HTTP_X_FORWARDED_CLIENT_CERT"] = xfcc
    return result


def xfcc_uri(uri: str, *, by: str = INGRESS) -> str:
    return f"By={by};Hash=abc;URI={uri}"


def xfcc_cert(cert: Minted, *uris: str) -> str:
    return f'Hash=abc;Cert="{quote(cert.pem, safe="")}"' + "".join(f";URI={u}" for u in uris)


# -- TrustedProxies ----------------------------------------------------------------------------


def test_trusted_proxies_parse_networks_addresses_and_ids() -> None:
    proxies = TrustedProxies.parse(["10.0.0.0/8", "127.0.0.1", "fd00::/8", INGRESS])

    assert proxies.networks == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("127.0.0.1/32"),
        ipaddress.ip_network("fd00::/8"),
    )
    assert proxies.ids == frozenset({INGRESS})
    assert proxies


def test_a_host_address_with_a_prefix_is_its_network() -> None:
    assert TrustedProxies.parse(["10.1.2.3/16"]).networks == (ipaddress.ip_network("10.1.0.0/16"),)


def test_no_trusted_proxies_is_falsy_and_trusts_nobody() -> None:
    nobody = TrustedProxies.parse([])

    assert not nobody
    assert not nobody.trusts("127.0.0.1", None)


def test_trusted_proxies_refuse_a_bad_entry() -> None:
    with pytest.raises(ConfigurationError) as info:
        TrustedProxies.parse(["10.0.0.0/8", "proxy.internal"])

    assert info.value.field == "trusted_proxies[1]"
    assert info.value.value == "proxy.internal"
    assert str(info.value) == (
        "trusted_proxies[1]: expected an IP address, a CIDR network or a spiffe:// id"
    )


def test_trusted_proxies_refuse_an_invalid_spiffe_id() -> None:
    with pytest.raises(InvalidSpiffeId) as info:
        TrustedProxies.parse(["spiffe://Cluster.Local/ns/a/sa/b"])
    assert info.value.rule == "trust-domain-chars"


@pytest.mark.parametrize(
    ("ip", "peer", "trusted"),
    [
        ("10.9.8.7", None, True),
        ("11.0.0.1", None, False),
        ("fd00::1", None, True),
        ("fe80::1", None, False),
        ("not-an-ip", None, False),
        (None, None, False),
        (None, INGRESS, True),
        ("11.0.0.1", INGRESS, True),
        ("11.0.0.1", ORDERS, False),
    ],
)
def test_trusts(ip: str | None, peer: str | None, trusted: bool) -> None:
    proxies = TrustedProxies.parse(["10.0.0.0/8", "fd00::/8", INGRESS])
    identity = Identity(SpiffeId.parse(peer), "tls") if peer else None

    assert proxies.trusts(ip, identity) is trusted


# -- ASGI: the TLS extension -------------------------------------------------------------------


def test_no_certificate_and_no_header_is_anonymous(pki: Pki) -> None:
    assert resolver(pki).resolve_scope(scope()) == Resolution()
    assert resolver(pki).resolve_scope(scope(chain=[])) == Resolution()
    assert resolver(pki).resolve_scope({"type": "http", "headers": []}) == Resolution()


def test_a_verified_certificate_from_the_tls_extension(pki: Pki, orders: Minted) -> None:
    r = resolver(pki)

    resolution = r.resolve_scope(scope(chain=[orders.pem]))

    assert resolution == Resolution(
        identity=Identity(SpiffeId.parse(ORDERS), "tls", not_after=orders.cert.not_valid_after_utc)
    )
    assert not r.failures


def test_a_refused_certificate_from_the_tls_extension(pki: Pki) -> None:
    r = resolver(pki)

    resolution = r.resolve_scope(scope(chain=[pki.rogue.good().pem]))

    assert resolution.identity is None
    assert isinstance(resolution.error, CertificateRejected)
    assert resolution.error.reason == "untrusted"
    assert r.failures == {"untrusted": 1}


# -- WSGI: SSL_CLIENT_CERT and the server's TLS socket ------------------------------------------


def test_ssl_client_cert(pki: Pki, orders: Minted) -> None:
    resolution = resolver(pki).resolve_environ(environ(pem=orders.pem))

    assert resolution.identity is not None
    assert resolution.identity.source == "ssl-client-cert"
    assert resolution.identity.principal == "cluster.local/ns/default/sa/orders"


def test_an_empty_ssl_client_cert_is_no_certificate(pki: Pki) -> None:
    assert resolver(pki).resolve_environ(environ(pem="")) == Resolution()


def test_a_refused_ssl_client_cert(pki: Pki) -> None:
    r = resolver(pki)

    resolution = r.resolve_environ(environ(pem=pki.ca.expired().pem))

    assert resolution.error is not None
    assert resolution.error.reason == "expired"
    assert r.failures == {"expired": 1}


@pytest.fixture
def tls_socket_pair(pki: Pki, tmp_path: Path) -> Iterator[Any]:
    """Real TLS over a socketpair; yields a function (client cert or None) -> server socket."""
    opened: list[socket.socket] = []
    server_cert, server_key = pki.ca.good(ORDERS).write(tmp_path, "server")

    def connect(client: Minted | None) -> ssl.SSLSocket:
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(server_cert, server_key)
        server_ctx.load_verify_locations(cadata=pki.bundle_pem.decode())
        server_ctx.verify_mode = ssl.CERT_OPTIONAL
        client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        client_ctx.check_hostname = False
        client_ctx.load_verify_locations(cadata=pki.bundle_pem.decode())
        if client is not None:
            cert, key = client.write(tmp_path, "client")
            client_ctx.load_cert_chain(cert, key)
        a, b = socket.socketpair()
        server = server_ctx.wrap_socket(a, server_side=True, do_handshake_on_connect=False)
        client_sock = client_ctx.wrap_socket(b, do_handshake_on_connect=False)
        opened.extend([server, client_sock])
        worker = threading.Thread(target=client_sock.do_handshake)
        worker.start()
        server.do_handshake()
        worker.join(timeout=10)
        return server

    yield connect
    for sock in opened:
        sock.close()


def test_the_gunicorn_tls_socket(pki: Pki, checkout: Minted, tls_socket_pair: Any) -> None:
    server = tls_socket_pair(checkout)

    resolution = resolver(pki).resolve_environ({"gunicorn.socket": server, "REMOTE_ADDR": "x"})

    assert resolution.identity == Identity(
        SpiffeId.parse(CHECKOUT), "tls-socket", not_after=checkout.cert.not_valid_after_utc
    )


def test_a_tls_socket_without_a_client_certificate_wins_over_ssl_client_cert(
    pki: Pki, checkout: Minted, tls_socket_pair: Any
) -> None:
    server = tls_socket_pair(None)
    env = environ(pem=checkout.pem)
    env["gunicorn.socket"] = server

    assert resolver(pki).resolve_environ(env) == Resolution()


def test_a_plain_socket_falls_back_to_ssl_client_cert(pki: Pki, checkout: Minted) -> None:
    a, b = socket.socketpair()
    with a, b:
        env = environ(pem=checkout.pem)
        env["gunicorn.socket"] = a

        resolution = resolver(pki).resolve_environ(env)

    assert resolution.identity is not None
    assert resolution.identity.source == "ssl-client-cert"


# -- x-forwarded-client-cert -------------------------------------------------------------------


def test_xfcc_from_an_untrusted_peer_is_ignored_and_counted(pki: Pki, orders: Minted) -> None:
    r = resolver(pki, PROXY_IP)

    anonymous = r.resolve_scope(scope(xfcc=[xfcc_uri(CHECKOUT)], client=(STRANGER_IP, 1)))
    direct = r.resolve_scope(
        scope(chain=[orders.pem], xfcc=[xfcc_uri(CHECKOUT)], client=(STRANGER_IP, 1))
    )
    wsgi = r.resolve_environ(environ(xfcc=xfcc_uri(CHECKOUT), remote=STRANGER_IP))

    assert anonymous == Resolution(ignored="untrusted-xfcc")
    assert direct.identity is not None
    assert direct.identity.spiffe_id.uri == ORDERS
    assert direct.identity.source == "tls"
    assert direct.ignored == "untrusted-xfcc"
    assert wsgi == Resolution(ignored="untrusted-xfcc")
    assert r.failures == {"untrusted-xfcc": 3}


def test_xfcc_is_ignored_when_nobody_is_trusted(pki: Pki) -> None:
    r = resolver(pki)

    resolution = r.resolve_scope(scope(xfcc=[xfcc_uri(CHECKOUT)], client=("127.0.0.1", 1)))

    assert resolution == Resolution(ignored="untrusted-xfcc")


def test_xfcc_without_a_client_address_is_untrusted(pki: Pki) -> None:
    resolution = resolver(pki, "0.0.0.0/0").resolve_scope(
        scope(xfcc=[xfcc_uri(CHECKOUT)], client=None)
    )

    assert resolution == Resolution(ignored="untrusted-xfcc")


def test_xfcc_from_a_trusted_network(pki: Pki) -> None:
    r = resolver(pki, "10.0.0.0/8")

    asgi = r.resolve_scope(scope(xfcc=[xfcc_uri(CHECKOUT)], client=(PROXY_IP, 1)))
    wsgi = r.resolve_environ(environ(xfcc=xfcc_uri(CHECKOUT), remote=PROXY_IP))

    expected = Resolution(identity=Identity(SpiffeId.parse(CHECKOUT), "xfcc", via=PROXY_IP))
    assert asgi == wsgi == expected
    assert not r.failures


def test_xfcc_from_a_trusted_proxy_identity_takes_precedence(pki: Pki, ingress: Minted) -> None:
    r = resolver(pki, INGRESS)

    resolution = r.resolve_scope(
        scope(chain=[ingress.pem], xfcc=[xfcc_uri(CHECKOUT)], client=(STRANGER_IP, 1))
    )

    assert resolution == Resolution(
        identity=Identity(SpiffeId.parse(CHECKOUT), "xfcc", via=INGRESS)
    )


def test_a_proxy_identity_that_is_not_trusted_keeps_its_own_identity(
    pki: Pki, orders: Minted
) -> None:
    resolution = resolver(pki, INGRESS).resolve_scope(
        scope(chain=[orders.pem], xfcc=[xfcc_uri(CHECKOUT)], client=(STRANGER_IP, 1))
    )

    assert resolution.identity is not None
    assert resolution.identity.spiffe_id.uri == ORDERS
    assert resolution.ignored == "untrusted-xfcc"


def test_the_last_element_describes_the_nearest_proxys_client(pki: Pki) -> None:
    header = f"{xfcc_uri('spiffe://cluster.local/ns/edge/sa/far')},{xfcc_uri(CHECKOUT)}"

    resolution = resolver(pki, PROXY_IP).resolve_scope(scope(xfcc=[header], client=(PROXY_IP, 1)))

    assert resolution.identity is not None
    assert resolution.identity.spiffe_id.uri == CHECKOUT


def test_repeated_xfcc_header_lines_are_one_list(pki: Pki) -> None:
    lines = [xfcc_uri("spiffe://cluster.local/ns/edge/sa/far"), xfcc_uri(CHECKOUT)]

    resolution = resolver(pki, PROXY_IP).resolve_scope(scope(xfcc=lines, client=(PROXY_IP, 1)))

    assert resolution.identity is not None
    assert resolution.identity.spiffe_id.uri == CHECKOUT


def test_xfcc_with_a_verified_cert(pki: Pki, checkout: Minted) -> None:
    resolution = resolver(pki, PROXY_IP).resolve_environ(
        environ(xfcc=xfcc_cert(checkout, CHECKOUT), remote=PROXY_IP)
    )

    assert resolution == Resolution(
        identity=Identity(
            SpiffeId.parse(CHECKOUT),
            "xfcc",
            not_after=checkout.cert.not_valid_after_utc,
            via=PROXY_IP,
        )
    )


def test_xfcc_with_a_cert_and_no_uri(pki: Pki, checkout: Minted) -> None:
    resolution = resolver(pki, PROXY_IP).resolve_environ(
        environ(xfcc=xfcc_cert(checkout), remote=PROXY_IP)
    )

    assert resolution.identity is not None
    assert resolution.identity.spiffe_id.uri == CHECKOUT


@pytest.mark.parametrize(
    ("header", "reason", "message"),
    [
        (
            lambda p, c: xfcc_cert(c, ORDERS),
            "xfcc-uri-mismatch",
            "x-forwarded-client-cert URI does not match its Cert",
        ),
        (
            lambda p, c: xfcc_cert(c, CHECKOUT, ORDERS),
            "xfcc-uri-mismatch",
            "x-forwarded-client-cert URI does not match its Cert",
        ),
        (
            lambda p, c: xfcc_cert(p.rogue.good(CHECKOUT), CHECKOUT),
            "untrusted",
            "the certificate does not chain to a CA of trust domain 'cluster.local'",
        ),
        (
            lambda p, c: xfcc_cert(p.ca.expired(CHECKOUT), CHECKOUT),
            "expired",
            "the certificate expired at",
        ),
        (
            lambda p, c: 'Cert="not%20a%20certificate";URI=' + CHECKOUT,
            "malformed",
            "unparseable certificate",
        ),
        (
            lambda p, c: xfcc_uri("spiffe://elsewhere.td/ns/a/sa/b"),
            "unknown-trust-domain",
            "x-forwarded-client-cert names trust domain 'elsewhere.td', which has no trust "
            "bundle here",
        ),
        (
            lambda p, c: 'By=x;Hash=abc;Subject="/CN=checkout"',
            "xfcc-no-spiffe-id",
            "x-forwarded-client-cert must name exactly one spiffe:// URI, found 0",
        ),
        (
            lambda p, c: "Hash=abc;URI=https://checkout.example.com",
            "xfcc-no-spiffe-id",
            "x-forwarded-client-cert must name exactly one spiffe:// URI, found 0",
        ),
        (
            lambda p, c: f"URI={CHECKOUT};URI={ORDERS}",
            "multiple-uri-sans",
            "x-forwarded-client-cert must name exactly one spiffe:// URI, found 2",
        ),
        (
            lambda p, c: "URI=spiffe://cluster.local/ns/a/sa/b%20c",
            "invalid-spiffe-id",
            "[percent-encoding]",
        ),
    ],
    ids=[
        "uri-mismatch",
        "extra-uri",
        "untrusted-cert",
        "expired-cert",
        "malformed-cert",
        "unknown-trust-domain",
        "no-uri",
        "no-spiffe-uri",
        "two-spiffe-uris",
        "invalid-spiffe-uri",
    ],
)
def test_xfcc_from_a_trusted_proxy_that_names_no_acceptable_identity_is_refused(
    pki: Pki, checkout: Minted, header: Any, reason: str, message: str
) -> None:
    r = resolver(pki, PROXY_IP)

    resolution = r.resolve_scope(scope(xfcc=[header(pki, checkout)], client=(PROXY_IP, 1)))

    assert resolution.identity is None
    assert isinstance(resolution.error, CertificateRejected)
    assert resolution.error.reason == reason
    assert message in str(resolution.error)
    assert r.failures == {reason: 1}


def test_malformed_xfcc_from_a_trusted_proxy_is_invalid_xfcc(pki: Pki) -> None:
    r = resolver(pki, PROXY_IP)

    resolution = r.resolve_environ(environ(xfcc='URI="unterminated', remote=PROXY_IP))

    assert isinstance(resolution.error, InvalidXfcc)
    assert resolution.error.reason == "xfcc-unbalanced-quote"
    assert r.failures == {"xfcc-unbalanced-quote": 1}


def test_a_refused_direct_certificate_wins_over_xfcc(pki: Pki) -> None:
    resolution = resolver(pki, PROXY_IP).resolve_scope(
        scope(chain=[pki.ca.expired(INGRESS).pem], xfcc=[xfcc_uri(CHECKOUT)], client=(PROXY_IP, 1))
    )

    assert resolution.error is not None
    assert resolution.error.reason == "expired"


# -- logging -------------------------------------------------------------------------------------


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "meshware.identity"]


def test_spoofing_is_logged_at_most_once_per_interval(
    pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="meshware.identity")
    clock = MonotonicClock()
    r = resolver(pki, PROXY_IP, clock=clock)
    spoof = scope(xfcc=[xfcc_uri(CHECKOUT)], client=(STRANGER_IP, 1))

    for _ in range(100):
        r.resolve_scope(spoof)
        clock.now += 0.05

    assert warnings_of(caplog) == [
        f"ignored x-forwarded-client-cert from untrusted peer {STRANGER_IP}"
    ]
    assert r.failures == {"untrusted-xfcc": 100}

    clock.now += 5.0  # 10.0 s after the first line
    r.resolve_scope(spoof)

    assert warnings_of(caplog)[1:] == [
        f"ignored x-forwarded-client-cert from untrusted peer {STRANGER_IP} "
        "(99 similar events not logged)"
    ]
    assert [r.levelname for r in caplog.records] == ["WARNING", "WARNING"]


def test_refusals_share_the_log_budget(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="meshware.identity")
    clock = MonotonicClock()
    r = resolver(pki, clock=clock)

    r.resolve_scope(scope(chain=[pki.rogue.good().pem]))
    r.resolve_environ(environ(pem=pki.ca.expired().pem))

    [line] = warnings_of(caplog)
    assert line.startswith(
        "refused peer identity: the certificate does not chain to a CA of trust domain "
        "'cluster.local'"
    )
    assert r.failures == {"untrusted": 1, "expired": 1}


def test_the_default_clock_logs_the_first_event(pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="meshware.identity")
    r = IdentityResolver(PeerVerifier(pki.bundles()))

    r.resolve_scope(scope(xfcc=[xfcc_uri(CHECKOUT)]))

    assert warnings_of(caplog) == ["ignored x-forwarded-client-cert from untrusted peer 127.0.0.1"]
