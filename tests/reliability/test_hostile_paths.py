"""Authorization-bypass attempts against real servers (uvicorn and gunicorn, STRICT mTLS).

Every request goes out over a raw TLS socket with a client certificate, so its path bytes
reach the server exactly as written (no client normalizes them). The protected service
(``tests.reliability``) records every handler execution; after each attack the test reads that
record. A request is *let in* when a protected handler ran for a caller the policies do not
allow. The pass criterion for every row: a ``400``/``403``/``404``/``405``/``414``/``431``
answer or a server-level refusal (or a ``200`` from the public handler, when the bytes name a
public path after all), and nothing let in.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

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
REFUSED = frozenset({400, 403, 404, 405, 414, 431, None})
XFCC_ADMIN = b"x-forwarded-client-cert: URI=spiffe://" + ADMIN.encode()

# (name, request, caller). "users" may reach /public/* only; "admin" also /admin*, never
# /internal/*. Targets for "users": admin and internal; for "admin": internal.
ADMIN_PATHS: list[tuple[str, bytes]] = [
    ("plain", b"/admin"),
    ("plain subpath", b"/admin/users"),
    ("encoded slash %2f", b"/public/..%2fadmin"),
    ("encoded slash %2F", b"/public/..%2Fadmin"),
    ("encoded backslash %5c", b"/public/..%5cadmin"),
    ("encoded backslash %5C", b"/public/..%5Cadmin"),
    ("raw backslash", b"/public\\..\\admin"),
    ("double slash", b"//admin"),
    ("double slash subpath", b"/public//../admin"),
    ("dot-dot", b"/public/../admin"),
    ("dot", b"/./admin"),
    ("encoded dot-dot %2e%2e", b"/public/%2e%2e/admin"),
    ("encoded dot-dot %2E%2E", b"/public/%2E%2E/admin"),
    ("half-encoded .%2e", b"/public/.%2e/admin"),
    ("half-encoded %2e.", b"/public/%2e./admin"),
    ("encoded dot-dot and slash", b"/public/%2e%2e%2fadmin"),
    ("double-encoded dot-dot", b"/public/%252e%252e/admin"),
    ("overlong utf-8 dot", b"/public/%c0%ae%c0%ae/admin"),
    ("encoded letter", b"/%61dmin"),
    ("encoded letters and dots", b"/public/%2e%2e/%61%64%6d%69%6e"),
    ("mixed case /Admin", b"/Admin"),
    ("upper case /ADMIN", b"/ADMIN"),
    ("params", b"/admin;x=1"),
    ("params subpath", b"/admin;x=1/users"),
    ("dot-dot params", b"/..;/admin"),
    ("public dot-dot params", b"/public/..;/admin"),
    ("fragment", b"/admin#public"),
    ("fragment hiding dot-dot", b"/public/x#/../../admin"),
    ("query hiding path", b"/admin?/public/x"),
    ("non-utf-8 %ff", b"/admin/%ff"),
    ("non-utf-8 before dot-dot", b"/public/%ff/../admin"),
    ("NUL %00", b"/admin%00"),
    ("NUL before public", b"/admin%00/public/x"),
    ("overlong path", b"/public/" + b"a" * 9000 + b"/../../admin"),
    ("overlong admin path", b"/admin/" + b"x" * 9000),
    ("absolute-form", b"https://localhost/admin"),
    ("tab in path", b"/admin%09"),
    ("trailing dot segment", b"/admin/."),
    ("unicode fullwidth", b"/%ef%bc%8fadmin"),
]
INTERNAL_PATHS: list[tuple[str, bytes]] = [
    ("plain", b"/internal/x"),
    ("dot-dot", b"/public/../internal/x"),
    ("encoded slash", b"/internal%2fx"),
    ("encoded dot-dot", b"/public/%2e%2e/internal/x"),
    ("double slash", b"//internal//x"),
    ("mixed case", b"/Internal/x"),
    ("params", b"/internal;a=b/x"),
    ("dot-dot params", b"/public/..;/internal/x"),
    ("backslash", b"/public\\..\\internal\\x"),
    ("encoded letter", b"/%69nternal/x"),
    ("NUL", b"/internal/x%00"),
    ("non-utf-8", b"/internal/%ff"),
    ("overlong", b"/internal/" + b"x" * 9000),
]
HEADER_ATTACKS: list[tuple[str, bytes, tuple[bytes, ...]]] = [
    ("forged XFCC", b"/admin", (XFCC_ADMIN,)),
    ("two XFCC headers", b"/admin", (XFCC_ADMIN, XFCC_ADMIN)),
    ("XFCC with By", b"/admin", (XFCC_ADMIN + b";By=spiffe://cluster.local/ns/x/sa/y",)),
    ("60 KiB header", b"/admin", (b"x-padding: " + b"a" * 60 * 1024,)),
    ("60 KiB XFCC", b"/admin", (b"x-forwarded-client-cert: URI=" + b"a" * 60 * 1024,)),
    ("duplicate Host", b"/admin", (b"Host: admin",)),
    ("override path headers", b"/public/x", (b"x-original-url: /admin", b"x-rewrite-url: /admin")),
    ("forged identity header", b"/admin", (b"x-meshware-identity: " + ADMIN.encode(),)),
]

ATTACKS: list[tuple[str, str, bytes]] = [
    *[(f"users {name}", "users", get(path)) for name, path in ADMIN_PATHS],
    *[(f"users internal {name}", "users", get(path)) for name, path in INTERNAL_PATHS],
    *[(f"admin internal {name}", "admin", get(path)) for name, path in INTERNAL_PATHS],
    *[(f"users {name}", "users", get(path, *headers)) for name, path, headers in HEADER_ATTACKS],
]


def _forbidden(caller: str, handler: str) -> bool:
    return handler == "internal" or (handler == "admin" and caller != "admin")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cert_dir = tmp_path_factory.mktemp("pki")
    ca = LocalCA.init(cert_dir)
    for service in SERVICES:
        ca.issue(service)
    return cert_dir


@pytest.fixture(scope="module", params=sorted(APPS))
def server(request: pytest.FixtureRequest, pki: Path) -> Iterator[tuple[str, int, Path]]:
    log = pki.parent / f"executions-{request.param}.jsonl"
    env = {"MESH_REL_BUNDLE": str(pki / "bundle.pem"), "MESH_REL_LOG": str(log)}
    with meshware_serve(
        APPS[request.param], service="vault", cert_dir=pki, env=env, args=["--no-access-log"]
    ) as port:
        yield request.param, port, log


def test_allowed_callers_reach_their_handlers(pki: Path, server: tuple[str, int, Path]) -> None:
    """The control: the handlers run and record themselves, so silence means refusal."""
    _, port, log = server
    before = len(executions(log))
    users, admin = client_context(pki, "users"), client_context(pki, "admin")
    assert raw_request(port, users, get(b"/public/x"))[0] == 200
    assert raw_request(port, admin, get(b"/admin"))[0] == 200
    assert raw_request(port, admin, get(b"/admin/users"))[0] == 200
    assert raw_request(port, users, get(b"/public/a/../b"))[0] == 200  # normalized, allowed
    ran = [(e["handler"], e["principal"], e["path"]) for e in executions(log)[before:]]
    assert ran == [
        ("public", "cluster.local/ns/default/sa/users", "/public/x"),
        ("admin", ADMIN, "/admin"),
        ("admin", ADMIN, "/admin/users"),
        ("public", "cluster.local/ns/default/sa/users", "/public/b"),
    ]


def test_no_bypass_reaches_a_protected_handler(
    pki: Path, server: tuple[str, int, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    name, port, log = server
    contexts = {caller: client_context(pki, caller) for caller in ("users", "admin")}
    rows: list[tuple[str, int | None, int]] = []
    failures: list[str] = []
    for attack, caller, head in ATTACKS:
        before = len(executions(log))
        status, _ = raw_request(port, contexts[caller], head)
        ran = executions(log)[before:]
        let_in = [e for e in ran if _forbidden(caller, e["handler"])]
        rows.append((attack, status, len(let_in)))
        # A 200 is acceptable only from the public handler: the attack resolved to a public
        # path (``/public/%252e%252e/admin`` is the literal segment ``%2e%2e``).
        public = status == 200 and ran and all(e["handler"] == "public" for e in ran)
        if let_in or not (status in REFUSED or public):
            failures.append(f"{attack}: status {status}, ran {ran}")
    with capsys.disabled():
        print(f"\n{name}: {len(rows)} bypass attempts")
        print(f"  {'attempt':<44} {'status':>6} {'let in':>6}")
        for attack, status, count in rows:
            print(f"  {attack[:44]:<44} {status!s:>6} {count:>6}")
        print(f"  sent {len(rows)}, let in {sum(r[2] for r in rows)}")
    assert failures == []
