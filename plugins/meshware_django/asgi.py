"""Django's ASGI application inside the server-level stack, built from ``MESHWARE``.

::

    # mysite/asgi.py, served with `meshware serve mysite.asgi:application --service inventory`
    import os

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")

    from meshware_django.asgi import get_asgi_application

    application = get_asgi_application()
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.core.exceptions import ImproperlyConfigured  # type: ignore[import-untyped]

from meshware.exceptions import ConfigurationError
from meshware_django.conf import mesh

if TYPE_CHECKING:
    from meshware.inbound.asgi.stack import MeshStack

__all__ = ["get_asgi_application"]


def get_asgi_application() -> MeshStack:
    """Django's ASGI application (``django.core.asgi.get_asgi_application()``, which sets
    Django up) wrapped in the stack of telemetry, health, deadline, identity and JWT that the
    ``MESHWARE`` settings describe; the ASGI twin of
    :func:`meshware_django.wsgi.get_wsgi_application`. The stack answers the lifespan
    protocol for Django, which has none, so readiness and draining still follow the server.

    Raises:
        ImproperlyConfigured: a setting is unknown, missing or invalid.
    """
    from django.core.asgi import (  # type: ignore[import-untyped]
        get_asgi_application as django_application,
    )

    app = django_application()
    try:
        return mesh().asgi_stack(app)
    except ConfigurationError as exc:
        raise ImproperlyConfigured(f"meshware: {exc}") from exc
