"""``manage.py reproq doctor``: what could keep tasks from running, one line per check
(`reproq.doctor`); exits with an error when a check fails."""

from __future__ import annotations

import argparse
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from .argtypes import add_database_option


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_database_option(parser)
    parser.add_argument("--strict", action="store_true",
                        help="exit with an error on warnings too")


def handle(command: BaseCommand, **options: Any) -> None:
    from ..control import _database
    from ..doctor import FAIL, WARN, diagnose

    findings = diagnose(_database(options.get("database")))
    width = max(len(f.topic) for f in findings)
    for f in findings:
        command.stdout.write(f"{f.level:<4}  {f.topic:<{width}}  {f.detail}")
        if f.hint and f.level != "ok":
            command.stdout.write(f"{'':<4}  {'':<{width}}  -> {f.hint}")
    failed = [f for f in findings if f.level == FAIL]
    warned = [f for f in findings if f.level == WARN]
    if failed or (options["strict"] and warned):
        raise CommandError(f"doctor: {len(failed)} failed, {len(warned)} warnings")
    command.stdout.write(f"doctor: no failures, {len(warned)} warnings")
