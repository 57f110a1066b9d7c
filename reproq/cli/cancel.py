"""``manage.py reproq cancel --id N [--id M ...]``."""

from __future__ import annotations

import argparse
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from .argtypes import run_id


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--id", dest="ids", type=run_id, action="append", required=True,
                        help="run id to cancel (repeatable)")


def handle(command: BaseCommand, **options: Any) -> None:
    from ..control import cancel_runs
    from ..ids import MAX_IDS
    from ..models import TaskRun

    ids = sorted(set(options["ids"]))
    if len(ids) > MAX_IDS:
        raise CommandError(f"{len(ids)} run ids given: at most {MAX_IDS} per cancel (run it "
                           "in several calls)")
    known = set(TaskRun.objects.filter(pk__in=ids).values_list("pk", flat=True))
    missing = [i for i in ids if i not in known]
    changed = cancel_runs(ids)
    for run in TaskRun.objects.filter(pk__in=ids).order_by("pk"):
        command.stdout.write(f"{run.pk}: {run.status} ({run.status_reason or 'unchanged'})")
    command.stdout.write(f"{changed} of {len(ids)} runs were active and are cancelled or "
                         "told to stop")
    if missing:
        raise CommandError(f"no such runs: {', '.join(map(str, missing))}")
