"""The Django application: ``"meshware_django"`` in ``INSTALLED_APPS``."""

from __future__ import annotations

from django.apps import AppConfig  # type: ignore[import-untyped]


class MeshwareConfig(AppConfig):  # type: ignore[misc]
    """Registers meshware's system checks (``meshware.E001`` ...) and re-reads the settings
    when a test changes ``MESHWARE``."""

    name = "meshware_django"
    label = "meshware"
    verbose_name = "meshware"

    def ready(self) -> None:
        from django.core import checks  # type: ignore[import-untyped]
        from django.core.signals import setting_changed  # type: ignore[import-untyped]

        from meshware_django import checks as meshware_checks
        from meshware_django.conf import _on_setting_changed

        checks.register(meshware_checks.check_settings)
        checks.register(meshware_checks.check_middleware)
        checks.register(meshware_checks.check_views, checks.Tags.urls)
        setting_changed.connect(_on_setting_changed, dispatch_uid="meshware-settings")
