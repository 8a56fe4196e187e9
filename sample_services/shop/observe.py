"""Reading the mesh from the services' own ``/metrics``: per service, per edge, golden signals.

Shared by the demo's summary and the dashboard's backend. Requests are counted where they
arrive (Istio's ``reporter="destination"`` series), so each is counted once; an edge is a
``source_workload -> destination service`` pair.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from meshware.identity.ca import ServicePaths


@dataclass
class Signals:
    """Golden signals of a set of requests (a service or an edge)."""

    requests: float = 0.0
    errors: float = 0.0  # 5xx
    denied: float = 0.0  # 403
    limited: float = 0.0  # 429
    buckets: dict[float, float] = field(default_factory=dict)  # cumulative, by upper bound

    def add(self, code: str, count: float) -> None:
        self.requests += count
        if code.startswith("5"):
            self.errors += count
        elif code == "403":
            self.denied += count
        elif code == "429":
            self.limited += count

    @property
    def success_rate(self) -> float | None:
        """The share of requests not answered 5xx (None without requests)."""
        return None if not self.requests else 1.0 - self.errors / self.requests

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile of the duration in milliseconds, interpolated in its bucket."""
        if not self.buckets:
            return None
        bounds = sorted(self.buckets)
        total = self.buckets[bounds[-1]]
        if total <= 0:
            return None
        rank, lower, below = q * total, 0.0, 0.0
        for bound in bounds:
            count = self.buckets[bound]
            if count >= rank:
                if math.isinf(bound):
                    return lower
                share = (rank - below) / (count - below) if count > below else 1.0
                return lower + (bound - lower) * share
            lower, below = bound, count
        return lower

    def as_dict(self) -> dict[str, Any]:
        p50, p99 = self.quantile(0.5), self.quantile(0.99)
        return {
            "requests": int(self.requests),
            "errors": int(self.errors),
            "denied": int(self.denied),
            "rate_limited": int(self.limited),
            "success_rate": self.success_rate,
            "p50_ms": None if p50 is None else round(p50, 2),
            "p99_ms": None if p99 is None else round(p99, 2),
        }


@dataclass
class MeshView:
    """What one scrape of every instance shows."""

    services: dict[str, Signals] = field(default_factory=dict)
    edges: dict[tuple[str, str], Signals] = field(default_factory=dict)
    versions: dict[str, dict[str, float]] = field(default_factory=dict)  # service -> version
    retries: dict[str, float] = field(default_factory=dict)  # destination -> retries
    denials: dict[str, float] = field(default_factory=dict)  # policy -> denials
    rate_limited: dict[str, float] = field(default_factory=dict)  # rule -> refusals
    reachable: dict[str, bool] = field(default_factory=dict)  # instance -> scraped

    def add_scrape(self, text: str) -> None:
        """Fold one instance's ``/metrics`` text into the view."""
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self._sample(sample.name, sample.labels, sample.value)

    def _sample(self, name: str, labels: Mapping[str, str], value: float) -> None:
        if name == "istio_requests_total" and labels.get("reporter") == "destination":
            service = _service(labels)
            source = labels.get("source_workload", "unknown")
            code = labels.get("response_code", "")
            self.services.setdefault(service, Signals()).add(code, value)
            self.edges.setdefault((source, service), Signals()).add(code, value)
            version = labels.get("destination_version", "unknown")
            per_version = self.versions.setdefault(service, {})
            per_version[version] = per_version.get(version, 0.0) + value
        elif (
            name == "istio_request_duration_milliseconds_bucket"
            and labels.get("reporter") == "destination"
        ):
            service = _service(labels)
            bound = float(labels["le"])
            for key in (service, (labels.get("source_workload", "unknown"), service)):
                signals = (
                    self.services.setdefault(key, Signals())
                    if isinstance(key, str)
                    else self.edges.setdefault(key, Signals())
                )
                signals.buckets[bound] = signals.buckets.get(bound, 0.0) + value
        elif name == "meshware_outbound_retries_total":
            destination = labels.get("destination_service", "unknown").split(".")[0]
            self.retries[destination] = self.retries.get(destination, 0.0) + value
        elif name == "meshware_authz_decisions_total" and labels.get("decision") == "deny":
            policy = labels.get("policy") or "none"
            if policy == "none":
                policy = "(no ALLOW policy matched)"
            self.denials[policy] = self.denials.get(policy, 0.0) + value
        elif name == "meshware_ratelimit_decisions_total" and labels.get("outcome") in (
            "limited",
            "over_limit",
            "denied",
            "rejected",
        ):
            rule = labels.get("rule", "unknown")
            self.rate_limited[rule] = self.rate_limited.get(rule, 0.0) + value


def _service(labels: Mapping[str, str]) -> str:
    name = labels.get("destination_service_name") or labels.get("destination_workload")
    return name or labels.get("destination_service", "unknown").split(".")[0]


def scrape_client(cert_dir: Path, identity: str) -> httpx.Client:
    """A client presenting ``identity``'s certificate, trusting the mesh's bundle."""
    paths = ServicePaths.under(cert_dir, identity, "default")
    ctx = ssl.create_default_context(cafile=str(paths.bundle))
    ctx.check_hostname = False  # mesh certificates name SPIFFE ids, not hosts
    ctx.load_cert_chain(paths.cert, paths.key)
    return httpx.Client(verify=ctx, timeout=5)


def scrape(client: httpx.Client, instances: Iterable[Mapping[str, Any]]) -> MeshView:
    """Scrape every instance's ``/metrics``; an instance that does not answer is unreachable."""
    view = MeshView()
    for instance in instances:
        try:
            response = client.get(f"https://127.0.0.1:{instance['port']}/metrics")
            response.raise_for_status()
        except httpx.HTTPError:
            view.reachable[instance["name"]] = False
            continue
        view.reachable[instance["name"]] = True
        view.add_scrape(response.text)
    return view
