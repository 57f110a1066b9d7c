"""Django admin for reproq: task runs, workers, queue controls, rate limits (and schedules).

Payloads and errors are shown read-only and escaped. Actions go through the same code paths as
the API and CLI (cancel, pause/resume), so admin changes wake every process through NOTIFY.
"""

from __future__ import annotations

import json
from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html

from .models import PeriodicTask, QueueControl, RateLimit, TaskRun, Worker


def _pretty(value: Any) -> str:
    return format_html("<pre>{}</pre>", json.dumps(value, indent=2, ensure_ascii=False,
                                                   default=str))


@admin.register(TaskRun)
class TaskRunAdmin(admin.ModelAdmin):
    list_display = ("id", "task_path", "queue_name", "status", "priority", "attempts",
                    "enqueued_at", "started_at", "finished_at", "lease_owner")
    list_filter = ("status", "queue_name")
    search_fields = ("=id", "task_path", "lock_key", "concurrency_key")
    ordering = ("-id",)
    show_full_result_count = False
    readonly_fields = [f.name for f in TaskRun._meta.fields if f.name not in {"args", "kwargs",
                                                                             "errors",
                                                                             "return_value",
                                                                             "metadata"}] + [
        "args_display", "kwargs_display", "errors_display", "return_value_display",
        "metadata_display"]
    exclude = ("args", "kwargs", "errors", "return_value", "metadata")
    actions = ["cancel_runs"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    @admin.display(description="args")
    def args_display(self, obj: TaskRun) -> str:
        return _pretty(obj.args)

    @admin.display(description="kwargs")
    def kwargs_display(self, obj: TaskRun) -> str:
        return _pretty(obj.kwargs)

    @admin.display(description="errors")
    def errors_display(self, obj: TaskRun) -> str:
        return _pretty(obj.errors)

    @admin.display(description="return value")
    def return_value_display(self, obj: TaskRun) -> str:
        return _pretty(obj.return_value)

    @admin.display(description="metadata")
    def metadata_display(self, obj: TaskRun) -> str:
        return _pretty(obj.metadata)

    @admin.action(description="Cancel selected runs")
    def cancel_runs(self, request: HttpRequest, queryset: QuerySet[TaskRun]) -> None:
        from .control import cancel_runs

        changed = cancel_runs([run.pk for run in queryset])
        self.message_user(request, f"cancellation requested for {changed} runs",
                          messages.SUCCESS)


@admin.register(Worker)
class WorkerAdmin(admin.ModelAdmin):
    list_display = ("id", "hostname", "pid", "server", "concurrency", "started_at",
                    "last_seen_at", "leader_since")
    readonly_fields = [f.name for f in Worker._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False


@admin.register(QueueControl)
class QueueControlAdmin(admin.ModelAdmin):
    list_display = ("queue_name", "paused", "reason", "updated_at", "updated_by")
    actions = ["pause", "resume"]

    @admin.action(description="Pause selected queues")
    def pause(self, request: HttpRequest, queryset: QuerySet[QueueControl]) -> None:
        from .control import set_paused

        for qc in queryset:
            set_paused(qc.queue_name, True, reason=qc.reason, by=request.user.get_username())
        self.message_user(request, "paused", messages.SUCCESS)

    @admin.action(description="Resume selected queues")
    def resume(self, request: HttpRequest, queryset: QuerySet[QueueControl]) -> None:
        from .control import set_paused

        for qc in queryset:
            set_paused(qc.queue_name, False, by=request.user.get_username())
        self.message_user(request, "resumed", messages.SUCCESS)

    def save_model(self, request: HttpRequest, obj: QueueControl, form: Any, change: bool) -> None:
        from .control import set_paused

        set_paused(obj.queue_name, obj.paused, reason=obj.reason,
                   by=request.user.get_username())


@admin.register(RateLimit)
class RateLimitAdmin(admin.ModelAdmin):
    list_display = ("key", "rate", "period_seconds", "burst", "tokens", "refreshed_at")
    search_fields = ("key",)
    readonly_fields = ("tokens", "refreshed_at")


@admin.register(PeriodicTask)
class PeriodicTaskAdmin(admin.ModelAdmin):
    """Cron schedules. Validation (cron, time zone, task path) comes from the model's clean();
    "run now" sets next_run_at to now, so the beat leader fires it at its next look."""

    list_display = ("name", "cron_expr", "timezone", "task_path", "queue_name", "enabled",
                    "next_run_at", "last_run_at", "misfire_policy", "overlap_policy", "source")
    list_filter = ("enabled", "source", "misfire_policy", "overlap_policy", "queue_name")
    search_fields = ("name", "task_path")
    ordering = ("name",)
    readonly_fields = ("last_run_at", "last_run_id", "source")
    actions = ["run_now", "enable", "disable"]

    @admin.action(description="Run now (set next run to now)")
    def run_now(self, request: HttpRequest, queryset: QuerySet[PeriodicTask]) -> None:
        from .recurring import run_now

        disabled = queryset.filter(enabled=False).count()
        changed = run_now(queryset.filter(enabled=True))
        self.message_user(request, f"{changed} schedules will fire at the beat's next look",
                          messages.SUCCESS)
        if disabled:
            self.message_user(request, f"{disabled} disabled schedules were left alone: enable "
                              "them first", messages.WARNING)

    @admin.action(description="Enable selected schedules")
    def enable(self, request: HttpRequest, queryset: QuerySet[PeriodicTask]) -> None:
        from django.core.exceptions import ValidationError

        enabled = 0
        for obj in queryset.filter(enabled=False):
            obj.enabled = True
            try:
                obj.save()  # starts from now instead of replaying the time it was off
            except ValidationError as exc:
                self.message_user(request, f"{obj.name}: {'; '.join(exc.messages)}",
                                  messages.ERROR)
            else:
                enabled += 1
        self.message_user(request, f"{enabled} schedules enabled", messages.SUCCESS)

    @admin.action(description="Disable selected schedules")
    def disable(self, request: HttpRequest, queryset: QuerySet[PeriodicTask]) -> None:
        changed = queryset.update(enabled=False)
        self.message_user(request, f"{changed} schedules disabled", messages.SUCCESS)
