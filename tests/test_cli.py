"""The ``meshware`` command line: ``ca init``, ``cert issue``, ``cert inspect``, ``--version``."""

from __future__ import annotations

import datetime as dt
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from meshware.__about__ import __version__
from meshware.cli import main
from meshware.identity.ca import CERT_DIR_ENV, LocalCA
from tests.identity.certs import Issuer

ROOT = Path(__file__).resolve().parent.parent


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def cert_at(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture
def ca_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    directory = tmp_path / "certs"
    assert run(capsys, "ca", "init", "--dir", str(directory))[0] == 0
    return directory


# -- ca init -------------------------------------------------------------------------------------


def test_ca_init(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "certs"

    code, out, err = run(
        capsys, "ca", "init", "--dir", str(d), "--trust-domain", "example.org", "--validity", "30d"
    )

    assert (code, err) == (0, "")
    assert out == (
        f"CA for trust domain example.org in {d}\n"
        f"  key:    {d / 'ca.key'} (mode 0600)\n"
        f"  cert:   {d / 'ca.crt'}\n"
        f"  bundle: {d / 'bundle.pem'}\n"
    )
    assert stat.S_IMODE((d / "ca.key").stat().st_mode) == 0o600
    ca = cert_at(d / "ca.crt")
    assert ca.not_valid_after_utc - ca.not_valid_before_utc == dt.timedelta(days=30, minutes=5)
    assert LocalCA.load(d).trust_domain == "example.org"


def test_ca_init_uses_the_environments_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CERT_DIR_ENV, str(tmp_path / "env-dir"))

    code, out, _ = run(capsys, "ca", "init")

    assert code == 0
    assert out.startswith(f"CA for trust domain cluster.local in {tmp_path / 'env-dir'}\n")
    assert (tmp_path / "env-dir" / "bundle.pem").exists()


def test_ca_init_refuses_to_overwrite_without_force(
    ca_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (ca_dir / "ca.crt").read_bytes()

    code, out, err = run(capsys, "ca", "init", "--dir", str(ca_dir))

    assert (code, out) == (2, "")
    assert err == (
        f"meshware: error: dir: a CA already exists in {ca_dir} (use --force to replace it)\n"
    )
    assert (ca_dir / "ca.crt").read_bytes() == before

    assert run(capsys, "ca", "init", "--dir", str(ca_dir), "--force")[0] == 0
    assert (ca_dir / "ca.crt").read_bytes() != before


@pytest.mark.parametrize("trust_domain", ["Cluster.Local", "cluster.local:443", ""])
def test_ca_init_with_a_bad_trust_domain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], trust_domain: str
) -> None:
    code, out, err = run(
        capsys, "ca", "init", "--dir", str(tmp_path / "c"), "--trust-domain", trust_domain
    )

    assert (code, out) == (2, "")
    assert err.startswith(
        f"meshware: error: --trust-domain: invalid SPIFFE id 'spiffe://{trust_domain}': "
    )
    assert not (tmp_path / "c").exists()


def test_ca_init_explains_the_trust_domain_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, _, err = run(capsys, "ca", "init", "--dir", str(tmp_path), "--trust-domain", "Cluster.Local")

    assert err == (
        "meshware: error: --trust-domain: invalid SPIFFE id 'spiffe://Cluster.Local': "
        "character 'C' is not allowed in a trust domain (expected a-z 0-9 . - _) "
        "[trust-domain-chars]\n"
    )


@pytest.mark.parametrize("validity", ["10 years", "0d", "-1d", "5"])
def test_ca_init_with_a_bad_validity(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], validity: str
) -> None:
    code, _, err = run(capsys, "ca", "init", "--dir", str(tmp_path / "c"), f"--validity={validity}")

    assert code == 2
    assert err == (
        "meshware: error: --validity: expected a positive duration like '24h', '30m', '90s' "
        f"or '7d', got {validity!r}\n"
    )
    assert not (tmp_path / "c").exists()


# -- cert issue ------------------------------------------------------------------------------------


def test_cert_issue(ca_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(
        capsys, "cert", "issue", "orders", "--namespace", "shop", "--dir", str(ca_dir)
    )

    base = ca_dir / "services" / "shop" / "orders"
    assert (code, err) == (0, "")
    assert out == (
        "spiffe://cluster.local/ns/shop/sa/orders\n"
        f"  key:    {base / 'key.pem'} (mode 0600)\n"
        f"  cert:   {base / 'cert.pem'}\n"
        f"  bundle: {base / 'bundle.pem'}\n"
    )
    assert stat.S_IMODE((base / "key.pem").stat().st_mode) == 0o600
    assert (base / "bundle.pem").read_bytes() == (ca_dir / "bundle.pem").read_bytes()
    cert = cert_at(base / "cert.pem")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://cluster.local/ns/shop/sa/orders"
    ]
    assert san.get_values_for_type(x509.DNSName) == ["orders", "localhost"]
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(hours=24, minutes=5)


def test_cert_issue_with_ttl_and_sans(ca_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, _ = run(
        capsys,
        "cert", "issue", "users", "--dir", str(ca_dir), "--ttl", "90m",
        "--dns", "users.default.svc", "--dns", "users", "--ip", "10.0.0.5", "--ip", "::1",
    )  # fmt: skip

    assert code == 0
    cert = cert_at(ca_dir / "services" / "default" / "users" / "cert.pem")
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["users.default.svc", "users"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5", "::1"]
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(minutes=95)


def test_cert_issue_without_a_ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "empty"

    code, out, err = run(capsys, "cert", "issue", "orders", "--dir", str(d))

    assert (code, out) == (2, "")
    assert err == (
        f"meshware: error: dir: no CA in {d}: {d / 'ca.key'} is missing "
        f"(run 'meshware ca init --dir {d}')\n"
    )


@pytest.mark.parametrize("ttl", ["1 day", "24", "0h", "1.5h", "-1h", "²h", "99999999999999d"])
def test_cert_issue_with_a_bad_ttl(
    ca_dir: Path, capsys: pytest.CaptureFixture[str], ttl: str
) -> None:
    code, out, err = run(capsys, "cert", "issue", "orders", "--dir", str(ca_dir), f"--ttl={ttl}")

    assert (code, out) == (2, "")
    assert err == (
        "meshware: error: --ttl: expected a positive duration like '24h', '30m', '90s' or '7d', "
        f"got {ttl!r}\n"
    )
    assert not (ca_dir / "services").exists()


def test_cert_issue_with_a_bad_ip(ca_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "cert", "issue", "orders", "--dir", str(ca_dir), "--ip", "localhost")

    assert code == 2
    assert err == (
        "meshware: error: ip: 'localhost' does not appear to be an IPv4 or IPv6 address\n"
    )


def test_cert_issue_with_a_service_name_that_is_no_spiffe_path(
    ca_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "cert", "issue", "my service", "--dir", str(ca_dir))

    assert code == 2
    assert err == (
        "meshware: error: invalid SPIFFE id 'spiffe://cluster.local/ns/default/sa/my service': "
        "character ' ' is not allowed in a path (expected a-z A-Z 0-9 . - _) [path-chars]\n"
    )


# -- cert inspect ----------------------------------------------------------------------------------


def test_cert_inspect_a_service_certificate(
    ca_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run(capsys, "cert", "issue", "orders", "--dir", str(ca_dir))
    path = ca_dir / "services" / "default" / "orders" / "cert.pem"
    cert = cert_at(path)

    code, out, err = run(capsys, "cert", "inspect", str(path))

    assert (code, err) == (0, "")
    assert out == (
        "subject:    CN=orders,O=cluster.local\n"
        "spiffe id:  spiffe://cluster.local/ns/default/sa/orders\n"
        "issuer:     CN=meshware CA cluster.local,O=meshware\n"
        f"not before: {cert.not_valid_before_utc.isoformat()}\n"
        f"not after:  {cert.not_valid_after_utc.isoformat()} (valid)\n"
        f"serial:     {cert.serial_number:x}\n"
    )


def test_cert_inspect_a_bundle_lists_every_certificate(
    tmp_path: Path, ca_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    issuer = Issuer(LocalCA.load(ca_dir))
    bundle = tmp_path / "mixed.pem"
    bundle.write_text(
        (ca_dir / "ca.crt").read_text()
        + issuer.expired().pem
        + issuer.not_yet_valid().pem
        + issuer.dns_only().pem
        + issuer.two_uris().pem
    )

    code, out, _ = run(capsys, "cert", "inspect", str(bundle))

    assert code == 0
    spiffe_lines = [line for line in out.splitlines() if line.startswith("spiffe id:")]
    assert spiffe_lines == [
        "spiffe id:  spiffe://cluster.local",
        "spiffe id:  spiffe://cluster.local/ns/default/sa/orders",
        "spiffe id:  spiffe://cluster.local/ns/default/sa/orders",
        "spiffe id:  (none: the certificate has no URI SAN)",
        "spiffe id:  (none: the certificate has 2 URI SANs; exactly one SPIFFE id is allowed)",
    ]
    states = [
        line.split(" (", 1)[1].rstrip(")")
        for line in out.splitlines()
        if line.startswith("not after:")
    ]
    assert states == ["valid", "expired", "not yet valid", "valid", "valid"]


def test_cert_inspect_of_a_non_pem_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("this is not a certificate\n")

    code, out, err = run(capsys, "cert", "inspect", str(path))

    assert (code, out) == (2, "")
    assert err.startswith("meshware: error: file: not a PEM certificate: ")


def test_cert_inspect_of_a_key_file(ca_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "cert", "inspect", str(ca_dir / "ca.key"))

    assert code == 2
    assert err.startswith("meshware: error: file: not a PEM certificate: ")


def test_cert_inspect_of_a_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "cert", "inspect", str(tmp_path / "missing.pem"))

    assert code == 2
    assert err == "meshware: error: file: cannot read: No such file or directory\n"


# -- the parser itself -------------------------------------------------------------------------


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys)

    assert code == 0
    assert out.startswith("usage: meshware ")
    assert "ca" in out and "cert" in out and "serve" in out


def test_version_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])

    assert info.value.code == 0
    assert capsys.readouterr().out == f"meshware {__version__}\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["cert"], "the following arguments are required: ACTION"),
        (["cert", "issue"], "the following arguments are required: service"),
        (["ca", "init", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)

    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_installed_command_reports_its_version() -> None:
    script = Path(sys.executable).parent / "meshware"
    if not script.exists():
        script = ROOT / ".venv" / "bin" / "meshware"

    done = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, timeout=60, check=False
    )

    assert (done.returncode, done.stdout, done.stderr) == (0, f"meshware {__version__}\n", "")
