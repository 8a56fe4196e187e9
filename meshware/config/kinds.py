"""Per-kind parsing of mesh resources: ``apiVersion``/``kind`` dispatch, metadata, targets.

One function per kind turns a document into the frozen object meshware runs on, reporting
every problem it finds into a :class:`DocumentContext` instead of stopping at the first one.
The kinds and the API versions accepted:

============================  ==========================================================
``AuthorizationPolicy``       ``security.istio.io/v1``, ``security.istio.io/v1beta1``
``PeerAuthentication``        ``security.istio.io/v1``, ``security.istio.io/v1beta1``
``RequestAuthentication``     ``security.istio.io/v1``, ``security.istio.io/v1beta1``
``VirtualService``            ``networking.istio.io/v1``, ``v1beta1``, ``v1alpha3``
``DestinationRule``           ``networking.istio.io/v1``, ``v1beta1``, ``v1alpha3``
``ServiceRegistry``           ``meshware.dev/v1alpha1`` (endpoints per service)
``RateLimit``                 ``meshware.dev/v1alpha1`` (rate-limit rules and backend)
============================  ==========================================================

A resource of the security kinds (and ``RateLimit``) applies to the workloads its
``metadata.namespace`` and its ``spec.selector.matchLabels`` / ``spec.targetRef(s)`` name,
as in Istio: no selector means every workload of the namespace (of every namespace when the
resource is in the root namespace, ``istio-system``); a selector must be ``{app: <service>}``,
because meshware knows a workload by its service name, which is its ``app`` label.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, cast

from meshware.config.errors import ConfigProblem, Severity
from meshware.exceptions import ConfigurationError
from meshware.outbound.destination import DestinationRule, TrafficPolicy
from meshware.outbound.discovery import StaticRegistry
from meshware.outbound.routing import HttpRoute, VirtualService
from meshware.policy.authz import AuthorizationPolicy, Authorizer
from meshware.policy.jwks import JwksCache
from meshware.policy.jwt import JwtRule
from meshware.policy.ratelimit import RateLimitMatch, RateLimitPolicy, RateLimitRule
from meshware.server.tls import MtlsMode

__all__ = [
    "DRY_RUN_ANNOTATION",
    "KINDS",
    "MESHWARE_VERSIONS",
    "NETWORKING_VERSIONS",
    "SECURITY_VERSIONS",
    "DocumentContext",
    "KindInfo",
    "LoadedResource",
    "PeerMtls",
    "Target",
    "parse_resource",
]

SECURITY_VERSIONS: Final = ("security.istio.io/v1", "security.istio.io/v1beta1")
"""The ``apiVersion`` values accepted for Istio's security kinds."""
NETWORKING_VERSIONS: Final = (
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
)
"""The ``apiVersion`` values accepted for Istio's networking kinds."""
MESHWARE_VERSIONS: Final = ("meshware.dev/v1alpha1",)
"""The ``apiVersion`` values accepted for meshware's own kinds."""
DRY_RUN_ANNOTATION: Final = "istio.io/dry-run"
"""The annotation that puts an AuthorizationPolicy in dry-run mode (``"true"``/``"false"``)."""

_TOP_KEYS = ("apiVersion", "kind", "metadata", "spec")
_METADATA_KEYS = ("name", "namespace", "labels", "annotations")
# Written by the API server; harmless in a manifest exported with `kubectl get -o yaml`.
_K8S_MANAGED = frozenset(
    {
        "uid",
        "resourceVersion",
        "generation",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "managedFields",
        "selfLink",
        "ownerReferences",
        "finalizers",
        "generateName",
    }
)
_NAME = re.compile(r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*")
_NAMESPACE = re.compile(r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?")
_TARGET_KEYS = ("selector", "targetRef", "targetRefs")
_CAMEL = re.compile(r"_([a-z])")

# Kinds meshware knows of but does not read, and why.
_UNSUPPORTED_KINDS: Final[Mapping[str, str]] = {
    "Gateway": "meshware has no gateways; it runs inside each service",
    "ServiceEntry": "list external endpoints in a meshware.dev/v1alpha1 ServiceRegistry",
    "Sidecar": "there is no sidecar to configure",
    "EnvoyFilter": "there is no Envoy to patch",
    "WorkloadEntry": "list endpoints in a meshware.dev/v1alpha1 ServiceRegistry",
    "WorkloadGroup": "list endpoints in a meshware.dev/v1alpha1 ServiceRegistry",
    "Telemetry": "configure metrics, tracing and access logs in code (InboundConfig)",
    "WasmPlugin": "there is no proxy to extend",
    "ProxyConfig": "there is no proxy to configure",
    "HTTPRoute": "Gateway API routes are not read; write an Istio VirtualService",
    "GRPCRoute": "Gateway API routes are not read; write an Istio VirtualService",
    "TCPRoute": "only HTTP routing is supported",
    "TLSRoute": "only HTTP routing is supported",
}


def _type_name(value: object) -> str:
    return type(value).__name__


def _camel(text: str) -> str:
    return _CAMEL.sub(lambda m: m.group(1).upper(), text)


def _reindex(exc: ConfigurationError, old: str, new: str) -> ConfigurationError:
    """The same error with the ``old`` path prefix of its field replaced by ``new``."""
    own = exc.field
    if own is None or not own.startswith(old):
        return exc
    message = str(exc)
    if message.startswith(f"{own}: "):
        message = message[len(own) + 2 :]
    return ConfigurationError(message, field=new + own[len(old) :], value=exc.value)


# -- what a loaded resource is -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    """The workloads a scoped resource applies to, within its namespace.

    Attributes:
        apps: the services (``app`` labels) selected, or ``None`` for every workload of
            the namespace.
        via: how they were chosen: ``"namespace"`` (no selector), ``"selector"``,
            ``"targetRef"`` or ``"targetRefs"``.
    """

    apps: frozenset[str] | None = None
    via: str = "namespace"

    def matches(self, service: str | None) -> bool:
        """Whether the target takes in ``service`` (``None``: a workload without an app)."""
        return self.apps is None or (service is not None and service in self.apps)

    def overlaps(self, other: Target) -> bool:
        """Whether one workload can be taken in by both targets."""
        return self.apps is None or other.apps is None or bool(self.apps & other.apps)


@dataclass(frozen=True, slots=True)
class PeerMtls:
    """The value of a PeerAuthentication: its ``mtls.mode``, ``None`` for ``UNSET``
    (inherit from the namespace, then the mesh)."""

    mode: MtlsMode | None


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadedResource:
    """One resource read from a file, with the object meshware built from it.

    Attributes:
        kind: ``"AuthorizationPolicy"``, ``"VirtualService"``, ...
        api_version: the ``apiVersion`` as written.
        name: ``metadata.name``.
        namespace: ``metadata.namespace``, or the namespace the configuration was loaded
            for when the resource names none.
        target: the workloads it applies to (security kinds and ``RateLimit``); ``None``
            for kinds that apply to every service that loads them (``VirtualService``,
            ``DestinationRule``, ``ServiceRegistry``).
        value: what it became: an :class:`~meshware.policy.authz.AuthorizationPolicy`, a
            :class:`PeerMtls`, a tuple of :class:`~meshware.policy.jwt.JwtRule`, a
            :class:`~meshware.outbound.routing.VirtualService`, a
            :class:`~meshware.outbound.destination.DestinationRule`, a
            :class:`~meshware.outbound.discovery.StaticRegistry` or a
            :class:`~meshware.policy.ratelimit.RateLimitPolicy`.
        file: the file it came from, as given (``"<text>"`` for text).
        document: its document's position in the file, counted from 1.
        item: its index in the ``items`` of a ``kind: List`` document, else ``None``.
        line: the line its document (or list item) starts on, counted from 1.
        rule_lines: for an AuthorizationPolicy, the line of each of its rules.
    """

    kind: str
    api_version: str
    name: str
    namespace: str
    target: Target | None
    value: object
    file: str | None = None
    document: int = 1
    item: int | None = None
    line: int | None = None
    rule_lines: tuple[int | None, ...] = ()

    @property
    def where(self) -> str:
        """``"mesh.yaml: document 3"`` (with ``, items[2]`` inside a List)."""
        text = f"document {self.document}"
        if self.item is not None:
            text += f", items[{self.item}]"
        return f"{self.file}: {text}" if self.file is not None else text

    @property
    def field_prefix(self) -> str:
        """The path of the resource inside its document: ``""``, or ``"items[2]."``."""
        return f"items[{self.item}]." if self.item is not None else ""

    def applies_to(self, service: str | None, namespace: str, root_namespace: str) -> bool:
        """Whether the resource applies to ``service`` running in ``namespace``.

        Unscoped kinds apply everywhere. A scoped resource applies when it is in the
        service's namespace or in the root namespace, and its target takes the service in.
        """
        if self.target is None:
            return True
        if self.namespace not in (namespace, root_namespace):
            return False
        return self.target.matches(service)

    def specificity(self, namespace: str, root_namespace: str) -> int:
        """How specific a scoped resource is for a service of ``namespace``: 2 for a
        selector or target reference, 1 namespace-wide, 0 mesh-wide (root namespace)."""
        if self.target is not None and self.target.apps is not None:
            return 2
        return 1 if self.namespace == namespace else 0


# -- collecting the problems of one document ---------------------------------------------------


class DocumentContext:
    """Collects the errors and warnings of one document (or one item of a ``List``).

    Args:
        file: the file as displayed in messages.
        document: the document's position, counted from 1.
        locate: maps a field path of the document to its line (``None`` when unknown).
        namespace: the namespace of resources that name none.
        root_namespace: the mesh's root namespace.
        directory: the directory relative ``jwksFile`` paths are resolved against.
        item: the index in a ``List``'s ``items``, prefixed to every field path.
    """

    __slots__ = (
        "directory",
        "document",
        "errors",
        "file",
        "item",
        "locate",
        "namespace",
        "prefix",
        "resource",
        "root_namespace",
        "warnings",
    )

    def __init__(
        self,
        *,
        file: str | None,
        document: int,
        locate: Callable[[str], int | None],
        namespace: str,
        root_namespace: str,
        directory: Path | None = None,
        item: int | None = None,
    ) -> None:
        self.file = file
        self.document = document
        self.locate = locate
        self.namespace = namespace
        self.root_namespace = root_namespace
        self.directory = directory
        self.item = item
        self.prefix = f"items[{item}]." if item is not None else ""
        self.resource: str | None = None
        self.errors: list[ConfigProblem] = []
        self.warnings: list[ConfigProblem] = []

    def _problem(
        self, message: str, field: str | None, value: object, severity: Severity
    ) -> ConfigProblem:
        full = self.prefix + field if field else (self.prefix[:-1] or None)
        return ConfigProblem(
            message=message,
            file=self.file,
            document=self.document,
            resource=self.resource,
            line=self.locate(full or ""),
            field=full,
            value=value,
            severity=severity,
        )

    def error(self, message: str, field: str | None = None, value: object = None) -> None:
        """Record an error at ``field`` (a path inside the resource)."""
        self.errors.append(self._problem(message, field, value, "error"))

    def warn(self, message: str, field: str | None = None, value: object = None) -> None:
        """Record a warning at ``field``: something harmless that meshware ignores."""
        self.warnings.append(self._problem(message, field, value, "warning"))

    def capture(
        self,
        exc: ConfigurationError,
        prefix: str = "",
        rename: Callable[[str], str] | None = None,
    ) -> None:
        """Record an error raised by a parser, its field placed under ``prefix``."""
        own = exc.field
        message = str(exc)
        if own and message.startswith(f"{own}: "):
            message = message[len(own) + 2 :]
        if own and rename is not None:
            own = rename(own)
        field = prefix + own if own else (prefix.rstrip(".") or None)
        self.error(message, field, exc.value)

    @property
    def failed(self) -> int:
        """How many errors have been recorded so far."""
        return len(self.errors)


# -- metadata, spec and targets ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Meta:
    name: str
    namespace: str
    dry_run: bool


def _metadata(ctx: DocumentContext, metadata: object, kind: str) -> _Meta:
    name = "unnamed"
    namespace = ctx.namespace
    dry_run = False
    if metadata is None:
        ctx.error("is required; expected a mapping with at least 'name'", "metadata")
        return _Meta(name, namespace, dry_run)
    if not isinstance(metadata, Mapping):
        ctx.error(f"expected a mapping, got {_type_name(metadata)}", "metadata", metadata)
        return _Meta(name, namespace, dry_run)
    given = metadata.get("name")
    if given is None:
        ctx.error("is required", "metadata.name")
    elif not isinstance(given, str) or len(given) > 253 or not _NAME.fullmatch(given):
        ctx.error(
            "expected a Kubernetes name: lower-case letters, digits, '-' and '.', "
            "starting and ending with a letter or digit",
            "metadata.name",
            given,
        )
    else:
        name = given
    ctx.resource = f"{kind} {given}" if isinstance(given, str) and given else kind
    given_ns = metadata.get("namespace")
    if given_ns is not None:
        if (
            not isinstance(given_ns, str)
            or len(given_ns) > 63
            or not _NAMESPACE.fullmatch(given_ns)
        ):
            ctx.error(
                "expected a Kubernetes namespace name: lower-case letters, digits and '-'",
                "metadata.namespace",
                given_ns,
            )
        else:
            namespace = given_ns
    for key, value in metadata.items():
        if key in ("name", "namespace"):
            continue
        if key == "labels":
            if value is not None and not isinstance(value, Mapping):
                ctx.error(f"expected a mapping, got {_type_name(value)}", "metadata.labels", value)
            elif value:
                ctx.warn("ignored: labels select nothing in meshware", "metadata.labels")
        elif key == "annotations":
            dry_run = _annotations(ctx, value, kind)
        elif key in _K8S_MANAGED:
            ctx.warn("ignored: written by the Kubernetes API server", f"metadata.{key}")
        else:
            ctx.error(
                f"unknown field; expected one of {', '.join(_METADATA_KEYS)}",
                f"metadata.{key}",
                value,
            )
    return _Meta(name, namespace, dry_run)


def _annotations(ctx: DocumentContext, value: object, kind: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, Mapping):
        ctx.error(f"expected a mapping, got {_type_name(value)}", "metadata.annotations", value)
        return False
    dry_run = False
    for key, item in value.items():
        where = f'metadata.annotations["{key}"]'
        if key != DRY_RUN_ANNOTATION:
            ctx.warn(f"ignored: meshware reads no annotation but {DRY_RUN_ANNOTATION}", where)
        elif kind != "AuthorizationPolicy":
            ctx.error(
                f"{DRY_RUN_ANNOTATION} applies to AuthorizationPolicy only; this {kind} would "
                "be enforced",
                where,
                item,
            )
        elif item not in ("true", "false"):
            ctx.error('expected the string "true" or "false"', where, item)
        else:
            dry_run = item == "true"
    return dry_run


def _spec(ctx: DocumentContext, spec: object) -> Mapping[str, Any] | None:
    if spec is None:
        return {}
    if not isinstance(spec, Mapping):
        ctx.error(f"expected a mapping, got {_type_name(spec)}", "spec", spec)
        return None
    return spec


def _check_keys(
    ctx: DocumentContext,
    block: Mapping[str, Any],
    at: str,
    known: Iterable[str],
    unsupported: Mapping[str, str] | None = None,
) -> None:
    allowed = tuple(known)
    for key, value in block.items():
        if key in allowed:
            continue
        if unsupported is not None and key in unsupported:
            ctx.error(f"is not supported: {unsupported[key]}", f"{at}.{key}", value)
        else:
            ctx.error(f"unknown field; expected one of {', '.join(allowed)}", f"{at}.{key}", value)


def _target(ctx: DocumentContext, spec: Mapping[str, Any], namespace: str, *, refs: bool) -> Target:
    present = [key for key in _TARGET_KEYS if spec.get(key) is not None]
    if len(present) > 1:
        ctx.error(
            "set at most one of selector, targetRef and targetRefs",
            f"spec.{present[1]}",
            spec[present[1]],
        )
        return Target()
    if not present:
        return Target()
    key = present[0]
    value = spec[key]
    if key == "selector":
        return _selector(ctx, value)
    if not refs:
        ctx.error("unknown field; expected selector", f"spec.{key}", value)
        return Target()
    if key == "targetRef":
        app = _target_ref(ctx, value, "spec.targetRef", namespace)
        return Target(frozenset({app}) if app else frozenset(), "targetRef")
    if isinstance(value, (str, bytes)) or not isinstance(value, list) or not value:
        ctx.error("expected a non-empty list of target references", "spec.targetRefs", value)
        return Target()
    apps = {
        _target_ref(ctx, item, f"spec.targetRefs[{i}]", namespace) for i, item in enumerate(value)
    }
    return Target(frozenset(app for app in apps if app), "targetRefs")


def _selector(ctx: DocumentContext, value: object) -> Target:
    if not isinstance(value, Mapping):
        ctx.error(f"expected a mapping, got {_type_name(value)}", "spec.selector", value)
        return Target()
    _check_keys(ctx, value, "spec.selector", ("matchLabels",))
    labels = value.get("matchLabels")
    if labels is None or labels == {}:
        return Target()  # an empty selector selects every workload, as in Istio
    if not isinstance(labels, Mapping):
        ctx.error(
            f"expected a mapping, got {_type_name(labels)}", "spec.selector.matchLabels", labels
        )
        return Target()
    app: str | None = None
    for label, item in labels.items():
        where = f"spec.selector.matchLabels.{label}"
        if label != "app":
            ctx.error(
                "unsupported label: meshware knows a workload by its service name, which is "
                "its app label; select with {app: <service>}",
                where,
                item,
            )
        elif not isinstance(item, str) or not item:
            ctx.error("expected the service's name", where, item)
        else:
            app = item
    return Target(frozenset({app}) if app else frozenset(), "selector")


def _target_ref(ctx: DocumentContext, value: object, at: str, namespace: str) -> str | None:
    if not isinstance(value, Mapping):
        ctx.error(f"expected a mapping, got {_type_name(value)}", at, value)
        return None
    _check_keys(ctx, value, at, ("group", "kind", "name", "namespace"))
    kind = value.get("kind")
    group = value.get("group", "")
    if kind == "Gateway":
        ctx.error(
            "is not supported: meshware has no gateways; target a Service or use a selector",
            f"{at}.kind",
            kind,
        )
        return None
    if kind != "Service" or group not in ("", "core", None):
        ctx.error("expected a core Service reference (kind: Service)", f"{at}.kind", kind)
        return None
    ref_ns = value.get("namespace")
    if ref_ns is not None and ref_ns != namespace:
        ctx.error(
            f"expected the resource's own namespace ({namespace}); a policy applies to "
            "services of its namespace only",
            f"{at}.namespace",
            ref_ns,
        )
    name = value.get("name")
    if not isinstance(name, str) or not name:
        ctx.error("expected the service's name", f"{at}.name", name)
        return None
    return name


# -- the kinds ---------------------------------------------------------------------------------

_AUTHZ_PATH = re.compile(r"policies\[0\]\.rules\[(\d+)\]\.to\[(\d+)\]\.(paths|not_paths)(.*)")


def _authz_field(name: str) -> str:
    # Authorizer errors name python fields; point them at the manifest instead.
    if name == "dry_run":
        return f'metadata.annotations["{DRY_RUN_ANNOTATION}"]'
    m = _AUTHZ_PATH.fullmatch(name)
    if m:
        rule, op, key, rest = m.groups()
        return f"spec.rules[{rule}].to[{op}].operation.{_camel(key)}{rest}"
    return "spec." + name


def _authorization_policy(
    ctx: DocumentContext, spec: Mapping[str, Any], meta: _Meta
) -> AuthorizationPolicy | None:
    body = {k: v for k, v in spec.items() if k not in _TARGET_KEYS}
    before = ctx.failed
    rules = body.get("rules")
    if isinstance(rules, list):
        # One rule at a time, so that every broken rule is reported, not only the first.
        for index, rule in enumerate(rules):
            try:
                AuthorizationPolicy.from_mapping(meta.name, {"rules": [rule]})
            except ConfigurationError as exc:
                ctx.capture(_reindex(exc, "rules[0]", f"rules[{index}]"), "spec.")
        others = {k: v for k, v in body.items() if k != "rules"}
        try:
            AuthorizationPolicy.from_mapping(meta.name, others)
        except ConfigurationError as exc:
            ctx.capture(exc, "spec.")
    if ctx.failed > before:
        return None
    name = meta.name if meta.namespace == ctx.namespace else f"{meta.namespace}/{meta.name}"
    try:
        policy = AuthorizationPolicy.from_mapping(name, body, dry_run=meta.dry_run)
        Authorizer([policy])  # paths that can never match are refused here
    except ConfigurationError as exc:
        ctx.capture(exc, rename=_authz_field)
        return None
    return policy


_MTLS_MODES: Final[Mapping[str, MtlsMode | None]] = {
    "STRICT": MtlsMode.STRICT,
    "PERMISSIVE": MtlsMode.PERMISSIVE,
    "DISABLE": MtlsMode.DISABLE,
    "UNSET": None,
}


def _peer_authentication(
    ctx: DocumentContext, spec: Mapping[str, Any], meta: _Meta
) -> PeerMtls | None:
    _check_keys(
        ctx,
        {k: v for k, v in spec.items() if k not in _TARGET_KEYS},
        "spec",
        ("selector", "mtls"),
        {
            "portLevelMtls": "a service has one mTLS mode for its port; per-port modes are "
            "not supported"
        },
    )
    mtls = spec.get("mtls")
    if mtls is None:
        return PeerMtls(None)
    if not isinstance(mtls, Mapping):
        ctx.error(f"expected a mapping, got {_type_name(mtls)}", "spec.mtls", mtls)
        return None
    _check_keys(ctx, mtls, "spec.mtls", ("mode",))
    mode = mtls.get("mode", "UNSET")
    if not isinstance(mode, str) or mode not in _MTLS_MODES:
        ctx.error("expected one of STRICT, PERMISSIVE, DISABLE, UNSET", "spec.mtls.mode", mode)
        return None
    return PeerMtls(_MTLS_MODES[mode])


def _request_authentication(
    ctx: DocumentContext, spec: Mapping[str, Any], meta: _Meta
) -> tuple[JwtRule, ...] | None:
    _check_keys(
        ctx, {k: v for k, v in spec.items() if k not in _TARGET_KEYS}, "spec", ("jwtRules",)
    )
    given = spec.get("jwtRules")
    if given is None:
        ctx.warn("has no jwtRules; the resource has no effect", "spec")
        return ()
    if isinstance(given, (str, bytes)) or not isinstance(given, list):
        ctx.error(f"expected a list of rules, got {_type_name(given)}", "spec.jwtRules", given)
        return None
    rules: list[JwtRule] = []
    issuers: dict[str, int] = {}
    for index, item in enumerate(given):
        at = f"spec.jwtRules[{index}]"
        try:
            rule = JwtRule.from_mapping(item, path=at)
        except ConfigurationError as exc:
            ctx.capture(exc)
            continue
        if rule.jwks_file is not None and ctx.directory is not None:
            path = Path(rule.jwks_file)
            if not path.is_absolute():
                # A file next to the manifest, wherever the process was started from.
                rule = replace(rule, jwks_file=str(ctx.directory / path))
        if rule.jwks_uri is None:
            try:
                JwksCache.from_rule(rule, name=at)
            except ConfigurationError as exc:
                ctx.capture(exc, rename=_camel)
                continue
        if rule.issuer in issuers:
            ctx.error(
                f"duplicate issuer (also spec.jwtRules[{issuers[rule.issuer]}]); each issuer "
                "needs exactly one rule",
                f"{at}.issuer",
                rule.issuer,
            )
            continue
        issuers[rule.issuer] = index
        rules.append(rule)
    return tuple(rules)


_RESERVED = ("apiVersion", "kind", "metadata", "spec")


def _virtual_service(
    ctx: DocumentContext, spec: Mapping[str, Any], meta: _Meta
) -> VirtualService | None:
    before = ctx.failed
    for key in _RESERVED:
        if key in spec:
            ctx.error("unknown field; expected one of hosts, http", f"spec.{key}", spec[key])
    if spec.get("gateways") == ["mesh"]:
        # Istio's name for "every sidecar": exactly where meshware routes, so it changes nothing.
        ctx.warn("ignored: 'mesh' (the sidecars) is where meshware routes anyway", "spec.gateways")
        spec = {k: v for k, v in spec.items() if k != "gateways"}
    head: VirtualService | None = None
    if ctx.failed == before:
        try:
            head = VirtualService.from_mapping(
                {k: v for k, v in spec.items() if k != "http"}, field="spec"
            )
        except ConfigurationError as exc:
            ctx.capture(exc)
    given = spec.get("http")
    routes: list[HttpRoute] = []
    if given is not None:
        if isinstance(given, (str, bytes)) or not isinstance(given, list):
            ctx.error(f"expected a list of routes, got {_type_name(given)}", "spec.http", given)
        else:
            for index, item in enumerate(given):
                try:
                    routes.append(HttpRoute.from_mapping(item, field=f"spec.http[{index}]"))
                except ConfigurationError as exc:
                    ctx.capture(exc)
    if ctx.failed > before or head is None:
        return None
    if not routes:
        ctx.warn("has no http routes; the resource has no effect", "spec")
    try:
        return VirtualService(hosts=head.hosts, http=tuple(routes), name=meta.name)
    except ConfigurationError as exc:
        ctx.capture(exc, "spec.")
        return None


def _traffic_policy(ctx: DocumentContext, value: object, at: str) -> None:
    # One block at a time (loadBalancer, connectionPool, ...), so each reports its error.
    if not isinstance(value, Mapping) or len(value) < 2:
        blocks: list[object] = [value]
    else:
        blocks = [{key: item} for key, item in value.items()]
    for block in blocks:
        try:
            # from_mapping checks that the block is a mapping, and says so when it is not.
            TrafficPolicy.from_mapping(cast("Mapping[str, Any]", block), path=at)
        except ConfigurationError as exc:
            ctx.capture(exc)


def _destination_rule(
    ctx: DocumentContext, spec: Mapping[str, Any], meta: _Meta
) -> DestinationRule | None:
    before = ctx.failed
    head_spec = {k: v for k, v in spec.items() if k not in ("subsets", "trafficPolicy")}
    host = "placeholder"
    try:
        host = DestinationRule.from_mapping(head_spec, path="spec").host
    except ConfigurationError as exc:
        ctx.capture(exc)
    if spec.get("trafficPolicy") is not None:
        _traffic_policy(ctx, spec["trafficPolicy"], "spec.trafficPolicy")
    subsets = spec.get("subsets")
    if subsets is not None:
        if isinstance(subsets, (str, bytes)) or not isinstance(subsets, list):
            ctx.error(
                f"expected a list of subsets, got {_type_name(subsets)}", "spec.subsets", subsets
            )
        else:
            for index, subset in enumerate(subsets):
                at = f"spec.subsets[{index}]"
                policy = subset.get("trafficPolicy") if isinstance(subset, Mapping) else None
                if policy is not None:
                    subset = {k: v for k, v in subset.items() if k != "trafficPolicy"}
                    _traffic_policy(ctx, policy, f"{at}.trafficPolicy")
                try:
                    DestinationRule.from_mapping({"host": host, "subsets": [subset]}, path="spec")
                except ConfigurationError as exc:
                    ctx.capture(_reindex(exc, "spec.subsets[0]", at))
    if ctx.failed > before:
        return None
    try:
        return DestinationRule.from_mapping(
            spec, path="spec", name=meta.name, namespace=meta.namespace
        )
    except ConfigurationError as exc:
        ctx.capture(exc)
        return None


def _service_registry(
    ctx: DocumentContext, spec: Mapping[str, Any], meta: _Meta
) -> StaticRegistry | None:
    before = ctx.failed
    _check_keys(ctx, spec, "spec", ("services",))
    services = spec.get("services")
    if services is None:
        ctx.warn("lists no services; the resource has no effect", "spec")
    elif not isinstance(services, Mapping):
        ctx.error(
            "expected a mapping of service names to {endpoints: [...]}", "spec.services", services
        )
    else:
        for name, service in services.items():
            try:
                StaticRegistry.from_mapping({"services": {name: service}}, field="spec")
            except ConfigurationError as exc:
                ctx.capture(exc)
    if ctx.failed > before:
        return None
    try:
        return StaticRegistry.from_mapping({"services": services or {}}, field="spec")
    except ConfigurationError as exc:
        ctx.capture(exc)
        return None


_RATE_LIMIT_KEYS = ("rules", "backend", "failureMode", "headers", "keyPrefix")
_RULE_KEYS = ("name", "rate", "key", "match", "shadow")
_MATCH_KEYS = {"methods": "methods", "pathPrefixes": "path_prefixes", "routes": "routes"}


def _strings(ctx: DocumentContext, value: object, at: str) -> tuple[str, ...] | None:
    if isinstance(value, (str, bytes)) or not isinstance(value, list):
        ctx.error(f"expected a list of strings, got {_type_name(value)}", at, value)
        return None
    for index, item in enumerate(value):
        if not isinstance(item, str):
            ctx.error(f"expected a string, got {_type_name(item)}", f"{at}[{index}]", item)
            return None
    return tuple(value)


def _rate_limit_rule(ctx: DocumentContext, item: object, at: str) -> RateLimitRule | None:
    if not isinstance(item, Mapping):
        ctx.error(f"expected a mapping, got {_type_name(item)}", at, item)
        return None
    before = ctx.failed
    _check_keys(ctx, item, at, _RULE_KEYS)
    for required in ("name", "rate"):
        if item.get(required) is None:
            ctx.error("is required", f"{at}.{required}")
    key: Any = item.get("key", "principal")
    if isinstance(key, list):
        parts = _strings(ctx, key, f"{at}.key")
        key = parts if parts is not None else "principal"
    elif not isinstance(key, str):
        ctx.error(
            "expected a key kind ('principal', 'header:x-api-key', ...) or a list of them",
            f"{at}.key",
            key,
        )
    match: RateLimitMatch | None = None
    given = item.get("match")
    if given is not None:
        if not isinstance(given, Mapping):
            ctx.error(f"expected a mapping, got {_type_name(given)}", f"{at}.match", given)
        else:
            _check_keys(ctx, given, f"{at}.match", _MATCH_KEYS)
            kwargs: dict[str, tuple[str, ...]] = {}
            for name, python in _MATCH_KEYS.items():
                if given.get(name) is not None:
                    values = _strings(ctx, given[name], f"{at}.match.{name}")
                    if values is not None:
                        kwargs[python] = values
            if ctx.failed == before:
                try:
                    match = RateLimitMatch(**kwargs)
                except ConfigurationError as exc:
                    ctx.capture(exc, f"{at}.", rename=_camel)
    shadow = item.get("shadow", False)
    if not isinstance(shadow, bool):
        ctx.error("expected true or false", f"{at}.shadow", shadow)
    if ctx.failed > before:
        return None
    try:
        return RateLimitRule(
            name=item["name"], rate=item["rate"], key=key, match=match, shadow=shadow
        )
    except ConfigurationError as exc:
        ctx.capture(exc, f"{at}.", rename=_camel)
        return None


def _rate_limit(
    ctx: DocumentContext, spec: Mapping[str, Any], meta: _Meta
) -> RateLimitPolicy | None:
    before = ctx.failed
    body = {k: v for k, v in spec.items() if k not in _TARGET_KEYS}
    _check_keys(ctx, body, "spec", _RATE_LIMIT_KEYS)
    given = body.get("rules")
    rules: list[RateLimitRule] = []
    if given is None:
        ctx.warn("has no rules; the resource has no effect", "spec")
    elif isinstance(given, (str, bytes)) or not isinstance(given, list):
        ctx.error(f"expected a list of rules, got {_type_name(given)}", "spec.rules", given)
    else:
        for index, item in enumerate(given):
            rule = _rate_limit_rule(ctx, item, f"spec.rules[{index}]")
            if rule is not None:
                rules.append(rule)
    kwargs: dict[str, Any] = {"rules": tuple(rules)}
    for key, python in (
        ("backend", "backend"),
        ("failureMode", "failure_mode"),
        ("headers", "headers"),
        ("keyPrefix", "key_prefix"),
    ):
        if body.get(key) is not None:
            kwargs[python] = body[key]
    if ctx.failed > before:
        return None
    try:
        return RateLimitPolicy(**kwargs)
    except ConfigurationError as exc:
        ctx.capture(exc, "spec.", rename=_camel)
        return None


# -- dispatch ----------------------------------------------------------------------------------

_Parser = Callable[[DocumentContext, Mapping[str, Any], _Meta], object]


@dataclass(frozen=True, slots=True)
class KindInfo:
    """How one kind is read.

    Attributes:
        api_versions: the ``apiVersion`` values accepted.
        parse: builds the kind's object from its spec, reporting into the context.
        scoped: whether ``metadata.namespace`` and a selector decide where it applies.
        target_refs: whether ``spec.targetRef`` / ``spec.targetRefs`` are accepted.
    """

    api_versions: tuple[str, ...]
    parse: _Parser = field(repr=False)
    scoped: bool = False
    target_refs: bool = False


KINDS: Final[Mapping[str, KindInfo]] = {
    "AuthorizationPolicy": KindInfo(SECURITY_VERSIONS, _authorization_policy, True, True),
    "PeerAuthentication": KindInfo(SECURITY_VERSIONS, _peer_authentication, True, False),
    "RequestAuthentication": KindInfo(SECURITY_VERSIONS, _request_authentication, True, True),
    "VirtualService": KindInfo(NETWORKING_VERSIONS, _virtual_service),
    "DestinationRule": KindInfo(NETWORKING_VERSIONS, _destination_rule),
    "ServiceRegistry": KindInfo(MESHWARE_VERSIONS, _service_registry),
    "RateLimit": KindInfo(MESHWARE_VERSIONS, _rate_limit, True, True),
}
"""Every kind meshware reads, by name."""


def parse_resource(ctx: DocumentContext, document: object) -> LoadedResource | None:
    """Read one resource, reporting every problem into ``ctx``.

    Args:
        ctx: where problems go, and the defaults (namespace, directory).
        document: the parsed document (a mapping with ``apiVersion``, ``kind``,
            ``metadata`` and ``spec``).

    Returns:
        The resource, or ``None`` when the document has errors (they are in ``ctx``).
    """
    if not isinstance(document, Mapping):
        ctx.error(
            f"expected a resource (a mapping with apiVersion, kind, metadata and spec), got "
            f"{_type_name(document)}",
            None,
            document,
        )
        return None
    before = ctx.failed
    kind = document.get("kind")
    api_version = document.get("apiVersion")
    ctx.resource = kind if isinstance(kind, str) else None
    metadata = document.get("metadata")
    given = metadata.get("name") if isinstance(metadata, Mapping) else None
    if ctx.resource and isinstance(given, str) and given:
        ctx.resource = f"{kind} {given}"
    for key, value in document.items():
        if key == "status":
            ctx.warn("ignored: status is written by the cluster", "status")
        elif key not in _TOP_KEYS:
            ctx.error(f"unknown field; expected one of {', '.join(_TOP_KEYS)}", str(key), value)
    if not isinstance(kind, str) or not kind:
        ctx.error(
            "is required; expected the resource's kind, like AuthorizationPolicy", "kind", kind
        )
        return None
    info = KINDS.get(kind)
    if info is None:
        reason = _UNSUPPORTED_KINDS.get(kind)
        known = ", ".join(KINDS)
        if reason is not None:
            ctx.error(f"unsupported kind {kind}: {reason}", "kind", kind)
        else:
            ctx.error(f"unknown kind; expected one of {known}", "kind", kind)
        return None
    if api_version not in info.api_versions:
        ctx.error(
            f"unsupported apiVersion for {kind}; expected one of {', '.join(info.api_versions)}",
            "apiVersion",
            api_version,
        )
    meta = _metadata(ctx, document.get("metadata"), kind)
    spec = _spec(ctx, document.get("spec"))
    if spec is None:
        return None
    target: Target | None = None
    if info.scoped:
        target = _target(ctx, spec, meta.namespace, refs=info.target_refs)
    value = info.parse(ctx, spec, meta)
    if value is None or ctx.failed > before:
        return None
    rule_lines: tuple[int | None, ...] = ()
    if isinstance(value, AuthorizationPolicy):
        rule_lines = tuple(
            ctx.locate(f"{ctx.prefix}spec.rules[{index}]") for index in range(len(value.rules))
        )
    return LoadedResource(
        kind=kind,
        api_version=str(api_version),
        name=meta.name,
        namespace=meta.namespace,
        target=target,
        value=value,
        file=ctx.file,
        document=ctx.document,
        item=ctx.item,
        line=ctx.locate(ctx.prefix[:-1]),
        rule_lines=rule_lines,
    )
