"""Settings for the framework plugins: the one place that reads ``MESHWARE_*`` variables and the
config file, and turns them into an :class:`~meshware.inbound.stack.InboundConfig` and an
:class:`~meshware.outbound.client.OutboundConfig`.

Every setting has one name (``service``, ``cert_dir``, ``rate_limit``, ...), spelled by each
source in its own way:

==========================  =========================================  ================
source                      spelling                                   example
==========================  =========================================  ================
code arguments              the name                                   ``service="orders"``
Flask ``app.config``        ``MESHWARE_`` + the name in upper case     ``MESHWARE_SERVICE``
Django settings             a key of the ``MESHWARE`` dict             ``MESHWARE["SERVICE"]``
environment variables       ``MESHWARE_`` + the name in upper case     ``MESHWARE_SERVICE``
config file (YAML)          the name (any case)                        ``service: orders``
==========================  =========================================  ================

When a setting is given by several sources, the first of this list wins::

    explicit code arguments > framework settings > environment variables > config file > defaults

The config file is named by the ``config_file`` setting (in code or framework settings) or the
``MESHWARE_CONFIG_FILE`` variable. An unknown setting is an error (:class:`InvalidSetting`)
naming the setting as its source spells it and the source, so a typo never passes silently.
Environment variables that belong to others are not settings: ``MESHWARE_SERVICE_<NAME>``
(the endpoints :class:`~meshware.outbound.discovery.EnvResolver` reads) and
``MESHWARE_CONFIG_FILE``. An environment variable set to an empty value counts as unset.

::

    settings = load_settings({"service": "orders"})      # + MESHWARE_* and the config file
    inbound = settings.inbound_config(routes=StarletteRoutes(app))
    outbound = settings.outbound_config(metrics=inbound.metrics)

See ``docs/settings.md`` for every setting, its variable and its default.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Literal

import yaml

from meshware.exceptions import ConfigurationError
from meshware.policy.authz import AuthorizationPolicy
from meshware.policy.jwt import JwtRule
from meshware.policy.ratelimit import (
    Rate,
    RateLimitMatch,
    RateLimitPolicy,
    RateLimitRule,
)

if TYPE_CHECKING:
    from meshware.inbound.stack import InboundConfig
    from meshware.outbound.client import OutboundConfig
    from meshware.outbound.destination import DestinationRule
    from meshware.outbound.retry import RetryPolicy
    from meshware.outbound.routing import VirtualService
    from meshware.telemetry.tracing import TracingConfig

__all__ = [
    "CONFIG_FILE_ENV",
    "ENV_PREFIX",
    "SETTINGS",
    "InvalidSetting",
    "MeshSettings",
    "Setting",
    "SettingsSource",
    "check_settings",
    "load_settings",
    "settings_table",
]

ENV_PREFIX: Final = "MESHWARE_"
"""The prefix of settings in the environment and in Flask's ``app.config``."""

CONFIG_FILE_ENV: Final = "MESHWARE_CONFIG_FILE"
"""The environment variable naming the YAML config file."""

_NOT_SETTINGS: Final = ("MESHWARE_SERVICE_",)
"""Prefixed names that belong to others (EnvResolver's endpoints), never settings."""

Problem = Literal["unknown", "missing", "invalid"]
"""What is wrong with a setting: an unknown name, a required setting not given, or a bad
value."""


class InvalidSetting(ConfigurationError):
    """A setting is unknown, missing or invalid.

    The message names the setting as its source spells it (``MESHWARE_RATE_LIMIT``,
    ``MESHWARE["POLICIES"][0].rules[0]``) and the source (``environment``, ``app.config``,
    ``settings.MESHWARE``, ``config file /etc/orders.yaml``, ``code``).

    Attributes:
        key: the setting's name (``"rate_limit"``), or ``None`` when the error concerns a
            whole source (a config file that is not a mapping).
        source: the source that gave the value, or ``"defaults"``.
        problem: ``"unknown"``, ``"missing"`` or ``"invalid"``.
        field: the setting as spelled by its source, with the path inside the value.
        value: the offending value.
    """

    def __init__(
        self,
        message: str,
        *,
        key: str | None,
        source: str,
        problem: Problem,
        field: str | None = None,
        value: object = None,
    ) -> None:
        self.key = key
        self.source = source
        self.problem = problem
        super().__init__(f"{message} (from {source})", field=field, value=value)


def _type_name(value: object) -> str:
    return type(value).__name__


# ---------------------------------------------------------------------------------------------
# Value parsers: each accepts the native value or its text form, returns the typed value, and
# raises ConfigurationError with a field relative to the setting ("" for the setting itself).

_TRUE: Final = frozenset({"1", "true", "yes", "on"})
_FALSE: Final = frozenset({"0", "false", "no", "off"})


def _structured(value: object) -> object:
    """Parse YAML (or JSON) text; other values pass through."""
    if not isinstance(value, str):
        return value
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"expected YAML or JSON text: {exc}", value=value) from exc


def _text(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError(
            f"expected a non-empty string, got {_type_name(value)}", value=value
        )
    return value.strip()


def _optional_text(value: object) -> str | None:
    return None if value is None else _text(value)


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigurationError("expected true or false (or 1/0, yes/no, on/off)", value=value)


def _finite(value: object) -> float | None:
    """A finite number, from a number or its text; ``None`` for anything else."""
    number: object = value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        return None
    return float(number) if math.isfinite(number) else None


def _number(value: object) -> float:
    number = _finite(value)
    if number is None or number <= 0:
        raise ConfigurationError("expected a positive number of seconds", value=value)
    return number


def _optional_number(value: object) -> float | None:
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    return _number(value)


def _ratio(value: object) -> float:
    number = _finite(value)
    if number is None or not 0.0 <= number <= 1.0:
        raise ConfigurationError("expected a ratio from 0 to 1", value=value)
    return number


def _path(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        raise ConfigurationError("expected a file system path", value=value)
    return value


def _metrics_path(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith("/"):
        raise ConfigurationError('expected a path starting with "/"', value=value)
    if value in ("/livez", "/readyz"):
        raise ConfigurationError("collides with a health path (/livez, /readyz)", value=value)
    return value


def _strings(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            value = _structured(text)
        else:
            return tuple(item.strip() for item in text.split(",") if item.strip())
    if isinstance(value, (bytes, Mapping)) or not isinstance(value, Iterable):
        raise ConfigurationError(
            f"expected a list of strings (or comma-separated text), got {_type_name(value)}",
            value=value,
        )
    items = tuple(value)
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise ConfigurationError(
                f"expected a string, got {_type_name(item)}", field=f"[{index}]", value=item
            )
    return items


def _entries(value: object, what: str) -> tuple[Any, ...]:
    value = _structured(value)
    if value is None:
        return ()
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise ConfigurationError(f"expected a list of {what}, got {_type_name(value)}", value=value)
    return tuple(value)


def _at(exc: ConfigurationError, prefix: str) -> ConfigurationError:
    """``exc`` re-addressed under ``prefix`` (``"[0]"`` + ``"rules[1]..."``)."""
    message = _message(exc)
    own = (exc.field or "").lstrip(".")
    if own and not own.startswith("["):
        own = "." + own
    new = ConfigurationError(message, field=(prefix + own).lstrip(".") or None, value=exc.value)
    new.__cause__ = exc
    return new


def _policies(value: object) -> tuple[AuthorizationPolicy, ...]:
    policies: list[AuthorizationPolicy] = []
    for index, item in enumerate(_entries(value, "AuthorizationPolicy mappings")):
        try:
            policies.append(_policy(item))
        except ConfigurationError as exc:
            raise _at(exc, f"[{index}]") from exc
    names: set[str] = set()
    for index, policy in enumerate(policies):
        if policy.name in names:
            raise ConfigurationError(
                "duplicate policy name; names must be unique",
                field=f"[{index}].name",
                value=policy.name,
            )
        names.add(policy.name)
    return tuple(policies)


def _policy(item: object) -> AuthorizationPolicy:
    if isinstance(item, AuthorizationPolicy):
        return item
    if not isinstance(item, Mapping):
        raise ConfigurationError(
            "expected an AuthorizationPolicy, an Istio AuthorizationPolicy manifest, or a "
            f"mapping with name, action and rules; got {_type_name(item)}",
            value=item,
        )
    if "kind" in item or "apiVersion" in item:
        return AuthorizationPolicy.from_manifest(item)
    spec = dict(item)
    name = spec.pop("name", None)
    if not isinstance(name, str) or not name:
        raise ConfigurationError(
            "expected the policy's name (a non-empty string)", field="name", value=name
        )
    dry_run = _bool(spec.pop("dry_run", spec.pop("dryRun", False)))
    return AuthorizationPolicy.from_mapping(name, spec, dry_run=dry_run)


def _jwt_rules(value: object) -> tuple[JwtRule, ...]:
    rules: list[JwtRule] = []
    for index, item in enumerate(_entries(value, "jwtRules entries")):
        if isinstance(item, JwtRule):
            rules.append(item)
        elif isinstance(item, Mapping):
            try:
                rules.append(JwtRule.from_mapping(item, path=""))
            except ConfigurationError as exc:
                raise _at(exc, f"[{index}]") from exc
        else:
            raise ConfigurationError(
                f"expected a JwtRule or an Istio jwtRules mapping, got {_type_name(item)}",
                field=f"[{index}]",
                value=item,
            )
    return tuple(rules)


_RULE_KEYS: Final = frozenset({"name", "rate", "key", "match", "shadow"})
_MATCH_KEYS: Final = frozenset({"methods", "path_prefixes", "routes"})
_POLICY_KEYS: Final = frozenset({"rules", "backend", "failure_mode", "key_prefix", "headers"})
_SHORT_KEYS: Final = frozenset(
    {"rate", "key", "name", "backend", "failure_mode", "key_prefix", "headers"}
)


def _key_spec(value: object) -> object:
    if isinstance(value, list):
        return tuple(value)
    return value


def _rule(item: object) -> RateLimitRule:
    if isinstance(item, RateLimitRule):
        return item
    if not isinstance(item, Mapping):
        raise ConfigurationError(
            f"expected a RateLimitRule or a mapping, got {_type_name(item)}", value=item
        )
    _known(item, _RULE_KEYS, "")
    if "name" not in item or "rate" not in item:
        raise ConfigurationError("expected a mapping with name and rate", value=dict(item))
    match = item.get("match")
    if isinstance(match, Mapping):
        _known(match, _MATCH_KEYS, "match")
        try:
            match = RateLimitMatch(**{k: tuple(_strings(v)) for k, v in match.items()})
        except ConfigurationError as exc:
            raise _at(exc, "") from exc
    return RateLimitRule(
        name=item["name"],
        rate=item["rate"],
        key=_key_spec(item.get("key", "principal")),  # type: ignore[arg-type]
        match=match,
        shadow=_bool(item.get("shadow", False)),
    )


def _known(mapping: Mapping[Any, Any], known: frozenset[str], where: str) -> None:
    for key in mapping:
        if key not in known:
            raise ConfigurationError(
                f"unknown field; expected one of {', '.join(sorted(known))}",
                field=f"{where}.{key}" if where else str(key),
                value=mapping[key],
            )


def _rate_limit(value: object) -> RateLimitPolicy | None:
    if value is None or value is False:
        return None
    if isinstance(value, RateLimitPolicy):
        return value
    if isinstance(value, (Rate, RateLimitRule)):
        rule = value if isinstance(value, RateLimitRule) else _default_rule(value)
        return RateLimitPolicy(rules=(rule,))
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in _FALSE or text.lower() == "none":
            return None
        if not text.startswith(("{", "[")) and "/" in text and ":" not in text:
            return RateLimitPolicy(rules=(_spec_rule(text),))
        value = _structured(text)
        if isinstance(value, str):
            return RateLimitPolicy(rules=(_spec_rule(value),))
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            "expected a rate such as '100/second burst 20', a mapping with rules (or rate), "
            f"backend, failure_mode, key_prefix and headers, or a RateLimitPolicy; got "
            f"{_type_name(value)}",
            value=value,
        )
    if "rate" in value:
        _known(value, _SHORT_KEYS, "")
        rule = _default_rule(value["rate"], value.get("key", "principal"), value.get("name"))
        rest = {k: v for k, v in value.items() if k in _POLICY_KEYS}
        return RateLimitPolicy(rules=(rule,), **rest)
    _known(value, _POLICY_KEYS, "")
    rules: list[RateLimitRule] = []
    try:
        entries = _entries(value.get("rules", ()), "rate limit rules")
    except ConfigurationError as exc:
        raise _at(exc, "rules") from exc
    for index, item in enumerate(entries):
        try:
            rules.append(_rule(item))
        except ConfigurationError as exc:
            raise _at(exc, f"rules[{index}]") from exc
    rest = {k: v for k, v in value.items() if k != "rules"}
    return RateLimitPolicy(rules=tuple(rules), **rest)


def _spec_rule(text: str) -> RateLimitRule:
    try:
        return _default_rule(text)
    except ConfigurationError as exc:
        # The whole setting is the rate here; "rate" would name a field it does not have.
        raise ConfigurationError(_message(exc), value=exc.value) from exc


def _default_rule(rate: object, key: object = "principal", name: object = None) -> RateLimitRule:
    return RateLimitRule(
        name=name if name is not None else "default",  # type: ignore[arg-type]
        rate=rate,  # type: ignore[arg-type]
        key=_key_spec(key),  # type: ignore[arg-type]
    )


def _services(value: object) -> Mapping[str, tuple[Any, ...]]:
    value = _structured(value)
    if value is None:
        return _NO_SERVICES
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            "expected a mapping of service names to endpoint lists ('host:port' strings)",
            value=value,
        )
    services: dict[str, tuple[Any, ...]] = {}
    for name, endpoints in value.items():
        if isinstance(endpoints, str):
            endpoints = [item.strip() for item in endpoints.split(",") if item.strip()]
        if isinstance(endpoints, (bytes, Mapping)) or not isinstance(endpoints, Iterable):
            raise ConfigurationError(
                "expected a list of 'host:port' endpoints", field=str(name), value=endpoints
            )
        services[str(name)] = tuple(endpoints)
    from meshware.outbound.discovery import StaticRegistry

    try:
        StaticRegistry.from_mapping(_registry_data(services))  # validates now
    except ConfigurationError as exc:
        raise _at(_strip_registry(exc), "") from exc
    return MappingProxyType(services)


def _registry_data(services: Mapping[str, tuple[Any, ...]]) -> dict[str, Any]:
    return {"services": {name: {"endpoints": list(items)} for name, items in services.items()}}


def _strip_registry(exc: ConfigurationError) -> ConfigurationError:
    # "services.payments.endpoints[0].port" -> "payments[0].port"
    own = (exc.field or "").removeprefix("services.").replace(".endpoints", "", 1)
    message = str(exc)
    if exc.field and message.startswith(f"{exc.field}: "):
        message = message[len(exc.field) + 2 :]
    return ConfigurationError(message, field=own or None, value=exc.value)


def _destination_rules(value: object) -> tuple[DestinationRule, ...]:
    from meshware.outbound.destination import DestinationRule

    rules: list[DestinationRule] = []
    for index, item in enumerate(_entries(value, "DestinationRule mappings")):
        if isinstance(item, DestinationRule):
            rules.append(item)
        elif isinstance(item, Mapping):
            if "kind" in item or "apiVersion" in item:
                rules.append(DestinationRule.from_resource(item, path=f"[{index}]"))
            else:
                rules.append(DestinationRule.from_mapping(item, path=f"[{index}]"))
        else:
            raise ConfigurationError(
                f"expected a DestinationRule or a mapping, got {_type_name(item)}",
                field=f"[{index}]",
                value=item,
            )
    return tuple(rules)


def _virtual_services(value: object) -> tuple[VirtualService, ...]:
    from meshware.outbound.routing import VirtualService

    services: list[VirtualService] = []
    for index, item in enumerate(_entries(value, "VirtualService mappings")):
        if isinstance(item, VirtualService):
            services.append(item)
        elif isinstance(item, Mapping):
            services.append(VirtualService.from_mapping(item, field=f"[{index}]"))
        else:
            raise ConfigurationError(
                f"expected a VirtualService or a mapping, got {_type_name(item)}",
                field=f"[{index}]",
                value=item,
            )
    return tuple(services)


def _retry(value: object) -> RetryPolicy | None:
    from meshware.outbound.retry import RetryPolicy

    value = _structured(value)
    if value is None or isinstance(value, RetryPolicy):
        return value
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            f"expected a RetryPolicy or an Istio retries mapping, got {_type_name(value)}",
            value=value,
        )
    try:
        return RetryPolicy.from_mapping(value)
    except ConfigurationError as exc:
        field_name = (exc.field or "").removeprefix("retries").lstrip(".")
        message = str(exc)
        if exc.field and message.startswith(f"{exc.field}: "):
            message = message[len(exc.field) + 2 :]
        raise ConfigurationError(message, field=field_name or None, value=exc.value) from exc


_EXPORTERS: Final = ("none", "console", "otlp")


def _exporter(value: object) -> str:
    if isinstance(value, str) and value.strip().lower() in _EXPORTERS:
        return value.strip().lower()
    raise ConfigurationError('expected "none", "console" or "otlp"', value=value)


_NO_SERVICES: Final[Mapping[str, tuple[Any, ...]]] = MappingProxyType({})


# ---------------------------------------------------------------------------------------------
# The settings


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting: its name, default, parser and meaning (the rows of ``docs/settings.md``).

    Attributes:
        key: the name (``"rate_limit"``).
        default: the value when no source gives one.
        parse: turns a value from any source (native or text) into the typed value; raises
            :class:`~meshware.exceptions.ConfigurationError` with a ``field`` relative to the
            setting.
        help: one line on what it does.
    """

    key: str
    default: Any
    parse: Callable[[Any], Any]
    help: str

    @property
    def env(self) -> str:
        """The environment variable (and Flask ``app.config`` key): ``MESHWARE_RATE_LIMIT``."""
        return ENV_PREFIX + self.key.upper()


_REQUIRED: Final = object()

SETTINGS: Final[Mapping[str, Setting]] = MappingProxyType(
    {
        s.key: s
        for s in (
            Setting("service", _REQUIRED, _text, "this service's name (required)"),
            Setting("namespace", "default", _text, "the namespace it runs in"),
            Setting("version", None, _optional_text, "its version (metric label)"),
            Setting("trust_domain", "cluster.local", _text, "the SPIFFE trust domain"),
            Setting(
                "cert_dir",
                None,
                _path,
                "the certificate directory (`meshware ca init --dir`); turns on caller "
                "identities and outbound mTLS",
            ),
            Setting("bundle", None, _path, "the trust bundle file, if not the cert_dir one"),
            Setting("trusted_proxies", (), _strings, "who may send x-forwarded-client-cert"),
            Setting("require_identity", False, _bool, "refuse callers without an identity"),
            Setting("jwt_rules", (), _jwt_rules, "accepted JWT issuers (Istio jwtRules)"),
            Setting("policies", (), _policies, "service-wide AuthorizationPolicies"),
            Setting("explain_denials", False, _bool, "explain 403s (development)"),
            Setting("rate_limit", None, _rate_limit, "the service-wide rate limit"),
            Setting("health", True, _bool, "serve /livez and /readyz"),
            Setting("metrics", True, _bool, "record Istio metrics"),
            Setting("metrics_path", "/metrics", _metrics_path, "where metrics are scraped"),
            Setting("access_log", True, _bool, "write a JSON access-log line per request"),
            Setting(
                "access_log_file",
                None,
                _optional_text,
                "write access-log lines to this file, buffered (Istio's accessLogFile)",
            ),
            Setting("tracing", True, _bool, "trace requests (OpenTelemetry)"),
            Setting("trace_exporter", "none", _exporter, "none, console or otlp"),
            Setting("trace_sample", 0.01, _ratio, "share of new traces recorded"),
            Setting("otlp_endpoint", None, _optional_text, "the OTLP/HTTP collector URL"),
            Setting(
                "trace_propagators",
                ("tracecontext", "baggage", "b3"),
                _strings,
                "trace-context formats read and written",
            ),
            Setting("deadlines", True, _bool, "honour x-meshware-timeout"),
            Setting("default_timeout", None, _optional_number, "deadline without the header"),
            Setting("max_timeout", None, _optional_number, "the longest deadline allowed"),
            Setting("services", _NO_SERVICES, _services, "endpoints of mesh services"),
            Setting("destination_rules", (), _destination_rules, "Istio DestinationRules"),
            Setting("virtual_services", (), _virtual_services, "Istio VirtualServices"),
            Setting("retry", None, _retry, "the default retry policy (Istio retries)"),
            Setting("outbound_timeout", 10.0, _number, "per-attempt timeout of outbound calls"),
            Setting("config_file", None, _path, "the YAML config file"),
        )
    }
)
"""Every setting, by name, in the order of ``docs/settings.md``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MeshSettings:
    """The merged settings of one service: what the plugins build their stack and client from.

    Usually made by :func:`load_settings`; building one directly validates every field the
    same way (text forms included). The fields are the settings of :data:`SETTINGS`, typed;
    ``docs/settings.md`` has the forms each accepts.

    Attributes:
        service, namespace, version, trust_domain: who the service is (``service`` is
            required).
        cert_dir: the certificate directory: caller identities and outbound mTLS.
        bundle: a trust bundle file verifying callers, instead of ``cert_dir``'s.
        trusted_proxies: who may send ``x-forwarded-client-cert``.
        require_identity: refuse callers without a verified identity.
        jwt_rules: the accepted JWT issuers.
        policies: the service-wide authorization policies.
        explain_denials: add the deciding policy to 403 bodies.
        rate_limit: the service-wide rate-limit policy, or ``None``.
        health, metrics, metrics_path, access_log: the health and telemetry layers.
        access_log_file: a file (``/dev/stdout``) the access log is written to, buffered,
            instead of the ``meshware.access`` logger.
        tracing, trace_exporter, trace_sample, otlp_endpoint, trace_propagators: tracing.
        deadlines, default_timeout, max_timeout: the deadline layer.
        services: endpoints of mesh services (``{"payments": ("10.0.0.5:8443",)}``).
        destination_rules, virtual_services, retry, outbound_timeout: the outbound client.
        config_file: the config file read, if any.
        sources: for each setting given by a source, that source (``"code"``,
            ``"environment"``, ...); settings left at their default are absent.

    Raises:
        ConfigurationError: a field is invalid; ``field`` names it. ``cert_dir`` must hold the
            service's certificate, key and bundle, and ``bundle`` must exist.
    """

    service: str
    namespace: str = "default"
    version: str | None = None
    trust_domain: str = "cluster.local"
    cert_dir: str | None = None
    bundle: str | None = None
    trusted_proxies: tuple[str, ...] = ()
    require_identity: bool = False
    jwt_rules: tuple[JwtRule, ...] = ()
    policies: tuple[AuthorizationPolicy, ...] = ()
    explain_denials: bool = False
    rate_limit: RateLimitPolicy | None = None
    health: bool = True
    metrics: bool = True
    metrics_path: str | None = "/metrics"
    access_log: bool = True
    access_log_file: str | None = None
    tracing: bool = True
    trace_exporter: str = "none"
    trace_sample: float = 0.01
    otlp_endpoint: str | None = None
    trace_propagators: tuple[str, ...] = ("tracecontext", "baggage", "b3")
    deadlines: bool = True
    default_timeout: float | None = None
    max_timeout: float | None = None
    services: Mapping[str, tuple[Any, ...]] = field(default_factory=lambda: _NO_SERVICES)
    destination_rules: tuple[DestinationRule, ...] = ()
    virtual_services: tuple[VirtualService, ...] = ()
    retry: RetryPolicy | None = None
    outbound_timeout: float = 10.0
    config_file: str | None = None
    sources: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType({}), compare=False, repr=False
    )

    def __post_init__(self) -> None:
        for spec in SETTINGS.values():
            value = getattr(self, spec.key)
            try:
                parsed = spec.parse(value)
            except ConfigurationError as exc:
                raise _at(exc, spec.key) from exc
            object.__setattr__(self, spec.key, parsed)
        object.__setattr__(self, "sources", MappingProxyType(dict(self.sources)))
        self._check_files()
        # Build the configurations once, without the objects that cost anything, so that a
        # bad combination fails here, named by the setting, not at the first request.
        self.tracing_config()
        try:
            self._validate_inbound()
        except ConfigurationError as exc:
            raise _renamed(exc) from exc
        try:
            self.outbound_config(metrics=None)
        except ConfigurationError as exc:
            raise _renamed(exc, {"timeout": "outbound_timeout"}) from exc

    def _check_files(self) -> None:
        if self.cert_dir is not None:
            root = Path(self.cert_dir)
            if not root.is_dir():
                raise ConfigurationError(
                    "the certificate directory does not exist (create it with 'meshware ca "
                    "init --dir DIR')",
                    field="cert_dir",
                    value=self.cert_dir,
                )
            from meshware.identity.ca import ServicePaths

            paths = ServicePaths.under(root, self.service, self.namespace)
            missing = [p for p in (paths.cert, paths.key, paths.bundle) if not p.is_file()]
            if missing:
                raise ConfigurationError(
                    f"no credentials for {self.namespace}/{self.service}: {missing[0]} is "
                    f"missing (run 'meshware cert issue {self.service} --namespace "
                    f"{self.namespace} --dir {self.cert_dir}')",
                    field="cert_dir",
                    value=self.cert_dir,
                )
        if self.bundle is not None and not Path(self.bundle).is_file():
            raise ConfigurationError(
                "the trust bundle file does not exist", field="bundle", value=self.bundle
            )

    def _validate_inbound(self) -> None:
        from meshware.inbound.stack import InboundConfig

        # The access log file is checked, not opened: loading settings creates no file.
        InboundConfig(**self._inbound_kwargs(health=None, metrics=None, access_log=self.access_log))
        if self.access_log and self.access_log_file is not None:
            _check_writable(self.access_log_file, "access_log_file")

    # -- what the plugins build ----------------------------------------------------------------

    def bundle_path(self) -> str | None:
        """The trust bundle that verifies callers: ``bundle``, else the one under
        ``cert_dir`` for this service, else ``None`` (no identity layer)."""
        if self.bundle is not None:
            return self.bundle
        if self.cert_dir is None:
            return None
        from meshware.identity.ca import ServicePaths

        return str(ServicePaths.under(self.cert_dir, self.service, self.namespace).bundle)

    def tracing_config(self) -> TracingConfig | None:
        """The :class:`~meshware.telemetry.tracing.TracingConfig` the settings describe, or
        ``None`` when ``tracing`` is off."""
        if not self.tracing:
            return None
        from meshware.telemetry.tracing import TracingConfig

        try:
            return TracingConfig(
                service_name=self.service,
                sampler_ratio=self.trace_sample,
                exporter=self.trace_exporter,  # type: ignore[arg-type]
                otlp_endpoint=self.otlp_endpoint,
                propagators=self.trace_propagators,
            )
        except ConfigurationError as exc:
            raise _renamed(exc) from exc

    def _inbound_kwargs(self, **overrides: Any) -> dict[str, Any]:
        from meshware.inbound.health import HealthChecks
        from meshware.telemetry.metrics import MeshMetrics

        kwargs: dict[str, Any] = {
            "service": self.service,
            "namespace": self.namespace,
            "version": self.version,
            "trust_domain": self.trust_domain,
            "bundle": self.bundle_path(),
            "trusted_proxies": self.trusted_proxies,
            "require_identity": self.require_identity,
            "jwt_rules": self.jwt_rules,
            "policies": self.policies,
            "explain_denials": self.explain_denials,
            "rate_limit": self.rate_limit,
            "metrics_path": self.metrics_path if self.metrics else None,
            "tracing": self.tracing_config(),
            "deadlines": self.deadlines,
            "default_timeout": self.default_timeout,
            "max_timeout": self.max_timeout,
        }
        kwargs.update(overrides)
        if "access_log" not in kwargs:
            # The file is opened here, when the stack is built, so a bad path stops startup.
            from meshware.telemetry.access_log import access_log_of

            kwargs["access_log"] = access_log_of(self.access_log, self.access_log_file)
        if "health" not in kwargs:
            kwargs["health"] = HealthChecks() if self.health else None
        if "metrics" not in kwargs:
            kwargs["metrics"] = MeshMetrics() if self.metrics else None
        if kwargs["metrics"] is None:
            kwargs["metrics_path"] = None
        return kwargs

    def inbound_config(self, **overrides: Any) -> InboundConfig:
        """A new :class:`~meshware.inbound.stack.InboundConfig` from these settings.

        ``health`` and ``metrics`` are new :class:`~meshware.inbound.health.HealthChecks` and
        :class:`~meshware.telemetry.metrics.MeshMetrics` objects (or ``None`` when turned
        off) unless given.

        Args:
            overrides: ``InboundConfig`` fields to set instead, such as ``routes`` (the
                framework's route resolver) or ``policies=()`` (to leave authorization to
                another layer).

        Raises:
            ConfigurationError: an override is invalid.
        """
        from meshware.inbound.stack import InboundConfig

        return InboundConfig(**self._inbound_kwargs(**overrides))

    def outbound_config(self, **overrides: Any) -> OutboundConfig:
        """A new :class:`~meshware.outbound.client.OutboundConfig` from these settings.

        Endpoints come from ``services`` first, then from ``MESHWARE_SERVICE_<NAME>``
        variables (:class:`~meshware.outbound.discovery.EnvResolver`).

        Args:
            overrides: ``OutboundConfig`` fields to set instead, typically ``metrics`` (the
                inbound side's :class:`~meshware.telemetry.metrics.MeshMetrics`, so one scrape
                shows both directions) and ``tracer_provider``.

        Raises:
            ConfigurationError: an override is invalid.
        """
        from meshware.outbound.client import OutboundConfig
        from meshware.outbound.discovery import ChainResolver, EnvResolver, StaticRegistry
        from meshware.outbound.retry import RetryPolicy
        from meshware.outbound.routing import RouteTable

        kwargs: dict[str, Any] = {
            "service": self.service,
            "namespace": self.namespace,
            "version": self.version,
            "trust_domain": self.trust_domain,
            "cert_dir": self.cert_dir,
            "destinations": self.destination_rules,
            "retry": self.retry if self.retry is not None else RetryPolicy(),
            "timeout": self.outbound_timeout,
        }
        if self.services:
            kwargs["resolver"] = ChainResolver(
                [StaticRegistry.from_mapping(_registry_data(self.services)), EnvResolver()]
            )
        if self.virtual_services:
            kwargs["routes"] = RouteTable(self.virtual_services)
        kwargs.update(overrides)
        return OutboundConfig(**kwargs)


def _check_writable(path: str, field: str) -> None:
    """Refuse a file that could not be opened for appending, without creating it."""
    if "\x00" in path:
        raise ConfigurationError("expected a path without NUL characters", field=field, value=path)
    target = Path(path)
    if target.exists():
        if target.is_dir() or not os.access(target, os.W_OK):
            raise ConfigurationError(
                f"cannot open {path} for appending: not a writable file", field=field, value=path
            )
        return
    parent = target.parent
    if not parent.is_dir():
        raise ConfigurationError(
            f"cannot open {path} for appending: {parent} is not a directory",
            field=field,
            value=path,
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigurationError(
            f"cannot open {path} for appending: {parent} is not writable",
            field=field,
            value=path,
        )


_ALIASES: Final = {
    "tracing.sampler_ratio": "trace_sample",
    "tracing.exporter": "trace_exporter",
    "tracing.otlp_endpoint": "otlp_endpoint",
    "tracing.propagators": "trace_propagators",
    "tracing.service_name": "service",
    "destinations": "destination_rules",
}


def _renamed(exc: ConfigurationError, extra: Mapping[str, str] | None = None) -> ConfigurationError:
    """An error of a configuration object, addressed by the setting that caused it."""
    own = exc.field or ""
    aliases = {**_ALIASES, **(extra or {})}
    for name, key in aliases.items():
        if own == name or own.startswith((name + ".", name + "[")):
            message = str(exc)
            if message.startswith(f"{own}: "):
                message = message[len(own) + 2 :]
            renamed = ConfigurationError(message, field=key + own[len(name) :], value=exc.value)
            renamed.__cause__ = exc
            return renamed
    return exc


# ---------------------------------------------------------------------------------------------
# Sources


@dataclass(frozen=True, slots=True)
class SettingsSource:
    """One source of settings: what it gives, and how it spells each setting.

    Build one with the class methods; :func:`load_settings` merges them.

    Attributes:
        name: the source, as errors name it (``"app.config"``).
        values: setting name (lower case) to the value given.
        spellings: setting name to how this source spells it (``"MESHWARE_SERVICE"``).
        unknown: the keys this source gives that are not settings: ``(key without prefix,
            key as spelled)`` pairs.
        template: how this source spells a setting, ``{}`` standing for its name
            (``"MESHWARE_{}"``, ``'MESHWARE["{}"]'``); names are upper-cased when the source
            writes them in upper case.
    """

    name: str
    values: Mapping[str, Any]
    spellings: Mapping[str, str]
    unknown: tuple[tuple[str, str], ...] = ()
    template: str = "{}"

    @classmethod
    def keyed(
        cls, mapping: Mapping[str, Any], *, name: str, template: str = "{}"
    ) -> SettingsSource:
        """A source whose keys are the setting names, in any case (code arguments, a Django
        ``MESHWARE`` dict, a parsed config file).

        Args:
            mapping: the settings.
            name: the source's name for errors.
            template: how to spell a key in errors (``'MESHWARE["{}"]'``); ``{}`` is the key
                as given.

        Raises:
            InvalidSetting: ``mapping`` is not a mapping, or a key is not a string.
        """
        whole = template.split("[", 1)[0] if "[" in template else None
        if not isinstance(mapping, Mapping):
            raise InvalidSetting(
                f"expected a mapping of settings, got {_type_name(mapping)}",
                key=None,
                source=name,
                problem="invalid",
                field=whole,
                value=mapping,
            )
        values: dict[str, Any] = {}
        spellings: dict[str, str] = {}
        unknown: list[tuple[str, str]] = []
        for key, value in mapping.items():
            if not isinstance(key, str):
                raise InvalidSetting(
                    f"expected setting names (strings) as keys, got {_type_name(key)}",
                    key=None,
                    source=name,
                    problem="unknown",
                    field=whole,
                    value=key,
                )
            canonical = key.lower()
            if canonical in SETTINGS:
                values[canonical] = value
                spellings[canonical] = template.format(key)
            else:
                unknown.append((key, template.format(key)))
        return cls(
            name, MappingProxyType(values), MappingProxyType(spellings), tuple(unknown), template
        )

    @classmethod
    def prefixed(
        cls, mapping: Mapping[str, Any], *, name: str, prefix: str = ENV_PREFIX
    ) -> SettingsSource:
        """A source whose settings are the keys starting with ``prefix`` (the environment,
        Flask's ``app.config``); other keys are not read. Empty strings count as unset.
        ``MESHWARE_CONFIG_FILE`` is the ``config_file`` setting; ``MESHWARE_SERVICE_<NAME>``
        keys are endpoints, not settings.

        Args:
            mapping: the variables or configuration.
            name: the source's name for errors.
            prefix: the prefix of settings.
        """
        values: dict[str, Any] = {}
        spellings: dict[str, str] = {}
        unknown: list[tuple[str, str]] = []
        for key, value in mapping.items():
            if not isinstance(key, str) or not key.startswith(prefix):
                continue
            if key.startswith(_NOT_SETTINGS) or (isinstance(value, str) and not value.strip()):
                continue
            bare = key[len(prefix) :]
            if bare.lower() in SETTINGS:
                values[bare.lower()] = value
                spellings[bare.lower()] = key
            else:
                unknown.append((bare, key))
        return cls(
            name,
            MappingProxyType(values),
            MappingProxyType(spellings),
            tuple(unknown),
            prefix + "{}",
        )

    @classmethod
    def environment(cls, environ: Mapping[str, str] | None = None) -> SettingsSource:
        """The ``MESHWARE_*`` environment variables (``os.environ`` when ``None``)."""
        return cls.prefixed(os.environ if environ is None else environ, name="environment")

    @classmethod
    def file(cls, path: str | os.PathLike[str], *, spelled: str = "config_file") -> SettingsSource:
        """The settings in a YAML (or JSON) file: a mapping of setting names.

        Args:
            path: the file.
            spelled: how the setting that named the file is spelled, for errors.

        Raises:
            InvalidSetting: the file cannot be read, is not YAML, or is not a mapping.
        """
        name = f"config file {os.fspath(path)}"

        def problem(message: str) -> InvalidSetting:
            return InvalidSetting(
                message,
                key="config_file",
                source=name,
                problem="invalid",
                field=spelled,
                value=os.fspath(path),
            )

        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise problem(f"cannot read the config file: {reason}") from exc
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise problem(f"the config file is not valid YAML: {exc}") from exc
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise problem(f"expected a mapping of settings in the file, got {_type_name(data)}")
        source = cls.keyed(data, name=name)
        if "config_file" in source.values:
            raise InvalidSetting(
                "a config file cannot name another config file",
                key="config_file",
                source=name,
                problem="invalid",
                field=source.spellings["config_file"],
                value=source.values["config_file"],
            )
        return source

    def spell(self, key: str, *, upper: bool) -> str:
        """How this source writes the setting ``key``."""
        return self.template.format(key.upper() if upper else key)


def _unknown(bare: str, spelled: str, source: SettingsSource) -> InvalidSetting:
    close = difflib.get_close_matches(bare.lower(), list(SETTINGS), n=1)
    hint = ""
    if close:
        hint = f"; did you mean {source.spell(close[0], upper=not bare.islower())}?"
    return InvalidSetting(
        f"unknown setting{hint}",
        key=None,
        source=source.name,
        problem="unknown",
        field=spelled,
        value=spelled,
    )


def _message(exc: ConfigurationError) -> str:
    message = str(exc)
    if exc.field and message.startswith(f"{exc.field}: "):
        return message[len(exc.field) + 2 :]
    return message


def _invalid(exc: ConfigurationError, key: str, source: SettingsSource) -> InvalidSetting:
    own = (exc.field or "").lstrip(".")
    if own and not own.startswith("["):
        own = "." + own
    invalid = InvalidSetting(
        _message(exc),
        key=key,
        source=source.name,
        problem="invalid",
        field=source.spellings.get(key, key) + own,
        value=exc.value,
    )
    invalid.__cause__ = exc
    return invalid


def _key_of(field_name: str | None) -> str | None:
    text = field_name or ""
    for mark in (".", "["):
        text = text.split(mark, 1)[0]
    return text if text in SETTINGS else None


def _collect(
    code: Mapping[str, Any] | None,
    framework: SettingsSource | None,
    environ: Mapping[str, str] | None,
    config_file: str | os.PathLike[str] | None,
) -> tuple[MeshSettings | None, list[InvalidSetting]]:
    errors: list[InvalidSetting] = []
    sources: list[SettingsSource] = []
    if config_file is not None:
        code = {**(code or {}), "config_file": os.fspath(config_file)}
    try:
        sources.append(SettingsSource.keyed(code or {}, name="code"))
    except InvalidSetting as exc:
        errors.append(exc)
    if framework is not None:
        sources.append(framework)
    sources.append(SettingsSource.environment(environ))
    # The config file is the one named by the first source that names one.
    for source in sources:
        if "config_file" not in source.values:
            continue
        spelled = source.spellings["config_file"]
        try:
            path = _path(source.values["config_file"])
            if path is not None:
                sources.append(SettingsSource.file(path, spelled=spelled))
        except InvalidSetting as exc:
            errors.append(exc)
        except ConfigurationError as exc:
            errors.append(_invalid(exc, "config_file", source))
        break
    for source in sources:
        errors.extend(_unknown(bare, spelled, source) for bare, spelled in source.unknown)
    # Highest precedence first: the first source that gives a setting wins.
    chosen: dict[str, SettingsSource] = {}
    for source in sources:
        for key in source.values:
            chosen.setdefault(key, source)
    values: dict[str, Any] = {}
    for key, source in chosen.items():
        try:
            values[key] = SETTINGS[key].parse(source.values[key])
        except ConfigurationError as exc:
            errors.append(_invalid(exc, key, source))
    if "service" not in chosen:
        errors.append(
            InvalidSetting(
                "required: name this service (code: service=...; Flask: MESHWARE_SERVICE; "
                'Django: MESHWARE["SERVICE"]; environment: MESHWARE_SERVICE)',
                key="service",
                source="defaults",
                problem="missing",
                field="service",
            )
        )
    if errors:
        return None, errors
    try:
        settings = MeshSettings(**values, sources={k: s.name for k, s in chosen.items()})
    except ConfigurationError as exc:
        found = _key_of(exc.field)
        if found is None or found not in chosen:
            return None, [
                InvalidSetting(
                    _message(exc),
                    key=found,
                    source="defaults",
                    problem="invalid",
                    field=exc.field,
                    value=exc.value,
                )
            ]
        rest = (exc.field or "")[len(found) :].removeprefix(".")
        relative = ConfigurationError(_message(exc), field=rest or None, value=exc.value)
        return None, [_invalid(relative, found, chosen[found])]
    return settings, []


def load_settings(
    code: Mapping[str, Any] | None = None,
    *,
    framework: SettingsSource | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: str | os.PathLike[str] | None = None,
) -> MeshSettings:
    """Merge the sources into one :class:`MeshSettings` (see the module docs for the order).

    Args:
        code: settings given explicitly in code (``{"service": "orders"}``); the highest
            precedence.
        framework: the framework's settings (:meth:`SettingsSource.prefixed` of Flask's
            ``app.config``, :meth:`SettingsSource.keyed` of Django's ``MESHWARE``).
        environ: the environment to read ``MESHWARE_*`` variables from (``os.environ`` when
            ``None``).
        config_file: the YAML config file; by default the one named by the ``config_file``
            setting of a source (``MESHWARE_CONFIG_FILE`` in the environment).

    Returns:
        The merged, validated settings.

    Raises:
        InvalidSetting: the first problem found: an unknown setting, a missing service name,
            an unreadable config file or an invalid value, naming the setting as its source
            spells it and the source.
    """
    settings, errors = _collect(code, framework, environ, config_file)
    if settings is None:
        raise errors[0]
    return settings


def check_settings(
    code: Mapping[str, Any] | None = None,
    *,
    framework: SettingsSource | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: str | os.PathLike[str] | None = None,
) -> list[InvalidSetting]:
    """Every problem :func:`load_settings` would find, rather than the first (for tools
    such as Django's system checks). Same arguments; an empty list means the settings load.

    Values are validated one by one first; the checks that combine several settings (such as
    ``default_timeout`` against ``max_timeout``) run only when each value is valid alone.
    """
    return _collect(code, framework, environ, config_file)[1]


def settings_table() -> Sequence[tuple[str, str, str, str]]:
    """``(name, environment variable, default, help)`` for every setting (for docs)."""
    rows = []
    for spec in SETTINGS.values():
        default = "required" if spec.default is _REQUIRED else repr(spec.default)
        if isinstance(spec.default, Mapping):
            default = "{}"
        rows.append((spec.key, spec.env, default, spec.help))
    return rows
