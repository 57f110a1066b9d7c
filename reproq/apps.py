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
        from django.db.models.signals import post_migrate

        from .models import install_schedule_rules
        from .schedules import rules, sync_after_migrate

        # PeriodicTask.clean() and save() apply reproq.schedules' rules (the model cannot import
        # that module: it imports the model).
        install_schedule_rules(rules())
        # @recurring schedules are written after every migrate (SYNC_RECURRING_ON_MIGRATE).
        post_migrate.connect(sync_after_migrate, sender=self,
                             dispatch_uid="reproq.schedules.sync_after_migrate")
