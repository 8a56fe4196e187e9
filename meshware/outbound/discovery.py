"""Service discovery: which host names are mesh services, and where their endpoints are.

A :class:`Resolver` answers one question per outbound call: given the host of the URL
(``"payments"`` in ``http://payments/api/charge``), what are the destination's endpoints?

* a sequence of :class:`~meshware.outbound.endpoints.Endpoint` (possibly empty) means "this is a
  mesh service": the ``meshware.outbound`` client balances over the endpoints, and an empty
  sequence ends in :class:`~meshware.outbound.errors.NoHealthyEndpoint`;
* ``None`` means "not a mesh service": the call goes out untouched, as plain httpx would send it.

Built in: :class:`StaticRegistry` (from code, a mapping, or a watched YAML file),
:class:`EnvResolver` (``MESHWARE_SERVICE_<NAME>`` variables), :class:`DnsResolver` (A/AAAA or
SRV records, as Kubernetes services publish them) and :class:`ChainResolver` (the first
resolver that knows a name wins). Service names are matched case-insensitively, and a trailing
dot is ignored.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, cast, runtime_checkable

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
import yaml
from dns.rdtypes.IN.SRV import SRV

from meshware.exceptions import ConfigurationError
from meshware.outbound.endpoints import (
    Endpoint,
    Locality,
    _check_address,
    _check_port,
    _check_weight,
    _freeze_labels,
    _split_host_port,
)
from meshware.outbound.errors import NoHealthyEndpoint

__all__ = [
    "ChainResolver",
    "DnsResolver",
    "EnvResolver",
    "Resolver",
    "StaticRegistry",
]

logger = logging.getLogger("meshware.outbound.discovery")

_Endpoints = tuple[Endpoint, ...]
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_SERVICE_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_ENDPOINT_KEYS = frozenset({"address", "port", "labels", "weight", "locality"})


@runtime_checkable
class Resolver(Protocol):
    """Finds the endpoints of a destination service.

    Implementations must be cheap on a hit (they run on every outbound call) and safe to call
    from several threads and from an event loop.
    """

    def resolve(self, service: str) -> Sequence[Endpoint] | None:
        """The endpoints of ``service`` (a URL host such as ``"payments"``).

        Returns ``None`` when ``service`` is not a mesh service (the call passes through
        untouched), else the endpoints, possibly none. Return the same sequence object while
        the endpoints do not change: balancers recognise it and skip their rebuild checks.

        Raises:
            NoHealthyEndpoint: when discovery failed and no earlier answer can be served.
        """
        ...

    async def resolve_async(self, service: str) -> Sequence[Endpoint] | None:
        """As :meth:`resolve`, without blocking the event loop on network I/O."""
        ...


def _normalize(service: str) -> str:
    name = service.lower()
    return name[:-1] if name.endswith(".") else name


def _check_service_name(name: object, field: str) -> str:
    if not isinstance(name, str) or len(name) > 253 or not _SERVICE_NAME.fullmatch(name.lower()):
        raise ConfigurationError(
            "expected a service host name: dot-separated labels of letters, digits, '-' or '_'",
            field=field,
            value=name,
        )
    return name.lower()


def _freeze_endpoints(endpoints: object, field: str) -> _Endpoints:
    if isinstance(endpoints, (str, bytes)) or not isinstance(endpoints, Iterable):
        raise ConfigurationError("expected a list of endpoints", field=field, value=endpoints)
    result: list[Endpoint] = []
    seen: dict[str, int] = {}
    for index, endpoint in enumerate(endpoints):
        if not isinstance(endpoint, Endpoint):
            raise ConfigurationError(
                "expected an Endpoint", field=f"{field}[{index}]", value=endpoint
            )
        if endpoint.key in seen:
            raise ConfigurationError(
                f"duplicate endpoint {endpoint.key} (also at {field}[{seen[endpoint.key]}])",
                field=f"{field}[{index}]",
                value=endpoint.key,
            )
        seen[endpoint.key] = index
        result.append(endpoint)
    return tuple(result)


def _endpoint_from_data(item: object, field: str) -> Endpoint:
    if isinstance(item, str):
        host, port = _split_host_port(item, field)
        return Endpoint(host, port)
    if not isinstance(item, Mapping):
        raise ConfigurationError(
            "expected 'host:port' or a mapping with 'address' and 'port'", field=field, value=item
        )
    for key in item:
        if key not in _ENDPOINT_KEYS:
            raise ConfigurationError(
                "unknown endpoint field (expected address, port, labels, weight, locality)",
                field=f"{field}.{key}",
                value=item[key],
            )
    address = _check_address(item.get("address"), f"{field}.address")
    port = _check_port(item.get("port"), f"{field}.port")
    labels = _freeze_labels(item.get("labels"), f"{field}.labels")
    weight = _check_weight(item.get("weight", 1), f"{field}.weight")
    raw_locality = item.get("locality")
    locality = (
        None if raw_locality is None else Locality.parse(raw_locality, field=f"{field}.locality")
    )
    return Endpoint(address, port, labels=labels, weight=weight, locality=locality)


def _services_from_data(data: object, field: str) -> dict[str, _Endpoints]:
    root = f"{field}." if field else ""
    if not isinstance(data, Mapping):
        raise ConfigurationError(
            "expected a mapping with a 'services' key", field=field or None, value=data
        )
    for key in data:
        if key != "services":
            raise ConfigurationError(
                "unknown registry field (expected 'services')",
                field=f"{root}{key}",
                value=data[key],
            )
    services = data.get("services")
    if services is None:
        services = {}
    if not isinstance(services, Mapping):
        raise ConfigurationError(
            "expected a mapping of service names to {'endpoints': [...]}",
            field=f"{root}services",
            value=services,
        )
    result: dict[str, _Endpoints] = {}
    for raw_name, spec in services.items():
        path = f"{root}services.{raw_name}"
        name = _check_service_name(raw_name, path)
        if name in result:
            raise ConfigurationError(
                "service listed twice (names are case-insensitive)", field=path, value=raw_name
            )
        if not isinstance(spec, Mapping):
            raise ConfigurationError(
                "expected a mapping with an 'endpoints' list", field=path, value=spec
            )
        for key in spec:
            if key != "endpoints":
                raise ConfigurationError(
                    "unknown service field (expected 'endpoints')",
                    field=f"{path}.{key}",
                    value=spec[key],
                )
        items = spec.get("endpoints")
        if items is None:
            items = []
        if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
            raise ConfigurationError(
                "expected a list of endpoints", field=f"{path}.endpoints", value=items
            )
        endpoints = [
            _endpoint_from_data(item, f"{path}.endpoints[{index}]")
            for index, item in enumerate(items)
        ]
        result[name] = _freeze_endpoints(endpoints, f"{path}.endpoints")
    return result


def _load_yaml(path: Path) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"cannot read the registry file {path}: {exc}") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"invalid YAML in the registry file {path}: {exc}") from exc


def _services_from_file(path: Path) -> dict[str, _Endpoints]:
    data = _load_yaml(path)
    try:
        return _services_from_data({} if data is None else data, "")
    except ConfigurationError as exc:
        message = str(exc)
        if exc.field is not None:
            message = message.removeprefix(f"{exc.field}: ")
        raise ConfigurationError(
            f"{message} (in {path})", field=exc.field, value=exc.value
        ) from exc


_Signature = tuple[int, int, int]


def _signature(path: Path) -> _Signature:
    st = os.stat(path)
    # The inode catches an atomic rename (a Kubernetes ConfigMap update) that keeps the size.
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class _FileWatch:
    __slots__ = ("clock", "failed", "interval", "lock", "next_check", "path", "signature")

    def __init__(
        self, path: Path, signature: _Signature, interval: float, clock: Callable[[], float]
    ) -> None:
        self.path = path
        self.signature = signature
        self.failed: _Signature | None = None
        self.interval = interval
        self.clock = clock
        self.next_check = clock() + interval
        self.lock = threading.Lock()


class StaticRegistry:
    """A fixed list of services and their endpoints, from code, a mapping or a YAML file.

    From code::

        StaticRegistry({"payments": [Endpoint("10.0.0.5", 8443), Endpoint("10.0.0.6", 8443)]})

    Names the registry lists are mesh services; every other name resolves to ``None``. An
    endpoint list may be empty: the service is then known but has nowhere to go.

    Args:
        services: service name (a host name, matched case-insensitively) to its endpoints.

    Raises:
        ConfigurationError: for a bad service name, a non-:class:`Endpoint` item or a duplicate
            endpoint, naming ``services.<name>[<index>]``.
    """

    __slots__ = ("_last_error", "_reload_errors", "_reloads", "_services", "_watch")

    def __init__(self, services: Mapping[str, Iterable[Endpoint]]) -> None:
        if not isinstance(services, Mapping):
            raise ConfigurationError(
                "expected a mapping of service names to endpoint lists",
                field="services",
                value=services,
            )
        frozen: dict[str, _Endpoints] = {}
        for raw_name, endpoints in services.items():
            name = _check_service_name(raw_name, f"services.{raw_name}")
            if name in frozen:
                raise ConfigurationError(
                    "service listed twice (names are case-insensitive)",
                    field=f"services.{raw_name}",
                    value=raw_name,
                )
            frozen[name] = _freeze_endpoints(endpoints, f"services.{raw_name}")
        self._services = frozen
        self._watch: _FileWatch | None = None
        self._reloads = 0
        self._reload_errors = 0
        self._last_error: ConfigurationError | None = None

    @classmethod
    def _of(cls, services: dict[str, _Endpoints]) -> StaticRegistry:
        registry = cls({})
        registry._services = services
        return registry

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, field: str = "") -> StaticRegistry:
        """Build a registry from plain data (parsed YAML or JSON)::

            {"services": {"payments": {"endpoints": [
                {"address": "10.0.0.5", "port": 8443, "labels": {"version": "v2"},
                 "weight": 1, "locality": "eu-west-1/eu-west-1a"},
                "10.0.0.6:8443",
            ]}}}

        Each endpoint is a mapping (``address`` and ``port`` required; ``labels``, ``weight``
        and ``locality`` in Istio's ``"region/zone/subzone"`` form optional) or a
        ``"host:port"`` string (``"[::1]:8443"`` for IPv6).

        Args:
            data: the mapping; its only key is ``services``.
            field: the dotted path of ``data`` in a larger configuration, prefixed to error
                fields (``"discovery"`` gives ``"discovery.services.payments..."``).

        Raises:
            ConfigurationError: naming the exact field, for example
                ``services.payments.endpoints[0].port``.
        """
        return cls._of(_services_from_data(data, field))

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str],
        *,
        watch: bool = False,
        poll_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> StaticRegistry:
        """Build a registry from a YAML (or JSON) file in the :meth:`from_mapping` shape.

        With ``watch=True`` the registry notices when the file changes: on a :meth:`resolve`
        call at least ``poll_interval`` seconds after the previous check it compares the file's
        modification time, size and inode, and on a change re-reads it and swaps the new
        services in at once. A new version that fails to parse is logged (logger
        ``meshware.outbound.discovery``) and counted in :attr:`reload_errors`; the registry
        keeps serving the last good version and does not retry that same broken version. No
        thread is started.

        Args:
            path: the file.
            watch: whether to pick up changes of the file.
            poll_interval: the least time in seconds between two checks of the file.
            clock: the time source for ``poll_interval`` (monotonic seconds).

        Raises:
            ConfigurationError: when the file cannot be read, is not valid YAML, or holds an
                invalid registry (the message names the field and the file).
        """
        if (
            isinstance(poll_interval, bool)
            or not isinstance(poll_interval, (int, float))
            or not poll_interval >= 0
            or math.isinf(poll_interval)
        ):
            raise ConfigurationError(
                "expected a finite number of seconds >= 0",
                field="poll_interval",
                value=poll_interval,
            )
        file = Path(path)
        try:
            signature = _signature(file)
        except OSError as exc:
            raise ConfigurationError(f"cannot read the registry file {file}: {exc}") from exc
        registry = cls._of(_services_from_file(file))
        if watch:
            registry._watch = _FileWatch(file, signature, float(poll_interval), clock)
        return registry

    @property
    def services(self) -> frozenset[str]:
        """The names of the services this registry knows (lower-case)."""
        return frozenset(self._services)

    @property
    def reloads(self) -> int:
        """How many times a changed file was loaded successfully."""
        return self._reloads

    @property
    def reload_errors(self) -> int:
        """How many changed versions of the file failed to load (each version counted once)."""
        return self._reload_errors

    @property
    def last_error(self) -> ConfigurationError | None:
        """The error of the most recent failed reload, or ``None``."""
        return self._last_error

    def resolve(self, service: str) -> _Endpoints | None:
        """The endpoints of ``service``, or ``None`` when the registry does not list it."""
        watch = self._watch
        if watch is not None and watch.clock() >= watch.next_check:
            changed = self._changed_signature(watch)
            if changed is not None:
                self._reload(watch, changed)
        found = self._services.get(service)
        if found is None:
            found = self._services.get(_normalize(service))
        return found

    async def resolve_async(self, service: str) -> _Endpoints | None:
        """As :meth:`resolve`; a changed file is read in a worker thread."""
        watch = self._watch
        if watch is not None and watch.clock() >= watch.next_check:
            changed = self._changed_signature(watch)
            if changed is not None:
                await asyncio.to_thread(self._reload, watch, changed)
        found = self._services.get(service)
        if found is None:
            found = self._services.get(_normalize(service))
        return found

    def check_for_changes(self) -> bool:
        """Check the watched file now, regardless of ``poll_interval``.

        Returns ``True`` when a new version was loaded and swapped in; ``False`` when the file
        is unchanged, broken (see :attr:`last_error`) or not watched.
        """
        watch = self._watch
        if watch is None:
            return False
        changed = self._changed_signature(watch, force=True)
        return changed is not None and self._reload(watch, changed)

    def _changed_signature(self, watch: _FileWatch, force: bool = False) -> _Signature | None:
        now = watch.clock()
        if not force and now < watch.next_check:
            return None
        watch.next_check = now + watch.interval
        try:
            signature = _signature(watch.path)
        except OSError as exc:
            signature = (-1, -1, -1)
            if watch.failed != signature:
                watch.failed = signature
                self._record_error(
                    watch, ConfigurationError(f"cannot read the registry file {watch.path}: {exc}")
                )
            return None
        if signature == watch.signature or signature == watch.failed:
            return None
        return signature

    def _reload(self, watch: _FileWatch, signature: _Signature) -> bool:
        # One reader at a time; others keep serving the current version meanwhile.
        if not watch.lock.acquire(blocking=False):
            return False
        try:
            if signature == watch.signature or signature == watch.failed:
                return False
            try:
                services = _services_from_file(watch.path)
            except ConfigurationError as exc:
                watch.failed = signature
                self._record_error(watch, exc)
                return False
            self._services = services
            watch.signature = signature
            watch.failed = None
            self._reloads += 1
            logger.info("reloaded the service registry from %s", watch.path)
            return True
        finally:
            watch.lock.release()

    def _record_error(self, watch: _FileWatch, exc: ConfigurationError) -> None:
        self._reload_errors += 1
        self._last_error = exc
        logger.error(
            "keeping the last good service registry; the new version of %s is invalid: %s",
            watch.path,
            exc,
        )


def _mangle(service: str) -> str:
    return _normalize(service).upper().replace("-", "_").replace(".", "_")


class EnvResolver:
    """Endpoints from environment variables, for local runs and Docker Compose.

    A service ``payments-api`` is read from ``MESHWARE_SERVICE_PAYMENTS_API``: the name is
    upper-cased and every ``-`` and ``.`` becomes ``_``, after the prefix. The value is a
    comma-separated list of ``host:port`` endpoints (IPv6 in brackets; spaces around items are
    ignored)::

        MESHWARE_SERVICE_PAYMENTS=127.0.0.1:8443,127.0.0.1:8444
        MESHWARE_SERVICE_LEDGER_V2=[::1]:9000

    A variable set to an empty (or blank) value counts as unset. Names no variable covers
    resolve to ``None``. The environment is read once, when the resolver is built.

    Args:
        environ: the variables to read; ``os.environ`` when ``None``.
        prefix: the variable-name prefix.
        default_port: the port of items written without one (``"payments-1"``); without it
            every item needs a port.

    Raises:
        ConfigurationError: naming the variable, when a value is not a valid endpoint list.
    """

    __slots__ = ("_memo", "_prefix", "_services")

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        *,
        prefix: str = "MESHWARE_SERVICE_",
        default_port: int | None = None,
    ) -> None:
        if not isinstance(prefix, str) or not prefix:
            raise ConfigurationError("expected a non-empty prefix", field="prefix", value=prefix)
        if default_port is not None:
            _check_port(default_port, "default_port")
        env = os.environ if environ is None else environ
        services: dict[str, _Endpoints] = {}
        for variable, value in env.items():
            if not variable.startswith(prefix) or len(variable) == len(prefix) or not value.strip():
                continue
            endpoints: list[Endpoint] = []
            for item in value.split(","):
                if not item.strip():
                    raise ConfigurationError(
                        "expected comma-separated 'host:port' items with no empty item",
                        field=variable,
                        value=value,
                    )
                try:
                    host, port = _split_host_port(item, variable, default_port)
                except ConfigurationError as exc:
                    raise ConfigurationError(
                        "expected comma-separated 'host:port' items "
                        f"(IPv6 in brackets: '[::1]:8443'); {item.strip()!r} is not one",
                        field=variable,
                        value=value,
                    ) from exc
                endpoints.append(Endpoint(host, port))
            services[variable[len(prefix) :]] = _freeze_endpoints(endpoints, variable)
        self._prefix = prefix
        self._services = services
        self._memo: dict[str, _Endpoints | None] = {}

    @staticmethod
    def variable_name(service: str, *, prefix: str = "MESHWARE_SERVICE_") -> str:
        """The variable that holds ``service``'s endpoints (``"payments-api"`` gives
        ``"MESHWARE_SERVICE_PAYMENTS_API"``)."""
        return prefix + _mangle(service)

    @property
    def variables(self) -> frozenset[str]:
        """The names of the variables that declared services."""
        return frozenset(self._prefix + name for name in self._services)

    def resolve(self, service: str) -> _Endpoints | None:
        """The endpoints of ``service``, or ``None`` when no variable declares it."""
        try:
            return self._memo[service]
        except KeyError:
            pass
        found = self._services.get(_mangle(service))
        if len(self._memo) >= 1024:
            # Hosts come from application code; the bound only guards against unbounded input.
            self._memo.clear()
        self._memo[service] = found
        return found

    async def resolve_async(self, service: str) -> _Endpoints | None:
        """As :meth:`resolve` (no I/O is involved)."""
        return self.resolve(service)


class _Entry:
    __slots__ = ("endpoints", "expires", "fqdn", "refreshing", "stale_until")

    def __init__(self, fqdn: str) -> None:
        self.fqdn = fqdn
        self.endpoints: _Endpoints | None = None
        self.expires = 0.0
        self.stale_until = 0.0
        self.refreshing = False


_Query = tuple[dns.name.Name, dns.rdatatype.RdataType]
# A lookup plan yields queries and is sent back their answers (None for NXDOMAIN); it returns
# the endpoints (None when the name does not exist) and the TTL of the answer (None: negative).
_Plan = Generator[_Query, "dns.resolver.Answer | None", tuple[_Endpoints | None, float | None]]
_FAMILIES = {"A": dns.rdatatype.A, "AAAA": dns.rdatatype.AAAA}
_SRV_PREFIX = re.compile(r"_[a-z0-9][a-z0-9-]*\._(?:tcp|udp)")
_MAX_ENTRIES = 4096


def _seconds(value: object, field: str, *, positive: bool = False) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or math.isnan(value)
        or math.isinf(value)
        or value < 0
        or (positive and value == 0)
    ):
        expected = (
            "a finite number of seconds > 0" if positive else "a finite number of seconds >= 0"
        )
        raise ConfigurationError(f"expected {expected}", field=field, value=value)
    return float(value)


def _addresses(answer: dns.resolver.Answer | None) -> list[str]:
    if answer is None or answer.rrset is None:
        return []
    return [rdata.to_text() for rdata in answer.rrset]


class DnsResolver:
    """Endpoints from DNS, the way Kubernetes services publish them.

    Two modes:

    * address records (``port=8443``): ``A`` and ``AAAA`` records of ``<name>.<suffix>``, each
      address an endpoint on ``port``. With a headless Kubernetes service these are the pods'
      addresses; with a ClusterIP service, the one virtual IP.
    * SRV records (``srv="_http._tcp"``): ``SRV`` records of ``_http._tcp.<name>.<suffix>``,
      which carry the port (headless services publish one per named port and pod). Targets are
      resolved from the response's additional section, else with their own A/AAAA queries.
      Only the records of the lowest priority are used; the SRV weight becomes the endpoint's
      weight (0 counts as 1).

    ``suffix`` is appended unless the name already ends with it, so ``"payments"`` and
    ``"payments.default.svc.cluster.local"`` are the same service. A name that does not exist
    (NXDOMAIN) is not a mesh service: it resolves to ``None``. A name that exists without
    records resolves to no endpoints.

    Answers are cached for their TTL (the smallest TTL of the answer, its CNAMEs and, for SRV,
    the target addresses), clamped to ``[min_ttl, max_ttl]``; negative answers for
    ``negative_ttl``. When a refresh fails (timeout, SERVFAIL, no reachable server) the expired
    answer is served for up to ``max_stale`` seconds past its expiry, retrying every
    ``negative_ttl`` seconds; while one caller refreshes an expired answer, the others are
    served the expired answer instead of querying too. Endpoints are sorted by address and
    port, and an unchanged answer keeps its sequence object, so balancers keep their state
    across refreshes even when the server rotates the record order.

    Args:
        suffix: the domain appended to names, such as ``"default.svc.cluster.local"``
            (leading or trailing dots are ignored). ``""`` queries names as given.
        port: the port of every endpoint, in address-record mode.
        srv: the SRV prefix (``"_http._tcp"``, ``"_grpc._tcp"``), in SRV mode.
        names: when given, only these names (without the suffix) are looked up; others
            resolve to ``None`` without a query. When ``None``, every name is looked up.
        nameservers: IP addresses of the DNS servers; the system's (``/etc/resolv.conf``) when
            ``None``.
        nameserver_port: the port of ``nameservers``.
        families: the address record types to query, ``"A"`` and/or ``"AAAA"``.
        timeout: seconds allowed for one lookup, all retries included.
        min_ttl: the least seconds an answer is cached, whatever its TTL.
        max_ttl: the most seconds an answer is cached, whatever its TTL.
        negative_ttl: seconds a "does not exist" or "no records" answer is cached, and the
            wait between refresh attempts while a failing server's stale answer is served.
        max_stale: seconds past its expiry an answer may still be served while refreshes fail.
        clock: the time source (monotonic seconds).

    Raises:
        ConfigurationError: naming the bad argument; for example when both or neither of
            ``port`` and ``srv`` are given, or the system has no resolver configuration.
    """

    def __init__(
        self,
        *,
        suffix: str = "",
        port: int | None = None,
        srv: str | None = None,
        names: Iterable[str] | None = None,
        nameservers: Sequence[str] | None = None,
        nameserver_port: int = 53,
        families: Sequence[str] = ("A", "AAAA"),
        timeout: float = 2.0,
        min_ttl: float = 1.0,
        max_ttl: float = 300.0,
        negative_ttl: float = 5.0,
        max_stale: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(suffix, str):
            raise ConfigurationError("expected a domain name string", field="suffix", value=suffix)
        self._suffix = suffix.strip(".").lower()
        if self._suffix:
            _check_service_name(self._suffix, "suffix")
        if (port is None) == (srv is None):
            raise ConfigurationError(
                "expected exactly one of 'port' (A/AAAA records) and 'srv' (SRV records)",
                field="port" if port is None else "srv",
                value=port if srv is None else srv,
            )
        self._port = None if port is None else _check_port(port, "port")
        if srv is not None and (not isinstance(srv, str) or not _SRV_PREFIX.fullmatch(srv)):
            raise ConfigurationError(
                "expected an SRV prefix such as '_http._tcp'", field="srv", value=srv
            )
        self._srv = srv
        self._names = (
            None
            if names is None
            else frozenset(self._fqdn(_check_service_name(n, f"names.{n}")) for n in names)
        )
        if isinstance(families, str) or not families or any(f not in _FAMILIES for f in families):
            raise ConfigurationError(
                "expected a non-empty list of 'A' and/or 'AAAA'", field="families", value=families
            )
        self._families = tuple(_FAMILIES[f] for f in dict.fromkeys(families))
        self._timeout = _seconds(timeout, "timeout", positive=True)
        self._min_ttl = _seconds(min_ttl, "min_ttl")
        self._max_ttl = _seconds(max_ttl, "max_ttl")
        if self._max_ttl < self._min_ttl:
            raise ConfigurationError(
                f"expected max_ttl >= min_ttl ({self._min_ttl})", field="max_ttl", value=max_ttl
            )
        self._negative_ttl = _seconds(negative_ttl, "negative_ttl")
        self._max_stale = _seconds(max_stale, "max_stale")
        self._clock = clock
        self._sync = self._make(dns.resolver.Resolver, nameservers, nameserver_port)
        self._async = self._make(dns.asyncresolver.Resolver, nameservers, nameserver_port)
        self._cache: dict[str, _Entry] = {}
        self._failures = 0
        self._stale_served = 0

    def _make(
        self,
        kind: type[dns.resolver.Resolver] | type[dns.asyncresolver.Resolver],
        nameservers: Sequence[str] | None,
        nameserver_port: int,
    ) -> Any:
        _check_port(nameserver_port, "nameserver_port")
        if nameservers is None:
            try:
                resolver = kind(configure=True)
            except dns.exception.DNSException as exc:
                raise ConfigurationError(
                    f"no system DNS configuration ({exc}); pass nameservers=[...]",
                    field="nameservers",
                ) from exc
        else:
            if isinstance(nameservers, str) or not nameservers:
                raise ConfigurationError(
                    "expected a non-empty list of IP addresses",
                    field="nameservers",
                    value=nameservers,
                )
            for index, server in enumerate(nameservers):
                try:
                    ipaddress.ip_address(server)
                except ValueError:
                    raise ConfigurationError(
                        "expected an IP address", field=f"nameservers[{index}]", value=server
                    ) from None
            resolver = kind(configure=False)
            resolver.nameservers = list(nameservers)
            resolver.port = nameserver_port
        resolver.lifetime = self._timeout
        return resolver

    @property
    def failures(self) -> int:
        """How many lookups failed (timeouts, SERVFAIL, unreachable servers)."""
        return self._failures

    @property
    def stale_served(self) -> int:
        """How many failed refreshes were answered with an expired (stale) answer."""
        return self._stale_served

    def resolve(self, service: str) -> _Endpoints | None:
        """The endpoints of ``service`` from the cache or a (blocking) DNS lookup.

        Raises:
            NoHealthyEndpoint: when the lookup fails and no answer can be served stale.
        """
        entry = self._find(service)
        if entry is not None and self._fresh(entry):
            return entry.endpoints
        fqdn = entry.fqdn if entry is not None else self._candidate(service)
        plan = None if fqdn is None else self._plan(fqdn)
        if fqdn is None or plan is None:
            return None
        try:
            result, ttl = self._run_sync(plan)
        except (dns.exception.DNSException, OSError) as exc:
            return self._failed(entry, fqdn, service, exc)
        return self._store(entry, fqdn, service, result, ttl)

    async def resolve_async(self, service: str) -> _Endpoints | None:
        """As :meth:`resolve`, with asynchronous DNS queries."""
        entry = self._find(service)
        if entry is not None and self._fresh(entry):
            return entry.endpoints
        fqdn = entry.fqdn if entry is not None else self._candidate(service)
        plan = None if fqdn is None else self._plan(fqdn)
        if fqdn is None or plan is None:
            return None
        try:
            result, ttl = await self._run_async(plan)
        except (dns.exception.DNSException, OSError) as exc:
            return self._failed(entry, fqdn, service, exc)
        return self._store(entry, fqdn, service, result, ttl)

    def _find(self, service: str) -> _Entry | None:
        # Entries live under their FQDN and under each spelling callers used, so a hit costs
        # one dictionary lookup.
        cache = self._cache
        entry = cache.get(service)
        if entry is None:
            fqdn = self._fqdn(_normalize(service))
            entry = cache.get(fqdn)
            if entry is not None and len(cache) < _MAX_ENTRIES:
                cache[service] = entry
        return entry

    def _fresh(self, entry: _Entry) -> bool:
        now = self._clock()
        if now < entry.expires:
            return True
        if entry.refreshing and now < entry.stale_until:
            return True  # another caller is refreshing it
        entry.refreshing = True
        return False

    def _fqdn(self, name: str) -> str:
        suffix = self._suffix
        if not suffix or name == suffix or name.endswith("." + suffix):
            return name
        return f"{name}.{suffix}"

    def _candidate(self, service: str) -> str | None:
        name = _normalize(service)
        try:
            ipaddress.ip_address(name.strip("[]"))
            return None
        except ValueError:
            pass
        if not _SERVICE_NAME.fullmatch(name):
            return None
        fqdn = self._fqdn(name)
        if self._names is not None and fqdn not in self._names:
            return None
        return fqdn

    def _plan(self, fqdn: str) -> _Plan | None:
        try:
            qname = dns.name.from_text(fqdn)
            if self._port is not None:
                return self._address_plan(qname, self._port)
            return self._srv_plan(dns.name.from_text(self._srv or "", origin=qname))
        except dns.exception.DNSException:
            return None

    def _address_plan(self, qname: dns.name.Name, port: int) -> _Plan:
        addresses: list[str] = []
        ttl: float | None = None
        for rdtype in self._families:
            answer = yield (qname, rdtype)
            if answer is None:
                if addresses:
                    break
                return None, None
            if answer.rrset is not None:
                addresses += _addresses(answer)
                answer_ttl = answer.chaining_result.minimum_ttl
                ttl = answer_ttl if ttl is None else min(ttl, answer_ttl)
        return tuple(Endpoint(address, port) for address in addresses), ttl

    def _srv_plan(self, qname: dns.name.Name) -> _Plan:
        answer = yield (qname, dns.rdatatype.SRV)
        if answer is None:
            return None, None
        if answer.rrset is None:
            return (), None
        ttl: float = answer.chaining_result.minimum_ttl
        # A target of "." means "no service here" (RFC 2782).
        records = [cast(SRV, r) for r in answer.rrset if cast(SRV, r).target != dns.name.root]
        if not records:
            return (), ttl
        lowest = min(r.priority for r in records)
        # Sorted, so target lookups happen in a stable order.
        records = sorted(
            (r for r in records if r.priority == lowest), key=lambda r: (r.target, r.port)
        )
        known: dict[dns.name.Name, list[str]] = {}
        for rrset in answer.response.additional:
            if rrset.rdtype in self._families:
                known.setdefault(rrset.name, []).extend(rdata.to_text() for rdata in rrset)
                ttl = min(ttl, rrset.ttl)
        endpoints: list[Endpoint] = []
        for record in records:
            target = record.target
            if target not in known:
                addresses: list[str] = []
                for rdtype in self._families:
                    target_answer = yield (target, rdtype)
                    if target_answer is None:
                        break
                    if target_answer.rrset is not None:
                        addresses += _addresses(target_answer)
                        ttl = min(ttl, target_answer.chaining_result.minimum_ttl)
                known[target] = addresses
            weight = max(record.weight, 1)
            endpoints.extend(
                Endpoint(address, record.port, weight=weight) for address in known[target]
            )
        return tuple(endpoints), ttl

    def _run_sync(self, plan: _Plan) -> tuple[_Endpoints | None, float | None]:
        try:
            qname, rdtype = next(plan)
            while True:
                try:
                    answer = self._sync.resolve(
                        qname, rdtype, raise_on_no_answer=False, search=False
                    )
                except dns.resolver.NXDOMAIN:
                    answer = None
                qname, rdtype = plan.send(answer)
        except StopIteration as stop:
            result: tuple[_Endpoints | None, float | None] = stop.value
            return result
        finally:
            plan.close()

    async def _run_async(self, plan: _Plan) -> tuple[_Endpoints | None, float | None]:
        try:
            qname, rdtype = next(plan)
            while True:
                try:
                    answer = await self._async.resolve(
                        qname, rdtype, raise_on_no_answer=False, search=False
                    )
                except dns.resolver.NXDOMAIN:
                    answer = None
                qname, rdtype = plan.send(answer)
        except StopIteration as stop:
            result: tuple[_Endpoints | None, float | None] = stop.value
            return result
        finally:
            plan.close()

    def _store(
        self,
        entry: _Entry | None,
        fqdn: str,
        service: str,
        result: _Endpoints | None,
        ttl: float | None,
    ) -> _Endpoints | None:
        now = self._clock()
        if result is None or ttl is None or not result:
            seconds = self._negative_ttl
        else:
            seconds = min(max(float(ttl), self._min_ttl), self._max_ttl)
        cache = self._cache
        if entry is None:
            entry = cache.get(fqdn)
        if result is not None:
            result = tuple(sorted(dict.fromkeys(result), key=_sort_key))
            if entry is not None and entry.endpoints == result:
                result = entry.endpoints
        if entry is None:
            if len(cache) >= _MAX_ENTRIES - 1:
                for key in [k for k, e in cache.items() if e.stale_until <= now]:
                    del cache[key]
                if len(cache) >= _MAX_ENTRIES - 1:
                    cache.clear()
            entry = cache[fqdn] = _Entry(fqdn)
            cache[service] = entry
        entry.endpoints = result
        entry.expires = now + seconds
        entry.stale_until = entry.expires + self._max_stale
        entry.refreshing = False
        return result

    def _failed(
        self, entry: _Entry | None, fqdn: str, service: str, exc: Exception
    ) -> _Endpoints | None:
        self._failures += 1
        now = self._clock()
        if entry is not None:
            entry.refreshing = False
            if now < entry.stale_until:
                entry.expires = now + self._negative_ttl
                self._stale_served += 1
                logger.warning(
                    "DNS lookup of %s failed (%s); serving the expired answer for up to %.0f s",
                    fqdn,
                    exc,
                    entry.stale_until - now,
                )
                return entry.endpoints
        raise NoHealthyEndpoint(f"DNS lookup of {fqdn} failed: {exc}", destination=service) from exc


def _sort_key(endpoint: Endpoint) -> tuple[str, int]:
    return (endpoint.address, endpoint.port)


class ChainResolver:
    """Asks several resolvers in order; the first answer that is not ``None`` wins.

    Typical: explicit entries first, DNS last::

        ChainResolver([EnvResolver(), StaticRegistry.from_file("registry.yaml"), DnsResolver(...)])

    An empty endpoint list is an answer (the service is known): later resolvers are not asked.
    An error of a resolver propagates.

    Args:
        resolvers: the resolvers, in order.

    Raises:
        ConfigurationError: when ``resolvers`` is empty or holds something that is not a
            :class:`Resolver`.
    """

    __slots__ = ("_resolvers",)

    def __init__(self, resolvers: Iterable[Resolver]) -> None:
        items = tuple(resolvers)
        if not items:
            raise ConfigurationError(
                "expected at least one resolver", field="resolvers", value=resolvers
            )
        for index, resolver in enumerate(items):
            if not isinstance(resolver, Resolver):
                raise ConfigurationError(
                    "expected an object with resolve() and resolve_async()",
                    field=f"resolvers[{index}]",
                    value=resolver,
                )
        self._resolvers = items

    @property
    def resolvers(self) -> tuple[Resolver, ...]:
        """The resolvers, in the order they are asked."""
        return self._resolvers

    def resolve(self, service: str) -> Sequence[Endpoint] | None:
        """The first non-``None`` answer of the resolvers, or ``None``."""
        for resolver in self._resolvers:
            found = resolver.resolve(service)
            if found is not None:
                return found
        return None

    async def resolve_async(self, service: str) -> Sequence[Endpoint] | None:
        """As :meth:`resolve`, asking each resolver's ``resolve_async``."""
        for resolver in self._resolvers:
            found = await resolver.resolve_async(service)
            if found is not None:
                return found
        return None
