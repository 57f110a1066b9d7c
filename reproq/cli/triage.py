"""``manage.py reproq triage [--since 24h] [--task P] [--queue Q] [--limit N]``: recent runs
that failed, were cancelled or expired, grouped by task and error class, newest example first,
with the command that replays each group."""

from __future__ import annotations

import argparse
from typing import Any

from django.core.management.base import BaseCommand

from .argtypes import (
    add_database_option,
    add_run_filters,
    database_errors,
    duration_seconds,
    positive_int,
)

SAMPLE = 10_000  # newest failures looked at

TRIAGE = """
WITH recent AS (
    SELECT id, task_path, queue_name, status, finished_at,
           CASE WHEN jsonb_typeof(errors) = 'array' AND jsonb_array_length(errors) > 0
                THEN errors -> -1 END AS last_error
    FROM reproq_task_runs
    WHERE status IN ('FAILED', 'CANCELLED', 'EXPIRED') AND finished_at IS NOT NULL
      AND finished_at >= now() - make_interval(secs => %(since)s)
      AND (%(queues)s::text[] IS NULL OR queue_name = ANY(%(queues)s::text[]))
      AND (%(tasks)s::text[] IS NULL OR task_path = ANY(%(tasks)s::text[]))
    ORDER BY finished_at DESC
    LIMIT %(sample)s
)
SELECT task_path,
       CASE WHEN status = 'FAILED'
            THEN coalesce(last_error ->> 'exception_class_path', '(no error recorded)')
            ELSE status END AS error,
       count(*) AS runs, min(finished_at) AS first, max(finished_at) AS last,
       (array_agg(id ORDER BY finished_at DESC))[1] AS example_id,
       (array_agg(last_error ->> 'traceback' ORDER BY finished_at DESC))[1] AS example_traceback,
       (SELECT count(*) FROM recent) AS sampled
FROM recent
GROUP BY 1, 2
ORDER BY runs DESC, last DESC
LIMIT %(limit)s
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", type=duration_seconds, default=86400.0, metavar="DURATION",
                        help="look at runs finished within this long (default 24h)")
    add_run_filters(parser)
    parser.add_argument("--limit", type=positive_int, default=20,
                        help="groups shown (default 20)")
    add_database_option(parser)


def last_line(traceback: str | None, width: int = 160) -> str:
    lines = [line.strip() for line in (traceback or "").splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    return text if len(text) <= width else text[: width - 1] + "…"


def handle(command: BaseCommand, **options: Any) -> None:
    from django.db import connections

    from ..control import _database

    queues = options["queues"]
    since = options["since"]
    with database_errors("triage"), \
            connections[_database(options.get("database"))].cursor() as cursor:
        cursor.execute(TRIAGE, {"since": since, "queues": queues or None,
                                "tasks": options["tasks"] or None, "sample": SAMPLE,
                                "limit": options["limit"]})
        groups = cursor.fetchall()
    out = command.stdout
    window = f"{since:g}s"
    if not groups:
        out.write(f"no failed, cancelled or expired runs in the last {window}")
        return
    sampled = groups[0][7]
    out.write(f"failed, cancelled and expired runs of the last {window}"
              + (f" (the newest {SAMPLE:,})" if sampled >= SAMPLE else "") + ":")
    for task, error, runs, first, last, example, traceback, _ in groups:
        out.write("")
        out.write(f"{runs:>6}  {task}  {error}")
        out.write(f"        first {first:%Y-%m-%d %H:%M:%S}, last {last:%Y-%m-%d %H:%M:%S} UTC "
                  f"(newest: run {example})")
        line = last_line(traceback)
        if line:
            out.write(f"        {line}")
        out.write(f"        replay: python manage.py reproq replay --failed-since {window} "
                  f"--task {task}")
