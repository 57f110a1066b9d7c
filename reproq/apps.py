"""Django app configuration: registers system checks and settings-change hooks."""

from __future__ import annotations

from django.apps import AppConfig


class ReproqConfig(AppConfig):
    name = "reproq"
    label = "reproq"
    verbose_name = "Reproq tasks"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.core.signals import setting_changed

        from . import checks, conf

        checks.register()
        setting_changed.connect(conf.reset_cache, dispatch_uid="reproq.conf.reset_cache")
