"""``manage.py reproq prune --older-than DURATION [--status S] [--queue Q] [--task PATH]
[--batch N] [--dry-run]``: delete finished runs (see `reproq.retention`)."""

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
)


def _state(text: str) -> str:
    from ..retention import FINAL_STATES

    value = text.strip().upper()
    if value not in FINAL_STATES:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a finished state: choose from {', '.join(FINAL_STATES)}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..retention import DEFAULT_BATCH

    parser.add_argument("--older-than", required=True, type=duration_seconds,
                        metavar="DURATION",
                        help="finished more than this long ago: seconds, or 15m, 12h, 7d, 2w")
    parser.add_argument("--status", dest="states", type=_state, action="append", default=[],
                        help="only runs in this finished state (repeatable; default: all four)")
    add_run_filters(parser)
    parser.add_argument("--batch", type=positive_int, default=DEFAULT_BATCH,
                        help=f"rows per delete statement and transaction (default "
                             f"{DEFAULT_BATCH})")
    parser.add_argument("--dry-run", action="store_true",
                        help="count what would be deleted, delete nothing")
    add_database_option(parser)


def handle(command: BaseCommand, **options: Any) -> None:
    from ..control import _database
    from ..retention import FINAL_STATES, PruneFilter, count_prunable, prune

    try:
        which = PruneFilter(options["older_than"], tuple(options["states"]) or FINAL_STATES,
                            tuple(options["queues"]), tuple(options["tasks"]))
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    database = _database(options.get("database"))
    what = _describe(which)
    if options["dry_run"]:
        with database_errors("counting"):
            n = count_prunable(which, database)
        command.stdout.write(f"would delete {n} {what} (dry run: nothing deleted)")
        return
    with database_errors("prune"):
        n = prune(which, database, batch=options["batch"],
                  progress=lambda done: command.stderr.write(f"... {done} deleted"))
    command.stdout.write(f"deleted {n} {what}")


def _describe(which: Any) -> str:
    parts = ["/".join(which.states) + " runs",
             f"finished more than {which.keep_seconds:g}s ago"]
    if which.queues:
        parts.append("in queue " + ", ".join(which.queues))
    if which.tasks:
        parts.append("of task " + ", ".join(which.tasks))
    return " ".join(parts)
