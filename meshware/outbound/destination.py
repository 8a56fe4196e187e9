"""Istio's DestinationRule: how calls to one destination service are balanced, limited,
protected by outlier detection and encrypted, and which subsets the service has.

A rule is read from the ``spec`` of an Istio ``DestinationRule`` resource::

    rule = DestinationRule.from_mapping(
        {
            "host": "reviews",
            "trafficPolicy": {"loadBalancer": {"simple": "LEAST_REQUEST"}},
            "subsets": [
                {"name": "v1", "labels": {"version": "v1"}},
                {
                    "name": "v2",
                    "labels": {"version": "v2"},
                    "trafficPolicy": {"loadBalancer": {"simple": "ROUND_ROBIN"}},
                },
            ],
        }
    )
    rule.policy_for("v2").load_balancer.simple    # "ROUND_ROBIN"

or from the whole resource (``apiVersion``, ``kind``, ``metadata``, ``spec``) with
:meth:`DestinationRule.from_resource`, so Istio's own examples load unchanged. Every field
meshware does not apply is refused with a :class:`~meshware.exceptions.ConfigurationError`
naming its full path (``spec.trafficPolicy.portLevelSettings``); nothing is silently ignored.

The rule is a frozen policy; the mutable state that applies it (balancers, outlier detectors,
breakers, limiters) lives in :class:`meshware.outbound.transports.OutboundState`.
:class:`DestinationRules` finds the rule of a destination by host name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any, Final

from meshware.exceptions import ConfigurationError, InvalidSpiffeId
from meshware.identity.spiffe import SpiffeId
from meshware.outbound.balancing import LoadBalancerSettings
from meshware.outbound.endpoints import Subset
from meshware.outbound.outlier import OutlierDetection
from meshware.outbound.pool_limits import ConnectionPoolLimits

__all__ = [
    "TLS_MODES",
    "ClientTLSSettings",
    "DestinationRule",
    "DestinationRules",
    "TrafficPolicy",
]

#: The ``trafficPolicy.tls.mode`` values meshware accepts.
TLS_MODES: Final = frozenset({"DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"})

_HOST_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST = re.compile(rf"(?:\*|(?:\*\.)?{_HOST_LABEL}(?:\.{_HOST_LABEL})*)")
_API_VERSION = re.compile(r"networking\.istio\.io/v[0-9a-z]+")

_SPEC_KEYS = ("host", "trafficPolicy", "subsets")
_SPEC_UNSUPPORTED = {
    "exportTo": "visibility across namespaces has no meaning in process: a rule applies to "
    "the service that loads it",
    "workloadSelector": "a rule applies to the service that loads it; there are no other "
    "workloads to select",
}
_POLICY_KEYS = ("loadBalancer", "connectionPool", "outlierDetection", "tls")
_POLICY_UNSUPPORTED = {
    "portLevelSettings": "a destination has one policy (per subset), not one per port",
    "tunnel": "meshware does not tunnel calls over CONNECT",
    "proxyProtocol": "meshware does not send the PROXY protocol header",
}
_TLS_KEYS = ("mode", "subjectAltNames", "sni")
_TLS_UNSUPPORTED = {
    "clientCertificate": "meshware presents the service's own certificate",
    "privateKey": "meshware presents the service's own certificate",
    "credentialName": "meshware presents the service's own certificate",
    "caCertificates": "servers are verified against the mesh trust bundle",
    "caCrl": "certificate revocation lists are not supported",
    "insecureSkipVerify": "server verification cannot be turned off",
}
_SUBSET_KEYS = ("name", "labels", "trafficPolicy")


def _expect_mapping(value: object, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigurationError(
            f"expected a mapping, got {type(value).__name__}", field=path, value=value
        )
    return value


def _reject(
    data: Mapping[str, Any], allowed: tuple[str, ...], unsupported: Mapping[str, str], path: str
) -> None:
    for key in data:
        if key in allowed:
            continue
        if key in unsupported:
            raise ConfigurationError(
                f"is not supported: {unsupported[key]}", field=f"{path}.{key}", value=data[key]
            )
        raise ConfigurationError(
            f"unknown field; expected one of {', '.join(allowed)}",
            field=f"{path}.{key}",
            value=key,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientTLSSettings:
    """Istio's ``trafficPolicy.tls``: how calls to the destination are encrypted.

    Modes:

    - ``ISTIO_MUTUAL``: mutual TLS with the service's own mesh certificate; the server must
      present a certificate that chains to the bundle of its trust domain and names the
      expected SPIFFE id (``spiffe://<trust-domain>/ns/<namespace>/sa/<service>``, or one of
      ``subject_alt_names``).
    - ``MUTUAL``: the same as ``ISTIO_MUTUAL``. Istio's ``MUTUAL`` names certificate files;
      meshware always presents the service's own certificate, so the file fields are refused.
    - ``SIMPLE``: one-way TLS: the server is verified exactly as above, but no client
      certificate is presented (for mesh servers that do not ask for one).
    - ``DISABLE``: plaintext HTTP.

    Args:
        mode: one of :data:`TLS_MODES`.
        subject_alt_names: the SPIFFE ids the server may present, replacing the default
            expected id (Istio's ``subjectAltNames``). Stored as a tuple of id strings.
        sni: the server name to send in the TLS handshake (Istio's ``sni``), or ``None`` to
            send none (mesh servers present one certificate whatever the name).

    Raises:
        ConfigurationError: for an unknown mode, an invalid SPIFFE id, or alternative names or
            SNI with ``DISABLE``.
    """

    mode: str = "ISTIO_MUTUAL"
    subject_alt_names: tuple[str, ...] = ()
    sni: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in TLS_MODES:
            raise ConfigurationError(
                f"expected one of {', '.join(sorted(TLS_MODES))}", field="tls.mode", value=self.mode
            )
        names = self.subject_alt_names
        if isinstance(names, str) or not isinstance(names, (tuple, list)):
            raise ConfigurationError(
                "expected a list of SPIFFE ids", field="tls.subjectAltNames", value=names
            )
        ids = []
        for index, name in enumerate(names):
            try:
                ids.append(SpiffeId.parse(name).uri)
            except InvalidSpiffeId as exc:
                raise ConfigurationError(
                    f"expected a SPIFFE id such as 'spiffe://cluster.local/ns/default/sa/"
                    f"reviews' ({exc})",
                    field=f"tls.subjectAltNames[{index}]",
                    value=name,
                ) from exc
        object.__setattr__(self, "subject_alt_names", tuple(ids))
        if self.sni is not None and (
            not isinstance(self.sni, str) or not _HOST.fullmatch(self.sni)
        ):
            raise ConfigurationError("expected a host name", field="tls.sni", value=self.sni)
        if self.mode == "DISABLE" and (ids or self.sni is not None):
            raise ConfigurationError(
                "subjectAltNames and sni need TLS; mode is DISABLE",
                field="tls.mode",
                value=self.mode,
            )

    @property
    def encrypted(self) -> bool:
        """Whether calls use TLS (every mode but ``DISABLE``)."""
        return self.mode != "DISABLE"

    @property
    def presents_certificate(self) -> bool:
        """Whether the service's own certificate is presented (``ISTIO_MUTUAL``, ``MUTUAL``)."""
        return self.mode in ("ISTIO_MUTUAL", "MUTUAL")

    @classmethod
    def from_mapping(cls, spec: Mapping[str, Any], *, path: str = "tls") -> ClientTLSSettings:
        """Read a ``tls`` block: ``mode`` (Istio's default ``DISABLE`` when absent),
        ``subjectAltNames`` and ``sni``.

        Raises:
            ConfigurationError: an unknown or unsupported key (the certificate-file fields),
                or a bad value; ``field`` is the full dotted path.
        """
        spec = _expect_mapping(spec, path)
        _reject(spec, _TLS_KEYS, _TLS_UNSUPPORTED, path)
        mode = spec.get("mode", "DISABLE")
        if not isinstance(mode, str) or mode not in TLS_MODES:
            raise ConfigurationError(
                f"expected one of {', '.join(sorted(TLS_MODES))}", field=f"{path}.mode", value=mode
            )
        names = spec.get("subjectAltNames", ())
        if isinstance(names, str) or not isinstance(names, (list, tuple)):
            raise ConfigurationError(
                "expected a list of SPIFFE ids", field=f"{path}.subjectAltNames", value=names
            )
        try:
            return cls(mode=mode, subject_alt_names=tuple(names), sni=spec.get("sni"))
        except ConfigurationError as exc:
            raise _reroot(exc, path) from exc


def _reroot(exc: ConfigurationError, path: str) -> ConfigurationError:
    # Field names of a block's own checks ("tls.sni") become full paths ("spec....tls.sni").
    inner = exc.field or ""
    leaf = inner.split(".", 1)[1] if "." in inner else inner
    message = str(exc)
    if inner and message.startswith(f"{inner}: "):
        message = message[len(inner) + 2 :]
    return ConfigurationError(message, field=f"{path}.{leaf}" if leaf else path, value=exc.value)


@dataclass(frozen=True, slots=True, kw_only=True)
class TrafficPolicy:
    """Istio's ``trafficPolicy``: the four settings meshware applies to a destination.

    ``None`` means "not set here": the rule's value (for a subset) or meshware's default
    applies (see :class:`meshware.outbound.transports.OutboundState`).

    Args:
        load_balancer: ``loadBalancer`` (algorithm, consistent hash, locality).
        connection_pool: ``connectionPool`` (calls in flight, queue, timeouts).
        outlier_detection: ``outlierDetection`` (ejection of failing endpoints).
        tls: ``tls`` (how calls are encrypted).

    Raises:
        ConfigurationError: a field has the wrong type.
    """

    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolLimits | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None

    def __post_init__(self) -> None:
        for name, kind in (
            ("load_balancer", LoadBalancerSettings),
            ("connection_pool", ConnectionPoolLimits),
            ("outlier_detection", OutlierDetection),
            ("tls", ClientTLSSettings),
        ):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise ConfigurationError(
                    f"expected a {kind.__name__} or None",
                    field=f"trafficPolicy.{name}",
                    value=value,
                )

    @classmethod
    def from_mapping(cls, spec: Mapping[str, Any], *, path: str = "trafficPolicy") -> TrafficPolicy:
        """Read a ``trafficPolicy`` block with Istio's camelCase keys.

        Args:
            spec: the ``trafficPolicy`` mapping.
            path: its dotted path, the prefix of error fields.

        Raises:
            ConfigurationError: an unknown or unsupported key (``portLevelSettings``,
                ``tunnel``, ``proxyProtocol``) or a bad value, naming the full path.
        """
        spec = _expect_mapping(spec, path)
        _reject(spec, _POLICY_KEYS, _POLICY_UNSUPPORTED, path)
        values: dict[str, Any] = {}
        if spec.get("loadBalancer") is not None:
            values["load_balancer"] = LoadBalancerSettings.from_config(
                spec["loadBalancer"], field=f"{path}.loadBalancer"
            )
        if spec.get("connectionPool") is not None:
            values["connection_pool"] = ConnectionPoolLimits.from_mapping(
                spec["connectionPool"], prefix=f"{path}.connectionPool"
            )
        if spec.get("outlierDetection") is not None:
            values["outlier_detection"] = OutlierDetection.from_mapping(
                spec["outlierDetection"], prefix=f"{path}.outlierDetection"
            )
        if spec.get("tls") is not None:
            values["tls"] = ClientTLSSettings.from_mapping(spec["tls"], path=f"{path}.tls")
        return cls(**values)

    def merged_with(self, override: TrafficPolicy | None) -> TrafficPolicy:
        """This policy with every field ``override`` sets replacing the whole field, as
        Istio merges a subset's policy into the rule's (no deeper merge)."""
        if override is None:
            return self
        changes = {
            f.name: getattr(override, f.name)
            for f in fields(override)
            if getattr(override, f.name) is not None
        }
        return replace(self, **changes) if changes else self


_EMPTY_POLICY: Final = TrafficPolicy()
_NO_SUBSET_POLICIES: Mapping[str, TrafficPolicy] = MappingProxyType({})


@dataclass(frozen=True, slots=True, kw_only=True)
class DestinationRule:
    """Istio's ``DestinationRule``: the traffic policy and subsets of one destination host.

    Args:
        host: the destination: a service name (``"reviews"``), a fully qualified one
            (``"reviews.prod.svc.cluster.local"``) or a wildcard (``"*.example.com"``).
            Stored lower-case. See :class:`DestinationRules` for how calls are matched.
        traffic_policy: the rule's policy, for the whole destination.
        subsets: the named subsets (:class:`~meshware.outbound.endpoints.Subset`).
        subset_policies: a subset's own ``trafficPolicy``, by subset name; each field it sets
            replaces the rule's field for calls to that subset.
        name: the resource's ``metadata.name``, for messages.
        namespace: the resource's ``metadata.namespace``, for messages.

    Raises:
        ConfigurationError: a bad host, two subsets with one name, or a subset policy for a
            subset that does not exist.
    """

    host: str
    traffic_policy: TrafficPolicy = _EMPTY_POLICY
    subsets: tuple[Subset, ...] = ()
    subset_policies: Mapping[str, TrafficPolicy] = field(
        default_factory=lambda: _NO_SUBSET_POLICIES, hash=False
    )
    name: str | None = None
    namespace: str | None = None
    _by_name: Mapping[str, Subset] = field(init=False, repr=False, compare=False)
    _policies: Mapping[str | None, TrafficPolicy] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        host = self.host
        if not isinstance(host, str) or len(host) > 253 or not _HOST.fullmatch(host.lower()):
            raise ConfigurationError(
                "expected a host name such as 'reviews', 'reviews.prod.svc.cluster.local' or "
                "'*.example.com'",
                field="host",
                value=host,
            )
        object.__setattr__(self, "host", host.lower())
        if not isinstance(self.traffic_policy, TrafficPolicy):
            raise ConfigurationError(
                "expected a TrafficPolicy", field="trafficPolicy", value=self.traffic_policy
            )
        subsets = self.subsets
        if isinstance(subsets, (str, bytes, Mapping)) or not isinstance(subsets, Iterable):
            raise ConfigurationError("expected a list of Subset", field="subsets", value=subsets)
        subsets = tuple(subsets)
        by_name: dict[str, Subset] = {}
        for index, subset in enumerate(subsets):
            if not isinstance(subset, Subset):
                raise ConfigurationError(
                    "expected a Subset", field=f"subsets[{index}]", value=subset
                )
            if subset.name in by_name:
                raise ConfigurationError(
                    "two subsets have this name", field=f"subsets[{index}].name", value=subset.name
                )
            by_name[subset.name] = subset
        object.__setattr__(self, "subsets", subsets)
        overrides = self.subset_policies
        if not isinstance(overrides, Mapping):
            raise ConfigurationError(
                "expected a mapping of subset name to TrafficPolicy",
                field="subset_policies",
                value=overrides,
            )
        policies: dict[str | None, TrafficPolicy] = {None: self.traffic_policy}
        for subset_name, policy in overrides.items():
            if subset_name not in by_name:
                raise ConfigurationError(
                    "no subset has this name", field="subset_policies", value=subset_name
                )
            if not isinstance(policy, TrafficPolicy):
                raise ConfigurationError(
                    "expected a TrafficPolicy", field=f"subset_policies.{subset_name}", value=policy
                )
        for subset_name in by_name:
            policies[subset_name] = self.traffic_policy.merged_with(overrides.get(subset_name))
        object.__setattr__(
            self,
            "subset_policies",
            MappingProxyType(dict(overrides)) if overrides else _NO_SUBSET_POLICIES,
        )
        object.__setattr__(self, "_by_name", MappingProxyType(by_name))
        object.__setattr__(self, "_policies", MappingProxyType(policies))

    @classmethod
    def from_mapping(
        cls,
        spec: Mapping[str, Any],
        *,
        path: str = "spec",
        name: str | None = None,
        namespace: str | None = None,
    ) -> DestinationRule:
        """Read a DestinationRule ``spec``: ``host``, ``trafficPolicy`` and ``subsets``
        (each with ``name``, ``labels`` and an optional ``trafficPolicy``).

        Args:
            spec: the ``spec`` mapping, with Istio's camelCase keys.
            path: its dotted path, the prefix of error fields.
            name: the resource's name, kept for messages.
            namespace: the resource's namespace, kept for messages.

        Raises:
            ConfigurationError: an unknown or unsupported field (``exportTo``,
                ``workloadSelector``, ``portLevelSettings``, ...) or a bad value; ``field``
                is the full dotted path (``spec.subsets[1].trafficPolicy.tls.mode``).
        """
        spec = _expect_mapping(spec, path)
        _reject(spec, _SPEC_KEYS, _SPEC_UNSUPPORTED, path)
        if "host" not in spec:
            raise ConfigurationError("is required", field=f"{path}.host")
        host = spec["host"]
        if not isinstance(host, str) or not _HOST.fullmatch(host.lower()):
            raise ConfigurationError(
                "expected a host name such as 'reviews', 'reviews.prod.svc.cluster.local' or "
                "'*.example.com'",
                field=f"{path}.host",
                value=host,
            )
        policy = _EMPTY_POLICY
        if spec.get("trafficPolicy") is not None:
            policy = TrafficPolicy.from_mapping(spec["trafficPolicy"], path=f"{path}.trafficPolicy")
        raw_subsets = spec.get("subsets") or ()
        if isinstance(raw_subsets, (str, bytes, Mapping)) or not isinstance(raw_subsets, Iterable):
            raise ConfigurationError(
                "expected a list of subsets", field=f"{path}.subsets", value=raw_subsets
            )
        subsets: list[Subset] = []
        overrides: dict[str, TrafficPolicy] = {}
        seen: set[str] = set()
        for index, item in enumerate(raw_subsets):
            where = f"{path}.subsets[{index}]"
            item = _expect_mapping(item, where)
            _reject(item, _SUBSET_KEYS, {}, where)
            subset = Subset.from_mapping(
                {k: v for k, v in item.items() if k != "trafficPolicy"}, field=where
            )
            if subset.name in seen:
                raise ConfigurationError(
                    "another subset has this name", field=f"{where}.name", value=subset.name
                )
            seen.add(subset.name)
            subsets.append(subset)
            if item.get("trafficPolicy") is not None:
                overrides[subset.name] = TrafficPolicy.from_mapping(
                    item["trafficPolicy"], path=f"{where}.trafficPolicy"
                )
        return cls(
            host=host,
            traffic_policy=policy,
            subsets=tuple(subsets),
            subset_policies=overrides,
            name=name,
            namespace=namespace,
        )

    @classmethod
    def from_resource(cls, resource: Mapping[str, Any], *, path: str = "") -> DestinationRule:
        """Read a whole ``DestinationRule`` resource, as ``kubectl`` and Istio's docs write it.

        ``apiVersion`` must be ``networking.istio.io/<version>`` and ``kind``
        ``DestinationRule``; ``metadata.name`` and ``metadata.namespace`` are kept (other
        metadata, such as labels and annotations, is Kubernetes bookkeeping and is not read);
        ``spec`` is read with :meth:`from_mapping`.

        Args:
            resource: the resource mapping (for example from ``yaml.safe_load``).
            path: a prefix for error fields (``"rules[2]"``), empty for none.

        Raises:
            ConfigurationError: a missing or wrong ``apiVersion``, ``kind`` or ``spec``, an
                unknown top-level key, or any error of :meth:`from_mapping`.
        """
        prefix = f"{path}." if path else ""
        resource = _expect_mapping(resource, path or "resource")
        for key in resource:
            if key not in ("apiVersion", "kind", "metadata", "spec", "status"):
                raise ConfigurationError(
                    "unknown field; expected apiVersion, kind, metadata and spec",
                    field=f"{prefix}{key}",
                    value=key,
                )
        api = resource.get("apiVersion")
        if not isinstance(api, str) or not _API_VERSION.fullmatch(api):
            raise ConfigurationError(
                "expected 'networking.istio.io/v1' (or another networking.istio.io version)",
                field=f"{prefix}apiVersion",
                value=api,
            )
        if resource.get("kind") != "DestinationRule":
            raise ConfigurationError(
                "expected 'DestinationRule'", field=f"{prefix}kind", value=resource.get("kind")
            )
        metadata = _expect_mapping(resource.get("metadata") or {}, f"{prefix}metadata")
        name, namespace = metadata.get("name"), metadata.get("namespace")
        for key, value in (("name", name), ("namespace", namespace)):
            if value is not None and not isinstance(value, str):
                raise ConfigurationError(
                    "expected a string", field=f"{prefix}metadata.{key}", value=value
                )
        if resource.get("spec") is None:
            raise ConfigurationError("is required", field=f"{prefix}spec")
        return cls.from_mapping(
            resource["spec"], path=f"{prefix}spec", name=name, namespace=namespace
        )

    @property
    def subset_names(self) -> frozenset[str]:
        """The names of the rule's subsets."""
        return frozenset(self._by_name)

    def subset(self, name: str) -> Subset | None:
        """The subset called ``name``, or ``None`` when the rule has none of that name."""
        return self._by_name.get(name)

    def policy_for(self, subset: str | None = None) -> TrafficPolicy:
        """The traffic policy in force for calls to ``subset`` (``None``: the whole
        destination): the rule's policy with the subset's own fields replacing it.

        Raises:
            ConfigurationError: the rule has no subset called ``subset``.
        """
        policy = self._policies.get(subset)
        if policy is None:
            known = ", ".join(sorted(self._by_name)) or "none"
            raise ConfigurationError(
                f"the DestinationRule for {self.host} has no such subset (subsets: {known})",
                field="subset",
                value=subset,
            )
        return policy


class DestinationRules:
    """The DestinationRules of a client, found by the destination a call goes to.

    A call to destination ``d`` uses, in this order of precedence:

    1. the rule whose host is exactly ``d``;
    2. a rule whose host starts with ``d`` as whole labels: ``reviews`` and ``reviews.prod``
       find ``reviews.prod.svc.cluster.local`` (unless two rules would match that way);
    3. a rule whose host is a leading part of ``d``: a rule for ``reviews`` applies to calls
       to ``reviews.prod.svc.cluster.local``;
    4. the wildcard rule with the longest matching suffix (``*.example.com``, then ``*``).

    Lookups are cached per destination name.

    Args:
        rules: the rules.

    Raises:
        ConfigurationError: two rules have the same host, or an item is not a
            :class:`DestinationRule`.
    """

    __slots__ = ("_cache", "_exact", "_prefixes", "_rules", "_wildcards")

    def __init__(self, rules: Iterable[DestinationRule] = ()) -> None:
        items = tuple(rules)
        exact: dict[str, DestinationRule] = {}
        wildcards: list[tuple[str, DestinationRule]] = []
        prefixes: dict[str, DestinationRule | None] = {}
        for index, rule in enumerate(items):
            if not isinstance(rule, DestinationRule):
                raise ConfigurationError(
                    "expected a DestinationRule", field=f"rules[{index}]", value=rule
                )
            host = rule.host
            if host in exact or any(host == w for w, _ in wildcards):
                raise ConfigurationError(
                    "another DestinationRule has this host",
                    field=f"rules[{index}].host",
                    value=host,
                )
            if host.startswith("*"):
                wildcards.append((host, rule))
                continue
            exact[host] = rule
            labels = host.split(".")
            for end in range(1, len(labels)):
                short = ".".join(labels[:end])
                # Two rules sharing a short form make it ambiguous: it then finds neither.
                prefixes[short] = None if short in prefixes else rule
        wildcards.sort(key=lambda item: len(item[0]), reverse=True)
        self._rules = items
        self._exact = exact
        self._prefixes = prefixes
        self._wildcards = tuple(wildcards)
        self._cache: dict[str, DestinationRule | None] = {}

    @classmethod
    def from_resources(cls, resources: Iterable[Mapping[str, Any] | None]) -> DestinationRules:
        """Rules from ``DestinationRule`` resources (``yaml.safe_load_all`` output; empty
        documents are skipped), each read with :meth:`DestinationRule.from_resource`.

        Raises:
            ConfigurationError: as :meth:`DestinationRule.from_resource`, with the field
                prefixed by the document's index (``resources[1].spec.host``).
        """
        rules = [
            DestinationRule.from_resource(doc, path=f"resources[{i}]")
            for i, doc in enumerate(resources)
            if doc is not None
        ]
        return cls(rules)

    def __len__(self) -> int:
        return len(self._rules)

    def __iter__(self) -> Iterator[DestinationRule]:
        return iter(self._rules)

    def get(self, destination: str) -> DestinationRule | None:
        """The rule that applies to calls to ``destination`` (see the class docs), or
        ``None``."""
        cache = self._cache
        try:
            return cache[destination]
        except KeyError:
            pass
        rule = self._find(destination.lower().rstrip("."))
        if len(cache) < 10_000:
            cache[destination] = rule
        return rule

    def _find(self, name: str) -> DestinationRule | None:
        rule = self._exact.get(name)
        if rule is not None:
            return rule
        rule = self._prefixes.get(name)
        if rule is not None:
            return rule
        labels = name.split(".")
        for end in range(len(labels) - 1, 0, -1):
            rule = self._exact.get(".".join(labels[:end]))
            if rule is not None:
                return rule
        for host, rule in self._wildcards:
            if host == "*" or name.endswith(host[1:]):
                return rule
        return None
