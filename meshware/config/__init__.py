"""Mesh configuration from Istio's own YAML resources (and meshware's few additions).

::

    from meshware.config import load_config

    config = load_config("mesh/", service="orders", namespace="shop")
    config.policies          # AuthorizationPolicies that apply to orders
    config.inbound_config()  # an InboundConfig for build_asgi_stack / build_wsgi_stack
    config.outbound_config() # an OutboundConfig for mesh_client

See ``docs/configuration.md`` for every kind and field.
"""

from __future__ import annotations

from meshware.config.errors import ConfigProblem, MeshConfigError
from meshware.config.kinds import KINDS, LoadedResource, PeerMtls, Target
from meshware.config.loader import (
    ConfigReport,
    ConfigSource,
    MeshConfig,
    SourceFile,
    check_config,
    load_config,
)

__all__ = [
    "KINDS",
    "ConfigProblem",
    "ConfigReport",
    "ConfigSource",
    "LoadedResource",
    "MeshConfig",
    "MeshConfigError",
    "PeerMtls",
    "SourceFile",
    "Target",
    "check_config",
    "load_config",
]
