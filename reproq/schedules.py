"""Schedules as rows and as code: validation, `@recurring`, and the sync of `PeriodicTask` rows.

*When* a schedule fires is `reproq.cron` (pure: no model, no database); this module is what
needs Django's models and task backends:

- `validate_schedule()` / `prepare_for_save()`: the rules of `PeriodicTask.clean()` and
  ``save()`` (`RULES`, which `reproq.apps` installs into `reproq.models`: the model cannot import
  this module, which imports it); invalid cron expressions, unknown time zones and unknown task
  paths are refused with a clear message.
- `recurring()`: code-defined schedules stacked on ``@task``; `sync_recurring()` writes them to
  the database (``manage.py reproq sync-recurring`` and after ``migrate``) and never pushes an
  already-due fire into the future.
- `run_now()`, `current_leader()`: ORM helpers for operators.

Models are imported inside the functions that use them, so ``from reproq.schedules import
recurring`` works in a ``tasks`` module imported before the app registry is ready.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from django.core.exceptions import ValidationError

from .cron import (
    DEFAULT_MISFIRE,
    DEFAULT_OVERLAP,
    MISFIRE_POLICIES,
    OVERLAP_POLICIES,
    CronSchedule,
    InvalidSchedule,
    default_timezone_name,
    resolve_timezone,
)

if TYPE_CHECKING:
    from .models import PeriodicTask, ScheduleRules

logger = logging.getLogger("reproq.beat")


# --------------------------------------------------------------------------- validation


def _task_problem(task_path: str) -> tuple[Any, str | None]:
    """(the Task, None) or (None, a message saying what is wrong with `task_path`)."""
    from django.tasks import Task, task_backends
    from django.utils.module_loading import import_string

    from .backend import ReproqBackend

    if not isinstance(task_path, str) or "." not in task_path.strip():
        return None, (f"{task_path!r} is not a dotted path: give the path of a function "
                      "decorated with @task, e.g. myapp.tasks.cleanup")
    try:
        target = import_string(task_path.strip())
    except Exception as exc:
        return None, (f"{task_path!r} cannot be imported ({type(exc).__name__}: {exc}): give the "
                      "dotted path of a function decorated with @task, e.g. myapp.tasks.cleanup")
    if not isinstance(target, Task):
        return None, f"{task_path!r} is not a task: decorate it with @task"
    try:
        backend = task_backends[target.backend]
    except Exception as exc:
        return None, f"{task_path!r} uses backend {target.backend!r}, which fails: {exc}"
    if not isinstance(backend, ReproqBackend):
        return None, (f"{task_path!r} uses backend {target.backend!r}, which is not a reproq "
                      "backend; schedules run through reproq")
    return target, None


def validate_schedule(obj: PeriodicTask) -> None:
    """Raise ValidationError (by field) if `obj` cannot be scheduled; used by clean() and save()."""
    from . import payload
    from .conf import QUEUE_NAME_RE

    errors: dict[str, list[str]] = {}

    def add(name: str, message: str) -> None:
        errors.setdefault(name, []).append(message)

    if not (obj.name or "").strip():
        add("name", "give the schedule a name")
    try:
        resolve_timezone(obj.timezone)
    except InvalidSchedule as exc:
        add("timezone", str(exc))
    else:
        try:
            CronSchedule.parse(obj.cron_expr, obj.timezone)
        except InvalidSchedule as exc:
            add("cron_expr", str(exc))
    task, problem = _task_problem(obj.task_path)
    if problem:
        add("task_path", problem)
    if not isinstance(obj.args, list):
        add("args", f"must be a JSON array of positional arguments, got {obj.args!r}")
    if not isinstance(obj.kwargs, dict):
        add("kwargs", f"must be a JSON object of keyword arguments, got {obj.kwargs!r}")
    if "args" not in errors and "kwargs" not in errors:
        try:
            payload.decode(obj.args, None)
            payload.decode(obj.kwargs, None)
            payload.dumps(obj.args, "args")
            payload.dumps(obj.kwargs, "kwargs")
        except Exception as exc:
            add("args", f"the arguments are not in reproq's payload encoding: {exc}")
    if not isinstance(obj.queue_name, str) or not QUEUE_NAME_RE.match(obj.queue_name):
        add("queue_name", f"{obj.queue_name!r} is not a valid queue name: use 1-64 characters "
                          "from letters, digits, _ . : -")
    elif task is not None:
        queues = task.get_backend().queues
        if queues and obj.queue_name not in queues:
            add("queue_name", f"queue {obj.queue_name!r} is not one of the backend's QUEUES "
                              f"({', '.join(sorted(queues))})")
    if (not isinstance(obj.priority, int) or isinstance(obj.priority, bool)
            or not -100 <= obj.priority <= 100):
        add("priority", f"must be an int from -100 to 100, got {obj.priority!r}")
    if obj.max_attempts is not None and (not isinstance(obj.max_attempts, int)
                                         or isinstance(obj.max_attempts, bool)
                                         or obj.max_attempts < 1):
        add("max_attempts", f"must be empty or a whole number >= 1, got {obj.max_attempts!r}")
    if obj.misfire_policy not in MISFIRE_POLICIES:
        add("misfire_policy", f"{obj.misfire_policy!r} is not one of {', '.join(MISFIRE_POLICIES)}")
    if obj.overlap_policy not in OVERLAP_POLICIES:
        add("overlap_policy", f"{obj.overlap_policy!r} is not one of {', '.join(OVERLAP_POLICIES)}")
    if errors:
        raise ValidationError(errors)


def prepare_for_save(obj: PeriodicTask) -> None:
    """Validate, fill the time zone, and compute next_run_at where it is unset or stale.

    A due next_run_at (in the past) is never moved: the beat fires it. A future one is
    recomputed when the cron expression or zone changed; a schedule enabled again after being
    disabled starts from now instead of replaying the time it was off.
    """
    from django.utils import timezone

    validate_schedule(obj)
    obj.cron_expr = " ".join(obj.cron_expr.split())
    obj.task_path = obj.task_path.strip()
    if not obj.timezone:
        obj.timezone = default_timezone_name()
    schedule = CronSchedule.parse(obj.cron_expr, obj.timezone)
    now = timezone.now()
    if obj.next_run_at is None:
        obj.next_run_at = schedule.next_after(now)
        return
    if obj.pk is None:
        return
    old = type(obj)._default_manager.filter(pk=obj.pk).values_list(
        "cron_expr", "timezone", "enabled").first()
    if old is None:
        return
    old_expr, old_tz, was_enabled = old
    re_enabled = obj.enabled and not was_enabled and obj.next_run_at < now
    changed = (old_expr, old_tz) != (obj.cron_expr, obj.timezone) and obj.next_run_at > now
    if re_enabled or changed:
        obj.next_run_at = schedule.next_after(now)


def rules() -> ScheduleRules:
    """The `reproq.models.ScheduleRules` of `PeriodicTask` (installed by `reproq.apps`)."""
    from .models import ScheduleRules

    return ScheduleRules(validate=validate_schedule, prepare_for_save=prepare_for_save)


# --------------------------------------------------------------------------- ORM helpers


def run_now(schedules: Any) -> int:
    """Make schedules fire at the beat's next look (sets next_run_at to now); returns the count.

    Accepts a PeriodicTask, a name, or a queryset. Disabled schedules do not fire.
    """
    from django.utils import timezone

    from .models import PeriodicTask

    if isinstance(schedules, PeriodicTask):
        schedules = PeriodicTask.objects.filter(pk=schedules.pk)
    elif isinstance(schedules, str):
        schedules = PeriodicTask.objects.filter(name=schedules)
    return int(schedules.update(next_run_at=timezone.now()))


def current_leader(using: str | None = None) -> Any:
    """The worker row of the beat leader (`leader_since` set), or None."""
    from .models import Worker

    qs = Worker.objects.using(using) if using else Worker.objects
    return qs.filter(leader_since__isnull=False).order_by("-leader_since").first()


# --------------------------------------------------------------------------- @recurring


@dataclass(frozen=True)
class RecurringSpec:
    """A schedule declared in code with `@recurring`."""

    key: str
    task_path: str
    schedule: str
    timezone: str
    args: list[Any]
    kwargs: dict[str, Any]
    queue_name: str
    priority: int
    max_attempts: int | None
    misfire_policy: str
    overlap_policy: str
    enabled: bool = True

    def fields(self) -> dict[str, Any]:
        return {
            "cron_expr": self.schedule, "timezone": self.timezone, "task_path": self.task_path,
            "args": self.args, "kwargs": self.kwargs, "queue_name": self.queue_name,
            "priority": self.priority, "max_attempts": self.max_attempts,
            "misfire_policy": self.misfire_policy, "overlap_policy": self.overlap_policy,
            "enabled": self.enabled, "source": "code",
        }


_registry: dict[str, RecurringSpec] = {}


def recurring(schedule: str, *, key: str | None = None, args: Iterable[Any] = (),
              kwargs: dict[str, Any] | None = None, timezone: str | None = None,
              queue_name: str | None = None, priority: int | None = None,
              max_attempts: int | None = None, misfire: str = DEFAULT_MISFIRE,
              overlap: str = DEFAULT_OVERLAP, enabled: bool = True) -> Any:
    """Declare a cron schedule for a task; stack it above ``@task`` (several may be stacked)::

        @recurring(schedule="0 3 * * *", key="nightly-report", kwargs={"full": True})
        @task
        def report(full=False): ...

    `key` names the schedule (default: the task's path). Nothing is written until
    ``manage.py reproq sync-recurring`` or ``migrate`` runs (see `sync_recurring`).
    """
    from . import payload

    tz_name = timezone or default_timezone_name()
    CronSchedule.parse(schedule, tz_name)  # raises InvalidSchedule with the reason
    if misfire not in MISFIRE_POLICIES:
        raise ValueError(f"misfire must be one of {MISFIRE_POLICIES}, got {misfire!r}")
    if overlap not in OVERLAP_POLICIES:
        raise ValueError(f"overlap must be one of {OVERLAP_POLICIES}, got {overlap!r}")
    if key is not None and (not isinstance(key, str) or not key.strip() or len(key) > 200):
        raise ValueError(f"key must be a non-empty str of at most 200 characters, got {key!r}")
    enc_args, enc_kwargs = payload.encode_call(list(args), dict(kwargs or {}))
    payload.dumps(enc_args, "args")
    payload.dumps(enc_kwargs, "kwargs")

    def decorate(target: Any) -> Any:
        from django.tasks import Task

        if not isinstance(target, Task):
            raise TypeError("@recurring goes above @task: it schedules a task, not a plain "
                            "function")
        spec = RecurringSpec(
            key=key or target.module_path, task_path=target.module_path,
            schedule=" ".join(schedule.split()), timezone=tz_name,
            args=enc_args, kwargs=enc_kwargs,
            queue_name=queue_name or target.queue_name,
            priority=target.priority if priority is None else priority,
            max_attempts=max_attempts, misfire_policy=misfire, overlap_policy=overlap,
            enabled=enabled)
        other = _registry.get(spec.key)
        if other is not None and other.task_path != spec.task_path:
            raise ValueError(f"recurring key {spec.key!r} is already used by "
                             f"{other.task_path}; give each schedule its own key")
        _registry[spec.key] = spec
        return target

    return decorate


def registered() -> dict[str, RecurringSpec]:
    """The schedules declared in code so far (imported modules only), by key."""
    return dict(_registry)


def unregister(key: str) -> None:
    _registry.pop(key, None)


@dataclass
class SyncReport:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    disabled: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"{len(self.created)} created", f"{len(self.updated)} updated",
                 f"{len(self.unchanged)} unchanged", f"{len(self.disabled)} disabled"]
        text = "recurring schedules: " + ", ".join(parts)
        for name in self.disabled:
            text += f"\n  disabled {name!r}: no longer declared with @recurring"
        for message in self.conflicts:
            text += f"\n  conflict: {message}"
        return text


def sync_recurring(using: str | None = None, *, discover: bool = True) -> SyncReport:
    """Write the `@recurring` schedules to the database (one transaction).

    New keys are created; changed ones updated (a due next_run_at is kept, so the fire still
    happens; a future one follows the new expression); code schedules no longer declared are
    disabled (their tick history is kept). A schedule created in the admin with the same name is
    left alone and reported as a conflict.
    """
    from django.db import router, transaction
    from django.utils.module_loading import autodiscover_modules

    from .models import PeriodicTask

    if discover:
        autodiscover_modules("tasks")
    db = using or router.db_for_write(PeriodicTask)
    specs = registered()
    report = SyncReport()
    with transaction.atomic(using=db):
        existing = {p.name: p for p in PeriodicTask.objects.using(db).select_for_update()
                    .filter(name__in=list(specs))}
        for key, spec in sorted(specs.items()):
            obj = existing.get(key)
            if obj is not None and obj.source != "code":
                report.conflicts.append(f"{key!r} exists as a schedule made in the admin/ORM; "
                                        "rename the @recurring key or delete that schedule")
                continue
            if obj is None:
                obj = PeriodicTask(name=key, **spec.fields())
                obj.save(using=db)
                report.created.append(key)
                continue
            wanted = spec.fields()
            changed = {k: v for k, v in wanted.items() if getattr(obj, k) != v}
            if not changed:
                report.unchanged.append(key)
                continue
            for k, v in changed.items():
                setattr(obj, k, v)
            obj.save(using=db)
            report.updated.append(key)
        stale = (PeriodicTask.objects.using(db).filter(source="code", enabled=True)
                 .exclude(name__in=list(specs)))
        report.disabled = sorted(stale.values_list("name", flat=True))
        if report.disabled:
            stale.update(enabled=False)
    return report


def sync_after_migrate(sender: Any = None, using: str = "default", verbosity: int = 1,
                       stdout: Any = None, **kwargs: Any) -> None:
    """post_migrate hook: sync `@recurring` schedules unless SYNC_RECURRING_ON_MIGRATE is off.

    Problems are reported, never raised: a bad schedule must not break ``migrate``.
    """
    from django.db import connections
    from django.tasks import task_backends

    from .conf import current_runtime_settings

    rs = current_runtime_settings()
    if not rs.sync_recurring_on_migrate:
        return
    try:
        database = task_backends[rs.backend].reproq_options.database
    except Exception:
        return
    if using != database:
        return
    try:
        if "reproq_periodic_tasks" not in connections[using].introspection.table_names():
            return
        report = sync_recurring(using)
    except Exception as exc:
        logger.error("reproq: syncing @recurring schedules after migrate failed: %s", exc)
        if stdout is not None and verbosity:
            stdout.write(f"reproq: syncing @recurring schedules failed: {exc}\n")
        return
    changed = report.created or report.updated or report.disabled or report.conflicts
    if changed and stdout is not None and verbosity:
        stdout.write(report.summary() + "\n")
