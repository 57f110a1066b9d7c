"""What the dashboard, /reproq/stats/ and /reproq/metrics read from the database — cheaply.

No query here counts the whole runs table. Active states (READY, WAITING, RUNNING) are counted
exactly, through the ``(status, queue_name)`` index and the partial indexes: their cost follows
the backlog, not the history. Finished states use PostgreSQL's own statistics
(``pg_class.reltuples`` x ``pg_stats`` frequencies of ``status``), or an exact count when the
table is small. Throughput comes from the coalesced ``reproq_events`` rows of the last minutes
(index on ``created_at``). Lists (running, failures, top failing tasks) are LIMITed index scans.

Every function takes a DB-API cursor on Django's connection, so callers choose the connection
(the request's, the metrics collector's) and tests can count queries.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from django.db import connections, transaction
from django.http import HttpRequest, JsonResponse

from .access import staff_or_token
from .dashboard.conf import backend_database, configured_queues

ACTIVE_STATES = ("READY", "WAITING", "RUNNING")
FINAL_STATES = ("SUCCESSFUL", "FAILED", "CANCELLED", "EXPIRED")
ALL_STATES = ACTIVE_STATES + FINAL_STATES
EXACT_BELOW = 10_000  # tables smaller than this are counted exactly
TASK_KINDS = ("enqueued", "started", "succeeded", "failed", "retried", "cancelled", "expired")
SCHEMA_VERSION = 1


def _rows(cursor: Any) -> list[dict[str, Any]]:
    names = [c[0] for c in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _json(value: Any) -> Any:
    """jsonb from Django's connection arrives as text (Django decodes it in JSONField)."""
    return json.loads(value) if isinstance(value, str | bytes) else value


def _iso(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


# --------------------------------------------------------------------------- counts


# Which queues have rows in each active state: a loose index scan of (status, queue_name), one
# index probe per (state, queue); then each pair counted up to a cap, so that a backlog of
# millions costs no more than one of ten thousand.
ACTIVE_COUNTS = """
WITH RECURSIVE pairs AS (
    SELECT s.status, (SELECT r.queue_name FROM reproq_task_runs r WHERE r.status = s.status
                      ORDER BY r.queue_name LIMIT 1) AS queue_name
    FROM unnest(ARRAY['READY', 'WAITING', 'RUNNING']) AS s(status)
    UNION ALL
    SELECT p.status, (SELECT r.queue_name FROM reproq_task_runs r
                      WHERE r.status = p.status AND r.queue_name > p.queue_name
                      ORDER BY r.queue_name LIMIT 1)
    FROM pairs p WHERE p.queue_name IS NOT NULL
)
SELECT p.queue_name, p.status,
       (SELECT count(*) FROM (SELECT 1 FROM reproq_task_runs r
                              WHERE r.status = p.status AND r.queue_name = p.queue_name
                              LIMIT %(cap)s) c) AS n
FROM pairs p WHERE p.queue_name IS NOT NULL
"""
BLOCKED_COUNTS = """
WITH b AS (SELECT queue_name FROM reproq_task_runs WHERE blocked AND status = 'WAITING'
           LIMIT %(cap)s)
SELECT queue_name, count(*) AS n, (SELECT count(*) FROM b) AS total FROM b GROUP BY queue_name
"""


def _empty_counts() -> dict[str, Any]:
    return {**dict.fromkeys((*ACTIVE_STATES, "BLOCKED"), 0), "estimated": set()}


TABLE_STATS = """
SELECT c.reltuples::float8 AS rows, s.attname::text, s.most_common_vals::text::text[] AS vals,
       s.most_common_freqs AS freqs, s.n_distinct::float8, s.null_frac::float8
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_stats s ON s.schemaname = n.nspname AND s.tablename = c.relname
                     AND s.attname IN ('status', 'queue_name', 'blocked')
WHERE c.oid = 'reproq_task_runs'::regclass
"""


class TableStats:
    """PostgreSQL's statistics of the runs table (kept by autovacuum's ANALYZE), read once:
    the row estimate and the value frequencies of status, queue_name and blocked — what the
    planner itself would use to estimate a filtered count."""

    def __init__(self, cursor: Any) -> None:
        self.cursor = cursor
        self.loaded = False
        self.rows = -1.0
        self.columns: dict[str, tuple[dict[str, float], float, float]] = {}

    def load(self) -> TableStats:
        if not self.loaded:
            self.cursor.execute(TABLE_STATS)
            for rows, att, vals, freqs, n_distinct, null_frac in self.cursor.fetchall():
                self.rows = float(rows if rows is not None else -1)
                if att:
                    self.columns[att] = (dict(zip(vals or [], map(float, freqs or []),
                                                  strict=False)),
                                         float(n_distinct or 0), float(null_frac or 0))
            self.loaded = True
        return self

    def freq(self, column: str, value: str) -> float | None:
        """Estimated fraction of rows with column = value (None: no statistics yet)."""
        col = self.load().columns.get(column)
        if col is None:
            return None
        mcv, n_distinct, null_frac = col
        if value in mcv:
            return mcv[value]
        rest = max(1.0 - sum(mcv.values()) - null_frac, 0.0)
        distinct = n_distinct if n_distinct > 0 else -n_distinct * max(self.rows, 1.0)
        return rest / max(distinct - len(mcv), 1.0)

    def estimate(self, **where: str) -> int | None:
        """Rows matching every column = value, assuming independence (as the planner does)."""
        if self.load().rows < 0:
            return None
        fraction = 1.0
        for column, value in where.items():
            f = self.freq(column, value)
            if f is None:
                return None
            fraction *= f
        return round(self.rows * fraction)


def active_counts(cursor: Any, cap: int = EXACT_BELOW, table: TableStats | None = None
                  ) -> dict[str, dict[str, Any]]:
    """{queue: {READY, WAITING, BLOCKED, RUNNING, "estimated": {states}}}.

    Exact up to `cap` runs per queue and state (BLOCKED: WAITING runs parked on a full
    concurrency slot, part of WAITING); past the cap, the planner's estimate for that queue and
    state (never below the cap), and the state is listed in "estimated".
    """
    table = table or TableStats(cursor)
    cursor.execute(ACTIVE_COUNTS, {"cap": cap + 1})
    out: dict[str, dict[str, Any]] = {}
    over: list[tuple[str, str]] = []
    for queue, status, n in cursor.fetchall():
        out.setdefault(queue, _empty_counts())[status] = int(n)
        if n > cap:
            over.append((queue, status))
    for queue, status in over:
        estimate = table.estimate(status=status, queue_name=queue) or 0
        out[queue][status] = max(estimate, cap + 1)
        out[queue]["estimated"].add(status)
    cursor.execute(BLOCKED_COUNTS, {"cap": cap + 1})
    rows = cursor.fetchall()
    scale = 1.0
    if rows and int(rows[0][2]) > cap:
        total = max(table.estimate(blocked="t") or table.estimate(blocked="true") or 0,
                    cap + 1)
        scale = total / (cap + 1)
    for queue, n, _ in rows:
        counts = out.setdefault(queue, _empty_counts())
        counts["BLOCKED"] = round(int(n) * scale)
        if scale != 1.0:
            counts["estimated"].add("BLOCKED")
    return out


def status_totals(cursor: Any, active: dict[str, dict[str, Any]],
                  table: TableStats | None = None) -> dict[str, Any]:
    """Runs by status: {"total": {count, estimated}, "by_status": {STATUS: {count, estimated}}}.

    Small tables are counted exactly (a count over at most EXACT_BELOW rows); larger ones use
    the planner's statistics for finished states, which autovacuum's ANALYZE keeps current.
    """
    exact_active = {s: sum(q[s] for q in active.values()) for s in ACTIVE_STATES}
    active_estimated = {s for q in active.values() for s in q["estimated"]}
    cursor.execute(
        "SELECT status, count(*) FROM (SELECT status FROM reproq_task_runs LIMIT %s) s "
        "GROUP BY status", [EXACT_BELOW + 1])
    sample = {status: int(n) for status, n in cursor.fetchall()}
    if sum(sample.values()) <= EXACT_BELOW:
        by_status = {s: {"count": sample.get(s, 0), "estimated": False} for s in ALL_STATES}
        by_status.update({s: {"count": n, "estimated": s in active_estimated}
                          for s, n in exact_active.items()})
        total = sum(v["count"] for v in by_status.values())
        return {"total": {"count": total, "estimated": False}, "by_status": by_status}
    table = (table or TableStats(cursor)).load()
    total_est = max(table.rows, 0.0)
    if total_est < EXACT_BELOW + 1:
        # Never analyzed (reltuples = -1) or stale: at least what we just saw.
        total_est = float(EXACT_BELOW + 1)
    freq = table.columns.get("status", ({}, 0.0, 0.0))[0]
    if not freq:
        # No statistics yet: the proportions of the first rows stand in for the table's.
        seen = sum(sample.values()) or 1
        freq = {s: n / seen for s, n in sample.items()}
    by_status = {}
    for s in ALL_STATES:
        if s in exact_active:
            by_status[s] = {"count": exact_active[s], "estimated": s in active_estimated}
        else:
            by_status[s] = {"count": round(total_est * float(freq.get(s, 0.0))),
                            "estimated": True}
    total = max(round(total_est), sum(v["count"] for v in by_status.values()))
    return {"total": {"count": total, "estimated": True}, "by_status": by_status}


THROUGHPUT = """
WITH recent AS (
    SELECT queue_name, kind, created_at,
           CASE WHEN jsonb_typeof(data -> 'count') = 'number'
                THEN (data ->> 'count')::bigint ELSE 1 END AS n
    FROM reproq_events
    WHERE created_at > now() - interval '300 seconds'
    ORDER BY id DESC
    LIMIT %(cap)s
), span AS (
    SELECT count(*) AS rows, extract(epoch FROM now() - min(created_at))::float8 AS seconds
    FROM recent
)
SELECT r.queue_name, r.kind,
       coalesce(sum(r.n) FILTER (WHERE r.created_at > now() - interval '60 seconds'), 0),
       coalesce(sum(r.n), 0), max(span.rows), max(span.seconds)
FROM recent r CROSS JOIN span
WHERE r.kind = ANY(%(kinds)s)
GROUP BY r.queue_name, r.kind
"""
THROUGHPUT_CAP = 20_000


def throughput(cursor: Any, cap: int = THROUGHPUT_CAP
               ) -> tuple[dict[str, dict[str, dict[str, int]]], bool]:
    """({queue: {kind: {"1m": n, "5m": n}}}, estimated) from the coalesced events of the last
    5 minutes: at most the newest `cap` event rows are read (an index scan backwards); when
    they cover less than the window, the sums are scaled up and flagged as estimated."""
    cursor.execute(THROUGHPUT, {"cap": cap, "kinds": list(TASK_KINDS)})
    out: dict[str, dict[str, dict[str, int]]] = {}
    estimated = False
    for queue, kind, last1, last5, rows, seconds in cursor.fetchall():
        last1, last5 = int(last1), int(last5)
        if rows >= cap and seconds:
            estimated = True
            covered = max(float(seconds), 0.001)
            last5 = round(last5 * max(300.0 / covered, 1.0))
            last1 = round(last1 * max(60.0 / covered, 1.0))
        out.setdefault(queue, {})[kind] = {"1m": last1, "5m": last5}
    return out, estimated


# --------------------------------------------------------------------------- lists


def workers(cursor: Any) -> list[dict[str, Any]]:
    cursor.execute("""
        SELECT w.id, w.hostname, w.pid, w.queues, w.concurrency, w.server, w.version,
               w.started_at, w.last_seen_at, w.leader_since,
               extract(epoch FROM now() - w.last_seen_at)::float8 AS seen_ago,
               coalesce(r.running, 0) AS running
        FROM reproq_workers w
        LEFT JOIN (SELECT lease_owner, count(*) AS running FROM reproq_task_runs
                   WHERE status = 'RUNNING' GROUP BY lease_owner) r ON r.lease_owner = w.id
        ORDER BY w.started_at, w.id
        LIMIT 500
    """)
    rows = _rows(cursor)
    for row in rows:
        row["queues"] = _json(row["queues"])
        row["is_leader"] = row["leader_since"] is not None
        row["seen_ago"] = round(float(row["seen_ago"] or 0), 3)
    return rows


def queue_controls(cursor: Any) -> list[dict[str, Any]]:
    cursor.execute("SELECT queue_name, paused, reason, updated_at, updated_by "
                   "FROM reproq_queue_controls ORDER BY queue_name LIMIT 1000")
    return _rows(cursor)


def schedules(cursor: Any, limit: int = 100) -> dict[str, Any]:
    cursor.execute("SELECT count(*), count(*) FILTER (WHERE enabled) FROM reproq_periodic_tasks")
    count, enabled = cursor.fetchone()
    cursor.execute("""
        SELECT id, name, cron_expr, timezone, task_path, queue_name, enabled, next_run_at,
               last_run_at, last_run_id, misfire_policy, overlap_policy, source
        FROM reproq_periodic_tasks
        ORDER BY enabled DESC, next_run_at NULLS LAST, name
        LIMIT %s
    """, [limit])
    return {"count": int(count), "enabled": int(enabled), "items": _rows(cursor)}


def running(cursor: Any, limit: int = 50) -> list[dict[str, Any]]:
    """The longest-running runs (partial index on RUNNING rows)."""
    cursor.execute("""
        SELECT id, task_path, queue_name, priority, attempts, max_attempts, lease_owner,
               leased_until, started_at, last_attempted_at, cancel_requested,
               extract(epoch FROM now() - last_attempted_at)::float8 AS running_for
        FROM reproq_task_runs
        WHERE status = 'RUNNING'
        ORDER BY last_attempted_at NULLS LAST, id
        LIMIT %s
    """, [limit])
    rows = _rows(cursor)
    for row in rows:
        row["running_for"] = round(float(row["running_for"] or 0), 3)
    return rows


def recent_failures(cursor: Any, limit: int = 20, traceback_chars: int = 8000
                    ) -> list[dict[str, Any]]:
    """The latest FAILED runs with their last error (the tail of its traceback)."""
    cursor.execute("""
        SELECT id, task_path, queue_name, attempts, max_attempts, finished_at, status_reason,
               left(args::text, 1000) AS args, left(kwargs::text, 1000) AS kwargs,
               errors -> -1 ->> 'exception_class_path' AS exception,
               right(errors -> -1 ->> 'traceback', %s) AS traceback,
               jsonb_array_length(errors) AS error_count
        FROM reproq_task_runs
        WHERE status = 'FAILED' AND finished_at IS NOT NULL
        ORDER BY finished_at DESC
        LIMIT %s
    """, [traceback_chars, limit])
    return _rows(cursor)


def top_failing(cursor: Any, hours: int = 24, sample: int = 1000, limit: int = 10
                ) -> list[dict[str, Any]]:
    """Tasks with the most failures among the latest `sample` failures of the last `hours`."""
    cursor.execute("""
        SELECT task_path, count(*) AS failures, max(finished_at) AS last_failed_at
        FROM (SELECT task_path, finished_at FROM reproq_task_runs
              WHERE status = 'FAILED' AND finished_at IS NOT NULL
                AND finished_at > now() - make_interval(hours => %s)
              ORDER BY finished_at DESC LIMIT %s) f
        GROUP BY task_path
        ORDER BY failures DESC, task_path
        LIMIT %s
    """, [hours, sample, limit])
    return _rows(cursor)


def last_event_id(cursor: Any) -> int:
    cursor.execute("SELECT coalesce(max(id), 0) FROM reproq_events")
    return int(cursor.fetchone()[0])


# --------------------------------------------------------------------------- assembled


def queue_table(active: dict[str, dict[str, int]], controls: list[dict[str, Any]],
                rates: dict[str, dict[str, dict[str, int]]]) -> list[dict[str, Any]]:
    """One row per queue: configured queues, plus any queue that has rows, controls or events."""
    paused = {c["queue_name"]: c for c in controls}
    names = set(configured_queues()) | set(active) | set(paused) | set(rates)
    names.discard("")
    table = []
    for name in sorted(names):
        counts = active.get(name, {})
        rate = rates.get(name, {})

        def r(kind: str, window: str, rate: dict[str, dict[str, int]] = rate) -> int:
            return int(rate.get(kind, {}).get(window, 0))

        control = paused.get(name)
        table.append({
            "name": name,
            "estimated": sorted(counts.get("estimated", ())),
            "ready": counts.get("READY", 0),
            "waiting": counts.get("WAITING", 0),
            "blocked": counts.get("BLOCKED", 0),
            "running": counts.get("RUNNING", 0),
            "paused": bool(control and control["paused"]),
            "pause_reason": (control or {}).get("reason", "") if control and control["paused"]
            else "",
            "enqueued_1m": r("enqueued", "1m"),
            "succeeded_1m": r("succeeded", "1m"),
            "failed_1m": r("failed", "1m"),
            "succeeded_5m": r("succeeded", "5m"),
            "failed_5m": r("failed", "5m"),
            "retried_5m": r("retried", "5m"),
            "throughput_per_minute": round((r("succeeded", "5m") + r("failed", "5m")) / 5, 2),
        })
    return table


@contextmanager
def reading(alias: str) -> Iterator[Any]:
    """A cursor for these reads: one transaction with JIT off. The capped counts look
    expensive to the planner (a subplan per queue), and compiling them would cost ten times
    what running them does."""
    with transaction.atomic(using=alias), connections[alias].cursor() as cursor:
        cursor.execute("SET LOCAL jit = off")
        yield cursor


def collect(alias: str | None = None, *, lists: bool = True) -> dict[str, Any]:
    """The stats document (schema: docs/stats.md); `lists=False` skips running/failures."""
    alias = alias or backend_database()
    began = time.perf_counter()
    with reading(alias) as cursor:
        table = TableStats(cursor)
        active = active_counts(cursor, table=table)
        totals = status_totals(cursor, active, table)
        rates, rates_estimated = throughput(cursor)
        controls = queue_controls(cursor)
        worker_rows = workers(cursor)
        sched = schedules(cursor)
        failing = top_failing(cursor)
        last_id = last_event_id(cursor)
        extra: dict[str, Any] = {}
        if lists:
            extra["running"] = running(cursor)
            extra["recent_failures"] = recent_failures(cursor)
    leader = next((w for w in worker_rows if w["is_leader"]), None)
    doc = {
        "schema": SCHEMA_VERSION,
        "generated_at": datetime.now(UTC).isoformat(),
        "database": alias,
        "runs": totals,
        "queues": queue_table(active, controls, rates),
        "throughput_estimated": rates_estimated,
        "workers": {"count": len(worker_rows),
                    "leader": ({"id": leader["id"], "since": _iso(leader["leader_since"])}
                               if leader else None),
                    "items": worker_rows},
        "schedules": sched,
        "queue_controls": controls,
        "top_failing_tasks": failing,
        "events": {"last_id": last_id},
        **extra,
    }
    doc["query_ms"] = round((time.perf_counter() - began) * 1000, 3)
    return doc


@staff_or_token()
async def stats_view(request: HttpRequest) -> JsonResponse:
    """GET /reproq/stats/: the stats document as JSON (docs/stats.md)."""
    from asgiref.sync import sync_to_async
    from django.core.serializers.json import DjangoJSONEncoder

    lists = request.GET.get("lists", "0") in {"1", "true", "yes"}
    doc = await sync_to_async(collect)(lists=lists)
    return JsonResponse(doc, encoder=DjangoJSONEncoder,
                        headers={"Cache-Control": "no-store"})
