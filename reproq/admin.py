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

from .models import QueueControl, RateLimit, TaskRun, Worker


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
