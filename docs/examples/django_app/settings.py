"""Settings of ``inventory``: the mesh is an app, a middleware and a ``MESHWARE`` dict."""

from __future__ import annotations

SECRET_KEY = "replace-me-in-production"
DEBUG = False
ALLOWED_HOSTS = ["*"]
INSTALLED_APPS = ["meshware_django"]
MIDDLEWARE = [
    "meshware_django.middleware.MeshwareMiddleware",
    "django.middleware.common.CommonMiddleware",
]
ROOT_URLCONF = "django_app.urls"
WSGI_APPLICATION = "django_app.wsgi.application"
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True

# The certificate directory comes from MESHWARE_CERT_DIR, endpoints of other services from
# MESHWARE_SERVICE_<NAME>: the environment fills in what differs between deployments.
MESHWARE = {
    "SERVICE": "inventory",
    "POLICIES": [
        {
            "name": "no-admin",
            "action": "DENY",
            "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}],
        }
    ],
}
