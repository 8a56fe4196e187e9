"""Request facts built from ASGI scopes and WSGI environs, once per request."""

from __future__ import annotations

import dataclasses
from typing import Any
from urllib.parse import unquote

from hypothesis import given
from hypothesis import strategies as st

from meshware.identity.identity import Identity
from meshware.identity.spiffe import SpiffeId
from meshware.inbound import facts as facts_module
from meshware.inbound.facts import (
    environ_headers,
    facts_from_environ,
    facts_from_scope,
    has_headers,
    host_without_port,
    raw_path_of_environ,
    raw_path_of_scope,
    scope_headers,
    updated,
)
from meshware.inbound.record import RECORD_KEY, RequestRecord
from meshware.policy.facts import RequestFacts
from meshware.policy.paths import InvalidPath, normalize_path

PATH_REASONS = {
    "too-long",
    "control-character",
    "invalid-percent-encoding",
    "invalid-utf8",
    "escaped-slash",
    "backslash",
    "ambiguous-dot-segment",
}
CALLER = Identity(SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/checkout"), "tls")


def scope(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "type": "http",
        "method": "POST",
        "path": "/api/café",
        "raw_path": b"/api/caf%C3%A9",
        "query_string": b"a=1&b=2",
        "root_path": "",
        "headers": [
            (b"host", b"Orders.Shop:8443"),
            (b"x-env", b"prod"),
            (b"x-env", b"canary"),
            (b"cookie", b"a=1"),
            (b"cookie", b"b=2"),
        ],
        "server": ("10.0.0.1", 8443),
        "client": ("10.1.2.3", 51000),
    }
    base.update(overrides)
    return base


def environ(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "REQUEST_METHOD": "PUT",
        "SCRIPT_NAME": "",
        "PATH_INFO": "/api/caf\xc3\xa9",  # PEP 3333: the UTF-8 bytes, decoded as latin-1
        "QUERY_STRING": "x=%20y",
        "SERVER_NAME": "orders",
        "SERVER_PORT": "8080",
        "REMOTE_ADDR": "10.9.8.7",
        "HTTP_HOST": "orders.shop",
        "HTTP_X_API_KEY": "k-1",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": "12",
    }
    base.update(overrides)
    return base


# -- ASGI ------------------------------------------------------------------------------------


def test_facts_from_a_scope() -> None:
    record = RequestRecord(identity=CALLER, request_principal="iss/sub", route="/api/{x}")
    record.claims = {"scope": "read"}

    facts = facts_from_scope(scope(), record)

    assert facts == RequestFacts(
        method="POST",
        path="/api/caf%C3%A9",
        query="a=1&b=2",
        host="orders.shop",
        port=8443,
        headers={
            "host": "Orders.Shop:8443",
            "x-env": "prod, canary",
            "cookie": "a=1; b=2",
        },
        source_ip="10.1.2.3",
        source_principal="cluster.local/ns/shop/sa/checkout",
        source_namespace="shop",
        request_principal="iss/sub",
        claims={"scope": "read"},
        route="/api/{x}",
    )
    assert record.facts is facts


def test_facts_are_built_once_and_cached_on_the_record() -> None:
    s = scope()
    first = facts_from_scope(s)
    s["headers"] = []  # a later change to the scope is not read again

    assert facts_from_scope(s) is first
    assert s[RECORD_KEY].facts is first


def test_headers_are_collected_only_when_asked_for_then_added_later() -> None:
    s = scope()
    record = RequestRecord()

    lean = facts_from_scope(s, record, headers=False)

    assert not has_headers(lean)
    assert lean.headers == {}
    assert lean.host == "orders.shop"  # the host is read without collecting the headers
    assert facts_from_scope(s, record, headers=False) is lean

    full = facts_from_scope(s, record)

    assert has_headers(full)
    assert full.headers["x-env"] == "prod, canary"
    assert record.facts is full
    assert full.path == lean.path


def test_cached_facts_follow_what_inner_layers_learn() -> None:
    s = scope()
    record = RequestRecord()
    facts = facts_from_scope(s, record)
    assert (facts.route, facts.request_principal, dict(facts.claims)) == (None, None, {})

    record.route = "/api/{name}"
    record.request_principal = "https://issuer/alice"
    record.claims = {"sub": "alice"}
    later = facts_from_scope(s, record)

    assert later.route == "/api/{name}"
    assert later.request_principal == "https://issuer/alice"
    assert later.claims == {"sub": "alice"}
    assert later.headers is facts.headers


def test_raw_path_prefers_raw_path_and_drops_a_query() -> None:
    assert raw_path_of_scope(scope(raw_path=b"/a%2Fb?x=1")) == "/a%2Fb"
    assert raw_path_of_scope(scope(raw_path=b"/caf\xc3\xa9")) == "/caf%C3%A9"
    assert raw_path_of_scope(scope(raw_path=None, path="/a b/é%")) == "/a%20b/%C3%A9%25"
    assert raw_path_of_scope({"type": "http"}) == "/"


def test_scope_without_server_client_or_host() -> None:
    facts = facts_from_scope(
        {"type": "http", "method": "GET", "path": "/", "headers": []}, RequestRecord()
    )

    assert (facts.host, facts.port, facts.source_ip, facts.query) == ("", None, None, "")


def test_a_websocket_scope_is_a_get() -> None:
    s = scope(type="websocket")
    del s["method"]

    assert facts_from_scope(s, RequestRecord()).method == "GET"


def test_scope_headers() -> None:
    assert scope_headers({"headers": [(b"x-a", b"1"), (b"x-b", b"\xe9")]}) == {
        "x-a": "1",
        "x-b": "\xe9",
    }
    assert scope_headers({"headers": [(b"x-a", b"1"), (b"x-b", b"2"), (b"x-a", b"3")]}) == {
        "x-a": "1, 3",
        "x-b": "2",
    }
    assert scope_headers({}) == {}


# -- WSGI ------------------------------------------------------------------------------------


def test_facts_from_an_environ() -> None:
    record = RequestRecord(identity=CALLER)

    facts = facts_from_environ(environ(), record)

    assert facts == RequestFacts(
        method="PUT",
        path="/api/caf%C3%A9",
        query="x=%20y",
        host="orders.shop",
        port=8080,
        headers={
            "host": "orders.shop",
            "x-api-key": "k-1",
            "content-type": "application/json",
            "content-length": "12",
        },
        source_ip="10.9.8.7",
        source_principal="cluster.local/ns/shop/sa/checkout",
        source_namespace="shop",
    )
    assert record.facts is facts
    assert facts_from_environ(environ(), record) is facts


def test_environ_path_prefers_the_raw_uri() -> None:
    # gunicorn's RAW_URI keeps what PATH_INFO has lost: the escaped slash, the dot segments.
    assert raw_path_of_environ(environ(RAW_URI="/a%2Fb/../c?q=1", PATH_INFO="/a/c")) == (
        "/a%2Fb/../c"
    )
    assert raw_path_of_environ(environ(REQUEST_URI="/x%20y", PATH_INFO="/x y")) == "/x%20y"
    assert raw_path_of_environ(environ(RAW_URI="http://orders/p?q", PATH_INFO="/p")) == "/p"


def test_environ_path_is_encoded_again_with_the_script_name() -> None:
    assert raw_path_of_environ(environ(SCRIPT_NAME="/app", PATH_INFO="/a b;c=1")) == (
        "/app/a%20b;c=1"
    )
    assert raw_path_of_environ(environ(PATH_INFO="/100%")) == "/100%25"
    assert raw_path_of_environ(environ(PATH_INFO="")) == "/"


def test_environ_without_port_or_peer() -> None:
    env = environ(SERVER_PORT="", REMOTE_ADDR="")
    facts = facts_from_environ(env, RequestRecord(), headers=False)

    assert (facts.port, facts.source_ip, has_headers(facts)) == (None, None, False)


def test_environ_headers() -> None:
    assert environ_headers({"HTTP_X_B3_TRACEID": "1", "wsgi.input": None}) == {"x-b3-traceid": "1"}


def test_updated_is_replace() -> None:
    facts = facts_from_scope(scope(), RequestRecord(identity=CALLER))

    changed = updated(facts, path="/other", route="/r")

    assert changed == dataclasses.replace(facts, path="/other", route="/r")
    assert facts.path == "/api/caf%C3%A9"


def test_the_fast_constructor_builds_what_the_dataclass_would() -> None:
    values = ("GET", "/a", "q", "h", 1, {"a": "1"}, "1.2.3.4", "p", "ns", "rp", {"c": 1}, "/r")

    fast = facts_module._make(*values)
    slow = facts_module._make_slow(*values)

    assert fast == slow
    assert type(fast) is RequestFacts
    assert repr(fast) == repr(slow)


# -- the host --------------------------------------------------------------------------------


def test_host_without_port() -> None:
    assert host_without_port("API.Example.com:8443") == "api.example.com"
    assert host_without_port("example.com") == "example.com"
    assert host_without_port("[::1]:8000") == "[::1]"
    assert host_without_port("[::1]") == "[::1]"
    assert host_without_port("::1") == "::1"
    assert host_without_port("") == ""


# -- properties -------------------------------------------------------------------------------


@given(st.text(max_size=80))
def test_host_without_port_never_fails(host: str) -> None:
    result = host_without_port(host)
    assert result == result.lower()
    assert len(result) <= len(host)


@given(
    st.binary(max_size=120),
    st.binary(max_size=40),
    st.lists(st.tuples(st.binary(max_size=20), st.binary(max_size=40)), max_size=6),
)
def test_facts_from_any_scope(raw: bytes, query: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    s = scope(raw_path=raw, query_string=query, headers=headers)

    facts = facts_from_scope(s, RequestRecord())

    assert facts.path.isascii()
    assert "?" not in facts.path
    # The path is percent-encoded as sent: decoding it gives the raw bytes back.
    if raw:
        expected = raw.split(b"?", 1)[0] or b"/"
        assert unquote(facts.path, encoding="latin-1") == unquote(
            expected.decode("latin-1"), encoding="latin-1"
        )
    # Whatever arrives, authorization gets a path it can normalize or refuse with a reason.
    try:
        assert normalize_path(facts.path).startswith("/")
    except InvalidPath as exc:
        assert exc.reason in PATH_REASONS


@given(st.text(alphabet=st.characters(max_codepoint=0xFF), max_size=80), st.text(max_size=20))
def test_facts_from_any_environ(path_info: str, script_name: str) -> None:
    env = environ(PATH_INFO=path_info, SCRIPT_NAME=script_name)

    facts = facts_from_environ(env, RequestRecord())

    assert facts.path.isascii()
    if script_name.isascii() and "%" not in script_name + path_info:
        # Without escapes in the input, decoding the path gives the input back.
        assert unquote(facts.path, encoding="latin-1") == (script_name + path_info or "/")
