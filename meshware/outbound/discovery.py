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
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

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

__all__ = [
    "ChainResolver",
    "DnsResolver",
    "EnvResolver",
    "Resolver",
    "StaticRegistry",
]

if TYPE_CHECKING:
    from meshware.outbound.dns_discovery import DnsResolver

logger = logging.getLogger("meshware.outbound.discovery")


def __getattr__(name: str) -> Any:
    # DNS discovery loads dnspython (2 MB) only for services that use it.
    if name == "DnsResolver":
        from meshware.outbound.dns_discovery import DnsResolver

        return DnsResolver
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    import yaml  # only services with a registry file need it

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
