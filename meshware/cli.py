"""The ``meshware`` command line.

Exit codes: 0 success, 1 a runtime failure, 2 a usage or configuration error (the message
names the argument or file and what was expected). Two commands have their own:

- ``meshware check``: 0 when the files are valid (warnings allowed), 1 when they have errors;
- ``meshware explain``: 0 when the request is allowed, 3 when it is denied.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshware.__about__ import __version__
from meshware.exceptions import ConfigurationError, InvalidSpiffeId
from meshware.identity.ca import (
    CERT_DIR_ENV,
    DEFAULT_CERT_DIR,
    LocalCA,
    default_cert_dir,
    parse_duration,
)

if TYPE_CHECKING:
    from meshware.config.loader import ConfigReport
    from meshware.policy.authz import AuthorizationPolicy, AuthzDecision

_DIR_HELP = f"certificate directory (default: ${CERT_DIR_ENV} or ./{DEFAULT_CERT_DIR})"

EXIT_INVALID = 1
"""``meshware check``: the files have errors."""
EXIT_DENIED = 3
"""``meshware explain``: the request is denied."""


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
        default=None,
        choices=["strict", "permissive", "off", "disable"],
        help="PeerAuthentication mode (default: the --config files' mode, else strict)",
    )
    serve.add_argument(
        "--config",
        dest="config_files",
        action="append",
        default=[],
        metavar="FILE",
        help="mesh configuration file or directory (repeatable): the inbound stack's "
        "policies, JWT rules, rate limits and mTLS mode; reloaded when it changes",
    )
    serve.add_argument(
        "--reload-interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="how often the --config files are checked for changes (default: 1)",
    )
    serve.add_argument(
        "--admin-port",
        type=int,
        help="serve /meshz (the mesh's live state, JSON) in plaintext on 127.0.0.1:PORT",
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
        "--drain-seconds",
        type=float,
        default=0.0,
        help="on SIGTERM, report not-ready and keep serving this long before stopping (uvicorn)",
    )
    serve.add_argument(
        "--no-access-log", dest="access_log", action="store_false", help="no JSON access log"
    )
    serve.add_argument(
        "--access-log-file",
        metavar="PATH",
        help="write the access log to this file, buffered (e.g. /dev/stdout); default: stderr",
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

    check = commands.add_parser(
        "check", help="validate mesh configuration files offline (exit 1 on errors)"
    )
    check.add_argument("files", nargs="+", metavar="FILE", help="YAML files or directories")
    check.add_argument(
        "--namespace", default="default", help="namespace of resources that name none"
    )
    check.add_argument("--root-namespace", default="istio-system", help="the mesh's root namespace")
    check.add_argument("--service", help="also show what applies to this service")

    explain = commands.add_parser(
        "explain", help="decide one request with authorization policies and say why"
    )
    explain.add_argument(
        "--policy",
        action="append",
        required=True,
        metavar="FILE",
        help="a YAML file or directory of AuthorizationPolicies (repeatable)",
    )
    explain.add_argument(
        "--from",
        dest="source",
        metavar="PRINCIPAL",
        help="the caller: a principal (cluster.local/ns/NS/sa/SA), a spiffe:// id or a service "
        "name; omit for a caller without an mTLS identity",
    )
    explain.add_argument(
        "--namespace",
        help="the caller's namespace, when --from is a service name (default: default)",
    )
    explain.add_argument("--trust-domain", default="cluster.local", help="default: cluster.local")
    explain.add_argument(
        "--request-principal", metavar="ISS/SUB", help="a validated JWT's principal"
    )
    explain.add_argument(
        "--claim", action="append", default=[], metavar="K=V", help="a JWT claim (repeatable)"
    )
    explain.add_argument("--method", required=True)
    explain.add_argument("--path", required=True, help="the request path, with ?query if any")
    explain.add_argument(
        "--header", action="append", default=[], metavar="K=V", help="a header (repeatable)"
    )
    explain.add_argument("--host", default="", help="the Host header")
    explain.add_argument("--ip", help="the caller's address")
    explain.add_argument("--port", type=int, help="the port the request arrived on")
    explain.add_argument(
        "--service", help="apply only the policies that select this service (default: all)"
    )
    explain.add_argument("--service-namespace", default="default", help="default: default")
    explain.add_argument("--root-namespace", default="istio-system")
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
        mtls=MtlsMode.parse(args.mtls or "strict"),
        mtls_explicit=args.mtls is not None,
        config_files=tuple(args.config_files),
        reload_interval=args.reload_interval,
        admin_port=args.admin_port,
        interface=args.interface,
        workers=args.workers,
        threads=args.threads,
        trusted_proxies=tuple(args.trusted_proxy),
        log_level=args.log_level,
        extra_paths=tuple(args.app_dir),
        health_port=args.health_port,
        access_log=args.access_log,
        access_log_file=args.access_log_file,
        trace_exporter=args.trace_exporter,
        trace_sample=args.trace_sample,
        otlp_endpoint=args.otlp_endpoint,
        drain_seconds=args.drain_seconds,
    )
    serve(options)
    return 0


def _plural(count: int, word: str, plural: str | None = None) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {plural or word + 's'}"


def _check(args: argparse.Namespace) -> int:
    from meshware.config.loader import check_config

    report = check_config(args.files, namespace=args.namespace, root_namespace=args.root_namespace)
    for problem in report.errors:
        print(problem)
    for problem in report.warnings:
        print(f"warning: {problem}")
    errors = len(report.errors)
    if args.service and not errors:
        errors += _show_service(report, args)
    print(
        f"{_plural(report.documents, 'document')}, {_plural(errors, 'error')}, "
        f"{_plural(len(report.warnings), 'warning')}"
    )
    return EXIT_INVALID if errors else 0


def _show_service(report: ConfigReport, args: argparse.Namespace) -> int:
    from meshware.config.errors import MeshConfigError
    from meshware.config.loader import MeshConfig

    base = MeshConfig(
        resources=report.resources,
        namespace=args.namespace,
        root_namespace=args.root_namespace,
        source=report.source,
    )
    try:
        config = base.for_service(args.service)
    except MeshConfigError as exc:
        for problem in exc.problems:
            print(problem)
        return len(exc.problems)
    mode = config.mtls_mode.name if config.mtls_mode is not None else "not set"
    limits = len(config.rate_limit.rules) if config.rate_limit is not None else 0
    print(
        f"{args.service} ({args.namespace}): {_plural(len(config.policies), 'authorization policy', 'authorization policies')}"
        f", {_plural(len(config.jwt_rules), 'JWT rule')}, mTLS {mode}, "
        f"{_plural(limits, 'rate-limit rule')}, "
        f"{_plural(len(config.routes.virtual_services), 'virtual service')}, "
        f"{_plural(len(config.destination_rules), 'destination rule')}"
    )
    return 0


def _pairs(values: Sequence[str], option: str) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for value in values:
        key, sep, item = value.partition("=")
        if not sep or not key:
            raise ConfigurationError("expected KEY=VALUE", field=option, value=value)
        pairs.append((key, item))
    return pairs


def _claim_value(text: str) -> Any:
    # Numbers, booleans and lists as JSON writes them; anything else is a string.
    try:
        return json.loads(text)
    except ValueError:
        return text


def _caller(args: argparse.Namespace) -> tuple[str | None, str | None]:
    from meshware.identity.spiffe import SpiffeId

    given: str | None = args.source
    if given is None:
        if args.namespace is not None:
            raise ConfigurationError(
                "needs --from: a caller without an identity has no namespace",
                field="--namespace",
                value=args.namespace,
            )
        return None, None
    try:
        if given.startswith("spiffe://"):
            spiffe = SpiffeId.parse(given)
        elif "/" in given:
            spiffe = SpiffeId.parse(f"spiffe://{given}")
        else:
            spiffe = SpiffeId.for_service(args.trust_domain, args.namespace or "default", given)
    except ConfigurationError as exc:
        raise ConfigurationError(
            f"expected a principal (cluster.local/ns/NS/sa/SA), a spiffe:// id or a service "
            f"name: {exc}",
            field="--from",
            value=given,
        ) from exc
    if spiffe.namespace is None:
        raise ConfigurationError(
            "expected a workload identity (<trust-domain>/ns/<namespace>/sa/<account>)",
            field="--from",
            value=given,
        )
    if args.namespace is not None and args.namespace != spiffe.namespace:
        raise ConfigurationError(
            f"the caller {spiffe.principal} is in namespace {spiffe.namespace}",
            field="--namespace",
            value=args.namespace,
        )
    return spiffe.principal, spiffe.namespace


def _explain_policies(args: argparse.Namespace) -> tuple[list[AuthorizationPolicy], dict[str, str]]:
    """The policies to apply and, by policy name, where each rule of it is written."""
    from meshware.config.errors import MeshConfigError
    from meshware.config.loader import MeshConfig, check_config
    from meshware.policy.authz import AuthorizationPolicy

    report = check_config(
        args.policy, namespace=args.service_namespace, root_namespace=args.root_namespace
    )
    if report.errors:
        raise MeshConfigError(report.errors, report.warnings)
    resources = [r for r in report.resources if r.kind == "AuthorizationPolicy"]
    if args.service:
        config = MeshConfig(
            resources=tuple(resources),
            namespace=args.service_namespace,
            root_namespace=args.root_namespace,
        ).for_service(args.service)
        chosen = list(config.policies)
    else:
        chosen = [r.value for r in resources if isinstance(r.value, AuthorizationPolicy)]
    where: dict[str, str] = {}
    for resource in resources:
        if isinstance(resource.value, AuthorizationPolicy):
            for index, line in enumerate(resource.rule_lines):
                at = f", line {line}" if line is not None else ""
                where[f"{resource.value.name}#{index}"] = f"{resource.where}{at}"
    return chosen, where


def _explain(args: argparse.Namespace) -> int:
    from meshware.policy.authz import Authorizer
    from meshware.policy.facts import RequestFacts

    principal, namespace = _caller(args)
    policies, where = _explain_policies(args)
    claims: dict[str, Any] = {}
    for key, value in _pairs(args.claim, "--claim"):
        # iss and sub are strings by the JWT spec, even when they look like numbers.
        parsed = value if key in ("iss", "sub") else _claim_value(value)
        if key in claims:
            previous = claims[key]
            claims[key] = [*previous, parsed] if isinstance(previous, list) else [previous, parsed]
        else:
            claims[key] = parsed
    request_principal = args.request_principal
    if request_principal is not None:
        issuer, _, subject = request_principal.rpartition("/")
        if not issuer or not subject:
            raise ConfigurationError(
                "expected <issuer>/<subject>", field="--request-principal", value=request_principal
            )
        claims.setdefault("iss", issuer)
        claims.setdefault("sub", subject)
    elif isinstance(claims.get("iss"), str) and isinstance(claims.get("sub"), str):
        request_principal = f"{claims['iss']}/{claims['sub']}"
    headers: dict[str, str] = {}
    for key, value in _pairs(args.header, "--header"):
        name = key.lower()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    path, _, query = args.path.partition("?")
    if not path.startswith("/"):
        raise ConfigurationError("expected a path starting with /", field="--path", value=args.path)
    facts = RequestFacts(
        method=args.method.upper(),
        path=path,
        query=query,
        host=args.host.lower(),
        port=args.port,
        headers=headers,
        source_ip=args.ip,
        source_principal=principal,
        source_namespace=namespace,
        request_principal=request_principal,
        claims=claims,
    )
    decision = Authorizer(policies).decide(facts)
    _print_decision(facts, decision, policies, where, args)
    return 0 if decision.allowed else EXIT_DENIED


def _print_decision(
    facts: Any,
    decision: AuthzDecision,
    policies: Sequence[AuthorizationPolicy],
    where: dict[str, str],
    args: argparse.Namespace,
) -> None:
    target = f" for service {args.service}" if args.service else ""
    counts = ", ".join(
        f"{n} {action}"
        for action in ("ALLOW", "DENY", "AUDIT")
        if (n := sum(1 for p in policies if p.action == action))
    )
    dry = sum(1 for p in policies if p.dry_run)
    if dry:
        counts += f", {dry} in dry-run"
    summary = _plural(len(policies), "policy", "policies") + (f" ({counts})" if counts else "")
    print(f"request:   {facts.method} {facts.path}{'?' + facts.query if facts.query else ''}")
    if decision.code == "invalid-path":
        print("path:      invalid")
    elif decision.rewritten_path is not None:
        print(f"path:      {decision.rewritten_path} (normalized from {facts.path})")
    else:
        print(f"path:      {facts.path} (already normalized)")
    caller = facts.source_principal or "no mTLS identity"
    if facts.source_namespace:
        caller += f" (namespace {facts.source_namespace})"
    if facts.source_ip:
        caller += f" from {facts.source_ip}"
    print(f"caller:    {caller}")
    print(f"jwt:       {facts.request_principal or 'none'}")
    print(f"policies:  {summary}{target}")
    verdict = "ALLOW" if decision.allowed else "DENY"
    print(f"decision:  {verdict} ({decision.status} {decision.code})")
    print(f"reason:    {decision.reason}")
    if decision.policy is not None:
        at = where.get(f"{decision.policy}#{decision.rule}")
        print(
            f'by:        {decision.action} policy "{decision.policy}" rule {decision.rule}'
            + (f" ({at})" if at else "")
        )
    if decision.dry_run_allowed is None:
        print("dry-run:   no dry-run policies")
    else:
        for match in decision.dry_run:
            verb = "allow" if match.would_allow else "deny"
            at = where.get(f"{match.policy}#{match.rule}")
            print(
                f'dry-run:   policy "{match.policy}" rule {match.rule} would {verb}'
                + (f" ({at})" if at else "")
            )
        outcome = "allowed" if decision.dry_run_allowed else "denied"
        print(f"dry-run:   with dry-run policies enforced, the request would be {outcome}")
    audited = ", ".join(f'"{name}"' for name in decision.audited) or "none"
    print(f"audit:     {audited}")


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
        if args.command == "check":
            return _check(args)
        if args.command == "explain":
            return _explain(args)
        action = getattr(args, f"{args.command}_command")
        return handlers[(args.command, action)](args)
    except ConfigurationError as exc:
        print(f"meshware: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
