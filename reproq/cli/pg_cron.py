"""``manage.py reproq pg-cron --install|--remove [--if-supported] [--dry-run]``.

The Postgres-native alternative to the beat: one pg_cron job per enabled schedule, named
``reproq:<schedule name>``, whose command is a single statement that records the tick
(schedule, minute) and inserts the run - the same exactly-once row the beat writes, so the beat
and pg_cron may even run side by side without doubling a tick. pg_cron understands 5-field
expressions evaluated in its ``cron.timezone`` (GMT by default) and never catches up missed
fires: schedules with seconds, a year field or another time zone stay on the beat (listed).

Without the pg_cron extension the command fails, or with ``--if-supported`` exits 0 with a
message (for deploy scripts that run everywhere). ``--dry-run`` prints the jobs and changes
nothing.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from .. import sql

JOB_PREFIX = "reproq:"
ALIASES = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
UTC_NAMES = {"UTC", "Etc/UTC", "GMT", "Etc/GMT", "UCT", "Etc/UCT", "Universal", "Etc/Universal",
             "Zulu", "Etc/Zulu", "GMT0", "Etc/GMT0", "GMT+0", "GMT-0", "Etc/GMT+0", "Etc/GMT-0",
             "Greenwich", "Etc/Greenwich"}

# The job's command: one statement per fire, like the beat's BEAT_FIRE but for "this minute".
FIRE_THIS_MINUTE = """
WITH s AS (
    SELECT p.id, p.name, p.task_path, p.queue_name, p.priority, p.args, p.kwargs,
           p.overlap_policy, p.last_run_id, date_trunc('minute', now()) AS fire_at,
           nextval(pg_get_serial_sequence('reproq_task_runs', 'id')) AS new_id
    FROM reproq_periodic_tasks p
    WHERE p.id = %(schedule_id)s AND p.enabled
    FOR UPDATE
), gate AS (
    SELECT s.*,
           NOT EXISTS (SELECT 1 FROM reproq_schedule_ticks t
                       WHERE t.schedule_id = s.id AND t.scheduled_for = s.fire_at)
           AND NOT (s.overlap_policy = 'skip' AND EXISTS (
                   SELECT 1 FROM reproq_task_runs r
                   WHERE r.id = s.last_run_id AND r.status IN ('READY', 'WAITING', 'RUNNING')
           )) AS launch,
           to_char(s.fire_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"+00:00"') AS label
    FROM s
), tick AS (
    INSERT INTO reproq_schedule_ticks (schedule_id, scheduled_for, run_id, created_at)
    SELECT g.id, g.fire_at, CASE WHEN g.launch THEN g.new_id END, now() FROM gate g
    ON CONFLICT (schedule_id, scheduled_for) DO NOTHING
    RETURNING schedule_id, run_id
), moved AS (
    UPDATE reproq_periodic_tasks p SET last_run_at = g.fire_at, last_run_id = g.new_id
    FROM gate g WHERE p.id = g.id AND g.launch
    RETURNING p.id
), ins AS (
    INSERT INTO reproq_task_runs (""" + sql.RUN_COLUMNS + """)
    SELECT g.new_id, %(backend)s, g.task_path, g.queue_name, g.priority, 'READY',
           (extract(epoch FROM now()) * 1000000)::bigint
               - g.priority::bigint * %(aging_us)s::bigint,
           g.args, g.kwargs, NULL, now(), now(), 0, %(max_attempts)s, %(timeout)s, '[]', '[]',
           jsonb_build_object('schedule', g.name, 'scheduled_for', g.label, 'via', 'pg_cron'),
           NULL, %(concurrency_key)s::text, %(concurrency_limit)s::int,
           CASE WHEN %(concurrency_key)s::text IS NOT NULL
                THEN 'c:' || %(concurrency_key)s::text END,
           %(concurrency_limit)s::int, false, false,
           CASE WHEN %(expires_in)s::float8 IS NULL THEN NULL
                ELSE now() + make_interval(secs => %(expires_in)s::float8) END,
           '', %(code_ref)s, %(pip_lock_hash)s
    FROM gate g JOIN tick t ON t.run_id = g.new_id
    RETURNING id, task_path, queue_name
), events AS (
    INSERT INTO reproq_events (created_at, kind, run_id, task_path, queue_name, worker_id, data)
    SELECT now(), 'enqueued', i.id, i.task_path, i.queue_name, 'pg_cron',
           jsonb_build_object('count', 1, 'run_ids', jsonb_build_array(i.id))
    FROM ins i
    RETURNING 1
)
SELECT count(pg_notify('reproq', 'r:' || i.queue_name)) AS enqueued,
       (SELECT count(*) FROM moved) AS moved, (SELECT count(*) FROM events) AS events
FROM ins i
"""


@dataclass
class Job:
    name: str
    schedule_name: str
    cron: str
    command: str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--install", action="store_true",
                        help="create or replace one pg_cron job per enabled schedule")
    action.add_argument("--remove", action="store_true", help="remove every reproq pg_cron job")
    parser.add_argument("--if-supported", action="store_true",
                        help="exit 0 with a message where the pg_cron extension is missing")
    parser.add_argument("--dry-run", action="store_true",
                        help="print what would be done and change nothing")
    parser.add_argument("--database", default=None, help="database alias (default: the "
                        "reproq backend's database)")


def pg_cron_expression(expr: str) -> str | None:
    """The 5-field form pg_cron accepts, or None (seconds, a year field, other aliases)."""
    text = " ".join(expr.split())
    text = ALIASES.get(text.lower(), text)
    return text if len(text.split(" ")) == 5 and not text.startswith("@") else None


def same_zone(schedule_tz: str, cron_tz: str) -> bool:
    if schedule_tz == cron_tz:
        return True
    return schedule_tz in UTC_NAMES and cron_tz in UTC_NAMES


def plan_jobs(connection: Any, cron_tz: str) -> tuple[list[Job], list[str]]:
    """(jobs to install, 'name: reason' of schedules left to the beat)."""
    from django.tasks import task_backends

    from ..conf import aging_factor_us, current_runtime_settings
    from ..models import PeriodicTask
    from ..runtime.beat import RunOptions

    rs = current_runtime_settings()
    backend = task_backends[rs.backend]
    run_options = RunOptions(backend)
    opts = backend.reproq_options
    jobs: list[Job] = []
    left: list[str] = []
    for p in PeriodicTask.objects.using(connection.alias).filter(enabled=True).order_by("name"):
        cron = pg_cron_expression(p.cron_expr)
        if cron is None:
            left.append(f"{p.name}: {p.cron_expr!r} needs seconds or a year field, which "
                        "pg_cron does not support")
            continue
        if not same_zone(p.timezone, cron_tz):
            left.append(f"{p.name}: its time zone {p.timezone!r} is not pg_cron's "
                        f"cron.timezone {cron_tz!r}")
            continue
        max_attempts, timeout, expires, key, limit = run_options({
            "task_path": p.task_path, "max_attempts": p.max_attempts, "args": p.args,
            "kwargs": p.kwargs, "name": p.name})
        command = connection.ops.compose_sql(FIRE_THIS_MINUTE, {
            "schedule_id": p.pk, "backend": backend.alias,
            "aging_us": aging_factor_us(rs.priority_aging_factor),
            "max_attempts": max_attempts, "timeout": timeout, "expires_in": expires,
            "concurrency_key": key, "concurrency_limit": limit,
            "code_ref": opts.code_ref, "pip_lock_hash": opts.pip_lock_hash,
        })
        jobs.append(Job(name=f"{JOB_PREFIX}{p.name}"[:200], schedule_name=p.name, cron=cron,
                        command=" ".join(command.split())))
    return jobs, left


def handle(command: BaseCommand, **options: Any) -> None:
    from django.conf import settings
    from django.db import DatabaseError, connections, transaction
    from django.tasks import task_backends

    from ..conf import current_runtime_settings

    alias = options.get("database") or task_backends[
        current_runtime_settings().backend].reproq_options.database
    if alias not in settings.DATABASES:
        raise CommandError(f"--database {alias!r} is not in DATABASES")
    connection = connections[alias]
    dry = bool(options.get("dry_run"))
    out = command.stdout.write
    with connection.cursor() as cursor:
        cursor.execute("SELECT extversion FROM pg_extension WHERE extname = 'pg_cron'")
        row = cursor.fetchone()
        dbname = connection.settings_dict["NAME"]
        if row is None:
            message = (f"the pg_cron extension is not installed in database {dbname!r}; the "
                       "reproq beat (runtime BEAT or `manage.py reproq beat`) enqueues the "
                       "schedules instead")
            if options.get("if_supported"):
                out(f"reproq pg-cron: {message}. Nothing to do.")
                return
            if not dry:
                raise CommandError(f"{message}. Install pg_cron (shared_preload_libraries = "
                                   "'pg_cron', then CREATE EXTENSION pg_cron) or pass "
                                   "--if-supported to skip it quietly.")
            out(f"reproq pg-cron (dry run): {message}.")
            cron_tz = "GMT"
        else:
            cursor.execute("SELECT coalesce(current_setting('cron.timezone', true), 'GMT')")
            cron_tz = cursor.fetchone()[0] or "GMT"
        existing: list[str] = []
        if row is not None:
            cursor.execute("SELECT jobname FROM cron.job WHERE jobname LIKE %s ORDER BY jobname",
                           [JOB_PREFIX + "%"])
            existing = [r[0] for r in cursor.fetchall()]
    prefix = "reproq pg-cron (dry run)" if dry else "reproq pg-cron"
    if options.get("remove"):
        if dry or row is None:
            out(f"{prefix}: would remove {len(existing)} jobs: {', '.join(existing) or '-'}")
            return
        with transaction.atomic(using=alias), connection.cursor() as cursor:
            cursor.execute("SELECT cron.unschedule(jobid) FROM cron.job WHERE jobname LIKE %s",
                           [JOB_PREFIX + "%"])
        out(f"{prefix}: removed {len(existing)} jobs")
        return
    jobs, left = plan_jobs(connection, cron_tz)
    stale = sorted(set(existing) - {j.name for j in jobs})
    for job in jobs:
        out(f"{prefix}: job {job.name!r} at {job.cron!r} ({cron_tz})" +
            (f"\n    {job.command}" if dry else ""))
    for name in stale:
        out(f"{prefix}: remove stale job {name!r}")
    for reason in left:
        out(f"{prefix}: left to the beat - {reason}")
    if dry or row is None:
        out(f"{prefix}: would install {len(jobs)} jobs; nothing changed")
        return
    try:
        with transaction.atomic(using=alias), connection.cursor() as cursor:
            for name in stale:
                cursor.execute("SELECT cron.unschedule(jobid) FROM cron.job WHERE jobname = %s",
                               [name])
            for job in jobs:
                cursor.execute("SELECT cron.schedule(%s, %s, %s)",
                               [job.name, job.cron, job.command])
    except DatabaseError as exc:
        raise CommandError(f"pg_cron refused the jobs (nothing changed): {exc}") from exc
    out(f"{prefix}: installed {len(jobs)} jobs, removed {len(stale)} stale ones; pg_cron never "
        "catches up missed fires")
