"""Endpoints of a destination service, their localities, and label selectors.

An :class:`Endpoint` is one address a destination service answers on (a pod, a VM, a
container), with the labels discovery knows about it (``version``, ``track``, ...), an
optional load-balancing weight and an optional :class:`Locality`. Resolvers
(:mod:`meshware.outbound.discovery`) produce endpoints; balancers
(:mod:`meshware.outbound.balancing`) pick one of them per call.

:class:`Subset` is Istio's DestinationRule subset (a named label selector, such as
``v2`` = ``{"version": "v2"}``); :class:`LabelSelector` is the compiled matcher behind it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import KW_ONLY, dataclass, field
from types import MappingProxyType
from typing import Any

from meshware.exceptions import ConfigurationError

__all__ = [
    "REGION_LABEL",
    "SUBZONE_LABEL",
    "ZONE_LABEL",
    "Endpoint",
    "LabelSelector",
    "Locality",
    "Subset",
]

#: Kubernetes' well-known node label for the region (copied onto endpoints by discovery).
REGION_LABEL = "topology.kubernetes.io/region"
#: Kubernetes' well-known node label for the zone.
ZONE_LABEL = "topology.kubernetes.io/zone"
#: Istio's label for the subzone (Kubernetes has none).
SUBZONE_LABEL = "topology.istio.io/subzone"

_EMPTY_LABELS: Mapping[str, str] = MappingProxyType({})
_BAD_HOST_CHARS = frozenset(" \t\r\n/?#@[]\\,;")


@dataclass(frozen=True, slots=True)
class Locality:
    """Where an endpoint (or the caller) runs: region, zone and subzone, as in Istio.

    Parts are compared from the left: two localities in different regions share nothing even
    when their zone names happen to be equal. An empty part is unknown and matches nothing.

    Args:
        region: the region (``"eu-west-1"``). Required.
        zone: the zone inside the region (``"eu-west-1a"``), or ``""`` when unknown.
        subzone: the subzone inside the zone (a rack, a node pool), or ``""`` when unknown.

    Raises:
        ConfigurationError: when a part is not a string, contains ``/``, or when ``region`` is
            empty, or a ``subzone`` is given without a ``zone``.
    """

    region: str
    zone: str = ""
    subzone: str = ""

    def __post_init__(self) -> None:
        for name in ("region", "zone", "subzone"):
            part = getattr(self, name)
            if not isinstance(part, str) or "/" in part or part != part.strip():
                raise ConfigurationError(
                    "expected a locality part without '/' or surrounding spaces",
                    field=f"locality.{name}",
                    value=part,
                )
        if not self.region:
            raise ConfigurationError(
                "expected a non-empty region", field="locality.region", value=self.region
            )
        if self.subzone and not self.zone:
            raise ConfigurationError(
                "a subzone needs a zone", field="locality.subzone", value=self.subzone
            )

    @classmethod
    def parse(cls, text: str, *, field: str = "locality") -> Locality:
        """Parse Istio's ``"region/zone/subzone"`` form (zone and subzone may be left out).

        Args:
            text: ``"us-east1"``, ``"us-east1/us-east1-b"`` or ``"us-east1/us-east1-b/rack7"``.
            field: the setting's name, used in error messages.

        Raises:
            ConfigurationError: when ``text`` is not a string of one to three non-empty parts.
        """
        if not isinstance(text, str):
            raise ConfigurationError(
                "expected a 'region/zone/subzone' string", field=field, value=text
            )
        parts = text.split("/")
        if len(parts) > 3 or any(not p or p != p.strip() for p in parts):
            raise ConfigurationError(
                "expected 'region', 'region/zone' or 'region/zone/subzone' with non-empty parts",
                field=field,
                value=text,
            )
        parts += [""] * (3 - len(parts))
        return cls(parts[0], parts[1], parts[2])

    @classmethod
    def from_labels(cls, labels: Mapping[str, str]) -> Locality | None:
        """Build a locality from Kubernetes topology labels, or return ``None``.

        Reads ``topology.kubernetes.io/region``, ``topology.kubernetes.io/zone`` and
        ``topology.istio.io/subzone``. Returns ``None`` when the region label is absent.
        """
        region = labels.get(REGION_LABEL)
        if not region:
            return None
        zone = labels.get(ZONE_LABEL, "")
        subzone = labels.get(SUBZONE_LABEL, "") if zone else ""
        return cls(region, zone, subzone)

    def match_level(self, other: Locality | None) -> int:
        """How many leading parts ``other`` shares with this locality, from 0 to 3.

        3 means same subzone, 2 same zone, 1 same region, 0 nothing in common (or ``other`` is
        ``None``). Unknown (empty) parts never match.
        """
        if other is None or other.region != self.region:
            return 0
        if not self.zone or other.zone != self.zone:
            return 1
        if not self.subzone or other.subzone != self.subzone:
            return 2
        return 3

    def __str__(self) -> str:
        return "/".join(p for p in (self.region, self.zone, self.subzone) if p)


def _check_address(address: object, field: str = "address") -> str:
    if not isinstance(address, str) or not address:
        raise ConfigurationError(
            "expected a non-empty IP address or host name", field=field, value=address
        )
    if ":" in address:
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            raise ConfigurationError(
                "expected an IP address or host name without a port "
                "(IPv6 addresses without brackets)",
                field=field,
                value=address,
            ) from None
        return address
    if not _BAD_HOST_CHARS.isdisjoint(address):
        raise ConfigurationError(
            "expected an IP address or host name without spaces, '/', '@' or brackets",
            field=field,
            value=address,
        )
    return address


def _check_port(port: object, field: str = "port") -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigurationError(
            "expected an integer port from 1 to 65535", field=field, value=port
        )
    return port


def _check_weight(weight: object, field: str = "weight") -> int:
    if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
        raise ConfigurationError(
            "expected an integer weight of at least 1", field=field, value=weight
        )
    return weight


def _split_host_port(text: object, field: str, default_port: int | None = None) -> tuple[str, int]:
    if not isinstance(text, str) or not text.strip():
        raise ConfigurationError("expected 'host:port'", field=field, value=text)
    text = text.strip()
    port_text: str | None
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigurationError(
                "expected '[ipv6]:port' with a closing bracket", field=field, value=text
            )
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    elif ":" in text:
        raise ConfigurationError(
            "expected 'host:port' (write IPv6 addresses in brackets: '[::1]:8443')",
            field=field,
            value=text,
        )
    else:
        host, port_text = text, None
    _check_address(host, field)
    if port_text is None:
        if default_port is None:
            raise ConfigurationError("expected 'host:port' with a port", field=field, value=text)
        return host, default_port
    if not port_text.isdigit() or not port_text.isascii():
        raise ConfigurationError(
            "expected 'host:port' with a decimal port from 1 to 65535", field=field, value=text
        )
    return host, _check_port(int(port_text), field)


def _freeze_labels(labels: object, field: str = "labels") -> Mapping[str, str]:
    if labels is None:
        return _EMPTY_LABELS
    if not isinstance(labels, Mapping):
        raise ConfigurationError(
            "expected a mapping of label names to string values", field=field, value=labels
        )
    for name, value in labels.items():
        if not isinstance(name, str) or not name:
            raise ConfigurationError(
                "expected a non-empty string label name", field=field, value=name
            )
        if not isinstance(value, str):
            raise ConfigurationError(
                "expected a string label value", field=f"{field}.{name}", value=value
            )
    return MappingProxyType(dict(labels)) if labels else _EMPTY_LABELS


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One address of a destination service.

    ``address`` and ``port`` may be passed by position; the rest by keyword::

        Endpoint("10.0.3.7", 8443, labels={"version": "v2"}, locality=Locality.parse("eu/eu-1a"))

    Args:
        address: an IPv4 address, an IPv6 address without brackets, or a host name.
        port: the TCP port, 1-65535.
        labels: the endpoint's labels (``{"version": "v2"}``). Stored as a read-only copy.
        weight: the load-balancing weight, at least 1 (Envoy's ``load_balancing_weight``).
            An endpoint of weight 2 gets about twice the calls of one of weight 1.
        locality: where the endpoint runs. When ``None`` it is taken from the Kubernetes
            topology labels in ``labels`` (see :meth:`Locality.from_labels`), if present.

    Raises:
        ConfigurationError: when a field has the wrong type or range.

    Endpoints compare equal when all fields are equal and hash by address, port, weight and
    locality, so they can live in sets and dictionary keys.
    """

    address: str
    port: int
    _: KW_ONLY
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY_LABELS, hash=False)
    weight: int = 1
    locality: Locality | None = None
    _key: str = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        _check_address(self.address)
        _check_port(self.port)
        _check_weight(self.weight)
        labels = _freeze_labels(self.labels)
        object.__setattr__(self, "labels", labels)
        if self.locality is None:
            object.__setattr__(self, "locality", Locality.from_labels(labels))
        elif not isinstance(self.locality, Locality):
            raise ConfigurationError(
                "expected a Locality (use Locality.parse for 'region/zone/subzone' strings)",
                field="locality",
                value=self.locality,
            )
        host = f"[{self.address}]" if ":" in self.address else self.address
        object.__setattr__(self, "_key", f"{host}:{self.port}")

    @classmethod
    def parse(
        cls,
        text: str,
        *,
        default_port: int | None = None,
        labels: Mapping[str, str] | None = None,
        weight: int = 1,
        locality: Locality | None = None,
    ) -> Endpoint:
        """Build an endpoint from ``"host:port"`` (``"[::1]:8443"`` for IPv6).

        Args:
            text: the endpoint; surrounding whitespace is ignored.
            default_port: the port to use when ``text`` has none; without it a port is required.
            labels: as for :class:`Endpoint`.
            weight: as for :class:`Endpoint`.
            locality: as for :class:`Endpoint`.

        Raises:
            ConfigurationError: when ``text`` is not ``host:port`` with a port from 1 to 65535.
        """
        host, port = _split_host_port(text, "endpoint", default_port)
        return cls(host, port, labels=labels or _EMPTY_LABELS, weight=weight, locality=locality)

    @property
    def key(self) -> str:
        """``"address:port"`` (``"[::1]:8443"`` for IPv6): the endpoint's identity.

        Balancers, ``PickContext.exclude`` and outlier detection name endpoints by this key; it
        is also the authority to connect to.
        """
        return self._key

    def __str__(self) -> str:
        return self._key


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """Matches endpoints whose labels include every given label (a Kubernetes equality
    selector, as Istio subsets use). An empty selector matches every endpoint.

    Args:
        labels: the labels an endpoint must carry with exactly these values.

    Raises:
        ConfigurationError: when ``labels`` is not a mapping of strings to strings.
    """

    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY_LABELS, hash=False)
    _items: frozenset[tuple[str, str]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        labels = _freeze_labels(self.labels)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "_items", frozenset(labels.items()))

    def __hash__(self) -> int:
        return hash(self._items)

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether ``labels`` carries every label of this selector."""
        # A set comparison against the items view runs in C, without a per-call generator.
        return self._items <= labels.items()

    def select(self, endpoints: Iterable[Endpoint]) -> tuple[Endpoint, ...]:
        """The endpoints this selector matches, in their original order."""
        if not self._items:
            return endpoints if isinstance(endpoints, tuple) else tuple(endpoints)
        return tuple(e for e in endpoints if self.matches(e.labels))


def _check_subset_name(name: object, field: str) -> str:
    if (
        not isinstance(name, str)
        or not name
        or len(name) > 63
        or not name.replace("-", "").replace("_", "").isalnum()
        or not name.isascii()
    ):
        raise ConfigurationError(
            "expected a subset name of 1-63 ASCII letters, digits, '-' or '_'",
            field=field,
            value=name,
        )
    return name


@dataclass(frozen=True, slots=True, kw_only=True)
class Subset:
    """A named group of a service's endpoints, as Istio's DestinationRule ``subsets[]``.

    Args:
        name: the subset's name (``"v2"``), used by routes to send traffic to it.
        labels: the labels the subset's endpoints carry (``{"version": "v2"}``).

    Raises:
        ConfigurationError: when the name is not 1-63 letters, digits, ``-`` or ``_``, or the
            labels are not strings.
    """

    name: str
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY_LABELS, hash=False)
    selector: LabelSelector = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        _check_subset_name(self.name, "subset.name")
        selector = LabelSelector(self.labels)
        object.__setattr__(self, "labels", selector.labels)
        object.__setattr__(self, "selector", selector)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, field: str = "subset") -> Subset:
        """Build a subset from Istio's shape: ``{"name": "v2", "labels": {"version": "v2"}}``.

        Args:
            data: the subset mapping.
            field: the setting's dotted path (``"subsets[1]"``), used in error messages.

        Raises:
            ConfigurationError: naming ``<field>.name``, ``<field>.labels`` or an unknown key
                (``trafficPolicy`` per subset is not supported here).
        """
        if not isinstance(data, Mapping):
            raise ConfigurationError(
                "expected a mapping with 'name' and 'labels'", field=field, value=data
            )
        for key in data:
            if key not in ("name", "labels"):
                raise ConfigurationError(
                    "unknown subset field (expected 'name' and 'labels')",
                    field=f"{field}.{key}",
                    value=data[key],
                )
        name = _check_subset_name(data.get("name"), f"{field}.name")
        labels = _freeze_labels(data.get("labels"), f"{field}.labels")
        return cls(name=name, labels=labels)

    def select(self, endpoints: Sequence[Endpoint]) -> tuple[Endpoint, ...]:
        """The endpoints that belong to this subset, in their original order."""
        return self.selector.select(endpoints)

    def matches(self, endpoint: Endpoint) -> bool:
        """Whether ``endpoint`` belongs to this subset."""
        return self.selector.matches(endpoint.labels)
