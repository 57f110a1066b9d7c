"""Django admin for reproq: task runs, workers, queue controls, rate limits (and schedules).

Payloads and errors are shown read-only and escaped. Actions go through the same code paths as
the API and CLI (cancel, pause/resume), so admin changes wake every process through NOTIFY.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import Case, DateTimeField, F, QuerySet, Value, When
from django.http import HttpRequest
from django.utils.html import format_html, format_html_join

from .dashboard.adminkit import (
    EstimatedCountPaginator,
    LeaseFilter,
    QueueFilter,
    TaskPathFilter,
    search_runs,
)
from .models import PeriodicTask, QueueControl, RateLimit, TaskRun, Worker
from .storedjson import Undecodable


def _pretty(value: Any) -> str:
    if isinstance(value, Undecodable):  # JSON PostgreSQL holds but Python cannot load
        return format_html("<pre>{}</pre>", value.preview())
    return format_html("<pre>{}</pre>", json.dumps(value, indent=2, ensure_ascii=False,
                                                   default=str))


def _pause_each(model_admin: admin.ModelAdmin, request: HttpRequest,
                queues: list[tuple[str, str]], paused: bool) -> None:
    """Pause or resume each (queue, reason); a queue name written by hand that is not a valid
    name is skipped with an error message instead of failing the whole action."""
    from .control import set_paused

    done, invalid = [], []
    for queue, reason in queues:
        try:
            set_paused(queue, paused, reason=reason, by=request.user.get_username())
        except ValueError:
            invalid.append(queue)
        else:
            done.append(queue)
    if done:
        model_admin.message_user(request, f"{'paused' if paused else 'resumed'}: "
                                 f"{', '.join(done)}", messages.SUCCESS)
    if invalid:
        model_admin.message_user(request, "skipped invalid queue names (use 1-64 characters "
                                 "from letters, digits, _ . : -): "
                                 + ", ".join(repr(q[:80]) for q in invalid), messages.ERROR)


def _lookup_ok(model: Any, value: str) -> bool:
    """A primary key value from a URL or a form is one the database can be asked about (a NUL
    in a text key makes PostgreSQL raise; a non-number for a bigint key makes Django raise)."""
    from django.core.exceptions import ValidationError

    if "\x00" in value:
        return False
    try:
        model._meta.pk.to_python(value)
    except (ValidationError, ValueError):
        return False
    if model._meta.pk.get_internal_type() in {"BigAutoField", "AutoField", "BigIntegerField"}:
        from .ids import parse_id

        try:
            parse_id(value)
        except ValueError:
            return False
    return True


class StrictLookups(admin.ModelAdmin):
    """Bad primary keys in change URLs and in the action checkboxes are "not found" / an error
    message, never a 500."""

    def get_object(self, request: HttpRequest, object_id: str, from_field: Any = None) -> Any:
        if from_field is None and not _lookup_ok(self.model, str(object_id)):
            return None
        return super().get_object(request, object_id, from_field)

    def response_action(self, request: HttpRequest, queryset: QuerySet[Any],
                        **kwargs: Any) -> Any:  # Django 6.1 adds action_location
        from django.contrib.admin import helpers
        from django.http import HttpResponseRedirect

        selected = request.POST.getlist(helpers.ACTION_CHECKBOX_NAME)
        if not all(_lookup_ok(self.model, v) for v in selected):
            self.message_user(request, "the selection holds values that are not ids of "
                              f"{self.model._meta.verbose_name_plural}; nothing was done",
                              messages.ERROR)
            return HttpResponseRedirect(request.get_full_path())
        return super().response_action(request, queryset, **kwargs)


# A run's times as the pages read them: a time Python's datetime cannot hold (±infinity, a
# year past 9999 or before 1, in a row written by hand) reads as None, instead of failing the
# driver's load of the whole page (every run listed beside it).
RUN_TIMES = ("enqueued_at", "run_after", "started_at", "last_attempted_at", "finished_at",
             "leased_until", "expires_at")
_PY_TIMES = (datetime(1, 1, 2, tzinfo=UTC), datetime(9999, 12, 30, tzinfo=UTC))


def with_readable_times(qs: QuerySet[TaskRun]) -> QuerySet[TaskRun]:
    return qs.defer(*RUN_TIMES).annotate(**{
        f"shown_{name}": Case(When(**{f"{name}__range": _PY_TIMES}, then=F(name)),
                              default=Value(None), output_field=DateTimeField())
        for name in RUN_TIMES})


def _time_display(name: str) -> Any:
    @admin.display(description=name.replace("_", " "), ordering=name)
    def show(self: Any, obj: TaskRun) -> Any:
        value = getattr(obj, f"shown_{name}", None)
        return value if value is not None else "-"

    show.__name__ = f"shown_{name}"
    return show


@admin.register(TaskRun)
class TaskRunAdmin(StrictLookups):
    """Task runs on tables of millions of rows: estimated counts (no COUNT(*)), filters and
    search that use indexes, list pages that skip the JSON payload columns."""

    list_display = ("id", "task_path", "queue_name", "status", "priority", "attempts",
                    "shown_enqueued_at", "shown_started_at", "shown_finished_at", "lease_owner")
    list_filter = ("status", QueueFilter, TaskPathFilter, LeaseFilter)
    search_fields = ("task_path",)  # see get_search_results: an id or part of a task path
    search_help_text = "A run id (123 or #123), or part of a task path."
    ordering = ("-id",)
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER
    paginator = EstimatedCountPaginator
    readonly_fields = [
        f"shown_{f.name}" if f.name in RUN_TIMES else f.name for f in TaskRun._meta.fields
        if f.name not in {"args", "kwargs", "errors", "return_value", "metadata"}] + [
        "args_display", "kwargs_display", "errors_display", "return_value_display",
        "metadata_display"]
    exclude = ("args", "kwargs", "errors", "return_value", "metadata", *RUN_TIMES)
    actions = ["cancel_runs", "retry_failed", "replay_runs", "discard_runs", "pause_queues",
               "resume_queues"]

    shown_enqueued_at = _time_display("enqueued_at")
    shown_run_after = _time_display("run_after")
    shown_started_at = _time_display("started_at")
    shown_last_attempted_at = _time_display("last_attempted_at")
    shown_finished_at = _time_display("finished_at")
    shown_leased_until = _time_display("leased_until")
    shown_expires_at = _time_display("expires_at")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def get_queryset(self, request: HttpRequest) -> QuerySet[TaskRun]:
        qs = with_readable_times(super().get_queryset(request))
        match = getattr(request, "resolver_match", None)
        if match is not None and (match.url_name or "").endswith("_changelist"):
            qs = qs.defer("args", "kwargs", "errors", "return_value", "metadata", "worker_ids")
        return qs

    def get_search_results(self, request: HttpRequest, queryset: QuerySet[TaskRun],
                           search_term: str) -> tuple[QuerySet[TaskRun], bool]:
        return search_runs(queryset, search_term), False

    def get_actions(self, request: HttpRequest, action_location: Any = None) -> dict[str, Any]:
        # action_location: Django 6.1 (actions on the change form); 6.0 never passes it.
        actions = (super().get_actions(request) if action_location is None
                   else super().get_actions(request, action_location=action_location))
        # "Discard" replaces it: one DELETE, without collecting millions of objects first.
        actions.pop("delete_selected", None)
        return actions

    @admin.display(description="args")
    def args_display(self, obj: TaskRun) -> str:
        return _pretty(obj.args)

    @admin.display(description="kwargs")
    def kwargs_display(self, obj: TaskRun) -> str:
        return _pretty(obj.kwargs)

    @admin.display(description="errors")
    def errors_display(self, obj: TaskRun) -> str:
        if not isinstance(obj.errors, list) or not obj.errors:
            return _pretty(obj.errors)
        return format_html_join(
            "", "<p><b>attempt {}</b> {} <i>{}</i></p><pre>{}</pre>",
            ((e.get("attempt", "?"), e.get("exception_class_path", ""), e.get("worker_id", ""),
              e.get("traceback", "")) if isinstance(e, dict) else ("?", "", "", str(e))
             for e in obj.errors))

    @admin.display(description="return value")
    def return_value_display(self, obj: TaskRun) -> str:
        return _pretty(obj.return_value)

    @admin.display(description="metadata")
    def metadata_display(self, obj: TaskRun) -> str:
        return _pretty(obj.metadata)

    def _ids(self, request: HttpRequest, queryset: QuerySet[TaskRun]) -> list[int] | None:
        from .dashboard.ops import MAX_IDS

        ids = list(queryset.order_by().values_list("pk", flat=True)[: MAX_IDS + 1])
        if len(ids) > MAX_IDS:
            self.message_user(request, f"select at most {MAX_IDS} runs per action (narrow the "
                              "filters)", messages.ERROR)
            return None
        return ids

    @admin.action(description="Cancel selected runs")
    def cancel_runs(self, request: HttpRequest, queryset: QuerySet[TaskRun]) -> None:
        from .control import cancel_runs

        ids = self._ids(request, queryset)
        if ids is None:
            return
        changed = cancel_runs(ids)
        self.message_user(request, f"cancellation requested for {changed} runs",
                          messages.SUCCESS)

    @admin.action(description="Retry selected failed/cancelled/expired runs (as new runs)")
    def retry_failed(self, request: HttpRequest, queryset: QuerySet[TaskRun]) -> None:
        from .dashboard.ops import retry_runs

        ids = self._ids(request, queryset)
        if ids is not None:
            self.message_user(request, retry_runs(ids).summary("retried as new runs"),
                              messages.SUCCESS)

    @admin.action(description="Replay selected runs (enqueue a new copy)")
    def replay_runs(self, request: HttpRequest, queryset: QuerySet[TaskRun]) -> None:
        from .dashboard.ops import replay_runs

        ids = self._ids(request, queryset)
        if ids is not None:
            self.message_user(request, replay_runs(ids).summary("replayed"), messages.SUCCESS)

    @admin.action(description="Discard selected runs (delete; running ones are kept)")
    def discard_runs(self, request: HttpRequest, queryset: QuerySet[TaskRun]) -> None:
        from .dashboard.ops import discard_runs

        ids = self._ids(request, queryset)
        if ids is not None:
            deleted = discard_runs(ids)
            kept = len(ids) - deleted
            self.message_user(request, f"{deleted} runs discarded"
                              + (f"; {kept} running runs kept (cancel them first)"
                                 if kept else ""), messages.SUCCESS)

    def _set_paused(self, request: HttpRequest, queryset: QuerySet[TaskRun],
                    paused: bool) -> None:
        queues = sorted(set(queryset.order_by().values_list("queue_name", flat=True)
                            .distinct()[:100]))
        _pause_each(self, request, [(q, "admin" if paused else "") for q in queues], paused)

    @admin.action(description="Pause the queues of the selected runs")
    def pause_queues(self, request: HttpRequest, queryset: QuerySet[TaskRun]) -> None:
        self._set_paused(request, queryset, True)

    @admin.action(description="Resume the queues of the selected runs")
    def resume_queues(self, request: HttpRequest, queryset: QuerySet[TaskRun]) -> None:
        self._set_paused(request, queryset, False)


@admin.register(Worker)
class WorkerAdmin(StrictLookups):
    list_display = ("id", "hostname", "pid", "server", "concurrency", "started_at",
                    "last_seen_at", "leader_since")
    readonly_fields = [f.name for f in Worker._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False


class QueueControlForm(forms.ModelForm):
    """The queue name is checked like `reproq pause-queue` checks it (no 500 on a bad name)."""

    class Meta:
        model = QueueControl
        fields = ("queue_name", "paused", "reason")

    def clean_queue_name(self) -> str:
        from .control import validate_queue

        try:
            return validate_queue(self.cleaned_data["queue_name"])
        except ValueError as exc:
            raise forms.ValidationError(str(exc)) from exc


@admin.register(QueueControl)
class QueueControlAdmin(StrictLookups):
    form = QueueControlForm
    list_display = ("queue_name", "paused", "reason", "updated_at", "updated_by")
    actions = ["pause", "resume"]

    @admin.action(description="Pause selected queues")
    def pause(self, request: HttpRequest, queryset: QuerySet[QueueControl]) -> None:
        _pause_each(self, request, [(qc.queue_name, qc.reason) for qc in queryset], True)

    @admin.action(description="Resume selected queues")
    def resume(self, request: HttpRequest, queryset: QuerySet[QueueControl]) -> None:
        _pause_each(self, request, [(qc.queue_name, "") for qc in queryset], False)

    def save_model(self, request: HttpRequest, obj: QueueControl, form: Any, change: bool) -> None:
        from .control import set_paused

        set_paused(obj.queue_name, obj.paused, reason=obj.reason,
                   by=request.user.get_username())


class RateLimitForm(forms.ModelForm):
    """The operator's fields only; the key is checked like `reproq limit set` checks it."""

    class Meta:
        model = RateLimit
        fields = ("key", "rate", "period_seconds", "burst")

    def clean_key(self) -> str:
        from .control import validate_rate_key

        try:
            return validate_rate_key(self.cleaned_data["key"])
        except ValueError as exc:
            raise forms.ValidationError(str(exc)) from exc


@admin.register(RateLimit)
class RateLimitAdmin(StrictLookups):
    form = RateLimitForm
    list_display = ("key", "rate", "period_seconds", "burst", "tokens", "refreshed_at")
    search_fields = ("key",)
    readonly_fields = ("tokens", "refreshed_at")

    def save_model(self, request: HttpRequest, obj: RateLimit, form: Any, change: bool) -> None:
        # Like control.set_rate_limit: a new or changed bucket starts full (last_grant and
        # tokens are the claim's bookkeeping, not the operator's).
        from django.utils import timezone

        if not change or form.has_changed():
            obj.tokens = float(obj.burst)
            obj.refreshed_at = timezone.now()
        super().save_model(request, obj, form, change)


@admin.register(PeriodicTask)
class PeriodicTaskAdmin(StrictLookups):
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
        from .schedules import run_now

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
