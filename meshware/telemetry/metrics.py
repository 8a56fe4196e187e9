"""Istio-compatible Prometheus metrics for the requests a service receives.

``MeshMetrics`` owns a prometheus-client ``CollectorRegistry`` holding Istio's standard HTTP
metrics (``istio_requests_total``, ``istio_request_duration_milliseconds``,
``istio_request_bytes``, ``istio_response_bytes``) with Istio's label set, so dashboards and Kiali
that read a sidecar's metrics read meshware's unchanged; or, with ``naming="otel"``, the
OpenTelemetry HTTP semantic-convention names (``http_server_request_duration_seconds``...).
Three meshware counters (authorization, rate-limit and identity outcomes) are present in both.

The per-request path is an ``InboundRecorder`` (one per workload, from
:meth:`MeshMetrics.inbound`): it resolves the labels once per distinct label tuple and afterwards
costs a dict lookup and, in a single process, a few list updates under one lock per request
(see :class:`InboundRecorder`).

Every label value is bounded: no label is ever taken from a raw path, a header or a query; values
that depend on peers (principals, route templates, policy names) are capped per label by
``max_label_values`` and fold into ``"other"`` beyond it.
"""

from __future__ import annotations

import math
import os
import re
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal, cast

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client import values as prometheus_values
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from meshware.exceptions import ConfigurationError

if TYPE_CHECKING:
    from meshware.identity.identity import Identity
    from meshware.inbound.record import RequestRecord

__all__ = [
    "ENVOY_DEFAULT_BUCKETS",
    "ISTIO_BYTES_BUCKETS",
    "ISTIO_DURATION_BUCKETS_MS",
    "ISTIO_LABELS",
    "MULTIPROC_ENV",
    "OTEL_DURATION_BUCKETS_S",
    "InboundRecorder",
    "MeshMetrics",
    "MetricsNaming",
    "OutboundRecorder",
    "WorkloadInfo",
]

MetricsNaming = Literal["istio", "otel"]
"""Which metric names a :class:`MeshMetrics` exposes: Istio's or OpenTelemetry's."""

ENVOY_DEFAULT_BUCKETS: Final[tuple[float, ...]] = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
    300000, 600000, 1800000, 3600000,
)  # fmt: skip
"""Envoy's default histogram bounds, which an Istio sidecar applies to all its histograms."""

ISTIO_DURATION_BUCKETS_MS: Final[tuple[float, ...]] = ENVOY_DEFAULT_BUCKETS
"""Bounds of ``istio_request_duration_milliseconds`` (milliseconds)."""

ISTIO_BYTES_BUCKETS: Final[tuple[float, ...]] = ENVOY_DEFAULT_BUCKETS
"""Bounds of ``istio_request_bytes`` / ``istio_response_bytes``.

A sidecar's bootstrap sets ``histogram_bucket_settings`` only when the pod carries the
``sidecar.istio.io/statsHistogramBuckets`` annotation, so by default the byte histograms use
Envoy's default bounds as well (the ``1, 10, ... 10^7`` series belonged to Mixer, before 1.5).
"""

OTEL_DURATION_BUCKETS_S: Final[tuple[float, ...]] = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10,
)  # fmt: skip
"""The semantic conventions' advised bounds of ``http.server.request.duration`` (seconds)."""

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
"""When this variable is set, :meth:`MeshMetrics.exposition` aggregates all worker processes."""

ISTIO_LABELS: Final[tuple[str, ...]] = (
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_service_name",
    "destination_service_namespace",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
)
"""The labels of every Istio standard HTTP metric, in the order the Istio proxy emits them."""

OTEL_LABELS: Final[tuple[str, ...]] = (
    "http_request_method",
    "http_response_status_code",
    "http_route",
    "url_scheme",
    "network_protocol_name",
    "network_protocol_version",
    "error_type",
)

UNKNOWN: Final = "unknown"
OTHER: Final = "other"
_NO_FLAGS: Final = "-"
_HTTP_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
_NAME_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,253}")
_TRUST_DOMAIN_RE: Final = re.compile(r"[a-z0-9._-]{1,255}")
_RATELIMIT_OUTCOMES: Final = {
    "allowed": "allowed",
    "limited": "limited",
    "shadow-limited": "shadow_limited",
    "shadow_limited": "shadow_limited",
    "backend-error": "backend_error",
    "backend_error": "backend_error",
}
_DECISIONS: Final = frozenset({"allow", "deny"})
_AUTHZ_LABELS: Final = ("decision", "policy", "dry_run")
_RATELIMIT_LABELS: Final = ("rule", "outcome")
_IDENTITY_LABELS: Final = ("reason",)


def _check_name(field: str, value: object, *, optional: bool) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise ConfigurationError(
            "expected 1-253 characters from A-Z a-z 0-9 . _ -" + (" (or None)" if optional else ""),
            field=field,
            value=value,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkloadInfo:
    """What this service is: the source of the ``destination_*`` labels of inbound metrics.

    Attributes:
        service: the service's name (``"orders"``), as callers address it.
        namespace: the namespace the service runs in.
        version: the deployed version (Istio's ``version`` label), or ``None`` for
            ``"unknown"``.
        cluster: the cluster id (Istio's ``CLUSTER_ID``, ``"Kubernetes"`` in a default
            install), or ``None`` for ``"unknown"``.
        trust_domain: the SPIFFE trust domain, also used as the DNS suffix of
            ``destination_service`` (``orders.default.svc.cluster.local``).
        workload: the workload name (a Kubernetes deployment such as ``"orders-v1"``); defaults
            to ``service``.
        service_account: the service account the service's certificate names; defaults to
            ``service``.

    Raises:
        ConfigurationError: a field is empty or holds characters a label value or SPIFFE id
            cannot carry.
    """

    service: str
    namespace: str = "default"
    version: str | None = None
    cluster: str | None = None
    trust_domain: str = "cluster.local"
    workload: str | None = None
    service_account: str | None = None

    def __post_init__(self) -> None:
        _check_name("workload.service", self.service, optional=False)
        _check_name("workload.namespace", self.namespace, optional=False)
        _check_name("workload.version", self.version, optional=True)
        _check_name("workload.cluster", self.cluster, optional=True)
        _check_name("workload.workload", self.workload, optional=True)
        _check_name("workload.service_account", self.service_account, optional=True)
        if not isinstance(self.trust_domain, str) or not _TRUST_DOMAIN_RE.fullmatch(
            self.trust_domain
        ):
            raise ConfigurationError(
                "expected a trust domain of 1-255 characters from a-z 0-9 . _ -",
                field="workload.trust_domain",
                value=self.trust_domain,
            )

    @property
    def host(self) -> str:
        """The service's fully qualified host, ``<service>.<namespace>.svc.<trust_domain>``."""
        return f"{self.service}.{self.namespace}.svc.{self.trust_domain}"

    @property
    def spiffe_id(self) -> str:
        """The SPIFFE id of the service's own certificate (Istio's ``destination_principal``)."""
        account = self.service_account or self.service
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{account}"

    def destination_labels(self) -> tuple[str, ...]:
        """The ``destination_*`` label values, in :data:`ISTIO_LABELS` order."""
        version = self.version or UNKNOWN
        return (
            self.workload or self.service,  # destination_workload
            self.namespace,  # destination_workload_namespace
            self.spiffe_id,  # destination_principal
            self.service,  # destination_app
            version,  # destination_version
            self.host,  # destination_service
            self.service,  # destination_canonical_service
            self.version or "latest",  # destination_canonical_revision
            self.service,  # destination_service_name
            self.namespace,  # destination_service_namespace
            self.cluster or UNKNOWN,  # destination_cluster
        )

    def source_labels(self) -> tuple[str, ...]:
        """The ``source_*`` label values of the calls this service makes, in
        :data:`ISTIO_LABELS` order (``reporter="source"`` metrics)."""
        return (
            self.workload or self.service,  # source_workload
            self.service,  # source_canonical_service
            self.version or "latest",  # source_canonical_revision
            self.namespace,  # source_workload_namespace
            self.spiffe_id,  # source_principal
            self.service,  # source_app
            self.version or UNKNOWN,  # source_version
            self.cluster or UNKNOWN,  # source_cluster
        )

    def service_of(self, host: str) -> tuple[str, str, str]:
        """How a call from this service names the mesh service at ``host``:
        ``(name, namespace, fully qualified host)``.

        A short name is in this service's namespace, as Kubernetes resolves it:
        ``"payments"`` gives ``("payments", "default", "payments.default.svc.cluster.local")``;
        ``"payments.shop"`` and ``"payments.shop.svc.cluster.local"`` name namespace
        ``shop``. Any other dotted name (``"api.example.com"``) is its own service, in this
        service's namespace, with the name as its host.
        """
        name = host.lower().rstrip(".")
        labels = name.split(".")
        if len(labels) == 1:
            return name, self.namespace, f"{name}.{self.namespace}.svc.{self.trust_domain}"
        if len(labels) == 2 or labels[2] == "svc":
            return labels[0], labels[1], f"{labels[0]}.{labels[1]}.svc.{self.trust_domain}"
        return name, self.namespace, name


class _Bounded:
    """Passes through the first ``limit`` distinct values of a label, then answers ``other``."""

    __slots__ = ("_limit", "_seen")

    def __init__(self, limit: int) -> None:
        self._seen: set[str] = set()
        self._limit = limit

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= self._limit:
            return OTHER
        self._seen.add(value)
        return value


class _WithoutCreated(Collector):
    """Collects meshware's metrics without the ``_created`` series, as a sidecar exposes them.

    ``extra`` gives the samples counted outside prometheus-client for a metric (see
    :class:`InboundRecorder`); they join that metric's family.
    """

    def __init__(
        self,
        metrics: Sequence[Counter | Histogram],
        extra: Callable[[Counter | Histogram], list[Sample]] | None = None,
    ) -> None:
        self._metrics = tuple(metrics)
        self._extra = extra

    def collect(self) -> Iterator[Metric]:
        for metric in self._metrics:
            for family in metric.collect():
                family.samples = [s for s in family.samples if not s.name.endswith("_created")]
                if self._extra is not None:
                    family.samples.extend(self._extra(metric))
                yield family

    def describe(self) -> Iterator[Metric]:
        for metric in self._metrics:
            yield from metric.describe()


def _check_buckets(field: str, value: object) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise ConfigurationError(
            "expected a non-empty sequence of increasing finite numbers", field=field, value=value
        )
    bounds: list[float] = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item):
            raise ConfigurationError(
                f"expected finite numbers, got {item!r}", field=field, value=value
            )
        if bounds and item <= bounds[-1]:
            raise ConfigurationError(
                "expected strictly increasing bounds", field=field, value=value
            )
        bounds.append(float(item))
    return tuple(bounds)


class _Count:
    """One series of a counter counted here rather than by prometheus-client (see
    :class:`InboundRecorder`): its ``inc()`` is one call and one lock."""

    __slots__ = ("labels", "lock", "value")

    def __init__(self, labels: dict[str, str], lock: threading.Lock) -> None:
        self.labels = labels
        self.lock = lock
        self.value = 0

    def inc(self) -> None:
        with self.lock:
            self.value += 1


def _multiprocess() -> bool:
    """Whether prometheus-client keeps values in files shared by processes (then meshware
    counts through it, so that every process's counts reach the scrape)."""
    return bool(os.environ.get(MULTIPROC_ENV)) or bool(
        getattr(prometheus_values.ValueClass, "_multiprocess", False)
    )


class MeshMetrics:
    """The Prometheus metrics of one service, in a registry of their own.

    Create one per process and share it between the inbound middlewares of that process
    (ASGI and WSGI alike); two ``MeshMetrics`` on the same registry would collide.

    Args:
        registry: the registry to register into. ``None`` (the default) creates a fresh
            ``CollectorRegistry``, so several apps or tests in one process never collide.
        use_global_registry: register into prometheus-client's global ``REGISTRY`` instead,
            next to the application's own metrics (ignored when ``registry`` is given).
        naming: ``"istio"`` for Istio's standard metrics and labels, ``"otel"`` for the
            OpenTelemetry HTTP semantic-convention names
            (``http_server_request_duration_seconds``, ``http_server_request_body_size_bytes``,
            ``http_server_response_body_size_bytes``).
        duration_buckets: histogram bounds of the request duration, in the unit of the naming
            (milliseconds for Istio, seconds for OpenTelemetry). Defaults to
            :data:`ISTIO_DURATION_BUCKETS_MS` / :data:`OTEL_DURATION_BUCKETS_S`.
        byte_buckets: histogram bounds of request and response body sizes, in bytes. Defaults
            to :data:`ISTIO_BYTES_BUCKETS`.
        max_label_values: the most distinct values a peer-dependent label (source principal,
            route template, policy or rule name, failure reason) may take; further values are
            recorded as ``"other"``.

    Raises:
        ConfigurationError: an argument is invalid, or the registry already holds metrics of
            the same names.
    """

    __slots__ = (
        "_authz",
        "_authz_children",
        "_bounded_policy",
        "_bounded_reason",
        "_bounded_rule",
        "_byte_buckets",
        "_counts",
        "_counts_lock",
        "_duration",
        "_duration_buckets",
        "_identity_children",
        "_identity_failures",
        "_max_label_values",
        "_naming",
        "_outbound",
        "_outbound_recorders",
        "_ratelimit",
        "_ratelimit_children",
        "_recorders",
        "_registry",
        "_reloads",
        "_request_bytes",
        "_requests",
        "_response_bytes",
    )

    def __init__(
        self,
        *,
        registry: CollectorRegistry | None = None,
        use_global_registry: bool = False,
        naming: MetricsNaming = "istio",
        duration_buckets: Sequence[float] | None = None,
        byte_buckets: Sequence[float] | None = None,
        max_label_values: int = 1000,
    ) -> None:
        if naming not in ("istio", "otel"):
            raise ConfigurationError('expected "istio" or "otel"', field="naming", value=naming)
        if registry is not None and not isinstance(registry, CollectorRegistry):
            raise ConfigurationError(
                "expected a prometheus_client.CollectorRegistry or None",
                field="registry",
                value=registry,
            )
        if (
            isinstance(max_label_values, bool)
            or not isinstance(max_label_values, int)
            or max_label_values < 1
        ):
            raise ConfigurationError(
                "expected a positive integer", field="max_label_values", value=max_label_values
            )
        if duration_buckets is None:
            duration_buckets = (
                ISTIO_DURATION_BUCKETS_MS if naming == "istio" else OTEL_DURATION_BUCKETS_S
            )
        self._duration_buckets = _check_buckets("duration_buckets", duration_buckets)
        self._byte_buckets = _check_buckets(
            "byte_buckets", ISTIO_BYTES_BUCKETS if byte_buckets is None else byte_buckets
        )
        self._naming: MetricsNaming = naming
        self._max_label_values = max_label_values
        if registry is None:
            registry = REGISTRY if use_global_registry else CollectorRegistry(auto_describe=True)
        self._registry = registry
        self._recorders: dict[WorkloadInfo, InboundRecorder] = {}
        self._outbound: _OutboundMetrics | None = None
        self._outbound_recorders: dict[WorkloadInfo, OutboundRecorder] = {}
        self._authz_children: dict[tuple[str, str | None, bool], Any] = {}
        self._ratelimit_children: dict[tuple[str, str], Any] = {}
        self._identity_children: dict[str, Any] = {}
        # The outcome counters' series, when counted here: by counter, by label values.
        self._counts: dict[Counter, dict[tuple[str, ...], _Count]] | None = (
            None if _multiprocess() else {}
        )
        self._counts_lock = threading.Lock()
        self._reloads: Counter | None = None
        self._bounded_policy = _Bounded(max_label_values)
        self._bounded_rule = _Bounded(max_label_values)
        self._bounded_reason = _Bounded(max_label_values)
        try:
            self._create_metrics()
        except ValueError as exc:  # prometheus-client's "Duplicated timeseries"
            raise ConfigurationError(
                f"the registry already holds these metrics ({exc}); create one MeshMetrics "
                "per process and share it",
                field="registry",
                value=registry,
            ) from exc

    def _create_metrics(self) -> None:
        if self._naming == "istio":
            self._requests: Counter | None = Counter(
                "istio_requests",
                "Requests handled, as Istio's sidecar counts them.",
                ISTIO_LABELS,
                registry=None,
            )
            self._duration = Histogram(
                "istio_request_duration_milliseconds",
                "Request duration in milliseconds.",
                ISTIO_LABELS,
                buckets=self._duration_buckets,
                registry=None,
            )
            self._request_bytes = Histogram(
                "istio_request_bytes",
                "HTTP request body sizes in bytes.",
                ISTIO_LABELS,
                buckets=self._byte_buckets,
                registry=None,
            )
            self._response_bytes = Histogram(
                "istio_response_bytes",
                "HTTP response body sizes in bytes.",
                ISTIO_LABELS,
                buckets=self._byte_buckets,
                registry=None,
            )
        else:
            self._requests = None
            self._duration = Histogram(
                "http_server_request_duration",
                "Duration of HTTP server requests.",
                OTEL_LABELS,
                unit="seconds",
                buckets=self._duration_buckets,
                registry=None,
            )
            self._request_bytes = Histogram(
                "http_server_request_body_size",
                "Size of HTTP server request bodies.",
                OTEL_LABELS,
                unit="bytes",
                buckets=self._byte_buckets,
                registry=None,
            )
            self._response_bytes = Histogram(
                "http_server_response_body_size",
                "Size of HTTP server response bodies.",
                OTEL_LABELS,
                unit="bytes",
                buckets=self._byte_buckets,
                registry=None,
            )
        self._authz = Counter(
            "meshware_authz_decisions",
            "Authorization decisions by outcome and deciding policy.",
            _AUTHZ_LABELS,
            registry=None,
        )
        self._ratelimit = Counter(
            "meshware_ratelimit_decisions",
            "Rate-limit verdicts by rule and outcome.",
            _RATELIMIT_LABELS,
            registry=None,
        )
        self._identity_failures = Counter(
            "meshware_identity_failures",
            "Requests whose peer identity was rejected or missing, by reason.",
            _IDENTITY_LABELS,
            registry=None,
        )
        owned: list[Counter | Histogram] = [
            self._duration,
            self._request_bytes,
            self._response_bytes,
            self._authz,
            self._ratelimit,
            self._identity_failures,
        ]
        if self._requests is not None:
            owned.insert(0, self._requests)
        self._registry.register(_WithoutCreated(owned, self._tallied_samples))

    def _child(self, counter: Counter, names: tuple[str, ...], *values: str) -> Any:
        """The series of ``counter`` with label ``values``: a prometheus-client child, or the
        :class:`_Count` standing for it."""
        counts = self._counts
        if counts is None:
            return counter.labels(*values)
        with self._counts_lock:
            series = counts.setdefault(counter, {})
            child = series.get(values)
            if child is None:
                child = series[values] = _Count(
                    dict(zip(names, values, strict=True)), self._counts_lock
                )
        return child

    def _tallied_samples(self, metric: Counter | Histogram) -> list[Sample]:
        samples: list[Sample] = []
        counts = self._counts
        if counts is not None and metric in counts:
            name = f"{metric._name}_total"
            with self._counts_lock:
                series = [(dict(c.labels), float(c.value)) for c in counts[metric].values()]
            return [Sample(name, labels, value, None, None) for labels, value in series]
        for recorder in list(self._recorders.values()):
            samples.extend(recorder._samples(metric))
        return samples

    @property
    def registry(self) -> CollectorRegistry:
        """The registry holding the metrics."""
        return self._registry

    @property
    def naming(self) -> MetricsNaming:
        """``"istio"`` or ``"otel"``."""
        return self._naming

    def inbound(self, workload: WorkloadInfo) -> InboundRecorder:
        """Return the recorder of the requests ``workload`` receives (one per workload).

        Raises:
            ConfigurationError: ``workload`` is not a :class:`WorkloadInfo`.
        """
        recorder = self._recorders.get(workload)
        if recorder is None:
            if not isinstance(workload, WorkloadInfo):
                raise ConfigurationError(
                    "expected a WorkloadInfo", field="workload", value=workload
                )
            recorder = self._recorders[workload] = InboundRecorder(self, workload)
        return recorder

    def outbound(self, workload: WorkloadInfo) -> OutboundRecorder:
        """Return the recorder of the calls ``workload`` makes (one per workload).

        The first call registers the outbound metrics: under ``"istio"`` naming the same
        ``istio_*`` metrics with ``reporter="source"``, under ``"otel"`` naming
        ``http_client_request_duration_seconds`` and the client body-size histograms; under
        both, the ``meshware_outbound_*`` counters.

        Raises:
            ConfigurationError: ``workload`` is not a :class:`WorkloadInfo`.
        """
        recorder = self._outbound_recorders.get(workload)
        if recorder is None:
            if not isinstance(workload, WorkloadInfo):
                raise ConfigurationError(
                    "expected a WorkloadInfo", field="workload", value=workload
                )
            if self._outbound is None:
                self._outbound = _OutboundMetrics(self)
            recorder = OutboundRecorder(self, workload)
            self._outbound_recorders[workload] = recorder
        return recorder

    def record_authz(self, decision: str, policy: str | None, *, dry_run: bool = False) -> None:
        """Count one authorization decision.

        Args:
            decision: ``"allow"`` or ``"deny"`` (anything else is counted as ``"unknown"``).
            policy: the name of the deciding policy; ``None`` is counted as ``"none"``.
            dry_run: whether the decision is what a dry-run policy would have done.
        """
        key = (decision, policy, dry_run)
        child = self._authz_children.get(key)
        if child is None:
            child = self._child(
                self._authz,
                _AUTHZ_LABELS,
                decision if decision in _DECISIONS else UNKNOWN,
                "none" if policy is None else self._bounded_policy(policy),
                "true" if dry_run else "false",
            )
            self._authz_children[key] = child
        child.inc()

    def record_ratelimit(self, rule: str | None, outcome: str) -> None:
        """Count one rate-limit verdict.

        Args:
            rule: the name of the rule that decided; ``None`` is counted as ``"unknown"``.
            outcome: ``"allowed"``, ``"limited"``, ``"shadow-limited"`` or ``"backend-error"``
                (the underscore spellings are accepted too); other values are not counted.
        """
        label = _RATELIMIT_OUTCOMES.get(outcome)
        if label is None:
            return
        key = (UNKNOWN if rule is None else rule, label)
        child = self._ratelimit_children.get(key)
        if child is None:
            child = self._child(
                self._ratelimit, _RATELIMIT_LABELS, self._bounded_rule(key[0]), label
            )
            self._ratelimit_children[key] = child
        child.inc()

    def record_config_reload(self, outcome: str) -> None:
        """Count one reload of the mesh configuration files
        (``meshware_config_reloads_total{outcome}``, registered on first use).

        Args:
            outcome: ``"ok"`` (the new configuration is in force) or ``"error"`` (it was
                refused and the last good one stays); other values are counted as
                ``"unknown"``.
        """
        counter = self._reloads
        if counter is None:
            counter = Counter(
                "meshware_config_reloads",
                "Reloads of the mesh configuration files, by outcome.",
                ("outcome",),
                registry=None,
            )
            self._registry.register(_WithoutCreated([counter]))
            self._reloads = counter
        counter.labels(outcome if outcome in ("ok", "error") else UNKNOWN).inc()

    def record_identity_failure(self, reason: str) -> None:
        """Count one request whose peer identity was rejected or missing, by ``reason`` code."""
        child = self._identity_children.get(reason)
        if child is None:
            child = self._child(
                self._identity_failures, _IDENTITY_LABELS, self._bounded_reason(reason)
            )
            self._identity_children[reason] = child
        child.inc()

    def record_outcomes(self, record: RequestRecord) -> None:
        """Count the authorization, rate-limit and identity outcomes inner layers noted."""
        if record.identity_error is not None:
            self.record_identity_failure(record.identity_error)
        decision = record.authz_decision
        if decision is not None:
            # record_authz() inlined for a known label tuple: this runs on every request.
            child = self._authz_children.get((decision, record.authz_policy, False))
            if child is None:
                self.record_authz(decision, record.authz_policy)
            else:
                child.inc()
        if record.authz_dry_run is not None:
            self.record_authz(
                record.authz_dry_run,
                record.authz_dry_run_policy or record.authz_policy,
                dry_run=True,
            )
        outcome = record.ratelimit
        if outcome is not None:
            rule = record.ratelimit_rule
            label = _RATELIMIT_OUTCOMES.get(outcome)
            child = (
                None
                if label is None
                else self._ratelimit_children.get((UNKNOWN if rule is None else rule, label))
            )
            if child is None:
                self.record_ratelimit(rule, outcome)
            else:
                child.inc()

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """Render the metrics for a scrape: ``(body, content_type)``.

        The format follows the scrape's ``Accept`` header (Prometheus text or OpenMetrics).
        When ``PROMETHEUS_MULTIPROC_DIR`` is set, the samples of every worker process are
        collected with ``prometheus_client.multiprocess.MultiProcessCollector`` instead of
        this process's registry.
        """
        encoder, content_type = choose_encoder(accept or "")
        if os.environ.get(MULTIPROC_ENV):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return encoder(registry), content_type
        return encoder(self._registry), content_type


# Where InboundRecorder keeps what it counts for one label tuple (a list, see _istio_children).
_TALLY_COUNT: Final = 0
_TALLY_DURATION: Final = 1
_TALLY_REQUEST: Final = 2
_TALLY_RESPONSE: Final = 3
_TALLY_VALUES: Final = 4
_TALLY_BUCKETS: Final = 5


class InboundRecorder:
    """Records the requests one workload receives (``reporter="destination"``).

    Obtain it from :meth:`MeshMetrics.inbound`; it is safe to share between threads.

    Under Istio naming, in a single process, a request's four observations are counted here
    (one lock, a bucket index found by bisection) and handed to prometheus-client as samples
    when the registry is collected, with the same names, labels and values its
    ``Counter`` and ``Histogram`` would have; with ``PROMETHEUS_MULTIPROC_DIR`` set the
    prometheus-client metrics are used directly, since their values are shared through files.
    """

    __slots__ = (
        "_bounded_principal",
        "_bounded_route",
        "_bounded_version",
        "_byte_bounds",
        "_children",
        "_destination",
        "_duration",
        "_duration_bounds",
        "_istio",
        "_lock",
        "_metrics",
        "_request_bytes",
        "_requests",
        "_response_bytes",
        "_sources",
        "_tallies",
        "_tally",
        "workload",
    )

    def __init__(self, metrics: MeshMetrics, workload: WorkloadInfo) -> None:
        self._metrics = metrics
        self.workload = workload
        """The workload whose requests this recorder counts."""
        self._istio = metrics.naming == "istio"
        self._requests = metrics._requests
        self._duration = metrics._duration
        self._request_bytes = metrics._request_bytes
        self._response_bytes = metrics._response_bytes
        self._destination = workload.destination_labels()
        self._children: dict[tuple[object, ...], Any] = {}
        self._sources: dict[str | None, tuple[str, ...]] = {}
        limit = metrics._max_label_values
        self._bounded_principal = _Bounded(limit)
        self._bounded_route = _Bounded(limit)
        self._bounded_version = _Bounded(8)
        # Counted here unless prometheus-client keeps its values in files shared by processes.
        self._tally = self._istio and not _multiprocess()
        self._lock = threading.Lock()
        self._tallies: dict[tuple[object, ...], list[Any]] = {}
        self._duration_bounds = (*metrics._duration_buckets, math.inf)
        self._byte_bounds = (*metrics._byte_buckets, math.inf)

    def observe(
        self,
        *,
        identity: Identity | None,
        method: str,
        route: str | None,
        status: int,
        duration_s: float,
        request_bytes: int,
        response_bytes: int,
        scheme: str = "http",
        http_version: str = "1.1",
        grpc: bool = False,
        grpc_status: str | None = None,
        response_flags: str = _NO_FLAGS,
        error_type: str | None = None,
    ) -> None:
        """Record one finished request.

        Args:
            identity: the caller's verified identity, or ``None``; gives the ``source_*``
                labels and ``connection_security_policy`` (``"mutual_tls"`` / ``"none"``).
            method: the request method (``otel`` naming only; unknown methods are ``_OTHER``).
            route: the route template, or ``None`` (``otel`` naming only; ``"unknown"``).
            status: the response status code; ``0`` when no response was sent.
            duration_s: the request's duration in seconds.
            request_bytes: the request body's size in bytes.
            response_bytes: the response body's size in bytes.
            scheme: ``"http"`` or ``"https"`` (``otel`` naming only).
            http_version: ``"1.1"``, ``"2"``... (``otel`` naming only).
            grpc: whether the request is gRPC (``request_protocol="grpc"``).
            grpc_status: the ``grpc-status`` of a gRPC response.
            response_flags: Envoy-style response flags, ``"-"`` when none.
            error_type: the semantic conventions' ``error.type`` (``otel`` naming only);
                defaults to the status code for 5xx responses.
        """
        self.record(
            identity,
            method,
            route,
            status,
            duration_s,
            request_bytes,
            response_bytes,
            scheme,
            http_version,
            grpc,
            grpc_status,
            response_flags,
            error_type,
        )

    def record(
        self,
        identity: Identity | None,
        method: str,
        route: str | None,
        status: int,
        duration_s: float,
        request_bytes: int,
        response_bytes: int,
        scheme: str,
        http_version: str,
        grpc: bool,
        grpc_status: str | None,
        response_flags: str,
        error_type: str | None,
    ) -> None:
        """:meth:`observe` with positional arguments, for the shells' per-request path."""
        if self._istio:
            principal = None if identity is None else identity.principal
            key: tuple[object, ...] = (principal, status, grpc, grpc_status, response_flags)
            children = self._children.get(key)
            if children is None:
                children = self._istio_children(key, identity)
            duration = duration_s * 1000.0
            if self._tally:
                # What Counter.inc() and Histogram.observe() do, on the list _istio_children
                # laid out.
                bounds = self._duration_bounds
                byte_bounds = self._byte_bounds
                offset = _TALLY_BUCKETS + len(bounds)
                with self._lock:
                    children[_TALLY_COUNT] += 1
                    children[_TALLY_DURATION] += duration
                    children[_TALLY_REQUEST] += request_bytes
                    children[_TALLY_RESPONSE] += response_bytes
                    # A NaN falls in no bucket (every "<=" is false), as in Histogram.
                    if duration == duration:
                        children[_TALLY_BUCKETS + bisect_left(bounds, duration)] += 1
                    if request_bytes == request_bytes:
                        children[offset + bisect_left(byte_bounds, request_bytes)] += 1
                    if response_bytes == response_bytes:
                        children[
                            offset + len(byte_bounds) + bisect_left(byte_bounds, response_bytes)
                        ] += 1
                return
            children[0]()
            children[1](duration)
            children[2](request_bytes)
            children[3](response_bytes)
        else:
            key = (method, route, status, scheme, http_version, error_type)
            children = self._children.get(key)
            if children is None:
                children = self._otel_children(key)
            children[0].observe(duration_s)
            children[1].observe(request_bytes)
            children[2].observe(response_bytes)

    def _source_labels(self, identity: Identity | None) -> tuple[str, ...]:
        principal = None if identity is None else identity.principal
        labels = self._sources.get(principal)
        if labels is not None:
            return labels
        if identity is None:
            labels = (UNKNOWN, UNKNOWN, "latest", UNKNOWN, UNKNOWN, UNKNOWN, UNKNOWN, UNKNOWN)
        elif self._bounded_principal(identity.principal) == OTHER:
            labels = (OTHER, OTHER, "latest", OTHER, OTHER, OTHER, UNKNOWN, UNKNOWN)
        else:
            # A certificate names a namespace and a service account, nothing more: the
            # account stands for the workload, app and canonical service, as in meshware
            # every service runs under its own account.
            account = identity.service_account or UNKNOWN
            labels = (
                account,  # source_workload
                account,  # source_canonical_service
                "latest",  # source_canonical_revision
                identity.namespace or UNKNOWN,  # source_workload_namespace
                str(identity.spiffe_id),  # source_principal (the SAN, as Envoy reports it)
                account,  # source_app
                UNKNOWN,  # source_version
                UNKNOWN,  # source_cluster
            )
        self._sources[principal] = labels
        return labels

    def _istio_children(self, key: tuple[object, ...], identity: Identity | None) -> Any:
        _, status, grpc, grpc_status, flags = key
        values = (
            "destination",
            *self._source_labels(identity),
            *self._destination,
            "grpc" if grpc else "http",
            str(status),
            (grpc_status or "") if grpc else "",
            flags,
            "none" if identity is None else "mutual_tls",
        )
        if self._tally:
            # [count, duration sum, request bytes sum, response bytes sum, label values,
            #  duration buckets..., request bytes buckets..., response bytes buckets...]
            # Keys whose labels fold into the same values ("other") share one tally, as
            # they would share one prometheus-client child.
            with self._lock:
                tally = self._tallies.get(values)
                if tally is None:
                    tally = [0, 0.0, 0.0, 0.0, values]
                    tally += [0] * (len(self._duration_bounds) + 2 * len(self._byte_bounds))
                    self._tallies[values] = tally
                self._children[key] = tally
            return tally
        requests = cast(Counter, self._requests)  # present under istio naming
        # The bound methods record() calls, looked up once.
        children = (
            requests.labels(*values).inc,
            self._duration.labels(*values).observe,
            self._request_bytes.labels(*values).observe,
            self._response_bytes.labels(*values).observe,
        )
        self._children[key] = children
        return children

    def _samples(self, metric: Counter | Histogram) -> list[Sample]:
        """The samples of ``metric`` counted here: those its prometheus-client children would
        give (without ``_created``), in the order they would give them."""
        if not self._tally:
            return []
        with self._lock:
            tallies = [list(tally) for tally in self._tallies.values()]
        if not tallies:
            return []
        names = ISTIO_LABELS
        samples: list[Sample] = []
        if metric is self._requests:
            for tally in tallies:
                labels = dict(zip(names, tally[_TALLY_VALUES], strict=True))
                samples.append(Sample(f"{metric._name}_total", labels, float(tally[0]), None, None))
            return samples
        if metric is self._duration:
            bounds, start, total = self._duration_bounds, _TALLY_BUCKETS, _TALLY_DURATION
        elif metric is self._request_bytes:
            bounds = self._byte_bounds
            start, total = _TALLY_BUCKETS + len(self._duration_bounds), _TALLY_REQUEST
        elif metric is self._response_bytes:
            bounds = self._byte_bounds
            start = _TALLY_BUCKETS + len(self._duration_bounds) + len(self._byte_bounds)
            total = _TALLY_RESPONSE
        else:
            return []
        name = metric._name
        les = [floatToGoString(bound) for bound in bounds]  # type: ignore[no-untyped-call]
        for tally in tallies:
            labels = dict(zip(names, tally[_TALLY_VALUES], strict=True))
            acc = 0.0
            for index, le in enumerate(les):
                acc += tally[start + index]
                samples.append(Sample(f"{name}_bucket", {**labels, "le": le}, acc, None, None))
            samples.append(Sample(f"{name}_count", dict(labels), acc, None, None))
            if bounds[0] >= 0:
                samples.append(Sample(f"{name}_sum", dict(labels), tally[total], None, None))
        return samples

    def _otel_children(self, key: tuple[object, ...]) -> tuple[Any, ...]:
        method, route, status, scheme, http_version, error_type = key
        if error_type is None and cast(int, status) >= 500:
            error_type = str(status)
        values = (
            method if method in _HTTP_METHODS else "_OTHER",
            str(status),
            UNKNOWN if route is None else self._bounded_route(str(route)),
            "https" if scheme in ("https", "wss") else "http",
            "http",
            self._bounded_version(str(http_version)),
            "" if error_type is None else str(error_type),
        )
        children = (
            self._duration.labels(*values),
            self._request_bytes.labels(*values),
            self._response_bytes.labels(*values),
        )
        self._children[key] = children
        return children


OTEL_CLIENT_LABELS: Final[tuple[str, ...]] = (
    "http_request_method",
    "http_response_status_code",
    "server_address",
    "url_scheme",
    "network_protocol_name",
    "network_protocol_version",
    "error_type",
)


class _OutboundMetrics:
    """The outbound-only metrics of a :class:`MeshMetrics`, registered on first use."""

    __slots__ = (
        "breaker_transitions",
        "budget_exhausted",
        "client_duration",
        "client_request_bytes",
        "client_response_bytes",
        "ejections",
        "retries",
    )

    def __init__(self, metrics: MeshMetrics) -> None:
        owned: list[Counter | Histogram] = []
        self.client_duration: Histogram | None = None
        self.client_request_bytes: Histogram | None = None
        self.client_response_bytes: Histogram | None = None
        if metrics.naming == "otel":
            self.client_duration = Histogram(
                "http_client_request_duration",
                "Duration of HTTP client requests.",
                OTEL_CLIENT_LABELS,
                unit="seconds",
                buckets=metrics._duration_buckets,
                registry=None,
            )
            self.client_request_bytes = Histogram(
                "http_client_request_body_size",
                "Size of HTTP client request bodies.",
                OTEL_CLIENT_LABELS,
                unit="bytes",
                buckets=metrics._byte_buckets,
                registry=None,
            )
            self.client_response_bytes = Histogram(
                "http_client_response_body_size",
                "Size of HTTP client response bodies.",
                OTEL_CLIENT_LABELS,
                unit="bytes",
                buckets=metrics._byte_buckets,
                registry=None,
            )
            owned += [self.client_duration, self.client_request_bytes, self.client_response_bytes]
        self.retries = Counter(
            "meshware_outbound_retries",
            "Retries made by outbound calls, by destination and retryOn condition.",
            ("destination_service", "condition"),
            registry=None,
        )
        self.budget_exhausted = Counter(
            "meshware_outbound_retry_budget_exhausted",
            "Retries wanted but refused because the destination's retry budget was empty.",
            ("destination_service",),
            registry=None,
        )
        self.ejections = Counter(
            "meshware_outbound_outlier_ejections",
            "Endpoints ejected by outlier detection, by destination and reason.",
            ("destination_service", "reason"),
            registry=None,
        )
        self.breaker_transitions = Counter(
            "meshware_outbound_breaker_transitions",
            "Circuit-breaker state changes, by destination.",
            ("destination_service", "from_state", "to_state"),
            registry=None,
        )
        owned += [self.retries, self.budget_exhausted, self.ejections, self.breaker_transitions]
        try:
            metrics._registry.register(_WithoutCreated(owned))
        except ValueError as exc:  # prometheus-client's "Duplicated timeseries"
            raise ConfigurationError(
                f"the registry already holds the outbound metrics ({exc}); create one "
                "MeshMetrics per process and share it",
                field="registry",
            ) from exc


class OutboundRecorder:
    """Records the calls one workload makes (``reporter="source"``) and the outbound
    resilience counters.

    Obtain it from :meth:`MeshMetrics.outbound`; it is safe to share between threads. The
    ``source_*`` labels describe this workload; the ``destination_*`` labels the service
    called, named as :meth:`WorkloadInfo.service_of` reads the destination. A call to a host
    that is not a mesh service is reported as Istio reports passthrough traffic:
    ``destination_service_name="PassthroughCluster"`` and ``destination_service`` the host.
    Every label value is bounded by the metrics' ``max_label_values``.
    """

    __slots__ = (
        "_bounded_host",
        "_bounded_principal",
        "_bounded_service",
        "_bounded_version",
        "_children",
        "_counter_children",
        "_destinations",
        "_duration",
        "_istio",
        "_metrics",
        "_outbound",
        "_request_bytes",
        "_requests",
        "_response_bytes",
        "_source",
        "workload",
    )

    def __init__(self, metrics: MeshMetrics, workload: WorkloadInfo) -> None:
        self._metrics = metrics
        self.workload = workload
        """The workload whose calls this recorder counts."""
        outbound = metrics._outbound
        if outbound is None:  # MeshMetrics.outbound() creates it first
            outbound = metrics._outbound = _OutboundMetrics(metrics)
        self._outbound = outbound
        self._istio = metrics.naming == "istio"
        self._requests = metrics._requests
        self._duration = metrics._duration
        self._request_bytes = metrics._request_bytes
        self._response_bytes = metrics._response_bytes
        self._source = workload.source_labels()
        self._children: dict[tuple[object, ...], tuple[Any, ...]] = {}
        self._counter_children: dict[tuple[str, ...], Any] = {}
        self._destinations: dict[str | None, tuple[str, str, str]] = {}
        limit = metrics._max_label_values
        self._bounded_service = _Bounded(limit)
        self._bounded_host = _Bounded(limit)
        self._bounded_principal = _Bounded(limit)
        self._bounded_version = _Bounded(limit)

    def observe(
        self,
        *,
        destination: str | None,
        host: str,
        method: str,
        status: int,
        duration_s: float,
        request_bytes: int,
        response_bytes: int,
        response_flags: str = _NO_FLAGS,
        destination_version: str | None = None,
        destination_principal: str | None = None,
        scheme: str = "http",
        http_version: str = "1.1",
        error_type: str | None = None,
    ) -> None:
        """Record one finished outbound call.

        Args:
            destination: the mesh service called (``CallPlan.destination``), or ``None`` for
                a host that is not a mesh service (passthrough).
            host: the request's host, used for passthrough calls.
            method: the request method (``otel`` naming only).
            status: the response status; for a call that got no response, the status a
                sidecar would have answered with (``503``, ``504``), or ``0``.
            duration_s: the call's duration in seconds, to the end of the response body.
            request_bytes: the request body's size in bytes.
            response_bytes: the response body's size in bytes.
            response_flags: Envoy-style response flags (``"UO"``, ``"UH"``, ``"UF,URX"``),
                ``"-"`` when none.
            destination_version: the ``version`` label of the endpoint called, if known.
            destination_principal: the verified SPIFFE id of the server, if known.
            scheme: ``"http"`` or ``"https"`` (``otel`` naming only).
            http_version: ``"1.1"``, ``"2"``... (``otel`` naming only).
            error_type: the semantic conventions' ``error.type`` (``otel`` naming only);
                defaults to the status code for 5xx responses.
        """
        if self._istio:
            key: tuple[object, ...] = (
                destination,
                host if destination is None else None,
                destination_version,
                destination_principal,
                status,
                response_flags,
            )
            children = self._children.get(key)
            if children is None:
                children = self._istio_children(key)
            children[0].inc()
            children[1].observe(duration_s * 1000.0)
            children[2].observe(request_bytes)
            children[3].observe(response_bytes)
            return
        key = (method, status, destination, host, scheme, http_version, error_type)
        children = self._children.get(key)
        if children is None:
            children = self._otel_children(key)
        children[0].observe(duration_s)
        children[1].observe(request_bytes)
        children[2].observe(response_bytes)

    def _service(self, destination: str) -> tuple[str, str, str]:
        parts = self._destinations.get(destination)
        if parts is None:
            name, namespace, fqdn = self.workload.service_of(destination)
            if self._bounded_service(fqdn) == OTHER:
                parts = (OTHER, OTHER, OTHER)
            else:
                parts = (name, namespace, fqdn)
            if len(self._destinations) < 10_000:
                self._destinations[destination] = parts
        return parts

    def _istio_children(self, key: tuple[object, ...]) -> tuple[Any, ...]:
        destination, host, version, principal, status, flags = key
        if destination is None:
            labels: tuple[str, ...] = (
                UNKNOWN,  # destination_workload
                UNKNOWN,  # destination_workload_namespace
                UNKNOWN,  # destination_principal
                UNKNOWN,  # destination_app
                UNKNOWN,  # destination_version
                self._bounded_host(str(host)),  # destination_service
                UNKNOWN,  # destination_canonical_service
                "latest",  # destination_canonical_revision
                "PassthroughCluster",  # destination_service_name
                UNKNOWN,  # destination_service_namespace
                UNKNOWN,  # destination_cluster
            )
        else:
            name, namespace, fqdn = self._service(str(destination))
            shown_version = UNKNOWN if version is None else self._bounded_version(str(version))
            labels = (
                name,  # destination_workload
                namespace,  # destination_workload_namespace
                UNKNOWN if principal is None else self._bounded_principal(str(principal)),
                name,  # destination_app
                shown_version,  # destination_version
                fqdn,  # destination_service
                name,  # destination_canonical_service
                "latest" if version is None else shown_version,  # canonical revision
                name,  # destination_service_name
                namespace,  # destination_service_namespace
                UNKNOWN,  # destination_cluster
            )
        values = (
            "source",
            *self._source,
            *labels,
            "http",
            str(status),
            "",
            flags,
            # Istio reports the policy only on the destination side.
            UNKNOWN,
        )
        requests = cast(Counter, self._requests)  # present under istio naming
        children = (
            requests.labels(*values),
            self._duration.labels(*values),
            self._request_bytes.labels(*values),
            self._response_bytes.labels(*values),
        )
        self._children[key] = children
        return children

    def _otel_children(self, key: tuple[object, ...]) -> tuple[Any, ...]:
        method, status, destination, host, scheme, http_version, error_type = key
        if error_type is None and cast(int, status) >= 500:
            error_type = str(status)
        server = (
            self._bounded_host(str(host))
            if destination is None
            else self._service(str(destination))[2]
        )
        values = (
            method if method in _HTTP_METHODS else "_OTHER",
            str(status),
            server,
            "https" if scheme == "https" else "http",
            "http",
            self._bounded_version(str(http_version)),
            "" if error_type is None else str(error_type),
        )
        outbound = self._outbound
        children = (
            cast(Histogram, outbound.client_duration).labels(*values),
            cast(Histogram, outbound.client_request_bytes).labels(*values),
            cast(Histogram, outbound.client_response_bytes).labels(*values),
        )
        self._children[key] = children
        return children

    def _count(self, counter: Counter, *values: str) -> None:
        key = (counter._name, *values)
        child = self._counter_children.get(key)
        if child is None:
            child = counter.labels(*values)
            self._counter_children[key] = child
        child.inc()

    def record_retry(self, destination: str, condition: str | None) -> None:
        """Count one retry of a call to ``destination``, made under ``condition``
        (the ``retryOn`` condition matched, such as ``"503"`` or ``"connect-failure"``)."""
        self._count(
            self._outbound.retries,
            self._service(destination)[2],
            UNKNOWN if condition is None else condition,
        )

    def record_budget_exhausted(self, destination: str) -> None:
        """Count one retry refused because ``destination``'s retry budget had no room."""
        self._count(self._outbound.budget_exhausted, self._service(destination)[2])

    def record_ejection(self, destination: str, reason: str | None) -> None:
        """Count one endpoint of ``destination`` ejected by outlier detection, for
        ``reason`` (``"consecutive-5xx"``, ``"consecutive-gateway-errors"``,
        ``"consecutive-local-origin-failures"``)."""
        self._count(
            self._outbound.ejections,
            self._service(destination)[2],
            UNKNOWN if reason is None else reason,
        )

    def record_breaker_transition(self, destination: str, old: str, new: str) -> None:
        """Count one circuit-breaker state change of ``destination`` (``"closed"``,
        ``"open"``, ``"half-open"``)."""
        self._count(self._outbound.breaker_transitions, self._service(destination)[2], old, new)
