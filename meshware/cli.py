"""The ``meshware`` command line.

Exit codes: 0 success, 1 a runtime failure, 2 a usage or configuration error (the message
names the argument or file and what was expected).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Sequence
from pathlib import Path

from meshware.__about__ import __version__
from meshware.exceptions import ConfigurationError, InvalidSpiffeId
from meshware.identity.ca import (
    CERT_DIR_ENV,
    DEFAULT_CERT_DIR,
    LocalCA,
    default_cert_dir,
    parse_duration,
)

_DIR_HELP = f"certificate directory (default: ${CERT_DIR_ENV} or ./{DEFAULT_CERT_DIR})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshware",
        description="An in-process service mesh: mTLS identities, policies and resilient calls.",
    )
    parser.add_argument("--version", action="version", version=f"meshware {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    ca = commands.add_parser("ca", help="the local certificate authority")
    ca_commands = ca.add_subparsers(dest="ca_command", metavar="ACTION", required=True)
    ca_init = ca_commands.add_parser("init", help="create a CA for a trust domain")
    ca_init.add_argument("--dir", type=Path, help=_DIR_HELP)
    ca_init.add_argument("--trust-domain", default="cluster.local", help="default: cluster.local")
    ca_init.add_argument("--validity", default="3650d", help="CA lifetime (default: 3650d)")
    ca_init.add_argument("--force", action="store_true", help="replace an existing CA")

    cert = commands.add_parser("cert", help="service certificates")
    cert_commands = cert.add_subparsers(dest="cert_command", metavar="ACTION", required=True)
    issue = cert_commands.add_parser("issue", help="issue a service's key and certificate")
    issue.add_argument("service", help="the service (its SPIFFE service account)")
    issue.add_argument("--namespace", default="default", help="default: default")
    issue.add_argument("--dir", type=Path, help=_DIR_HELP)
    issue.add_argument("--ttl", default="24h", help="lifetime, e.g. 24h, 90m, 7d (default: 24h)")
    issue.add_argument(
        "--dns", action="append", help="DNS SAN (repeatable; default: SERVICE and localhost)"
    )
    issue.add_argument("--ip", action="append", help="IP SAN (repeatable; default: 127.0.0.1)")
    inspect = cert_commands.add_parser("inspect", help="show a certificate's identity and validity")
    inspect.add_argument("file", type=Path)

    serve = commands.add_parser("serve", help="serve an ASGI (uvicorn) or WSGI (gunicorn) app")
    serve.add_argument("app", metavar="MODULE:APP", help="the application to serve")
    serve.add_argument("--service", required=True, help="this service's name")
    serve.add_argument("--namespace", default="default")
    serve.add_argument("--dir", type=Path, help=_DIR_HELP)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8443)
    serve.add_argument(
        "--mtls",
        default="strict",
        choices=["strict", "permissive", "off", "disable"],
        help="PeerAuthentication mode (default: strict)",
    )
    serve.add_argument("--interface", default="auto", choices=["auto", "asgi", "wsgi"])
    serve.add_argument("--workers", type=int, default=1, help="gunicorn worker processes")
    serve.add_argument("--threads", type=int, default=8, help="threads per gunicorn worker")
    serve.add_argument(
        "--trusted-proxy",
        action="append",
        default=[],
        metavar="CIDR|SPIFFE_ID",
        help="a peer allowed to send x-forwarded-client-cert (repeatable)",
    )
    serve.add_argument(
        "--health-port",
        type=int,
        help="also serve /livez and /readyz in plaintext on this port (probes carry no cert)",
    )
    serve.add_argument(
        "--no-access-log", dest="access_log", action="store_false", help="no JSON access log"
    )
    serve.add_argument("--trace-exporter", default="none", choices=["none", "console", "otlp"])
    serve.add_argument(
        "--trace-sample", type=float, default=0.01, help="parent-based ratio (default: 0.01)"
    )
    serve.add_argument(
        "--otlp-endpoint", help="OTLP/HTTP collector URL (with --trace-exporter otlp)"
    )
    serve.add_argument("--app-dir", action="append", default=[], help="add to sys.path first")
    serve.add_argument("--log-level", default="warning")
    return parser


def _ca_init(args: argparse.Namespace) -> int:
    validity = parse_duration(args.validity, field="--validity")
    try:
        ca = LocalCA.init(
            args.dir, trust_domain=args.trust_domain, validity=validity, force=args.force
        )
    except InvalidSpiffeId as exc:
        # Only the trust domain becomes a SPIFFE id here: name the option that carried it.
        raise ConfigurationError(str(exc), field="--trust-domain", value=args.trust_domain) from exc
    print(f"CA for trust domain {ca.trust_domain} in {ca.directory}")
    print(f"  key:    {ca.directory / 'ca.key'} (mode 0600)")
    print(f"  cert:   {ca.directory / 'ca.crt'}")
    print(f"  bundle: {ca.directory / 'bundle.pem'}")
    return 0


def _cert_issue(args: argparse.Namespace) -> int:
    ca = LocalCA.load(args.dir)
    paths = ca.issue(
        args.service,
        namespace=args.namespace,
        ttl=parse_duration(args.ttl, field="--ttl"),
        dns_names=args.dns,
        ip_addresses=args.ip,
    )
    print(f"spiffe://{ca.trust_domain}/ns/{args.namespace}/sa/{args.service}")
    print(f"  key:    {paths.key} (mode 0600)")
    print(f"  cert:   {paths.cert}")
    print(f"  bundle: {paths.bundle}")
    return 0


def _cert_inspect(args: argparse.Namespace) -> int:
    from cryptography import x509

    from meshware.exceptions import CertificateRejected
    from meshware.identity.bundle import spiffe_id_of

    try:
        data = args.file.read_bytes()
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read: {exc.strerror}", field="file", value=str(args.file)
        ) from exc
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ConfigurationError(
            f"not a PEM certificate: {exc}", field="file", value=str(args.file)
        ) from exc
    now = dt.datetime.now(dt.timezone.utc)
    for cert in certs:
        try:
            spiffe = spiffe_id_of(cert).uri
        except CertificateRejected as exc:
            spiffe = f"(none: {exc})"
        state = "valid"
        if now < cert.not_valid_before_utc:
            state = "not yet valid"
        elif now > cert.not_valid_after_utc:
            state = "expired"
        print(f"subject:    {cert.subject.rfc4514_string()}")
        print(f"spiffe id:  {spiffe}")
        print(f"issuer:     {cert.issuer.rfc4514_string()}")
        print(f"not before: {cert.not_valid_before_utc.isoformat()}")
        print(f"not after:  {cert.not_valid_after_utc.isoformat()} ({state})")
        print(f"serial:     {cert.serial_number:x}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from meshware.server.serve import ServeOptions, serve
    from meshware.server.tls import MtlsMode

    options = ServeOptions(
        app=args.app,
        service=args.service,
        namespace=args.namespace,
        cert_dir=args.dir or default_cert_dir(),
        host=args.host,
        port=args.port,
        mtls=MtlsMode.parse(args.mtls),
        interface=args.interface,
        workers=args.workers,
        threads=args.threads,
        trusted_proxies=tuple(args.trusted_proxy),
        log_level=args.log_level,
        extra_paths=tuple(args.app_dir),
        health_port=args.health_port,
        access_log=args.access_log,
        trace_exporter=args.trace_exporter,
        trace_sample=args.trace_sample,
        otlp_endpoint=args.otlp_endpoint,
    )
    serve(options)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {
        ("ca", "init"): _ca_init,
        ("cert", "issue"): _cert_issue,
        ("cert", "inspect"): _cert_inspect,
    }
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command == "serve":
            return _serve(args)
        action = getattr(args, f"{args.command}_command")
        return handlers[(args.command, action)](args)
    except ConfigurationError as exc:
        print(f"meshware: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
