"""``manage.py reproq replay (--id N ... | --failed-since DURATION [--task P] [--queue Q]
[--limit N]) [--failed-only]``: enqueue new copies of runs (see `reproq.dashboard.ops`)."""

from __future__ import annotations

import argparse
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from .argtypes import (
    add_database_option,
    add_run_filters,
    database_errors,
    duration_seconds,
    positive_int,
    run_id,
)

RECENT_FAILED = """
SELECT id FROM reproq_task_runs
WHERE status = ANY(%(states)s::text[]) AND finished_at IS NOT NULL
  AND finished_at >= now() - make_interval(secs => %(since)s)
  AND (%(queues)s::text[] IS NULL OR queue_name = ANY(%(queues)s::text[]))
  AND (%(tasks)s::text[] IS NULL OR task_path = ANY(%(tasks)s::text[]))
ORDER BY finished_at DESC
LIMIT %(limit)s
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", dest="ids", type=run_id, action="append",
                       help="run id to copy (repeatable)")
    which.add_argument("--failed-since", type=duration_seconds, metavar="DURATION",
                       help="copy the runs that failed, were cancelled or expired within this "
                            "long (15m, 12h, 7d ...)")
    add_run_filters(parser, when="with --failed-since: ")
    parser.add_argument("--limit", type=positive_int, default=100,
                        help="with --failed-since: at most this many, newest first (default 100)")
    parser.add_argument("--failed-only", action="store_true",
                        help="with --id: copy only runs that failed, were cancelled or expired")
    parser.add_argument("--dry-run", action="store_true", help="list the runs, copy nothing")
    add_database_option(parser)


def handle(command: BaseCommand, **options: Any) -> None:
    from django.db import connections

    from ..control import _database
    from ..dashboard.ops import MAX_IDS, RETRYABLE, replay_runs

    database = _database(options.get("database"))
    ids = options.get("ids") or []
    only_failed = bool(options["failed_only"])
    if options.get("failed_since") is not None:
        queues = options["queues"]
        if options["limit"] > MAX_IDS:
            raise CommandError(f"--limit is at most {MAX_IDS}")
        with database_errors("selecting failed runs"), connections[database].cursor() as cursor:
            cursor.execute(RECENT_FAILED, {
                "states": list(RETRYABLE), "since": options["failed_since"],
                "queues": queues or None, "tasks": options["tasks"] or None,
                "limit": options["limit"]})
            ids = [int(r[0]) for r in cursor.fetchall()]
        only_failed = True
    elif options["tasks"] or options["queues"]:
        raise CommandError("--task and --queue select runs with --failed-since, not with --id")
    if options["dry_run"]:
        command.stdout.write(f"would copy {len(ids)} runs: {', '.join(map(str, ids)) or '-'}")
        return
    if not ids:
        command.stdout.write("no runs to copy")
        return
    try:
        with database_errors("replay"):
            outcome = replay_runs(ids, only_failed=only_failed, database=database)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    for old, new in sorted(outcome.created.items()):
        command.stdout.write(f"{old} -> {new}")
    command.stdout.write(outcome.summary("copied"))
    missing = outcome.requested - outcome.eligible
    if options.get("ids") and missing:
        raise CommandError(f"{missing} of the given runs do not exist"
                           + (" or did not fail" if only_failed else ""))
