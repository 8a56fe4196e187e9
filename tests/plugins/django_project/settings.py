"""Settings of the test project. Tests change ``MESHWARE`` with ``override_settings``."""

from __future__ import annotations

SECRET_KEY = "meshware-tests-only"
DEBUG = False
ALLOWED_HOSTS = ["testserver", "localhost", "127.0.0.1"]
INSTALLED_APPS = ["meshware_django"]
MIDDLEWARE = [
    "meshware_django.middleware.MeshwareMiddleware",
    "django.middleware.common.CommonMiddleware",
]
ROOT_URLCONF = "tests.plugins.django_project.urls"
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True
MESHWARE = {"SERVICE": "inventory", "ACCESS_LOG": False}
