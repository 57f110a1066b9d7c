"""The reproq schema: task runs, workers, periodic schedules, rate limits, queue controls, events.

The hot paths (enqueue, claim, heartbeat, reclaim, complete) use raw SQL from `reproq.sql`;
these models give the admin, management commands and user-facing reads a
typed view of the same tables, and own the migrations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db import models
from django.db.models import Q
from django.db.models.functions import Now

from . import storedjson
from .states import ACTIVE, RawStatus

ACTIVE_Q = Q(status__in=[s.value for s in ACTIVE])


class StoredJSONField(models.JSONField):
    """A JSONField that reads JSON Python cannot load (rows written by hand) as its text, marked
    `storedjson.Undecodable`, so the admin and other ORM readers show such a row instead of a
    500. Migrations see a plain JSONField: the column is the same."""

    def from_db_value(self, value: Any, expression: Any, connection: Any) -> Any:
        try:
            return super().from_db_value(value, expression, connection)
        except (ValueError, RecursionError) as exc:
            return storedjson.Undecodable(value, storedjson.reason_of(exc))

    def deconstruct(self) -> Any:
        name, _path, args, kwargs = super().deconstruct()
        return name, "django.db.models.JSONField", args, kwargs


class TaskRun(models.Model):
    """One enqueued task and everything that happened to it (one row per `TaskResult`)."""

    id = models.BigAutoField(primary_key=True)
    backend_alias = models.CharField(max_length=64, default="default")
    task_path = models.TextField()
    queue_name = models.CharField(max_length=64, default="default")
    priority = models.SmallIntegerField(default=0)
    status = models.CharField(max_length=10, choices=RawStatus.choices, default=RawStatus.READY)
    # Claim order: microseconds since the epoch of eligibility minus priority x aging factor.
    sort_key = models.BigIntegerField()
    args = StoredJSONField(default=list)
    kwargs = StoredJSONField(default=dict)
    spec_hash = models.CharField(max_length=64, null=True, blank=True)
    enqueued_at = models.DateTimeField()
    run_after = models.DateTimeField()
    started_at = models.DateTimeField(null=True, blank=True)
    last_attempted_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    attempts = models.IntegerField(default=0)
    max_attempts = models.IntegerField(default=3)
    timeout_seconds = models.IntegerField(default=900)
    lease_owner = models.CharField(max_length=64, null=True, blank=True)
    leased_until = models.DateTimeField(null=True, blank=True)
    worker_ids = StoredJSONField(default=list)
    errors = StoredJSONField(default=list)
    return_value = StoredJSONField(null=True, blank=True)
    metadata = StoredJSONField(default=dict)
    lock_key = models.TextField(null=True, blank=True)
    concurrency_key = models.TextField(null=True, blank=True)
    concurrency_limit = models.IntegerField(null=True, blank=True)
    # The concurrency semaphore this run needs: "l:<lock_key>" (limit 1) or "c:<key>" (limit N).
    sem_key = models.TextField(null=True, blank=True)
    sem_limit = models.IntegerField(null=True, blank=True)
    # WAITING because its semaphore was full at claim time; made READY when a slot frees.
    blocked = models.BooleanField(default=False)
    cancel_requested = models.BooleanField(default=False)
    expires_at = models.DateTimeField(null=True, blank=True)
    status_reason = models.TextField(blank=True, default="")
    parent_id = models.BigIntegerField(null=True, blank=True)
    workflow_id = models.BigIntegerField(null=True, blank=True)
    # Workflows (reproq.workflows): a run WAITING for `pending_deps` upstream runs to succeed
    # (run_after = 9999-12-31 until then); `receives` says whether it gets their return values
    # ("result": the one upstream's, "results": a list in group order) as its first argument.
    # `has_dependents` marks an upstream: its final state releases or cancels its dependents.
    pending_deps = models.IntegerField(default=0, db_default=0)
    has_dependents = models.BooleanField(default=False, db_default=False)
    receives = models.CharField(max_length=8, blank=True, default="", db_default="")
    code_ref = models.TextField(blank=True, default="")
    pip_lock_hash = models.TextField(blank=True, default="")

    class Meta:
        db_table = "reproq_task_runs"
        verbose_name = "task run"
        indexes = [
            # The claim: an index range scan per queue in sort_key order over READY rows only.
            models.Index(fields=["queue_name", "sort_key"], condition=Q(status="READY"),
                         name="reproq_runs_claim"),
            # Promotion of deferred rows whose run_after has come.
            models.Index(fields=["run_after"], condition=Q(status="WAITING", blocked=False),
                         name="reproq_runs_waiting"),
            # Blocked runs of one semaphore, in claim order (unblocked one per freed slot).
            models.Index(fields=["sem_key", "sort_key"], condition=Q(blocked=True),
                         name="reproq_runs_blocked"),
            # Reclaim of expired leases, and this process's heartbeat.
            models.Index(fields=["leased_until"], condition=Q(status="RUNNING"),
                         name="reproq_runs_leases"),
            models.Index(fields=["status", "queue_name"], name="reproq_runs_status_queue"),
            models.Index(fields=["task_path", "status"], name="reproq_runs_task_status"),
            models.Index(fields=["finished_at"], condition=Q(finished_at__isnull=False),
                         name="reproq_runs_finished"),
        ]
        constraints = [
            # Dedup: at most one active run per spec; enqueue uses ON CONFLICT against it.
            models.UniqueConstraint(fields=["spec_hash"], condition=ACTIVE_Q,
                                    name="reproq_runs_active_spec"),
            models.CheckConstraint(condition=Q(status__in=[s.value for s in RawStatus]),
                                   name="reproq_runs_status_valid"),
            models.CheckConstraint(condition=Q(priority__gte=-100, priority__lte=100),
                                   name="reproq_runs_priority_range"),
            models.CheckConstraint(condition=Q(max_attempts__gte=1),
                                   name="reproq_runs_max_attempts_positive"),
            models.CheckConstraint(condition=Q(attempts__gte=0),
                                   name="reproq_runs_attempts_nonnegative"),
            models.CheckConstraint(condition=Q(timeout_seconds__gte=1),
                                   name="reproq_runs_timeout_positive"),
            models.CheckConstraint(condition=Q(pending_deps__gte=0),
                                   name="reproq_runs_pending_deps_nonnegative"),
            models.CheckConstraint(condition=Q(receives__in=["", "result", "results"]),
                                   name="reproq_runs_receives_valid"),
            # A limit of 0 holds its key's runs back (a paused key); a negative one, written by
            # hand, means nothing.
            models.CheckConstraint(condition=Q(sem_limit__isnull=True) | Q(sem_limit__gte=0),
                                   name="reproq_runs_sem_limit_nonnegative"),
            models.CheckConstraint(condition=Q(concurrency_limit__isnull=True)
                                   | Q(concurrency_limit__gte=0),
                                   name="reproq_runs_concurrency_limit_nonnegative"),
        ]

    def __str__(self) -> str:
        return f"#{self.pk} {self.task_path} [{self.status}]"


class RunEdge(models.Model):
    """One dependency of a workflow: `downstream_id` waits for `upstream_id` (position: the
    upstream's place in its group, the order of the results a chord callback receives)."""

    upstream_id = models.BigIntegerField()
    downstream_id = models.BigIntegerField()
    position = models.IntegerField(default=0)

    class Meta:
        db_table = "reproq_run_edges"
        constraints = [models.UniqueConstraint(fields=["upstream_id", "downstream_id"],
                                               name="reproq_edge_once")]
        indexes = [models.Index(fields=["downstream_id", "position"], name="reproq_edges_down")]


class Worker(models.Model):
    """A live runtime (web process or `manage.py reproq worker`), renewed by its heartbeat."""

    id = models.CharField(max_length=64, primary_key=True)
    hostname = models.CharField(max_length=255)
    pid = models.IntegerField()
    queues = models.JSONField(default=list)
    concurrency = models.IntegerField()
    server = models.CharField(max_length=64, blank=True, default="")
    version = models.CharField(max_length=32, blank=True, default="")
    started_at = models.DateTimeField()
    last_seen_at = models.DateTimeField()
    leader_since = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "reproq_workers"

    def __str__(self) -> str:
        return f"{self.id} ({self.hostname}:{self.pid})"


class QueueControl(models.Model):
    """Per-queue switches, read at claim time: paused queues are not claimed from."""

    queue_name = models.CharField(max_length=64, primary_key=True)
    paused = models.BooleanField(default=False)
    reason = models.TextField(blank=True, default="")
    updated_at = models.DateTimeField(auto_now=True)
    updated_by = models.CharField(max_length=150, blank=True, default="")

    class Meta:
        db_table = "reproq_queue_controls"

    def __str__(self) -> str:
        return f"{self.queue_name} ({'paused' if self.paused else 'running'})"


class ConcurrencySlot(models.Model):
    """Running count of one semaphore key; the claim increments it atomically, triggers on the
    runs table decrement it whenever a run leaves RUNNING (however that happens)."""

    key = models.TextField(primary_key=True)
    running = models.IntegerField(default=0)
    last_grant = models.IntegerField(default=0)

    class Meta:
        db_table = "reproq_concurrency"

    def __str__(self) -> str:
        return f"{self.key}: {self.running} running"


class RateLimit(models.Model):
    """A token bucket keyed ``task:<path>``, ``queue:<name>`` or ``global``, enforced at claim."""

    key = models.CharField(max_length=255, unique=True)
    rate = models.IntegerField(help_text="tokens added per period")
    period_seconds = models.FloatField(default=1.0)
    burst = models.IntegerField(help_text="bucket capacity")
    tokens = models.FloatField(default=0.0)
    last_grant = models.IntegerField(default=0)
    refreshed_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        db_table = "reproq_rate_limits"
        constraints = [
            models.CheckConstraint(condition=Q(rate__gte=1), name="reproq_rate_limit_positive"),
            models.CheckConstraint(condition=Q(period_seconds__gt=0),
                                   name="reproq_rate_period_positive"),
            models.CheckConstraint(condition=Q(burst__gte=1), name="reproq_rate_burst_positive"),
        ]

    def __str__(self) -> str:
        return f"{self.key}: {self.rate}/{self.period_seconds}s"


@dataclass(frozen=True)
class ScheduleRules:
    """What `PeriodicTask.clean()` and ``save()`` apply. They live in `reproq.schedules` (they
    need the task backends, and that module imports this one to sync rows), which
    `reproq.apps.ReproqConfig.ready` installs here with `install_schedule_rules`."""

    validate: Callable[[PeriodicTask], None]
    prepare_for_save: Callable[[PeriodicTask], None]


_schedule_rules: ScheduleRules | None = None


def install_schedule_rules(rules: ScheduleRules) -> None:
    global _schedule_rules
    _schedule_rules = rules


def _rules() -> ScheduleRules:
    if _schedule_rules is None:
        raise ImproperlyConfigured("reproq's schedule rules are not installed: add 'reproq' to "
                                   "INSTALLED_APPS (its ready() installs them)")
    return _schedule_rules


class PeriodicTask(models.Model):
    """A cron schedule; the beat leader enqueues each due fire exactly once."""

    class Misfire(models.TextChoices):
        RUN_ONCE = "run_once", "Run once after downtime"
        SKIP = "skip", "Skip to the next future fire"

    class Overlap(models.TextChoices):
        ALLOW = "allow", "Allow overlapping runs"
        SKIP = "skip", "Skip while the previous run is active"

    name = models.CharField(max_length=200, unique=True)
    cron_expr = models.CharField(max_length=120)
    timezone = models.CharField(max_length=64, blank=True, default="")
    task_path = models.TextField()
    args = StoredJSONField(default=list, blank=True)
    kwargs = StoredJSONField(default=dict, blank=True)
    queue_name = models.CharField(max_length=64, default="default")
    priority = models.SmallIntegerField(default=0)
    max_attempts = models.IntegerField(null=True, blank=True)
    enabled = models.BooleanField(default=True)
    misfire_policy = models.CharField(max_length=16, choices=Misfire.choices,
                                      default=Misfire.RUN_ONCE)
    overlap_policy = models.CharField(max_length=16, choices=Overlap.choices,
                                      default=Overlap.ALLOW)
    next_run_at = models.DateTimeField(null=True, blank=True)
    last_run_at = models.DateTimeField(null=True, blank=True)
    last_run_id = models.BigIntegerField(null=True, blank=True)
    source = models.CharField(max_length=16, default="db",
                              help_text="db (admin/ORM) or code (@recurring)")

    class Meta:
        db_table = "reproq_periodic_tasks"
        indexes = [models.Index(fields=["next_run_at"], condition=Q(enabled=True),
                                name="reproq_periodic_due")]

    def __str__(self) -> str:
        return f"{self.name} ({self.cron_expr})"

    def clean(self) -> None:
        """Invalid cron expressions, time zones and task paths, by field (see
        `reproq.schedules.validate_schedule`)."""
        _rules().validate(self)

    def save(self, *args: Any, **kwargs: Any) -> None:
        """Refuse invalid schedules (ValidationError) and keep next_run_at right; a due
        next_run_at is never moved (run now: set next_run_at to now)."""
        _rules().prepare_for_save(self)
        super().save(*args, **kwargs)


class ScheduleTick(models.Model):
    """One fire of a schedule, written in the enqueue's transaction: the exactly-once record."""

    schedule = models.ForeignKey(PeriodicTask, on_delete=models.CASCADE, related_name="ticks")
    scheduled_for = models.DateTimeField()
    run_id = models.BigIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        db_table = "reproq_schedule_ticks"
        constraints = [models.UniqueConstraint(fields=["schedule", "scheduled_for"],
                                               name="reproq_tick_once")]


class Leader(models.Model):
    """The leader lease of `reproq.runtime.peers.LeasePeer` (``LEADER = "lease"``): one row per
    leadership name, held by `worker_id` until `expires_at` unless renewed."""

    name = models.TextField(primary_key=True)
    worker_id = models.CharField(max_length=64)
    elected_at = models.DateTimeField()
    expires_at = models.DateTimeField()

    class Meta:
        db_table = "reproq_leaders"

    def __str__(self) -> str:
        return f"{self.name}: {self.worker_id} until {self.expires_at}"


class Event(models.Model):
    """A state change, published for the live dashboard (SSE) by every process.

    Frequent changes (enqueued, started, succeeded) are aggregated per task and queue for each
    statement or flush (``data.count``, ``data.run_ids``); rare ones (failed, retried,
    cancelled, expired, worker and queue changes) are one row each. Rows older than
    EVENTS_RETENTION_SECONDS are pruned by the reclaim service.
    """

    id = models.BigAutoField(primary_key=True)
    created_at = models.DateTimeField(db_default=Now())
    kind = models.CharField(max_length=32)
    run_id = models.BigIntegerField(null=True, blank=True)
    task_path = models.TextField(blank=True, default="")
    queue_name = models.CharField(max_length=64, blank=True, default="")
    worker_id = models.CharField(max_length=64, blank=True, default="")
    data = models.JSONField(default=dict)

    class Meta:
        db_table = "reproq_events"
        indexes = [models.Index(fields=["created_at"], name="reproq_events_created")]

    def __str__(self) -> str:
        return f"#{self.pk} {self.kind} {self.task_path}"
