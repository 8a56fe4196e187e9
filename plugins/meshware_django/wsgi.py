"""Django's WSGI application inside the server-level stack, built from ``MESHWARE``.

::

    # mysite/wsgi.py, served with `meshware serve mysite.wsgi:application --service inventory`
    import os

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")

    from meshware_django.wsgi import get_wsgi_application

    application = get_wsgi_application()
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from django.core.exceptions import ImproperlyConfigured  # type: ignore[import-untyped]

from meshware.exceptions import ConfigurationError
from meshware_django.conf import mesh

if TYPE_CHECKING:
    from meshware.inbound.wsgi.stack import MeshStack

__all__ = ["get_wsgi_application"]


def get_wsgi_application() -> MeshStack:
    """Django's WSGI application (``django.core.wsgi.get_wsgi_application()``, which sets
    Django up) wrapped in the stack of telemetry, health, deadline, identity and JWT that the
    ``MESHWARE`` settings describe.

    The result is a :class:`~meshware.inbound.wsgi.stack.MeshStack`: ``meshware serve`` and
    gunicorn serve it as it is, and its ``health`` drives readiness. Authorization and rate
    limits stay with :class:`~meshware_django.middleware.MeshwareMiddleware`, which knows the
    view.

    Raises:
        ImproperlyConfigured: a setting is unknown, missing or invalid.
    """
    from django.core.wsgi import (  # type: ignore[import-untyped]
        get_wsgi_application as django_application,
    )

    app = django_application()
    try:
        return mesh().wsgi_stack(app)
    except ConfigurationError as exc:
        raise ImproperlyConfigured(f"meshware: {exc}") from exc
