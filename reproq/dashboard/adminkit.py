"""Admin building blocks that stay fast on millions of task runs.

* `EstimatedCountPaginator`: no ``COUNT(*)`` over the table. Unfiltered: ``pg_class.reltuples``
  (exact count below 10,000 rows). Filtered: a count capped at 10,000 rows, and past the cap
  the planner's row estimate for the filtered query (EXPLAIN), never below the cap.
* List filters that never scan the table for their choices: queues from settings and queue
  controls, task paths by a loose index scan over ``(task_path, status)`` (one index probe per
  distinct path), lease owners from the live workers.
* `search_runs`: a number finds that id; text matches task paths (through the same short
  distinct list) and becomes an indexed ``task_path IN (...)``.
"""

from __future__ import annotations

import json
from typing import Any

from django.contrib import admin
from django.core.paginator import Paginator
from django.db import connections
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.functional import cached_property

from .conf import configured_queues

CAP = 10_000
TASK_PATHS_LIMIT = 500

DISTINCT_TASK_PATHS = """
WITH RECURSIVE paths AS (
    (SELECT task_path FROM reproq_task_runs ORDER BY task_path LIMIT 1)
    UNION ALL
    SELECT (SELECT r.task_path FROM reproq_task_runs r WHERE r.task_path > p.task_path
            ORDER BY r.task_path LIMIT 1)
    FROM paths p WHERE p.task_path IS NOT NULL
)
SELECT task_path FROM paths WHERE task_path IS NOT NULL LIMIT %s
"""


def table_estimate(model: Any, using: str) -> int:
    """pg_class.reltuples of the model's table (-1 when never analyzed)."""
    with connections[using].cursor() as cursor:
        cursor.execute("SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass",
                       [model._meta.db_table])
        row = cursor.fetchone()
    return int(row[0]) if row else -1


def planner_estimate(queryset: QuerySet[Any]) -> int:
    try:
        plan = json.loads(queryset.order_by().explain(format="json"))
        return int(plan[0]["Plan"]["Plan Rows"])
    except Exception:
        return 0


def estimated_count(queryset: QuerySet[Any], cap: int = CAP) -> int:
    """The number of rows of `queryset`, without counting more than `cap` rows."""
    query = queryset.query
    if not query.where and not query.distinct and not query.combinator:
        estimate = table_estimate(queryset.model, queryset.db)
        if estimate > cap:
            return estimate
    counted = queryset.order_by()[: cap + 1].count()
    if counted <= cap:
        return counted
    return max(planner_estimate(queryset), counted)


class EstimatedCountPaginator(Paginator):
    """Paginator whose count comes from `estimated_count` (pages past the estimate are empty
    rather than errors)."""

    @cached_property
    def count(self) -> int:  # type: ignore[override]
        return estimated_count(self.object_list)

    def validate_number(self, number: Any) -> int:
        try:
            return super().validate_number(number)
        except Exception:
            return max(int(number), 1) if str(number).isdigit() else 1


def distinct_task_paths(using: str = "default", limit: int = TASK_PATHS_LIMIT) -> list[str]:
    with connections[using].cursor() as cursor:
        cursor.execute(DISTINCT_TASK_PATHS, [limit])
        return [row[0] for row in cursor.fetchall()]


class QueueFilter(admin.SimpleListFilter):
    title = "queue"
    parameter_name = "queue"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        from ..models import QueueControl

        names = set(configured_queues())
        names.update(QueueControl.objects.values_list("queue_name", flat=True)[:1000])
        return [(n, n) for n in sorted(names)]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        return queryset.filter(queue_name=value) if value else queryset


class TaskPathFilter(admin.SimpleListFilter):
    title = "task"
    parameter_name = "task"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        paths = distinct_task_paths(model_admin.model.objects.db)
        return [(p, p) for p in paths]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        return queryset.filter(task_path=value) if value else queryset


class LeaseFilter(admin.SimpleListFilter):
    """Runs by lease: held by a live worker, held but expired, or by one worker. Leases exist
    only on RUNNING rows, so each choice filters on status first (partial index)."""

    title = "lease"
    parameter_name = "lease"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        from ..models import Worker

        choices = [("held", "held (running)"), ("expired", "expired (awaiting reclaim)")]
        for worker_id in Worker.objects.order_by("id").values_list("id", flat=True)[:200]:
            choices.append((f"worker:{worker_id}", f"by {worker_id}"))
        return choices

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        from django.db.models.functions import Now

        value = self.value()
        if not value:
            return queryset
        running = queryset.filter(status="RUNNING")
        if value == "held":
            return running.filter(lease_owner__isnull=False)
        if value == "expired":
            return running.filter(leased_until__lt=Now())
        if value.startswith("worker:"):
            return running.filter(lease_owner=value.removeprefix("worker:"))
        return queryset


def search_runs(queryset: QuerySet[Any], term: str) -> QuerySet[Any]:
    """Index-friendly search: '#123' or '123' -> that id; otherwise task paths containing the
    term (case-insensitive), resolved against the distinct task paths first."""
    from ..ids import parse_id

    term = term.strip()
    if not term:
        return queryset
    digits = term.removeprefix("#")
    if digits.isascii() and digits.isdigit():  # an id, or a number no run can have
        try:
            return queryset.filter(pk=parse_id(digits))
        except ValueError:
            return queryset.none()
    needle = term.lower()
    paths = [p for p in distinct_task_paths(queryset.db) if needle in p.lower()]
    return queryset.filter(task_path__in=paths) if paths else queryset.none()
