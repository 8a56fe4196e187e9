"""Telemetry: Istio-compatible Prometheus metrics, OpenTelemetry tracing, a JSON access log.

The inbound shells that apply them are ``meshware.inbound.asgi.telemetry.TelemetryMiddleware``
and its WSGI twin ``meshware.inbound.wsgi.telemetry.TelemetryMiddleware``.
"""

from __future__ import annotations

from meshware.telemetry.access_log import AccessLog
from meshware.telemetry.metrics import MeshMetrics, WorkloadInfo
from meshware.telemetry.tracing import TracingConfig, build_propagator, configure_tracing

__all__ = [
    "AccessLog",
    "MeshMetrics",
    "TracingConfig",
    "WorkloadInfo",
    "build_propagator",
    "configure_tracing",
]
