"""DNS service discovery: endpoints from A/AAAA or SRV records, as Kubernetes services publish
them, cached for their TTL.

Kept apart from :mod:`meshware.outbound.discovery` (which re-exports :class:`DnsResolver`) so
that dnspython is loaded only by services that resolve names through DNS.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import re
import time
from collections.abc import Callable, Generator, Iterable, Sequence
from typing import Any, cast

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver
from dns.rdtypes.IN.SRV import SRV

from meshware.exceptions import ConfigurationError
from meshware.outbound.discovery import (
    _SERVICE_NAME,
    _check_service_name,
    _Endpoints,
    _normalize,
)
from meshware.outbound.endpoints import Endpoint, _check_port
from meshware.outbound.errors import NoHealthyEndpoint

__all__ = ["DnsResolver"]

logger = logging.getLogger("meshware.outbound.discovery")


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
