"""``payments`` as a WSGI application inside the stack its ``MESHWARE`` settings describe:
``meshware serve sample_services.shop.payments.wsgi:application --service payments``.
"""

from __future__ import annotations

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sample_services.shop.payments.settings")

from meshware_django.wsgi import get_wsgi_application

application = get_wsgi_application()
