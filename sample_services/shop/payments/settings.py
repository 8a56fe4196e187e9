"""Django settings of ``payments``: the mesh is an app, a middleware and a ``MESHWARE`` dict."""

from __future__ import annotations

from sample_services.shop.mesh import mesh_settings

SECRET_KEY = "sample-shop-payments-not-a-secret"
DEBUG = False
ALLOWED_HOSTS = ["*"]
INSTALLED_APPS = ["meshware_django"]
MIDDLEWARE = ["meshware_django.middleware.MeshwareMiddleware"]
ROOT_URLCONF = "sample_services.shop.payments.urls"
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True

MESHWARE = {key.upper(): value for key, value in mesh_settings("payments").items()}
