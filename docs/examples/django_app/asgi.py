"""``inventory`` as an ASGI application inside the stack its ``MESHWARE`` settings describe:
``meshware serve django_app.asgi:application --service inventory --app-dir docs/examples``.
"""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_app.settings")

from meshware_django.asgi import get_asgi_application

application = get_asgi_application()
