"""``inventory`` as a WSGI application inside the stack its ``MESHWARE`` settings describe.

Serve it with mTLS (certificates from ``meshware ca init`` / ``meshware cert issue
inventory``)::

    MESHWARE_CERT_DIR=.meshware/certs MESHWARE_SERVICE_ORDERS=127.0.0.1:8443 \\
        meshware serve django_app.wsgi:application --service inventory --port 8445 \\
        --app-dir docs/examples
"""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_app.settings")

from meshware_django.wsgi import get_wsgi_application

application = get_wsgi_application()
