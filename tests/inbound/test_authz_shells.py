"""The authorization middleware through both shells: Starlette on ASGI, Flask on WSGI.

A small wrapper plays the server: it creates the request record (as telemetry would), hands
over the caller's certificate (the ASGI TLS extension, or ``SSL_CLIENT_CERT`` for WSGI) and,
when a test asks, the exact request target a client sent (httpx itself would remove dot
segments before sending).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from flask import Flask, jsonify
from flask import request as flask_request
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from meshware.exceptions import ConfigurationError
from meshware.identity.bundle import PeerVerifier, TrustBundles
from meshware.identity.ca import LocalCA
from meshware.identity.resolve import IdentityResolver
from meshware.inbound import asgi, wsgi
from meshware.inbound.record import RequestRecord, record_of
from meshware.inbound.routes import FlaskRoutes, StarletteRoutes
from meshware.policy.authz import (
    AuthorizationPolicy,
    Authorizer,
    Condition,
    Operation,
    Rule,
    Source,
    authorize,
)
from meshware.policy.paths import PathNormalization, encode_raw_path, normalize_path

ORDERS = "cluster.local/ns/default/sa/orders"
BILLING = "cluster.local/ns/default/sa/billing"
METHODS = ["GET", "POST", "PUT", "DELETE"]

ONLY_ORDERS = AuthorizationPolicy(
    name="orders-only",
    action="ALLOW",
    rules=[Rule(from_=[Source(principals=[ORDERS])])],
)
NO_ADMIN = AuthorizationPolicy(
    name="no-admin",
    action="DENY",
    rules=[
        Rule(to=[Operation(methods=["DELETE"])]),
        Rule(to=[Operation(paths=["/admin*"])]),
    ],
)
DENIED = {"status": 403, "error": "forbidden", "detail": "RBAC: access denied"}


# -- the applications: the same behaviour on both frameworks ------------------------------------


@authorize(principals=[BILLING], name="billing-reads-reports")
async def starlette_report(request: Request) -> JSONResponse:
    return JSONResponse({"report": request.path_params["report_id"]})


async def starlette_echo(request: Request) -> JSONResponse:
    raw = request.scope.get("raw_path")
    return JSONResponse(
        {"path": request.scope["path"], "raw": raw.decode() if raw is not None else None}
    )


def starlette_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/reports/{report_id}", starlette_report),
            Route("/{rest:path}", starlette_echo, methods=METHODS),
        ]
    )


def flask_app() -> Flask:
    app = Flask(__name__)

    @app.get("/reports/<report_id>")
    @authorize(principals=[BILLING], name="billing-reads-reports")
    def report(report_id: str) -> Any:
        return jsonify(report=report_id)

    @app.route("/", defaults={"rest": ""}, methods=METHODS)
    @app.route("/<path:rest>", methods=METHODS)
    def echo(rest: str) -> Any:
        environ = flask_request.environ
        return jsonify(path=environ["PATH_INFO"], raw=environ.get("RAW_URI"))

    return app


# -- certificates --------------------------------------------------------------------------------


class Peers:
    """A mesh CA in a temporary directory, and the certificates of a few services."""

    def __init__(self, directory: Path) -> None:
        self.ca = LocalCA.init(directory)
        self.bundle = TrustBundles.from_file(directory / "bundle.pem")
        self._pems: dict[str, str] = {}

    def pem(self, principal: str) -> str:
        if principal not in self._pems:
            namespace, service = principal.split("/")[2], principal.split("/")[4]
            paths = self.ca.issue(service, namespace=namespace)
            self._pems[principal] = paths.cert.read_text()
        return self._pems[principal]

    def resolver(self) -> IdentityResolver:
        return IdentityResolver(PeerVerifier(self.bundle))


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Peers:
    return Peers(tmp_path_factory.mktemp("mesh-ca"))


# -- the harness ------------------------------------------------------------------------------------


class Shell:
    """Builds ``server -> IdentityMiddleware -> AuthorizationMiddleware -> app`` of one kind."""

    def __init__(self, kind: str, peers: Peers) -> None:
        self.kind = kind
        self.peers = peers
        self.module: Any = asgi if kind == "asgi" else wsgi
        self.user_app: Any = starlette_app() if kind == "asgi" else flask_app().wsgi_app
        self.records: list[RequestRecord] = []
        self.after: list[tuple[str, Any]] = []  # the path the server sees after the app
        self.middleware: Any = None

    def build(self, **options: Any) -> Shell:
        if options.get("routes") == "resolver":
            if self.kind == "asgi":
                options["routes"] = StarletteRoutes(self.user_app)
            else:
                flask = flask_app()
                self.user_app = flask.wsgi_app
                options["routes"] = FlaskRoutes(flask)
        self.middleware = self.module.AuthorizationMiddleware(self.user_app, **options)
        return self

    def server(self, peer: str | None, target: str | None) -> Any:
        inner = self.module.IdentityMiddleware(self.middleware, resolver=self.peers.resolver())
        pem = None if peer is None else self.peers.pem(peer)
        if self.kind == "asgi":

            async def asgi_server(scope: dict[str, Any], receive: Any, send: Any) -> None:
                self.records.append(record_of(scope))
                if pem is not None:
                    scope["extensions"] = {"tls": {"client_cert_chain": [pem]}}
                if target is not None:
                    scope["raw_path"] = target.encode()
                    scope["path"] = unquote(target)
                await inner(scope, receive, send)
                self.after.append((scope["path"], scope.get("raw_path")))

            return asgi_server

        def wsgi_server(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
            self.records.append(record_of(environ))
            if pem is not None:
                environ["SSL_CLIENT_CERT"] = pem
            if target is not None:
                # As gunicorn: the target as received, and PATH_INFO decoded as latin-1.
                environ["RAW_URI"] = target
                environ["PATH_INFO"] = unquote(target, encoding="latin-1")
            body = inner(environ, start_response)
            self.after.append((environ["PATH_INFO"], environ.get("RAW_URI")))
            return body

        return wsgi_server

    async def request(
        self,
        method: str,
        url: str,
        *,
        peer: str | None = None,
        target: str | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        app = self.server(peer, target)
        if self.kind == "asgi":
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://orders") as client:
                return await client.request(method, url, **kwargs)
        with httpx.Client(
            transport=httpx.WSGITransport(app=app), base_url="http://orders"
        ) as sync_client:
            return sync_client.request(method, url, **kwargs)

    @property
    def record(self) -> RequestRecord:
        return self.records[-1]


@pytest.fixture(params=["asgi", "wsgi"])
def shell(request: pytest.FixtureRequest, peers: Peers) -> Shell:
    return Shell(request.param, peers)


def decision(record: RequestRecord) -> tuple[Any, ...]:
    return (
        record.authz_decision,
        record.authz_policy,
        record.authz_rule,
        record.authz_reason,
    )


# -- allow and deny ---------------------------------------------------------------------------------


async def test_the_allowed_caller_reaches_the_app(shell: Shell) -> None:
    shell.build(policies=[ONLY_ORDERS])

    response = await shell.request("GET", "/api/items", peer=ORDERS)

    assert response.status_code == 200
    assert response.json()["path"] == "/api/items"
    assert decision(shell.record) == (
        "allow",
        "orders-only",
        0,
        'allowed by ALLOW policy "orders-only" rule 0',
    )


async def test_another_service_gets_istios_403(shell: Shell) -> None:
    shell.build(policies=[ONLY_ORDERS])

    response = await shell.request("GET", "/api/items", peer=BILLING)

    assert response.status_code == 403
    assert response.headers["content-type"] == "application/json"
    assert response.json() == DENIED
    assert response.content == b'{"status":403,"error":"forbidden","detail":"RBAC: access denied"}'
    assert decision(shell.record) == ("deny", None, None, "no ALLOW policy matched")


async def test_an_unauthenticated_caller_is_denied(shell: Shell) -> None:
    shell.build(policies=[ONLY_ORDERS])

    response = await shell.request("GET", "/api/items")

    assert response.status_code == 403
    assert shell.record.identity is None


async def test_the_deciding_policy_and_rule_are_recorded(shell: Shell) -> None:
    shell.build(policies=[ONLY_ORDERS, NO_ADMIN])

    response = await shell.request("GET", "/admin/users", peer=ORDERS)

    assert response.json() == DENIED
    assert decision(shell.record) == (
        "deny",
        "no-admin",
        1,
        'denied by DENY policy "no-admin" rule 1',
    )


async def test_deny_wins_over_a_matching_allow(shell: Shell) -> None:
    shell.build(policies=[ONLY_ORDERS, NO_ADMIN])

    response = await shell.request("DELETE", "/api/items/1", peer=ORDERS)

    assert response.status_code == 403
    assert decision(shell.record)[:3] == ("deny", "no-admin", 0)


async def test_explain_adds_the_policy_rule_and_reason(shell: Shell) -> None:
    shell.build(policies=[ONLY_ORDERS, NO_ADMIN], explain=True)

    denied = await shell.request("GET", "/admin", peer=ORDERS)
    unmatched = await shell.request("GET", "/api", peer=BILLING)

    assert denied.json() == {
        **DENIED,
        "policy": "no-admin",
        "rule": 1,
        "reason": 'denied by DENY policy "no-admin" rule 1',
    }
    assert unmatched.json() == {
        **DENIED,
        "policy": None,
        "rule": None,
        "reason": "no ALLOW policy matched",
    }


async def test_dry_run_is_recorded_but_not_enforced(shell: Shell) -> None:
    trial = AuthorizationPolicy(
        name="trial-deny-writes",
        action="DENY",
        rules=[Rule(to=[Operation(methods=["POST"])])],
        dry_run=True,
    )
    shell.build(policies=[ONLY_ORDERS, trial])

    written = await shell.request("POST", "/api/items", peer=ORDERS)
    read = await shell.request("GET", "/api/items", peer=ORDERS)

    assert (written.status_code, read.status_code) == (200, 200)
    first, second = shell.records
    assert (first.authz_decision, first.authz_policy) == ("allow", "orders-only")
    assert (first.authz_dry_run, first.authz_dry_run_policy) == ("deny", "trial-deny-writes")
    assert (second.authz_dry_run, second.authz_dry_run_policy) == ("allow", None)


async def test_audit_policies_are_listed(shell: Shell) -> None:
    audit = AuthorizationPolicy(
        name="audit-writes", action="AUDIT", rules=[Rule(to=[Operation(methods=["POST"])])]
    )
    shell.build(policies=[audit])

    response = await shell.request("POST", "/api/items", peer=ORDERS)

    assert response.status_code == 200
    assert shell.record.extra == {"authz_audit": ["audit-writes"]}


async def test_header_conditions(shell: Shell) -> None:
    prod_only = AuthorizationPolicy(
        name="prod-only",
        rules=[Rule(when=[Condition(key="request.headers[x-env]", values=["prod"])])],
    )
    shell.build(policies=[prod_only])

    prod = await shell.request("GET", "/", headers={"x-env": "prod"})
    staging = await shell.request("GET", "/", headers={"X-Env": "staging"})

    assert (prod.status_code, staging.status_code) == (200, 403)


async def test_without_policies_nothing_is_decided(shell: Shell) -> None:
    shell.build()

    response = await shell.request("GET", "/anything", peer=BILLING)

    assert response.status_code == 200
    assert decision(shell.record) == (None, None, None, None)


# -- paths ------------------------------------------------------------------------------------------


async def test_dot_segments_cannot_dodge_a_deny(shell: Shell) -> None:
    shell.build(policies=[NO_ADMIN])

    response = await shell.request("GET", "/", target="/public/../admin")

    assert response.json() == DENIED
    assert shell.record.authz_policy == "no-admin"


async def test_the_app_routes_the_normalized_path(shell: Shell) -> None:
    shell.build(policies=[NO_ADMIN])

    response = await shell.request("GET", "/", target="/public/./x//%79")

    assert response.status_code == 200
    seen = response.json()
    assert seen["path"] == "/public/x/y"
    assert seen["raw"] == "/public/x/y"  # raw_path (ASGI), gunicorn's RAW_URI (WSGI)
    # Outer layers (telemetry, the server) still see the path as it was received.
    if shell.kind == "asgi":
        assert shell.after == [("/public/./x//y", b"/public/./x//%79")]
    else:
        assert shell.after == [("/public/./x//y", "/public/./x//%79")]
    assert shell.record.facts is not None
    assert shell.record.facts.path == "/public/x/y"


async def test_canonical_paths_are_left_alone(shell: Shell) -> None:
    shell.build(policies=[NO_ADMIN])

    response = await shell.request("GET", "/", target="/caf%C3%A9/a;b")

    assert response.json()["path"] == ("/café/a;b" if shell.kind == "asgi" else "/caf\xc3\xa9/a;b")


@pytest.mark.parametrize(
    ("target", "reason", "detail"),
    [
        (
            "/a%2Fb",
            "escaped-slash",
            "the request path contains a percent-encoded slash or backslash",
        ),
        (
            "/%zz",
            "invalid-percent-encoding",
            "the request path has a '%' not followed by two hex digits",
        ),
        (
            "/a/..;/admin",
            "ambiguous-dot-segment",
            "the request path has a dot segment with parameters",
        ),
        ("/%C0%AE", "invalid-utf8", "the request path is not valid UTF-8"),
    ],
)
async def test_paths_that_cannot_be_normalized_get_400(
    shell: Shell, target: str, reason: str, detail: str
) -> None:
    shell.build(policies=[NO_ADMIN])

    response = await shell.request("GET", "/", target=target)

    assert response.status_code == 400
    assert response.json() == {
        "status": 400,
        "error": "bad_request",
        "detail": detail,
        "reason": reason,
    }
    assert shell.record.authz_decision == "deny"
    assert shell.record.authz_reason is not None
    assert shell.record.authz_reason.endswith(f"[{reason}]")


async def test_path_normalization_settings(shell: Shell) -> None:
    shell.build(policies=[NO_ADMIN], path_normalization=PathNormalization(escaped_slashes="decode"))

    response = await shell.request("GET", "/", target="/public%2F..%2Fadmin")

    assert response.json() == DENIED


async def test_a_wsgi_path_must_stay_under_the_script_name(peers: Peers) -> None:
    shell = Shell("wsgi", peers).build(policies=[NO_ADMIN])
    app = shell.server(None, None)
    environ = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": "/app",
        "PATH_INFO": "/../admin",
        "SERVER_PORT": "80",
        "wsgi.input": None,
    }
    started: list[str] = []

    body = app(environ, lambda status, headers: started.append(status))

    assert started == ["400 Bad Request"]
    assert json.loads(b"".join(body))["reason"] == "outside-script-name"


# -- per-route policies ---------------------------------------------------------------------------


async def test_route_policies_join_the_service_wide_ones(shell: Shell) -> None:
    shell.build(policies=[NO_ADMIN], routes="resolver")

    billing = await shell.request("GET", "/reports/q3", peer=BILLING)
    orders = await shell.request("GET", "/reports/q3", peer=ORDERS)
    elsewhere = await shell.request("GET", "/public/x", peer=ORDERS)

    assert (billing.status_code, billing.json()) == (200, {"report": "q3"})
    assert orders.json() == DENIED
    assert elsewhere.status_code == 200
    first, second, third = shell.records
    template = "/reports/{report_id}" if shell.kind == "asgi" else "/reports/<report_id>"
    assert (first.route, first.authz_policy) == (template, "billing-reads-reports")
    assert (second.authz_decision, second.authz_reason) == ("deny", "no ALLOW policy matched")
    # The route's ALLOW policy does not apply to other routes; NO_ADMIN decided nothing there.
    assert (third.authz_decision, third.authz_policy) == ("allow", None)


async def test_a_service_wide_deny_still_applies_on_a_route(shell: Shell) -> None:
    deny_billing = AuthorizationPolicy(
        name="deny-billing", action="DENY", rules=[Rule(from_=[Source(principals=[BILLING])])]
    )
    shell.build(policies=[deny_billing], routes="resolver")

    response = await shell.request("GET", "/reports/q3", peer=BILLING)

    assert response.json() == DENIED
    assert shell.record.authz_policy == "deny-billing"


async def test_route_policies_alone_are_enforced(shell: Shell) -> None:
    shell.build(routes="resolver")

    report = await shell.request("GET", "/reports/q3", peer=ORDERS)
    other = await shell.request("GET", "/other", peer=ORDERS)

    assert (report.status_code, other.status_code) == (403, 200)
    assert shell.records[1].authz_decision is None  # no policy applies to /other


async def test_a_route_policy_clashing_with_a_service_policy_fails_loudly(shell: Shell) -> None:
    clash = AuthorizationPolicy(name="billing-reads-reports", rules=[Rule()])
    shell.build(policies=[clash], routes="resolver")

    with pytest.raises(ConfigurationError) as caught:
        await shell.request("GET", "/reports/q3", peer=BILLING)

    assert caught.value.field == "routes"
    assert "duplicate policy name 'billing-reads-reports'" in str(caught.value)


# -- arguments ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
def test_an_authorizer_can_be_given(kind: str) -> None:
    module: Any = asgi if kind == "asgi" else wsgi
    authorizer = Authorizer([ONLY_ORDERS])

    middleware = module.AuthorizationMiddleware(starlette_app(), authorizer=authorizer)

    assert middleware.authorizer is authorizer


@pytest.mark.parametrize("kind", ["asgi", "wsgi"])
@pytest.mark.parametrize(
    ("options", "field", "message"),
    [
        (
            {"policies": [ONLY_ORDERS], "authorizer": Authorizer([])},
            "policies",
            "expected either policies or an authorizer, not both",
        ),
        (
            {"authorizer": Authorizer([]), "path_normalization": PathNormalization()},
            "path_normalization",
            "set the path normalization on the Authorizer given",
        ),
        ({"authorizer": [ONLY_ORDERS]}, "authorizer", "expected an Authorizer"),
        ({"policies": ONLY_ORDERS}, "policies", "expected a list of AuthorizationPolicy"),
        ({"policies": [ONLY_ORDERS, ONLY_ORDERS]}, "policies[1].name", "duplicate policy name"),
        ({"routes": object()}, "routes", "expected a RouteResolver"),
        ({"explain": "yes"}, "explain", "expected True or False"),
    ],
)
def test_bad_arguments(kind: str, options: dict[str, Any], field: str, message: str) -> None:
    module: Any = asgi if kind == "asgi" else wsgi

    with pytest.raises(ConfigurationError) as caught:
        module.AuthorizationMiddleware(starlette_app(), **options)

    assert caught.value.field == field
    assert message in str(caught.value)


# -- ASGI specifics ---------------------------------------------------------------------------------


async def test_lifespan_passes_through() -> None:
    seen: list[str] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    await asgi.AuthorizationMiddleware(app, policies=[ONLY_ORDERS])(
        {"type": "lifespan"},
        None,
        None,  # type: ignore[arg-type]
    )

    assert seen == ["lifespan"]


async def test_a_denied_websocket_is_closed() -> None:
    sent: list[dict[str, Any]] = []
    called: list[bool] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        called.append(True)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "websocket", "path": "/admin", "raw_path": b"/admin", "headers": []}
    await asgi.AuthorizationMiddleware(app, policies=[NO_ADMIN])(scope, None, send)  # type: ignore[arg-type]

    assert sent == [{"type": "websocket.close", "code": 1008}]
    assert called == []


# -- properties -------------------------------------------------------------------------------------

PATH_REASONS = {
    "too-long",
    "control-character",
    "invalid-percent-encoding",
    "invalid-utf8",
    "escaped-slash",
    "backslash",
    "ambiguous-dot-segment",
    "outside-script-name",
}


def run_now(coroutine: Any) -> None:
    """Run a coroutine that never waits (the test's app and send do not)."""
    try:
        coroutine.send(None)
    except StopIteration:
        return
    raise AssertionError("the middleware waited on something")


def check_answer(status: int, body: bytes, reached: list[str]) -> None:
    if status == 200:
        assert len(reached) == 1
        # The application only ever sees a normalized path (non-ASCII bytes may stay raw).
        assert normalize_path(reached[0]) == reached[0]
    elif status == 403:
        assert json.loads(body) == DENIED
    else:
        assert status == 400
        assert json.loads(body)["reason"] in PATH_REASONS


@settings(max_examples=300)
@given(st.binary(max_size=60).map(lambda raw: b"/" + raw))
def test_any_asgi_path_gets_an_answer(raw: bytes) -> None:
    reached: list[str] = []
    sent: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        reached.append(encode_raw_path(scope["raw_path"].split(b"?")[0]))
        await send({"type": "http.response.start", "status": 200, "headers": []})

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    middleware = asgi.AuthorizationMiddleware(app, policies=[NO_ADMIN])
    scope = {"type": "http", "method": "GET", "path": "/", "raw_path": raw, "headers": []}
    run_now(middleware(scope, None, send))  # type: ignore[arg-type]

    body = sent[1]["body"] if len(sent) > 1 else b""
    check_answer(sent[0]["status"], body, reached)
    assert scope["raw_path"] == raw  # restored for the outer layers


@settings(max_examples=300)
@given(
    st.text(alphabet=st.characters(max_codepoint=0xFF), max_size=60),
    st.sampled_from(["", "/app"]),
)
def test_any_wsgi_path_gets_an_answer(target: str, script_name: str) -> None:
    reached: list[str] = []
    started: list[str] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        reached.append(encode_raw_path(environ["RAW_URI"].split("?")[0].encode("latin-1")))
        start_response("200 OK", [])
        return [b""]

    middleware = wsgi.AuthorizationMiddleware(app, policies=[NO_ADMIN])
    environ = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": script_name,
        "PATH_INFO": "/x",
        "RAW_URI": script_name + "/" + target,
    }
    body = b"".join(middleware(environ, lambda status, headers: started.append(status)))

    check_answer(int(started[0][:3]), body, reached)
    assert environ["RAW_URI"] == script_name + "/" + target
