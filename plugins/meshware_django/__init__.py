"""meshware for Django: the mesh, both ways, from settings.

::

    INSTALLED_APPS = [..., "meshware_django"]
    MIDDLEWARE = ["meshware_django.middleware.MeshwareMiddleware", ...]
    MESHWARE = {"SERVICE": "inventory"}

Views declare their own policies and limits with :func:`authorize` and :func:`rate_limit`
(on function views, on class-based views, or on their methods, directly or through
``method_decorator``); ``request.mesh_identity`` is the caller and ``request.mesh_client``
the mesh client. Django is imported on first use, so importing this package never requires
it. See ``docs/django.md``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

import httpx

from meshware_django.decorators import authorize, rate_limit

if TYPE_CHECKING:
    from meshware_django.asgi import get_asgi_application
    from meshware_django.conf import DjangoMesh, mesh
    from meshware_django.wsgi import get_wsgi_application

__all__ = [
    "DjangoMesh",
    "async_client",
    "authorize",
    "client",
    "get_asgi_application",
    "get_wsgi_application",
    "mesh",
    "rate_limit",
]

_LAZY = {
    "DjangoMesh": "meshware_django.conf",
    "mesh": "meshware_django.conf",
    "get_wsgi_application": "meshware_django.wsgi",
    "get_asgi_application": "meshware_django.asgi",
}


def client() -> httpx.Client:
    """The process's sync mesh client (also ``request.mesh_client``)."""
    from meshware_django.conf import mesh

    return mesh().client()


def async_client() -> httpx.AsyncClient:
    """The running event loop's async mesh client (also ``request.mesh_async_client`` on
    async requests).

    Raises:
        RuntimeError: no event loop is running.
    """
    from meshware_django.conf import mesh

    return mesh().async_client()


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'meshware_django' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
