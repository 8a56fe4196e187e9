"""``meshware check`` and ``meshware explain``: their output and exit codes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from meshware.cli import EXIT_DENIED, EXIT_INVALID, main

EXAMPLES = Path(__file__).parent / "istio_examples"


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


POLICIES = """\
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata:
      name: allow-orders
      namespace: shop
    spec:
      selector:
        matchLabels:
          app: payments
      rules:
      - from:
        - source:
            principals: ["cluster.local/ns/shop/sa/orders"]
        to:
        - operation:
            methods: ["POST"]
            paths: ["/api/charge"]
      - to:
        - operation:
            paths: ["/public/*"]
        when:
        - key: request.auth.claims[groups]
          values: ["readers"]
        - key: request.headers[x-env]
          values: ["prod, canary"]
    ---
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata:
      name: block-admin
      namespace: shop
    spec:
      action: DENY
      rules:
      - to:
        - operation:
            paths: ["/admin*"]
    ---
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata:
      name: trial-deny
      namespace: shop
      annotations:
        "istio.io/dry-run": "true"
    spec:
      action: DENY
      rules:
      - to:
        - operation:
            methods: ["POST"]
    ---
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata:
      name: audit-charges
      namespace: shop
    spec:
      action: AUDIT
      rules:
      - to:
        - operation:
            paths: ["/api/charge"]
    ---
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata:
      name: cart-only
      namespace: shop
    spec:
      selector:
        matchLabels:
          app: cart
      rules:
      - {}
    """


@pytest.fixture
def policies(tmp_path: Path) -> Path:
    return write(tmp_path, "policies.yaml", POLICIES)


def explain(
    capsys: pytest.CaptureFixture[str], policies: Path, *argv: str
) -> tuple[int, list[str], str]:
    code, out, err = run(
        capsys, "explain", "--policy", policies, "--service-namespace", "shop", *argv
    )
    return code, out.splitlines(), err


# -- check -------------------------------------------------------------------------------------


def test_check_valid_files(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        capsys, "check", EXAMPLES / "destination-rule-all.yaml", EXAMPLES / "mirroring.yaml"
    )

    assert (code, out, err) == (0, "6 documents, 0 errors, 0 warnings\n", "")


def test_check_prints_every_error_and_exits_1(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    bad = write(
        tmp_path,
        "mesh.yaml",
        """\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: reviews, labels: {app: reviews}}
        spec:
          hosts: [reviews]
          http:
          - route: [{destination: {host: reviews, subsett: v2}}]
        ---
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {name: default}
        spec: {mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: DISABLE}}}
        """,
    )

    code, out, err = run(capsys, "check", bad)

    assert code == EXIT_INVALID == 1
    assert err == ""
    assert out.splitlines() == [
        f"{bad}: document 1 (VirtualService reviews), line 7: "
        "spec.http[0].route[0].destination.subsett: unknown field; expected one of host, subset, "
        "port (value: 'v2')",
        f"{bad}: document 2 (PeerAuthentication default), line 12: spec.portLevelMtls: is not "
        "supported: a service has one mTLS mode for its port; per-port modes are not supported "
        "(value: {8080: {'mode': 'DISABLE'}})",
        f"warning: {bad}: document 1 (VirtualService reviews), line 3: metadata.labels: ignored: "
        "labels select nothing in meshware",
        "2 documents, 2 errors, 1 warning",
    ]


def test_check_reads_directories_and_reports_unreadable_files(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    missing = tmp_path / "missing.yaml"

    code, out, _ = run(capsys, "check", EXAMPLES, missing)

    lines = out.splitlines()
    assert code == 1
    assert f"{missing}: cannot read: No such file or directory" in lines
    assert lines[-1] == "34 documents, 17 errors, 2 warnings"


def test_check_shows_what_applies_to_a_service(
    capsys: pytest.CaptureFixture[str], policies: Path
) -> None:
    code, out, _ = run(
        capsys,
        "check",
        policies,
        EXAMPLES / "mirroring.yaml",
        *["--namespace", "shop"],
        *["--service", "payments"],
    )

    assert code == 0
    assert out.splitlines() == [
        "payments (shop): 4 authorization policies, 0 JWT rules, mTLS not set, 0 rate-limit "
        "rules, 1 virtual service, 1 destination rule",
        "7 documents, 0 errors, 0 warnings",
    ]


def test_check_exit_code_through_the_interpreter(tmp_path: Path) -> None:
    bad = write(tmp_path, "bad.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")

    done = subprocess.run(
        [sys.executable, "-m", "meshware.cli", "check", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )

    assert done.returncode == 1
    assert done.stdout.splitlines()[-1] == "1 document, 1 error, 0 warnings"


# -- explain -----------------------------------------------------------------------------------


def test_explain_an_allowed_request(capsys: pytest.CaptureFixture[str], policies: Path) -> None:
    code, lines, err = explain(
        capsys,
        policies,
        *["--from", "orders", "--namespace", "shop", "--method", "post", "--path", "/api//charge"],
        *["--service", "payments"],
    )

    assert (code, err) == (0, "")
    assert lines == [
        "request:   POST /api//charge",
        "path:      /api/charge (normalized from /api//charge)",
        "caller:    cluster.local/ns/shop/sa/orders (namespace shop)",
        "jwt:       none",
        "policies:  4 policies (1 ALLOW, 2 DENY, 1 AUDIT, 1 in dry-run) for service payments",
        "decision:  ALLOW (200 allowed-by-policy)",
        'reason:    allowed by ALLOW policy "allow-orders" rule 0',
        f'by:        ALLOW policy "allow-orders" rule 0 ({policies}: document 1, line 11)',
        f'dry-run:   policy "trial-deny" rule 0 would deny ({policies}: document 3, line 49)',
        "dry-run:   with dry-run policies enforced, the request would be denied",
        'audit:     "audit-charges"',
    ]


def test_explain_a_denied_request(capsys: pytest.CaptureFixture[str], policies: Path) -> None:
    code, lines, _ = explain(
        capsys,
        policies,
        *["--from", "spiffe://cluster.local/ns/shop/sa/orders", "--method", "GET"],
        *[
            "--path",
            "/public/../admin/users?verbose=1",
            "--ip",
            "10.1.2.3",
            "--service",
            "payments",
        ],
    )

    assert code == EXIT_DENIED == 3
    assert lines[:8] == [
        "request:   GET /public/../admin/users?verbose=1",
        "path:      /admin/users (normalized from /public/../admin/users)",
        "caller:    cluster.local/ns/shop/sa/orders (namespace shop) from 10.1.2.3",
        "jwt:       none",
        "policies:  4 policies (1 ALLOW, 2 DENY, 1 AUDIT, 1 in dry-run) for service payments",
        "decision:  DENY (403 denied-by-policy)",
        'reason:    denied by DENY policy "block-admin" rule 0',
        f'by:        DENY policy "block-admin" rule 0 ({policies}: document 2, line 35)',
    ]


def test_explain_no_allow_match_without_identity(
    capsys: pytest.CaptureFixture[str], policies: Path
) -> None:
    code, lines, _ = explain(
        capsys, policies, "--method", "GET", "--path", "/api/items", "--service", "payments"
    )

    assert code == 3
    assert lines[2:] == [
        "caller:    no mTLS identity",
        "jwt:       none",
        "policies:  4 policies (1 ALLOW, 2 DENY, 1 AUDIT, 1 in dry-run) for service payments",
        "decision:  DENY (403 no-allow-match)",
        "reason:    no ALLOW policy matched",
        "dry-run:   with dry-run policies enforced, the request would be denied",
        "audit:     none",
    ]


def test_explain_with_claims_and_headers(
    capsys: pytest.CaptureFixture[str], policies: Path
) -> None:
    code, lines, _ = explain(
        capsys,
        policies,
        *["--request-principal", "https://idp.example.com/alice"],
        *["--claim", "groups=writers", "--claim", "groups=readers"],
        *["--header", "X-Env=prod", "--header", "x-env=canary"],
        *["--method", "GET", "--path", "/public/report", "--service", "payments"],
    )

    assert code == 0
    assert lines[3] == "jwt:       https://idp.example.com/alice"
    assert lines[6] == 'reason:    allowed by ALLOW policy "allow-orders" rule 1'


def test_explain_takes_the_jwt_principal_from_claims(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, lines, _ = run(
        capsys,
        "explain",
        *("--policy", EXAMPLES / "authz-allow-httpbin.yaml"),
        *["--from", "cluster.local/ns/default/sa/sleep", "--method", "GET", "--path", "/info/x"],
        *["--claim", "iss=https://accounts.google.com", "--claim", "sub=12345"],
    )

    assert code == 0
    assert lines.splitlines()[3] == "jwt:       https://accounts.google.com/12345"
    assert lines.splitlines()[4] == "policies:  1 policy (1 ALLOW)"


def test_without_a_service_every_policy_in_the_files_applies(
    capsys: pytest.CaptureFixture[str], policies: Path
) -> None:
    code, lines, _ = explain(capsys, policies, "--method", "GET", "--path", "/anything")

    assert code == 0
    assert lines[4] == "policies:  5 policies (2 ALLOW, 2 DENY, 1 AUDIT, 1 in dry-run)"
    assert lines[6] == 'reason:    allowed by ALLOW policy "cart-only" rule 0'


def test_explain_an_invalid_path(capsys: pytest.CaptureFixture[str], policies: Path) -> None:
    code, lines, _ = explain(capsys, policies, "--method", "GET", "--path", "/a%2Fb")

    assert code == 3
    assert lines[1] == "path:      invalid"
    assert lines[5] == "decision:  DENY (400 invalid-path)"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--from", "cluster.local/ns//sa/b", "--method", "GET", "--path", "/"],
            "--from: expected a principal (cluster.local/ns/NS/sa/SA), a spiffe:// id or a "
            "service name: ",
        ),
        (
            ["--from", "spiffe://cluster.local", "--method", "GET", "--path", "/"],
            "--from: expected a workload identity (<trust-domain>/ns/<namespace>/sa/<account>)",
        ),
        (
            [
                "--from",
                "cluster.local/ns/a/sa/b",
                "--namespace",
                "c",
                "--method",
                "GET",
                "--path",
                "/",
            ],
            "--namespace: the caller cluster.local/ns/a/sa/b is in namespace a",
        ),
        (
            ["--namespace", "c", "--method", "GET", "--path", "/"],
            "--namespace: needs --from: a caller without an identity has no namespace",
        ),
        (["--claim", "scope", "--method", "GET", "--path", "/"], "--claim: expected KEY=VALUE"),
        (["--header", "=x", "--method", "GET", "--path", "/"], "--header: expected KEY=VALUE"),
        (
            ["--request-principal", "alice", "--method", "GET", "--path", "/"],
            "--request-principal: expected <issuer>/<subject>",
        ),
        (["--method", "GET", "--path", "api"], "--path: expected a path starting with /"),
    ],
    ids=[
        "bad-principal",
        "not-a-workload",
        "namespace-mismatch",
        "namespace-without-caller",
        "claim",
        "header",
        "request-principal",
        "path",
    ],
)
def test_explain_usage_errors(
    capsys: pytest.CaptureFixture[str], policies: Path, argv: list[str], message: str
) -> None:
    code, lines, err = explain(capsys, policies, *argv)

    assert (code, lines) == (2, [])
    assert err.startswith(f"meshware: error: {message}")


def test_explain_refuses_broken_policy_files(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    broken = write(
        tmp_path,
        "broken.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x}\n"
        "spec: {action: CUSTOM}\n",
    )

    code, out, err = run(capsys, "explain", "--policy", broken, "--method", "GET", "--path", "/")

    assert (code, out) == (2, "")
    assert err == (
        f"meshware: error: {broken}: document 1 (AuthorizationPolicy x), line 4: spec.action: "
        "unsupported action CUSTOM: external authorization is not supported; expected one of "
        "ALLOW, DENY, AUDIT (value: 'CUSTOM')\n"
    )


def test_the_migration_page_example_prints_what_the_page_says(
    capsys: pytest.CaptureFixture[str],
) -> None:
    page = (Path(__file__).resolve().parents[2] / "docs" / "migrating-from-istio.md").read_text()
    code = page.split("## A runnable example", 1)[1].split("```python\n", 1)[1].split("```")[0]
    printed = page.split("It prints:\n\n```text\n", 1)[1].split("```", 1)[0]

    exec(compile(code, "migrating-from-istio.md", "exec"), {})

    assert capsys.readouterr().out == printed


def test_the_migration_page_shows_real_check_output(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    page = (Path(__file__).resolve().parents[2] / "docs" / "migrating-from-istio.md").read_text()
    manifest = page.split("```yaml\n", 1)[1].split("```", 1)[0]
    printed = page.split("exits with 1:\n\n```text\n", 1)[1].split("```", 1)[0]
    (tmp_path / "mesh.yaml").write_text(manifest)
    monkeypatch.chdir(tmp_path)

    code, out, _ = run(capsys, "check", "mesh.yaml", "--namespace", "shop")

    assert (code, out) == (1, printed)
