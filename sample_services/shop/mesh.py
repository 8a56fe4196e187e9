"""What every shop service shares: the mesh file, the principals, the run directory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from meshware.config import load_config

MESH_FILE = Path(__file__).with_name("mesh.yaml")
"""The one file holding the shop's routing, resilience and rate-limit configuration."""

TRUST_DOMAIN = "cluster.local"
NAMESPACE = "default"
ADMIN_ISSUER = "https://auth.shop.local"
"""The issuer of the admin tokens the demo signs with its locally generated key."""


def principal(service: str) -> str:
    """The Istio principal of a shop service: ``cluster.local/ns/default/sa/<service>``."""
    return f"{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/{service}"


def mesh_settings(service: str, **extra: Any) -> dict[str, Any]:
    """The plugin settings of ``service``: its view of :data:`MESH_FILE`, plus ``extra``.

    The certificates (``MESHWARE_CERT_DIR``), the other services' endpoints
    (``MESHWARE_SERVICES``) and the version label (``MESHWARE_VERSION``) come from the
    environment the demo starts each process with.

    Args:
        service: the service's name (its ``app`` label in the mesh file).
        extra: further settings, such as ``jwt_rules``; they win over the file's.

    Raises:
        meshware.config.MeshConfigError: the mesh file is invalid.
    """
    config = load_config(MESH_FILE, service=service, namespace=NAMESPACE)
    settings: dict[str, Any] = {
        "service": service,
        "namespace": NAMESPACE,
        "virtual_services": config.routes.virtual_services,
        "destination_rules": config.destination_rules,
        "default_timeout": 5.0,
        "max_timeout": 10.0,
    }
    if config.rate_limit is not None:
        settings["rate_limit"] = config.rate_limit
    if config.policies:
        settings["policies"] = config.policies
    settings.update(extra)
    return settings


def data_dir() -> Path:
    """Where a service keeps its files (``SHOP_DATA_DIR``, else a temporary-free default)."""
    path = Path(os.environ.get("SHOP_DATA_DIR", ".meshware/shop/data"))
    path.mkdir(parents=True, exist_ok=True)
    return path
